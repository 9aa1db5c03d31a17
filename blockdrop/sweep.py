"""tune_penalty.py's work: a gamma x lr sweep on Ray Tune whose Pareto front lands in MLflow.

Every trial finetunes the same checkpoint (the stage before finetuning) with its own (gamma, lr) as a Ray
Train run of its own (Train V2: a Tune trial launches a TorchTrainer), so a trial can be data-parallel.
MLflow: one parent run per sweep, one child per trial; the front is computed from the children's
final metrics, tagged on them, written to the parent as a plot and a table, and its models are
registered under one name with the aliases `most_accurate` and `fastest`. The sweep was planned before
(blockdrop.plans.plan_sweep: flags, --init, data); here the cluster comes in.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna
import pandas as pd
import ray
import torch
from ray import tune
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.search.optuna import OptunaSearch
from torch.utils.data import DataLoader

from blockdrop.analysis import GAINS, LABELS
from blockdrop.baselines import CurvePoint
from blockdrop.checkpoints import read_checkpoint
from blockdrop.choices import CHANNELS, DEFAULT_BUDGET_SAMPLING, PRUNED, default_budget
from blockdrop.competitors import PruneRuns, Trained, train_competitors
from blockdrop.data import load_dataset
from blockdrop.distributed import MODEL_FILE, Payloads, analyse_remotely, curves_remotely, run_stage, versus_pruned_remotely
from blockdrop.errors import UserError
from blockdrop.metrics import evaluate, final_report
from blockdrop.flops import cost_model
from blockdrop.pareto import Point, pareto_front, plot_front
from blockdrop.parsers.sweep import trial_key
from blockdrop.plans import SweepPlan, default_plan
from blockdrop.preflight import resolve_uri
from blockdrop.presets import get_preset
from blockdrop.pyfunc import input_example
from blockdrop.ray_session import output_folder, start_ray, storage_location
from blockdrop.stages import StageConfig
from blockdrop.tracking import Tracker, budget_points, point_metrics

TRIAL_TAG = "blockdrop.trial"


@dataclass
class SweepSettings:
    """What every trial of a sweep shares, shipped to the trials by Tune."""

    preset: str
    name: str
    epochs: int
    batch_size: int
    policy_lr: float | None
    weight_decay: float
    analysis: bool
    workers: int
    gpu: bool
    dataset: str | None
    data_dir: str | None
    mlflow_uri: str
    experiment: str
    parent_id: str
    source: str  # the CLI that started the sweep (MLflow's source tag)
    init_ref: object  # --init's models in Ray's object store
    init_label: str
    storage_path: str
    max_bad_images: float
    execution: str
    eval_every: int
    reference: dict  # the user's ResNet
    init_gamma: float = -1.0  # --init's policy's gamma: a budget model's, which budgets replace
    teacher_ref: object = None  # its models, whose soft labels the depth policy's finetune learns from
    budget_sampling: str = DEFAULT_BUDGET_SAMPLING  # how a budget trial's finetune draws them (--budget-sampling)


def trial_of(config: dict) -> dict:
    """A trial's settings from Tune's config: {"gamma", "budget_range", "lr"} (a grid's config nests the first
    two under "trial"; Optuna's and older sweeps' name a gamma)."""
    return {"gamma": None, "budget_range": None} | config.get("trial", {}) | {
        k: v for k, v in config.items() if k != "trial"}


def run_trial(config: dict, sweep: SweepSettings) -> None:
    """A Tune trial: one finetune run on Ray Train, tracked as a child of the sweep's MLflow run: at a gamma,
    or a budget model (its ResNet finetuned under mean budgets drawn from a range; its curve on the run)."""
    s, trial = sweep, trial_of(config)
    lr, budgets = float(trial["lr"]), trial["budget_range"]
    gamma = s.init_gamma if budgets is not None else float(trial["gamma"])
    key = trial_key(trial)
    tracker = Tracker(s.mlflow_uri, s.experiment, source=s.source)
    what = ({"budget_range": ",".join(f"{b:g}" for b in budgets), "policy": "budget",
             "budget_sampling": s.budget_sampling} if budgets is not None
            else {"gamma": gamma})
    params = {"preset": s.preset, "stage": "finetune"} | what | {
        "lr": lr, "policy_lr": s.policy_lr or lr, "epochs": s.epochs, "batch_size": s.batch_size, "workers": s.workers,
        "init": s.init_label, "train_execution": s.execution}
    # the run's name says what differs between trials (the sweep's name is the parent's)
    title = (f"budgets {budgets[0]:g}-{budgets[1]:g} lr={lr:g}" if budgets is not None else f"gamma={gamma:g} lr={lr:g}")
    run_id, _ = tracker.job_run(f"{s.name}/{key}", title, params, parent_id=s.parent_id)
    tracker.set_tag(run_id, TRIAL_TAG, key)
    cfg = StageConfig(preset=s.preset, stage="finetune", epochs=s.epochs, batch_size=s.batch_size, lr=lr,
                      weight_decay=s.weight_decay, gamma=gamma, drop_rate=0.0, dataset=s.dataset, data_dir=s.data_dir,
                      policy_lr=s.policy_lr, max_bad_images=s.max_bad_images, execution=s.execution,
                      eval_every=s.eval_every, reference=s.reference, budget_range=budgets,
                      budget=None if budgets is None else default_budget(*budgets), budget_sampling=s.budget_sampling)
    try:
        with tempfile.TemporaryDirectory(prefix="blockdrop-trial-") as local:  # the model, until MLflow holds it
            checkpoint = run_stage(cfg, s.init_ref, s.workers, s.gpu, f"{s.name}-{key}", s.storage_path, 1,
                                   Path(local) / MODEL_FILE, callbacks=[tracker.epoch_logger(run_id), TuneReportCallback()],
                                   teacher_ref=s.teacher_ref, identity={"init": s.init_label})
            trained = read_checkpoint(checkpoint)
            preset = get_preset(s.preset)
            if s.analysis:  # onto the trial's run: metrics gain_over_static, baseline_*; policy/ pictures
                comparison, files = analyse_remotely(preset.name, ray.put({"backbone": trained.backbone,
                                                                           "policy": trained.policy}),
                                                     s.dataset, s.data_dir, s.gpu)
                tracker.log_files(run_id, files, "policy")
                tracker.log_metrics(run_id, comparison.metrics(), step=0)
            test = load_dataset(preset, "test", s.dataset, s.data_dir)
            report, _ = tracker.publish(run_id, checkpoint, trained, preset, input_example(preset, test),
                                        {"preset": preset.name, "lr": lr, "policy_lr": s.policy_lr or lr} | what,
                                        final=lambda r: {f"final_{k}": v for k, v in trial_result(r).items()})
            tracker.finish(run_id, ok=True)
    except BaseException:
        tracker.finish(run_id, ok=False)
        raise
    tune.report(trial_result(report))


def trial_result(report) -> dict[str, float]:
    """A trial's result, what the search optimises: the same keys as the per-epoch reports (its run
    keeps them as final_*)."""
    return {key.removeprefix("final_"): value for key, value in point_metrics(report).items()}


class Progress(Callback):
    """One line per finished or failed trial: counts, and the most accurate points so far (on the
    validation split: what the front is chosen on)."""

    def __init__(self):
        self.done, self.failed, self.best = 0, 0, []

    def _line(self, trials, current) -> str:
        running = sum(t.status == "RUNNING" and t is not current for t in trials)
        best = ", ".join(f"{k}: val acc {a:.3f} @ {f:.2E}" for k, a, f in sorted(self.best, key=lambda b: -b[1])[:3])
        return (f"[sweep] trials finished {self.done}, running {running}, failed {self.failed}"
                + (f"; best so far {best}" if best else ""))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        result = trial.last_result or {}
        if result.get("val_accuracy") is not None:
            key = trial_key(trial_of(trial.config))
            self.best.append((key, result["val_accuracy"], result["val_flops_per_image"]))
        print(self._line(trials, trial), file=sys.stderr, flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.failed += 1
        print(f"[sweep] trial {trial_key(trial_of(trial.config))} failed", file=sys.stderr)
        print(self._line(trials, trial), file=sys.stderr, flush=True)


def validation(point: Point) -> Point:
    """A trained point's figures on the validation split: what its place on the front is judged on (its own
    accuracy and FLOPs are the test set's, what the table and the plot show)."""
    return Point(point.info["val_accuracy"], point.info["val_flops"], point.label)


