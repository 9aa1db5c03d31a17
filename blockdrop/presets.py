"""Named configurations: backbone, policy network, dataset and input pipeline of each setting.

Their names (blockdrop.choices.PRESET_NAMES) are what the CLIs list and check without torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from blockdrop.choices import CURRICULUM_PACE, PRESET_NAMES, check_preset_name  # noqa: F401 (re-exported)
from blockdrop.models.resnet import BudgetPolicy, DepthPolicy, FlatResNet, PolicyNet, ResNetSpec, narrowed_spec

# The original code's normalisation constants.
CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# scikit-learn's 8x8 digits scaled to [0, 1]; mean and std of all 1797 images.
DIGITS_MEAN = (0.3053,)
DIGITS_STD = (0.3760,)


def cifar_resnet(layers: tuple[int, ...], widths: tuple[int, ...] = (16, 32, 64), in_channels: int = 3) -> ResNetSpec:
    return ResNetSpec("basic", layers, widths, stem="cifar", shortcut="pad", in_channels=in_channels)


def imagenet_resnet(block: str, layers: tuple[int, ...]) -> ResNetSpec:
    return ResNetSpec(block, layers, (64, 128, 256, 512), stem="imagenet", shortcut="conv")


@dataclass(frozen=True)
class StageDefaults:
    """Per-stage defaults a training job uses when no flag overrides them."""

    epochs: int  # on the preset's own dataset
    batch_size: int  # per job (split over the workers)
    lr: float  # finetune: the ResNet's
    weight_decay: float = 0.0
    drop_rate: float = 0.0  # pretrain, adapt: stochastic depth, so the ResNet tolerates dropped blocks
    policy_lr: float | None = None  # finetune: the policy network's own lr (default: lr)
    steps: int = 0  # on other data (an image folder): the stage's length in optimisation steps


# The paper's schedules where the paper gives them; pretraining follows the usual ResNet recipes.
# adapt: a short stochastic-depth finetuning of a ResNet pretrained without it (blockdrop.stages).
# The depth policy's stages (blockdrop.depth): nest, depth, and its own finetune ("finetune_depth": the
# ResNet alone under the policy's choices, SGD). Set on the image folders of single-seed runs read on their
# test images, before the validation split existed: not yet re-chosen on validation (benchmarks/defaults.py
# does it for the pretrain stage's image-folder default: results/defaults_pretrain.md, 2 folders x 2 seeds, keeps
# the CIFAR schedule, within one standard error of the best); the CIFAR and ImageNet figures are scaled from
# them, untried.
CIFAR_STAGES = {
    "pretrain": StageDefaults(164, 128, 0.1, 1e-4),
    "adapt": StageDefaults(10, 128, 0.02, 1e-4, drop_rate=0.5),
    "curriculum": StageDefaults(5000, 2048, 1e-3),
    "finetune": StageDefaults(2000, 256, 1e-4),
    "nest": StageDefaults(30, 128, 0.02, 1e-4),
    "depth": StageDefaults(10, 256, 1e-3, 1e-4),
    "finetune_depth": StageDefaults(20, 128, 0.01, 1e-4),
}
IMAGENET_STAGES = {
    "pretrain": StageDefaults(90, 256, 0.1, 1e-4),
    "adapt": StageDefaults(3, 256, 0.01, 1e-4, drop_rate=0.5),
    "curriculum": StageDefaults(45, 256, 1e-3),
    "finetune": StageDefaults(10, 320, 1e-4),
    "nest": StageDefaults(5, 256, 0.01, 1e-4),
    "depth": StageDefaults(2, 256, 1e-3, 1e-4),
    "finetune_depth": StageDefaults(4, 256, 0.005, 1e-4),
}
DIGITS_STAGES = {
    "pretrain": StageDefaults(30, 64, 0.1, 5e-4, drop_rate=0.5),
    "adapt": StageDefaults(10, 64, 0.02, 5e-4, drop_rate=0.5),
    "curriculum": StageDefaults(30, 128, 1e-3),
    "finetune": StageDefaults(15, 64, 1e-3, policy_lr=3e-4),
    "nest": StageDefaults(30, 64, 0.02, 5e-4),
    "depth": StageDefaults(15, 128, 1e-3, 1e-4),
    "finetune_depth": StageDefaults(15, 64, 0.01, 5e-4),
}
# On other data than the preset's own (an image folder of any size) the BlockDrop stages last a
# fixed number of optimisation steps (converted to epochs from the dataset's size) instead of the
# paper's epoch counts, which assume CIFAR's 50k or ImageNet's 1.28M images; the curriculum decides
# one more block every CURRICULUM_PACE steps, then trains as long again with all of them decided.
# Chosen on two 1,440-image folders, digits and shapes (benchmarks/results/standard_backbone_digits.md, _shapes.md):
# a 32x32 ResNet-32 then runs adapt + curriculum + finetune in minutes on 2 CPU cores.
OTHER_DATA_STAGES = {
    "adapt": StageDefaults(0, 128, 0.02, 5e-4, drop_rate=0.5, steps=120),
    "curriculum": StageDefaults(0, 128, 1e-3),  # 2 x K x CURRICULUM_PACE steps
    "finetune": StageDefaults(0, 128, 1e-3, policy_lr=3e-4, steps=360),
    "nest": StageDefaults(0, 128, 0.02, 5e-4, steps=480),
    "depth": StageDefaults(0, 128, 1e-3, 1e-4, steps=300),
    "finetune_depth": StageDefaults(0, 128, 0.01, 5e-4, steps=360),
}


@dataclass(frozen=True)
class Preset:
    """One BlockDrop setting. `image_size` is the backbone's input; the policy sees it pooled."""

    name: str
    summary: str
    backbone: ResNetSpec
    policy: ResNetSpec
    num_classes: int
    dataset: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    policy_pool: int = 1  # the policy looks at the image average-pooled by this factor
    stages: dict = field(default_factory=lambda: CIFAR_STAGES, hash=False)
    penalty: float = -10.0  # default gamma of finetuning (and sweeps)
    # The curriculum's own gamma: the original's cl_training.py ran at its default -1 and only
    # finetuning used -10 / -5 (the paper's); at -10 a curriculum on a short budget keeps every block.
    curriculum_penalty: float = -1.0
    # The depth policy's network (blockdrop.depth): by default the BlockDrop policy's. It only has to tell
    # easy images from hard ones, so the CIFAR presets give it a half-width ResNet-8 on the image pooled
    # to 16x16: 1.6E+06 FLOPs instead of 2.4E+07, which every image pays (18% of a ResNet-32).
    depth_policy: ResNetSpec | None = None
    depth_pool: int | None = None

    @property
    def num_blocks(self) -> int:
        return self.backbone.num_blocks

    @property
    def in_channels(self) -> int:
        return self.backbone.in_channels

    def build_backbone(self, state: dict | None = None) -> FlatResNet:
        """The preset's ResNet; shaped as `state` (a backbone state dict) where channel pruning narrowed it."""
        return FlatResNet(narrowed_spec(self.backbone, state), self.num_classes)

    def build_policy(self) -> PolicyNet:
        return PolicyNet(self.policy, self.num_blocks, input_pool=self.policy_pool)

    @property
    def depth_policy_spec(self) -> tuple[ResNetSpec, int]:
        """The depth policy's network and the factor its input is pooled by."""
        return (self.depth_policy or self.policy), (self.depth_pool or self.policy_pool)

    def build_depth_policy(self, budget: bool = False) -> DepthPolicy:
        """The depth policy's network; `budget`: the budget policy's (the same, with its spending table)."""
        spec, pool = self.depth_policy_spec
        return (BudgetPolicy if budget else DepthPolicy)(spec, self.num_blocks, input_pool=pool)


