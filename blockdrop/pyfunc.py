"""The MLflow model of a trained checkpoint: raw images in, per image its class, blocks, FLOPs and policy out.

Logged with each trained model (blockdrop.tracking.Tracker.publish), it loads the checkpoint through
blockdrop.inference and answers with its `predict`: what `mlflow.pyfunc.load_model` and `mlflow models
serve` give a user, without this project's server.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel

from blockdrop import inference
from blockdrop.budget import check_budget

# The params `predict` takes (MLflow's `params=`), each a number or left out: `budget` a mean target as a
# share of the full ResNet's FLOPs (a budget model's), `mean_flops` the same in FLOPs, `max_flops` a per-image
# cap in FLOPs (any policy network), as the server's request fields (blockdrop.serving.ASK_FIELDS).
BUDGET_PARAMS = ("budget", "mean_flops", "max_flops")


def raw_images(preset, tensors) -> np.ndarray:
    """What a client has: uint8 images (N, H, W, C) in 0..255, from the evaluation transform's output
    (normalised N, C, H, W tensors); the model's input example."""
    mean = np.asarray(preset.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(preset.std, dtype=np.float32)[:, None, None]
    pixels = (np.asarray(tensors, dtype=np.float32) * std + mean) * 255.0
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def input_example(preset, test_set, images: int = 2) -> np.ndarray:
    """The first `images` test images as a client sends them: the logged model's input example."""
    return raw_images(preset, torch.stack([test_set[i][0] for i in range(images)]).numpy())


class BlockDropModel(PythonModel):
    """An MLflow model: raw images in (uint8, N x H x W x C, 0..255, as decoded from PNG/JPEG; or
    a 1-D object array of encoded images: bytes or base64 strings), the preset's evaluation transform
    applied here; per image out: class, blocks used, FLOPs, policy."""

    def load_context(self, context) -> None:
        self.model = inference.load(context.artifacts["checkpoint"])
        self.preset = self.model.preset

    @staticmethod
    def output_example(n: int) -> pd.DataFrame:
        return pd.DataFrame({"prediction": np.zeros(n, dtype=np.int64), "blocks_used": np.zeros(n, dtype=np.int32),
                             "flops": np.zeros(n, dtype=np.float32), "policy": ["0"] * n})

    def images(self, model_input) -> torch.Tensor:
        """Raw images to the network's input, or a ValueError that says what was expected. A 1-D object
        array holds one image per item: PNG/JPEG bytes, base64 strings of them, or pixel arrays (MLflow's
        signature check lets such ragged input through)."""
        if isinstance(model_input, pd.DataFrame) and model_input.shape[1] == 1:
            model_input = model_input.iloc[:, 0].to_numpy()
        if isinstance(model_input, (list, tuple)) or (isinstance(model_input, np.ndarray) and model_input.dtype == object):
            return torch.stack([self._one(item, i) for i, item in enumerate(model_input)])
        return torch.stack([self.model.decoder(a) for a in self._check(np.asarray(model_input))])

    def _want(self) -> str:
        c = self.preset.in_channels
        return (f"uint8 images of shape (N, H, W, {c}) with pixel values 0..255 (the preset's size is "
                f"{self.preset.image_size}x{self.preset.image_size}; other sizes are resized), or a 1-D object "
                "array of PNG/JPEG bytes or base64 strings")

    def _one(self, item, i: int) -> torch.Tensor:
        if isinstance(item, np.ndarray) and item.dtype != object:
            return self.model.decoder(self._check(item[None])[0])
        if isinstance(item, str):
            try:
                item = inference.from_base64(item)
            except ValueError:
                raise ValueError(f"image {i} is a string but not base64; expected {self._want()}") from None
        if not isinstance(item, (bytes, bytearray)):
            raise ValueError(f"image {i} is a {type(item).__name__}; expected {self._want()}")
        try:
            return self.model.decoder(bytes(item))
        except ValueError as err:
            raise ValueError(f"image {i}: {err}") from None

    def _check(self, array: np.ndarray) -> np.ndarray:
        c, want = self.preset.in_channels, self._want()
        if array.dtype != np.uint8:
            raise ValueError(f"expected {want}, got dtype {array.dtype}; send raw pixels, not normalised values")
        if array.size and int(array.max()) <= 2:
            # MLflow's scoring server casts JSON numbers to the signature's uint8: values scaled to 0..1 or
            # normalised arrive as 0, 1 and 2, and would be classified as a black image without a word
            raise ValueError(f"expected {want}: every pixel value here is 0, 1 or 2, which is what values scaled "
                             "to 0..1 or normalised become; send the pixels as decoded from the image file")
        if array.ndim == 3 and c == 1:
            array = array[..., None]
        if array.ndim != 4 or array.shape[-1] != c or min(array.shape[1:3], default=0) < 1:
            raise ValueError(f"expected {want}, got shape {array.shape}")
        return array

    def budgets(self, params: dict | None) -> tuple[float | None, float | None]:
        """(mean target, per-image cap) as shares of the full ResNet's FLOPs, or a ValueError."""
        params = {k: v for k, v in (params or {}).items() if v is not None}
        unknown = sorted(set(params) - set(BUDGET_PARAMS))
        if unknown:
            raise ValueError(f"unknown param(s) {', '.join(unknown)}; this model takes {', '.join(BUDGET_PARAMS)}")
        full = float(self.model.costs.full)
        shares = {}
        for name, value in params.items():
            share = float(value) if name == "budget" else float(value) / full
            shares[name] = check_budget(share, name if name == "budget" else f"{name} / the full FLOPs ({full:.3E})")
        if "budget" in shares and "mean_flops" in shares:
            raise ValueError("budget and mean_flops are the same mean target (a share, FLOPs): give one")
        mean, cap = shares.get("budget", shares.get("mean_flops")), shares.get("max_flops")
        if mean is not None and not inference.is_budget_model(self.model.policy):
            raise ValueError("a mean budget (budget, mean_flops) needs a budget model (train_job.py --policy budget); "
                             "max_flops caps each image under any policy")
        for name, share in (("mean budget", mean), ("max_flops", cap)):
            if share is not None and share < self.model.cheapest():
                raise ValueError(f"{name} {share:.3f} of the full FLOPs is below what an image costs with no block "
                                 f"({self.model.cheapest():.3f})")
        return mean, cap

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> pd.DataFrame:
        mean, cap = self.budgets(params)
        out = self.model.predict(self.images(model_input), budget=mean, cap=cap)
        return pd.DataFrame({
            "prediction": out.classes.cpu().numpy(),
            "blocks_used": out.blocks.int().cpu().numpy(),
            "flops": out.flops.float().cpu().numpy(),
            "policy": out.policy_strings(),
        })
