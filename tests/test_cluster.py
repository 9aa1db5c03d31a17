"""cluster/: the container image, cluster configs and job submission.

The configs are parsed and checked against what they name (image, scripts, flags, Ray's own
launcher schema, MLflow's own host check). Then a real two-node Ray cluster on localhost, two
`ray start` processes sharing a token, takes jobs through the Jobs API with cluster/submit.py.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import REPO, _free_port, mlflow_server, mlflow_server_root, stop_process_group  # noqa: F401

CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
WORKDIR = "/home/ray/blockdrop"  # the image's WORKDIR (checked below)


def documentation() -> list[Path]:
    """README.md and the reference pages it links to (docs/*.md)."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def pins() -> dict[str, str]:
    found = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_-]+)(\[[^]]*])?==(\S+)", line.strip())
        if m:
            found[m.group(1).lower()] = m.group(3)
    return found


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def image_name() -> str:
    from blockdrop import __version__

    labels = dict(re.findall(r'org\.opencontainers\.image\.(\w+)="([^"]*)"',
                             " ".join(args for op, args in dockerfile() if op == "LABEL")))
    assert labels["version"] == __version__, "Dockerfile LABEL version != blockdrop.__version__"
    return f"{labels['title']}:{labels['version']}"


def containers(doc: dict) -> list[dict]:
    spec = doc["spec"]
    if doc["kind"] == "RayService":
        spec = spec["rayClusterConfig"]
    if doc["kind"] in ("RayCluster", "RayService"):
        templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    elif doc["kind"] == "Deployment":
        templates = [spec["template"]]
    else:
        return []
    return [c for t in templates for c in t["spec"]["containers"]]


def manifests() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in sorted(CLUSTER.rglob("*.yaml")) if path.name != "ray-cluster.yaml"
            for doc in load(path) if "kind" in doc]  # Kubernetes objects, not the Serve config file


def raycluster() -> dict:
    return load(KUBERAY / "raycluster.yaml")[0]


# ---------------------------------------------------------------------------------------------
# The image


def test_dockerfile_builds_on_the_ray_image_of_the_pinned_ray_and_python():
    steps = dockerfile()
    base = [args for op, args in steps if op == "FROM"]
    assert len(base) == 1
    m = re.fullmatch(r"rayproject/ray:(\S+?)-py(\d)(\d+)-(cu\d+|gpu)", base[0])
    assert m, f"not an official Ray GPU image: {base[0]}"
    assert m.group(1) == pins()["ray"], "the base image's Ray must be requirements.txt's"
    assert (int(m.group(2)), int(m.group(3))) == sys.version_info[:2], "the image's Python must be the tests'"
    assert ("WORKDIR", WORKDIR) in steps
    runs = " ".join(args for op, args in steps if op == "RUN")
    assert "pip install" in runs and "-r requirements.txt" in runs
    # then blockdrop itself (pyproject.toml), from the copied code, adding nothing requirements.txt lacks
    package = [i for i, (op, args) in enumerate(steps) if op == "RUN" and re.search(r"pip install .*-e \.(\s|$)", args)]
    assert package, "the image installs blockdrop (pip install -e .)"
    assert "--no-deps" in steps[package[0]][1]
    copied_before = " ".join(args for op, args in steps[:package[0]] if op == "COPY")
    assert "pyproject.toml" in copied_before and "blockdrop/" in copied_before
    env = " ".join(args for op, args in steps if op == "ENV")
    assert f"PYTHONPATH={WORKDIR}" in env
    image_name()  # the label's version is the package's


def test_dockerfile_copies_what_exists_and_dockerignore_keeps_it():
    ignored = [line.strip().removeprefix("**/").strip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert {".venv", ".git", "mlflow.db", "mlruns"} <= set(ignored)
    copied = []
    for op, args in dockerfile():
        if op == "COPY":
            parts = [p for p in args.split() if not p.startswith("--")]
            copied += parts[:-1]
    assert {"requirements.txt", "pyproject.toml", "blockdrop/"} <= set(copied)
    assert {path.name for path in REPO.glob("*.py")} <= set(copied), "every top-level script (the CLIs) is in the image"
    for src in copied:
        assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
        assert src.rstrip("/") not in ignored, f".dockerignore drops {src}, which the Dockerfile copies"


def test_every_config_runs_the_dockerfiles_image():
    name = image_name()
    launcher = load(CLUSTER / "ray-cluster.yaml")[0]
    images = [launcher["docker"]["image"]]
    images += [c["image"] for _, doc in manifests() for c in containers(doc) if "mlflow" not in c["image"]]
    assert len(images) >= 3 and set(images) == {name}
    mlflow_images = [c["image"] for _, doc in manifests() for c in containers(doc) if "mlflow" in c["image"]]
    assert mlflow_images == [f"ghcr.io/mlflow/mlflow:v{pins()['mlflow']}-full"]  # server = client version


# ---------------------------------------------------------------------------------------------
# Cluster configs


def test_launcher_config_passes_rays_own_validation():
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(CLUSTER / "ray-cluster.yaml")[0]
    validate_config(prepare_config(copy.deepcopy(config)))  # Ray's JSON schema and its own checks
    head, workers = config["head_node_type"], config["available_node_types"]
    gpu = [t for name, t in workers.items() if name != head]
    assert gpu and all(t["resources"].get("GPU", 0) >= 1 and t["min_workers"] == 0 for t in gpu), \
        "autoscaling GPU workers from zero"
    assert workers[head]["resources"].get("GPU", 0) == 0
    options = " ".join(config["docker"]["run_options"])
    assert "-e RAY_AUTH_MODE=token" in options and "MLFLOW_TRACKING_URI=http" in options
    # the token travels as a file mount from the user's machine, never as a value in the repo
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    # shared storage: mounted on the host, passed into the container, used by the jobs
    mount = re.search(r"-v (\S+):(\S+)", options)
    assert mount and mount.group(1) == mount.group(2)
    assert any(f" {mount.group(1)}" in cmd and "mount " in cmd for cmd in config["initialization_commands"])
    starts = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in starts and "--autoscaling-config=~/ray_bootstrap_config.yaml" in starts


def test_kuberay_cluster_has_token_auth_autoscaling_gpus_and_shared_storage():
    cluster = raycluster()
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    spec = cluster["spec"]
    assert spec["rayVersion"] == pins()["ray"]
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"]
    assert spec["enableInTreeAutoscaling"] is True
    assert all(isinstance(v, str) for v in spec["headGroupSpec"]["rayStartParams"].values())
    groups = spec["workerGroupSpecs"]
    assert groups and all({"groupName", "minReplicas", "maxReplicas", "template"} <= set(g) for g in groups)
    gpu = [g for g in groups if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu and gpu[0]["minReplicas"] == 0 < gpu[0]["maxReplicas"]
    claim = load(KUBERAY / "shared-storage.yaml")[0]
    assert claim["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in claim["spec"]["accessModes"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in groups]
    for template in templates:
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        mounts = {m["name"]: m["mountPath"] for m in template["spec"]["containers"][0]["volumeMounts"]}
        shared = [n for n, v in volumes.items() if v.get("persistentVolumeClaim", {}).get("claimName")
                  == claim["metadata"]["name"]]
        assert shared and mounts[shared[0]] == "/mnt/shared"
    names = {doc["metadata"].get("namespace") for _, doc in manifests()}
    assert names == {cluster["metadata"]["namespace"]}


def test_serve_config_and_rayservice_deploy_the_same_application_with_valid_flags():
    from ray.serve.schema import ServeDeploySchema

    from blockdrop import serve_app
    from blockdrop.parsers.serve import build_parser

    config = load(CLUSTER / "serve" / "serve-config.yaml")[0]
    service = load(KUBERAY / "rayservice.yaml")[0]
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    in_service = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert in_service == config  # one application, two ways to deploy it
    schema = ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(config)  # Ray's own schema for `serve deploy` files
    (app,) = schema.applications
    module, attr = app.import_path.split(":")
    assert module == serve_app.__name__ and callable(getattr(serve_app, attr))
    args = app.args
    argv = [f"--model-uri={u}" for u in args["model_uris"]] + ["--gpu"] * bool(args.get("gpu"))
    argv += [f"--{k.replace('_', '-')}={v}" for k, v in args.items() if k not in ("model_uris", "gpu")]
    parsed = build_parser().parse_args(argv)  # every key is one of serve_policy.py's flags
    assert parsed.gpu and parsed.model_uris == ["models:/blockdrop-R32_C10"]
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == pins()["ray"] and cluster["authOptions"]["mode"] == "token"
    assert cluster["authOptions"]["secretName"] == raycluster()["spec"]["authOptions"]["secretName"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"containerPort": config["http_options"]["port"], "name": "serve"} in head["ports"]
    assert any(e["name"] == "MLFLOW_TRACKING_URI" for e in head["env"])
    gpu = [g for g in cluster["workerGroupSpecs"]
           if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu and gpu[0]["minReplicas"] == 0 < gpu[0]["maxReplicas"]


def entrypoint_args(command: str) -> tuple[str, list[str]]:
    """The script a job command runs (as a repository path) and its arguments."""
    words = shlex.split(command)
    assert words[0] == "python", command
    script = words[1].removeprefix(f"{WORKDIR}/")
    assert (REPO / script).is_file(), f"{command!r} runs {script}, which is not in the repository"
    return script, words[2:]


def parse_entrypoint(command: str):
    """Parse a job's arguments with the script's real parser, as the job will."""
    script, args = entrypoint_args(command)
    if script == "train_job.py":
        from blockdrop.parsers.train import build_parser

        return script, build_parser().parse_args(args)
    assert script == "tune_penalty.py", script
    from blockdrop.parsers.sweep import parse_args

    return script, parse_args(args)


def test_rayjobs_name_scripts_flags_and_files_that_exist():
    from blockdrop.presets import get_preset

    cluster = raycluster()
    jobs = {}
    for path in sorted(KUBERAY.glob("rayjob-*.yaml")):
        job = load(path)[0]
        assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
        script, args = parse_entrypoint(job["spec"]["entrypoint"])
        get_preset(args.preset)
        for folder in (args.data_dir, args.storage_path):
            assert folder.startswith("/mnt/shared/"), "data and run storage must be on the shared volume"
        jobs[script] = args
    train, sweep = jobs["train_job.py"], jobs["tune_penalty.py"]
    assert train.gpu and train.num_workers >= 2 and sweep.gpu
    assert all(g < 0 for g in sweep.penalties)
    # the sweep starts from the checkpoint the training job writes
    assert sweep.init == f"{train.output}/{train.name}-depth.pt" and sweep.preset == train.preset


def test_readme_job_commands_parse():
    commands = [command for page in documentation()
                for command in re.findall(r"^\s*(?:\w+=\S+ )*(?:ray job submit|python cluster/submit\.py)[^\n]*?-- "
                                          r"(python (?:train_job|tune_penalty)\.py[^\n]*)$", page.read_text(), flags=re.M)]
    assert len(commands) >= 2, "README and docs/ show job submission for training and sweeps"
    for command in commands:
        parse_entrypoint(command.rstrip("\\").strip())


def mlflow_server_options() -> set[str]:
    out = subprocess.run([str(Path(sys.executable).parent / "mlflow"), "server", "--help"], capture_output=True,
                         text=True, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}, check=True).stdout
    return set(re.findall(r"--[a-z][a-z-]+", out))


@pytest.mark.slow
def test_mlflow_server_configs_use_real_options_and_allow_the_jobs_uri():
    from mlflow.server.security_utils import is_allowed_host_header

    options = mlflow_server_options()
    deployment = next(doc for _, doc in manifests() if doc["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["mlflow", "server"]
    flags = {arg.split("=", 1)[0] for arg in container["args"]}
    script_flags = set(re.findall(r"^\s+(--[a-z-]+)", (CLUSTER / "mlflow" / "serve.sh").read_text(), flags=re.M))
    assert flags and script_flags and (flags | script_flags) <= options
    assert {"--artifacts-destination", "--serve-artifacts", "--allowed-hosts"} <= flags & script_flags
    # the backend store URI carries the database password: environment only, never the command line
    assert "--backend-store-uri" not in flags | script_flags
    from mlflow.cli import server

    read_by_server = {p.envvar for p in server.params if p.envvar}
    env_names = {e["name"] for e in container["env"]}
    assert "MLFLOW_BACKEND_STORE_URI" in read_by_server & env_names
    assert env_names - read_by_server <= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                          "MLFLOW_DISABLE_TELEMETRY"}
    args = dict(arg.split("=", 1) for arg in container["args"] if "=" in arg)
    allowed = args["--allowed-hosts"].split(",")
    env = {e["name"]: e.get("value") for e in containers(raycluster())[0]["env"]}
    host = env["MLFLOW_TRACKING_URI"].split("://", 1)[1].rstrip("/")
    assert is_allowed_host_header(allowed, host), f"the jobs' {host} would get MLflow's 403"
    assert is_allowed_host_header(allowed, "localhost:5000")  # kubectl port-forward
    service = next(doc for _, doc in manifests() if doc["kind"] == "Service" and doc["metadata"]["name"] == "mlflow")
    assert host.split(".")[0] == service["metadata"]["name"]
    assert int(host.rsplit(":", 1)[1]) == service["spec"]["ports"][0]["port"] == int(args["--port"])


def test_no_secret_in_the_repository():
    for path, doc in manifests():
        for container in containers(doc):
            for env in container.get("env", []):
                if re.search(r"TOKEN|SECRET|PASSWORD|KEY_ID|BACKEND_STORE", env["name"]):
                    assert "secretKeyRef" in env.get("valueFrom", {}), f"{path.name}: {env['name']} is not from a Secret"
        assert doc["kind"] != "Secret", f"{path.name} holds a Secret"
    pages = documentation()
    for path in [*CLUSTER.rglob("*"), REPO / "Dockerfile", *pages]:
        if path.is_file() and path.suffix != ".pyc":
            text = path.read_text()
            if path not in pages:  # the README and docs/ quote MLflow run ids
                assert not re.search(r"\b[0-9a-f]{32,}\b", text), f"{path} holds what looks like a token"
            assert not re.search(r"RAY_AUTH_TOKEN=[^\s$\"'.<]", text), f"{path} sets a token value"


@pytest.mark.slow
def test_mlflow_server_script_refuses_missing_settings_and_checks_hosts(mlflow_server, mlflow_server_root):  # noqa: F811
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.run(["bash", str(CLUSTER / "mlflow" / "serve.sh")], env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode != 0 and "MLFLOW_BACKEND_STORE_URI" in proc.stderr
    # the session's server runs through that script, allowing 127.0.0.1:* and localhost:*
    port = mlflow_server.rsplit(":", 1)[1]
    url = f"{mlflow_server}/api/2.0/mlflow/experiments/search?max_results=1"

    def status(host: str) -> int:
        request = urllib.request.Request(url, headers={"Host": host})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code

    assert status(f"127.0.0.1:{port}") == 200
    assert status(f"mlflow.attacker.example:{port}") == 403
    # the stores are the ones the environment names (MLFLOW_BACKEND_STORE_URI is read from there)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    run = client.create_run(client.create_experiment("serve-sh-check"))
    client.log_text(run.info.run_id, "proxied", "note.txt")
    assert (mlflow_server_root / "tracking.db").is_file() and not (mlflow_server_root / "mlflow.db").exists()
    assert list((mlflow_server_root / "artifacts").rglob("note.txt"))


@pytest.mark.slow
def test_submit_refuses_bad_usage_and_unreachable_clusters(tmp_path):
    script = [sys.executable, str(CLUSTER / "submit.py")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    unreachable = subprocess.run([*script, "--address", f"127.0.0.1:{_free_port()}", "--", "python", "train_job.py"],
                                 env=env, capture_output=True, text=True, timeout=120)
    assert unreachable.returncode == 2 and "cannot reach the Ray dashboard" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr
    no_command = subprocess.run([*script, "--address", f"127.0.0.1:{_free_port()}"], env=env, capture_output=True,
                                text=True, timeout=120)
    assert no_command.returncode == 2 and "give the job's command after --" in no_command.stderr
    bad_env = subprocess.run([*script, "--env", "NOEQUALS", "--", "python", "train_job.py"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert bad_env.returncode == 2 and "--env takes KEY=VALUE" in bad_env.stderr
    help_text = subprocess.run([*script, "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert help_text.returncode == 0 and "Exit status" in help_text.stdout


# ---------------------------------------------------------------------------------------------
# A real two-node Ray cluster on localhost


def wait_until(check, timeout: float, what: str, proc_list=()) -> None:
    deadline = time.time() + timeout
    while not check():
        for proc, log in proc_list:
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: a node exited: {Path(log).read_text()[-3000:]}")
        if time.time() > deadline:
            raise RuntimeError(f"{what}: timed out")
        time.sleep(1)


class LocalCluster:
    """A head and a worker node, each a `ray start --block` process in its own session and temp dir
    (separate nodes' files, as on separate machines), sharing one token through the environment."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="bd-ray-", dir="/tmp"))  # short: Ray's socket paths
        self.token = secrets.token_hex(32)
        bin_dir = str(Path(sys.executable).parent)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_USAGE_STATS_ENABLED="0",
                        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="5",  # a test cluster has nothing to drain
                        PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONUNBUFFERED="1")
        self.ray = str(Path(bin_dir) / "ray")
        self.gcs_port, self.dashboard_port = _free_port(), _free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def start_node(self, name: str, args: list[str], worker_ports: tuple[int, int]) -> None:
        log = self.root / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [self.ray, "start", "--block", "--num-cpus=1", f"--temp-dir={self.root / name}",
                 f"--dashboard-agent-listen-port={_free_port()}", f"--min-worker-port={worker_ports[0]}",
                 f"--max-worker-port={worker_ports[1]}", *args],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((proc, log))

    def start(self) -> None:
        self.start_node("head", ["--head", f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}",
                                 "--dashboard-host=127.0.0.1", f"--ray-client-server-port={_free_port()}"],
                        (21000, 21099))
        wait_until(lambda: "Ray runtime started" in (self.root / "head.log").read_text(), 120, "head", self.procs)
        self.start_node("worker", [f"--address=127.0.0.1:{self.gcs_port}"], (21100, 21199))
        wait_until(lambda: len(self.alive_nodes()) == 2, 120, "worker node", self.procs)

    def query(self, code: str):
        """Run Python against the cluster in a process of its own (the token stays out of pytest's)."""
        out = subprocess.run([sys.executable, "-c", f"ADDRESS = {self.address!r}\n{code}"], env=self.env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    def alive_nodes(self) -> list[str]:
        try:
            return self.query("import json\nfrom ray.util.state import list_nodes\n"
                              "print(json.dumps([n.node_id for n in list_nodes(address=ADDRESS) "
                              "if n.state == 'ALIVE']))")
        except AssertionError:
            return []

    def worker_nodes_of(self, submission_id: str, actor_class: str = "RayTrainWorker") -> list[str]:
        return self.query(
            "import json\nfrom ray.job_submission import JobSubmissionClient\nfrom ray.util.state import list_actors\n"
            f"job = JobSubmissionClient(ADDRESS).get_job_info({submission_id!r}).job_id\n"
            f"actors = list_actors(address=ADDRESS, filters=[('class_name', '=', {actor_class!r}), "
            "('job_id', '=', job)], limit=10000, raise_on_missing_output=False)\n"
            "print(json.dumps([a.node_id for a in actors]))")

    def cli(self, *args: str, cwd: Path | None = None, env: dict | None = None,
            timeout: int = 900) -> subprocess.CompletedProcess:
        """cluster/submit.py against this cluster, as a user runs it."""
        return subprocess.run([sys.executable, str(CLUSTER / "submit.py"), "--address", self.address, *args],
                              cwd=cwd, env=env or self.env, capture_output=True, text=True, timeout=timeout)

    def submit(self, cwd: Path, *entrypoint: str, env: dict | None = None,
               timeout: int = 900) -> subprocess.CompletedProcess:
        return self.cli("--", *entrypoint, cwd=cwd, env=env, timeout=timeout)

    def processes(self) -> list[int]:
        """PIDs of any process still using this cluster's temp dirs (raylets, GCS, workers, agents)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if str(self.root).encode() in (entry / "cmdline").read_bytes():
                        pids.append(int(entry.name))
                except OSError:
                    pass
        return pids

    def stop(self) -> None:
        for proc, _ in reversed(self.procs):  # the worker node first, then the head
            stop_process_group(proc, timeout=60)
        for pid in self.processes():  # a straggler outside the process groups
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def cluster():
    local = LocalCluster()
    try:
        local.start()
        yield local
    finally:
        local.stop()
        shutil.rmtree(local.root, ignore_errors=True)


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """The cluster's 'shared storage': one folder both nodes see, as NFS would be."""
    return tmp_path_factory.mktemp("shared")


@pytest.mark.slow
def test_a_bad_flag_ends_failed_with_the_message_in_the_logs(cluster, tmp_path):
    proc = cluster.submit(tmp_path, "python", "train_job.py", "--penalty", "2", timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "--penalty must be a negative number" in proc.stdout  # the job's own output, followed from its logs
    failed = re.search(r"job (raysubmit_\w+) FAILED: Job entrypoint command failed with exit code 2$", proc.stderr, re.M)
    assert failed, proc.stderr
    again = cluster.cli("--logs", failed.group(1), timeout=120)
    assert again.returncode == 1 and "--penalty must be a negative number" in again.stdout  # a finished job's logs, again
    unknown = cluster.cli("--logs", "raysubmit_nothing", timeout=120)
    assert unknown.returncode == 2 and "has no job raysubmit_nothing" in unknown.stderr
    wrong = cluster.submit(tmp_path, "python", "train_job.py", env={**cluster.env, "RAY_AUTH_TOKEN": "0" * 8},
                           timeout=120)
    assert wrong.returncode == 2 and "refused the request" in wrong.stderr and "RAY_AUTH_TOKEN" in wrong.stderr


@pytest.fixture(scope="module")
def train_submission(cluster, shared, mlflow_server):  # noqa: F811
    proc = cluster.submit(shared, "python", "train_job.py", "--num-workers", "2", "--epochs", "2,2,1,1",
                          "--no-prune-baseline",
                          "--name", "two-nodes", "--experiment", "cluster", "--mlflow-uri", mlflow_server,
                          "--storage-path", str(shared / "ray_results"), "--output", str(shared / "checkpoints"))
    submission_id = re.search(r"submitted (raysubmit_\w+)", proc.stderr)
    return proc, submission_id.group(1) if submission_id else None


@pytest.mark.slow
def test_training_job_runs_on_both_nodes_and_lands_in_mlflow(cluster, train_submission, mlflow_server):  # noqa: F811
    proc, submission_id = train_submission
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"job {submission_id} SUCCEEDED" in proc.stderr
    assert "[finetune] epoch 1/1" in proc.stdout and "Block Usage:" in proc.stdout
    # four stages x two workers, and every stage's pair spread over the two nodes (one CPU each)
    nodes = cluster.worker_nodes_of(submission_id)
    assert len(nodes) == 8 and set(nodes) == set(cluster.alive_nodes())

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("cluster").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("blockdrop.job") == "two-nodes")
    assert parent.info.status == "FINISHED"
    assert {"final_accuracy", "final_blocks_mean", "final_speedup"} <= set(parent.data.metrics)
    children = {r.data.params["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"pretrain", "nest", "depth", "finetune"}
    steps = sorted(m.step for m in client.get_metric_history(children["pretrain"].info.run_id, "test_accuracy"))
    assert steps == [0, 1]

    import mlflow.pyfunc
    import numpy as np

    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(f"runs:/{parent.info.run_id}/model")
    out = model.predict(np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1), dtype=np.uint8))  # raw pixels
    assert len(out) == 4 and {"prediction", "blocks_used"} <= set(out.columns)


@pytest.mark.slow
def test_a_sweep_submitted_the_same_way(cluster, train_submission, shared, mlflow_server):  # noqa: F811
    proc, _ = train_submission
    assert proc.returncode == 0, "the training job failed; see the test above"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("cluster").experiment_id])
    depth = next(r for r in runs if r.data.tags.get("mlflow.runName") == "two-nodes-depth")
    # the sweep fetches its starting point from MLflow, as it would on a cluster without shared files
    sweep = cluster.submit(shared, "python", "tune_penalty.py", "--init", f"runs:/{depth.info.run_id}/checkpoint",
                           "--penalties", "-1,-10", "--epochs", "2", "--max-concurrent", "2", "--no-prune-baseline", "--no-analysis",
                           "--name", "two-nodes-sweep", "--experiment", "cluster-sweeps", "--mlflow-uri", mlflow_server,
                           "--storage-path", str(shared / "ray_results"))
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    assert "2 trials finished, 0 failed" in sweep.stdout
    submission_id = re.search(r"submitted (raysubmit_\w+)", sweep.stderr).group(1)
    assert set(cluster.worker_nodes_of(submission_id)) == set(cluster.alive_nodes())  # 2 trials, 1 per node
    experiment = client.get_experiment_by_name("cluster-sweeps")
    children = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    trials = [r for r in children if "blockdrop.trial" in r.data.tags]
    assert sorted(float(r.data.params["gamma"]) for r in trials) == [-10.0, -1.0]
    assert all(r.info.status == "FINISHED" and "final_test_accuracy" in r.data.metrics for r in trials)
    assert client.get_model_version_by_alias("blockdrop-R26_DIGITS", "most_accurate")


@pytest.mark.slow
def test_everything_started_is_stopped(cluster):
    assert cluster.processes(), "the cluster's processes are visible while it runs"
    cluster.stop()
    wait_until(lambda: not cluster.processes(), 30, "cluster processes exit")
