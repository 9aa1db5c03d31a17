"""Flat ResNet backbones and policy networks."""
from blockdrop.models.resnet import BasicBlock, Bottleneck, FlatResNet, PolicyNet, ResNetSpec

__all__ = ["BasicBlock", "Bottleneck", "FlatResNet", "PolicyNet", "ResNetSpec"]
