"""train_job.py end to end: a real local Ray cluster, real MLflow stores, a real `mlflow server`."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, clean_env, mlflow_server  # noqa: F401  (fixture)

K = 12  # blocks of R26_DIGITS


def train_job(tmp_path: Path, *args: str, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train_job.py"), "--storage-path", str(tmp_path / "ray"),
                           *args], cwd=tmp_path, env=clean_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def command_line(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (its children, theirs, ...), oldest first, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        try:
            # /proc/PID/stat: "pid (name) state ppid ..."; the name may hold spaces and parentheses
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) if entry.name.isdigit() else None
        except (OSError, IndexError, ValueError):
            continue
        if parent is not None:
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        below = sorted(children.get(todo.pop(), []))
        found += below
        todo += below
    return sorted(found)


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.parametrize("args, message", [
    (["--penalty", "2"], "--penalty must be a negative number"),
    (["--penalty=-inf"], "--penalty must be a negative number"),
    (["--curriculum-penalty", "0"], "--curriculum-penalty must be a negative number"),
    (["--policy-lr", "0"], "--policy-lr must be positive"),
    (["--curriculum-pace", "0"], "--curriculum-pace must be at least 1"),
    (["--lr", "0"], "--lr must be positive"),
    (["--num-workers", "0"], "--num-workers must be at least 1"),
    (["--eval-every", "0"], "--eval-every is a number of epochs >= 1, not 0"),
    (["--preset", "R999"], "unknown preset 'R999'"),
    (["--stage", "curriculum"], "pass --init"),
    (["--stage", "nest"], "pass --init"),
    (["--epochs", "3,3"], "--epochs takes one number (>= 1) or one per stage run (4: pretrain, nest, depth, finetune)"),
    (["--policy", "blocks", "--epochs", "3,3"], "one per stage run (3: pretrain, curriculum, finetune)"),
    (["--stage", "finetune,curriculum"], "the blocks policy's stages run in the order pretrain -> adapt -> curriculum "
                                         "-> finetune"),
    (["--stage", "adapt,adapt"], "each once"),
    (["--stage", "nest,curriculum"], "not nest,curriculum"),
    (["--policy", "depth", "--stage", "adapt"], "(those of --policy blocks?)"),
    (["--stage", "prune"], "--stage prune and --keep K go together"),
    (["--keep", "3"], "--stage prune and --keep K go together"),
    (["--stage", "prune", "--keep", "13"], "--keep must be between 0 and 12"),
    (["--stage", "finetune", "--init", "missing.pt"], "missing.pt does not exist"),
    (["--dataset", "imagefolder", "--data-dir", "nowhere"], "imagefolder data not found"),
])
def test_invalid_input_is_refused_by_validation(tmp_path, monkeypatch, args, message):
    from blockdrop.errors import UserError
    from blockdrop.parsers.train import build_parser
    from blockdrop.plans import validate

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=re.escape(message)):
        validate(build_parser().parse_args(args))


def test_unknown_stages_are_refused_by_the_parser(capsys):
    from blockdrop.parsers.train import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--stage", "bogus"])
    assert ("unknown stage 'bogus'; use pretrain, adapt, curriculum, finetune, nest, depth, all, or prune (alone)"
            in capsys.readouterr().err)


def test_stage_all_runs_what_follows_the_init_checkpoint(tmp_path):
    """The depth policy (the default): pretrain, nest, depth, finetune, minus what --init holds.
    BlockDrop's: every stage (adapt only without stochastic depth); a ResNet: adapt onwards, or the
    curriculum onwards when it was trained with stochastic depth; a policy: finetune. The policy follows
    the stages named and what --init holds."""
    from blockdrop.checkpoints import save_checkpoint
    from blockdrop.checkpoints import read_checkpoint
    from blockdrop.parsers.train import build_parser
    from blockdrop.plans import plan_stages, policy_kind
    from blockdrop.presets import get_preset

    def plan(preset: str, *args: str) -> list[str]:
        parsed = build_parser().parse_args(["--preset", preset, *args])
        init = read_checkpoint(parsed.init) if parsed.init else None
        return plan_stages(get_preset(preset), parsed, policy_kind(parsed, init), init)

    r32, digits = get_preset("R32_C10"), get_preset("R26_DIGITS")
    assert plan("R32_C10") == ["pretrain", "nest", "depth", "finetune"]
    assert plan("R32_C10", "--policy", "blocks") == ["pretrain", "adapt", "curriculum", "finetune"]
    assert plan("R26_DIGITS", "--policy", "blocks") == ["pretrain", "curriculum", "finetune"]  # pretrained with SD
    assert plan("R32_C10", "--policy", "blocks", "--drop-rate", "0.3") == ["pretrain", "curriculum", "finetune"]
    standard = tmp_path / "resnet.pt"
    torch.save({"state_dict": r32.build_backbone().state_dict()}, standard)  # torchvision-style file
    assert plan("R32_C10", "--init", str(standard)) == ["nest", "depth", "finetune"]
    assert plan("R32_C10", "--init", str(standard), "--policy", "blocks") == ["adapt", "curriculum", "finetune"]
    robust = tmp_path / "robust.pt"
    save_checkpoint(robust, digits, digits.build_backbone(), meta={"stage": "pretrain", "config": {"drop_rate": 0.5}})
    assert plan("R26_DIGITS", "--init", str(robust), "--policy", "blocks") == ["curriculum", "finetune"]
    with_policy = tmp_path / "curriculum.pt"
    save_checkpoint(with_policy, digits, digits.build_backbone(), digits.build_policy(), {"stage": "curriculum"})
    assert plan("R26_DIGITS", "--init", str(with_policy)) == ["finetune"]  # BlockDrop's policy continues
    assert plan("R26_DIGITS", "--init", str(with_policy), "--stage", "curriculum,finetune") == ["curriculum", "finetune"]
    for stage, rest in (("nest", ["depth", "finetune"]), ("depth", ["finetune"]), ("finetune", ["finetune"])):
        path = tmp_path / f"{stage}.pt"
        save_checkpoint(path, digits, digits.build_backbone(), digits.build_depth_policy(), {"stage": stage})
        assert plan("R26_DIGITS", "--init", str(path)) == rest


def test_stages_on_other_data_last_a_fixed_number_of_steps(tmp_path):
    """On an image folder the policy stages are sized in optimisation steps, whatever the folder's size;
    flags still win."""
    from blockdrop.parsers.train import build_parser
    from blockdrop.plans import stage_settings
    from blockdrop.presets import CURRICULUM_PACE, OTHER_DATA_STAGES, get_preset

    r32 = get_preset("R32_C10")
    stages = ["adapt", "curriculum", "finetune"]

    def settings(stage: str, train_size: int, *args: str) -> dict:
        parsed = build_parser().parse_args(["--preset", "R32_C10", "--dataset", "imagefolder", *args])
        return stage_settings(r32, stage, parsed, stages, train_size)

    small, large = settings("finetune", 1280), settings("finetune", 128_000)
    assert small["epochs"] == OTHER_DATA_STAGES["finetune"].steps // 10 and large["epochs"] == 1
    curriculum = settings("curriculum", 1280)
    assert curriculum["pace"] == CURRICULUM_PACE and curriculum["gamma"] == -1.0 and curriculum["entropy"] == "original"
    assert curriculum["epochs"] * 10 >= 2 * r32.num_blocks * CURRICULUM_PACE
    assert settings("finetune", 1280, "--epochs", "7")["epochs"] == 7
    assert settings("finetune", 1280)["policy_lr"] == 3e-4 and settings("finetune", 1280, "--policy-lr", "1e-4")["policy_lr"] == 1e-4
    own = stage_settings(r32, "curriculum", build_parser().parse_args(["--preset", "R32_C10"]), stages, 50_000)
    assert own["epochs"] == 5000 and own["pace"] == 0  # the paper's schedule on CIFAR itself


@pytest.mark.slow
def test_cli_exits_2_with_the_message_before_any_work(tmp_path):
    proc = train_job(tmp_path, "--penalty", "2", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "--penalty must be a negative number" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray").exists()


@pytest.mark.slow
def test_gpu_flag_on_a_cluster_without_gpus_is_refused(tmp_path):
    proc = train_job(tmp_path, "--gpu", "--epochs", "1", timeout=300)
    assert proc.returncode == 2
    assert "--gpu was given but the Ray cluster has no GPU" in proc.stderr
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_all_stages_with_two_workers_learn_to_drop_blocks(tmp_path):
    # the default: the depth policy's stages, then prune-and-finetune and the comparison; two workers: data
    # parallel, with sparse execution (DDP with blocks some worker's rows all drop); evaluated every 4th
    # epoch and after the last
    proc = train_job(tmp_path, "--stage", "all", "--num-workers", "2", "--epochs", "8,4,4,3", "--name", "e2e",
                     "--eval-every", "4", timeout=900, BLOCKDROP_PROGRESS_EVERY_S="0.2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the checkpoints sit next to the run storage (--storage-path), where a cluster keeps them
    out = tmp_path / "ray" / "e2e" / "checkpoints"
    assert "Block Usage:" in proc.stdout and f"checkpoint: {out / 'e2e-finetune.pt'}" in proc.stdout
    names = sorted(p.name for p in out.iterdir())
    pruned = [n for n in names if n.startswith("e2e-prune-K")]
    channels = [n for n in names if n.startswith("e2e-channels-")]
    assert [n for n in names if n not in pruned + channels] == ["e2e-depth.pt", "e2e-finetune.pt", "e2e-nest.pt",
                                                                "e2e-pretrain.pt"]
    assert len(pruned) in (1, 2)  # the block counts that bracket the learned policy's FLOPs
    assert len(channels) == 1  # channel pruning at the learned policy's FLOPs
    # progress within epochs (every 0.2 s here; 30 s by default), from rank 0 only
    assert re.search(r"\[pretrain\] epoch \d+/8  step \d+/\d+  \d+ img/s  epoch ends in \dm\d\ds", proc.stdout), \
        proc.stdout[-3000:]
    assert "max_restarts > 0" not in proc.stderr and "Token authentication is enabled" not in proc.stderr  # noise
    assert "find_unused_parameters" not in proc.stdout + proc.stderr  # DDP's false alarm (blockdrop.console)
    client = client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("blockdrop")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("blockdrop.job") == "e2e")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    stages = {r.data.params["stage"]: r for r in children if r.data.params["stage"] != "prune"}
    assert set(stages) == {"pretrain", "nest", "depth", "finetune"} and len(children) == 4 + len(pruned) + 1
    assert parent.data.params["policy"] == "depth"
    for stage, evaluated in (("pretrain", [3, 7]), ("nest", [3]), ("depth", [3]), ("finetune", [2])):
        steps = [s for s, _ in history(client, stages[stage].info.run_id, "test_accuracy")]
        assert sorted(set(steps)) == evaluated, stage
        trained = [s for s, _ in history(client, stages[stage].info.run_id, "train_seconds")]
        assert sorted(set(trained)) == list(range(evaluated[-1] + 1)), stage  # every epoch: where the time goes
    assert stages["finetune"].data.params["train_execution"] == "sparse"
    assert "not evaluated: --eval-every 4" in proc.stdout
    loss = [v for _, v in history(client, stages["depth"].info.run_id, "train_loss")]
    assert min(loss[-2:]) < loss[0]  # the depth policy learns
    final = parent.data.metrics
    assert final["final_blocks_mean"] < 0.75 * K
    assert final["final_accuracy"] >= final["final_full_accuracy"] - 0.05
    assert final["final_speedup"] > 1.2
    # the user's ResNet (here the pretrain stage's) is the reference, measured, carried and reported
    pretrain_full = [v for _, v in history(client, stages["pretrain"].info.run_id, "full_accuracy")][-1]
    assert final["final_reference_accuracy"] == pytest.approx(pretrain_full)
    assert "Your ResNet (pretrain stage, e2e-pretrain.pt), all blocks: accuracy" in proc.stdout
    for key in ("test_accuracy", "blocks_used", "flops_per_image", "speedup", "unique_policies", "reference_accuracy"):
        assert key in stages["finetune"].data.metrics
    # after finetuning: the policy against the image-blind baselines and prune-and-finetune at equal FLOPs,
    # each with a paired interval, and its pictures
    assert "At the learned policy's FLOPs" in proc.stdout and "greedy static" in proc.stdout
    for competitor in ("prune and finetune", "channel pruning", "shuffled policies"):
        assert re.search(competitor + r" +\d+\.\d+%  [+-]\d+\.\d+ points \[[+-]\d+\.\d+, [+-]\d+\.\d+\]",
                         proc.stdout), competitor
    assert {"gain_over_static", "gain_over_static_low", "gain_over_pruning", "baseline_prune_finetune_accuracy",
            "gain_over_channel_pruning", "baseline_channel_prune_accuracy", "gain_over_shuffled",
            "baseline_greedy_accuracy", "prune_baseline_seconds", "blockdrop_seconds", "ms_per_image_learned",
            "ms_per_image_channel_prune", "ms_per_image_prune_finetune"} <= set(final)
    assert "Wall-clock per image" in proc.stdout
    assert final["gain_over_pruning_low"] <= final["gain_over_pruning"] <= final["gain_over_pruning_high"]
    # the competitors train as long as the policy's stages trained the ResNet (nest 4 epochs, finetune 3), in the
    # same two cosine cycles, from the user's ResNet under their static policy; each is a model of its own
    nest, finetune = (stages[s].data.params for s in ("nest", "finetune"))
    for run in children:
        if run.data.params["stage"] != "prune":
            continue
        params, m = run.data.params, run.data.metrics
        assert json.loads(params["cycles"])[0][0] == int(nest["epochs"]) and len(json.loads(params["cycles"])) == 2
        assert int(params["epochs"]) == int(nest["epochs"]) + int(finetune["epochs"])
        assert m["blocks_used_std"] == 0 and m["unique_policies"] == 1 and "final_val_accuracy" in m
        assert [o for o in run.outputs.model_outputs]  # an MLflow model: servable, registrable
        if params["competitor"] == "channel_prune":  # every block, narrower, within the learned FLOPs
            assert m["blocks_used"] == K and m["flops_per_image"] <= final["final_flops_mean"]
            assert params["criterion"] in ("l1", "l2", "bn_scale", "fpgm")
    pictures = {a.path for a in client.list_artifacts(parent.info.run_id, "policy")}
    assert pictures == {f"policy/{name}" for name in ("block_usage.png", "blocks_histogram.png", "blocks_per_class.png",
                                                      "top_policies.png", "fewest_most_blocks.png", "baselines.json")}
    # the same job again with a storage path that cannot be created: refused before anything starts,
    # and its finished run stays as it was
    again = subprocess.run([sys.executable, str(REPO / "train_job.py"), "--name", "e2e", "--storage-path", "/proc/x"],
                           cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--storage-path /proc/x cannot be created" in again.stderr, again.stderr[-2000:]
    after = client.get_run(parent.info.run_id).info
    assert (after.status, after.end_time) == ("FINISHED", parent.info.end_time)
    # and plainly again: nothing more to train, so it is refused and the record stays
    again = train_job(tmp_path, "--name", "e2e", timeout=180)
    assert again.returncode == 2 and "job e2e has finished already" in again.stderr, again.stderr[-2000:]
    after = client.get_run(parent.info.run_id).info
    assert (after.status, after.end_time) == ("FINISHED", parent.info.end_time)

    import mlflow.pyfunc
    import numpy as np

    from blockdrop.data import load_dataset
    from blockdrop.presets import get_preset

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"runs:/{parent.info.run_id}/model")
    from blockdrop.pyfunc import raw_images

    test = load_dataset(get_preset("R26_DIGITS"), "test")
    images = raw_images(get_preset("R26_DIGITS"), np.stack([test[i][0].numpy() for i in range(64)]))  # 0..255 pixels
    out = model.predict(images)
    assert len(out) == 64 and out["blocks_used"].max() <= K
    assert (out["prediction"].to_numpy() == test.labels[:64].numpy()).mean() > 0.8


@pytest.mark.slow
def test_blockdrops_own_policy_trains_on_request(tmp_path, user_resnet):
    """--policy blocks from the user's ResNet: the paper's per-block policy, curriculum -> finetune (a ResNet
    pretrained with stochastic depth needs no adapt stage), compared with the image-blind policies."""
    proc = train_job(tmp_path, "--policy", "blocks", "--init", str(user_resnet), "--epochs", "12,2",
                     "--num-workers", "1", "--name", "bd", "--no-prune-baseline", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "ray" / "bd" / "checkpoints"
    assert sorted(p.name for p in out.iterdir()) == ["bd-curriculum.pt", "bd-finetune.pt"]
    assert "plan: curriculum -> finetune" in proc.stderr
    assert "At the learned policy's FLOPs" in proc.stdout and "prune and finetune" not in proc.stdout
    client = client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("blockdrop").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("blockdrop.job") == "bd")
    assert parent.data.params["policy"] == "blocks"
    curriculum = next(r for r in runs if r.data.params.get("stage") == "curriculum")
    reward = [v for _, v in history(client, curriculum.info.run_id, "train_reward")]
    assert max(reward[-3:]) > reward[0]  # the policy learns
    assert parent.data.metrics["final_blocks_mean"] < K


@pytest.mark.slow
def test_killed_worker_is_replaced_and_training_resumes_in_the_same_mlflow_run(tmp_path):
    args = [sys.executable, str(REPO / "train_job.py"), "--stage", "pretrain", "--epochs", "6", "--name", "chaos",
            "--num-workers", "2", "--storage-path", str(tmp_path / "ray")]
    proc = subprocess.Popen(args, cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines, killed = [], None
    deadline = time.time() + 600
    for line in proc.stdout:
        lines.append(line)
        if killed is None and "[pretrain] epoch 2/6" in line:
            # this job's own workers (the test run may have another Ray beside it): below the job's process
            pids = [pid for pid in descendants(proc.pid) if b"ray::RayTrainWorker" in command_line(pid)]
            assert pids, "no Ray Train worker process found"
            killed = pids[-1]
            os.kill(killed, signal.SIGKILL)
        assert time.time() < deadline, "job did not finish in time"
    assert proc.wait(timeout=60) == 0, "".join(lines[-60:])
    output = "".join(lines)
    assert killed is not None
    assert "resuming after epoch" in output

    client = client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("blockdrop").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = sorted({s for s, _ in history(client, runs[0].info.run_id, "test_accuracy")})
    assert steps == list(range(6))  # no gap

    # the same job name again resumes: more epochs continue from the stored checkpoint, same run
    again = train_job(tmp_path, "--stage", "pretrain", "--epochs", "7", "--name", "chaos", "--num-workers", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continuing MLflow" in again.stderr and "resuming after epoch 5" in again.stdout + again.stderr
    runs = client.search_runs([client.get_experiment_by_name("blockdrop").experiment_id])
    assert len(runs) == 1
    assert sorted({s for s, _ in history(client, runs[0].info.run_id, "test_accuracy")}) == list(range(7))


@pytest.fixture(scope="module")
def folder_job(tmp_path_factory, mlflow_server):  # noqa: F811
    """A pretrain job on an image folder holding one garbage file among good PNGs, logging to a real
    `mlflow server`: (its folder, the process, the bad file)."""
    from test_evaluate import digit_folder

    root = tmp_path_factory.mktemp("folder-job")
    bad = digit_folder(root / "data", per_class=6, corrupt="train")
    proc = train_job(root, "--stage", "pretrain", "--epochs", "2", "--num-workers", "1", "--dataset", "imagefolder",
                     "--data-dir", str(root / "data"), "--max-bad-images", "0.05", "--name", "remote",
                     "--mlflow-uri", mlflow_server, "--experiment", "server-test", "--no-analysis", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, proc, bad


@pytest.mark.slow
def test_logs_to_a_real_mlflow_server(folder_job, mlflow_server):  # noqa: F811
    root, proc, _ = folder_job
    assert f"{mlflow_server}/#/experiments/" in proc.stdout
    assert not (root / "mlflow.db").exists()
    client = client_for(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("server-test").experiment_id])
    assert len(runs) == 1
    assert [s for s, _ in history(client, runs[0].info.run_id, "test_accuracy")] == [0, 1]
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"checkpoint", "evaluation.txt"} <= artifacts

    import mlflow.pyfunc

    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(f"runs:/{runs[0].info.run_id}/model")
    import numpy as np

    assert len(model.predict(np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8))) == 3


def test_checkpoints_go_where_the_run_storage_is_unless_told(tmp_path):
    from blockdrop.ray_session import output_folder

    assert output_folder(None, str(tmp_path / "shared"), "job1") == tmp_path / "shared" / "job1" / "checkpoints"
    assert output_folder(str(tmp_path / "mine"), str(tmp_path / "shared"), "job1") == tmp_path / "mine"
    assert output_folder(None, None, "job1") == Path("checkpoints")
    assert output_folder(None, "s3://bucket/runs", "job1") == Path("checkpoints")  # no local path to copy to


@pytest.mark.slow
def test_a_corrupt_training_image_is_skipped_and_counted_not_a_restart_loop(folder_job, mlflow_server):  # noqa: F811
    """One garbage file among good PNGs: training goes on (the next image stands in), the warning names
    the file, and the epoch's metrics count it (skipped_images)."""
    _, proc, bad = folder_job
    assert f"unreadable image {bad}" in proc.stdout + proc.stderr
    client = client_for(mlflow_server)
    run = client.search_runs([client.get_experiment_by_name("server-test").experiment_id])[0]
    assert [v for _, v in history(client, run.info.run_id, "skipped_images")] == [1.0, 1.0]
