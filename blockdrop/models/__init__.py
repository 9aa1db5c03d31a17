"""Flat ResNet backbones and policy networks."""
from blockdrop.models.resnet import BasicBlock, Bottleneck, DepthPolicy, FlatResNet, PolicyNet, ResNetSpec

__all__ = ["BasicBlock", "Bottleneck", "DepthPolicy", "FlatResNet", "PolicyNet", "ResNetSpec"]