def collect_front(tracker: Tracker, parent_id: str, reference: Point) -> tuple[list[Point], list[Point]]:
    """The finished trials' points (child runs with final metrics; a budget model's run: a point per budget
    of its curve) and their front, chosen on the validation split: the test images only measure."""
    points, unchosen = [], 0
    for run in tracker.children(parent_id):
        m, params = run.data.metrics, run.data.params
        if run.info.status != "FINISHED" or "final_test_accuracy" not in m or "competitor" in params:
            continue  # unfinished, or a competitor's run (points of their own: prune_front)
        found = budget_trial_points(run) if "budget_range" in params else [gamma_trial_point(run)]
        chosen = [p for p in found if p.info.get("val_accuracy") is not None]
        unchosen += len(found) - len(chosen)
        points += chosen
    if unchosen:
        print(f"note: {unchosen} point(s) of trials without validation figures (trained before the validation "
              "split) are left off the front: a front is chosen on validation, never on the test images",
              file=sys.stderr)
    return points, pareto_front(points, by=validation)


def gamma_trial_point(run) -> Point:
    """A per-gamma trial's model, one point."""
    m = run.data.metrics
    gamma, lr = float(run.data.params["gamma"]), float(run.data.params["lr"])
    info = {"gamma": gamma, "lr": lr, "accuracy": m["final_test_accuracy"], "flops": m["final_flops_per_image"],
            "speedup": m["final_speedup"], "blocks": m["final_blocks_used"],
            "unique_policies": m.get("final_unique_policies"), "run_id": run.info.run_id, "key": run.info.run_id,
            "val_accuracy": m.get("final_val_accuracy"), "val_flops": m.get("final_val_flops_per_image")}
    static = {k: v for k, v in m.items() if k.startswith("baseline_") and k.endswith("_accuracy")}
    if static and "gain_over_static" in m:  # the trial's own comparison, on its own finetuned ResNet
        info |= {"best_static_accuracy": max(static.values()), "gain_over_static": m["gain_over_static"]}
    return Point(m["final_test_accuracy"], m["final_flops_per_image"], f"g={gamma:g}", info)


