"""The values command lines offer and check, in one torch-free module: the CLIs' parsers import
this and answer `--help` and bad flags without loading torch (benchmarks/startup.py); the library
modules that use the same values import them from here."""
from __future__ import annotations

import argparse

from blockdrop.errors import UserError

# The presets' names, in blockdrop.presets.PRESETS' order (which checks that the two agree).
PRESET_NAMES = ("R32_C10", "R110_C10", "R32_C100", "R110_C100", "R101_ImgNet", "R26_DIGITS")
# On other data than a preset's own, the curriculum decides one more block every this many optimisation
# steps (blockdrop.presets.OTHER_DATA_STAGES).
CURRICULUM_PACE = 13

DATASETS = ("cifar10", "cifar100", "imagenet", "imagefolder", "digits")
STAGES = ("pretrain", "adapt", "curriculum", "finetune")
# The depth policy's stages (blockdrop.depth): nest the ResNet along one block order, train the policy
# network on the outcome of every depth, finetune the ResNet under its choices.
DEPTH_STAGES = ("pretrain", "nest", "depth", "finetune")
# BlockDrop's per-block policy (REINFORCE), the depth policy, and the depth policy for any budget (one model
# for the whole front: blockdrop.budget)
POLICIES = ("blocks", "depth", "budget")
DEPTH_POLICIES = ("depth", "budget")  # those trained by the depth policy's stages
# how its finetune draws them: uniformly, log-uniformly (as much training per factor of speedup: 4x-8x
# as much as 1x-2x), or sandwich (uniformly, and each image again at the range's low end);
# benchmarks/budget.py compares them (blockdrop.budget.draw_budgets)
BUDGET_SAMPLINGS = ("uniform", "log", "sandwich")
DEFAULT_BUDGET_SAMPLING = "sandwich"  # never worse than uniform, better at the low end: benchmarks/results/budget_*.md
DEFAULT_BUDGET_RANGE = (0.2, 1.0)


def default_budget(low: float, high: float) -> float:
    """The mean budget a budget model runs at when a request names none: the middle of its range."""
    return (low + high) / 2  # the mean budgets a budget policy's finetuning draws from (shares of the FLOPs)
# Not a BlockDrop stage: the competitor it must beat, the ResNet finetuned under one image-blind policy (a
# static set of K blocks, greedy order) for as many steps as the policy's stages train it (blockdrop.prune).
PRUNE = "prune"
PRUNED = "prune_finetune"  # its name among the competitors a comparison and a sweep's plot show
# The other static competitor: the user's ResNet with each block's inner channels pruned to the learned FLOPs
# (a dense, narrower ResNet), finetuned as long (blockdrop.channels); the `prune` stage with its channels.
CHANNELS = "channel_prune"
# The control of every comparison: the learned policy's own choices, shuffled across the test images (same FLOPs,
# same histogram of policies, no look at the image): what choosing per image buys (blockdrop.analysis.Shuffled).
SHUFFLED = "shuffled"
# torch-pruning's importance criteria a channel pruning chooses from on the validation split: group L1 and L2
# norms, BatchNorm scale (network slimming), and FPGM (the geometric median)
CHANNEL_CRITERIA = ("l1", "l2", "bn_scale", "fpgm")
# The image-blind policies every learned one is compared with (blockdrop.baselines).
BASELINES = ("firstk", "randomk", "distributek", "greedy")
RANDOM_SEEDS = 5  # RandomK's accuracy is the mean over this many draws
ENTROPIES = ("original", "bernoulli")  # the curriculum's entropy bonus: see reinforce.entropy_original / entropy
TRAIN_EXECUTIONS = ("sparse", "masked")  # how finetuning and stochastic depth run the ResNet (execution.Executor)
MAX_UNREADABLE = 0.001  # default share of a folder's images that may be unreadable (--max-bad-images)


def check_preset_name(name: str) -> None:
    """A UserError listing the known presets unless `name` is one."""
    if name not in PRESET_NAMES:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESET_NAMES)}")


def add_unreadable_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-bad-images", type=float, default=MAX_UNREADABLE, metavar="SHARE",
                        help="image folders: the share of files that may be unreadable (each is named in a warning "
                             "and counted as skipped_images; the next image stands in) before the work stops "
                             "(default 0.001: 0.1%%)")


def check_unreadable_share(share: float) -> None:
    if not 0 <= share < 1:
        raise UserError(f"--max-bad-images is a share of the dataset in [0, 1), not {share}")

# Ray's run storage without --storage-path: in the working directory, next to ./checkpoints and ./mlflow.db
DEFAULT_STORAGE = "ray_results"
