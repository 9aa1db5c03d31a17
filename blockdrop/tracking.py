"""MLflow: where runs, metrics, checkpoints and models of this project are kept.

Tracking URI: `--mlflow-uri`, else MLFLOW_TRACKING_URI, else a sqlite file `mlflow.db` in the
working directory (MLflow 3's local default; `mlflow ui --backend-store-uri sqlite:///mlflow.db`).
A job's run carries the tag `blockdrop.job=<job name>`; starting the same job again continues that
run instead of opening a second one.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path

# Before mlflow is imported: keep its INFO chatter and telemetry out of users' consoles.
for _key, _value in {"MLFLOW_LOGGING_LEVEL": "WARNING", "MLFLOW_DISABLE_TELEMETRY": "true",
                     "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
                     "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}.items():
    os.environ.setdefault(_key, _value)

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from blockdrop.errors import UserError  # noqa: E402

JOB_TAG = "blockdrop.job"
PACKAGE_DIR = Path(__file__).resolve().parent


class _DropMessages(logging.Filter):
    def __init__(self, *needles: str):
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.needles)


# The model class is ours and travels as code: MLflow's generic cloudpickle caution is noise here.
logging.getLogger("mlflow.pyfunc").addFilter(_DropMessages("Passing a Python object as `python_model`"))


def metric_batch(metrics: dict[str, float], step: int) -> list[mlflow.entities.Metric]:
    now = int(time.time() * 1000)
    return [mlflow.entities.Metric(k, float(v), now, step) for k, v in metrics.items()]


def source_tags(entry: str) -> dict[str, str]:
    """MLflow's own source tags (shown as Source, User and Version in the UI): the CLI, the user, and
    the git commit of this code when it runs from a checkout."""
    import getpass
    import subprocess

    tags = {"mlflow.source.name": entry, "mlflow.source.type": "LOCAL"}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):
        pass
    try:
        commit = subprocess.run(["git", "-C", str(PACKAGE_DIR), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5)
        if commit.returncode == 0 and commit.stdout.strip():
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def resolve_uri(flag: str | None) -> str:
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"
    return uri


class Tracker:
    """One experiment on one tracking server; runs are addressed by id so workers can log too."""

    def __init__(self, uri: str, experiment: str, source: str | None = None):
        self.uri = uri
        self.source = source or Path(sys.argv[0]).name  # the CLI that started the work
        mlflow.set_tracking_uri(uri)  # also exported to child processes through the environment
        self.client = MlflowClient(uri)
        try:
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        except mlflow.exceptions.MlflowException as err:
            raise UserError(f"MLflow at {uri} refused the experiment {experiment!r}: {err.message}") from None
        except Exception as err:  # unreachable server, bad URI scheme, ...
            raise UserError(f"cannot reach MLflow at {uri} ({type(err).__name__}: {err}); "
                            "check --mlflow-uri / MLFLOW_TRACKING_URI") from None
        self.experiment = experiment
        self._before: dict[str, tuple[str, int | None]] = {}  # runs reopened here: their earlier status, end time

    def finished_job(self, job: str) -> str | None:
        """The id of `job`'s top-level run if it finished, else None."""
        runs = self.client.search_runs([self.experiment_id], f"tags.`{JOB_TAG}` = '{job}'", max_results=10,
                                       order_by=["attributes.start_time DESC"])
        top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        return top[0].info.run_id if top and top[0].info.status == "FINISHED" else None

    def job_exists(self, job: str) -> bool:
        return bool(self.client.search_runs([self.experiment_id], f"tags.`{JOB_TAG}` = '{job}'", max_results=1))

    def job_run(self, job: str, run_name: str, params: dict, parent_id: str | None = None) -> tuple[str, bool]:
        """The run of `job` (under `parent_id`), created or continued; True if it already existed."""
        query = f"tags.`{JOB_TAG}` = '{job}'"
        if parent_id:
            query += f" and tags.`mlflow.parentRunId` = '{parent_id}'"
        existing = self.client.search_runs([self.experiment_id], query, max_results=1,
                                           order_by=["attributes.start_time DESC"])
        if existing:
            run_id = existing[0].info.run_id
            self._before[run_id] = (existing[0].info.status, existing[0].info.end_time)
            self.client.update_run(run_id, status="RUNNING")
            return run_id, True
        tags = {JOB_TAG: job} | source_tags(self.source) | ({"mlflow.parentRunId": parent_id} if parent_id else {})
        run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
        self.client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()])
        return run_id, False

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        self.client.log_batch(run_id, metrics=metric_batch(metrics, step))

    def finish(self, run_id: str, ok: bool, restore: bool = False) -> None:
        """End the run. `restore`: after a failed attempt on a run that had finished before, put its
        earlier status and end time back rather than marking it FAILED."""
        status, end_time = self._before.get(run_id, (None, None))
        if not ok and restore and status == "FINISHED":
            self.client.set_terminated(run_id, status, end_time=end_time)
            return
        self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")

    def checkpoint(self, run_id: str) -> Path:
        """The run's checkpoint artifact (checkpoint/*.pt), downloaded."""
        names = [f.path for f in self.client.list_artifacts(run_id, "checkpoint") if f.path.endswith((".pt", ".t7"))]
        if not names:
            raise UserError(f"run {run_id} has no checkpoint artifact (checkpoint/*.pt)")
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=names[0], tracking_uri=self.uri))

    def run_url(self, run_id: str) -> str:
        if self.uri.startswith("http"):
            return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"
        return f"run {run_id} in experiment {self.experiment!r} ({self.uri})"

    def log_model(self, run_id: str, checkpoint: Path, report_text: str, example: np.ndarray,
                  name: str = "model", step: int = 0, params: dict | None = None) -> str:
        """Log the checkpoint, the report, and a pyfunc model that loads from that checkpoint.

        `example`: raw images (uint8, N x H x W x C), the model's input example and signature. The
        run's metrics at `step` (log the final figures there first) become the logged model's own
        metrics; `params` (gamma, lr, preset, ...) its parameters."""
        from mlflow.models import infer_signature
        from mlflow.types.schema import Schema, TensorSpec

        self.client.log_artifact(run_id, str(checkpoint), "checkpoint")
        self.client.log_text(run_id, report_text, "evaluation.txt")
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
            # our outputs are never missing, so MLflow's hint about integer columns does not apply
            warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
            signature = infer_signature(example, BlockDropModel.output_example(len(example)))
            # any height and width (the preset's evaluation transform resizes), the preset's channels
            signature.inputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, example.shape[-1]))])
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=BlockDropModel(),
                artifacts={"checkpoint": str(checkpoint)},
                code_paths=[str(PACKAGE_DIR)],
                input_example=example,
                signature=signature,
                step=step,
                params={k: str(v) for k, v in (params or {}).items()} or None,
                pip_requirements=[f"torch=={_version('torch')}", f"torchvision=={_version('torchvision')}",
                                  f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}",
                                  f"pillow=={_version('pillow')}"],
            )
        return info.model_uri


