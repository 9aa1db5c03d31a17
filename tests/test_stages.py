"""BlockDrop's two REINFORCE steps, each on its own: what they train, what they leave alone, and the loss
they minimise, on a small preset with non-trivial BatchNorm statistics."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from blockdrop import reinforce as R
from blockdrop.execution import Executor, run_sparse
from blockdrop.presets import get_preset
from blockdrop.stages import curriculum_step, finetune_step

from conftest import randomize_batchnorm

PRESET = get_preset("R26_DIGITS")
K = PRESET.num_blocks


def models(seed: int = 0):
    torch.manual_seed(seed)
    backbone = randomize_batchnorm(PRESET.build_backbone(), seed)
    policy = PRESET.build_policy()
    with torch.no_grad():  # keep-probabilities spread over (0, 1): sampled and greedy policies differ
        policy.logit.bias.copy_(torch.linspace(-1.5, 1.5, K))
    images = torch.randn(24, PRESET.in_channels, PRESET.image_size, PRESET.image_size)
    labels = torch.randint(PRESET.num_classes, (24,))
    return backbone, policy, images, labels


def test_curriculum_step_trains_the_decided_blocks_of_the_policy_alone():
    backbone, policy, images, labels = models()
    backbone.requires_grad_(False)
    before = copy.deepcopy(backbone.state_dict())
    index = 3  # the last four blocks are decided
    out = curriculum_step(policy, backbone, images, labels, index, gamma=-1.0, beta=0.0)
    rows = policy.logit.weight.grad.abs().sum(1)
    assert torch.all(rows[:K - index - 1] == 0), "undecided blocks get no REINFORCE gradient"
    assert torch.all(rows[K - index - 1:] > 0), "decided blocks do"
    assert all(p.grad is None for p in backbone.parameters())
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items()), "frozen: BatchNorm statistics too"
    assert torch.all(out.blocks >= K - index - 1), "undecided blocks are forced on"
    assert torch.equal(out.correct, out.reward > -1.0)


def test_curriculum_step_minimises_self_critical_reinforce_minus_the_original_entropy_bonus():
    backbone, policy, images, labels = models(1)
    index, gamma, beta = 5, -2.0, 0.1
    torch.manual_seed(7)
    out = curriculum_step(policy, backbone, images, labels, index, gamma, beta=beta)
    with torch.no_grad():  # by hand, from the same draw
        torch.manual_seed(7)
        probs = policy(images)
        bounded, mask = R.bound(probs), R.curriculum_mask(K, index)
        sampled = R.force_undecided(R.sample(bounded), mask)
        greedy = R.force_undecided(R.greedy(probs), mask)

        def reward(policy_rows):
            return R.reward(run_sparse(backbone, images, policy_rows).argmax(1) == labels, policy_rows, gamma)

        advantage = reward(sampled) - reward(greedy)
        logp = R.log_prob(bounded, sampled) * mask
        expected = -(logp.sum(1) * advantage).mean() - beta * R.entropy_original(bounded)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.equal(out.reward, reward(sampled)) and torch.equal(out.blocks, sampled.sum(1))


def test_finetune_step_trains_both_networks_on_the_sampled_policy_with_a_greedy_baseline_in_eval_mode():
    backbone, policy, images, labels = models(2)
    untouched = copy.deepcopy(backbone)
    executor = Executor(backbone, "sparse")
    backbone.train()
    gamma = -5.0
    torch.manual_seed(11)
    out = finetune_step(policy, executor, backbone, images, labels, gamma)
    assert backbone.training, "the ResNet is back in train mode"
    assert policy.logit.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.parameters())

    torch.manual_seed(11)  # by hand, from the same draw
    probs = policy(images)
    bounded = R.bound(probs)
    sampled, greedy = R.sample(bounded), R.greedy(probs)
    with torch.no_grad():
        untouched.eval()
        baseline = R.reward(run_sparse(untouched, images, greedy).argmax(1) == labels, greedy, gamma)
    untouched.train()
    logits = run_sparse(untouched, images, sampled)  # train mode: updates BatchNorm statistics, as the step did
    reward = R.reward(logits.argmax(1) == labels, sampled, gamma)
    expected = R.reinforce_loss(bounded, sampled, reward - baseline) + F.cross_entropy(logits, labels)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.equal(out.correct, logits.argmax(1) == labels) and torch.equal(out.blocks, sampled.sum(1))
    # the greedy baseline ran in eval mode: BatchNorm statistics moved once, by the train-mode pass alone
    for (name, mine), theirs in zip(backbone.named_buffers(), untouched.buffers()):
        assert torch.allclose(mine, theirs), name


def stage_config(stage: str, **extra):
    from blockdrop.stages import StageConfig

    return StageConfig(**({"preset": "R26_DIGITS", "stage": stage, "epochs": 30, "batch_size": 64, "lr": 0.1,
                          "weight_decay": 0.0, "gamma": -5.0, "drop_rate": 0.0, "dataset": None, "data_dir": None}
                          | extra))


def test_ddp_looks_for_unused_blocks_only_where_a_batch_can_skip_one():
    """Sparse execution leaves a block no image of a batch keeps out of the graph; DDP must then look for
    unused parameters, and is spared the search (and its warning) where that cannot happen."""
    from blockdrop.stages import blocks_can_go_unused

    def can(cfg, batch=32, steps=660):
        return blocks_can_go_unused(cfg, K, batch, steps)

    assert can(stage_config("finetune")) and can(stage_config("nest"))  # per-image policies, random depths
    assert not can(stage_config("pretrain"))  # every block, every image
    assert not can(stage_config("finetune", execution="masked"))  # masked keeps every block in the graph
    assert can(stage_config("prune", static_policy=[1] * 5 + [0] * 7))
    assert not can(stage_config("prune", static_policy=[1] * K))
    # stochastic depth: the last block survives half the time; 32 images all dropping it is 2e-10 a step
    assert not can(stage_config("pretrain", drop_rate=0.5))
    assert can(stage_config("pretrain", drop_rate=0.5), batch=4)
    assert can(stage_config("pretrain", drop_rate=0.5), steps=10 ** 5)


def test_a_competitor_trains_in_the_cosine_cycles_of_the_stages_it_matches():
    """The depth policy's ResNet trains in nest, then finetune: two cosine cycles, each from its stage's lr. The
    competitor gets as many steps in the same two cycles."""
    from blockdrop.plans import resnet_cycles, resnet_steps
    from blockdrop.stages import make_optimizer, make_schedule

    stages = [("nest", {"epochs": 4, "batch_size": 64, "lr": 0.02}), ("depth", {"epochs": 9, "batch_size": 128, "lr": 1e-3}),
              ("finetune", {"epochs": 3, "batch_size": 64, "lr": 0.01})]
    cycles = resnet_cycles(stages, train_size=640, batch_size=128, lr=0.02)
    assert cycles == [[8, 1.0], [6, 0.5]]  # 40 and 30 steps at 5 a epoch; finetune at half the lr
    assert sum(c[0] for c in cycles) * (640 // 128) == resnet_steps(stages, 640)
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = make_optimizer("prune", [weight], 0.02, 0.0)
    schedule = make_schedule("prune", optimizer, 4, cycles=[[2, 1.0], [2, 0.5]])
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs == pytest.approx([0.02, 0.01, 0.01, 0.005])  # each cycle from its peak, half-way down after one epoch


def test_a_channel_pruning_stage_trains_the_narrower_resnet_from_the_users():
    """StageConfig.channels: every worker starts from the kept channels of --init's ResNet; the soft labels are
    the full ResNet's; the trained weights save and load as the narrower ResNet."""
    from blockdrop import channels as C
    from blockdrop.stages import StageConfig, setup_stage, train_epoch

    backbone, _, images, labels = models()
    kept = C.keep_top(C.scores(backbone, "l1", 8), C.widths_at(backbone.spec, 0.5))
    user = {"backbone": backbone.state_dict(), "policy": None}
    cfg = StageConfig(preset=PRESET.name, stage="prune", epochs=2, batch_size=8, lr=0.01, weight_decay=0.0, gamma=0.0,
                      drop_rate=0.0, dataset=None, data_dir=None, static_policy=[1] * K, channels=kept,
                      cycles=[[1, 1.0], [1, 0.5]])
    trained, optimizer, schedule = setup_stage(cfg, PRESET, user, user, torch.device("cpu"))
    assert trained.backbone.spec.mids == tuple((len(k[0]),) for k in kept)
    assert trained.teacher.spec.mids is None  # the full ResNet teaches
    start = C.pruned(backbone, kept, PRESET.num_classes).eval()
    with torch.no_grad():
        assert torch.allclose(trained.backbone.eval()(images), start(images), atol=1e-6)
    loader = [(images[i:i + 8], labels[i:i + 8]) for i in range(0, 24, 8)]
    train_epoch("prune", trained, loader, optimizer, 0, 0.0, torch.device("cpu"), static=torch.ones(K))
    schedule.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.005)  # the second cycle's peak
    assert not torch.equal(trained.backbone.state_dict()["blocks.0.0.conv1.weight"], start.state_dict()["blocks.0.0.conv1.weight"])
