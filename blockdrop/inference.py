"""Running a trained model: load it once, then per image its blocks, their cost and its class.

The project's one inference path: evaluation (blockdrop.metrics.tally, which training's test passes
use too), the MLflow model (blockdrop.pyfunc) and the server (blockdrop.serving) all call `predict`,
and all turn a client's raw images into the network's input with one `Decoder`.

    model = load("checkpoints/JOB-finetune.pt")
    out = model.predict(model.decoder(open("digit.png", "rb").read())[None])
    out.classes, out.policies, out.blocks, out.flops
"""
from __future__ import annotations

import base64
import binascii
import io
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from blockdrop.budget import cap_rows
from blockdrop.checkpoints import Checkpoint, load_models, read_checkpoint
from blockdrop.data import eval_transform
from blockdrop.errors import UserError
from blockdrop.execution import run_sparse
from blockdrop.flops import CostModel, cost_model
from blockdrop.models.resnet import BudgetPolicy, DepthPolicy, FlatResNet, PolicyNet
from blockdrop.presets import Preset, get_preset
from blockdrop.reinforce import force_undecided, greedy

# What decides an image's blocks: a policy network (its greedy decisions; its FLOPs are paid), a
# function from images to 0/1 rows (an image-blind baseline, a pruned ResNet's StaticPolicy: nothing
# to pay for), or None (every block: the full ResNet).
Policy = nn.Module | Callable[[torch.Tensor], torch.Tensor] | None


@dataclass
class Prediction:
    """Per image: the logits, the 0/1 blocks it ran and their FLOPs (the policy network's included)."""

    logits: torch.Tensor  # (N, classes)
    policies: torch.Tensor  # (N, K) 0/1
    flops: torch.Tensor  # (N,)

    @property
    def classes(self) -> torch.Tensor:
        return self.logits.argmax(1)

    @property
    def blocks(self) -> torch.Tensor:
        return self.policies.sum(1)

    def policy_strings(self) -> list[str]:
        """Each image's policy as the string of its blocks' 0/1 ("110100..."): what answers show."""
        return ["".join(str(int(v)) for v in row) for row in self.policies.tolist()]


def is_budget_model(policy: Policy) -> bool:
    """Does `policy` run at any mean budget (blockdrop.budget)? Any policy takes a per-image cap."""
    return isinstance(policy, BudgetPolicy)


@torch.inference_mode()
def predict(backbone: FlatResNet, policy: Policy, images: torch.Tensor, costs: CostModel,
            decided: torch.Tensor | None = None, budget=None, cap=None) -> Prediction:
    """Choose each image's blocks with `policy` and run only those (sparse execution). `decided` (a
    K-vector of 0/1) forces the other blocks on, as the curriculum stage evaluates. `budget`: a mean
    target (a budget policy's), `cap`: a per-image cap (any policy's), shares of the full ResNet's FLOPs,
    one for all images or one per image (blockdrop.budget)."""
    if policy is None:
        if cap is not None:
            raise ValueError("the full ResNet runs every block: it takes no cap")
        policies = torch.ones(len(images), backbone.num_blocks, device=images.device)
        return Prediction(backbone(images), policies,
                          torch.full((len(images),), float(costs.backbone.total), dtype=torch.float64,
                                     device=images.device))
    learned = isinstance(policy, PolicyNet)
    if budget is not None and not is_budget_model(policy):
        raise ValueError("a mean budget needs a budget policy (train_job.py --policy budget); this one takes a cap")
    if is_budget_model(policy) and (budget is not None or cap is not None):
        policies = policy.rows_at(images, budget, cap)
    elif learned:
        scores = policy(images)
        policies = greedy(scores)
        if cap is not None:  # the blocks it values most: a depth policy's keep order, else its keep-probabilities
            values = -policy.rank.to(scores).expand_as(policies) if isinstance(policy, DepthPolicy) else scores
            policies = _capped(policies, values, costs, cap, learned)
    else:
        policies = policy(images)
        if cap is not None:  # an image-blind policy keeps its earlier blocks first
            values = -torch.arange(policies.shape[1], device=images.device, dtype=torch.float32).expand_as(policies)
            policies = _capped(policies, values, costs, cap, learned)
    if decided is not None:
        policies = force_undecided(policies, decided.to(images.device))
    return Prediction(run_sparse(backbone, images, policies), policies, costs.per_image(policies, with_policy=learned))


def _capped(policies: torch.Tensor, values: torch.Tensor, costs: CostModel, cap, learned: bool) -> torch.Tensor:
    cap = torch.as_tensor(cap, dtype=torch.float64, device=policies.device).expand(len(policies))
    allowance = cap * costs.full - (costs.fixed - (0 if learned else costs.policy))
    return cap_rows(policies, values, torch.tensor(costs.backbone.blocks, dtype=torch.float64), allowance)


