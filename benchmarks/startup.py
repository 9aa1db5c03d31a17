"""Start-up time of the command-line tools: `--help` and the errors they report before any work starts.

    scripts/with-venv python benchmarks/startup.py [--quick] [--runs N] [--against REF]
        [--output benchmarks/results/startup_cpu.md]

Every command runs in a fresh interpreter (a subprocess, as a user starts it), from an empty folder,
without MLFLOW_TRACKING_URI or RAY_ADDRESS; the rounds are interleaved, command after command, so that
a busy machine slows all of them alike; the table gives each command's median and range of wall time.
The exit status and a piece of the expected message are checked on every run (a command that answers
fast but wrongly is no result). One more run per command under `python -X importtime` lists which
heavy packages (torch, torchvision, ray, mlflow) it imported. Commands: train_job.py, tune_penalty.py
and serve_policy.py, then the `blockdrop-*` console scripts installed next to this interpreter.

`--against REF` times the same commands on the code of a git commit too (`git archive REF`, unpacked in a
temporary folder and put first on PYTHONPATH; the console scripts then import that copy) and adds the
before/after columns, both run in the same rounds. `--quick`: 3 rounds instead of 7 (under 2 minutes
without --against, once the commands start light).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import io
import os
import platform
import shlex
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from results_table import emit

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "ray", "mlflow")


@dataclass(frozen=True)
class Case:
    """One command line: `script` (a file of the repository) or `entry` (a console script's name)."""

    label: str  # what the table shows
    args: tuple[str, ...]
    code: int  # expected exit status
    says: str  # expected in its output
    script: str | None = None
    entry: str | None = None
    note: str = ""  # shown after the command

    def shown(self) -> str:
        return f"`{self.label}`" + (f" ({self.note})" if self.note else "")


def cases() -> list[Case]:
    unknown = "unknown preset 'R999'"
    found = [
        Case("train_job.py --help", ("--help",), 0, "usage: train_job.py", script="train_job.py"),
        Case("train_job.py --preset R999", ("--preset", "R999"), 2, unknown, script="train_job.py"),
        Case("train_job.py --penalty 2", ("--penalty", "2"), 2, "--penalty must be a negative number",
             script="train_job.py"),
        Case("train_job.py --dataset imagefolder --data-dir nowhere",
             ("--dataset", "imagefolder", "--data-dir", "nowhere"), 2, "imagefolder data not found",
             script="train_job.py", note="a check that reads files: torch"),
        Case("tune_penalty.py --help", ("--help",), 0, "usage: tune_penalty.py", script="tune_penalty.py"),
        Case("tune_penalty.py --init x.pt --penalties -1 --preset R999",
             ("--init", "x.pt", "--penalties", "-1", "--preset", "R999"), 2, unknown, script="tune_penalty.py"),
        Case("tune_penalty.py --init x.pt --penalties -1,2", ("--init", "x.pt", "--penalties", "-1,2"), 2,
             "--penalties must all be negative", script="tune_penalty.py"),
        Case("tune_penalty.py --init missing.pt --penalties -1", ("--init", "missing.pt", "--penalties", "-1"), 2,
             "missing.pt does not exist", script="tune_penalty.py", note="a check that reads files: torch"),
        Case("serve_policy.py --help", ("--help",), 0, "usage: serve_policy.py", script="serve_policy.py"),
        Case("serve_policy.py --preset R999", ("--preset", "R999"), 2, unknown, script="serve_policy.py"),
        Case("serve_policy.py --autoscale 3", ("--autoscale", "3"), 2, "--autoscale wants MIN,MAX",
             script="serve_policy.py"),
    ]
    errors = {  # one error path per console script: the same as its script's where it has one
        "blockdrop-train": (("--preset", "R999"), unknown),
        "blockdrop-sweep": (("--init", "x.pt", "--penalties", "-1", "--preset", "R999"), unknown),
        "blockdrop-serve": (("--preset", "R999"), unknown),
        "blockdrop-evaluate": (("--preset", "R999"), unknown),
        "blockdrop-flops": (("--preset", "R999"), unknown),
        "blockdrop-sample-data": (("bogus", "folder"), "invalid choice: 'bogus'"),
        "blockdrop-quickstart": (("--no-such-flag",), "unrecognized arguments: --no-such-flag"),
    }
    scripts = Path(sysconfig.get_path("scripts"))
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for name in [name for name in declared if (scripts / name).is_file()]:  # pyproject.toml's order
        found.append(Case(f"{name} --help", ("--help",), 0, "usage:", entry=name))
        if name in errors:
            args, says = errors[name]
            found.append(Case(f"{name} {shlex.join(args)}", args, 2, says, entry=name))
    return found


def command(case: Case, root: Path, importtime: bool = False) -> list[str]:
    """What a user types: `python SCRIPT ...` or the console script itself (shebang and all)."""
    if case.script:
        path = str(root / case.script)
    else:
        path = str(Path(sysconfig.get_path("scripts")) / case.entry)
    if importtime:
        return [sys.executable, "-X", "importtime", path, *case.args]
    return [sys.executable, path, *case.args] if case.script else [path, *case.args]


def environment(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PYTHONPATH")}
    return env | {"PYTHONPATH": str(root)}  # the tree being timed comes first, before the editable install


def run_once(case: Case, root: Path, cwd: Path, importtime: bool = False) -> tuple[float, str | None, str]:
    """Seconds, a complaint (None when the command answered as expected), stderr."""
    began = time.perf_counter()
    proc = subprocess.run(command(case, root, importtime), cwd=cwd, env=environment(root), capture_output=True,
                          text=True, timeout=300)
    seconds = time.perf_counter() - began
    complaint = None
    if proc.returncode != case.code:
        complaint = f"exit {proc.returncode}, expected {case.code}"
    elif case.says not in proc.stdout + proc.stderr:
        complaint = f"output lacks {case.says!r}"
    if complaint:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        complaint += f": {' / '.join(tail)}"
    return seconds, complaint, proc.stderr


def heavy_imports(importtime_stderr: str) -> list[str]:
    """The HEAVY packages a `-X importtime` listing shows."""
    seen = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip().split(".")[0]
            if name in HEAVY:
                seen.add(name)
    return [name for name in HEAVY if name in seen]


@dataclass
class Timing:
    seconds: list[float]
    imports: list[str]
    complaint: str | None

    def cell(self) -> str:
        if self.complaint:
            return f"**wrong answer** ({self.complaint})"
        return (f"{statistics.median(self.seconds):.2f} "
                f"({min(self.seconds):.2f}-{max(self.seconds):.2f})")

    def imported(self) -> str:
        return ", ".join(self.imports) or "none"


def measure(all_cases: list[Case], trees: dict[str, Path], runs: int) -> dict[str, dict[str, Timing]]:
    """Timings by tree and command; each round runs every command on every tree, one after the other."""
    with tempfile.TemporaryDirectory(prefix="startup-") as folder:
        cwd = Path(folder)
        result: dict[str, dict[str, Timing]] = {tree: {} for tree in trees}
        for tree, root in trees.items():  # warm-up (bytecode caches) and the import listing
            for case in all_cases:
                _, complaint, stderr = run_once(case, root, cwd, importtime=True)
                result[tree][case.label] = Timing([], heavy_imports(stderr), complaint)
        for round_ in range(runs):
            for case in all_cases:
                for tree, root in trees.items():
                    seconds, complaint, _ = run_once(case, root, cwd)
                    timing = result[tree][case.label]
                    timing.seconds.append(seconds)
                    timing.complaint = timing.complaint or complaint
            print(f"round {round_ + 1}/{runs} done", file=sys.stderr, flush=True)
        leftovers = sorted(p.name for p in cwd.iterdir())
        if leftovers:  # an error path or --help that writes files is itself a finding
            print(f"note: the commands left {leftovers} in their working folder", file=sys.stderr)
    return result


def unpack(ref: str, into: Path) -> Path:
    """The repository's files at commit `ref` (git archive), without touching the work tree or the index."""
    data = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", ref], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def header(runs: int) -> list[str]:
    machine = platform.node() or "unknown host"
    cpu = platform.processor() or platform.machine()
    today = datetime.date.today().isoformat()
    shown = " ".join(["python", "benchmarks/startup.py", *sys.argv[1:]])
    return [f"### CLI start-up: wall seconds from start to exit, median (min-max) of {runs} fresh interpreters",
            "",
            f"{today}, {machine} ({cpu}, {os.cpu_count()} CPU cores), Python {platform.python_version()}, "
            f"torch {version('torch')}, torchvision {version('torchvision')}, ray {version('ray')}, "
            f"mlflow {version('mlflow')}. Command: `{shown}`",
            ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 7")
    parser.add_argument("--runs", type=int, help="rounds (fresh interpreters per command); overrides --quick")
    parser.add_argument("--against", metavar="REF", help="also time the code of this git commit (before/after)")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "startup_cpu.md"),
                        help="markdown file to write (default benchmarks/results/startup_cpu.md); '' for none")
    args = parser.parse_args()
    runs = args.runs or (3 if args.quick else 7)
    if runs < 1:
        parser.error("--runs must be at least 1")

    all_cases = cases()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="startup-ref-") as folder:
        trees = {"this tree": REPO}
        if args.against:
            trees = {args.against: unpack(args.against, Path(folder))} | trees
        timings = measure(all_cases, trees, runs)
    now = timings["this tree"]

    lines = header(runs)
    if not args.against:
        lines += ["| command | seconds | heavy packages imported |", "|---|---|---|"]
        lines += [f"| {c.shown()} | {now[c.label].cell()} | {now[c.label].imported()} |" for c in all_cases]
    else:
        before = timings[args.against]
        lines += [f"| command | before ({args.against}): seconds | imported | after (this tree): seconds | imported "
                  "| faster |",
                  "|---|---|---|---|---|---|"]
        for c in all_cases:
            old, new = before[c.label], now[c.label]
            ratio = (f"{statistics.median(old.seconds) / statistics.median(new.seconds):.1f}x"
                     if not (old.complaint or new.complaint) else "-")
            lines.append(f"| {c.shown()} | {old.cell()} | {old.imported()} | {new.cell()} | {new.imported()} "
                         f"| {ratio} |")
    lines += ["", f"heavy packages: {', '.join(HEAVY)} (a `python -X importtime` run of each command); "
                  f"the interpreter alone (`python -c pass`) takes {baseline():.2f} s here. Load average (1 min) "
                  f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end: other work on the machine "
                  "widens the ranges."]
    emit(lines, args.output or None)


def baseline(runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


if __name__ == "__main__":
    main()
