"""A gamma x lr sweep on Ray Tune whose Pareto front lands in MLflow (`tune_penalty.py`).

Every trial finetunes the same checkpoint (the stage before finetuning) with its own (gamma, lr) as a Ray Train run
of its own (Train V2: a Tune trial launches a TorchTrainer), so a trial can be data-parallel.
MLflow: one parent run per sweep, one child per trial; the front is computed from the children's
final metrics, tagged on them, written to the parent as a plot and a table, and its models are
registered under one name with the aliases `most_accurate` and `fastest`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from blockdrop.errors import UserError
from blockdrop.job import add_cluster_args, add_training_args, check_training_args, check_unreadable_share
from blockdrop.pareto import Point, pareto_front, plot_front

PRUNED = "prune_finetune"  # the curve of prune-and-finetune (blockdrop.analysis.PRUNED; analysis imports torch)
from blockdrop.presets import OTHER_DATA_STAGES, PRESET_NAMES, Preset, check_preset_name, get_preset

# torch, Ray and MLflow are imported where they are used: --help and a bad flag answer without them.

TRIAL_TAG = "blockdrop.trial"


def float_list(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, not {text!r}") from None
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tune_penalty.py",
        description="Sweep the penalty gamma (and the learning rate) of the finetuning stage on Ray Tune, starting\n"
                    "every trial from one checkpoint of the stage before it (depth policy: NAME-depth.pt; BlockDrop's\n"
                    "policy: NAME-curriculum.pt), and put the accuracy-vs-FLOPs Pareto\n"
                    "front into MLflow: a parent run per sweep, a child run per trial, the front's models registered.",
        epilog="Examples:\n"
               "  python tune_penalty.py --init checkpoints/JOB-depth.pt --penalties -5,-20,-100 --epochs 10\n"
               "  python tune_penalty.py --init runs:/<run id>/checkpoint --num-samples 12   # Optuna proposes gammas\n"
               "  python tune_penalty.py ... --name my-sweep --resume                       # after an interruption",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default="R26_DIGITS", help=f"one of: {', '.join(PRESET_NAMES)} (default R26_DIGITS)")
    parser.add_argument("--init", required=True, help="the checkpoint before finetuning (JOB-depth.pt or "
                                                      "JOB-curriculum.pt): a file, or an MLflow artifact URI "
                                                      "(runs:/<id>/checkpoint/<file>)")
    parser.add_argument("--penalties", type=float_list, help="grid of gammas, negative (e.g. -5,-20,-100 for the depth "
                                                                 "policy, -1,-2,-5,-10 for BlockDrop's)")
    parser.add_argument("--lrs", type=float_list, help="grid of learning rates (default: the preset's finetune lr)")
    parser.add_argument("--num-samples", type=int, help="instead of a gamma grid: this many trials whose gammas "
                                                        "Optuna's multi-objective sampler proposes in [--gamma-range]")
    parser.add_argument("--gamma-range", type=float_list, default=[-20.0, -0.5],
                        help="low,high bounds for proposed gammas (default -20,-0.5)")
    parser.add_argument("--policy-lr", type=float, help="the policy network's lr in every trial (default: the preset's)")
    parser.add_argument("--epochs", type=int, help="finetune epochs per trial (default: the preset's; on other data "
                                                   "than the preset's own, a fixed number of steps)")
    parser.add_argument("--no-analysis", action="store_true",
                        help="skip the competitors (the image-blind baselines: curves on --init's ResNet and each "
                             "trial's comparison at equal FLOPs; prune-and-finetune) and the policy pictures")
    parser.add_argument("--no-prune-baseline", action="store_true",
                        help="leave out prune-and-finetune: the user's ResNet finetuned under static policies at the "
                             "block counts that bracket the front's points (a training run each; on the plot and "
                             "in the table, each front point against it with a paired interval)")
    parser.add_argument("--batch-size", type=int, help="global batch size of each trial")
    parser.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers per trial (default 1)")
    parser.add_argument("--max-concurrent", type=int, default=1, help="trials running at once (default 1)")
    parser.add_argument("--experiment", default="blockdrop-sweeps", help="MLflow experiment (default blockdrop-sweeps)")
    parser.add_argument("--name", help="sweep name (default PRESET-sweep-TIMESTAMP); with --resume, the sweep to resume")
    parser.add_argument("--model-name", help="registered model name for the front (default blockdrop-PRESET)")
    add_training_args(parser)
    add_cluster_args(parser)
    parser.add_argument("--resume", action="store_true", help="continue the sweep --name: finished trials are kept")
    return parser


LIST_FLAGS = ("--penalties", "--lrs", "--gamma-range")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """argparse reads `--penalties -1,-2` as two flags; glue such a list to its flag first."""
    argv = list(sys.argv[1:] if argv is None else argv)
    glued = []
    for token in argv:
        if glued and glued[-1] in LIST_FLAGS and token.startswith("-") and token[1:2].isdigit():
            glued[-1] = f"{glued[-1]}={token}"
        else:
            glued.append(token)
    return build_parser().parse_args(glued)


def is_artifact_uri(init: str) -> bool:
    return "://" in init or init.startswith(("runs:/", "models:/"))


def resolve_init(init: str, tracking_uri: str) -> str:
    """A local path for --init; MLflow artifact URIs are downloaded from the sweep's tracking server."""
    if is_artifact_uri(init):
        from blockdrop.tracking import mlflow  # configured quietly before use

        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=init, tracking_uri=tracking_uri))
        except Exception as err:
            raise UserError(f"--init {init}: cannot download it from MLflow ({type(err).__name__}: {err})") from None
        files = sorted(local.glob("*.pt")) if local.is_dir() else [local]
        if len(files) != 1:
            raise UserError(f"--init {init} holds {len(files)} .pt files; name one (runs:/<id>/checkpoint/<file>)")
        return str(files[0])
    return init


