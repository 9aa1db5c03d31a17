"""Checkpoints: the project's own format, and import of original BlockDrop and torchvision files.

Own format: a dict of plain state dicts plus JSON metadata, readable with
`torch.load(weights_only=True)`. Every file is read that way; nothing in a checkpoint can run code.

Accepted inputs, detected by their keys:
- own files: `{"format": FORMAT, "preset", "meta", "backbone", "policy"}`;
- original BlockDrop files: `agent` (policy; legacy files say `net`), `resnet` (backbone, only in
  finetuned files), `epoch`, `reward`, `acc`; `features.fc.*` and the value head `vnet.*` dropped;
- pretrained ResNets in torchvision layout, bare or as `{"state_dict": ...}` / `{"model": ...}`,
  with or without DataParallel's `module.` prefix: `layer{n}.{i}` -> `blocks.{n-1}.{i}`,
  `layer{n}.0.downsample` -> `ds.{n-1}`.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from blockdrop.errors import UserError
from blockdrop.models.resnet import FlatResNet
from blockdrop.presets import PRESETS, Preset
from blockdrop.prune import StaticPolicy

FORMAT = "blockdrop-checkpoint/1"
StateDict = dict[str, torch.Tensor]

# Original files may carry numpy scalars in `acc` / `reward`; these are data, not code.
_NUMPY_GLOBALS = [
    np._core.multiarray.scalar,
    (np._core.multiarray.scalar, "numpy.core.multiarray.scalar"),
    np.dtype,
    *(type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")),
]


@dataclass
class Checkpoint:
    """What a file holds, in this project's key layout. `source` says which format it came in."""

    source: str  # "blockdrop" | "blockdrop-original" | "torchvision"
    backbone: StateDict | None = None
    policy: StateDict | None = None
    preset: str | None = None
    meta: dict = field(default_factory=dict)
    path: str = ""  # the file it was read from


def save_checkpoint(path: str | os.PathLike, preset: Preset, backbone: nn.Module,
                    policy: nn.Module | None = None, meta: dict | None = None) -> None:
    """Write atomically: a crash mid-write leaves any previous file at `path` intact."""
    payload = {
        "format": FORMAT,
        "preset": preset.name,
        "meta": json.dumps(meta or {}),  # fails here, not at load time, if meta is not JSON-able
        "backbone": {k: v.detach().cpu() for k, v in backbone.state_dict().items()},
        "policy": None if policy is None else {k: v.detach().cpu() for k, v in policy.state_dict().items()},
    }
    payload["checksum"] = checksum(payload)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def checksum(payload: dict) -> str:
    """SHA-256 of what a file of this project's format holds (preset, metadata, every tensor's name, dtype,
    shape and bytes): written with the file and checked on reading, so damage is found, not evaluated."""
    digest = hashlib.sha256(f"{payload['format']}|{payload['preset']}|{payload['meta']}".encode())
    for part in ("backbone", "policy"):
        for name, tensor in sorted((payload.get(part) or {}).items()):
            digest.update(f"|{part}.{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _torch_load(path: Path) -> object:
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder, not a checkpoint file (a .pt, .t7 or .pth file)")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive; PyTorch < 1.6 wrote a bare pickle (first byte 0x80).
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):
        raise UserError(f"{path} is not a PyTorch checkpoint (neither a torch.save zip nor a pickle)")
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f"it pickles {found[1]}" if found else str(err).splitlines()[0]
        raise UserError(
            f"{path} cannot be read as weights only: {what}. Checkpoints that pickle whole modules or "
            "other objects are not accepted (they could run code): save a state_dict instead"
        ) from None
    except Exception as err:  # corrupt zip, truncated file, ...
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _strip_module(sd: StateDict) -> StateDict:
    return {k.removeprefix("module."): v for k, v in sd.items()}


_TV_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.(.*)$")


def _from_torchvision(sd: StateDict) -> StateDict:
    """Rename torchvision ResNet keys to the flat layout."""
    out = {}
    for key, value in sd.items():
        m = _TV_BLOCK.match(key)
        if m is None:
            out[key] = value
            continue
        stage, block, rest = int(m[1]) - 1, m[2], m[3]
        if rest.startswith("downsample."):
            out[f"ds.{stage}.{rest.removeprefix('downsample.')}"] = value
        else:
            out[f"blocks.{stage}.{block}.{rest}"] = value
    return out


def _policy_from_original(sd: StateDict) -> StateDict:
    return {k: v for k, v in _strip_module(sd).items()
            if not k.startswith(("features.fc.", "vnet."))}