def budget_trial_points(run) -> list[Point]:
    """A budget model's curve (its run's budget_B_* metrics: blockdrop.distributed.Worker.curve), a point per
    budget; the full model's FLOPs per image from its final speedup."""
    m = run.data.metrics
    full = m["final_flops_per_image"] * m["final_speedup"]
    low, high = (float(v) for v in run.data.params["budget_range"].split(","))
    points = []
    for c in budget_points(m):
        if "test_accuracy" not in c:
            continue
        info = {"budget_range": f"{low:g}-{high:g}", "budget": c["budget"], "lr": float(run.data.params["lr"]),
                "accuracy": c["test_accuracy"], "flops": c["flops_per_image"], "speedup": full / c["flops_per_image"],
                "blocks": c["blocks_used"], "spent": c.get("spent"), "unique_policies": None,
                "run_id": run.info.run_id, "key": f"{run.info.run_id}@{c['budget']:.2f}",
                "val_accuracy": c.get("val_accuracy"), "val_flops": c.get("val_flops_per_image")}
        points.append(Point(c["test_accuracy"], c["flops_per_image"], f"b={c['budget']:.2f}", info))
    return points


def front_gain(front: list[Point]) -> dict[str, float]:
    """The front's learned models' accuracy gain over the best image-blind policy at equal FLOPs (each model
    against the baselines on its own finetuned ResNet), over prune-and-finetune and over channel pruning: mean and
    least over the front."""
    out = {}
    for key in ("gain_over_static", GAINS[PRUNED], GAINS[CHANNELS]):
        gains = [p.info[key] for p in front if key in p.info]
        if gains:
            out |= {f"front_{key}": sum(gains) / len(gains), f"front_{key}_min": min(gains)}
    return out


def publish_front(tracker: Tracker, parent_id: str, points: list[Point], front: list[Point], reference: Point,
                  model_name: str, preset: str, curves: dict | None = None) -> list[dict]:
    """Tags, plot, table, metrics and registered models of the front; returns the table rows.
    `curves`: the image-blind baselines on --init's ResNet (name -> CurvePoints), drawn and kept."""
    on_front = {p.info["run_id"] for p in front}
    for run_id in {p.info["run_id"] for p in points}:  # a budget model's run: on it when one of its points is
        tracker.set_tag(run_id, "pareto_optimal", str(run_id in on_front).lower())
    rows = [p.info for p in front]
    gain = front_gain(front)
    # the sweep's result on its own run: how many points, the best of each axis, and the front as a table
    learned = [p for p in points if "method" not in p.info]
    summary = {"trials_finished": len({p.info["run_id"] for p in learned}), "points": len(points),
               "competitors": len(points) - len(learned),
               "pareto_competitors": sum("method" in p.info for p in front),
               "pareto_points": len(front),
               "best_accuracy": max(p.accuracy for p in points), "lowest_flops_per_image": min(p.flops for p in points),
               "best_speedup": max(p.info["speedup"] for p in points),
               "reference_accuracy": reference.accuracy, "full_model_accuracy": reference.info["init_resnet_accuracy"],
               "full_model_flops_per_image": reference.flops}
    tracker.log_metrics(parent_id, summary | gain, step=0)
    columns = ["method", "gamma", "budget_range", "budget", "keep", "lr", "accuracy", "flops", "speedup", "blocks",
               "unique_policies", "val_accuracy", "val_flops", "gain_over_static", "gain_over_pruning",
               "gain_over_pruning_low", "gain_over_pruning_high", "gain_over_channel_pruning",
               "gain_over_channel_pruning_low", "gain_over_channel_pruning_high", "run_id"]
    tracker.log_table(parent_id, pd.DataFrame([{k: r.get(k) for k in columns} | {"method": method(r)} for r in sorted(
        rows, key=lambda r: r["flops"])]), "pareto/front_table.json")
    with tempfile.TemporaryDirectory() as folder:
        plot = plot_front(learned, front, Path(folder) / "pareto_front.png", reference=reference, curves=curves,
                          lines=budget_lines(points))
        tracker.log_artifact(parent_id, plot, "pareto")
        table = Path(folder) / "pareto_front.json"
        baselines = {name: [asdict(c) for c in curve] for name, curve in (curves or {}).items() if name != PRUNED}
        baselines = {name: curve for name, curve in baselines.items() if name != CHANNELS}
        trained = {name: [asdict(c) for c in (curves or {}).get(name, [])] for name in (PRUNED, CHANNELS)}
        table.write_text(json.dumps({"reference": reference.info, "front": rows, "trials": [p.info for p in points],
                                     "baselines_on_init": baselines, **trained, **gain}, indent=2))
        tracker.log_artifact(parent_id, table, "pareto")
    register(tracker, front, model_name, preset)
    return rows