def validate(args: argparse.Namespace) -> tuple[Preset, str, int]:
    check_preset_name(args.preset)  # the flags first: the preset itself brings its models in (torch)
    check_training_args(args)
    if args.num_samples is None:
        if not args.penalties:
            raise UserError("give a grid of gammas (--penalties -1,-2,-5) or --num-samples N for a search")
        bad = [g for g in args.penalties if not (g < 0 and math.isfinite(g))]
        if bad:
            raise UserError(f"--penalties must all be negative numbers (the reward of a misclassified image): {bad}")
    elif args.num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, not {args.num_samples}")
    elif args.penalties:
        raise UserError("--num-samples (Optuna proposes gammas in --gamma-range) and --penalties (a grid of gammas) "
                        "exclude each other: give one")
    if (len(args.gamma_range) != 2 or not all(math.isfinite(g) for g in args.gamma_range)
            or not args.gamma_range[0] < args.gamma_range[1] < 0):
        raise UserError(f"--gamma-range takes low,high with low < high < 0, not {args.gamma_range}")
    check_unreadable_share(args.max_bad_images)
    for flag in ("epochs", "batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, not {getattr(args, flag)}")
    if args.lrs is not None and (not args.lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in args.lrs)):
        raise UserError(f"--lrs must be positive numbers, not {args.lrs}")
    for flag in ("workers_per_trial", "max_concurrent"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.resume and not args.name:
        raise UserError("--resume needs --name: the sweep to resume")
    init = args.init
    if is_artifact_uri(init):  # MLflow only for an artifact URI
        from blockdrop.tracking import resolve_uri

        init = resolve_init(init, resolve_uri(args.mlflow_uri))
    if args.policy_lr is not None and not (args.policy_lr > 0 and math.isfinite(args.policy_lr)):
        raise UserError(f"--policy-lr must be positive, not {args.policy_lr}")
    from blockdrop.checkpoints import load_models  # the checks that read files: torch
    from blockdrop.data import load_dataset

    preset = get_preset(args.preset)
    from blockdrop.models.resnet import PolicyNet

    _, policy, _ = load_models(preset, init)
    if not isinstance(policy, PolicyNet):
        raise UserError(f"--init {args.init} holds no policy: a sweep finetunes a curriculum checkpoint")
    train = load_dataset(preset, "train", args.dataset, args.data_dir)
    return preset, init, len(train)


def trial_key(gamma: float, lr: float) -> str:
    return f"gamma={gamma:g},lr={lr:g}"


def run_trial(config: dict) -> None:
    """A Tune trial: one finetune run on Ray Train, tracked as a child of the sweep's MLflow run."""
    import ray
    import torch
    from ray.tune.integration.ray_train import TuneReportCallback

    from blockdrop.checkpoints import read_checkpoint
    from blockdrop.data import load_dataset
    from blockdrop.distributed import StageConfig, analyse_remotely, final_report, run_stage
    from blockdrop.flops import cost_model
    from blockdrop.tracking import Tracker, raw_images

    s = config["sweep"]
    gamma, lr = float(config["gamma"]), float(config["lr"])
    key = trial_key(gamma, lr)
    tracker = Tracker(s["mlflow_uri"], s["experiment"], source=s["source"])
    params = {"preset": s["preset"], "stage": "finetune", "gamma": gamma, "lr": lr, "policy_lr": s["policy_lr"] or lr,
              "epochs": s["epochs"],
              "batch_size": s["batch_size"], "workers": s["workers"], "init": s["init_label"],
              "train_execution": s.get("execution", "sparse")}
    # the run's name says what differs between trials (the sweep's name is the parent's)
    run_id, _ = tracker.job_run(f"{s['name']}/{key}", f"gamma={gamma:g} lr={lr:g}", params, parent_id=s["parent_id"])
    tracker.client.set_tag(run_id, TRIAL_TAG, key)
    preset = get_preset(s["preset"])
    cfg = StageConfig(preset=preset.name, stage="finetune", epochs=s["epochs"], batch_size=s["batch_size"], lr=lr,
                      weight_decay=s.get("weight_decay", 0.0), gamma=gamma, drop_rate=0.0, dataset=s["dataset"], data_dir=s["data_dir"],
                      mlflow_uri=s["mlflow_uri"], mlflow_run_id=run_id, policy_lr=s["policy_lr"],
                      max_bad_images=s["max_bad_images"], execution=s.get("execution", "sparse"),
                      eval_every=s.get("eval_every", 1), reference=s.get("reference"))
    try:
        checkpoint = run_stage(cfg, s["init_ref"], s["workers"], s["gpu"], f"{s['name']}-{key}", s["storage_path"],
                               teacher_ref=s.get("teacher_ref"),
                               max_failures=1, callbacks=[TuneReportCallback()])
        trained = read_checkpoint(checkpoint)
        report = final_report(trained.meta, cost_model(preset).full)
        test = load_dataset(preset, "test", s["dataset"], s["data_dir"])
        final = {"test_accuracy": report.accuracy, "flops_per_image": report.flops_mean, "speedup": report.speedup,
                 "blocks_used": report.blocks_mean, "unique_policies": report.unique_policies}
        final_step = int(trained.meta.get("epoch", 0))  # the logged model takes this step's metrics
        tracker.log_metrics(run_id, {f"final_{k}": v for k, v in final.items()}, step=final_step)
        if s["analysis"]:  # logged to the trial's run: metrics gain_over_static, baseline_*; policy/ pictures
            payload = {"backbone": trained.backbone, "policy": trained.policy}
            analyse_remotely(preset.name, ray.put(payload), s["dataset"], s["data_dir"], s["mlflow_uri"], run_id, s["gpu"])
        example = raw_images(preset, torch.stack([test[i][0] for i in range(2)]).numpy())
        tracker.log_model(run_id, checkpoint, report.text(), example, step=final_step,
                          params={"preset": preset.name, "gamma": gamma, "lr": lr, "policy_lr": s["policy_lr"] or lr})
        tracker.finish(run_id, ok=True)
    except BaseException:
        tracker.finish(run_id, ok=False)
        raise
    ray.tune.report(final)  # the same keys as the per-epoch reports: what the search optimises


class _Progress:
    """One line per finished or failed trial: counts, and the most accurate points so far.
    (The methods of Progress, the Tune Callback that `progress_class` makes.)"""

    def __init__(self):
        self.done, self.failed, self.best = 0, 0, []

    def _line(self, trials, current) -> str:
        running = sum(t.status == "RUNNING" and t is not current for t in trials)
        best = ", ".join(f"{k}: acc {a:.3f} @ {f:.2E}" for k, a, f in sorted(self.best, key=lambda b: -b[1])[:3])
        return (f"[sweep] trials finished {self.done}, running {running}, failed {self.failed}"
                + (f"; best so far {best}" if best else ""))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        result = trial.last_result or {}
        if "test_accuracy" in result:
            key = trial_key(trial.config["gamma"], trial.config["lr"])
            self.best.append((key, result["test_accuracy"], result["flops_per_image"]))
        print(self._line(trials, trial), file=sys.stderr, flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.failed += 1
        print(f"[sweep] trial {trial_key(trial.config['gamma'], trial.config['lr'])} failed", file=sys.stderr)
        print(self._line(trials, trial), file=sys.stderr, flush=True)


def progress_class() -> type:
    """Progress: _Progress as a Tune Callback, made on first use (Ray comes in here, not at import) and
    kept as blockdrop.sweep.Progress, so that it pickles by name (Tune keeps the callbacks of a sweep)."""
    if "Progress" not in globals():
        from ray.tune import Callback

        globals()["Progress"] = type("Progress", (_Progress, Callback),
                                     {"__module__": __name__, "__qualname__": "Progress", "__doc__": _Progress.__doc__})
    return globals()["Progress"]


def __getattr__(name: str):
    if name == "Progress":  # blockdrop.sweep.Progress, as an unpickled sweep state asks for it
        return progress_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def collect_front(tracker, parent_id: str, reference: Point) -> tuple[list[Point], list[Point]]:
    """The finished trials (child runs with final metrics) and their front."""
    children = tracker.client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    points = []
    for run in children:
        m = run.data.metrics
        if run.info.status != "FINISHED" or "final_test_accuracy" not in m:
            continue
        gamma, lr = float(run.data.params["gamma"]), float(run.data.params["lr"])
        info = {"gamma": gamma, "lr": lr, "accuracy": m["final_test_accuracy"], "flops": m["final_flops_per_image"],
                "speedup": m["final_speedup"], "blocks": m["final_blocks_used"],
                "unique_policies": m.get("final_unique_policies"), "run_id": run.info.run_id}
        static = {k: v for k, v in m.items() if k.startswith("baseline_") and k.endswith("_accuracy")}
        if static and "gain_over_static" in m:  # the trial's own comparison, on its own finetuned ResNet
            info |= {"best_static_accuracy": max(static.values()), "gain_over_static": m["gain_over_static"]}
        points.append(Point(m["final_test_accuracy"], m["final_flops_per_image"], f"g={gamma:g}", info))
    return points, pareto_front(points)


def front_gain(front: list[Point]) -> dict[str, float]:
    """The front's accuracy gain over the best image-blind policy at equal FLOPs (each model against
    the baselines on its own finetuned ResNet) and over prune-and-finetune: mean and least over the front."""
    out = {}
    for key in ("gain_over_static", "gain_over_pruning"):
        gains = [p.info[key] for p in front if key in p.info]
        if gains:
            out |= {f"front_{key}": sum(gains) / len(gains), f"front_{key}_min": min(gains)}
    return out


def publish_front(tracker, parent_id: str, points: list[Point], front: list[Point], reference: Point,
                  model_name: str, curves: dict | None = None) -> list[dict]:
    """Tags, plot, table, metrics and registered models of the front; returns the table rows.
    `curves`: the image-blind baselines on --init's ResNet (name -> CurvePoints), drawn and kept."""
    on_front = {p.info["run_id"] for p in front}
    for p in points:
        tracker.client.set_tag(p.info["run_id"], "pareto_optimal", str(p.info["run_id"] in on_front).lower())
    rows = [p.info for p in front]
    gain = front_gain(front)
    # the sweep's result on its own run: how many points, the best of each axis, and the front as a table
    summary = {"trials_finished": len(points), "pareto_points": len(front),
               "best_accuracy": max(p.accuracy for p in points), "lowest_flops_per_image": min(p.flops for p in points),
               "best_speedup": max(p.info["speedup"] for p in points),
               "reference_accuracy": reference.accuracy, "full_model_accuracy": reference.info["init_resnet_accuracy"],
               "full_model_flops_per_image": reference.flops}
    tracker.log_metrics(parent_id, summary | gain, step=0)
    import pandas as pd

    columns = ["gamma", "lr", "accuracy", "flops", "speedup", "blocks", "unique_policies", "gain_over_static",
               "gain_over_pruning", "gain_over_pruning_low", "gain_over_pruning_high", "run_id"]
    tracker.client.log_table(parent_id, pd.DataFrame([{k: r.get(k) for k in columns} for r in sorted(
        rows, key=lambda r: r["flops"])]), "pareto/front_table.json")
    with tempfile.TemporaryDirectory() as folder:
        plot = plot_front(points, front, Path(folder) / "pareto_front.png", reference=reference, curves=curves)
        tracker.client.log_artifact(parent_id, str(plot), "pareto")
        table = Path(folder) / "pareto_front.json"
        baselines = {name: [asdict(c) for c in curve] for name, curve in (curves or {}).items() if name != PRUNED}
        pruned = [asdict(c) for c in (curves or {}).get(PRUNED, [])]
        table.write_text(json.dumps({"reference": reference.info, "front": rows, "trials": [p.info for p in points],
                                     "baselines_on_init": baselines, "prune_finetune": pruned, **gain}, indent=2))
        tracker.client.log_artifact(parent_id, str(table), "pareto")
    register(tracker, front, model_name)
    return rows


def prune_front(preset: Preset, args: argparse.Namespace, tracker, parent_id: str, name: str, storage: str,
                front: list[Point], user: dict, settings: dict, train_size: int, depth: bool, seconds: float):
    """Prune-and-finetune at the block counts that bracket the front's points, each front point against it
    at its FLOPs (a paired interval, logged to the trial's run as gain_over_pruning*): its curve, or None."""
    from blockdrop.baselines import CurvePoint
    from blockdrop.checkpoints import read_checkpoint
    from blockdrop.distributed import versus_pruned_remotely
    from blockdrop.job import PruneRuns, default_plan, output_folder, prune_baseline, resnet_steps

    # as many steps as the trials' models were trained: the stage before the policy (defaults), then a trial
    first = default_plan(preset, args.dataset, train_size, "depth" if depth else "blocks")[0]
    steps = resnet_steps([first, ("finetune", {"epochs": settings["epochs"], "batch_size": settings["batch_size"]})],
                         train_size)
    runs = PruneRuns(name, args.dataset, settings["data_dir"], args.workers_per_trial, args.gpu, storage,
                     output_folder(None, storage, name), tracker, parent_id, {"preset": preset.name},
                     max_bad_images=args.max_bad_images, execution=args.train_execution)
    pruned = prune_baseline(preset, runs, user, [p.flops for p in front], steps, seconds)
    if not pruned:
        return None
    learned = []
    for p in front:
        trained = read_checkpoint(tracker.checkpoint(p.info["run_id"]))
        learned.append((p.info["run_id"], {"backbone": trained.backbone, "policy": trained.policy}))
    result = versus_pruned_remotely(preset.name, learned, pruned, args.dataset, settings["data_dir"], args.gpu)
    for p in front:
        v = result["versus"][p.info["run_id"]]
        gain = {"gain_over_pruning": v["interval"]["difference"], "gain_over_pruning_low": v["interval"]["low"],
                "gain_over_pruning_high": v["interval"]["high"]}
        p.info.update(gain | {"pruned_accuracy": v["accuracy"]})  # Point is frozen, its info a dict
        tracker.log_metrics(p.info["run_id"], gain | {"baseline_prune_finetune_accuracy": v["accuracy"]}, step=0)
    return [CurvePoint(**c) for c in result["curve"]]


def recommend(front: list[Point], name: str) -> str:
    """What wins on this data, said plainly: the per-image policy or pruning."""
    verdicts = [("better" if p.info["gain_over_pruning_low"] > 0 else "worse" if p.info["gain_over_pruning_high"] < 0
                 else "tie") for p in front if "gain_over_pruning" in p.info]
    if all(v == "better" for v in verdicts):
        return "verdict: the per-image policy beats pruning at every point of the front: serve the front's models."
    if any(v == "worse" for v in verdicts):
        return ("verdict: at some points pruning is more accurate at the same FLOPs: there, serve the pruned ResNet "
                f"(its checkpoints are {name}-prune-K*.pt; serve_policy.py serves them).")
    return ("verdict: no point of the front is beaten by pruning, and not every point beats it: on this data a "
            f"per-image policy and pruning are worth the same; the pruned ResNet ({name}-prune-K*.pt) is the "
            "simpler model to serve where the two tie.")


def close_stopped_trials(tracker, parent_id: str) -> None:
    """Trial runs left RUNNING by a stopped sweep (their process was ended before it could say so): KILLED."""
    for run in tracker.client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'"):
        if run.info.status == "RUNNING":
            tracker.client.set_terminated(run.info.run_id, "KILLED")


def save_view(tracker, parent_id: str, name: str) -> str:
    """The experiment's saved view of this sweep (a scatter of its trials); where to open it."""
    from blockdrop.mlflow_views import save_sweep_view, view_location

    children = tracker.client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    metrics = sorted({key for run in children for key in run.data.metrics})
    key = save_sweep_view(tracker.client, tracker.experiment_id, parent_id, name, metrics)
    return view_location(tracker.uri, tracker.experiment_id, key)


def register(tracker, front: list[Point], model_name: str) -> None:
    import mlflow

    client = tracker.client
    try:
        client.get_registered_model(model_name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(model_name, description="BlockDrop models on the accuracy-vs-FLOPs front")
    versions = {}
    by_flops = sorted(front, key=lambda p: p.flops)
    most_accurate = max(front, key=lambda p: p.accuracy) if front else None
    for p in front:
        run = client.get_run(p.info["run_id"])
        model = next((m for m in (run.outputs.model_outputs or [])), None)
        source = f"models:/{model.model_id}" if model is not None else f"runs:/{run.info.run_id}/model"
        i = by_flops.index(p)
        role = " (fastest)" if i == 0 else ""
        role += " (most accurate)" if p is most_accurate else ""
        description = (f"Pareto point {i + 1} of {len(front)} by FLOPs{role}: accuracy {p.accuracy:.4f} at "
                       f"{p.flops:.3E} FLOPs/img ({p.info['speedup']:.2f}x fewer than the full model), "
                       f"{p.info['blocks']:.2f} blocks per image; finetuned with gamma {p.info['gamma']:g}, "
                       f"lr {p.info['lr']:g}.")
        tags = {"gamma": p.info["gamma"], "lr": p.info["lr"], "preset": run.data.params.get("preset", ""),
                "accuracy": p.accuracy, "flops_per_image": p.flops, "speedup": p.info["speedup"],
                "blocks_used": p.info["blocks"], "front_position": f"{i + 1}/{len(front)}"}
        # model_id: a tracking server refuses a models:/ source without it (a local store does not)
        mv = client.create_model_version(model_name, source=source, run_id=run.info.run_id,
                                         model_id=model.model_id if model is not None else None,
                                         tags={k: str(v) for k, v in tags.items()}, description=description)
        versions[p.info["run_id"]] = mv.version
    if front:
        client.set_registered_model_alias(model_name, "most_accurate", versions[max(front, key=lambda p: p.accuracy).info["run_id"]])
        client.set_registered_model_alias(model_name, "fastest", versions[min(front, key=lambda p: p.flops).info["run_id"]])


def run(args: argparse.Namespace) -> None:
    import time

    from blockdrop.job import start_ray, storage_location
    from blockdrop.preflight import check_cluster_flags

    preset, init, train_size = validate(args)  # before the imports of Ray and MLflow: a bad flag answers at once
    from blockdrop.tracking import Tracker, resolve_uri

    name = args.name or f"{preset.name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    uri = resolve_uri(args.mlflow_uri)
    check_cluster_flags(args, uri)  # MLflow, run storage and Ray answer, before anything starts
    import ray
    import torch
    from ray import tune

    from blockdrop.checkpoints import load_models, read_checkpoint
    from blockdrop.data import load_dataset
    from blockdrop.evaluate import evaluate, make_loader
    from blockdrop.flops import cost_model

    began = time.time()
    storage = storage_location(args.storage_path) or str(Path.home() / "ray_results")
    path = f"{storage.rstrip('/')}/{name}"
    tracker = Tracker(uri, args.experiment)
    done = tracker.finished_job(name)
    if done is not None:  # a second publication would register the front's models again
        raise UserError(f"sweep {name} has finished already (MLflow run {done}); give another --name for a new sweep")
    if args.resume and not tune.Tuner.can_restore(path) and not tracker.job_exists(name):
        raise UserError(f"--resume --name {name}: no such sweep (no Tune state at {path}, no MLflow run in "
                        f"experiment {args.experiment!r}); drop --resume to start it")
    own = (args.dataset or preset.dataset) == preset.dataset
    depth = "rank" in (read_checkpoint(init).policy or {})  # a depth policy's checkpoint: its own finetune
    key = "finetune_depth" if depth else "finetune"
    defaults = preset.stages[key] if own else OTHER_DATA_STAGES[key]
    batch = args.batch_size or defaults.batch_size
    epochs = args.epochs or (defaults.epochs if own else math.ceil(defaults.steps / max(train_size // batch, 1)))
    lrs = args.lrs or [defaults.lr]
    policy_lr = args.policy_lr or defaults.policy_lr
    start_ray(args.address, args.gpu, args.workers_per_trial, args.storage_path)
    search = "grid" if args.num_samples is None else "optuna"
    parent_id, resumed = tracker.job_run(name, name, {
        "preset": preset.name, "init": args.init, "search": search, "epochs": epochs, "batch_size": batch,
        "policy_lr": policy_lr or "lr",
        "workers_per_trial": args.workers_per_trial, "penalties": ",".join(map(str, args.penalties or [])),
        "lrs": ",".join(map(str, lrs))})
    print(f"{'continuing' if resumed else 'started'} sweep {name}: MLflow {tracker.run_url(parent_id)}", file=sys.stderr)

    try:  # whatever stops the sweep (an error, Ctrl-C), its parent run does not stay RUNNING
        backbone, policy, ckpt = load_models(preset, init)
        test = load_dataset(preset, "test", args.dataset, args.data_dir)
        full = evaluate(backbone, None, make_loader(test, 256, 0), cost_model(preset), torch.device("cpu"), progress=False)
        # the user's ResNet (the job that made --init measured it); without that record, --init's own ResNet
        user = ckpt.meta.get("reference") or {"accuracy": full.accuracy, "source": f"--init {Path(args.init).name}"}
        reference = Point(user["accuracy"], full.full_flops, f"your ResNet ({user['source']})",
                          user | {"flops": full.full_flops, "speedup": 1.0, "init_resnet_accuracy": full.accuracy})
        init_ref = ray.put({"backbone": backbone.state_dict(), "policy": policy.state_dict()})
        teacher_ref = None  # the depth policy's finetune learns from the user's ResNet's soft labels
        if depth:
            from blockdrop.job import teacher_payload

            teacher_ref = teacher_payload(preset, user)
        settings = {"preset": preset.name, "name": name, "epochs": epochs, "batch_size": batch, "policy_lr": policy_lr,
                    "analysis": not args.no_analysis,
                    "workers": args.workers_per_trial, "gpu": args.gpu, "dataset": args.dataset,
                    "data_dir": str(Path(args.data_dir).resolve()) if args.data_dir else None, "mlflow_uri": uri,
                    "experiment": args.experiment, "parent_id": parent_id, "init_ref": init_ref,
                    "init_label": args.init, "storage_path": storage, "source": tracker.source,
                    "max_bad_images": args.max_bad_images, "execution": args.train_execution,
                    "eval_every": args.eval_every, "reference": user, "teacher_ref": teacher_ref,
                    "weight_decay": defaults.weight_decay}
        # The trial itself only waits on its Train run: it asks for a little memory, no CPU, so the CPUs
        # stay for the Train workers (a trial holding a CPU would deadlock a 2-CPU machine at 2 workers).
        trainable = tune.with_resources(tune.with_parameters(run_trial_with, sweep=settings),
                                        {"cpu": 0, "memory": 256 * 1024 ** 2})
        if args.resume and tune.Tuner.can_restore(path):
            tuner = tune.Tuner.restore(path, trainable, resume_errored=True)
        else:
            if args.resume:
                print(f"note: no Tune state at {path}; starting the sweep", file=sys.stderr)
            if search == "grid":
                space = {"gamma": tune.grid_search(args.penalties), "lr": tune.grid_search(lrs)}
                tune_config = tune.TuneConfig(max_concurrent_trials=args.max_concurrent)
            else:
                import optuna
                from ray.tune.search.optuna import OptunaSearch

                optuna.logging.set_verbosity(optuna.logging.WARNING)
                space = {"gamma": tune.uniform(*args.gamma_range), "lr": tune.choice(lrs)}
                searcher = OptunaSearch(metric=["test_accuracy", "flops_per_image"], mode=["max", "min"],
                                        sampler=optuna.samplers.NSGAIISampler(seed=0))
                tune_config = tune.TuneConfig(search_alg=searcher, num_samples=args.num_samples,
                                              max_concurrent_trials=args.max_concurrent)
            tuner = tune.Tuner(trainable, param_space=space, tune_config=tune_config, run_config=tune.RunConfig(
                name=name, storage_path=storage, verbose=0, callbacks=[progress_class()()],
                failure_config=tune.FailureConfig(max_failures=0)))
        curves_ref = None
        if not args.no_analysis:  # on a Ray worker while the trials run
            from blockdrop.distributed import curves_remotely

            curves_ref = curves_remotely(preset.name, init_ref, args.dataset, settings["data_dir"], args.gpu)
        results = tuner.fit()
        failed = sum(r.error is not None for r in results)
        unfinished = len(results) - results.num_terminated - results.num_errors
        if unfinished:  # Ctrl-C: Tune stops its trials and returns; the front would be a partial one
            raise UserError(f"sweep {name} stopped with {unfinished} trial(s) unfinished; continue it with "
                            f"--resume --name {name}")
        curves = None
        if curves_ref is not None:
            from blockdrop.baselines import CurvePoint

            curves = {name: [CurvePoint(**p) for p in curve] for name, curve in ray.get(curves_ref).items()}

        points, front = collect_front(tracker, parent_id, reference)
        if not points and not failed:  # stopped (Ctrl-C) before a trial reported: Tune counts it neither way
            raise UserError(f"sweep {name} stopped before any trial finished; continue it with --resume --name {name}")
        if not points:
            raise UserError(f"no trial of sweep {name} finished ({failed} failed); see the errors above")
        if not args.no_analysis and not args.no_prune_baseline:
            pruned = prune_front(preset, args, tracker, parent_id, name, storage, front, user, settings,
                                 train_size, depth, time.time() - began)
            if pruned:
                curves = (curves or {}) | {"prune_finetune": pruned}
        model_name = args.model_name or f"blockdrop-{preset.name}"
        rows = publish_front(tracker, parent_id, points, front, reference, model_name, curves)
        view = save_view(tracker, parent_id, name)
        tracker.finish(parent_id, ok=True)
    except BaseException:
        close_stopped_trials(tracker, parent_id)
        tracker.finish(parent_id, ok=False)
        raise
    print(f"\n{name}: {len(points)} trials finished, {failed} failed; Pareto front "
          f"(the reference, {reference.label}: accuracy {reference.accuracy:.3f}, FLOPs {reference.flops:.2E}; "
          f"--init's ResNet, all blocks: {reference.info['init_resnet_accuracy']:.3f}):")
    print(f"{'gamma':>8} {'lr':>8} {'accuracy':>9} {'FLOPs/img':>10} {'speedup':>8} {'blocks':>7} {'policies':>8} "
          f"{'vs static':>9} {'vs prune and finetune':>27}  run")
    for r in rows:
        gain = f"{100 * r['gain_over_static']:+8.2f}p" if "gain_over_static" in r else f"{'-':>9}"
        pruned = (f"{100 * r['gain_over_pruning']:+.2f} [{100 * r['gain_over_pruning_low']:+.2f}, "
                  f"{100 * r['gain_over_pruning_high']:+.2f}]" if "gain_over_pruning" in r else "-")
        print(f"{r['gamma']:>8g} {r['lr']:>8g} {r['accuracy']:>9.3f} {r['flops']:>10.2E} {r['speedup']:>7.2f}x "
              f"{r['blocks']:>7.2f} {r['unique_policies'] or 0:>8.0f} {gain} {pruned:>27}  {r['run_id']}")
    gain = front_gain(front)
    if "front_gain_over_static" in gain:
        print(f"vs static: accuracy minus the best image-blind policy's at the same FLOPs, on the model's own ResNet "
              f"(front mean {100 * gain['front_gain_over_static']:+.2f} points)")
    if "front_gain_over_pruning" in gain:
        print(f"vs prune and finetune: accuracy minus your ResNet's pruned to the same FLOPs and finetuned as long, "
              f"per image, 95% interval (front mean {100 * gain['front_gain_over_pruning']:+.2f} points)")
        print(recommend(front, name))
    print(f"\nregistered as {model_name} (aliases most_accurate, fastest): models:/{model_name}@most_accurate")
    print(f"MLflow: {tracker.run_url(parent_id)}")
    print(f"the front in MLflow's UI (accuracy vs FLOPs, a point per trial): {view}")


def run_trial_with(config: dict, sweep: dict) -> None:
    run_trial({**config, "sweep": sweep})