def _meta_value(value: object) -> object:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value if isinstance(value, (int, float, str, bool)) else None


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read any accepted file into the flat layout; a UserError for anything else."""
    ckpt = _read(Path(path))
    ckpt.path = str(path)
    return ckpt


def _read(path: Path) -> Checkpoint:
    obj = _torch_load(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        if "checksum" in obj and obj["checksum"] != checksum(obj):  # files written before checksums have none
            raise UserError(f"{path} is damaged: its contents no longer match the checksum written with it (a "
                            "bad copy or disk?); use another copy of it, or train it again")
        return Checkpoint("blockdrop", obj["backbone"], obj["policy"], obj["preset"], json.loads(obj["meta"]))

    if isinstance(obj, dict) and any(k in obj for k in ("agent", "net", "resnet")):
        policy = obj.get("agent", obj.get("net"))
        backbone = obj.get("resnet")
        for name, sd in (("agent", policy), ("resnet", backbone)):
            if sd is not None and not _is_state_dict(sd):
                raise UserError(f"{path}: entry {name!r} is not a state dict of tensors")
        meta = {k: _meta_value(obj[k]) for k in ("epoch", "reward", "acc") if k in obj}
        return Checkpoint(
            "blockdrop-original",
            backbone=None if backbone is None else _from_torchvision(_strip_module(backbone)),
            policy=None if policy is None else _policy_from_original(policy),
            meta=meta,
        )

    sd = obj
    if isinstance(obj, dict) and not _is_state_dict(obj):
        sd = obj.get("state_dict", obj.get("model"))
    if _is_state_dict(sd):
        sd = _strip_module(sd)
        if any(k.startswith(("layer1.", "blocks.", "conv1.")) for k in sd):
            return Checkpoint("torchvision", backbone=_from_torchvision(sd))
    keys = sorted(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
    raise UserError(
        f"{path} is not a BlockDrop or ResNet checkpoint: expected a BlockDrop file (keys 'agent'/'resnet' "
        f"or this project's format) or a ResNet state dict (keys 'layer1.*' or 'blocks.*'); found {keys}"
    )


# ---- fitting a state dict to a preset ----

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(\d+)\.conv1\.weight$")


def _describe(sd: StateDict, part: str) -> str:
    """A one-line summary of a backbone or policy state dict: block type, stages, outputs."""
    prefix, head = ("", "fc") if part == "backbone" else ("features.", "logit")
    per_stage: Counter[int] = Counter()
    for key in sd:
        m = _BLOCK_KEY.match(key.removeprefix(prefix))
        if m:
            per_stage[int(m[1])] += 1
    layers = [per_stage[s] for s in sorted(per_stage)]
    kind = "bottleneck" if any(k.endswith("conv3.weight") for k in sd) else "basic"
    outputs = sd.get(f"{head}.weight")
    return f"{kind} blocks {layers} with {'no' if outputs is None else outputs.shape[0]} outputs"


def _mismatch(sd: StateDict, module: nn.Module) -> list[str]:
    """Differences between `sd` and the module's own state dict (BN counters may be absent)."""
    own = module.state_dict()
    problems = [f"missing {k}" for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    problems += [f"unexpected {k}" for k in sd if k not in own]
    problems += [f"{k} has shape {tuple(sd[k].shape)}, not {tuple(v.shape)}"
                 for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    return problems


def build_policy(preset: Preset, state: StateDict | None = None) -> nn.Module:
    """The policy module a state dict is for: the depth policy's carries its keep order (`rank`), the budget
    policy's its spending table too (`spend`)."""
    if state is not None and "rank" in state:
        return preset.build_depth_policy(budget="spend" in state)
    return preset.build_policy()


def _build(preset: Preset, part: str, state: StateDict | None = None) -> nn.Module:
    return preset.build_backbone(state) if part == "backbone" else build_policy(preset, state)


def load_state(module: nn.Module, sd: StateDict, preset: Preset, part: str, path: str | os.PathLike) -> None:
    """Load `sd` into `module` (the preset's "backbone" or "policy"), or say why it does not fit."""
    problems = _mismatch(sd, module)
    if problems:
        fits = [p.name for p in PRESETS.values() if p is not preset and not _mismatch(sd, _build(p, part, sd))]
        hint = f"; it fits preset {', '.join(fits)}" if fits else ""
        raise UserError(
            f"{path}: the {part} does not fit preset {preset.name}: expected "
            f"{_describe(module.state_dict(), part)}, found {_describe(sd, part)} "
            f"({len(problems)} differences, first: {problems[0]}){hint}"
        )
    module.load_state_dict(sd, strict=False)


def load_models(preset: Preset, checkpoint: str | os.PathLike | Checkpoint,
                backbone_file: str | os.PathLike | None = None) -> tuple[FlatResNet, nn.Module | None, Checkpoint]:
    """The preset's backbone and policy with weights from the file(s) (or from a Checkpoint already
    read); the policy is None if absent, a StaticPolicy (blockdrop.prune) for a pruned ResNet.

    `backbone_file` supplies the ResNet when `checkpoint` holds only a policy (an original
    curriculum checkpoint, for instance); it overrides a backbone inside `checkpoint`.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint)
    checkpoint = ckpt.path or checkpoint
    if ckpt.preset is not None and ckpt.preset != preset.name:
        raise UserError(f"{checkpoint} was saved for preset {ckpt.preset}, not {preset.name}; pass --preset {ckpt.preset}")
    backbone_sd, backbone_src = ckpt.backbone, checkpoint
    if backbone_file is not None:
        backbone_sd, backbone_src = read_checkpoint(backbone_file).backbone, backbone_file
        if backbone_sd is None:
            raise UserError(f"{backbone_file} holds no ResNet weights")
    if backbone_sd is None:
        raise UserError(
            f"{checkpoint} holds a policy but no ResNet (an original curriculum checkpoint?); "
            "pass the pretrained ResNet it was trained on with --backbone FILE"
        )
    backbone = preset.build_backbone(backbone_sd)  # a channel-pruned ResNet: as narrow as its weights
    load_state(backbone, backbone_sd, preset, "backbone", backbone_src)
    policy = None
    if ckpt.policy is not None:
        policy = build_policy(preset, ckpt.policy)
        load_state(policy, ckpt.policy, preset, "policy", checkpoint)
    elif ckpt.meta.get("config", {}).get("static_policy") is not None:  # a pruned ResNet (train_job --stage prune)
        policy = StaticPolicy(torch.tensor(ckpt.meta["config"]["static_policy"], dtype=torch.float32))
    return backbone, policy, ckpt
