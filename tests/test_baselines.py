"""Image-blind baselines, the equal-FLOPs comparison, and the policy pictures."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from blockdrop import baselines as B
from blockdrop.analysis import PRUNED, Comparison, Group, Versus, compare
from blockdrop.checkpoints import save_checkpoint
from blockdrop.errors import UserError
from blockdrop.metrics import Records, Report, tally
from blockdrop.flops import cost_model
from blockdrop.pictures import draw_all
from blockdrop.presets import get_preset
from blockdrop.stats import paired_difference

from conftest import randomize_batchnorm, run_module

DIGITS = get_preset("R26_DIGITS")  # 12 blocks, stages [4, 4, 4]


def test_first_k_keeps_the_first_blocks():
    assert B.first_k(3, 6).tolist() == [1, 1, 1, 0, 0, 0]
    assert B.first_k(0, 4).tolist() == [0, 0, 0, 0]


def test_distribute_k_spreads_blocks_over_the_stages_first_blocks_first():
    assert B.distribute_k(7, [5, 5, 5]).tolist() == [1, 1, 1, 0, 0] + [1, 1, 0, 0, 0] + [1, 1, 0, 0, 0]
    assert B.distribute_k(3, [1, 4, 4]).tolist() == [1] + [1, 0, 0, 0] + [1, 0, 0, 0]
    assert B.distribute_k(6, [1, 4, 4]).tolist() == [1] + [1, 1, 1, 0] + [1, 1, 0, 0]  # a full stage passes its turn
    assert B.distribute_k(15, [5, 5, 5]).sum() == 15


def test_random_k_draws_k_blocks_per_image_and_differs_between_images():
    rows = B.random_k(4, 12, 200, torch.Generator().manual_seed(0))
    assert (rows.sum(1) == 4).all()
    assert len({tuple(r) for r in rows.int().tolist()}) > 100
    assert (rows.mean(0) - 4 / 12).abs().max() < 0.12  # every block equally likely


def test_from_order_drops_the_first_blocks_of_the_order():
    assert B.from_order(2, [3, 0, 1, 2]).tolist() == [0, 1, 1, 0]
    assert B.from_order(4, [3, 0, 1, 2]).tolist() == [1, 1, 1, 1]


def test_greedy_drops_blocks_that_change_nothing_first():
    """Blocks whose residual branch outputs zero are exact identities (inputs are post-ReLU): dropping
    them changes no prediction, while the other blocks, made strong, each change many: the greedy
    search drops the identities first."""
    torch.manual_seed(0)
    backbone = randomize_batchnorm(DIGITS.build_backbone())
    identities = {1, 6, 10}
    for k in range(12):
        bn = backbone.block(k).bn2
        bn.weight.data.mul_(0 if k in identities else 4)
        bn.bias.data.mul_(0 if k in identities else 4)
    images = torch.randn(64, 1, 8, 8)
    features = []
    hook = backbone.fc.register_forward_hook(lambda module, inputs, output: features.append(inputs[0]))
    with torch.no_grad():
        backbone(images)
        hook.remove()
        # a random ResNet gives every image the same class: centre its logits so that classes vary
        backbone.fc.bias.copy_(-backbone.fc.weight @ features[0].mean(0))
        labels = backbone(images).argmax(1)  # the full model is right on every image
    assert len(set(labels.tolist())) > 3
    order = B.greedy_order(backbone, DataLoader(TensorDataset(images, labels), batch_size=32), torch.device("cpu"))
    assert sorted(order) == list(range(12))
    assert set(order[:3]) == identities
    assert B.greedy_order(backbone, DataLoader(TensorDataset(images, labels), batch_size=32), torch.device("cpu"),
                          drops=2) == order[:2]
    assert B.from_order(10, order[:2], 12).sum() == 10


def test_accuracy_at_interpolates_linearly_in_flops_and_clamps_at_the_ends():
    curve = [B.CurvePoint(2, 0.5, 200.0), B.CurvePoint(1, 0.3, 100.0), B.CurvePoint(3, 0.9, 300.0)]
    assert B.accuracy_at(curve, 150.0) == pytest.approx(0.4)
    assert B.accuracy_at(curve, 275.0) == pytest.approx(0.8)
    assert B.accuracy_at(curve, 50.0) == 0.3 and B.accuracy_at(curve, 400.0) == 0.9


@pytest.mark.parametrize("keep", [0, 3, 7.5, 12])
def test_keeps_around_bracket_the_flops_for_every_baseline(keep):
    costs = cost_model(DIGITS)
    backbone = DIGITS.build_backbone()
    flops = costs.fixed + keep * sum(costs.backbone.blocks) / 12  # a learned policy's, network included
    keeps = B.keeps_around(costs, flops)
    for name in ("firstk", "distributek"):
        row = B.chooser(name, 0, backbone)(torch.zeros(1, 1, 8, 8))  # checks the call shape only
        assert row.shape == (1, 12)
        spent = [float(costs.per_image(B.chooser(name, k, backbone)(torch.zeros(1, 1, 8, 8)))) - costs.policy
                 for k in keeps]
        assert min(spent) <= flops + 1e-6 and (max(spent) >= flops - 1e-6 or max(keeps) == 12)


def test_chooser_refuses_unknown_baselines_and_impossible_k():
    backbone = DIGITS.build_backbone()
    with pytest.raises(UserError, match="unknown baseline 'topk'"):
        B.chooser("topk", 3, backbone)
    with pytest.raises(UserError, match="between 0 and 12"):
        B.chooser("firstk", 13, backbone)


def report(accuracy: float, unique: int = 5, images: int = 360) -> Report:
    return Report(images, accuracy, 6.0, 1.0, 3e6, 1e5, unique, 0.99, 6.8e6, 2.2)


def versus(learned: np.ndarray, other: np.ndarray) -> Versus:
    return Versus(float(other.mean()), paired_difference(learned, other), "K=5..6")


def outcomes(n: int, right: int, seed: int = 0) -> np.ndarray:
    scores = np.zeros(n)
    scores[np.random.default_rng(seed).permutation(n)[:right]] = 1
    return scores


@pytest.mark.parametrize("gain, unique, words", [
    (+40, 5, "Per-image policies pay here: +4.00 points ["),
    (+2, 5, "A static policy is as good on this data"),  # 2 of 1000 images: inside the interval
    (-40, 5, "A static policy is better on this data: greedy static is 4.00 points more accurate"),
    (+40, 1, "it is a static policy, +4.00 points ["),
])
def test_comparison_verdict_is_decided_by_the_paired_interval(gain, unique, words):
    static = outcomes(1000, 900)
    learned = static.copy()
    flip = np.flatnonzero(static == (0 if gain > 0 else 1))[:abs(gain)]
    learned[flip] = 1 - learned[flip]
    others = {"greedy": versus(learned, static), "firstk": versus(learned, outcomes(1000, 500, 1)),
              "randomk": versus(learned, outcomes(1000, 800, 2)), "distributek": versus(learned, outcomes(1000, 880, 3))}
    comparison = Comparison(report(learned.mean(), unique, 1000), others)
    assert comparison.best_baseline == comparison.best_static == "greedy"
    assert comparison.gain == pytest.approx(gain / 1000)
    assert words in comparison.verdict()
    metrics = comparison.metrics()
    assert metrics["gain_over_static"] == pytest.approx(gain / 1000)
    assert metrics["gain_over_static_low"] < metrics["gain_over_static"] < metrics["gain_over_static_high"]
    assert "gain_over_pruning" not in metrics
    again = Comparison.from_json(json.loads(json.dumps(comparison.to_json())))
    assert again.gain == pytest.approx(comparison.gain) and again.verdict() == comparison.verdict()


def test_prune_and_finetune_is_a_competitor_with_its_own_metrics_and_the_text_shows_the_intervals():
    learned = outcomes(400, 360)
    pruned = learned.copy()
    pruned[np.flatnonzero(learned == 0)[:30]] = 1  # prune-and-finetune gets 30 more images right
    others = {"greedy": versus(learned, outcomes(400, 300, 1)), PRUNED: versus(learned, pruned)}
    comparison = Comparison(report(0.9, images=400), others,
                            groups={"easy": Group(200, 4.0, 0.99), "hard": Group(200, 7.5, 0.81)})
    assert comparison.best_baseline == PRUNED and comparison.best_static == "greedy"
    assert "prune and finetune is 7.50 points more accurate" in comparison.verdict()
    metrics = comparison.metrics()
    assert metrics["gain_over_pruning"] == pytest.approx(-0.075) and metrics["gain_over_pruning_high"] < 0
    assert metrics["gain_over_static"] == pytest.approx(0.15)
    assert metrics["blocks_easy"] == 4.0 and metrics["accuracy_hard"] == 0.81
    text = comparison.text()
    assert "prune and finetune" in text and "-7.50 points [" in text and "(K=5..6)" in text
    assert "easy images 4.00 blocks, 99.0% (200); hard images 7.50 blocks, 81.0% (200)" in text


def constant_policy(preset, keep: list[int]):
    """A policy network that keeps exactly the blocks in `keep` for every image."""
    policy = preset.build_policy()
    with torch.no_grad():
        policy.logit.weight.zero_()
        policy.logit.bias.copy_(torch.tensor([10.0 if k in keep else -10.0 for k in range(preset.num_blocks)]))
    return policy


def test_compare_puts_a_static_policy_level_with_the_same_static_baseline():
    """A policy network that keeps the first 6 blocks of every image is FirstK at K = 6: at its FLOPs
    FirstK's accuracy is exactly its own."""
    torch.manual_seed(0)
    backbone = randomize_batchnorm(DIGITS.build_backbone())
    policy = constant_policy(DIGITS, list(range(6)))
    data = TensorDataset(torch.randn(40, 1, 8, 8), torch.randint(0, 10, (40,)))
    comparison, learned = compare(backbone, policy, data, data, cost_model(DIGITS), torch.device("cpu"), batch_size=16)
    assert comparison.learned.blocks_mean == 6 and comparison.learned.unique_policies == 1
    assert set(comparison.at_equal_flops) == set(B.BASELINES) | {"shuffled"}
    # one policy for every image: shuffling it across images changes nothing, the control ties exactly
    shuffled = comparison.versus["shuffled"]
    assert shuffled.accuracy == comparison.learned.accuracy and shuffled.interval.difference == 0
    # FirstK at K = 6 runs the same blocks without the policy network: cheaper, equally accurate
    six = next(p for p in comparison.curves["firstk"] if p.keep == 6)
    assert six.accuracy == pytest.approx(comparison.learned.accuracy)
    assert six.flops == pytest.approx(comparison.learned.flops_mean - cost_model(DIGITS).policy)
    keeps = B.keeps_around(cost_model(DIGITS), comparison.learned.flops_mean)
    assert len(set(comparison.greedy_order)) == len(comparison.greedy_order) == 12 - min(keeps)
    assert len(learned.records().labels) == 40