def from_base64(text: str) -> bytes:
    """The bytes of a base64 string; a ValueError if it is not one."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None


# The most pixels a client's image may have: well above any preset's input (ImageNet's 224x224 from photos
# of a few megapixels), far below a decompression bomb (a 97 KB PNG of 10000x10000 decodes to 300 MB).
MAX_PIXELS = 40_000_000


class ImageTooLarge(ValueError):
    """An image with more pixels than MAX_PIXELS: refused before it is decoded."""


def decode_image(data: bytes, in_channels: int, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Encoded image bytes (PNG, JPEG, TIFF, ...) as a PIL image in the preset's mode (8-bit grey or RGB); a
    ValueError if Pillow cannot read them, an ImageTooLarge if they hold more than `max_pixels` pixels (the
    size is read from the header, before decoding). 16-bit and float images are scaled to 8 bits, not clipped."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLarge(f"an image of {width}x{height} pixels, more than the {max_pixels:,} allowed; "
                                    "send it at the size the model takes (it is resized to the preset's input anyway)")
            return _to_8bit(image).convert("L" if in_channels == 1 else "RGB")
    except ImageTooLarge:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise ValueError("not a PNG, JPEG or other image Pillow reads") from None


def _to_8bit(image: Image.Image) -> Image.Image:
    """A high-depth single-band image (16-bit, 32-bit integer, float) as 8-bit grey with its range kept:
    Pillow's own conversion clips such values to 0..255 (a 16-bit digit turns black and white). Integers
    scale by their type's range (16 bits for I;16 and for I holding values within it); floats from 0..1, or
    0..255, or 0..65535, by the range their values fill."""
    if image.mode in ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
        return image
    pixels = np.asarray(image, dtype=np.float64)
    if pixels.ndim != 2:
        return image
    top = float(pixels.max()) if pixels.size else 0.0
    if image.mode == "F":
        scale = 255.0 if top <= 1.0 else 1.0 if top <= 255.0 else 255.0 / 65535.0
    elif image.mode.startswith("I;16"):
        scale = 255.0 / 65535.0
    else:  # I (32-bit integers): 8-bit values as they are, 16-bit ones scaled, wider ones by their maximum
        scale = 1.0 if top <= 255 else 255.0 / 65535.0 if top <= 65535 else 255.0 / top
    return Image.fromarray(np.clip(np.rint(pixels * scale), 0, 255).astype(np.uint8), "L")


class Decoder:
    """A client's image as the network's input: encoded bytes (PNG, JPEG, ...) or uint8 pixels (H, W, C)
    in 0..255, through the preset's evaluation transform (resize, crop, normalise)."""

    def __init__(self, preset: Preset):
        self.channels = preset.in_channels
        self.transform = eval_transform(preset)

    def __call__(self, image: bytes | np.ndarray) -> torch.Tensor:
        if isinstance(image, (bytes, bytearray)):
            return self.transform(decode_image(bytes(image), self.channels))
        pixels = image[..., 0] if self.channels == 1 and image.ndim == 3 else image
        return self.transform(Image.fromarray(pixels, "L" if self.channels == 1 else "RGB"))


@dataclass
class Model:
    """A trained model ready to answer: the preset, its ResNet and policy in eval mode on `device`, the
    cost model of that policy, its decoder, and the checkpoint it came from (metadata: figures, reference)."""

    preset: Preset
    backbone: FlatResNet
    policy: nn.Module | None
    costs: CostModel
    decoder: Decoder
    checkpoint: Checkpoint
    device: torch.device

    def predict(self, images: torch.Tensor, full: bool = False, budget=None, cap=None) -> Prediction:
        """Each image under its own policy (`full`: every block, no policy network); `budget`, `cap`: see
        `predict` (scalars or one per image)."""
        return predict(self.backbone, None if full else self.policy, images.to(self.device),
                       cost_model(self.preset, None, self.backbone) if full else self.costs, budget=budget, cap=cap)

    def cheapest(self) -> float:
        """The least share of the full ResNet's FLOPs an image can cost under this model: no block run."""
        learned = isinstance(self.policy, PolicyNet)
        return (self.costs.fixed - (0 if learned else self.costs.policy)) / self.costs.full


def load(path: str | os.PathLike, preset: str | None = None, backbone_file: str | os.PathLike | None = None,
         device: str | torch.device = "cpu") -> Model:
    """The model of a checkpoint file, read once. `preset`: the preset the file is for (a UserError if
    it records another), needed where it records none; `backbone_file` supplies the ResNet of a file
    that holds only a policy."""
    ckpt = read_checkpoint(path)
    name = preset or ckpt.preset
    if name is None:
        raise UserError(f"{path} does not say its preset: pass --preset")
    found = get_preset(name)
    backbone, policy, ckpt = load_models(found, ckpt, backbone_file)
    device = torch.device(device)
    backbone.eval().to(device)
    if policy is not None:
        policy.eval().to(device)
    return Model(found, backbone, policy, cost_model(found, policy, backbone), Decoder(found), ckpt, device)
