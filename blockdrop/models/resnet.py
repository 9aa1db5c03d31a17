"""Flat ResNets: the backbone as a list of residual branches that a policy can switch off.

The state-dict layout is the original BlockDrop one (`conv1`, `bn1`, `blocks.{stage}.{block}.*`,
`ds.{stage}.*`, `fc`), so original checkpoints load without renaming. A block module holds only
its residual branch F(x); the shortcut lives in `ds[stage]` and the sum `relu(shortcut + F(x))`
is taken by the executor (blockdrop.execution), which decides per image whether F runs at all.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blockdrop import budget as B
from blockdrop.depth import choose, depth_costs, ranks, rows


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Residual branch of a basic block: conv3x3-BN-ReLU-conv3x3-BN. `mids`: the inner width (conv1's
    outputs) where channel pruning narrowed it (blockdrop.channels), else `planes`."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, mids: tuple[int, ...] | None = None):
        super().__init__()
        mid = mids[0] if mids else planes
        self.conv1 = conv3x3(inplanes, mid, stride)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = conv3x3(mid, planes)
        self.bn2 = nn.BatchNorm2d(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))


class Bottleneck(nn.Module):
    """Residual branch of a bottleneck block (stride on the 3x3 conv, as torchvision). `mids`: the widths of
    conv1's and conv2's outputs where channel pruning narrowed them, else `planes` both."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, mids: tuple[int, ...] | None = None):
        super().__init__()
        first, second = mids or (planes, planes)
        self.conv1 = nn.Conv2d(inplanes, first, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(first)
        self.conv2 = conv3x3(first, second, stride)
        self.bn2 = nn.BatchNorm2d(second)
        self.conv3 = nn.Conv2d(second, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


class PadShortcut(nn.Module):
    """CIFAR 'option A' shortcut: average-pool by the stride, zero-pad the new channels.

    Has no weights and costs no FLOPs; it runs even when the block it belongs to is dropped.
    """

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        self.extra = cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride)
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


@dataclass(frozen=True)
class ResNetSpec:
    """Shape of a flat ResNet: block type, blocks per stage, stage widths, stem and shortcut."""

    block: str  # "basic" | "bottleneck"
    layers: tuple[int, ...]
    widths: tuple[int, ...]
    stem: str  # "cifar": conv3x3 | "imagenet": conv7x7/2 + maxpool
    shortcut: str  # "pad": parameter-free (CIFAR) | "conv": 1x1 conv + BN (ImageNet)
    in_channels: int = 3
    # a channel-pruned ResNet (blockdrop.channels): each block's inner widths (basic: conv1's outputs;
    # bottleneck: conv1's and conv2's), in flat block order; None: every block at its stage's width
    mids: tuple[tuple[int, ...], ...] | None = None

    @property
    def num_blocks(self) -> int:
        return sum(self.layers)

    @property
    def block_index(self) -> list[tuple[int, int]]:
        """(stage, block-in-stage) of each flat block index k."""
        return [(s, b) for s, count in enumerate(self.layers) for b in range(count)]

    @property
    def depth(self) -> int:
        per_block = 3 if self.block == "bottleneck" else 2
        return per_block * self.num_blocks + 2


def full_mids(spec: ResNetSpec) -> tuple[tuple[int, ...], ...]:
    """Every block's inner widths when nothing is pruned."""
    per_block = 2 if spec.block == "bottleneck" else 1
    return tuple((planes,) * per_block for planes, count in zip(spec.widths, spec.layers) for _ in range(count))


def narrowed_spec(spec: ResNetSpec, state: dict | None) -> ResNetSpec:
    """The spec a backbone state dict was saved from: `spec` with the inner widths its weights have where
    channel pruning narrowed them (at most the stage's width; anything else is left for the state dict's
    own check to refuse)."""
    if not state:
        return spec
    names = ("conv1", "conv2") if spec.block == "bottleneck" else ("conv1",)
    full = full_mids(spec)
    found = []
    for k, (stage, b) in enumerate(spec.block_index):
        widths = [state.get(f"blocks.{stage}.{b}.{name}.weight") for name in names]
        if any(w is None or w.dim() != 4 for w in widths):
            return spec
        mids = tuple(int(w.shape[0]) for w in widths)
        if any(m < 1 or m > f for m, f in zip(mids, full[k])):
            return spec
        found.append(mids)
    mids = tuple(found)
    return spec if mids == full else dataclasses.replace(spec, mids=mids)


class FlatResNet(nn.Module):
    """A ResNet whose residual blocks are addressed by one flat index k = 0..K-1."""

    def __init__(self, spec: ResNetSpec, num_classes: int | None):
        super().__init__()
        self.spec = spec
        block = BLOCKS[spec.block]
        width0 = spec.widths[0]
        if spec.stem == "cifar":
            self.conv1 = conv3x3(spec.in_channels, width0)
        else:
            self.conv1 = nn.Conv2d(spec.in_channels, width0, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width0)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if spec.stem == "imagenet" else None

        blocks, shortcuts = [], []
        inplanes = width0
        mids = iter(spec.mids or [None] * spec.num_blocks)
        for stage, (planes, count) in enumerate(zip(spec.widths, spec.layers)):
            stride = 1 if stage == 0 else 2
            outplanes = planes * block.expansion
            shortcuts.append(self._shortcut(inplanes, outplanes, stride))
            stage_blocks = [block(inplanes, planes, stride, next(mids))]
            stage_blocks += [block(outplanes, planes, mids=next(mids)) for _ in range(count - 1)]
            blocks.append(nn.ModuleList(stage_blocks))
            inplanes = outplanes
        self.blocks = nn.ModuleList(blocks)
        self.ds = nn.ModuleList(shortcuts)
        self.feature_dim = inplanes
        self.fc = nn.Linear(inplanes, num_classes) if num_classes else None
        self.block_index = spec.block_index
        self._init_weights()

    def _shortcut(self, cin: int, cout: int, stride: int) -> nn.Module:
        if stride == 1 and cin == cout:
            return nn.Identity()
        if self.spec.shortcut == "pad":
            return PadShortcut(cin, cout, stride)
        return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def num_blocks(self) -> int:
        return len(self.block_index)

    def block(self, k: int) -> nn.Module:
        stage, b = self.block_index[k]
        return self.blocks[stage][b]

    def shortcut(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Block k's shortcut path: the stage's downsampling for a stage's first block."""
        stage, b = self.block_index[k]
        return self.ds[stage](x) if b == 0 else x

    def seed(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.maxpool(x) if self.maxpool is not None else x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x) if self.fc is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The full network: every block runs for every image."""
        x = self.seed(x)
        for k in range(self.num_blocks):
            x = F.relu(self.shortcut(k, x) + self.block(k)(x))
        return self.head(x)


class PolicyNet(nn.Module):
    """The policy network: a small ResNet that maps an image to K keep-probabilities.

    `input_pool` average-pools the image first (the ImageNet policy looks at 112x112).
    The original's value head (`vnet`) is unused by the method and is not built.
    """

    def __init__(self, spec: ResNetSpec, num_blocks: int, input_pool: int = 1, outputs: int | None = None):
        super().__init__()
        self.input_pool = input_pool
        self.features = FlatResNet(spec, num_classes=None)
        self.logit = nn.Linear(self.features.feature_dim, outputs or num_blocks)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of the outputs."""
        if self.input_pool > 1:
            x = F.avg_pool2d(x, self.input_pool)
        return self.logit(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.scores(x))


class DepthPolicy(PolicyNet):
    """The depth policy (blockdrop.depth): a small ResNet that predicts, for d = 0..K, the probability
    that the ResNet run with the first d blocks of one order classifies the image correctly; each image
    runs the depth of the largest expected reward at `gamma`.

    Its buffers travel with its weights: `rank` (each block's place in the keep order), `costs` (the
    FLOPs share of each depth) and `gamma`. `forward` returns the chosen (batch, K) 0/1 policy, so it
    is run like any policy (greedy decisions of a 0/1 matrix are the matrix).
    """

    def __init__(self, spec: ResNetSpec, num_blocks: int, input_pool: int = 1):
        super().__init__(spec, num_blocks, input_pool, outputs=num_blocks + 1)
        self.register_buffer("rank", torch.arange(num_blocks))
        self.register_buffer("costs", torch.linspace(0, 1, num_blocks + 1))
        self.register_buffer("gamma", torch.tensor(-1.0))

    def set_order(self, order, block_flops, full_flops: float) -> DepthPolicy:
        """The keep order (the greedy static order of the user's ResNet, least useful first) and costs."""
        self.rank.copy_(ranks(order))
        self.costs.copy_(depth_costs(order, block_flops, full_flops))
        return self

    def correct_prob(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, K+1): p(correct | the first d blocks) for d = 0..K."""
        return torch.sigmoid(self.scores(x))

    def depths(self, x: torch.Tensor, gamma: float | None = None) -> torch.Tensor:
        return choose(self.correct_prob(x), self.costs, float(self.gamma) if gamma is None else gamma)

    def forward(self, x: torch.Tensor, scores: bool = False) -> torch.Tensor:
        """The chosen (batch, K) 0/1 policy; with `scores`, the logits of p(correct | depth) instead
        (training calls it so through DDP, whose forward must be the entry point)."""
        if scores:
            return self.scores(x)
        return rows(self.depths(x), self.rank)


class BudgetPolicy(DepthPolicy):
    """The depth policy for any budget (blockdrop.budget): the same network, and a table of what it spends
    at each price, measured on the training images, so that a request's budget (a mean target or a per-image
    cap, shares of the full ResNet's FLOPs) sets each image's depth. `budget` is the default mean target
    (what `forward` runs at, like any policy); `base` the share every image pays whatever its depth."""

    def __init__(self, spec: ResNetSpec, num_blocks: int, input_pool: int = 1):
        super().__init__(spec, num_blocks, input_pool)
        self.register_buffer("prices", B.PRICES.clone())
        self.register_buffer("spend", torch.zeros(len(B.PRICES), dtype=torch.float64))  # mean blocks' share per price
        self.register_buffer("base", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("budget", torch.tensor(1.0, dtype=torch.float64))

    def calibrate(self, spent: torch.Tensor, images: int) -> BudgetPolicy:
        """The table from the blocks' share spent at each price summed over `images` training images."""
        self.spend.copy_(spent.to(self.spend) / max(images, 1))
        return self

    def depths(self, x: torch.Tensor, budget=None, cap=None) -> torch.Tensor:
        """Each image's depth at its mean `budget` and optional per-image `cap`; without a budget, a cap is
        also the mean target it prices by, else the model's default budget."""
        if budget is None:
            budget = self.budget if cap is None else cap
        return B.depths(self.correct_prob(x), self.costs, float(self.base), self.spend, budget, cap)

    def rows_at(self, x: torch.Tensor, budget=None, cap=None) -> torch.Tensor:
        """The (batch, K) 0/1 policy at these budgets (scalars, or one per image)."""
        return rows(self.depths(x, budget, cap), self.rank)

    def forward(self, x: torch.Tensor, scores: bool = False) -> torch.Tensor:
        if scores:
            return self.scores(x)
        return self.rows_at(x)

    def fit_state(self, state: dict) -> dict:
        """A depth policy's state dict (a depth job's checkpoint) as this one's: its spending table empty
        until the first calibration (a finetune measures it every epoch)."""
        own = self.state_dict()
        return dict(state) | {k: own[k] for k in BUDGET_BUFFERS if k not in state}


# what a budget policy holds beyond a depth policy's state: a depth policy loads a budget policy's state without them
BUDGET_BUFFERS = ("prices", "spend", "base", "budget")


def depth_state(state: dict) -> dict:
    """A budget policy's state dict as a depth policy's (the same network and keep order)."""
    return {k: v for k, v in state.items() if k not in BUDGET_BUFFERS}