def raw_images(preset, tensors) -> np.ndarray:
    """What a client has: uint8 images (N, H, W, C) in 0..255, from the evaluation transform's output
    (normalised N, C, H, W tensors); the model's input example."""
    mean = np.asarray(preset.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(preset.std, dtype=np.float32)[:, None, None]
    pixels = (np.asarray(tensors, dtype=np.float32) * std + mean) * 255.0
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package).split("+")[0]


class BlockDropModel(mlflow.pyfunc.PythonModel):
    """An MLflow model: raw images in (uint8, N x H x W x C, 0..255, as decoded from PNG/JPEG; or
    a 1-D object array of encoded images: bytes or base64 strings), the preset's evaluation transform
    applied here; per image out: class, blocks used, FLOPs, policy."""

    def load_context(self, context) -> None:
        from blockdrop.checkpoints import load_models, read_checkpoint
        from blockdrop.data import eval_transform
        from blockdrop.flops import cost_model
        from blockdrop.presets import get_preset

        path = context.artifacts["checkpoint"]
        self.preset = get_preset(read_checkpoint(path).preset)
        self.backbone, self.policy, _ = load_models(self.preset, path)
        self.backbone.eval()
        if self.policy is not None:
            self.policy.eval()
        self.costs = cost_model(self.preset, self.policy)
        self.transform = eval_transform(self.preset)

    @staticmethod
    def output_example(n: int) -> pd.DataFrame:
        return pd.DataFrame({"prediction": np.zeros(n, dtype=np.int64), "blocks_used": np.zeros(n, dtype=np.int32),
                             "flops": np.zeros(n, dtype=np.float32), "policy": ["0"] * n})

    def images(self, model_input) -> "torch.Tensor":
        """Raw images to the network's input, or a ValueError that says what was expected. A 1-D object
        array holds one image per item: PNG/JPEG bytes, base64 strings of them, or pixel arrays (MLflow's
        signature check lets such ragged input through)."""
        import torch

        if isinstance(model_input, pd.DataFrame) and model_input.shape[1] == 1:
            model_input = model_input.iloc[:, 0].to_numpy()
        if isinstance(model_input, (list, tuple)) or (isinstance(model_input, np.ndarray) and model_input.dtype == object):
            return torch.stack([self._one(item, i) for i, item in enumerate(model_input)])
        return torch.stack([self._pixels(a) for a in self._check(np.asarray(model_input))])

    def _want(self) -> str:
        c = self.preset.in_channels
        return (f"uint8 images of shape (N, H, W, {c}) with pixel values 0..255 (the preset's size is "
                f"{self.preset.image_size}x{self.preset.image_size}; other sizes are resized), or a 1-D object "
                "array of PNG/JPEG bytes or base64 strings")

    def _one(self, item, i: int):
        import base64
        import binascii

        from blockdrop.data import decode_image

        if isinstance(item, np.ndarray) and item.dtype != object:
            return self._pixels(self._check(item[None])[0])
        if isinstance(item, str):
            try:
                item = base64.b64decode(item, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"image {i} is a string but not base64; expected {self._want()}") from None
        if not isinstance(item, (bytes, bytearray)):
            raise ValueError(f"image {i} is a {type(item).__name__}; expected {self._want()}")
        try:
            image = decode_image(bytes(item), self.preset.in_channels)
        except ValueError as err:
            raise ValueError(f"image {i}: {err}") from None
        return self.transform(image)

    def _pixels(self, array: np.ndarray):
        from PIL import Image

        c = self.preset.in_channels
        return self.transform(Image.fromarray(array[..., 0] if c == 1 else array, "L" if c == 1 else "RGB"))

    def _check(self, array: np.ndarray) -> np.ndarray:
        c, want = self.preset.in_channels, self._want()
        if array.dtype != np.uint8:
            raise ValueError(f"expected {want}, got dtype {array.dtype}; send raw pixels, not normalised values")
        if array.size and int(array.max()) <= 2:
            # MLflow's scoring server casts JSON numbers to the signature's uint8: values scaled to 0..1 or
            # normalised arrive as 0, 1 and 2, and would be classified as a black image without a word
            raise ValueError(f"expected {want}: every pixel value here is 0, 1 or 2, which is what values scaled "
                             "to 0..1 or normalised become; send the pixels as decoded from the image file")
        if array.ndim == 3 and c == 1:
            array = array[..., None]
        if array.ndim != 4 or array.shape[-1] != c or min(array.shape[1:3], default=0) < 1:
            raise ValueError(f"expected {want}, got shape {array.shape}")
        return array

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> pd.DataFrame:
        import torch

        from blockdrop.execution import run_sparse
        from blockdrop.models.resnet import PolicyNet
        from blockdrop.reinforce import greedy

        images = self.images(model_input)
        with torch.inference_mode():
            if self.policy is None:
                actions = torch.ones(len(images), self.preset.num_blocks)
                logits, flops = self.backbone(images), torch.full((len(images),), float(self.costs.full))
            else:
                actions = greedy(self.policy(images))
                logits = run_sparse(self.backbone, images, actions)
                flops = self.costs.per_image(actions, with_policy=isinstance(self.policy, PolicyNet))
        return pd.DataFrame({
            "prediction": logits.argmax(1).numpy(),
            "blocks_used": actions.sum(1).int().numpy(),
            "flops": flops.float().numpy(),
            "policy": ["".join(str(int(v)) for v in row) for row in actions.tolist()],
        })