def budget_lines(points: list[Point]) -> dict[str, list[Point]]:
    """Each budget model's curve, to draw as a line: {label: its points}."""
    lines: dict[str, list[Point]] = {}
    for p in points:
        if "budget" in p.info:
            lines.setdefault(f"budget model {p.info['budget_range']}, lr {p.info['lr']:g}", []).append(p)
    return lines


def method(info: dict) -> str:
    """What made a point of the sweep: a per-gamma trial, a budget model, or a competitor."""
    if "method" in info:
        return LABELS[info["method"]]
    return "budget model" if "budget" in info else "learned policy"


def recommend(front: list[Point], name: str) -> str:
    """What wins on this data, said plainly: the per-image policy or pruning (of blocks or of channels)."""
    learned = [p for p in front if "method" not in p.info]
    if not learned:
        kinds = sorted({LABELS[p.info["method"]] for p in front})
        return (f"verdict: pruning wins on this data: every point of the front chosen on validation is a pruned "
                f"ResNet ({', '.join(kinds)}), no per-image policy: serve those ({name}-prune-K*.pt, "
                f"{name}-channels-*.pt; registered with the front).")
    verdicts = []
    for p in learned:
        for key in (GAINS[PRUNED], GAINS[CHANNELS]):
            if key in p.info:
                verdicts.append("better" if p.info[f"{key}_low"] > 0 else "worse" if p.info[f"{key}_high"] < 0
                                else "tie")
    beaten = len(learned) < len(front)
    if verdicts and all(v == "better" for v in verdicts) and not beaten:
        return ("verdict: the per-image policy beats both kinds of pruning at every point of the front: serve the "
                "front's models.")
    if any(v == "worse" for v in verdicts) or beaten:
        return ("verdict: at some FLOPs a pruned ResNet is more accurate: there, serve it (the front holds it where "
                f"it won on validation; checkpoints {name}-prune-K*.pt and {name}-channels-*.pt; serve_policy.py "
                "serves them).")
    return ("verdict: no point of the front is beaten by pruning, and not every point beats it: on this data a "
            f"per-image policy and pruning are worth the same; the pruned ResNet ({name}-prune-K*.pt, "
            f"{name}-channels-*.pt) is the simpler model to serve where the two tie.")


