"""The budget policy (blockdrop.budget): one model for any budget, its math, evaluation, MLflow model and
server; and end to end, a budget model trained with train_job.py, its curve in a real MLflow server, served
by a real Ray Serve over real HTTP at per-request budgets."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from blockdrop import budget as B
from conftest import REPO, clean_env, mlflow_server, run_module  # noqa: F401  (fixture)

PRESET = "R26_DIGITS"


def random_prob(n: int, depths: int = 13, seed: int = 0) -> torch.Tensor:
    """p(correct | depth d) per image, rising with d, different from image to image."""
    g = torch.Generator().manual_seed(seed)
    return torch.sigmoid(torch.randn(n, 1, generator=g) * 2 + torch.linspace(-3, 4, depths)
                         + 0.3 * torch.randn(n, depths, generator=g))


COSTS = torch.linspace(0, 0.94, 13)  # the blocks' share at each depth
BASE = 0.06  # what every image pays


def test_a_higher_price_never_buys_more_and_the_table_prices_any_mean_budget():
    prob = random_prob(500)
    table = B.spend(prob, COSTS) / len(prob)
    assert torch.all(table[1:] <= table[:-1] + 1e-12) and table[-1] == 0  # at the top price: no block
    for budget in (0.1, 0.2, 0.35, 0.5, 0.8):
        depths = B.depths(prob, COSTS, BASE, table, torch.tensor(budget))
        spent = BASE + COSTS[depths].double().mean()
        assert abs(spent - budget) < 0.02, budget  # held to the budget on the images it was measured on
    prices = B.price_of(torch.tensor([0.9, 0.5, 0.2, 0.05, 0.0], dtype=torch.float64), table)
    assert torch.all(prices[1:] >= prices[:-1])  # a smaller budget costs a higher price


def test_an_images_depth_depends_on_its_own_budget_not_on_its_batch():
    prob = random_prob(64, seed=1)
    table = B.spend(random_prob(400, seed=2), COSTS) / 400
    budgets = torch.linspace(0.15, 0.9, 64, dtype=torch.float64)
    together = B.depths(prob, COSTS, BASE, table, budgets)
    alone = torch.cat([B.depths(prob[i:i + 1], COSTS, BASE, table, budgets[i:i + 1]) for i in range(64)])
    assert torch.equal(together, alone)
    assert len(set(together.tolist())) > 3  # different budgets, different depths, in one batch


def test_a_cap_holds_for_every_image_and_easy_images_still_stop_early():
    prob = random_prob(300, seed=3)
    table = B.spend(prob, COSTS) / 300
    for cap in (0.2, 0.4, 0.7):
        depths = B.depths(prob, COSTS, BASE, table, torch.tensor(cap), torch.tensor(cap))
        cost = BASE + COSTS[depths]
        assert cost.max() <= cap + 1e-6
        assert cost.min() < cap - 0.1  # not a static prefix: some images spend much less


def test_cap_rows_keeps_the_blocks_valued_most_within_the_allowance():
    policies = torch.tensor([[1., 1, 1, 0], [1, 0, 1, 1]])
    values = torch.tensor([[0.9, 0.2, 0.8, 0.99], [0.1, 0.5, 0.7, 0.6]])
    flops = torch.tensor([10., 10, 10, 10])
    capped = B.cap_rows(policies, values, flops, torch.tensor([20., 15.], dtype=torch.float64))
    assert capped.tolist() == [[1, 0, 1, 0], [0, 0, 1, 0]]
    assert torch.equal(B.cap_rows(policies, values, flops, torch.tensor([math.inf, math.inf])), policies)


@pytest.mark.parametrize("bad", [-0.1, 0, 1.5, float("nan"), float("inf"), "abc", True, None])
def test_bad_budgets_are_refused_with_what_a_budget_is(bad):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        B.check_budget(bad)


def test_training_budgets_are_drawn_in_the_range_log_more_at_the_low_end_sandwich_also_at_it():
    torch.manual_seed(0)
    uniform, log = B.draw_budgets(4000, (0.2, 1.0)), B.draw_budgets(4000, (0.2, 1.0), "log")
    for drawn in (uniform, log):
        assert len(drawn) == 4000 and drawn.min() >= 0.2 and drawn.max() <= 1.0
    assert abs(uniform.median() - 0.6) < 0.03 and abs(log.median() - 0.2 * 5 ** 0.5) < 0.03  # geometric middle
    sandwich = B.draw_budgets(100, (0.2, 1.0), "sandwich")
    assert len(sandwich) == 200 and torch.all(sandwich[100:] == 0.2) and sandwich[:100].std() > 0.1


def test_a_sandwich_step_trains_each_image_at_its_budget_and_at_the_low_end_in_one_pass():
    """The added rows are the same images at the range's low end (the depths the policy picks there); the
    step reports the drawn budgets' rows only."""
    from blockdrop import depth as D
    from blockdrop.execution import Executor
    from blockdrop.stages import budget_finetune_step

    preset, backbone, policy = budget_models(seed=1)
    seen = []

    class Recording(Executor):
        def forward(self, x, policy=None):
            seen.append((x, policy))
            return super().forward(x, policy)

    images = torch.randn(16, preset.in_channels, preset.image_size, preset.image_size)
    labels = torch.randint(preset.num_classes, (16,))
    backbone.train()
    torch.manual_seed(3)
    out = budget_finetune_step(policy, Recording(backbone, "sparse"), images, labels, None, (0.2, 0.9), "sandwich")
    (ran, rows), = seen
    assert ran.shape[0] == 32 and torch.equal(ran[:16], images) and torch.equal(ran[16:], images)
    with torch.no_grad():
        low = B.batch_depths(policy.correct_prob(images), policy.costs, float(policy.base), torch.full((16,), 0.2,
                                                                                                        dtype=torch.float64))
    assert torch.equal(rows[16:], D.rows(low, policy.rank))
    assert torch.equal(out.blocks, rows[:16].sum(1)) and len(out.correct) == 16
    assert out.blocks.mean() > rows[16:].sum(1).mean()  # the drawn budgets run more blocks than the low end
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.parameters())


