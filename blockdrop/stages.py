"""One training step of each stage, and the optimisers and schedules that go with them.

Plain PyTorch: the models may be DDP-wrapped by the caller (blockdrop.distributed), nothing here
knows about Ray. Each step returns per-image tensors (loss is a scalar) that the epoch loop sums.

- pretrain: supervised training of the ResNet (cross-entropy, SGD with momentum), optionally with
  stochastic depth.
- adapt: a short stochastic-depth finetuning of a pretrained ResNet (the pretrain step, from a
  trained ResNet, small lr): a standard ResNet breaks when blocks are dropped, and a policy trained
  on such a ResNet learns to keep every block.
- curriculum: the policy alone, ResNet frozen in eval mode; self-critical REINFORCE over the last
  min(c+1, K) blocks, c advancing every `pace` steps, entropy bonus. No gradient reaches the ResNet,
  so both of its passes (sampled and greedy policy) use sparse execution: dropped blocks are not
  computed.
- prune: the ResNet finetuned under one static policy (the same K blocks for every image): the
  prune-and-finetune competitor of blockdrop.prune; the pretrain step with that policy.
- nest, depth (the depth policy, blockdrop.depth): nest finetunes the ResNet so that every prefix of
  one block order works, each image at a random depth, with the user's ResNet's soft labels; depth
  trains the depth policy's network on the ResNet's probability of the true class at each depth,
  the ResNet frozen. Their finetune trains the ResNet under the depth policy's choices (the policy
  fixed), with the same soft labels. The budget policy (blockdrop.budget) runs the same stages; its
  finetune draws a mean budget per image from its range and trains the ResNet under the depths the
  policy chooses at those budgets (priced on the batch), and its depth and finetune stages measure
  what the policy spends at each price (blockdrop.distributed: on the validation split): the table a budget is
  priced by.
- finetune: policy and ResNet jointly: REINFORCE + cross-entropy of the ResNet run in train mode
  under the sampled policy, by the executor (blockdrop.execution.Executor: sparse by default, each
  block's BatchNorm seeing the images that run it; masked as the original on request); the greedy
  baseline pass needs no gradient and runs sparse in eval mode.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from blockdrop import budget as BU
from blockdrop import depth as D
from blockdrop import reinforce as R
from blockdrop.choices import DEFAULT_BUDGET_SAMPLING, MAX_UNREADABLE, STAGES  # noqa: F401 (STAGES re-exported)
from blockdrop.channels import narrow
from blockdrop.execution import Executor, run_sparse
from blockdrop.flops import cost_model
from blockdrop.metrics import Moments
from blockdrop.models.resnet import BudgetPolicy, DepthPolicy, FlatResNet, depth_state
from blockdrop.presets import Preset

SUPERVISED = ("pretrain", "adapt", "prune", "nest")  # the ResNet alone, cross-entropy (nest: and soft labels)
DEPTHS_PER_STEP = 16  # depth stage: the depths whose outcome a step measures (all of them when K < 16)


@dataclass
class StepOut:
    loss: torch.Tensor  # scalar, already backpropagated
    correct: torch.Tensor  # per image: the prediction the stage trains (sampled policy for RL stages)
    reward: torch.Tensor | None = None  # per image, sampled policy
    blocks: torch.Tensor | None = None  # per image, blocks run by the sampled policy
    spent: torch.Tensor | None = None  # budget policy: blockdrop.budget.spend of the batch (one sum per price)


def survival(num_blocks: int, drop_rate: float, device: torch.device | None = None) -> torch.Tensor:
    """Stochastic depth's linear rule: block k of K survives with probability 1 - drop_rate*(k+1)/K."""
    return 1 - drop_rate * torch.arange(1, num_blocks + 1, device=device) / num_blocks


def pretrain_step(executor: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  keep: torch.Tensor | None = None, teacher_logits: torch.Tensor | None = None) -> StepOut:
    """Cross-entropy; with `keep` (per-block survival probabilities) each image also drops blocks at
    random (stochastic depth), which makes the ResNet robust to the blocks a policy will drop. A 0/1
    `keep` is a static policy (prune), which learns from the user's ResNet's soft labels as well
    (`teacher_logits`, as the depth policy's stages do: the competitor gets the same recipe)."""
    if keep is not None:
        logits = executor(images, torch.bernoulli(keep.expand(len(images), -1)))
    else:
        logits = executor(images)
    loss = D.distill_loss(logits, labels, teacher_logits)
    loss.backward()
    return StepOut(loss.detach(), logits.argmax(1) == labels)