def register(tracker: Tracker, front: list[Point], model_name: str, preset: str) -> None:
    """Every model on the front a version of `model_name`, described (a budget model once, for all its points
    on the front: one model serves its curve); the aliases most_accurate and fastest, and `budget` for the
    budget model with the most points on the front."""
    by_flops = sorted(front, key=lambda p: p.flops)
    most_accurate = max(front, key=lambda p: p.accuracy)
    models: dict[str, list[Point]] = {}
    for p in by_flops:
        models.setdefault(p.info["run_id"], []).append(p)
    versions = {}
    for i, (run_id, owned) in enumerate(models.items()):
        positions = [by_flops.index(p) + 1 for p in owned]
        role = " (fastest)" if by_flops[0] in owned else ""
        role += " (most accurate)" if most_accurate in owned else ""
        first, best = owned[0], max(owned, key=lambda p: p.accuracy)
        tags = {"preset": preset, "lr": first.info["lr"], "accuracy": best.accuracy, "flops_per_image": best.flops,
                "speedup": best.info["speedup"], "blocks_used": best.info["blocks"],
                "front_position": ",".join(f"{k}/{len(front)}" for k in positions)}
        if "method" in first.info:  # a competitor that made the front
            what = (f"{first.info['keep']} blocks kept" if first.info["method"] == PRUNED
                    else f"each block's channels pruned (criterion {first.info.get('criterion')}, chosen on validation)")
            description = (f"Pareto point {positions[0]} of {len(front)} by FLOPs{role}: {LABELS[first.info['method']]} "
                           f"of your ResNet, {what}, finetuned as long as the policies: accuracy {first.accuracy:.4f} "
                           f"at {first.flops:.3E} FLOPs/img ({first.info['speedup']:.2f}x fewer than the full model); "
                           "a static model: every image runs the same network.")
            tags |= {"method": first.info["method"], "keep": first.info["keep"]}
            tags.pop("lr")
        elif "budget" in first.info:
            points = "; ".join(f"budget {p.info['budget']:.2f}: {p.accuracy:.4f} at {p.flops:.3E}" for p in owned)
            description = (f"Budget model{role}: one model for every budget, its ResNet finetuned under mean budgets "
                           f"drawn from {first.info['budget_range']} of the full model's FLOPs (lr {first.info['lr']:g}); "
                           f"{len(owned)} of the front's {len(front)} points: {points}. Serve it with a budget per "
                           "request (mean_flops, max_flops).")
            tags |= {"policy": "budget", "budget_range": first.info["budget_range"], "front_points": len(owned)}
        else:
            description = (f"Pareto point {positions[0]} of {len(front)} by FLOPs{role}: accuracy {first.accuracy:.4f} "
                           f"at {first.flops:.3E} FLOPs/img ({first.info['speedup']:.2f}x fewer than the full model), "
                           f"{first.info['blocks']:.2f} blocks per image; finetuned with gamma {first.info['gamma']:g}, "
                           f"lr {first.info['lr']:g}.")
            tags |= {"gamma": first.info["gamma"]}
        versions[run_id] = tracker.register(model_name, run_id, tags, description)
    tracker.set_alias(model_name, "most_accurate", versions[most_accurate.info["run_id"]])
    tracker.set_alias(model_name, "fastest", versions[by_flops[0].info["run_id"]])
    budget_models = [run_id for run_id, owned in models.items() if "budget" in owned[0].info]
    if budget_models:
        tracker.set_alias(model_name, "budget", versions[max(budget_models, key=lambda r: len(models[r]))])


def prune_front(plan: SweepPlan, args: argparse.Namespace, tracker: Tracker, parent_id: str, name: str,
                storage: str, front: list[Point], settings: SweepSettings, payloads: Payloads, seconds: float,
                example) -> tuple[dict[str, list[CurvePoint]], list[Point]] | None:
    """The competitors (prune-and-finetune at the block counts that bracket the front's points, channel pruning
    at each point's FLOPs), each front point against each kind at its FLOPs (a paired interval, logged to the
    trial's run as gain_over_pruning*, gain_over_channel_pruning*): their curves and their models as points
    (which may belong on the sweep's front), or None."""
    preset = plan.preset
    # as many steps, in as many cycles, as the trials' models were trained: the stage before the policy
    # (defaults), then a trial (at the sweep's first lr)
    first = default_plan(preset, args.dataset, plan.train_size, "depth" if plan.depth else "blocks")[0]
    stages = [first, ("finetune", {"epochs": settings.epochs, "batch_size": settings.batch_size, "lr": plan.lrs[0]})]
    runs = PruneRuns(name, args.dataset, settings.data_dir, args.workers_per_trial, args.gpu, storage,
                     output_folder(None, storage, name), tracker, parent_id, {"preset": preset.name}, plan.train_size,
                     example, max_bad_images=args.max_bad_images, execution=args.train_execution)
    trained = train_competitors(preset, runs, payloads, settings.reference, [p.flops for p in front], stages, seconds)
    if not trained:
        return None
    models, learned = {}, []
    for p in front:  # a budget model once, at each of its budgets on the front
        run_id = p.info["run_id"]
        if run_id not in models:
            checkpoint = read_checkpoint(tracker.checkpoint(run_id))
            models[run_id] = ray.put({"backbone": checkpoint.backbone, "policy": checkpoint.policy})
        learned.append((p.info["key"], models[run_id], p.info.get("budget")))
    result = versus_pruned_remotely(preset.name, learned, [t.model for t in trained], args.dataset, settings.data_dir,
                                    args.gpu)
    for p in front:
        figures = {}
        for kind, v in result["versus"][p.info["key"]].items():
            key = GAINS[kind]
            figures |= {key: v["interval"]["difference"], f"{key}_low": v["interval"]["low"],
                        f"{key}_high": v["interval"]["high"], f"baseline_{kind}_accuracy": v["accuracy"]}
        p.info.update(figures)  # Point is frozen, its info a dict
        if "budget" in p.info:  # a budget model's: along its curve, the budget in percent as the step
            tracker.log_metrics(p.info["run_id"], {f"curve_{k}": x for k, x in figures.items()},
                                step=int(round(100 * p.info["budget"])))
        else:
            tracker.log_metrics(p.info["run_id"], figures, step=0)
    curves = {kind: [CurvePoint(**c) for c in points] for kind, points in result["curves"].items()}
    return curves, [competitor_point(t, preset) for t in trained]


