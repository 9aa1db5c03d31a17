"""The depth policy (blockdrop.depth, DepthPolicy, its stages) and prune-and-finetune (blockdrop.prune)."""
from __future__ import annotations

import json

import pytest
import torch

from blockdrop import baselines as B
from blockdrop import depth as D
from blockdrop.checkpoints import load_models, save_checkpoint
from blockdrop.flops import cost_model, resnet_cost
from blockdrop.models.resnet import DepthPolicy, PolicyNet
from blockdrop.presets import cifar_resnet, get_preset
from blockdrop.prune import StaticPolicy, keeps_bracketing, static_flops
from blockdrop.stages import StageConfig, depth_finetune_step, depth_step, nest_step, setup_stage

from conftest import randomize_batchnorm, run_module

DIGITS = get_preset("R26_DIGITS")


def test_ranks_and_rows_follow_the_keep_order():
    order = [2, 0, 3, 1]  # greedy drop order: block 2 is the least useful, block 1 the most
    rank = D.ranks(order)
    assert rank.tolist() == [2, 0, 3, 1]  # block 1 kept first, then 3... reversed drop order: 1, 3, 0, 2
    assert rank.tolist() == [list(reversed(order)).index(k) for k in range(4)]
    rows = D.rows(torch.tensor([0, 1, 2, 4]), rank)
    assert rows.tolist() == [[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 1], [1, 1, 1, 1]]
    # a depth is the greedy static policy with that many blocks
    for d in range(5):
        assert D.rows(torch.tensor([d]), rank)[0].tolist() == B.from_order(d, order).tolist()


def test_depth_costs_are_the_cumulative_flops_share_of_the_keep_order():
    costs = D.depth_costs([2, 0, 1], [10.0, 20.0, 30.0], 100.0)
    assert costs.tolist() == pytest.approx([0.0, 0.2, 0.3, 0.6])  # keep order 1, 0, 2


def test_choose_trades_the_probability_of_being_right_against_flops_by_gamma():
    p = torch.tensor([[0.1, 0.8, 0.9, 0.95, 0.96]])
    costs = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    assert D.choose(p, costs, -1000.0).item() == 4  # accuracy is all that counts
    assert D.choose(p, costs, -0.01).item() == 1  # nearly free to be wrong: the cheapest useful depth
    # the expected reward itself: p (1 - c) + (1 - p) gamma
    gamma = -3.0
    value = p * (1 - costs) + (1 - p) * gamma
    assert D.choose(p, costs, gamma).item() == int(value.argmax())
    # per image: an image that is right at a shallow depth stops there, a hard one goes deeper
    two = torch.tensor([[0.1, 0.97, 0.98, 0.98, 0.98], [0.05, 0.2, 0.4, 0.7, 0.9]])
    assert D.choose(two, costs, -3.0).tolist() == [1, 4]


def test_distillation_mixes_labels_with_the_users_resnet_where_it_is_right():
    torch.manual_seed(0)
    logits, teacher = torch.randn(8, 10), torch.randn(8, 10)
    labels = teacher.argmax(1)  # the user's ResNet is right on every image
    ce = torch.nn.functional.cross_entropy
    assert D.distill_loss(logits, labels, None) == pytest.approx(ce(logits, labels).item())
    assert D.distill_loss(logits, labels, teacher, weight=0) == pytest.approx(ce(logits, labels).item())
    # the KL term is zero when the student answers as the teacher
    assert D.distill_loss(teacher, labels, teacher, weight=1.0).item() == pytest.approx(0.0, abs=1e-6)
    kl = torch.nn.functional.kl_div(torch.log_softmax(logits / 2, 1), torch.log_softmax(teacher / 2, 1),
                                    reduction="none", log_target=True).sum(1) * 4
    expected = (0.5 * ce(logits, labels, reduction="none") + 0.5 * kl).mean()
    assert D.distill_loss(logits, labels, teacher).item() == pytest.approx(expected.item(), rel=1e-5)
    # where it is wrong its soft labels would teach the mistake: those images learn from the labels alone
    wrong = (labels + 1) % 10
    assert D.distill_loss(logits, wrong, teacher).item() == pytest.approx(ce(logits, wrong).item(), rel=1e-5)