def _build_presets() -> dict[str, Preset]:
    resnet8 = cifar_resnet((1, 1, 1))
    lite = {"depth_policy": cifar_resnet((1, 1, 1), (8, 16, 32)), "depth_pool": 2}
    presets = [
        Preset("R32_C10", "CIFAR-10, ResNet-32 (15 blocks), ResNet-8 policy", cifar_resnet((5, 5, 5)), resnet8,
               10, "cifar10", 32, CIFAR_MEAN, CIFAR_STD, **lite),
        Preset("R110_C10", "CIFAR-10, ResNet-110 (54 blocks), ResNet-8 policy", cifar_resnet((18, 18, 18)), resnet8,
               10, "cifar10", 32, CIFAR_MEAN, CIFAR_STD, **lite),
        Preset("R32_C100", "CIFAR-100, ResNet-32 (15 blocks), ResNet-8 policy", cifar_resnet((5, 5, 5)), resnet8,
               100, "cifar100", 32, CIFAR_MEAN, CIFAR_STD, **lite),
        Preset("R110_C100", "CIFAR-100, ResNet-110 (54 blocks), ResNet-8 policy", cifar_resnet((18, 18, 18)), resnet8,
               100, "cifar100", 32, CIFAR_MEAN, CIFAR_STD, **lite),
        Preset("R101_ImgNet", "ImageNet, ResNet-101 (33 blocks), ResNet-10 policy on 112x112",
               imagenet_resnet("bottleneck", (3, 4, 23, 3)), imagenet_resnet("basic", (1, 1, 1, 1)),
               1000, "imagenet", 224, IMAGENET_MEAN, IMAGENET_STD, policy_pool=2,
               stages=IMAGENET_STAGES, penalty=-5.0),
        # Offline: scikit-learn's bundled 8x8 digits; trains end to end in minutes on 2 CPU cores.
        Preset("R26_DIGITS", "offline 8x8 digits (ships with scikit-learn), ResNet-26 (12 blocks), "
               "half-width ResNet-8 policy",
               cifar_resnet((4, 4, 4), in_channels=1), cifar_resnet((1, 1, 1), (8, 16, 32), in_channels=1),
               10, "digits", 8, DIGITS_MEAN, DIGITS_STD, stages=DIGITS_STAGES, penalty=-5.0),
    ]
    names = tuple(p.name for p in presets)
    if names != PRESET_NAMES:
        raise RuntimeError(f"blockdrop.presets: PRESET_NAMES {PRESET_NAMES} != the presets made, {names}")
    return {p.name: p for p in presets}


PRESETS: dict[str, Preset] = _build_presets()


def get_preset(name: str) -> Preset:
    """The preset called `name`; a UserError listing the known ones otherwise."""
    check_preset_name(name)
    return PRESETS[name]