def competitor_point(trained: Trained, preset) -> Point:
    """A trained competitor as a point of the sweep (test figures; validation figures to choose on)."""
    r = final_report(read_checkpoint(trained.path).meta, cost_model(preset).full)
    label = f"K={trained.keep}" if trained.kind == PRUNED else f"ch {r.flops_mean / r.full_flops:.2f}"
    return Point(r.accuracy, r.flops_mean, label, {
        "method": trained.kind, "keep": trained.keep, "accuracy": r.accuracy, "flops": r.flops_mean,
        "speedup": r.speedup, "blocks": r.blocks_mean, "unique_policies": 1, "run_id": trained.run_id,
        "key": trained.run_id, "val_accuracy": r.val_accuracy, "val_flops": r.val_flops, "lr": None} | trained.info)


def refuse(tracker: Tracker, args: argparse.Namespace, name: str, path: str) -> None:
    """A finished sweep is not published twice; --resume needs a sweep to resume."""
    done = tracker.finished_job(name)
    if done is not None:  # a second publication would register the front's models again
        raise UserError(f"sweep {name} has finished already (MLflow run {done}); give another --name for a new sweep")
    if args.resume and not tune.Tuner.can_restore(path) and not tracker.job_exists(name):
        raise UserError(f"--resume --name {name}: no such sweep (no Tune state at {path}, no MLflow run in "
                        f"experiment {args.experiment!r}); drop --resume to start it")


def reference_point(args: argparse.Namespace, plan: SweepPlan) -> tuple[Point, dict]:
    """The user's ResNet (the job that made --init measured it; without that record, --init's own ResNet)
    as the plot's reference, with --init's ResNet run in full on the test set; and its record."""
    test = load_dataset(plan.preset, "test", args.dataset, args.data_dir)
    full = evaluate(plan.backbone, None, DataLoader(test, batch_size=256), cost_model(plan.preset),
                    torch.device("cpu"), progress=False)
    user = plan.checkpoint.meta.get("reference") or {"accuracy": full.accuracy, "source": f"--init {Path(args.init).name}"}
    return Point(user["accuracy"], full.full_flops, f"your ResNet ({user['source']})",
                 user | {"flops": full.full_flops, "speedup": 1.0, "init_resnet_accuracy": full.accuracy}), user


def make_tuner(args: argparse.Namespace, plan: SweepPlan, settings: SweepSettings, storage: str,
               path: str) -> tune.Tuner:
    """The sweep's Tuner: restored with --resume where Tune kept its state, else a grid or Optuna's search."""
    # The trial itself only waits on its Train run: it asks for a little memory, no CPU, so the CPUs
    # stay for the Train workers (a trial holding a CPU would deadlock a 2-CPU machine at 2 workers).
    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=settings), {"cpu": 0, "memory": 256 * 1024 ** 2})
    if args.resume and tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable, resume_errored=True)
    if args.resume:
        print(f"note: no Tune state at {path}; starting the sweep", file=sys.stderr)
    if args.num_samples is None:
        space = {"trial": tune.grid_search(plan.trials(args.penalties)), "lr": tune.grid_search(plan.lrs)}
        tune_config = tune.TuneConfig(max_concurrent_trials=args.max_concurrent)
    else:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        space = {"gamma": tune.uniform(*args.gamma_range), "lr": tune.choice(plan.lrs)}
        # chosen on the validation split, as the front: the search never sees a test figure
        searcher = OptunaSearch(metric=["val_accuracy", "val_flops_per_image"], mode=["max", "min"],
                                sampler=optuna.samplers.NSGAIISampler(seed=0))
        tune_config = tune.TuneConfig(search_alg=searcher, num_samples=args.num_samples,
                                      max_concurrent_trials=args.max_concurrent)
    return tune.Tuner(trainable, param_space=space, tune_config=tune_config, run_config=tune.RunConfig(
        name=settings.name, storage_path=storage, verbose=0, callbacks=[Progress()],
        failure_config=tune.FailureConfig(max_failures=0)))