def _correct_sparse(backbone: FlatResNet, images: torch.Tensor, labels: torch.Tensor,
                    policy: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return run_sparse(backbone, images, policy).argmax(1) == labels


def curriculum_step(policy_net: nn.Module, backbone: FlatResNet, images: torch.Tensor, labels: torch.Tensor,
                    index: int, gamma: float, alpha: float = R.ALPHA, beta: float = R.BETA,
                    entropy: str = "original") -> StepOut:
    """`index`: the curriculum step (the last index+1 blocks are decided); `entropy`: one of R.ENTROPIES."""
    probs = policy_net(images)
    bounded = R.bound(probs, alpha)
    mask = R.curriculum_mask(probs.shape[1], index, probs.device)
    sampled = R.force_undecided(R.sample(bounded), mask)
    baseline = R.force_undecided(R.greedy(probs), mask)
    reward = R.reward(_correct_sparse(backbone, images, labels, sampled), sampled, gamma)
    advantage = reward - R.reward(_correct_sparse(backbone, images, labels, baseline), baseline, gamma)
    bonus = R.entropy_original(bounded) if entropy == "original" else R.entropy(bounded, mask)
    loss = R.reinforce_loss(bounded, sampled, advantage, mask) - beta * bonus
    loss.backward()
    return StepOut(loss.detach(), reward > gamma, reward, sampled.sum(1))


def finetune_step(policy_net: nn.Module, executor: nn.Module, backbone: FlatResNet, images: torch.Tensor,
                  labels: torch.Tensor, gamma: float, alpha: float = R.ALPHA) -> StepOut:
    """`executor` wraps `backbone` (possibly in DDP); the baseline pass uses `backbone` directly."""
    probs = policy_net(images)
    bounded = R.bound(probs, alpha)
    sampled, baseline = R.sample(bounded), R.greedy(probs)
    backbone.eval()
    baseline_reward = R.reward(_correct_sparse(backbone, images, labels, baseline), baseline, gamma)
    backbone.train()
    logits = executor(images, sampled)
    correct = logits.argmax(1) == labels
    reward = R.reward(correct, sampled, gamma)
    loss = R.reinforce_loss(bounded, sampled, reward - baseline_reward) + F.cross_entropy(logits, labels)
    loss.backward()
    return StepOut(loss.detach(), correct, reward, sampled.sum(1))


def nest_step(executor: nn.Module, images: torch.Tensor, labels: torch.Tensor, rank: torch.Tensor,
              teacher_logits: torch.Tensor | None) -> StepOut:
    """Each image runs a random prefix of the keep order (`rank`); cross-entropy and soft labels."""
    depths = D.sample_depths(len(images), len(rank), device=images.device)
    logits = executor(images, D.rows(depths, rank))
    loss = D.distill_loss(logits, labels, teacher_logits)
    loss.backward()
    return StepOut(loss.detach(), logits.argmax(1) == labels, blocks=depths.float())


def depth_step(policy_train: nn.Module, policy: DepthPolicy, backbone: FlatResNet, images: torch.Tensor,
               labels: torch.Tensor, generator: torch.Generator | None = None) -> StepOut:
    """The depth policy learns, per depth, the frozen ResNet's probability of the true class (up to
    DEPTHS_PER_STEP depths a step, drawn at random); `correct` is the outcome of the depths it chooses."""
    num_blocks = len(policy.rank)
    depths = torch.randperm(num_blocks + 1, generator=generator)[:DEPTHS_PER_STEP].sort().values.tolist()
    with torch.no_grad():
        logits = [run_sparse(backbone, images, D.rows(torch.full((len(images),), d, device=images.device), policy.rank))
                  for d in depths]
        targets = D.correct_prob_targets(logits, labels)
    scores = policy_train(images, scores=True)
    loss = F.binary_cross_entropy_with_logits(scores[:, depths], targets)
    loss.backward()
    with torch.no_grad():
        prob = torch.sigmoid(scores.detach())
        budget = isinstance(policy, BudgetPolicy)
        chosen = (BU.batch_depths(prob, policy.costs, float(policy.base), policy.budget.expand(len(images))) if budget
                  else D.choose(prob, policy.costs, float(policy.gamma)))
        correct = run_sparse(backbone, images, D.rows(chosen, policy.rank)).argmax(1) == labels
    return StepOut(loss.detach(), correct, blocks=chosen.float(), spent=BU.spend(prob, policy.costs) if budget else None)


def depth_finetune_step(policy: DepthPolicy, executor: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        teacher_logits: torch.Tensor | None) -> StepOut:
    """The ResNet under the depth policy's choices (the policy fixed, in eval mode); soft labels."""
    with torch.no_grad():
        depths = policy.depths(images)
    logits = executor(images, D.rows(depths, policy.rank))
    loss = D.distill_loss(logits, labels, teacher_logits)
    loss.backward()
    return StepOut(loss.detach(), logits.argmax(1) == labels, blocks=depths.float())


def budget_finetune_step(policy: BudgetPolicy, executor: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                         teacher_logits: torch.Tensor | None, budget_range=None, sampling: str = "uniform") -> StepOut:
    """The ResNet under the budget policy's choices at a mean budget drawn per image from `budget_range`
    (`sampling`: blockdrop.budget.draw_budgets; priced on this batch's own spending); soft labels. Also
    what the policy spends at each price. "sandwich" adds each image at the range's low end to the same
    batch (one pass, twice the rows; the added rows run few blocks)."""
    n = len(images)
    with torch.no_grad():
        prob = policy.correct_prob(images)
        budgets = BU.draw_budgets(n, budget_range or BU.DEFAULT_RANGE, sampling, images.device)
        copies = len(budgets) // n  # each image's rows: one per budget drawn for it
        depths = BU.batch_depths(torch.cat([prob] * copies), policy.costs, float(policy.base), budgets)
        spent = BU.spend(prob, policy.costs)
    logits = executor(torch.cat([images] * copies), D.rows(depths, policy.rank))
    teacher = None if teacher_logits is None else torch.cat([teacher_logits] * copies)
    loss = D.distill_loss(logits, torch.cat([labels] * copies), teacher)
    loss.backward()
    return StepOut(loss.detach(), logits[:n].argmax(1) == labels, blocks=depths[:n].float(), spent=spent)


@torch.no_grad()
def spend_on(policy: BudgetPolicy, loader: Iterable, device: torch.device) -> tuple[torch.Tensor, int]:
    """A budget policy's blocks' share spent at each price (blockdrop.budget.spend), summed over `loader`'s images,
    and their number: its price table measured on images it does not train on (the validation split)."""
    policy.eval()
    spent, images = torch.zeros(len(BU.PRICES), dtype=torch.float64), 0
    for batch, _ in loader:
        spent += BU.spend(policy.correct_prob(to_device(batch, device)), policy.costs).cpu()
        images += len(batch)
    return spent, images


def uses_sgd(stage: str, depth: bool = False) -> bool:
    """The ResNet's own stages train with SGD + momentum and a cosine schedule; BlockDrop's policy stages
    with Adam (as the paper). The depth policy's finetune trains only the ResNet: SGD."""
    return stage in SUPERVISED or (depth and stage == "finetune")


def make_optimizer(stage: str, params, lr: float, weight_decay: float, depth: bool = False) -> torch.optim.Optimizer:
    """SGD + momentum for the ResNet alone, Adam for the policy stages (as the paper).
    `params` may be parameter groups with lrs of their own (finetune: policy and ResNet)."""
    if uses_sgd(stage, depth):
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def cycles_factor(cycles: list[list[float]]):
    """The lr factor at each epoch of consecutive cosine cycles ([epochs, peak factor] each): each cycle starts
    at its peak and anneals to zero, as the stages it matches did one after the other (warm restarts)."""
    def factor(epoch: int) -> float:
        for length, peak in cycles:
            if epoch < length:
                return peak * 0.5 * (1 + math.cos(math.pi * epoch / length))
            epoch -= length
        return 0.0

    return factor


def make_schedule(stage: str, optimizer: torch.optim.Optimizer, epochs: int, depth: bool = False,
                  cycles: list[list[float]] | None = None) -> torch.optim.lr_scheduler.LRScheduler:
    """The ResNet alone: cosine to zero (`cycles`: one cosine cycle after another, each at its own peak: what
    a competitor gets to match the stages of the policy it stands beside); finetune: lr x0.1 for the last
    quarter; curriculum, depth: constant."""
    if uses_sgd(stage, depth) and cycles:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, cycles_factor(cycles))
    if uses_sgd(stage, depth):
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    if stage == "finetune":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, [max(int(epochs * 0.75), 1)], gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


