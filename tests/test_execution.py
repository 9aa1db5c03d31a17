"""Full, masked and sparse execution compute the same function where they should."""
from __future__ import annotations

import pytest
import torch

from blockdrop.execution import run, run_full, run_masked, run_sparse
from blockdrop.presets import get_preset

from conftest import randomize_batchnorm


def model_and_input(name: str, batch: int, size: int | None = None, seed: int = 0):
    torch.manual_seed(seed)
    preset = get_preset(name)
    net = randomize_batchnorm(preset.build_backbone(), seed)
    size = size or preset.image_size
    return net, torch.randn(batch, preset.in_channels, size, size)


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 summation order (convolutions pick kernels by batch size)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-4 * max(scale, 1.0))


def transition_blocks(name: str) -> list[int]:
    """Flat indices of each later stage's first block (the ones whose shortcut downsamples)."""
    index = get_preset(name).backbone.block_index
    return [k for k, (stage, b) in enumerate(index) if stage > 0 and b == 0]


def policies(name: str, batch: int) -> dict[str, torch.Tensor]:
    k = get_preset(name).num_blocks
    g = torch.Generator().manual_seed(3)
    single_row = torch.zeros(batch, k)
    single_row[batch // 2] = 1
    no_transitions = (torch.rand(batch, k, generator=g) < 0.7).float()
    no_transitions[:, transition_blocks(name)] = 0
    return {
        "random30": (torch.rand(batch, k, generator=g) < 0.3).float(),
        "random70": (torch.rand(batch, k, generator=g) < 0.7).float(),
        "all_on": torch.ones(batch, k),
        "all_off": torch.zeros(batch, k),
        "single_row_on": single_row,
        "transitions_off": no_transitions,
    }


@pytest.mark.parametrize("name, size", [("R32_C10", None), ("R26_DIGITS", None), ("R101_ImgNet", 64)])
@pytest.mark.parametrize("kind", ["random30", "random70", "all_on", "all_off", "single_row_on", "transitions_off"])
def test_sparse_matches_masked_for_random_and_edge_policies(name, size, kind):
    net, x = model_and_input(name, 6, size)
    policy = policies(name, 6)[kind]
    with torch.no_grad():
        masked = run_masked(net, x, policy)
        sparse = run_sparse(net, x, policy)
    assert_same(sparse, masked)


def test_each_image_depends_only_on_its_own_policy_row():
    net, x = model_and_input("R32_C10", 8)
    policy = policies("R32_C10", 8)["random30"]
    with torch.no_grad():
        batched = run_sparse(net, x, policy)
        one_by_one = torch.cat([run_sparse(net, x[i:i + 1], policy[i:i + 1]) for i in range(8)])
    assert_same(batched, one_by_one)


def test_all_on_policy_is_the_full_network():
    net, x = model_and_input("R32_C10", 4)
    ones = torch.ones(4, net.num_blocks)
    with torch.no_grad():
        full = run_full(net, x)
        torch.testing.assert_close(run_masked(net, x, ones), full)
        torch.testing.assert_close(run_sparse(net, x, ones), full)


def test_dropping_blocks_changes_the_output():
    net, x = model_and_input("R32_C10", 4)
    with torch.no_grad():
        full = run_full(net, x)
        dropped = run_sparse(net, x, policies("R32_C10", 4)["random30"])
    assert (full - dropped).abs().max() > 1e-3


@pytest.mark.parametrize("batch", [1, 512])
def test_sparse_under_inference_mode_at_batch_1_and_512(batch):
    net, x = model_and_input("R32_C10", batch)
    policy = policies("R32_C10", batch)["random30"]
    with torch.inference_mode():
        sparse = run_sparse(net, x, policy)
        masked = run_masked(net, x, policy)
    assert sparse.shape == (batch, 10)
    assert_same(sparse, masked)


def test_sparse_is_differentiable_and_leaves_unused_blocks_without_gradient():
    net, x = model_and_input("R32_C10", 4)
    policy = policies("R32_C10", 4)["random30"]
    policy[:, 3] = 0
    policy[0, 4] = 1
    run_sparse(net, x, policy).sum().backward()
    assert net.block(3).conv1.weight.grad is None
    assert net.block(4).conv1.weight.grad.abs().sum() > 0
    assert net.conv1.weight.grad.abs().sum() > 0


def test_masked_gradients_equal_sparse_gradients_in_eval_mode():
    net, x = model_and_input("R26_DIGITS", 5)
    policy = policies("R26_DIGITS", 5)["random70"]
    grads = []
    for fn in (run_masked, run_sparse):
        net.zero_grad()
        fn(net, x, policy).pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_policy_of_wrong_shape_is_rejected():
    net, x = model_and_input("R32_C10", 2)
    with pytest.raises(ValueError, match=r"expected \(batch=2, blocks=15\)"):
        run_sparse(net, x, torch.ones(2, 54))
    with pytest.raises(ValueError, match="unknown execution mode"):
        run(net, x, torch.ones(2, 15), "dense")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sparse_on_cuda_matches_cpu():
    net, x = model_and_input("R110_C10", 64)
    policy = policies("R110_C10", 64)["random30"]
    with torch.inference_mode():
        cpu = run_sparse(net, x, policy)
        gpu = run_sparse(net.cuda(), x.cuda(), policy.cuda())
        gpu_masked = run_masked(net, x.cuda(), policy.cuda())
    assert_same(gpu.cpu(), cpu)
    assert_same(gpu, gpu_masked)


def _stem_frozen_train_mode(net):
    """Train mode for the blocks, eval mode for the stem's BatchNorm (which sees the whole batch)."""
    net.train()
    net.bn1.eval()
    return net


def test_sparse_train_mode_batchnorm_sees_exactly_the_rows_that_run_each_block():
    # Rows 0-2 and rows 3-5 keep disjoint sets of blocks: then each block's BatchNorm sees only one
    # group, and the group's outputs and gradients are those of the group run as a batch of its own.
    net, x = model_and_input("R26_DIGITS", 6)
    net = net.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    k = net.num_blocks
    g = torch.Generator().manual_seed(5)
    owner = torch.rand(k, generator=g) < 0.5  # which group each block belongs to
    policy = torch.zeros(6, k)
    policy[:3, owner] = (torch.rand(3, int(owner.sum()), generator=g) < 0.8).float()
    policy[3:, ~owner] = (torch.rand(3, int((~owner).sum()), generator=g) < 0.8).float()
    policy[0, owner] = 1  # every group block has at least one row (so no block runs on no rows)
    policy[3, ~owner] = 1
    import copy
    alone = copy.deepcopy(net)
    _stem_frozen_train_mode(net)
    _stem_frozen_train_mode(alone)
    together = run_sparse(net, x, policy)
    by_itself = run_sparse(alone, x[:3], policy[:3])
    assert_same(together[:3], by_itself)
    together[:3].pow(2).sum().backward()
    by_itself.pow(2).sum().backward()
    for (name, p), q in zip(net.named_parameters(), alone.parameters()):
        if q.grad is None:
            assert p.grad is None or p.grad.abs().max() == 0, name
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)
    # running statistics of a group-0 block: from group 0's rows only, as in the lone run
    first = int(owner.nonzero()[0])
    torch.testing.assert_close(net.block(first).bn1.running_mean, alone.block(first).bn1.running_mean)