# ---------------------------------------------------------------- a budget model, untrained but calibrated

def budget_models(seed: int = 0, scale: float = 4.0):
    """An R26_DIGITS ResNet and budget policy (random weights; the policy's outputs spread by `scale`), its
    table measured on the training digits, as training leaves it."""
    from blockdrop.data import load_dataset
    from blockdrop.flops import cost_model
    from blockdrop.presets import get_preset

    preset = get_preset(PRESET)
    torch.manual_seed(seed)
    backbone, policy = preset.build_backbone().eval(), preset.build_depth_policy(budget=True).eval()
    costs = cost_model(preset, policy)
    policy.set_order(list(range(preset.num_blocks)), costs.backbone.blocks, costs.full)
    policy.base.fill_(costs.fixed / costs.full)
    with torch.no_grad():
        policy.logit.weight.mul_(scale)
        policy.logit.bias.copy_(torch.linspace(-2, 3, preset.num_blocks + 1))
        train = load_dataset(preset, "train")
        images = torch.stack([train[i][0] for i in range(512)])
        policy.calibrate(B.spend(policy.correct_prob(images), policy.costs), len(images))
    policy.budget.fill_(0.5)
    return preset, backbone, policy


@pytest.fixture(scope="module")
def budget_file(tmp_path_factory) -> Path:
    from blockdrop.checkpoints import save_checkpoint

    preset, backbone, policy = budget_models()
    path = tmp_path_factory.mktemp("budget") / "budget.pt"
    save_checkpoint(path, preset, backbone, policy, {"stage": "finetune"})
    return path


def test_a_budget_model_keeps_its_table_through_a_checkpoint_and_tracks_budgets_on_test_images(budget_file):
    from blockdrop import inference
    from blockdrop.data import load_dataset
    from blockdrop.metrics import budget_curve, curve_gap
    from blockdrop.models.resnet import BudgetPolicy

    model = inference.load(budget_file)
    assert isinstance(model.policy, BudgetPolicy) and float(model.policy.spend[0]) > 0
    test = DataLoader(load_dataset(model.preset, "test"), batch_size=100)
    points = budget_curve(model.backbone, model.policy, test, model.costs, torch.device("cpu"), [0.2, 0.4, 0.6, 0.8])
    assert curve_gap(points) < 0.04, [p.spent for p in points]  # measured on training images, held on test ones
    assert [p.report.blocks_mean for p in points] == sorted(p.report.blocks_mean for p in points)
    caps = budget_curve(model.backbone, model.policy, test, model.costs, torch.device("cpu"), [0.2, 0.5], "cap")
    assert all(p.gap == 0 and p.flops_max <= p.budget * p.report.full_flops * (1 + 1e-6) for p in caps)