@dataclass
class EpochStats:
    """Training figures of one epoch on one worker; merges across workers."""

    images: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    reward: Moments = field(default_factory=Moments)
    blocks: Moments = field(default_factory=Moments)
    spent: torch.Tensor | None = None  # budget policy: the blocks' share spent at each price, summed over images

    def add(self, out: StepOut) -> None:
        n = len(out.correct)
        if out.spent is not None:
            self.spent = out.spent.cpu() if self.spent is None else self.spent + out.spent.cpu()
        self.images += n
        self.loss_sum += out.loss.item() * n
        self.correct += int(out.correct.sum())
        if out.reward is not None:
            self.reward.add(out.reward.cpu())
        if out.blocks is not None:
            self.blocks.add(out.blocks.cpu())

    def merge(self, other: EpochStats) -> None:
        if other.spent is not None:
            self.spent = other.spent if self.spent is None else self.spent + other.spent
        self.images += other.images
        self.loss_sum += other.loss_sum
        self.correct += other.correct
        self.reward.merge(other.reward)
        self.blocks.merge(other.blocks)

    def metrics(self) -> dict[str, float]:
        n = max(self.images, 1)
        out = {"train_loss": self.loss_sum / n, "train_accuracy": self.correct / n}
        if self.reward.n:
            out["train_reward"] = self.reward.mean
        if self.blocks.n:
            out["train_blocks_used"] = self.blocks.mean
        return out


