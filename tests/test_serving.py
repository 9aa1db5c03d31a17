"""serve_policy.py end to end: a real MLflow server holds a registered front, a real Ray Serve serves it,
requests are real HTTP. Answers are checked against blockdrop.evaluate's on the same image files."""
from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, _free_port, clean_env

PRESET = "R26_DIGITS"
MODEL = "serve-test-front"


def decisive_models(seed: int, bias: float):
    """A ResNet and a policy whose block probabilities sit far from the 0.5 threshold, so that an image's
    policy does not depend on float noise (batch composition), yet differs from image to image."""
    from blockdrop.presets import get_preset

    preset = get_preset(PRESET)
    torch.manual_seed(seed)
    backbone, policy = preset.build_backbone().eval(), preset.build_policy().eval()
    with torch.no_grad():
        policy.logit.weight.mul_(60.0)
        policy.logit.bias.fill_(bias)
    return preset, backbone, policy


def write_digit_pngs(root: Path, per_class: int = 3) -> list[Path]:
    """The first test digits of each class as 8x8 grey PNG files in class folders (root/test/<d>/)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    files = []
    for digit in range(10):
        folder = root / "test" / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        for i, index in enumerate(np.flatnonzero(bunch.target == digit)[:per_class]):
            path = folder / f"{i}.png"
            Image.fromarray((bunch.images[index] * 255 / 16).round().astype(np.uint8)).save(path)
            files.append(path)
    return sorted(files)


@pytest.fixture(scope="module")
def front(mlflow_server, tmp_path_factory):
    """Two models logged like train_job.py's (checkpoint + pyfunc model + final metrics) and registered
    as one model with the sweep's aliases: version 1 the most accurate, version 2 the fastest."""
    from blockdrop.checkpoints import save_checkpoint
    from blockdrop.tracking import Tracker

    root = tmp_path_factory.mktemp("serving")
    tracker = Tracker(mlflow_server, "serving-tests")
    client = tracker.client
    client.create_registered_model(MODEL)
    figures = [(0.9, 4.5e6, 1.5, 0.0), (0.8, 2.5e6, 2.7, -1.0)]
    checkpoints = []
    for i, (accuracy, flops, speedup, bias) in enumerate(figures):
        preset, backbone, policy = decisive_models(seed=i, bias=bias)
        checkpoint = root / f"model{i + 1}.pt"
        save_checkpoint(checkpoint, preset, backbone, policy, {"stage": "finetune"})
        run_id, _ = tracker.job_run(f"serve-test-{i + 1}", f"serve-test-{i + 1}", {"preset": PRESET})
        for key, value in [("final_test_accuracy", accuracy), ("final_flops_per_image", flops), ("final_speedup", speedup)]:
            client.log_metric(run_id, key, value)
        model_uri = tracker.log_model(run_id, checkpoint, "report", np.zeros((1, 8, 8, 1), dtype=np.uint8))
        client.create_model_version(MODEL, source=model_uri, run_id=run_id, model_id=model_uri.split("/")[-1])
        checkpoints.append(checkpoint)
    client.set_registered_model_alias(MODEL, "most_accurate", "1")
    client.set_registered_model_alias(MODEL, "fastest", "2")
    return {"root": root, "checkpoints": checkpoints, "images": write_digit_pngs(root), "uri": mlflow_server}


def serve_cmd(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "serve_policy.py"), *args]


def http(method: str, url: str, body: bytes | None = None, content_type: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method=method)
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw or b"{}")
    except ValueError:  # Serve's proxy answers in plain text while the application is still deploying
        return status, {"text": raw.decode(errors="replace")}