def test_predict_takes_one_budget_per_image_and_a_cap_on_any_policy(budget_file):
    from blockdrop import inference
    from blockdrop.data import load_dataset
    from blockdrop.models.resnet import BudgetPolicy  # noqa: F401

    model = inference.load(budget_file)
    test = load_dataset(model.preset, "test")
    images = torch.stack([test[i][0] for i in range(24)])
    budgets = torch.linspace(0.15, 0.95, 24, dtype=torch.float64)
    together = model.predict(images, budget=budgets)
    for i in (0, 11, 23):
        alone = model.predict(images[i:i + 1], budget=float(budgets[i]))
        assert torch.equal(alone.policies[0], together.policies[i])
    capped = model.predict(images, cap=0.3)
    assert float(capped.flops.max()) <= 0.3 * model.costs.full * (1 + 1e-6)
    # BlockDrop's per-block policy takes a cap (its most probable blocks kept), not a mean budget
    preset = model.preset
    blocks = inference.Model(preset, model.backbone, preset.build_policy().eval(), inference.cost_model(preset,
                             preset.build_policy()), model.decoder, model.checkpoint, model.device)
    out = blocks.predict(images, cap=0.4)
    assert float(out.flops.max()) <= 0.4 * model.costs.full * (1 + 1e-6)
    with pytest.raises(ValueError, match="needs a budget policy"):
        blocks.predict(images, budget=0.4)


