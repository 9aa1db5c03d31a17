"""Submit a BlockDrop job to a Ray cluster, follow its logs, report how it ended.

    python cluster/submit.py --address http://HEAD:8265 -- python train_job.py --preset R32_C10 --gpu

It does what `ray job submit --working-dir .` does, through Ray's JobSubmissionClient, and adds
what a team needs around it: token authentication switched on when a token is at hand, a clear
message when the cluster cannot be reached or refuses the token, Ctrl-C that detaches instead of
killing the job, and an exit status scripts can use (0 SUCCEEDED, 1 FAILED or STOPPED, 2 usage
or connection errors). It needs only `ray[default]` on the submitting machine, not torch.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Uploaded with the working dir only if a user asks: local stores and outputs (.gitignore'd too).
EXCLUDES = [".git", ".venv", "/mlruns/", "/mlflow.db", "/checkpoints/", "/data/", "*.pt"]


class SubmitError(Exception):
    """Something the user can fix: the message says what."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cluster/submit.py",
        description="Submit a job to a Ray cluster through the Jobs API (the dashboard's HTTP port, 8265),\n"
                    "upload the project as its working dir, follow its logs and exit with its outcome.\n"
                    "Token authentication: with RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token present,\n"
                    "RAY_AUTH_MODE=token is set for you (docs/cluster.md, \"Token authentication\").",
        epilog="Examples:\n"
               "  python cluster/submit.py -- python train_job.py --preset R32_C10 --num-workers 4 --gpu \\\n"
               "      --data-dir /mnt/shared/data --storage-path /mnt/shared/ray_results\n"
               "  python cluster/submit.py --no-follow -- python tune_penalty.py --init runs:/ID/checkpoint "
               "--penalties -1,-5,-10\n"
               "  python cluster/submit.py --logs raysubmit_XXXX      # follow a job submitted earlier\n"
               "Exit status: 0 SUCCEEDED, 1 FAILED or STOPPED, 2 bad usage or cluster unreachable, "
               "3 still running (--no-follow).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--address", help="Ray dashboard URL (default $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS if it "
                                          f"is http(s), else {DEFAULT_ADDRESS}, e.g. through `ray dashboard`)")
    parser.add_argument("--working-dir", default=str(REPO),
                        help="folder uploaded as the job's working dir (default: this repository; .gitignore'd "
                             "files, .git and .venv are left out)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the job (repeatable), e.g. MLFLOW_TRACKING_URI=http://mlflow:5000")
    parser.add_argument("--submission-id", help="job id to use (default: Ray makes one); must be new")
    parser.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the driver (default 0)")
    parser.add_argument("--no-follow", action="store_true", help="submit and return at once (exit 3)")
    parser.add_argument("--logs", metavar="SUBMISSION_ID", help="follow an existing job instead of submitting one")
    parser.add_argument("--stop", metavar="SUBMISSION_ID", help="stop a running job")
    parser.add_argument("entrypoint", nargs=argparse.REMAINDER,
                        help="after --: the command the job runs, e.g. python train_job.py ...")
    return parser


def resolve_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address:
        ray_address = os.environ.get("RAY_ADDRESS", "")
        address = ray_address if ray_address.startswith(("http://", "https://")) else DEFAULT_ADDRESS
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")


def token_available() -> bool:
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or (Path(path).is_file() if path else
                                                      (Path.home() / ".ray" / "auth_token").is_file())


def setup_auth() -> None:
    """Ray's clients send the token only with RAY_AUTH_MODE=token; set it when a token is there."""
    if "RAY_AUTH_MODE" not in os.environ and token_available():
        os.environ["RAY_AUTH_MODE"] = "token"


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SubmitError(f"--env takes KEY=VALUE, not {pair!r}")
        env[key] = value
    return env


def connect(address: str):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    # Ray's SDK logs every upload step and that .git/.venv are left out; this CLI says what matters.
    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        return JobSubmissionClient(address)
    except AuthenticationError as err:
        raise SubmitError(f"the cluster at {address} refused the request: {str(err).splitlines()[0]}\n"
                          "  give this machine the cluster's token: export RAY_AUTH_TOKEN=... "
                          "(or RAY_AUTH_TOKEN_PATH=FILE, or ~/.ray/auth_token)") from None
    except (ConnectionError, RuntimeError) as err:
        raise SubmitError(f"cannot reach the Ray dashboard at {address}: {str(err).splitlines()[0]}\n"
                          "  is the cluster up, and the dashboard port (8265) reachable? "
                          "For a launcher cluster: `ray dashboard cluster/ray-cluster.yaml`; on Kubernetes: "
                          "`kubectl -n blockdrop port-forward svc/blockdrop-head-svc 8265`") from None