@contextlib.contextmanager
def running_server(root: Path, *args: str, stop: int = signal.SIGINT, ended: dict | None = None):
    """serve_policy.py in the foreground on a free port (its console in root/serve.log); stopped at the end
    whatever happened, then killed if it lingers. Yields its URL. `stop`: SIGINT goes to its whole process
    group (Ctrl-C in a terminal), SIGTERM to its main process alone (what Kubernetes, Docker and systemd
    send). `ended` gets its exit status, seconds to exit and the processes of its session still alive 20 s
    after (Ray's, had it left any)."""
    port = _free_port()
    log = open(root / "serve.log", "w")
    proc = subprocess.Popen(serve_cmd(*args, "--port", str(port)), cwd=root, env=clean_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            # Ready once /healthz answers and the console has said what it serves (printed after serve.run
            # returns, which can be a moment after the endpoint first answers).
            try:
                if http("GET", f"{url}/healthz")[0] == 200 and "stops the server" in (root / "serve.log").read_text():
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("serve_policy.py did not come up:\n" + (root / "serve.log").read_text()[-3000:])
            time.sleep(1)
        yield url
    finally:
        began = time.time()
        try:
            if stop == signal.SIGINT:
                os.killpg(proc.pid, stop)
            else:
                os.kill(proc.pid, stop)
            proc.wait(timeout=60)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        if ended is not None:
            seconds = time.time() - began
            left = session_processes(proc.pid)
            for _ in range(20):
                if not left:
                    break
                time.sleep(1)
                left = session_processes(proc.pid)
            ended |= {"returncode": proc.returncode, "seconds": seconds, "left": left}
            for pid in left:  # the test says so; the machine is not left with them
                os.kill(pid, signal.SIGKILL)


def session_processes(sid: int) -> list[int]:
    """The live processes of session `sid` (a process started with start_new_session and its children)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # after the name: state, ppid, pgrp, session
                alive.append(int(entry.name))
    return alive


@pytest.fixture(scope="module")
def server(front):
    """serve_policy.py serving the whole registered front."""
    with running_server(front["root"], "--model-uri", f"models:/{MODEL}", "--mlflow-uri", front["uri"],
                        "--max-batch-size", "16", "--batch-wait-ms", "20") as url:
        yield url


@pytest.mark.slow
def test_the_servers_console_says_what_it_serves_without_serves_notices(front, server):
    log = (front["root"] / "serve.log").read_text()
    assert "serving R26_DIGITS on http://127.0.0.1:" in log and "Ctrl-C (or SIGTERM) stops the server" in log
    assert "Connecting to existing Serve app" not in log  # blockdrop.console.quiet_serve


def library_answers(front, version: int):
    """What blockdrop.evaluate computes for the same files: predictions and policies per image."""
    from torch.utils.data import DataLoader

    from blockdrop.checkpoints import load_models
    from blockdrop.data import load_dataset
    from blockdrop.metrics import tally
    from blockdrop.flops import cost_model
    from blockdrop.presets import get_preset

    preset = get_preset(PRESET)
    backbone, policy, _ = load_models(preset, front["checkpoints"][version - 1])
    dataset = load_dataset(preset, "test", "imagefolder", front["root"])
    records = tally(backbone, policy, DataLoader(dataset, batch_size=7), cost_model(preset), torch.device("cpu"),
                    records=True).records()
    files = [Path(path) for path, _ in dataset.samples]
    return {f: (int(p), "".join("1" if b else "0" for b in bits)) for f, p, bits in
            zip(files, records.predictions, records.policies)}


def as_json(paths: list[Path], **fields) -> bytes:
    return json.dumps({"images": [base64.b64encode(p.read_bytes()).decode() for p in paths], **fields}).encode()


@pytest.mark.slow
def test_answers_and_policies_equal_evaluate_single_and_batched(front, server):
    expected = library_answers(front, version=1)  # the default: the most accurate
    images = front["images"]
    status, body = http("POST", f"{server}/predict", as_json(images), "application/json")
    assert status == 200, body
    answers = body["predictions"]
    assert len(answers) == len(images)
    for path, answer in zip(images, answers):
        assert (answer["class"], answer["policy"]) == expected[path], path
        assert answer["blocks_used"] == answer["policy"].count("1") and answer["label"] == str(answer["class"])
        assert answer["flops"] < answer["full_flops"] and answer["model"]["version"] == "1"
    assert len({a["policy"] for a in answers}) > 1  # per image, not one policy for all
    status, single = http("POST", f"{server}/predict", images[4].read_bytes(), "image/png")
    assert status == 200 and (single["predictions"][0]["class"], single["predictions"][0]["policy"]) == expected[images[4]]


@pytest.mark.slow
def test_routing_by_alias_version_and_budget(front, server):
    expected = library_answers(front, version=2)
    image = front["images"][0]
    for query, version in [("", "1"), ("?model=fastest", "2"), ("?model=2", "2"), ("?model=most_accurate", "1"),
                           ("?max_flops=3e6", "2"), ("?max_flops=5e6", "1")]:
        status, body = http("POST", f"{server}/predict{query}", image.read_bytes(), "image/png")
        assert status == 200 and body["predictions"][0]["model"]["version"] == version, (query, body)
    status, body = http("POST", f"{server}/predict", as_json([image], model="fastest"), "application/json")
    assert (body["predictions"][0]["class"], body["predictions"][0]["policy"]) == expected[image]
    # max_flops is a per-image cap: the model whose mean is within it answers, and no image passes it
    status, body = http("POST", f"{server}/predict", as_json(front["images"], max_flops=3e6), "application/json")
    assert status == 200 and {a["model"]["version"] for a in body["predictions"]} == {"2"}
    assert max(a["flops"] for a in body["predictions"]) <= 3e6 and body["predictions"][0]["budget"]["max_flops"] == 3e6
    status, body = http("POST", f"{server}/predict?max_flops=1e6", image.read_bytes(), "image/png")
    assert status == 422 and "cheapest needs 2.500E+06" in body["error"]
    status, meta = http("GET", f"{server}/metadata")
    assert status == 200 and meta["preset"] == PRESET and meta["num_blocks"] == 12 and meta["default_model"] == "1"
    by_version = {m["version"]: m for m in meta["models"]}
    assert by_version["1"]["accuracy"] == 0.9 and by_version["2"]["flops"] == 2.5e6
    assert set(by_version["2"]["aliases"]) == {"fastest"} and "checkpoint" not in by_version["1"]


@pytest.mark.parametrize("body, content_type, query, status, message", [
    (b"not an image at all", "image/png", "", 400, "not an image"),
    (b"", "image/png", "", 400, "empty body"),
    (b'{"images": ["@@@"]}', "application/json", "", 400, "not valid base64"),
    (b'{"images": "abc"}', "application/json", "", 400, "expected JSON"),
    (b"{nope", "application/json", "", 400, "not valid JSON"),
    (b"x", "text/plain", "", 415, "unsupported Content-Type"),
    (None, "image/png", "?model=nope", 404, "unknown model"),
    (None, "image/png", "?max_flops=abc", 400, "max_flops must be a number"),
    (b'{"images": ["aGk="]}', "application/json", "", 400, "not an image"),
    (None, "image/png", "?modle=fastest", 400, "unknown parameter(s) 'modle'"),
    (b'{"images": ["aGk="], "max_flop": 3e6}', "application/json", "", 400, "unknown field(s) 'max_flop'"),
    (b'{"images": ["aGk="], "max_flops": true}', "application/json", "", 400, "max_flops must be a number"),
    (None, "image/png", "?budget=1.5", 400, "(0, 1]"),
    (None, "image/png", "?model=1&budget=0.5", 422, "needs a budget model"),
])
@pytest.mark.slow
def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(front, server, body, content_type, query, status, message):
    image = front["images"][0].read_bytes()
    got, answer = http("POST", f"{server}/predict{query}", image if body is None else body, content_type)
    assert got == status and message in answer["error"], answer
    assert http("POST", f"{server}/predict", image, "image/png")[0] == 200


@pytest.mark.slow
def test_too_many_images_and_too_large_a_body_are_refused(front, server):
    image = front["images"][0]
    status, body = http("POST", f"{server}/predict", as_json([image] * 65), "application/json")
    assert status == 413 and "limit is 64" in body["error"]
    status, body = http("POST", f"{server}/predict", b"\x89PNG" + b"0" * (9 << 20), "image/png")
    assert status == 413 and "limit is" in body["error"]
    assert http("POST", f"{server}/predict", image.read_bytes(), "image/png")[0] == 200


@pytest.mark.slow
def test_load_of_500_requests_from_16_clients(front, server):
    images = [p.read_bytes() for p in front["images"]]

    def one(i: int) -> int:
        return http("POST", f"{server}/predict", images[i % len(images)], "image/png")[0]

    began = time.time()
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(one, range(500), timeout=300))
    assert statuses.count(200) == 500, {s: statuses.count(s) for s in set(statuses)}
    assert time.time() - began < 300
    assert http("GET", f"{server}/metadata")[1]["largest_batch_seen"] > 1  # requests really share batches


def prometheus(url: str) -> dict[str, float]:
    """`name{model="..."}` -> value of the blockdrop_* series in Ray's metrics export (other labels dropped;
    values of series that differ only in those labels are added up)."""
    import re

    text = urllib.request.urlopen(url, timeout=30).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"(ray_blockdrop_\w+)(?:\{(.*)\})? ([-+0-9.eE]+|NaN|\+Inf)$", line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            key = match.group(1) + "".join(f'{{{k}="{labels[k]}"}}' for k in ("model", "le") if k in labels)
            values[key] = values.get(key, 0.0) + float(match.group(3))
    return values


@pytest.mark.slow
def test_prometheus_metrics_count_requests_blocks_savings_and_batches(front, server):
    """Ray's metrics agent, at the URL the server printed, exports the blockdrop_* series; after the load
    test above they count its 500 requests of the default model (version 1)."""
    import re

    url = re.search(r"metrics \(Prometheus\): (\S+)", (front["root"] / "serve.log").read_text()).group(1)
    deadline, values = time.time() + 90, {}
    while time.time() < deadline:  # Ray exports user metrics every few seconds
        values = prometheus(url)
        if values.get('ray_blockdrop_requests_total{model="1"}', 0) >= 500:
            break
        time.sleep(3)
    assert values.get('ray_blockdrop_requests_total{model="1"}', 0) >= 500, sorted(values)[:40]
    images = values['ray_blockdrop_blocks_used_count{model="1"}']
    assert images >= 500 and values['ray_blockdrop_blocks_used_bucket{model="1"}{le="+Inf"}'] == images
    assert 0 < values['ray_blockdrop_blocks_used_sum{model="1"}'] / images < 12  # blocks really dropped
    assert values['ray_blockdrop_flops_saved_total{model="1"}'] > 0
    batches, batched_images = values["ray_blockdrop_batch_size_count"], values["ray_blockdrop_batch_size_sum"]
    assert batched_images > batches > 0  # some model calls held more than one image


@pytest.mark.slow
def test_the_engine_runs_only_each_images_blocks_or_all_of_them_for_the_full_twin(front):
    from blockdrop.execution import run_full
    from blockdrop.serving import Engine, ModelSource

    checkpoint = str(front["checkpoints"][0])
    engine = Engine([ModelSource("bd", "bd", None, checkpoint), ModelSource("full", "full", None, checkpoint, full=True)])
    images = torch.stack([engine.decode(p.read_bytes()) for p in front["images"][:12]])
    sparse, full = engine.predict("bd", images), engine.predict("full", images)
    backbone = engine.models["full"].model.backbone
    assert [a["class"] for a in full] == run_full(backbone, images).argmax(1).tolist()
    assert all(a["policy"] == "1" * 12 and a["flops"] == a["full_flops"] for a in full)
    assert all(a["blocks_used"] < 12 and a["flops"] < a["full_flops"] for a in sparse)
    assert engine.choose() == "bd"  # no recorded figures: the first model given answers by default
    with pytest.raises(Exception, match="unknown model"):
        engine.choose("nope")


@pytest.mark.slow
def test_a_serve_config_builds_the_same_application_from_its_args(front, monkeypatch):
    from ray.serve.deployment import Application

    from blockdrop.serve_app import app_builder

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    app = app_builder({"model_uris": [f"models:/{MODEL}@fastest"], "mlflow_uri": front["uri"], "max_batch_size": 8})
    assert isinstance(app, Application)
    with pytest.raises(Exception, match="not found in the MLflow registry"):
        app_builder({"model_uris": [f"models:/{MODEL}@nope"], "mlflow_uri": front["uri"]})


@pytest.mark.parametrize("args, message", [
    (["--model-uri", "models:/no-such-model"], "no registered model called 'no-such-model'"),
    (["--model-uri", "models:/no-such-model@best"], "not found in the MLflow registry"),
    (["--model-uri", "s3://bucket/model"], "unknown model URI"),
    (["--model-uri", "missing.pt"], "does not exist"),
    (["--model-uri", "resnet.pt"], "not a BlockDrop model"),
    (["--autoscale", "3"], "--autoscale wants MIN,MAX"),
    (["--max-body-mb", "inf"], "--max-body-mb must be a size in MB"),
    (["--model-uri", "MODEL1", "--cpus-per-replica", "64"], "a replica could never start"),
    ([], "run `scripts/with-venv python -m blockdrop.quickstart` first"),
])
@pytest.mark.slow
def test_bad_command_lines_exit_2_with_one_line(front, tmp_path, args, message):
    from blockdrop.checkpoints import save_checkpoint

    preset, backbone, _ = decisive_models(0, 0.0)
    save_checkpoint(tmp_path / "resnet.pt", preset, backbone)
    args = [str(front["checkpoints"][0]) if a == "MODEL1" else a for a in args]
    uri = front["uri"] if any(a.startswith("models:/") for a in args) else f"sqlite:///{tmp_path / 'empty.db'}"
    proc = subprocess.run(serve_cmd(*args, "--mlflow-uri", uri), cwd=tmp_path, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_port_in_use_is_refused_before_anything_is_deployed(front, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(serve_cmd("--model-uri", str(front["checkpoints"][0]), "--port", str(port)),
                              cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in proc.stderr, proc.stderr[-2000:]


def test_original_blockdrop_files_are_served_with_preset_and_backbone(tmp_path):
    """An original finetuned file (agent + resnet) needs --preset; a curriculum file (agent only) also
    the pretrained ResNet (--backbone). Served answers equal the library's on the joined weights."""
    from blockdrop.parsers.serve import build_parser, check_flags
    from blockdrop.serving import load_sources
    from test_checkpoints import drop_bn_counters, original_agent

    def validate(args):
        check_flags(args)
        return load_sources(args)

    preset, backbone, policy = decisive_models(1, 0.0)
    finetuned, curriculum, resnet = tmp_path / "ckpt_E_10_A_0.9.t7", tmp_path / "ckpt_cl.t7", tmp_path / "R26.t7"
    torch.save({"agent": original_agent(drop_bn_counters(policy.state_dict())),
                "resnet": drop_bn_counters(backbone.state_dict()), "epoch": 10}, finetuned)
    torch.save({"agent": original_agent(drop_bn_counters(policy.state_dict())), "epoch": 3}, curriculum)
    torch.save({"state_dict": drop_bn_counters(backbone.state_dict())}, resnet)
    empty = f"sqlite:///{tmp_path / 'empty.db'}"

    def engine(*argv):
        return validate(build_parser().parse_args([*argv, "--mlflow-uri", empty]))[1]

    from blockdrop.execution import run_sparse
    from blockdrop.reinforce import greedy

    x = torch.rand(6, 1, preset.image_size, preset.image_size)
    with torch.inference_mode():
        actions = greedy(policy(x))
        want = [(int(c), "".join(str(int(v)) for v in a)) for c, a in
                zip(run_sparse(backbone, x, actions).argmax(1), actions)]
    assert len({w[1] for w in want}) > 1  # images get different policies
    for argv in (["--model-uri", str(finetuned), "--preset", PRESET],
                 ["--model-uri", str(curriculum), "--preset", PRESET, "--backbone", str(resnet)]):
        served = engine(*argv)
        answers = served.predict(served.choose(), x)
        assert [(a["class"], a["policy"]) for a in answers] == want
        assert served.preset.name == PRESET and all(a["model"]["version"] is None for a in answers)
    with pytest.raises(Exception, match="does not say its preset: pass --preset"):
        engine("--model-uri", str(finetuned))
    with pytest.raises(Exception, match="no ResNet .* --backbone FILE"):
        engine("--model-uri", str(curriculum), "--preset", PRESET)
    with pytest.raises(Exception, match="--backbone applies to checkpoint files"):
        validate(build_parser().parse_args(["--model-uri", "models:/x", "--backbone", str(resnet),
                                            "--mlflow-uri", empty]))