def fit(tuner: tune.Tuner, name: str) -> int:
    """The sweep's trials run to the end; how many failed. A UserError saying how to resume when it was
    stopped (Ctrl-C: Tune stops its trials and returns; the front would be a partial one)."""
    results = tuner.fit()
    failed = sum(r.error is not None for r in results)
    unfinished = len(results) - results.num_terminated - results.num_errors
    if unfinished:
        raise UserError(f"sweep {name} stopped with {unfinished} trial(s) unfinished; continue it with "
                        f"--resume --name {name}")
    return failed


def interval_text(row: dict, key: str) -> str:
    return (f"{100 * row[key]:+.2f} [{100 * row[key + '_low']:+.2f}, {100 * row[key + '_high']:+.2f}]"
            if key in row else "-")


def print_front(name: str, points: list[Point], failed: int, front: list[Point], rows: list[dict],
                reference: Point) -> None:
    """The front as a table, each learned point against the image-blind policies and both kinds of pruning."""
    trials = len({p.info["run_id"] for p in points if "method" not in p.info})
    competitors = len(points) - sum(1 for p in points if "method" not in p.info)
    curves = (f" ({len(points) - competitors} points: a budget model is a point per budget)"
              if len(points) - competitors > trials else "")
    print(f"\n{name}: {trials} trials finished{curves}, {failed} failed"
          f"{f', {competitors} pruned competitors' if competitors else ''}; Pareto front of them all, chosen on the "
          "validation split, with its test figures "
          f"(the reference, {reference.label}: accuracy {reference.accuracy:.3f}, FLOPs {reference.flops:.2E}; "
          f"--init's ResNet, all blocks: {reference.info['init_resnet_accuracy']:.3f}):")
    print(f"{'model':>14} {'lr':>8} {'val acc':>8} {'accuracy':>9} {'FLOPs/img':>10} {'speedup':>8} {'blocks':>7} "
          f"{'policies':>8} {'vs static':>9} {'vs prune and finetune':>27} {'vs channel pruning':>27}  run")
    for r in rows:
        model = (f"{r['budget_range']} @{r['budget']:.2f}" if "budget" in r else f"gamma {r['gamma']:g}" if "gamma" in r
                 else f"prune K={r['keep']}" if r["method"] == PRUNED else "channels")
        policies = "-" if r.get("unique_policies") is None else f"{r['unique_policies']:.0f}"
        gain = f"{100 * r['gain_over_static']:+8.2f}p" if "gain_over_static" in r else f"{'-':>9}"
        lr = "-" if r.get("lr") is None else f"{r['lr']:g}"
        print(f"{model:>14} {lr:>8} {r['val_accuracy']:>8.3f} {r['accuracy']:>9.3f} {r['flops']:>10.2E} "
              f"{r['speedup']:>7.2f}x {r['blocks']:>7.2f} {policies:>8} {gain} "
              f"{interval_text(r, GAINS[PRUNED]):>27} {interval_text(r, GAINS[CHANNELS]):>27}  {r['run_id']}")
    gain = front_gain(front)
    if "front_gain_over_static" in gain:
        print(f"vs static: accuracy minus the best image-blind policy's at the same FLOPs, on the model's own ResNet "
              f"(front mean {100 * gain['front_gain_over_static']:+.2f} points)")
    if competitors:
        for key, what in ((GAINS[PRUNED], "your ResNet's blocks pruned"), (GAINS[CHANNELS], "its channels pruned")):
            if f"front_{key}" in gain:
                print(f"vs {LABELS[PRUNED if key == GAINS[PRUNED] else CHANNELS]}: accuracy minus {what} to the same "
                      f"FLOPs and finetuned as long, per image, 95% interval (front mean "
                      f"{100 * gain[f'front_{key}']:+.2f} points)")
        print(recommend(front, name))