def job_request(args: argparse.Namespace) -> tuple[str, dict]:
    """The entrypoint and runtime env, checked before anything is sent."""
    entrypoint = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    if not entrypoint:
        raise SubmitError("give the job's command after --, e.g. -- python train_job.py --preset R32_C10")
    working_dir = Path(args.working_dir).resolve()
    if not working_dir.is_dir():
        raise SubmitError(f"--working-dir {args.working_dir} is not a folder")
    runtime_env = {"working_dir": str(working_dir), "excludes": EXCLUDES}
    env = parse_env(args.env)
    if env:
        runtime_env["env_vars"] = env
    return shlex.join(entrypoint), runtime_env


def submit(client, args: argparse.Namespace, entrypoint: str, runtime_env: dict) -> str:
    try:
        return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                 submission_id=args.submission_id, entrypoint_num_cpus=args.entrypoint_num_cpus)
    except RuntimeError as err:
        raise SubmitError(f"the cluster did not accept the job: {str(err).splitlines()[0]}") from None


async def follow(client, submission_id: str) -> None:
    async for lines in client.tail_job_logs(submission_id):
        sys.stdout.write(lines)
        sys.stdout.flush()


def wait_for_end(client, submission_id: str, timeout_s: float = 30.0):
    """The status once terminal: the log stream can close a moment before the status is written."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = client.get_job_info(submission_id)
        if info.status.is_terminal() or time.monotonic() > deadline:
            return info
        time.sleep(0.5)


def report(info) -> int:
    status = str(info.status.value if hasattr(info.status, "value") else info.status)
    line = f"job {info.submission_id} {status}"
    if info.message:  # Ray appends the log tail, which was just followed: keep its first clause
        line += ": " + info.message.splitlines()[0].split(", last available logs")[0].rstrip(":")
    print(line, file=sys.stderr)
    return {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1}.get(status, 3)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_auth()
    address = resolve_address(args.address)
    request = None if args.logs or args.stop else job_request(args)
    client = connect(address)
    try:
        return run(client, address, args, request)
    except SubmitError:
        raise
    except Exception as err:  # the cluster went away or refused mid-way: say so, not a traceback
        from ray.exceptions import AuthenticationError

        if isinstance(err, AuthenticationError):
            raise SubmitError(f"the cluster at {address} refused the request: {str(err).splitlines()[0]}") from None
        if isinstance(err, (OSError, ValueError)) or type(err).__module__.split(".")[0] in ("requests", "aiohttp"):
            raise SubmitError(f"talking to {address} failed: {type(err).__name__}: {str(err).splitlines()[0]}") \
                from None
        raise


def run(client, address: str, args: argparse.Namespace, request: tuple[str, dict] | None) -> int:
    for known in filter(None, (args.logs, args.stop)):
        try:
            client.get_job_info(known)
        except RuntimeError:
            raise SubmitError(f"the cluster at {address} has no job {known} (`ray job list` lists them)") from None
    if args.stop:
        stopped = client.stop_job(args.stop)
        print(f"job {args.stop}: {'stop requested' if stopped else 'was not running'}", file=sys.stderr)
        return 0
    submission_id = args.logs or submit(client, args, *request)
    if not args.logs:
        print(f"submitted {submission_id} to {address}  (dashboard: {address}/#/jobs/{submission_id})",
              file=sys.stderr)
    if args.no_follow:
        print(f"follow it: python cluster/submit.py --address {address} --logs {submission_id}", file=sys.stderr)
        return 3
    try:
        asyncio.run(follow(client, submission_id))
    except KeyboardInterrupt:
        print(f"\ndetached: job {submission_id} keeps running; stop it with "
              f"python cluster/submit.py --address {address} --stop {submission_id}", file=sys.stderr)
        return 3
    except RuntimeError as err:  # the log stream broke (head restarted, network): the job may still run
        print(f"log stream closed: {err}", file=sys.stderr)
    return report(wait_for_end(client, submission_id))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SubmitError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