def test_sparse_train_mode_with_every_block_kept_is_the_full_network_in_train_mode():
    net, x = model_and_input("R32_C10", 4)
    import copy
    other = copy.deepcopy(net)
    net.train()
    other.train()
    sparse = run_sparse(net, x, torch.ones(4, net.num_blocks))
    full = run_full(other, x)
    assert_same(sparse, full)
    sparse.sum().backward()
    full.sum().backward()
    for p, q in zip(net.parameters(), other.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5)


def test_sparse_training_keeps_channels_last_through_the_network():
    # Out-of-place index_copy returns NCHW; every later convolution would then convert layouts.
    net, x = model_and_input("R32_C10", 8)
    net = net.to(memory_format=torch.channels_last).train()
    x = x.contiguous(memory_format=torch.channels_last)
    layouts = []
    for k in range(net.num_blocks):
        net.block(k).register_forward_pre_hook(
            lambda module, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    run_sparse(net, x, policies("R32_C10", 8)["random70"]).sum().backward()
    assert layouts and all(layouts)


def test_executor_runs_sparse_by_default_and_masked_on_request():
    from blockdrop.execution import Executor

    net, x = model_and_input("R32_C10", 6)
    policy = policies("R32_C10", 6)["random30"]
    policy[:, 2] = 0
    net.train()
    Executor(net)(x, policy).sum().backward()
    assert net.block(2).conv1.weight.grad is None  # not run: not in the graph
    net.zero_grad(set_to_none=True)
    Executor(net, "masked")(x, policy).sum().backward()
    assert net.block(2).conv1.weight.grad is not None  # masked keeps every block in the graph (DDP)
    with pytest.raises(ValueError, match="unknown training execution"):
        Executor(net, "dense")