def settings_of(args: argparse.Namespace, plan: SweepPlan, name: str, uri: str, tracker: Tracker, parent_id: str,
                storage: str, user: dict, payloads: Payloads) -> SweepSettings:
    """What the trials share: --init's models (and the user's ResNet, for a depth policy) put in Ray's store."""
    return SweepSettings(
        preset=plan.preset.name, name=name, epochs=plan.epochs, batch_size=plan.batch_size, policy_lr=plan.policy_lr,
        weight_decay=plan.weight_decay, analysis=not args.no_analysis, workers=args.workers_per_trial, gpu=args.gpu,
        dataset=args.dataset, data_dir=str(Path(args.data_dir).resolve()) if args.data_dir else None, mlflow_uri=uri,
        experiment=args.experiment, parent_id=parent_id, source=tracker.source,
        init_ref=payloads.put(plan.init, plan.backbone, plan.policy), init_label=args.init, storage_path=storage,
        max_bad_images=args.max_bad_images, execution=args.train_execution, eval_every=args.eval_every,
        reference=user, init_gamma=float(plan.policy.gamma) if plan.depth else -1.0,
        teacher_ref=payloads.user_resnet(user, "finetuning on the labels alone") if plan.depth else None,
        budget_sampling=plan.budget_sampling)


def run(args: argparse.Namespace, plan: SweepPlan) -> None:
    """The sweep `plan` (blockdrop.plans.plan_sweep(args)) on Ray Tune, its front into MLflow; MLflow, run
    storage and Ray were checked before (blockdrop.preflight.check_cluster_flags; blockdrop.cli.run_sweep)."""
    began = time.time()
    preset = plan.preset
    name = args.name or f"{preset.name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    uri = resolve_uri(args.mlflow_uri)
    storage = storage_location(args.storage_path)
    tracker = Tracker(uri, args.experiment)
    refuse(tracker, args, name, f"{storage.rstrip('/')}/{name}")
    start_ray(args.address, args.gpu, args.workers_per_trial, args.storage_path)
    parent_id, resumed = tracker.job_run(name, name, {
        "preset": preset.name, "init": args.init, "search": "grid" if args.num_samples is None else "optuna",
        "epochs": plan.epochs, "batch_size": plan.batch_size, "policy_lr": plan.policy_lr or "lr",
        "workers_per_trial": args.workers_per_trial, "penalties": ",".join(map(str, args.penalties or [])),
        "budget_ranges": " ".join(",".join(f"{b:g}" for b in r) for r in plan.budget_ranges),
        "lrs": ",".join(map(str, plan.lrs))}
        | ({"budget_sampling": plan.budget_sampling} if plan.budget_ranges else {}))
    print(f"{'continuing' if resumed else 'started'} sweep {name}: MLflow {tracker.run_url(parent_id)}", file=sys.stderr)
    try:  # whatever stops the sweep (an error, Ctrl-C), its parent run does not stay RUNNING
        (reference, user), payloads = reference_point(args, plan), Payloads(preset)
        settings = settings_of(args, plan, name, uri, tracker, parent_id, storage, user, payloads)
        tuner = make_tuner(args, plan, settings, storage, f"{storage.rstrip('/')}/{name}")
        curves_ref = None  # the image-blind baselines on --init's ResNet, on a Ray worker while the trials run
        if not args.no_analysis:
            curves_ref = curves_remotely(preset.name, settings.init_ref, args.dataset, settings.data_dir, args.gpu)
        failed = fit(tuner, name)
        curves = None if curves_ref is None else {
            key: [CurvePoint(**p) for p in curve] for key, curve in ray.get(curves_ref).items()}
        points, front = collect_front(tracker, parent_id, reference)
        if not points and not failed:  # stopped (Ctrl-C) before a trial reported: Tune counts it neither way
            raise UserError(f"sweep {name} stopped before any trial finished; continue it with --resume --name {name}")
        if not points:
            raise UserError(f"no trial of sweep {name} finished ({failed} failed); see the errors above")
        if not args.no_analysis and not args.no_prune_baseline:
            test = load_dataset(preset, "test", args.dataset, args.data_dir)
            found = prune_front(plan, args, tracker, parent_id, name, storage, front, settings, payloads,
                                time.time() - began, input_example(preset, test))
            if found:  # the front of whatever wins, chosen on validation: the competitors' models are points too
                curves = (curves or {}) | found[0]
                points = points + found[1]
                front = pareto_front(points, by=validation)
        model_name = args.model_name or f"blockdrop-{preset.name}"
        rows = publish_front(tracker, parent_id, points, front, reference, model_name, preset.name, curves)
        view = tracker.save_view(parent_id, name)
        tracker.finish(parent_id, ok=True)
    except BaseException:
        tracker.close_running_children(parent_id)
        tracker.finish(parent_id, ok=False)
        raise
    print_front(name, points, failed, front, rows, reference)
    budget = any("budget" in p.info for p in front)
    print(f"\nregistered as {model_name} (aliases most_accurate, fastest{', budget' if budget else ''}): "
          f"models:/{model_name}@{'budget' if budget else 'most_accurate'}")
    print(f"MLflow: {tracker.run_url(parent_id)}")
    print(f"the front in MLflow's UI (accuracy vs FLOPs, a point per trial): {view}")
