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
  fixed), with the same soft labels.
- finetune: policy and ResNet jointly: REINFORCE + cross-entropy of the ResNet run in train mode
  under the sampled policy, by the executor (blockdrop.execution.Executor: sparse by default, each
  block's BatchNorm seeing the images that run it; masked as the original on request); the greedy
  baseline pass needs no gradient and runs sparse in eval mode.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from blockdrop import depth as D
from blockdrop import reinforce as R
from blockdrop.choices import STAGES  # noqa: F401 (re-exported)
from blockdrop.evaluate import Moments
from blockdrop.execution import run_sparse
from blockdrop.models.resnet import DepthPolicy, FlatResNet

SUPERVISED = ("pretrain", "adapt", "prune", "nest")  # the ResNet alone, cross-entropy (nest: and soft labels)
DEPTHS_PER_STEP = 16  # depth stage: the depths whose outcome a step measures (all of them when K < 16)


@dataclass
class StepOut:
    loss: torch.Tensor  # scalar, already backpropagated
    correct: torch.Tensor  # per image: the prediction the stage trains (sampled policy for RL stages)
    reward: torch.Tensor | None = None  # per image, sampled policy
    blocks: torch.Tensor | None = None  # per image, blocks run by the sampled policy


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
        chosen = D.choose(torch.sigmoid(scores.detach()), policy.costs, float(policy.gamma))
        correct = run_sparse(backbone, images, D.rows(chosen, policy.rank)).argmax(1) == labels
    return StepOut(loss.detach(), correct, blocks=chosen.float())


def depth_finetune_step(policy: DepthPolicy, executor: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        teacher_logits: torch.Tensor | None) -> StepOut:
    """The ResNet under the depth policy's choices (the policy fixed, in eval mode); soft labels."""
    with torch.no_grad():
        depths = policy.depths(images)
    logits = executor(images, D.rows(depths, policy.rank))
    loss = D.distill_loss(logits, labels, teacher_logits)
    loss.backward()
    return StepOut(loss.detach(), logits.argmax(1) == labels, blocks=depths.float())


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


def make_schedule(stage: str, optimizer: torch.optim.Optimizer, epochs: int,
                  depth: bool = False) -> torch.optim.lr_scheduler.LRScheduler:
    """The ResNet alone: cosine to zero; finetune: lr x0.1 for the last quarter; curriculum, depth: constant."""
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

    def add(self, out: StepOut) -> None:
        n = len(out.correct)
        self.images += n
        self.loss_sum += out.loss.item() * n
        self.correct += int(out.correct.sum())
        if out.reward is not None:
            self.reward.add(out.reward.cpu())
        if out.blocks is not None:
            self.blocks.add(out.blocks.cpu())

    def merge(self, other: EpochStats) -> None:
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


def train_epoch(stage: str, models: Models, loader: Iterable, optimizer: torch.optim.Optimizer, epoch: int,
                gamma: float, device: torch.device, drop_rate: float = 0.0, pace: int = 0,
                entropy: str = "original", on_step=None, static: torch.Tensor | None = None) -> EpochStats:
    """One pass over `loader` (this worker's shard) of `stage`. Curriculum: a new block is decided
    every `pace` optimisation steps (0: every epoch, as the original). Prune: `static` is the 0/1 policy
    every image runs. `on_step(step, steps, images)` after each optimisation step (progress within long
    epochs)."""
    stats = EpochStats()
    keep = survival(models.backbone.num_blocks, drop_rate, device) if drop_rate > 0 else None
    if static is not None:
        keep = static.to(device=device, dtype=torch.float32)
    depth = isinstance(models.policy, DepthPolicy)
    if stage in ("curriculum", "depth"):
        models.backbone.eval()  # frozen: BatchNorm statistics stay those of the pretrained ResNet
        models.policy_train.train()
    else:
        models.backbone.train()
        if models.policy_train is not None:
            models.policy_train.train()
        if depth:  # its finetune trains the ResNet alone
            models.policy.eval()
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
        elif depth:
            out = depth_finetune_step(models.policy, models.executor_train, images, labels, teacher)
        else:
            out = finetune_step(models.policy_train, models.executor_train, models.backbone, images, labels, gamma)
        optimizer.step()
        stats.add(out)
        if on_step is not None:
            on_step(i + 1, steps, len(labels))
    return stats
