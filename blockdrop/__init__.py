"""BlockDrop: per-image dynamic inference paths in residual networks (Wu et al., CVPR 2018)."""
from blockdrop.errors import UserError
from blockdrop.presets import PRESETS, Preset, get_preset

__version__ = "0.1.0"  # also the image tag: Dockerfile and cluster/ configs (tests check)

__all__ = ["PRESETS", "Preset", "UserError", "get_preset"]