def depth_policy(order=None) -> DepthPolicy:
    costs = cost_model(DIGITS)
    policy = DIGITS.build_depth_policy()
    return policy.set_order(order or list(range(12)), costs.backbone.blocks, costs.full)


def test_depth_policy_runs_like_any_policy_and_costs_its_own_network():
    torch.manual_seed(0)
    policy = depth_policy([5, 1, 0, 7, 2, 11, 3, 4, 6, 8, 9, 10]).eval()
    images = torch.randn(16, 1, 8, 8)
    rows = policy(images)
    depths = policy.depths(images)
    assert rows.shape == (16, 12) and set(rows.unique().tolist()) <= {0.0, 1.0}
    assert rows.sum(1).tolist() == depths.float().tolist()
    assert torch.equal(rows, D.rows(depths, policy.rank))
    assert policy(images, scores=True).shape == (16, 13)
    # gamma steers it: a harsh penalty for errors buys more blocks
    policy.gamma.fill_(-1000.0)
    deep = policy(images).sum(1).mean()
    policy.gamma.fill_(-0.01)
    assert policy(images).sum(1).mean() <= deep
    costs = cost_model(DIGITS, policy)
    spec, pool = DIGITS.depth_policy_spec
    assert costs.policy == resnet_cost(spec, 8 // pool, 13).total
    # the CIFAR presets give it a lite network: a half-width ResNet-8 on the image pooled to 16x16
    r32 = get_preset("R32_C10")
    lite = cost_model(r32, r32.build_depth_policy()).policy
    assert lite == resnet_cost(cifar_resnet((1, 1, 1), (8, 16, 32)), 16, 16).total
    assert lite < cost_model(r32).policy / 10


def test_a_depth_policy_checkpoint_loads_with_its_order_and_gamma(tmp_path):
    torch.manual_seed(0)
    policy = depth_policy([3, 2, 1, 0, 4, 5, 6, 7, 8, 9, 10, 11])
    policy.gamma.fill_(-2.5)
    path = tmp_path / "depth.pt"
    save_checkpoint(path, DIGITS, randomize_batchnorm(DIGITS.build_backbone()), policy, {"stage": "depth"})
    _, loaded, _ = load_models(DIGITS, path)
    assert isinstance(loaded, DepthPolicy)
    assert torch.equal(loaded.rank, policy.rank) and float(loaded.gamma) == -2.5
    images = torch.randn(8, 1, 8, 8)
    assert torch.equal(loaded.eval()(images), policy.eval()(images))
    # the CLI reports it like any policy, its FLOPs with the depth policy's network
    report = json.loads(run_module("blockdrop.evaluate", "--preset", "R26_DIGITS", "--checkpoint", str(path),
                                   "--json").stdout)
    costs = cost_model(DIGITS, loaded)
    assert report["flops_mean"] >= costs.fixed and report["unique_policies"] >= 1


def stage(name: str, **extra) -> StageConfig:
    return StageConfig(preset="R26_DIGITS", stage=name, epochs=1, batch_size=16, lr=0.01, weight_decay=0.0,
                       gamma=-2.0, drop_rate=0.0, dataset=None, data_dir=None,
                       **extra)


def test_the_three_depth_stages_train_what_they_should():
    torch.manual_seed(0)
    backbone = randomize_batchnorm(DIGITS.build_backbone())
    payload = {"backbone": backbone.state_dict(), "policy": None}
    images, labels = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    order = list(range(11, -1, -1))
    # nest: the ResNet learns, the keep order is set on the policy for the stages after it
    models, optimizer, _ = setup_stage(stage("nest", order=order), DIGITS, payload, payload, torch.device("cpu"))
    assert isinstance(models.policy, DepthPolicy) and models.teacher is not None
    assert models.rank.tolist() == D.ranks(order).tolist()
    before = [p.detach().clone() for p in models.backbone.parameters()]
    out = nest_step(models.executor_train, images, labels, models.rank, models.teacher(images).detach())
    optimizer.step()
    assert out.blocks is not None and ((1 <= out.blocks) & (out.blocks <= 12)).all()
    assert any(not torch.equal(a, b) for a, b in zip(before, models.backbone.parameters()))
    nested = {"backbone": models.backbone.state_dict(), "policy": models.policy.state_dict()}
    # depth: only the policy network learns; its targets are the ResNet's probability of the true class
    models, optimizer, _ = setup_stage(stage("depth"), DIGITS, nested, None, torch.device("cpu"))
    assert float(models.policy.gamma) == -2.0
    frozen = [p.detach().clone() for p in models.backbone.parameters()]
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        losses.append(depth_step(models.policy_train, models.policy, models.backbone, images, labels).loss.item())
        optimizer.step()
    assert losses[-1] < losses[0]
    assert all(torch.equal(a, b) for a, b in zip(frozen, models.backbone.parameters()))
    trained = {"backbone": models.backbone.state_dict(), "policy": models.policy.state_dict()}
    # finetune: the ResNet learns under the policy's choices; the policy stays as it is
    models, optimizer, _ = setup_stage(stage("finetune"), DIGITS, trained, payload, torch.device("cpu"))
    policy_before = [p.detach().clone() for p in models.policy.parameters()]
    models.policy.eval()
    out = depth_finetune_step(models.policy, models.executor_train, images, labels, models.teacher(images).detach())
    optimizer.step()
    assert torch.equal(out.blocks, models.policy.depths(images).float())
    assert all(torch.equal(a, b) for a, b in zip(policy_before, models.policy.parameters()))
    assert isinstance(optimizer, torch.optim.SGD)


def test_keeps_bracketing_the_flops_of_a_learned_policy():
    costs = cost_model(DIGITS)
    order = list(range(12))
    flops = [static_flops(costs, B.from_order(k, order)) for k in range(13)]
    assert keeps_bracketing(costs, order, (flops[5] + flops[6]) / 2) == [5, 6]
    assert keeps_bracketing(costs, order, flops[7]) == [6, 7]
    assert keeps_bracketing(costs, order, 0.0) == [0]
    assert keeps_bracketing(costs, order, 1e12) == [11, 12]


@pytest.mark.slow
def test_a_pruned_checkpoint_runs_its_blocks_and_pays_for_no_policy_network(tmp_path):
    torch.manual_seed(0)
    row = B.from_order(5, list(range(12)))
    path = tmp_path / "pruned.pt"
    save_checkpoint(path, DIGITS, randomize_batchnorm(DIGITS.build_backbone()), None,
                    {"stage": "prune", "config": {"static_policy": row.int().tolist()}})
    _, policy, _ = load_models(DIGITS, path)
    assert isinstance(policy, StaticPolicy) and not isinstance(policy, PolicyNet)
    assert torch.equal(policy(torch.zeros(3, 1, 8, 8)), row.expand(3, -1))
    report = json.loads(run_module("blockdrop.evaluate", "--preset", "R26_DIGITS", "--checkpoint", str(path),
                                   "--json").stdout)
    assert report["policy"] == "pruned ResNet, the same 5 blocks for every image"
    assert report["blocks_mean"] == 5 and report["unique_policies"] == 1
    assert report["flops_mean"] == pytest.approx(static_flops(cost_model(DIGITS), row))
    refused = run_module("blockdrop.evaluate", "--preset", "R26_DIGITS", "--checkpoint", str(path), "--compare")
    assert refused.returncode == 2 and "a pruned ResNet" in refused.stderr
