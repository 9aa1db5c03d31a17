"""The CLIs start light: --help and the errors found in the flags come without torch, Ray or MLflow.

Each command runs in a fresh interpreter that reports which heavy packages it imported (no timing
here: benchmarks/startup.py measures the seconds). The parsers' choices live in the torch-free
blockdrop.choices, shared with the library.
"""
from __future__ import annotations

import json
import pickle
import subprocess
import sys

import pytest

from conftest import REPO, clean_env

HEAVY = ("torch", "torchvision", "ray", "mlflow")

# Runs a script (`path`) or a console script's function (`module:function`) as a user would, then
# prints its exit status, its output and the heavy packages now in sys.modules.
DRIVER = """
import contextlib, importlib, io, json, runpy, sys
target, args, heavy = sys.argv[1], sys.argv[2:], {heavy!r}
out, err = io.StringIO(), io.StringIO()
code = 0
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
        if ":" in target:
            module, function = target.split(":")
            sys.argv = [function, *args]
            getattr(importlib.import_module(module), function)()
        else:
            sys.argv = [target, *args]
            runpy.run_path(target, run_name="__main__")
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
imported = sorted({{name.split(".")[0] for name in sys.modules}} & set(heavy))
print(json.dumps({{"code": code, "out": out.getvalue(), "err": err.getvalue(), "imported": imported}}))
""".format(heavy=HEAVY)