@dataclass
class Models:
    """What a stage trains. `*_train` are the (possibly DDP-wrapped) modules gradients flow through."""

    backbone: FlatResNet
    policy: nn.Module | None
    executor_train: nn.Module | None = None  # Executor(backbone), pretrain and finetune
    policy_train: nn.Module | None = None  # the policy net, curriculum and finetune
    teacher: FlatResNet | None = None  # the user's ResNet, frozen: soft labels (nest, the depth policy's finetune)
    rank: torch.Tensor | None = None  # nest: the keep order (blockdrop.depth.ranks)


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Images in the layout training uses: channels_last, oneDNN's fast path on CPU for these ResNets
    (`benchmarks/curriculum.py --memory-format contiguous` compares) and as fast on GPU."""
    return images.to(device, non_blocking=True, memory_format=torch.channels_last)


def set_modes(stage: str, models: Models) -> None:
    """Train or eval mode for what a stage trains and what it keeps frozen."""
    if stage in ("curriculum", "depth"):
        models.backbone.eval()  # frozen: BatchNorm statistics stay those of the pretrained ResNet
        models.policy_train.train()
        return
    models.backbone.train()
    if models.policy_train is not None:
        models.policy_train.train()
    if isinstance(models.policy, DepthPolicy):  # its finetune trains the ResNet alone
        models.policy.eval()


def train_epoch(stage: str, models: Models, loader: Iterable, optimizer: torch.optim.Optimizer, epoch: int,
                gamma: float, device: torch.device, drop_rate: float = 0.0, pace: int = 0,
                entropy: str = "original", on_step=None, static: torch.Tensor | None = None,
                budget_range: tuple[float, float] | None = None,
                budget_sampling: str = DEFAULT_BUDGET_SAMPLING) -> EpochStats:
    """One pass over `loader` (this worker's shard) of `stage`. Curriculum: a new block is decided
    every `pace` optimisation steps (0: every epoch, as the original). Prune: `static` is the 0/1 policy
    every image runs. `on_step(step, steps, images)` after each optimisation step (progress within long
    epochs). `budget_range`, `budget_sampling`: a budget policy's finetune, the mean budgets it draws from
    and how."""
    stats = EpochStats()
    keep = survival(models.backbone.num_blocks, drop_rate, device) if drop_rate > 0 else None
    if static is not None:
        keep = static.to(device=device, dtype=torch.float32)
    depth = isinstance(models.policy, DepthPolicy)
    set_modes(stage, models)
    steps = len(loader)
    for i, (images, labels) in enumerate(loader):
        images, labels = to_device(images, device), labels.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        teacher = None
        if models.teacher is not None:
            with torch.no_grad():
                teacher = models.teacher(images)
        if stage == "nest":
            out = nest_step(models.executor_train, images, labels, models.rank, teacher)
        elif stage in SUPERVISED:
            out = pretrain_step(models.executor_train, images, labels, keep, teacher)
        elif stage == "curriculum":
            index = R.curriculum_index(epoch * steps + i, pace or steps)
            out = curriculum_step(models.policy_train, models.backbone, images, labels, index, gamma,
                                  entropy=entropy)
        elif stage == "depth":
            out = depth_step(models.policy_train, models.policy, models.backbone, images, labels)
        elif isinstance(models.policy, BudgetPolicy):
            out = budget_finetune_step(models.policy, models.executor_train, images, labels, teacher, budget_range,
                                       budget_sampling)
        elif depth:
            out = depth_finetune_step(models.policy, models.executor_train, images, labels, teacher)
        else:
            out = finetune_step(models.policy_train, models.executor_train, models.backbone, images, labels, gamma)
        optimizer.step()
        stats.add(out)
        if on_step is not None:
            on_step(i + 1, steps, len(labels))
    return stats


@dataclass
class StageConfig:
    """Everything one stage run needs (blockdrop.distributed's workers get it): plain data so Ray can ship it."""

    preset: str
    stage: str
    epochs: int
    batch_size: int  # global: split over the workers
    lr: float
    weight_decay: float
    gamma: float
    drop_rate: float
    dataset: str | None
    data_dir: str | None
    seed: int = 0
    loader_workers: int | None = None  # DataLoader worker processes (None: blockdrop.data.default_loader_workers)
    policy_lr: float | None = None  # finetune: the policy's own lr (default: lr)
    entropy: str = "original"  # curriculum: one of reinforce.ENTROPIES
    pace: int = 0  # curriculum: optimisation steps per newly decided block (0: one epoch)
    max_bad_images: float = MAX_UNREADABLE  # share of an image folder that may be unreadable
    execution: str = "sparse"  # finetune, stochastic depth: blockdrop.execution.TRAIN_EXECUTIONS
    eval_every: int = 1  # evaluate on the test set every this many epochs, and after the last
    # The user's ResNet, what every figure is measured against: {"accuracy", "source"}. None: the stage's
    # --init ResNet is that reference, evaluated in full before the first epoch (`reference_source` names it).
    reference: dict | None = None
    reference_source: str = ""
    reference_file: str = ""  # its checkpoint, where prune-and-finetune starts from
    static_policy: list[int] | None = None  # prune: the 0/1 policy every image runs
    # prune: the channels of each block it keeps (blockdrop.channels.Kept), a channel-pruned ResNet
    channels: list | None = None
    # prune: the lr schedule as cosine cycles, [epochs, peak factor of lr] each (the stages of the policy it is
    # compared with, one after the other); None: one cosine cycle over all epochs
    cycles: list[list[float]] | None = None
    order: list[int] | None = None  # nest: the greedy static order of the user's ResNet (the depth policy's)
    budget_range: list[float] | None = None  # the budget policy: the mean budgets its finetune draws from
    budget: float | None = None  # ... and the one it runs at when a request names none
    budget_sampling: str = DEFAULT_BUDGET_SAMPLING  # ... and how it draws them (blockdrop.choices.BUDGET_SAMPLINGS)
    # a progress line within an epoch every this many seconds (ImageNet: an epoch is an hour)
    progress_every_s: float = field(default_factory=lambda: float(os.environ.get("BLOCKDROP_PROGRESS_EVERY_S", "30")))


# DDP looks for unused parameters (an extra graph traversal a step) only where a worker's batch can run
# without some block: sparse execution leaves such a block out of the step's graph, and DDP without the
# search would then fail. Under stochastic depth alone that chance is negligible at usual batch sizes;
# below this chance over the whole stage the search is off (if it happened, the worker group would
# restart from its last checkpoint, as after any failure).
UNUSED_BLOCK_CHANCE = 1e-6


def blocks_can_go_unused(cfg: StageConfig, num_blocks: int, smallest_batch: int, steps: int) -> bool:
    """Can some worker's batch of this stage run without one of the ResNet's blocks (sparse execution)?
    A learned or sampled per-image policy can; a static policy can when it drops a block; stochastic
    depth can, with a chance that `steps` steps of `smallest_batch` images make negligible or not."""
    if cfg.execution != "sparse":
        return False
    if cfg.static_policy is not None:
        return not all(cfg.static_policy)
    if cfg.stage in ("finetune", "nest"):
        return True
    if cfg.drop_rate > 0:
        dropped_by_all = (1 - survival(num_blocks, cfg.drop_rate)).double() ** smallest_batch
        return float(dropped_by_all.sum()) * steps > UNUSED_BLOCK_CHANCE
    return False


def setup_stage(cfg: StageConfig, preset: Preset, init: dict | None, teacher: dict | None, device: torch.device,
                prepare=lambda module, **_: module, unused: bool = False
                ) -> tuple[Models, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The models a stage trains (from `init`'s state dicts), wrapped by `prepare` (Ray Train's
    prepare_model: DDP; `unused`: with the search for unused parameters, blocks_can_go_unused), with
    their optimiser and schedule. `teacher`: the user's ResNet (a payload like `init`'s), whose soft
    labels the depth policy's stages learn from."""
    start = None if init is None else init["backbone"]
    if start is not None and cfg.channels is not None:  # channel pruning: the kept channels of --init's ResNet
        start = narrow(start, preset.backbone, cfg.channels)
    backbone = preset.build_backbone(start)
    init_policy = (init or {}).get("policy")
    depth = cfg.stage in ("nest", "depth") or (init_policy is not None and "rank" in init_policy)
    # a budget policy where its stages say so (budget_range): a depth checkpoint becomes one, and a budget
    # checkpoint finetuned with a gamma is a depth policy again (both share the network and keep order)
    budget = cfg.budget_range is not None
    policy = (preset.build_depth_policy(budget) if depth else None if cfg.stage in SUPERVISED
              else preset.build_policy())
    if init is not None:
        backbone.load_state_dict(start, strict=False)
        if policy is not None and init_policy is not None:
            policy.load_state_dict(policy.fit_state(init_policy) if isinstance(policy, BudgetPolicy)
                                   else depth_state(init_policy) if depth else init_policy)
    if cfg.order is not None:  # nest: the keep order of the depth policy, from the user's ResNet
        costs = cost_model(preset, None, backbone)
        policy.set_order(cfg.order, costs.backbone.blocks, costs.full)
    if depth:
        policy.gamma.fill_(cfg.gamma)
    if isinstance(policy, BudgetPolicy):
        policy.base.fill_(cost_model(preset, policy, backbone).fixed / cost_model(preset).full)
        if cfg.budget is not None:
            policy.budget.fill_(cfg.budget)

    executor = Executor(backbone, cfg.execution).to(device, memory_format=torch.channels_last)
    ddp = {"find_unused_parameters": unused}
    if policy is not None:
        policy.to(device, memory_format=torch.channels_last)
    frozen = None
    if teacher is not None and (cfg.stage in ("nest", "prune") or (depth and cfg.stage == "finetune")):
        frozen = preset.build_backbone(teacher["backbone"])
        frozen.load_state_dict(teacher["backbone"])
        frozen.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
    if cfg.stage in ("curriculum", "depth"):
        backbone.requires_grad_(False)
        models = Models(backbone, policy, policy_train=prepare(policy))
        params = list(policy.parameters())
    elif cfg.stage in SUPERVISED or depth:  # the ResNet alone (the depth policy's finetune: its choices fixed)
        if policy is not None:
            policy.requires_grad_(False)
        models = Models(backbone, policy, executor_train=prepare(executor, parallel_strategy_kwargs=ddp),
                        teacher=frozen, rank=policy.rank if depth else None)
        params = list(backbone.parameters())
    else:
        models = Models(backbone, policy, executor_train=prepare(executor, parallel_strategy_kwargs=ddp),
                        policy_train=prepare(policy))
        params = [{"params": list(policy.parameters()), "lr": cfg.policy_lr or cfg.lr},
                  {"params": list(backbone.parameters())}]
    optimizer = make_optimizer(cfg.stage, params, cfg.lr, cfg.weight_decay, depth)
    return models, optimizer, make_schedule(cfg.stage, optimizer, cfg.epochs, depth, cfg.cycles)
