"""blockdrop is an installed package (pyproject.toml; scripts/with-venv installs it in editable mode).

In the interpreter the tests run with, from an unrelated folder and without PYTHONPATH: the package
imports, each console script answers --help, and the benchmarks run (they import blockdrop and
their sibling results_table). Four processes, started together: the module takes seconds.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]
BENCHMARKS = ["curriculum.py", "serving.py"]  # results_table found as the script's sibling; serving.py via sys.path


def pins() -> dict[str, Requirement]:
    found = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            req = Requirement(line.split("#")[0])
            found[req.name.lower()] = req
    return found


def test_dependencies_are_requirements_pins_as_ranges():
    pinned = pins()
    assert all(len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==" for req in pinned.values()), \
        "requirements.txt pins exact versions"
    ranges = {Requirement(dep).name.lower(): Requirement(dep) for dep in PYPROJECT["project"]["dependencies"]}
    test_only = {Requirement(dep).name.lower() for dep in PYPROJECT["project"]["optional-dependencies"]["test"]}
    backend = {Requirement(dep).name.lower() for dep in PYPROJECT["build-system"]["requires"]}
    assert set(ranges) | test_only | backend == set(pinned), "pyproject.toml and requirements.txt name the same packages"
    for name, req in ranges.items():
        version = next(iter(pinned[name].specifier)).version
        assert req.specifier.contains(version), f"pyproject.toml's {req} excludes requirements.txt's {pinned[name]}"
        assert req.extras == pinned[name].extras, name
    for dep in PYPROJECT["build-system"]["requires"]:
        assert Requirement(dep).specifier.contains(next(iter(pinned["setuptools"].specifier)).version)


def test_installed_metadata_is_this_checkout():
    import blockdrop

    try:
        dist = importlib.metadata.distribution("blockdrop")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"blockdrop is not installed in {sys.executable}: run the tests with scripts/with-venv")
    assert dist.version == blockdrop.__version__
    assert {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"} == SCRIPTS, \
        "the installed entry points are stale: scripts/with-venv reinstalls when pyproject.toml changes"


# One process runs every console script's file in turn (they share their imports, which are most of
# the time --help takes); one more runs a script as the executable pip wrote, shebang and all.
DRIVER = """
import contextlib, io, json, runpy, sys, traceback
import blockdrop
results = {"import": blockdrop.__file__}
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(path, run_name="__main__")
        code = 0
    except SystemExit as exit:
        code = exit.code or 0
    except Exception:
        code = traceback.format_exc()
    results[path] = [code, out.getvalue()]
print(json.dumps(results))
"""


def scripts_dir() -> Path:
    return Path(sysconfig.get_path("scripts"))  # where pip put this interpreter's console scripts


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """The commands, all started at once, from an empty folder with PYTHONPATH unset (as a user runs
    them after `source .venv/bin/activate`)."""
    cwd = tmp_path_factory.mktemp("elsewhere")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    installed = [str(scripts_dir() / name) for name in SCRIPTS if (scripts_dir() / name).is_file()]
    commands = {"driver": [sys.executable, "-c", DRIVER, *installed],
                "blockdrop-train": [str(scripts_dir() / "blockdrop-train"), "--help"]}
    commands |= {f"benchmarks/{name}": [sys.executable, str(REPO / "benchmarks" / name), "--help"] for name in BENCHMARKS
                 if (REPO / "benchmarks" / name).is_file()}
    procs = {key: subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for key, cmd in commands.items() if Path(cmd[0]).is_file()}
    done = {}
    for key, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        done[key] = subprocess.CompletedProcess(commands[key], proc.returncode, out, err)
    return done


def driver_results(elsewhere) -> dict:
    proc = elsewhere["driver"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_blockdrop_imports_from_another_folder_without_pythonpath(elsewhere):
    # editable install: this checkout's code, found with neither the cwd nor PYTHONPATH pointing here
    assert Path(driver_results(elsewhere)["import"]) == REPO / "blockdrop" / "__init__.py"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_answers_help(elsewhere, name):
    path = scripts_dir() / name
    assert path.is_file(), f"{name} is not installed in {path.parent}: run the tests with scripts/with-venv"
    code, out = driver_results(elsewhere)[str(path)]
    assert code == 0 and out.startswith("usage:") and "--help" in out, (code if isinstance(code, str) else out)[-2000:]


@pytest.mark.slow
def test_console_script_runs_as_an_executable(elsewhere):
    assert "blockdrop-train" in elsewhere, f"blockdrop-train is not installed in {scripts_dir()}"
    proc = elsewhere["blockdrop-train"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:") and "--preset" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_runs_from_another_folder(elsewhere, name):
    if not (REPO / "benchmarks").is_dir():
        pytest.skip("no benchmarks/ here (the image leaves it out)")
    proc = elsewhere[f"benchmarks/{name}"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:")