@pytest.mark.parametrize("args, message", [
    (["--budget", "1.5"], "--budget must be a share of the full ResNet's FLOPs in (0, 1]"),
    (["--budget", "-0.2"], "(0, 1]"),
    (["--budget", "nan"], "(0, 1]"),
    (["--budgets", "0.2,2"], "--budgets must be a share"),
    (["--budget", "0.01"], "below what any image costs under this model"),
    (["--cap-curve"], "--cap-curve goes with --budgets"),
])
def test_evaluate_refuses_bad_budgets_with_exit_2(budget_file, args, message):
    proc = run_module("blockdrop.evaluate", "--preset", PRESET, "--checkpoint", str(budget_file), *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


def test_evaluate_draws_the_curve_and_refuses_a_mean_budget_for_a_fixed_policy(budget_file, tmp_path):
    from blockdrop.checkpoints import save_checkpoint
    from blockdrop.presets import get_preset

    proc = run_module("blockdrop.evaluate", "--preset", PRESET, "--checkpoint", str(budget_file), "--budgets",
                      "0.2,0.5,0.9", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert [p["budget"] for p in out["curve"]] == [0.2, 0.5, 0.9] and out["mean_gap"] < 0.05
    assert out["curve"][0]["accuracy"] <= 1 and out["curve"][0]["blocks_mean"] < out["curve"][2]["blocks_mean"]
    text = run_module("blockdrop.evaluate", "--preset", PRESET, "--checkpoint", str(budget_file), "--budget", "0.3")
    assert text.returncode == 0 and "mean budget 0.3" in text.stdout, text.stderr[-2000:]
    preset = get_preset(PRESET)
    fixed = tmp_path / "depth.pt"
    save_checkpoint(fixed, preset, preset.build_backbone(), preset.build_depth_policy(), {"stage": "finetune"})
    proc = run_module("blockdrop.evaluate", "--preset", PRESET, "--checkpoint", str(fixed), "--budget", "0.3")
    assert proc.returncode == 2 and "needs a budget policy" in proc.stderr, proc.stderr[-2000:]
    proc = run_module("blockdrop.evaluate", "--preset", PRESET, "--checkpoint", str(fixed), "--cap", "0.3", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["flops_mean"] <= 0.3 * json.loads(proc.stdout)["full_flops"]


@pytest.mark.parametrize("fields, status, message", [
    ({"budget": 1.5}, 400, "(0, 1]"),
    ({"budget": -1}, 400, "(0, 1]"),
    ({"budget": "NaN"}, 400, "(0, 1]"),
    ({"budget": True}, 400, "must be a number"),
    ({"max_flops": -3}, 400, "positive number of FLOPs"),
    ({"max_flop": 3e6}, 400, "unknown parameter(s) 'max_flop'"),
    ({"modle": "1"}, 400, "unknown parameter(s) 'modle'"),
    ({"budget": 0.3, "mean_flops": 2e6}, 400, "give one"),
])
def test_bad_budget_requests_are_refused_by_routing(fields, status, message):
    from blockdrop.serving import RequestError, routing

    with pytest.raises(RequestError, match=None) as err:
        routing(fields)
    assert err.value.status == status and message in str(err.value)


def test_the_engine_prices_each_request_and_refuses_budgets_below_the_cheapest_image(budget_file):
    from blockdrop.data import load_dataset
    from blockdrop.serving import Ask, Engine, RequestError, resolve

    engine = Engine(resolve([str(budget_file)], "sqlite:///unused.db"))
    label = engine.choose(mean_flops=2e6)
    assert label == "budget"
    with pytest.raises(RequestError) as err:
        engine.ask(label, Ask(budget=0.02))
    assert err.value.status == 422 and "an image costs at least" in str(err.value)
    test = load_dataset(engine.preset, "test")
    images = torch.stack([test[i][0] for i in range(8)])
    asks = [engine.ask(label, Ask(budget=0.2)), engine.ask(label, Ask(max_flops=2.5e6))] * 4
    answers = engine.predict(label, images, asks)
    for answer, (mean, cap) in zip(answers, asks):
        if cap is not None:
            assert answer["flops"] <= 2.5e6 * (1 + 1e-6) and answer["budget"]["max_flops"] == pytest.approx(2.5e6)
        else:
            assert answer["budget"]["mean_flops"] == pytest.approx(0.2 * engine.full_flops)


def test_the_mlflow_model_takes_the_budget_as_a_param(budget_file, tmp_path):
    from blockdrop.data import load_dataset
    from blockdrop.pyfunc import BlockDropModel, raw_images

    class Context:
        artifacts = {"checkpoint": str(budget_file)}

    model = BlockDropModel()
    model.load_context(Context())
    test = load_dataset(model.preset, "test")
    images = raw_images(model.preset, np.stack([test[i][0].numpy() for i in range(32)]))
    cheap, dear = (model.predict(None, images, {"budget": b}) for b in (0.15, 0.9))
    assert cheap["flops"].mean() < dear["flops"].mean()
    capped = model.predict(None, images, {"max_flops": 2e6})
    assert capped["flops"].max() <= 2e6 * (1 + 1e-6)
    for params, message in (({"budget": 2}, r"\(0, 1\]"), ({"budgett": 0.3}, "unknown param")):
        with pytest.raises(ValueError, match=message):
            model.predict(None, images, params)
    # as MLflow logs and loads it: the signature names the budgets, so MLflow passes them on
    import mlflow.pyfunc

    from blockdrop.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "budget-model")
    run_id, _ = tracker.job_run("m", "m", {})
    uri = tracker.log_model(run_id, budget_file, "report", images[:2])
    loaded = mlflow.pyfunc.load_model(uri)
    assert {p.name for p in loaded.metadata.get_params_schema().params} == {"budget", "mean_flops", "max_flops"}
    cheap, dear = (loaded.predict(images, params={"budget": b}) for b in (0.15, 0.9))
    assert cheap["flops"].mean() < dear["flops"].mean()
    assert loaded.predict(images, params={"max_flops": 2e6})["flops"].max() <= 2e6 * (1 + 1e-6)


# ---------------------------------------------------------------- end to end: train, track, evaluate, serve

def budget_job(user_resnet: Path, store: str, root: Path, cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    """train_job.py --policy budget from the user's ResNet (nest -> depth -> budget finetune), one worker,
    short stages."""
    return subprocess.run([sys.executable, str(REPO / "train_job.py"), "--policy", "budget", "--init", str(user_resnet),
                           "--epochs", "3,2,2", "--num-workers", "1", "--name", "budget-e2e", "--no-prune-baseline",
                           "--no-analysis", "--experiment", "budget-tests", "--mlflow-uri", store, "--storage-path",
                           str(root / "ray")], cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(mlflow_server, tmp_path_factory, user_resnet):  # noqa: F811
    """A budget job on a real local Ray, logging to a real MLflow server."""
    root = tmp_path_factory.mktemp("budget-job")
    proc = budget_job(user_resnet, mlflow_server, root, root, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("budget-tests")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("blockdrop.job") == "budget-e2e")
    return {"root": root, "proc": proc, "client": client, "parent": parent, "runs": runs, "uri": mlflow_server,
            "checkpoint": root / "ray" / "budget-e2e" / "checkpoints" / "budget-e2e-finetune.pt",
            "user_resnet": user_resnet}


@pytest.mark.slow
def test_a_budget_job_trains_the_depth_stages_and_logs_its_curve_to_mlflow(trained):
    proc, client, parent = trained["proc"], trained["client"], trained["parent"]
    assert "plan: nest -> depth -> finetune" in proc.stderr
    assert "budget policy, mean budgets drawn uniformly and at the low end (sandwich) from 0.2-1 of the FLOPs" in proc.stderr
    assert parent.data.params["policy"] == "budget"
    # the curve: curve_* metrics whose step is the budget in percent, and budget_curve.json
    steps = [m.step for m in client.get_metric_history(parent.info.run_id, "curve_test_accuracy")]
    assert steps == sorted(steps) and {20, 30, 50, 100} <= set(steps), steps
    spent = {m.step: m.value for m in client.get_metric_history(parent.info.run_id, "curve_spent")}
    most = parent.data.metrics["budget_ceiling"]  # what it spends when blocks are free
    assert 0.2 < most <= 1.1
    for step, share in spent.items():  # each budget held on the test images, where it binds; never overspent
        assert abs(share - step / 100) < 0.06 if step / 100 < most - 0.05 else share < step / 100 + 0.05, spent
    assert "budget_curve.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    finetune = next(r for r in trained["runs"] if r.data.params.get("stage") == "finetune")
    assert finetune.data.metrics["budget_gap"] < 0.06 and "budget_0.25_test_accuracy" in finetune.data.metrics
    proc = run_module("blockdrop.evaluate", "--preset", PRESET, "--checkpoint", str(trained["checkpoint"]),
                      "--budgets", f"{max(0.1, 0.4 * most):.3f},{0.8 * most:.3f},1", "--json")
    curve = json.loads(proc.stdout)["curve"]
    assert curve[0]["blocks_mean"] < curve[1]["blocks_mean"] <= curve[2]["blocks_mean"]  # 1: over its ceiling
    assert curve[2]["accuracy"] > 0.8 and curve[2]["spent"] == pytest.approx(most, abs=0.05)


@pytest.mark.slow
def test_the_served_budget_model_answers_each_request_at_its_budget_as_evaluate_does(trained):
    from concurrent.futures import ThreadPoolExecutor

    from blockdrop import inference
    from blockdrop.data import load_dataset
    from test_serving import as_json, http, running_server, write_digit_pngs

    root = trained["root"]
    files = write_digit_pngs(root, per_class=2)
    model = inference.load(trained["checkpoint"])
    dataset = load_dataset(model.preset, "test", "imagefolder", root)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    order = [Path(p) for p, _ in dataset.samples]
    ended = {}
    with running_server(root, "--model-uri", f"runs:/{trained['parent'].info.run_id}", "--mlflow-uri",
                        trained["uri"], "--max-batch-size", "32", "--batch-wait-ms", "50", stop=signal.SIGTERM,
                        ended=ended) as url:
        def ask(fields):
            return http("POST", f"{url}/predict", as_json(files, **fields), "application/json")

        asks = [{"budget": 0.25}, {"budget": 0.6}, {"max_flops": 0.3 * model.costs.full}]
        with ThreadPoolExecutor(3) as pool:  # the three budgets arrive together: one dynamic batch
            answers = list(pool.map(ask, asks))
        for fields, (status, body) in zip(asks, answers):
            assert status == 200, body
            budget = fields.get("budget")
            cap = None if budget else fields["max_flops"] / model.costs.full
            expected = model.predict(images, budget=budget, cap=cap)
            by_file = dict(zip(order, zip(expected.classes.tolist(), expected.policy_strings())))
            for path, answer in zip(files, body["predictions"]):
                assert (answer["class"], answer["policy"]) == by_file[path], (fields, path)
            if cap is not None:
                assert max(a["flops"] for a in body["predictions"]) <= fields["max_flops"] * (1 + 1e-6)
        mean = {b["budget"]: np.mean([a["flops"] for a in body["predictions"]]) for b, (_, body) in
                zip(asks[:2], answers[:2])}
        assert mean[0.25] < mean[0.6]
        for fields, status, message in (({"budget": -0.5}, 400, "(0, 1]"), ({"budget": 1.01}, 400, "(0, 1]"),
                                        ({"budget": "nan"}, 400, "(0, 1]"), ({"budget": 0.01}, 422, "costs at least"),
                                        ({"budgte": 0.3}, 400, "unknown field")):
            got, body = ask(fields)
            assert got == status and message in body["error"], (fields, body)
        status, meta = http("GET", f"{url}/metadata")
        assert status == 200 and meta["models"][0]["budget_model"] is True
    # SIGTERM (Kubernetes, Docker, systemd) stops it as Ctrl-C does: a line, exit 0, none of Ray's processes left
    log = (root / "serve.log").read_text()
    assert ended["returncode"] == 0 and "stopping" in log and "SIGTERM received" not in log, log[-2000:]
    assert ended["seconds"] < 30 and not ended["left"], ended


@pytest.mark.slow
def test_the_same_name_with_another_mlflow_store_is_refused_not_resumed_from_that_runs_state(trained, tmp_path):
    """The job's name again, its Ray storage shared, another MLflow store: Ray's state is the other run's, so
    nothing is resumed, copied or reported as this job's."""
    from mlflow.tracking import MlflowClient

    root, store = trained["root"], f"sqlite:///{tmp_path / 'other.db'}"
    proc = budget_job(trained["user_resnet"], store, root, tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = next((x for x in proc.stderr.splitlines() if "is another run's" in x), "")
    assert "mlflow" in line and store in line and "give another --name" in line, proc.stderr[-2000:]
    assert "resumes after" not in proc.stderr and not list(tmp_path.glob("**/*.pt"))
    runs = MlflowClient(store).search_runs([MlflowClient(store).get_experiment_by_name("budget-tests").experiment_id])
    # the job's run FAILED, its first stage's KILLED: neither FINISHED with the other job's figures
    assert sorted(r.info.status for r in runs) == ["FAILED", "KILLED"]


@pytest.mark.slow
def test_a_sweep_trains_a_budget_model_whose_curve_is_its_points_on_the_front(trained):
    """tune_penalty.py --budget-ranges from the budget job's depth checkpoint, on real Ray Tune and a real MLflow
    server: the trial's curve in MLflow, every point of it in the Pareto JSON next to the image-blind baselines,
    the front over all points, the model registered once. (A sweep of gammas and budget models together, its
    front and registry: test_a_budget_sweeps_front_takes_every_point_of_every_curve...; per-gamma sweeps end to
    end: tests/test_sweep.py.)"""
    from blockdrop.pareto import Point, pareto_front

    root, client = trained["root"], trained["client"]
    depth = root / "ray" / "budget-e2e" / "checkpoints" / "budget-e2e-depth.pt"
    proc = subprocess.run([sys.executable, str(REPO / "tune_penalty.py"), "--init", str(depth), "--budget-ranges",
                           "0.2,1", "--budget-sampling", "log", "--epochs", "1", "--no-prune-baseline",
                           "--name", "bsweep", "--experiment",
                           "budget-sweeps", "--model-name", "budget-front", "--mlflow-uri", trained["uri"],
                           "--storage-path", str(root / "ray-sweep")],
                          cwd=root, env=clean_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 trials finished (" in proc.stdout and "0.2-1 @" in proc.stdout  # budget points in the front's table
    runs = client.search_runs([client.get_experiment_by_name("budget-sweeps").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("blockdrop.job") == "bsweep")
    trial, = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert trial.data.params["budget_range"] == "0.2,1" and trial.data.tags["blockdrop.trial"].startswith("budget=0.2-1,")
    assert trial.data.params["budget_sampling"] == parent.data.params["budget_sampling"] == "log"
    steps = [m.step for m in client.get_metric_history(trial.info.run_id, "curve_test_accuracy")]
    assert len(steps) >= 5 and steps == sorted(steps)
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "pareto/pareto_front.json",
                                                      str(root))).read_text())
    assert len(table["trials"]) == len(steps)  # every point of the curve
    points = [Point(t["val_accuracy"], t["val_flops"], info=t) for t in table["trials"]]  # chosen on validation
    assert [p["budget"] for p in table["front"]] == [p.info["budget"] for p in pareto_front(points)]
    assert len(table["front"]) >= 2 and table["baselines_on_init"]  # the image-blind curves beside it
    versions = client.search_model_versions("name = 'budget-front'")
    assert [v.run_id for v in versions] == [trial.info.run_id]  # one version for all its points
    assert client.get_model_version_by_alias("budget-front", "budget").version == versions[0].version
    assert parent.data.metrics["pareto_points"] == len(table["front"]) and parent.data.metrics["trials_finished"] == 1


def test_a_sweep_plans_budget_models_next_to_gammas_from_a_depth_checkpoint_and_refuses_bad_ranges(
        budget_file, tmp_path, monkeypatch):
    from blockdrop.errors import UserError
    from blockdrop.parsers.sweep import parse_args, trial_key
    from blockdrop.plans import plan_sweep

    monkeypatch.chdir(tmp_path)
    plan = plan_sweep(parse_args(["--init", str(budget_file), "--penalties", "-1,-5", "--budget-ranges", "0.2,1",
                                  "0.1,0.6", "--lrs", "0.01"]))
    trials = plan.trials([-1.0, -5.0])
    assert [trial_key(t | {"lr": 0.01}) for t in trials] == [
        "gamma=-1,lr=0.01", "gamma=-5,lr=0.01", "budget=0.2-1,lr=0.01", "budget=0.1-0.6,lr=0.01"]
    assert plan.depth and plan.budget_ranges == [[0.2, 1.0], [0.1, 0.6]] and plan.budget_sampling == "sandwich"
    chosen = plan_sweep(parse_args(["--init", str(budget_file), "--budget-ranges", "0.2,1", "--budget-sampling", "log"]))
    assert chosen.budget_sampling == "log"
    for args, message in ((["--budget-ranges", "0.6,0.2"], "goes from low to high"),
                          (["--budget-ranges", "0,0.5"], "low end must be a share"),
                          (["--budget-ranges", "0.2,1", "0.20,1.0"], "lists 0.2-1 more than once"),
                          (["--budget-ranges", "0.2,1", "--num-samples", "4"], "give one"),
                          (["--penalties", "-1", "--budget-sampling", "sandwich"], "this sweep has none"),
                          (["--budget-ranges", "0.2,1", "--budget-sampling", "cubic"], None),
                          (["--budget-ranges", "x"], None)):
        if message is None:  # argparse's own refusal: exit 2 with the form expected
            with pytest.raises(SystemExit):
                parse_args(["--init", str(budget_file), *args])
            continue
        with pytest.raises(UserError, match=message):
            plan_sweep(parse_args(["--init", str(budget_file), *args]))


def test_a_depth_checkpoint_becomes_a_budget_policy_and_a_budget_one_a_depth_policy(budget_file):
    """Both kinds of trial start from either checkpoint: the network and keep order are the same."""
    from blockdrop.checkpoints import read_checkpoint
    from blockdrop.models.resnet import BudgetPolicy, DepthPolicy, depth_state
    from blockdrop.presets import get_preset
    from blockdrop.stages import StageConfig, setup_stage

    preset = get_preset(PRESET)
    saved = read_checkpoint(budget_file)
    init = {"backbone": saved.backbone, "policy": saved.policy}
    cfg = dict(preset=PRESET, stage="finetune", epochs=1, batch_size=8, lr=0.01, weight_decay=0.0, gamma=-3.0,
               drop_rate=0.0, dataset=None, data_dir=None)
    as_depth, _, _ = setup_stage(StageConfig(**cfg), preset, init, None, torch.device("cpu"))
    assert type(as_depth.policy) is DepthPolicy and float(as_depth.policy.gamma) == -3.0
    depth_init = {"backbone": saved.backbone, "policy": depth_state(saved.policy)}
    as_budget, _, _ = setup_stage(StageConfig(**cfg, budget_range=[0.2, 0.8], budget=0.5), preset, depth_init, None,
                                  torch.device("cpu"))
    assert isinstance(as_budget.policy, BudgetPolicy) and float(as_budget.policy.budget) == 0.5
    assert float(as_budget.policy.base) > 0  # set from the cost model; its table waits for the first epoch
    for key, value in depth_init["policy"].items():  # the network and keep order (gamma: the stage's)
        assert key == "gamma" or torch.equal(as_budget.policy.state_dict()[key].cpu(), value), key


def test_a_budget_sweeps_front_takes_every_point_of_every_curve_and_registers_each_model_once(tmp_path):
    """Trials as a sweep leaves them in a real MLflow store: two per-gamma models and a budget model's curve;
    the front, its tags, Pareto JSON, plot and registered versions."""
    from blockdrop.pareto import Point
    from blockdrop.sweep import collect_front, publish_front
    from blockdrop.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "budget-sweep")
    parent, _ = tracker.job_run("s", "s", {"preset": PRESET})
    full = 6e6

    def trial(key, params, metrics):
        run_id, _ = tracker.job_run(f"s/{key}", key, params | {"lr": 0.01}, parent_id=parent)
        tracker.log_metrics(run_id, metrics, step=1)
        tracker.finish(run_id, ok=True)
        return run_id

    def final(acc, flops):
        return {"final_test_accuracy": acc, "final_flops_per_image": flops, "final_speedup": full / flops,
                "final_blocks_used": flops / 5e5, "final_unique_policies": 3.0, "final_val_accuracy": acc,
                "final_val_flops_per_image": flops}

    dominated = trial("gamma=-5", {"gamma": -5}, final(0.95, 3e6))
    accurate = trial("gamma=-0.5", {"gamma": -0.5}, final(0.99, 5.5e6))
    curve = {f"budget_{b:.2f}_{k}": v for b, acc, spent in ((0.2, 0.90, 0.2), (0.5, 0.96, 0.5), (1.0, 0.97, 0.8))
             for k, v in (("test_accuracy", acc), ("flops_per_image", spent * full), ("blocks_used", 10 * spent),
                          ("spent", spent), ("val_accuracy", acc), ("val_flops_per_image", spent * full))}
    budget = trial("budget=0.2-1", {"budget_range": "0.2,1"}, final(0.96, 3e6) | curve)
    reference = Point(0.99, full, "your ResNet", {"init_resnet_accuracy": 0.99, "flops": full, "speedup": 1.0})
    points, front = collect_front(tracker, parent, reference)
    assert len(points) == 5 and len(front) == 4
    assert [(p.info["run_id"], p.info.get("budget")) for p in front] == [
        (budget, 0.2), (budget, 0.5), (budget, 1.0), (accurate, None)]
    rows = publish_front(tracker, parent, points, front, reference, "front-model", PRESET)
    assert [r.get("budget_range") for r in rows] == ["0.2-1"] * 3 + [None]
    client = tracker.client
    tags = {r: client.get_run(r).data.tags["pareto_optimal"] for r in (dominated, accurate, budget)}
    assert tags == {dominated: "false", accurate: "true", budget: "true"}
    versions = client.search_model_versions("name = 'front-model'")
    assert sorted(v.run_id for v in versions) == sorted([accurate, budget])  # the curve: one version
    by_alias = {a: client.get_model_version_by_alias("front-model", a).run_id for a in ("budget", "fastest",
                                                                                         "most_accurate")}
    assert by_alias == {"budget": budget, "fastest": budget, "most_accurate": accurate}
    mine = next(v for v in versions if v.run_id == budget)
    assert mine.tags["front_points"] == "3" and "one model for every budget" in mine.description
    table = json.loads(Path(client.download_artifacts(parent, "pareto/pareto_front.json", str(tmp_path))).read_text())
    assert len(table["trials"]) == 5 and [r.get("budget") for r in table["front"]] == [0.2, 0.5, 1.0, None]
    assert "pareto/pareto_front.png" in {a.path for a in client.list_artifacts(parent, "pareto")}
    assert client.get_run(parent).data.metrics["trials_finished"] == 3


def test_a_budget_model_meets_prune_and_finetune_at_each_of_its_budgets(budget_file):
    """The sweep's paired comparison with pruning, at each front point's own budget."""
    from blockdrop import inference
    from blockdrop.checkpoints import read_checkpoint
    from blockdrop.data import load_dataset
    from blockdrop.distributed import _versus_pruned_task
    from blockdrop.metrics import tally

    saved = read_checkpoint(budget_file)
    payload = {"backbone": saved.backbone, "policy": saved.policy}
    rows = [[1] * 4 + [0] * 8, [1] * 12]
    pruned = [(sum(r), saved.backbone, r) for r in rows]
    out = _versus_pruned_task(PRESET, [("m@0.30", payload, 0.3), ("m@0.90", payload, 0.9), ("m", payload, None)],
                              pruned, None, None)
    assert set(out["versus"]) == {"m@0.30", "m@0.90", "m"} and len(out["curves"]["prune_finetune"]) == 2
    model = inference.load(budget_file)
    test = DataLoader(load_dataset(model.preset, "test"), batch_size=256)
    for key, budget in (("m@0.30", 0.3), ("m@0.90", 0.9), ("m", None)):  # each point's own accuracy, paired
        v = out["versus"][key]["prune_finetune"]  # block-pruned competitors only: no channel-pruned one given
        assert set(out["versus"][key]) == {"prune_finetune"}
        learned = tally(model.backbone, model.policy, test, model.costs, torch.device("cpu"), budget=budget)
        assert v["interval"]["difference"] == pytest.approx(learned.report(model.costs.full).accuracy - v["accuracy"])


@pytest.mark.parametrize("args, message", [
    (["--policy", "depth", "--budget-range", "0.2,0.8"], "are for --policy budget"),
    (["--budget-sampling", "sandwich"], "are for --policy budget, not --policy depth"),  # the default policy
    (["--budget", "0.3", "--stage", "curriculum"], "are for --policy budget, not --policy blocks"),
    (["--policy", "budget", "--budget-range", "0.8,0.2"], "goes from low to high"),
    (["--policy", "budget", "--budget-range", "0,0.5"], "low end must be a share"),
    (["--policy", "budget", "--budget", "1.2"], "--budget must be a share"),
    (["--policy", "budget", "--budget-range", "a,b"], "expected LOW,HIGH"),
])
def test_train_job_refuses_bad_budget_flags_at_once(args, message):
    proc = subprocess.run([sys.executable, str(REPO / "train_job.py"), *args], env=clean_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


def test_a_budget_plan_runs_the_depth_stages_with_its_range(tmp_path):
    from blockdrop.parsers.train import build_parser
    from blockdrop.plans import validate

    plan = validate(build_parser().parse_args(["--policy", "budget", "--budget-range", "0.25,0.75"]))
    assert plan.names == ["pretrain", "nest", "depth", "finetune"] and plan.policy == "budget"
    settings = dict(plan.stages)
    assert settings["finetune"]["budget_range"] == [0.25, 0.75] and settings["finetune"]["budget"] == 0.5
    assert settings["finetune"]["budget_sampling"] == "sandwich"  # the default, when the flag is not given
    assert "budget_range" not in settings["pretrain"]


def test_budget_flags_without_policy_go_with_an_init_that_holds_a_budget_model(budget_file, tmp_path):
    from blockdrop.parsers.train import build_parser
    from blockdrop.plans import validate

    plan = validate(build_parser().parse_args(["--init", str(budget_file), "--budget-sampling", "sandwich"]))
    assert plan.policy == "budget" and dict(plan.stages)["finetune"]["budget_sampling"] == "sandwich"


def test_a_served_file_for_another_preset_is_refused_before_serving(budget_file, tmp_path):
    from blockdrop.errors import UserError
    from blockdrop.serving import Engine, resolve

    with pytest.raises(UserError, match="was saved for preset R26_DIGITS, not R32_C10; pass --preset R26_DIGITS"):
        Engine(resolve([str(budget_file)], f"sqlite:///{tmp_path / 'unused.db'}"), "R32_C10")
