"""Running a backbone under per-image policies.

A policy is a (batch, K) 0/1 matrix: row i says which residual blocks image i runs. A dropped
block keeps its shortcut, so a stage's first block still downsamples when it is dropped.

- `run_full`: every block for every image (the pretrained ResNet).
- `run_masked`: every kept block is computed for the whole batch and the result is blended with
  the shortcut by the mask, like the original; differentiable with respect to the backbone
  (BatchNorm in train mode sees the whole batch, rows that drop the block included).
- `run_sparse`: block k runs only on the rows that keep it; the other rows take the shortcut and
  a block no row keeps costs nothing. This is where the wall-clock saving comes from. In train
  mode each block's BatchNorm sees only the rows that run it (joint finetuning's default).
In eval mode `run_masked` and `run_sparse` compute the same function.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blockdrop.choices import TRAIN_EXECUTIONS
from blockdrop.models.resnet import FlatResNet

MODES = ("full", "masked", "sparse")


def _check_policy(net: FlatResNet, x: torch.Tensor, policy: torch.Tensor) -> None:
    if policy.shape != (x.shape[0], net.num_blocks):
        raise ValueError(
            f"policy has shape {tuple(policy.shape)}; expected (batch={x.shape[0]}, "
            f"blocks={net.num_blocks})"
        )


def run_full(net: FlatResNet, x: torch.Tensor) -> torch.Tensor:
    """Logits of the full network."""
    return net(x)


def run_masked(net: FlatResNet, x: torch.Tensor, policy: torch.Tensor, skip_unused: bool = True) -> torch.Tensor:
    """Logits under `policy`, computing each block on every row and masking (the original's way).

    A block no row keeps is skipped unless `skip_unused` is False: DDP wants every parameter in
    every step's graph (a zero gradient is fine, a missing one is not).
    """
    _check_policy(net, x, policy)
    mask = policy.to(device=x.device, dtype=x.dtype)
    active = mask.any(0).tolist() if skip_unused else [True] * net.num_blocks
    x = net.seed(x)
    for k in range(net.num_blocks):
        residual = net.shortcut(k, x)
        if not active[k]:
            x = residual
            continue
        keep = mask[:, k].view(-1, 1, 1, 1)
        fx = F.relu(residual + net.block(k)(x))
        x = fx * keep + residual * (1 - keep)
    return net.head(x)


def run_sparse(net: FlatResNet, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
    """Logits under `policy`, running each block only on the rows that keep it."""
    _check_policy(net, x, policy)
    keep = policy.to(device=x.device, dtype=torch.bool)
    counts = keep.sum(0).tolist()  # one host sync for the whole pass
    rows_of = keep.t().nonzero()[:, 1].split(counts)  # every block's rows, from one nonzero (sync)
    batch = x.shape[0]
    grad = torch.is_grad_enabled()
    x = net.seed(x)
    for k in range(net.num_blocks):
        residual = net.shortcut(k, x)
        if counts[k] == 0:
            x = residual
        elif counts[k] == batch:
            x = F.relu(residual + net.block(k)(x)) if grad else net.block(k)(x).add_(residual).relu_()
        elif grad:
            rows = rows_of[k]
            kept = _Gather.apply(x, rows)
            kept_residual = kept if residual is x else _Gather.apply(residual, rows)
            x = _Scatter.apply(residual, F.relu(kept_residual + net.block(k)(kept)), rows)
        else:  # no autograd: everything in place
            rows = rows_of[k]
            kept = x[rows]  # unlike index_select, keeps a channels_last layout
            kept_residual = kept if residual is x else residual[rows]
            x = residual.index_copy_(0, rows, net.block(k)(kept).add_(kept_residual).relu_())
    return net.head(x)


def _like(t: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """An empty tensor of `size` in `t`'s memory layout (channels_last stays channels_last)."""
    fmt = torch.channels_last if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) \
        and not t.is_contiguous() else torch.contiguous_format
    return torch.empty(size, dtype=t.dtype, device=t.device, memory_format=fmt)


class _Gather(torch.autograd.Function):
    """`x[rows]` (rows distinct) whose backward copies the gradient into place (index_copy_) instead of
    autograd's accumulating index_put_, several times slower on CPU, and keeps the layout."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.size = x.shape
        return x[rows]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rows,) = ctx.saved_tensors
        return _like(grad, ctx.size).zero_().index_copy_(0, rows, grad), None


class _Scatter(torch.autograd.Function):
    """`residual` with rows `rows` replaced by `out`, layout kept both ways (out-of-place index_copy
    and the backward of index_copy_ return NCHW: every later convolution would convert)."""

    @staticmethod
    def forward(ctx, residual: torch.Tensor, out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        return residual.clone().index_copy_(0, rows, out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rows,) = ctx.saved_tensors
        return grad.clone().index_fill_(0, rows, 0), grad[rows], None


def run(net: FlatResNet, x: torch.Tensor, policy: torch.Tensor | None, mode: str) -> torch.Tensor:
    """Dispatch on `mode` (one of MODES); `full` ignores the policy."""
    if mode == "full":
        return run_full(net, x)
    if policy is None:
        raise ValueError(f"mode {mode!r} needs a policy")
    if mode == "masked":
        return run_masked(net, x, policy)
    if mode == "sparse":
        return run_sparse(net, x, policy)
    raise ValueError(f"unknown execution mode {mode!r}; expected one of {MODES}")


class Executor(nn.Module):
    """Training-time execution as a module, so that DDP (whose forward must be the entry point) can
    wrap it: the full network without a policy; with one (finetuning, stochastic depth):

    - `sparse` (default): each block runs on the rows that keep it, so a step costs what the policy
      keeps, and each block's BatchNorm normalises (and tracks statistics of) the images that run
      it, which are the images it sees at inference. Blocks no row keeps are not in the graph: where
      that can happen, DDP must look for unused parameters (blockdrop.stages.blocks_can_go_unused).
    - `masked`: the original's way, every block on every row, blended by the mask; BatchNorm sees
      the whole batch, including rows that drop the block. Every block stays in the graph.
    """

    def __init__(self, backbone: FlatResNet, execution: str = "sparse"):
        super().__init__()
        if execution not in TRAIN_EXECUTIONS:
            raise ValueError(f"unknown training execution {execution!r}; expected one of {TRAIN_EXECUTIONS}")
        self.backbone = backbone
        self.execution = execution

    def forward(self, x: torch.Tensor, policy: torch.Tensor | None = None) -> torch.Tensor:
        if policy is None:
            return run_full(self.backbone, x)
        if self.execution == "sparse":
            return run_sparse(self.backbone, x, policy)
        return run_masked(self.backbone, x, policy, skip_unused=False)
