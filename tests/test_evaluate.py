"""The evaluation report, through the library and through `python -m blockdrop.evaluate`."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from blockdrop.checkpoints import save_checkpoint
from blockdrop.data import load_dataset
from blockdrop.evaluate import make_loader
from blockdrop.flops import cost_model
from blockdrop.metrics import evaluate
from blockdrop.presets import get_preset

from conftest import randomize_batchnorm, run_module


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_module("blockdrop.evaluate", *args)


def first_n_policy_file(path, n: int) -> None:
    """An original-format R110_C10 file whose policy keeps exactly blocks 0..n-1 for every image."""
    preset = get_preset("R110_C10")
    policy = preset.build_policy()
    with torch.no_grad():
        policy.logit.weight.zero_()
        policy.logit.bias.copy_(torch.where(torch.arange(54) < n, 10.0, -10.0))
    agent = dict(policy.state_dict())
    agent["vnet.weight"], agent["vnet.bias"] = torch.zeros(1, 64), torch.zeros(1)
    torch.save({"agent": agent, "resnet": randomize_batchnorm(preset.build_backbone()).state_dict(),
                "epoch": 2000, "reward": 0.5, "acc": 0.93}, path)


@pytest.mark.slow
@pytest.mark.parametrize("n", [0, 20, 54])
def test_policy_keeping_first_n_blocks_reports_n_blocks_and_their_analytic_flops(tmp_path, cifar10_dir, n):
    ckpt = tmp_path / "first_n.t7"
    first_n_policy_file(ckpt, n)
    proc = cli("--preset", "R110_C10", "--checkpoint", str(ckpt), "--dataset", "cifar10",
               "--data-dir", str(cifar10_dir), "--batch-size", "16", "--num-workers", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    costs = cost_model(get_preset("R110_C10"))
    assert report["images"] == 30 and report["source"] == "blockdrop-original"
    assert report["blocks_mean"] == n and report["blocks_std"] == 0 and report["unique_policies"] == 1
    assert report["flops_mean"] == costs.fixed + sum(costs.backbone.blocks[:n])
    assert report["flops_std"] == 0
    assert report["full_flops"] == costs.full == 505_775_360
    if n == 54:
        assert report["accuracy"] == report["full_accuracy"]


@pytest.mark.slow
def test_text_report_has_the_original_lines(tmp_path, cifar10_dir):
    ckpt = tmp_path / "first_20.t7"
    first_n_policy_file(ckpt, 20)
    proc = cli("--preset", "R110_C10", "--checkpoint", str(ckpt), "--data-dir", str(cifar10_dir), "--limit", "10")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].startswith("Accuracy: ")
    assert lines[2] == "Block Usage: 20.000 +- 0.000"
    flops = cost_model(get_preset("R110_C10")).fixed + sum(cost_model(get_preset("R110_C10")).backbone.blocks[:20])
    assert lines[3] == f"FLOPs/img: {flops:.2E} +- 0.00E+00"
    assert lines[4] == "Unique Policies: 1"
    assert lines[5].startswith("This checkpoint's ResNet, all blocks: accuracy ") and lines[5].endswith("FLOPs/img 5.06E+08")
    assert "(10 images)" in lines[6]


@pytest.mark.slow
def test_checkpoint_without_policy_evaluates_the_full_model(tmp_path):
    preset = get_preset("R26_DIGITS")
    ckpt = tmp_path / "resnet.pt"
    save_checkpoint(ckpt, preset, preset.build_backbone())
    proc = cli("--preset", "R26_DIGITS", "--checkpoint", str(ckpt), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["images"] == 360 and report["blocks_mean"] == 12 and report["unique_policies"] == 1
    assert report["flops_mean"] == report["full_flops"] and report["speedup"] == 1.0
    assert report["accuracy"] == report["full_accuracy"]
    assert "has no policy network" in proc.stderr


def test_library_report_matches_per_image_policies_and_accuracy():
    preset = get_preset("R26_DIGITS")
    torch.manual_seed(0)
    backbone, policy = randomize_batchnorm(preset.build_backbone()), randomize_batchnorm(preset.build_policy())
    loader = make_loader(load_dataset(preset, "test"), batch_size=64, num_workers=0)
    report = evaluate(backbone, policy, loader, cost_model(preset), torch.device("cpu"), progress=False)
    with torch.no_grad():
        images = torch.stack([img for img, _ in loader.dataset])
        labels = torch.tensor([label for _, label in loader.dataset])
        actions = (policy(images) >= 0.5).float()
        expected_acc = (backbone(images).argmax(1) == labels).double().mean().item()
    assert report.images == 360
    assert report.blocks_mean == pytest.approx(actions.sum(1).mean().item())
    assert report.unique_policies == len(torch.unique(actions, dim=0))
    assert report.full_accuracy == pytest.approx(expected_acc)
    assert report.speedup == pytest.approx(cost_model(preset).full / report.flops_mean)


@pytest.mark.parametrize("args, message", [
    (["--preset", "R999", "--checkpoint", "x.pt"], "unknown preset 'R999'"),
    (["--preset", "R32_C10", "--checkpoint", "missing.pt"], "checkpoint missing.pt does not exist"),
    (["--preset", "R26_DIGITS", "--checkpoint", "notes.txt"], "notes.txt is not a PyTorch checkpoint"),
    (["--preset", "R26_DIGITS", "--checkpoint", "notes.txt", "--device", "cuda:64"], "--device cuda:64"),
    (["--preset", "R26_DIGITS", "--checkpoint", "notes.txt", "--device", "tpu"], "is not a device"),
    (["--preset", "R26_DIGITS", "--checkpoint", "."], "is a folder, not a checkpoint file"),
    (["--preset", "R26_DIGITS", "--baseline", "greedy", "--keep", "-1"], "--keep is a number of blocks"),
    (["--preset", "R26_DIGITS", "--baseline", "greedy", "--keep", "13"], "--keep must be between 0 and 12"),
    (["--preset", "R26_DIGITS", "--num-workers", "-1"], "--num-workers is a number of loader processes"),
    (["--preset", "R26_DIGITS", "--report-dir", "notes.txt"], "--report-dir notes.txt is a file"),
])
@pytest.mark.slow
def test_bad_input_exits_2_with_a_message_and_no_traceback(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    proc = cli(*args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_missing_dataset_is_a_clear_error(tmp_path):
    ckpt = tmp_path / "r32.pt"
    save_checkpoint(ckpt, get_preset("R32_C10"), get_preset("R32_C10").build_backbone())
    proc = cli("--preset", "R32_C10", "--checkpoint", str(ckpt), "--data-dir", str(tmp_path), "--no-download")
    assert proc.returncode == 2 and "cifar10 not found in" in proc.stderr


@pytest.mark.slow
def test_help_explains_the_options():
    out = cli("--help").stdout
    for flag in ("--preset", "--checkpoint", "--backbone", "--dataset", "--data-dir", "--batch-size", "--json"):
        assert flag in out


@pytest.mark.slow
def test_without_checkpoint_the_untrained_preset_is_evaluated_end_to_end():
    proc = cli("--preset", "R26_DIGITS", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["source"] == "untrained" and report["checkpoint"] is None and report["images"] == 360
    assert 0 <= report["blocks_mean"] <= 12 and report["flops_mean"] >= cost_model(get_preset("R26_DIGITS")).fixed
    assert "no --checkpoint" in proc.stderr


def test_tallies_of_shards_merge_into_the_tally_of_the_whole_set():
    from blockdrop.metrics import Tally, tally

    preset = get_preset("R26_DIGITS")
    torch.manual_seed(1)
    backbone, policy = randomize_batchnorm(preset.build_backbone()), randomize_batchnorm(preset.build_policy())
    data = load_dataset(preset, "test")
    costs = cost_model(preset)
    whole = tally(backbone, policy, make_loader(data, 50, 0), costs, torch.device("cpu")).report(costs.full)
    merged = Tally()
    for rank in range(3):  # shards of unequal size, as the workers of a job see them
        shard = torch.utils.data.Subset(data, range(rank, len(data), 3))
        merged.merge(tally(backbone, policy, make_loader(shard, 7, 0), costs, torch.device("cpu")))
    report = merged.report(costs.full)
    assert report.images == whole.images == 360
    assert report.unique_policies == whole.unique_policies and report.accuracy == whole.accuracy
    for key in ("blocks_mean", "blocks_std", "flops_mean", "flops_std"):
        assert getattr(report, key) == pytest.approx(getattr(whole, key), rel=1e-9)


def digit_folder(root, per_class: int = 4, corrupt: str | None = None):
    """root/{train,test}/<digit>/*.png from scikit-learn's digits; `corrupt`: a split whose class 3 gets a
    file of garbage bytes among its good images."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    for split, offset in (("train", 0), ("test", per_class)):
        for digit in range(10):
            folder = root / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for i, index in enumerate(np.flatnonzero(bunch.target == digit)[offset:offset + per_class]):
                Image.fromarray((bunch.images[index] * 255 / 16).round().astype(np.uint8)).save(folder / f"{i}.png")
    bad = None
    if corrupt:
        bad = root / corrupt / "3" / "bad.png"
        bad.write_bytes(b"\x89PNG\r\n garbage")
    return bad


@pytest.mark.slow
def test_a_corrupt_image_is_skipped_named_and_counted_then_past_the_limit_refused(tmp_path, capfd):
    """The policy for unreadable files: the next image stands in, a warning names the file once, the
    count is reported; past --max-bad-images the evaluation stops with one line."""
    from blockdrop.errors import UserError
    from blockdrop.evaluate import main

    bad = digit_folder(tmp_path, corrupt="test")
    args = ["--preset", "R26_DIGITS", "--dataset", "imagefolder", "--data-dir", str(tmp_path), "--json",
            "--num-workers", "2"]
    main(args + ["--max-bad-images", "0.05"])
    out, err = capfd.readouterr()  # the warning comes from a loader process
    report = json.loads(out)
    assert report["images"] == 41 and report["skipped_images"] == 1
    assert err.count(f"unreadable image {bad}") == 1 and "skipped 1 unreadable image" in err
    with pytest.raises(UserError, match="1 unreadable images in .* more than --max-bad-images 0 allows"):
        main(args + ["--max-bad-images", "0"])