def digits_checkpoint(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "digits.pt"
    save_checkpoint(path, DIGITS, randomize_batchnorm(DIGITS.build_backbone()), constant_policy(DIGITS, [0, 1, 4, 8]))
    return path


@pytest.mark.slow
def test_evaluate_cli_reports_a_baseline_like_any_policy(tmp_path):
    ckpt = digits_checkpoint(tmp_path)
    costs = cost_model(DIGITS)
    first = json.loads(run_module("blockdrop.evaluate", "--preset", "R26_DIGITS", "--checkpoint", str(ckpt),
                                  "--baseline", "firstk", "--keep", "3", "--json").stdout)
    assert first["policy"] == "firstk baseline, K = 3"
    assert first["blocks_mean"] == 3 and first["blocks_std"] == 0 and first["unique_policies"] == 1
    assert first["flops_mean"] == costs.fixed - costs.policy + sum(costs.backbone.blocks[:3])  # no policy network
    random = json.loads(run_module("blockdrop.evaluate", "--preset", "R26_DIGITS", "--checkpoint", str(ckpt),
                                   "--baseline", "randomk", "--keep", "5", "--json").stdout)
    assert random["blocks_mean"] == 5 and random["blocks_std"] == 0 and random["unique_policies"] > 100
    assert random["images"] == 360 * B.RANDOM_SEEDS  # every draw of every test image
    greedy = json.loads(run_module("blockdrop.evaluate", "--preset", "R26_DIGITS", "--checkpoint", str(ckpt),
                                   "--baseline", "greedy", "--keep", "12", "--json").stdout)
    assert greedy["accuracy"] == greedy["full_accuracy"] and greedy["blocks_mean"] == 12


@pytest.mark.parametrize("args, message", [
    (["--baseline", "firstk"], "--baseline and --keep go together"),
    (["--keep", "3"], "--baseline and --keep go together"),
    (["--baseline", "firstk", "--keep", "40"], "--keep must be between 0 and 12"),
    (["--baseline", "firstk", "--keep", "3", "--compare"], "leave out --baseline"),
])
@pytest.mark.slow
def test_evaluate_cli_refuses_bad_baseline_flags(tmp_path, args, message):
    proc = run_module("blockdrop.evaluate", "--preset", "R26_DIGITS", "--checkpoint", str(digits_checkpoint(tmp_path)),
                      *args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


PICTURES = ["block_usage.png", "blocks_histogram.png", "blocks_per_class.png", "top_policies.png",
            "fewest_most_blocks.png"]


@pytest.mark.slow
def test_evaluate_cli_writes_pictures_report_and_comparison(tmp_path):
    out = tmp_path / "report"
    # the two pruned competitors a job writes: a block-pruned ResNet and a channel-pruned one
    from blockdrop import channels as C

    torch.manual_seed(1)
    resnet = randomize_batchnorm(DIGITS.build_backbone())
    save_checkpoint(tmp_path / "prune-K4.pt", DIGITS, resnet, None,
                    {"stage": "prune", "config": {"static_policy": [1] * 4 + [0] * 8}})
    narrow = C.pruned(resnet, C.keep_top(C.scores(resnet, "l1", 8), C.widths_at(resnet.spec, 0.3)), 10)
    save_checkpoint(tmp_path / "channels-30.pt", DIGITS, narrow, None,
                    {"stage": "prune", "config": {"static_policy": [1] * 12}})
    proc = run_module("blockdrop.evaluate", "--preset", "R26_DIGITS", "--checkpoint", str(digits_checkpoint(tmp_path)),
                      "--compare", "--report-dir", str(out), "--pruned",
                      f"{tmp_path / 'prune-K4.pt'},{tmp_path / 'channels-30.pt'}")
    assert proc.returncode == 0, proc.stderr
    assert "At the learned policy's FLOPs" in proc.stdout and "greedy static" in proc.stdout
    for competitor in ("prune and finetune", "channel pruning", "shuffled policies"):
        assert competitor in proc.stdout
    # the dense competitor's wall-clock time beside the policy's, on the same images
    assert re.search(r"Wall-clock per image .*: learned policy \d+\.\d+ ms, prune and finetune \d+\.\d+ ms, "
                     r"channel pruning \d+\.\d+ ms", proc.stdout), proc.stdout
    for name in PICTURES:
        with Image.open(out / name) as image:
            assert image.width > 300 and image.height > 150
            assert np.asarray(image.convert("L")).std() > 5  # drawn, not blank
    assert json.loads((out / "report.json").read_text())["blocks_mean"] == 4
    saved = json.loads((out / "baselines.json").read_text())
    assert set(saved["at_equal_flops"]) == set(B.BASELINES) | {"shuffled", PRUNED, "channel_prune"} and saved["verdict"]
    # the channel-pruned ResNet is read off at its own FLOPs (every block run, narrower)
    assert saved["curves"]["channel_prune"][0]["keep"] == 12 and saved["curves"]["channel_prune"][0]["flops"] < \
        0.35 * cost_model(DIGITS).full


def test_pictures_of_varied_policies_on_rgb_images(tmp_path):
    """Any K, 3-channel images, some misclassified: every picture is written."""
    rng = np.random.default_rng(0)
    policies = rng.random((50, 15)) < 0.6
    labels = rng.integers(0, 10, 50)
    records = Records(policies, labels, np.where(rng.random(50) < 0.8, labels, (labels + 1) % 10))
    images = TensorDataset(torch.randn(50, 3, 32, 32), torch.as_tensor(labels))
    written = draw_all(records, images, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), [0] * 5 + [1] * 5 + [2] * 5,
                       [f"class {i}" for i in range(10)], tmp_path)
    assert [p.name for p in written] == PICTURES
    assert all(p.stat().st_size > 5000 for p in written)


def test_tally_records_every_image_in_loader_order():
    torch.manual_seed(0)
    backbone = randomize_batchnorm(DIGITS.build_backbone())
    data = TensorDataset(torch.randn(30, 1, 8, 8), torch.arange(30) % 10)
    result = tally(backbone, B.chooser("firstk", 4, backbone), DataLoader(data, batch_size=7), cost_model(DIGITS),
                   torch.device("cpu"), records=True)
    records = result.records()
    assert records.labels.tolist() == (torch.arange(30) % 10).tolist()
    assert (records.blocks == 4).all() and records.correct.sum() == result.correct


def test_the_shuffled_control_runs_each_image_under_another_images_policy():
    """Same policies, same histogram, same FLOPs; which image gets which is a fixed permutation."""
    from blockdrop.analysis import Shuffled

    policies = np.eye(6, dtype=bool)[[0, 1, 2, 3, 4, 5, 0, 0]]  # 8 images, 6 distinct policies
    control = Shuffled(policies)
    rows = torch.cat([control(torch.zeros(3, 1)), control(torch.zeros(5, 1))])  # in loader order, batch by batch
    assert sorted(map(tuple, rows.int().tolist())) == sorted(map(tuple, policies.astype(int).tolist()))
    assert not torch.equal(rows, torch.as_tensor(policies, dtype=torch.float32))  # not each image's own
    assert torch.equal(Shuffled(policies).rows, control.rows)  # the same permutation every time
