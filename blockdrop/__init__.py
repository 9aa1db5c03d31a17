"""BlockDrop: per-image dynamic inference paths in residual networks (Wu et al., CVPR 2018)."""
from blockdrop.errors import UserError
from blockdrop.presets import Preset, get_preset

__version__ = "0.1.0"  # also the image tag: Dockerfile and cluster/ configs (tests check)

__all__ = ["PRESETS", "Preset", "UserError", "get_preset"]


def __getattr__(name: str):
    # `import blockdrop` stays free of torch (the CLIs start in a fraction of a second): PRESETS, whose
    # network specs come with the models, is made on first use (blockdrop.presets).
    if name == "PRESETS":
        from blockdrop import presets

        return presets.PRESETS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
