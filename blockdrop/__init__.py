"""BlockDrop: per-image dynamic inference paths in residual networks (Wu et al., CVPR 2018).

`import blockdrop` loads nothing heavy (the commands' parsers live in this package); the library is
its modules: blockdrop.presets (PRESETS, get_preset), blockdrop.inference, blockdrop.metrics, ...
"""
from blockdrop.errors import UserError

__version__ = "0.1.0"  # also the image tag: Dockerfile and cluster/ configs (tests check)

__all__ = ["UserError"]