@pytest.mark.slow
def test_mlflow_models_serve_takes_raw_pixels_and_answers_like_evaluate(front, tmp_path):
    """The registered model through MLflow's own scoring server (`mlflow models serve`, real HTTP): a client
    sends the pixels it decoded from the PNG files (uint8, N x H x W x 1) and gets blockdrop.evaluate's
    classes and policies; normalised floats or a wrong shape get a 4xx that says what is expected."""
    from PIL import Image

    port = _free_port()
    log = open(tmp_path / "mlflow-serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}@fastest",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                            env=clean_env(MLFLOW_TRACKING_URI=front["uri"]), cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if urllib.request.urlopen(f"{url}/ping", timeout=5).status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("mlflow models serve did not come up:\n" + (tmp_path / "mlflow-serve.log").read_text()[-3000:])
            time.sleep(1)
        files = front["images"]
        pixels = np.stack([np.asarray(Image.open(f).convert("L")) for f in files])[..., None]
        status, body = http("POST", f"{url}/invocations", json.dumps({"inputs": pixels.tolist()}).encode(),
                            "application/json")
        assert status == 200, body
        expected = library_answers(front, version=2)
        assert [(p["prediction"], p["policy"]) for p in body["predictions"]] == [expected[f] for f in files]
        # a per-image cap as the model's param (its signature names the budgets; MLflow passes on those alone)
        flops = sorted(p["flops"] for p in body["predictions"])
        cap = flops[len(flops) // 2]
        status, capped = http("POST", f"{url}/invocations", json.dumps({"inputs": pixels.tolist(), "params": {
            "max_flops": cap}}).encode(), "application/json")
        assert status == 200, capped
        assert max(p["flops"] for p in capped["predictions"]) <= cap * (1 + 1e-6) < flops[-1]
        status, body = http("POST", f"{url}/invocations", json.dumps({"inputs": pixels.tolist(), "params": {
            "budget": 0.5}}).encode(), "application/json")
        assert 400 <= status < 500 and "needs a budget model" in json.dumps(body), (status, body)
        for bad, says in [((pixels / 255.0).tolist(), "uint8"), (pixels[:, :, :, 0:1].repeat(3, axis=3).tolist(), "shape")]:
            status, body = http("POST", f"{url}/invocations", json.dumps({"inputs": bad}).encode(), "application/json")
            assert 400 <= status < 500 and says in json.dumps(body), (status, body)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.slow
def test_the_registered_model_takes_encoded_images_through_mlflows_python_api(front):
    """PNG bytes or base64 strings (a 1-D object array, one image per item), through
    mlflow.pyfunc.load_model: the same answers as blockdrop.evaluate on the files."""
    import mlflow.pyfunc

    mlflow.pyfunc.mlflow.set_tracking_uri(front["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@fastest")
    files = front["images"]
    expected = [library_answers(front, version=2)[f] for f in files]
    for payload in (np.array([f.read_bytes() for f in files], dtype=object),
                    np.array([base64.b64encode(f.read_bytes()).decode() for f in files], dtype=object)):
        out = model.predict(payload)
        assert list(zip(out["prediction"].tolist(), out["policy"].tolist())) == expected
    with pytest.raises(Exception, match="not base64"):
        model.predict(np.array(["@@@"], dtype=object))
    with pytest.raises(Exception, match="not a PNG, JPEG"):
        model.predict(np.array([b"not an image"], dtype=object))


def test_16_bit_and_float_images_decode_like_their_8_bit_copy_and_huge_ones_are_refused_unread(tmp_path):
    """A 16-bit PNG or a float TIFF of a digit is the same digit (not clipped to black and white); an image
    with more pixels than the limit is refused from its header (a decompression bomb is never decoded)."""
    import io

    from PIL import Image

    from blockdrop import inference
    from blockdrop.presets import get_preset
    from blockdrop.checkpoints import save_checkpoint
    from blockdrop.serving import Engine, ModelSource, RequestError

    decoder = inference.Decoder(get_preset(PRESET))
    digit = np.linspace(0, 255, 64).reshape(8, 8).round().astype(np.uint8)

    def encoded(array, fmt="PNG") -> bytes:
        out = io.BytesIO()
        Image.fromarray(array).save(out, fmt)
        return out.getvalue()

    eight = decoder(encoded(digit))
    for other in (encoded(digit.astype(np.uint16) * 257), encoded(digit.astype(np.float32) / 255, "TIFF"),
                  encoded(digit.astype(np.float32), "TIFF")):
        assert torch.allclose(decoder(other), eight, atol=1e-6)
    bomb = encoded(np.zeros((7000, 7000), dtype=np.uint8))  # 49 megapixels in a few tens of KB
    assert len(bomb) < 200_000
    with pytest.raises(inference.ImageTooLarge, match="7000x7000 pixels"):
        decoder(bomb)
    preset, backbone, policy = decisive_models(seed=0, bias=0.0)
    save_checkpoint(tmp_path / "m.pt", preset, backbone, policy, {"stage": "finetune"})
    engine = Engine([ModelSource(label="m", name="m", version=None, checkpoint=str(tmp_path / "m.pt"))])
    with pytest.raises(RequestError) as err:
        engine.decode(bomb)
    assert err.value.status == 413 and "more than the" in str(err.value)