def start(tmp_path, target: str, *args: str) -> dict:
    if ":" not in target:
        target = str(REPO / target)
    proc = subprocess.run([sys.executable, "-c", DRIVER, target, *args], cwd=tmp_path, env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


HELP = [
    ("train_job.py", "usage: train_job.py"),
    ("tune_penalty.py", "usage: tune_penalty.py"),
    ("serve_policy.py", "usage: serve_policy.py"),
    ("blockdrop.cli:train", "usage: train_job.py"),
    ("blockdrop.cli:sweep", "usage: tune_penalty.py"),
    ("blockdrop.cli:serve", "usage: serve"),
    ("blockdrop.cli:quickstart", "usage: python -m blockdrop.quickstart"),
    ("blockdrop.cli:sample_data", "usage:"),
    ("blockdrop.cli:flops", "usage: python -m blockdrop.flops"),
]


@pytest.mark.parametrize("target, usage", HELP)
def test_help_imports_neither_torch_ray_nor_mlflow(tmp_path, target, usage):
    result = start(tmp_path, target, "--help")
    assert result["code"] == 0 and result["out"].startswith(usage), result
    assert result["imported"] == [], f"{target} --help imported {result['imported']}"


@pytest.mark.parametrize("target", ["train_job.py", "tune_penalty.py"])
def test_help_lists_the_presets(tmp_path, target):
    out = " ".join(start(tmp_path, target, "--help")["out"].split())  # argparse wraps lines
    assert "one of: R32_C10, R110_C10, R32_C100, R110_C100, R101_ImgNet, R26_DIGITS (default R26_DIGITS)" in out
    assert "{cifar10,cifar100,imagenet,imagefolder,digits}" in out and "--max-bad-images SHARE" in out


ERRORS = [  # what the CLIs check before any model, data, MLflow or Ray is touched
    ("train_job.py", ["--preset", "R999"], "error: unknown preset 'R999'; choose one of: R32_C10,"),
    ("train_job.py", ["--penalty", "2"], "error: --penalty must be a negative number"),
    ("train_job.py", ["--num-workers", "0"], "error: --num-workers must be at least 1"),
    ("train_job.py", ["--max-bad-images", "2"], "error: --max-bad-images is a share of the dataset in [0, 1)"),
    ("train_job.py", ["--stage", "bogus"], "unknown stage 'bogus'"),
    ("train_job.py", ["--dataset", "mnist"], "argument --dataset: invalid choice: 'mnist'"),
    ("train_job.py", ["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ("tune_penalty.py", ["--init", "x.pt", "--penalties", "-1", "--preset", "R999"], "error: unknown preset 'R999'"),
    ("tune_penalty.py", ["--init", "x.pt", "--penalties", "-1,2"], "error: --penalties must all be negative"),
    ("tune_penalty.py", ["--init", "x.pt"], "error: give a grid of gammas"),
    ("tune_penalty.py", ["--penalties", "-1"], "the following arguments are required: --init"),
    ("serve_policy.py", ["--preset", "R999"], "error: unknown preset 'R999'"),
    ("serve_policy.py", ["--autoscale", "3"], "error: --autoscale wants MIN,MAX"),
    ("serve_policy.py", ["--port", "0"], "error: --port must be 1..65535"),
    ("blockdrop.cli:train", ["--preset", "R999"], "error: unknown preset 'R999'"),
    ("blockdrop.cli:sweep", ["--init", "x.pt", "--penalties=-1,2"], "error: --penalties must all be negative"),
    ("blockdrop.cli:serve", ["--autoscale", "3"], "error: --autoscale wants MIN,MAX"),
    ("blockdrop.cli:sweep", ["--init", "x.pt", "--penalties=-1,-1"], "error: --penalties lists -1 more than once"),
    ("blockdrop.cli:flops", ["--preset", "R999"], "error: unknown preset 'R999'"),
]


@pytest.mark.parametrize("target, args, message", ERRORS, ids=[f"{t} {' '.join(a)}" for t, a, _ in ERRORS])
def test_flag_errors_exit_2_without_torch_ray_or_mlflow(tmp_path, target, args, message):
    result = start(tmp_path, target, *args)
    assert result["code"] == 2 and message in result["err"], result
    assert "Traceback" not in result["err"]
    assert result["imported"] == [], f"{target} {' '.join(args)} imported {result['imported']}"
    assert not any(tmp_path.iterdir()), "a refused command leaves nothing behind"


def test_a_missing_checkpoint_is_still_refused_before_ray_and_mlflow(tmp_path):
    # reading files needs torch; Ray and MLflow still wait until every check has passed
    result = start(tmp_path, "tune_penalty.py", "--init", "missing.pt", "--penalties", "-1")
    assert result["code"] == 2 and "missing.pt does not exist" in result["err"], result
    assert "ray" not in result["imported"] and "mlflow" not in result["imported"]


LIGHT = """
import pickle, sys
from ray import cloudpickle
from blockdrop.tracking import EpochLogger
shipped = cloudpickle.dumps(EpochLogger("sqlite:///mlflow.db", "0" * 32))  # what a stage's controller receives
"""


def imported_by(tmp_path, code: str) -> set[str]:
    """Top-level packages a fresh interpreter has imported after running `code`."""
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_what_every_stages_workers_and_controller_import_stays_light(tmp_path):
    # each stage starts new Ray Train processes: the workers import blockdrop.distributed and load the
    # digits, the controller unpickles the MLflow epoch logger; torchvision (and torch._dynamo with it)
    # and the tracking module's torch are seconds each on a small machine, and none of them is needed there
    worker = imported_by(tmp_path, "import blockdrop.distributed\nfrom blockdrop.data import load_dataset\n"
                                   "from blockdrop.presets import get_preset\n"
                                   "load_dataset(get_preset('R26_DIGITS'), 'train')")
    assert "torch" in worker and not worker & {"torchvision", "mlflow"}, sorted(worker)
    shipped = subprocess.run([sys.executable, "-c", LIGHT + "sys.stdout.buffer.write(shipped)"], cwd=tmp_path,
                             env=clean_env(), capture_output=True, timeout=300)
    assert shipped.returncode == 0, shipped.stderr[-2000:]
    (tmp_path / "logger.pkl").write_bytes(shipped.stdout)
    controller = imported_by(tmp_path, "import pickle\nlogger = pickle.load(open('logger.pkl', 'rb'))\n"
                                       "assert type(logger).__name__ == 'EpochLogger' and logger._client is None")
    assert "mlflow" in controller and not controller & {"torch", "torchvision"}, sorted(controller)


def test_the_parsers_and_the_library_share_one_definition_of_their_choices():
    from blockdrop import baselines, choices, data, execution, reinforce, stages
    from blockdrop.parsers import common, evaluate, train

    assert common.DATASETS is data.DATASETS is choices.DATASETS
    assert train.ENTROPIES is reinforce.ENTROPIES and train.STAGES is stages.STAGES
    assert common.TRAIN_EXECUTIONS is execution.TRAIN_EXECUTIONS
    assert evaluate.BASELINES is baselines.BASELINES and evaluate.RANDOM_SEEDS is baselines.RANDOM_SEEDS
    assert common.add_unreadable_flag is data.add_unreadable_flag and train.check_unreadable_share is data.check_unreadable_share

def test_presets_are_made_once_and_shared_and_their_names_are_the_parsers():
    import blockdrop
    from blockdrop import choices, presets

    assert tuple(presets.PRESETS) == choices.PRESET_NAMES is presets.PRESET_NAMES
    assert all(presets.get_preset(name) is preset for name, preset in presets.PRESETS.items())
    with pytest.raises(blockdrop.UserError, match="unknown preset 'R999'; choose one of: R32_C10, R110_C10"):
        presets.get_preset("R999")


def test_the_sweeps_progress_callback_is_a_tune_callback_that_pickles_by_name():
    from ray import cloudpickle
    from ray.tune import Callback

    from blockdrop import sweep

    progress = sweep.Progress()
    progress.done = 3
    assert isinstance(progress, Callback) and sweep.Progress is type(progress)
    restored = pickle.loads(cloudpickle.dumps(progress))  # Tune keeps a sweep's callbacks in tuner.pkl
    assert type(restored) is sweep.Progress and restored.done == 3


def test_harmless_ray_tracebacks_are_dropped_from_the_console_and_everything_else_is_kept():
    """Ray Train's controller on busy CPUs logs a page-long traceback that says it is safe to ignore; the
    filter drops it whole, across the batches Ray forwards it in, and keeps every other line of that
    process and of others, real errors included."""
    from blockdrop.console import harmless_line_filter

    keep = harmless_line_filter()
    head = ["Failed to send resource request for train-7f2c. If this only happens transiently during network "
            "partition or CPU being overloaded, it's safe to ignore this error.", "Traceback (most recent call last):",
            '  File "ray/train/v2/_internal/execution/scaling_policy/autoscaling_coordinator_client.py", line 58',
            "    ray.get("]
    tail = ['  File "python/ray/_raylet.pyx", line 3471, in ray._raylet.CoreWorker.get_objects',
            "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.",
            "[finetune] epoch 3/15  loss 0.09  test acc 0.983"]
    assert keep(1, ["[finetune] epoch 2/15  loss 0.1"] + head) == ["[finetune] epoch 2/15  loss 0.1"]
    assert keep(2, ["ValueError: a real error"]) == ["ValueError: a real error"]  # another process
    assert keep(1, tail) == ["[finetune] epoch 3/15  loss 0.09  test acc 0.983"]
    real = ["Traceback (most recent call last):", '  File "stages.py", line 3', "RuntimeError: CUDA out of memory"]
    assert keep(1, real) == real  # a traceback without the harmless message stays
    assert keep(1, ["... has constructor arguments in the object store and max_restarts > 0"]) == []
