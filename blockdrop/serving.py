"""Serving BlockDrop: models from MLflow or files, per-image sparse execution, the front behind one endpoint.

`resolve` turns model URIs into local checkpoints plus the figures MLflow recorded with them, before
anything is deployed; `Engine` is the model side (decode, choose a model, predict through
blockdrop.inference), plain PyTorch so that it is tested without a server; the Ray Serve deployment
around it is blockdrop.serve_app's.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from blockdrop import inference
from blockdrop.budget import check_budget
from blockdrop.checkpoints import save_checkpoint
from blockdrop.errors import UserError
from blockdrop.preflight import resolve_uri

DEFAULT_MODEL = "blockdrop-R26_DIGITS"  # what the Quickstart's sweep registers
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass
class ModelSource:
    """One model to serve: a local checkpoint and the figures recorded with it."""

    label: str  # what a request names it by: the version, or the file's stem
    name: str
    version: str | None
    checkpoint: str
    aliases: list[str] = field(default_factory=list)
    run_id: str | None = None
    accuracy: float | None = None
    flops: float | None = None
    speedup: float | None = None
    full: bool = False  # run every block, no policy network: the full model, for comparisons


class RequestError(Exception):
    """A request the server refuses; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------- resolving URIs

def _checkpoint_of_run(client, run_id: str, uri: str) -> str:
    """The run's checkpoint artifact, downloaded (the weights only: no pickled model code is read)."""
    names = [f.path for f in client.list_artifacts(run_id, "checkpoint") if f.path.endswith((".pt", ".t7", ".pth"))]
    if not names:
        raise UserError(f"{uri}: run {run_id} has no checkpoint artifact (checkpoint/*.pt); is it a BlockDrop run?")
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=names[0], tracking_uri=client.tracking_uri)


def _recorded(client, run_id: str) -> dict[str, float | None]:
    metrics = client.get_run(run_id).data.metrics
    return {"accuracy": metrics.get("final_test_accuracy"), "flops": metrics.get("final_flops_per_image"),
            "speedup": metrics.get("final_speedup")}


def _aliases(client, name: str, version: str) -> list[str]:
    """The registered model's aliases that point at `version` (a version found by search lacks them)."""
    aliases = client.get_registered_model(name).aliases or {}
    if isinstance(aliases, dict):
        return sorted(alias for alias, v in aliases.items() if str(v) == str(version))
    return sorted(a.alias for a in aliases if str(a.version) == str(version))


def _from_version(client, mv, uri: str) -> ModelSource:
    aliases = _aliases(client, mv.name, mv.version)
    if not mv.run_id:
        raise UserError(f"{uri}: version {mv.version} of {mv.name} has no run; not a BlockDrop model")
    return ModelSource(label=str(mv.version), name=mv.name, version=str(mv.version), aliases=aliases,
                       run_id=mv.run_id, checkpoint=_checkpoint_of_run(client, mv.run_id, uri),
                       **_recorded(client, mv.run_id))


def _from_models_uri(client, uri: str) -> list[ModelSource]:
    from blockdrop.tracking import quoted

    rest = uri[len("models:/"):]
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return [_from_version(client, client.get_model_version_by_alias(name, alias), uri)]
        if "/" in rest:
            name, version = rest.split("/", 1)
            return [_from_version(client, client.get_model_version(name, version), uri)]
        versions = client.search_model_versions(f"name = {quoted(rest)}")
    except MlflowException as err:
        raise UserError(f"{uri}: not found in the MLflow registry ({err.message.splitlines()[0]})") from None
    if not versions:
        raise UserError(f"{uri}: no registered model called {rest!r} (or it has no versions)")
    return [_from_version(client, mv, uri) for mv in sorted(versions, key=lambda v: int(v.version))]


def _from_runs_uri(client, uri: str) -> ModelSource:
    match = re.fullmatch(r"runs:/([0-9a-f]+)(/.*)?", uri)
    if not match:
        raise UserError(f"{uri}: expected runs:/RUN_ID[/PATH]")
    run_id = match.group(1)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UserError(f"{uri}: no such run in the MLflow store") from None
    return ModelSource(label=run.info.run_name or run_id[:8], name=run.info.run_name or run_id, version=None,
                       run_id=run_id, checkpoint=_checkpoint_of_run(client, run_id, uri), **_recorded(client, run_id))


def _from_file(path: str) -> ModelSource:
    """A checkpoint file; the figures it records are read with the model (Engine)."""
    return ModelSource(label=Path(path).stem, name=Path(path).stem, version=None, checkpoint=str(path))


def resolve(uris: list[str], tracking_uri: str) -> list[ModelSource]:
    """Every model the URIs name, each with a local checkpoint; a UserError for any that is wrong."""
    sources: list[ModelSource] = []
    client = None
    for uri in uris:
        if uri.startswith(("models:/", "runs:/")):
            client = client or MlflowClient(tracking_uri)
            sources += _from_models_uri(client, uri) if uri.startswith("models:/") else [_from_runs_uri(client, uri)]
        elif "://" in uri or uri.startswith(("models:", "runs:")):
            raise UserError(f"{uri}: unknown model URI; use models:/NAME[@ALIAS|/VERSION], runs:/RUN_ID or a file")
        else:
            sources.append(_from_file(uri))
    labels = [s.label for s in sources]
    for i, s in enumerate(sources):  # two files with the same stem, two runs with the same name
        if labels.count(s.label) > 1:
            s.label = f"{s.label}-{i + 1}"
    return sources


# ---------------------------------------------------------------- the model side

def class_labels(preset) -> list[str]:
    if preset.dataset == "digits":
        return [str(d) for d in range(10)]
    if preset.dataset == "cifar10":
        return list(CIFAR10_CLASSES)
    return [str(i) for i in range(preset.num_classes)]


@dataclass
class Served:
    source: ModelSource
    model: inference.Model


class Engine:
    """The served models of one preset; decodes images, picks a model per request, predicts per image."""

    def __init__(self, sources: list[ModelSource], preset_name: str | None = None, device: str = "cpu"):
        if not sources:
            raise UserError("no model to serve")
        self.models: dict[str, Served] = {}
        for s in sources:  # each file read once, here
            model = inference.load(s.checkpoint, preset_name, device=device)
            if model.policy is None:
                raise UserError(f"{s.checkpoint} holds a ResNet but no policy network: not a BlockDrop model")
            _record_figures(s, model.checkpoint.meta)
            self.models[s.label] = Served(s, model)
        names = {served.model.preset.name for served in self.models.values()}
        if len(names) > 1:
            raise UserError(f"the models are for different presets ({', '.join(sorted(names))}); serve one preset at a time")
        first = next(iter(self.models.values())).model
        self.preset, self.costs, self.decoder = first.preset, first.costs, first.decoder
        self.full_flops = float(first.costs.full)
        self.classes = class_labels(self.preset)
        # A request names a model by its label (the version) or any of its aliases.
        self.names = {alias: label for label, m in self.models.items() for alias in m.source.aliases}
        self.names.update({label: label for label in self.models})

    # -- requests
    def decode(self, data: bytes) -> torch.Tensor:
        try:
            return self.decoder(data)
        except inference.ImageTooLarge as err:
            raise RequestError(str(err), 413) from None
        except ValueError:
            raise RequestError("not an image (PNG, JPEG or another format Pillow reads)") from None

    def choose(self, model: str | None = None, mean_flops: float | None = None, max_flops: float | None = None) -> str:
        """The label of the model that answers: named; else, for a budget, a budget model where one is served
        (it meets any budget), else the most accurate whose recorded mean FLOPs are within it; else the most
        accurate."""
        if model is not None:
            if model not in self.names:
                raise RequestError(f"unknown model {model!r}; served: {', '.join(sorted(self.names))}", 404)
            return self.names[model]

        def recorded_flops(m: Served) -> float:
            return m.source.flops if m.source.flops is not None else self.full_flops

        candidates = list(self.models.values())
        asked = min(b for b in (mean_flops, max_flops, math.inf) if b is not None)
        if math.isfinite(asked):
            budgeted = [m for m in candidates if inference.is_budget_model(m.model.policy)]
            candidates = budgeted or [m for m in candidates if recorded_flops(m) <= asked]
            if not candidates:
                cheapest = min(recorded_flops(m) for m in self.models.values())
                raise RequestError(f"no served model fits {'mean_flops' if mean_flops == asked else 'max_flops'}="
                                   f"{asked:.3E}: the cheapest needs {cheapest:.3E} on average", 422)
        best = max(candidates, key=lambda m: (m.source.accuracy or 0.0, -recorded_flops(m)))
        return best.source.label

    def mean_flops(self, ask: Ask) -> float | None:
        """A request's mean target in FLOPs (`budget` is a share of the full ResNet's)."""
        return ask.mean_flops if ask.budget is None else ask.budget * self.full_flops

    def ask(self, label: str, ask: Ask) -> tuple[float | None, float | None]:
        """A request's budget for the model `label` as shares of the full ResNet's FLOPs, (mean target, per-image
        cap), or a RequestError (422) when the model cannot meet it."""
        served = self.models[label]
        mean = ask.budget if ask.budget is not None else None if ask.mean_flops is None else ask.mean_flops / self.full_flops
        cap = None if ask.max_flops is None else ask.max_flops / self.full_flops
        budget_model = inference.is_budget_model(served.model.policy)
        if mean is not None and not budget_model:
            if ask.model is not None:
                raise RequestError(f"model {label} runs at one trade-off: a mean budget (budget, mean_flops) needs a "
                                   "budget model (train_job.py --policy budget); max_flops caps each image", 422)
            mean = None  # a front of fixed models: the budget chose the model (Engine.choose)
        if (mean is not None or cap is not None) and served.source.full:
            raise RequestError(f"model {label} is the full ResNet: it runs every block whatever the budget", 422)
        cheapest = served.model.cheapest()
        for name, share in (("budget" if ask.budget is not None else "mean_flops", mean), ("max_flops", cap)):
            if share is not None and share < cheapest:
                raise RequestError(f"{name} asks for {share * self.full_flops:.3E} FLOPs ({share:.3f} of the full "
                                   f"ResNet's); an image costs at least {cheapest * self.full_flops:.3E} under model "
                                   f"{label} (stem, head and policy network, no block)", 422)
        return mean, cap

    def predict(self, label: str, images: torch.Tensor, budgets: list[tuple[float | None, float | None]] | None = None
                ) -> list[dict]:
        """Each image's answer; its blocks are chosen by its own policy (at its own budget: a (mean target,
        cap) per image, shares of the full ResNet's FLOPs, from `ask`) and only those are run."""
        served = self.models[label]
        mean = cap = None
        if budgets and any(b is not None for pair in budgets for b in pair):
            default = float(served.model.policy.budget) if inference.is_budget_model(served.model.policy) else None
            if default is not None:
                # a cap alone: the image decides as under a mean target of the cap (BudgetPolicy.depths)
                mean = torch.tensor([m if m is not None else c if c is not None else default for m, c in budgets],
                                    dtype=torch.float64)
            if any(c is not None for _, c in budgets):
                cap = torch.tensor([math.inf if c is None else c for _, c in budgets], dtype=torch.float64)
        out = served.model.predict(images, full=served.source.full, budget=mean, cap=cap)
        confidence, classes = torch.softmax(out.logits, dim=1).max(1)
        model = {"name": served.source.name, "version": served.source.version, "label": label}
        asks = budgets or [(None, None)] * len(images)
        return [{
            "class": c, "label": self.classes[c] if c < len(self.classes) else str(c), "probability": p,
            "policy": policy, "blocks_used": int(b), "flops": f, "full_flops": self.full_flops, "model": model,
            "budget": {"mean_flops": None if m is None else m * self.full_flops,
                       "max_flops": None if k is None else k * self.full_flops},
        } for c, p, policy, b, f, (m, k) in zip(classes.tolist(), confidence.tolist(), out.policy_strings(),
                                                 out.blocks.tolist(), out.flops.tolist(), asks)]

    def metadata(self) -> dict:
        return {
            "preset": self.preset.name, "classes": self.classes, "num_blocks": self.preset.num_blocks,
            "full_flops": self.full_flops, "default_model": self.choose(),
            "models": [{k: v for k, v in asdict(m.source).items() if k != "checkpoint"}
                       | {"budget_model": inference.is_budget_model(m.model.policy),
                          "cheapest_flops": m.model.cheapest() * self.full_flops} for m in self.models.values()],
        }


def _record_figures(source: ModelSource, meta: dict) -> None:
    """A checkpoint file's own figures for a source that MLflow gave none."""
    metrics = meta.get("metrics", {}) if isinstance(meta, dict) else {}
    for name, key in (("accuracy", "test_accuracy"), ("flops", "flops_per_image"), ("speedup", "speedup")):
        if getattr(source, name) is None and source.run_id is None:
            setattr(source, name, metrics.get(key))


def parse_images(body: bytes, content_type: str, max_images: int) -> tuple[list[bytes], dict]:
    """The raw images of a request body and any routing fields in it (JSON: ASK_FIELDS)."""
    if not body:
        raise RequestError("empty body: send an image (Content-Type: image/png or image/jpeg) or JSON {\"images\": [...]}")
    kind = content_type.split(";")[0].strip().lower()
    if kind.startswith("image/") or kind == "application/octet-stream":
        return [body], {}
    if kind != "application/json":
        raise RequestError(f"unsupported Content-Type {content_type or '(none)'!r}: use image/png, image/jpeg "
                           "or application/json", 415)
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError("body is not valid JSON") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("images"), list) or not payload["images"]:
        raise RequestError('expected JSON {"images": ["<base64>", ...]} with at least one image')
    if len(payload["images"]) > max_images:
        raise RequestError(f"{len(payload['images'])} images in one request; the limit is {max_images}", 413)
    images = []
    for i, item in enumerate(payload["images"]):
        if not isinstance(item, str):
            raise RequestError(f"images[{i}] is not a base64 string")
        try:
            images.append(inference.from_base64(item))
        except ValueError:
            raise RequestError(f"images[{i}] is not valid base64") from None
    unknown = sorted(set(payload) - {"images"} - set(ASK_FIELDS))
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(map(repr, unknown))}; a request has images and may have "
                           f"{', '.join(ASK_FIELDS)}")
    fields = {k: payload[k] for k in ASK_FIELDS if k in payload}
    return images, fields


# What a request may ask, in its JSON or its query string: a model by name, or a budget. Budgets, each named
# for what it is: `budget` a mean target as a share of the full ResNet's FLOPs, `mean_flops` the same in FLOPs
# (a budget model holds the images' mean cost to it; a front of fixed models answers with the most accurate
# whose recorded mean is within it, so single images may cost more), `max_flops` a per-image cap in FLOPs
# that no image passes (each keeps the blocks its policy values most until the cap is reached).
ASK_FIELDS = ("model", "budget", "mean_flops", "max_flops")


@dataclass
class Ask:
    model: str | None = None
    budget: float | None = None
    mean_flops: float | None = None
    max_flops: float | None = None


def routing(fields: dict) -> Ask:
    """A request's model and budget from its query string and JSON fields, or a RequestError (400)."""
    unknown = sorted(set(fields) - set(ASK_FIELDS))
    if unknown:
        raise RequestError(f"unknown parameter(s) {', '.join(map(repr, unknown))}; use {', '.join(ASK_FIELDS)}")
    model = fields.get("model")
    ask = Ask(model=None if model is None else str(model))  # JSON may give a version as a number
    for name in ASK_FIELDS[1:]:
        value = fields.get(name)
        if value is None:
            continue
        if isinstance(value, bool):
            raise RequestError(f"{name} must be a number, not {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise RequestError(f"{name} must be a number, not {value!r}") from None
        if name == "budget":
            try:
                number = check_budget(number)
            except ValueError as err:
                raise RequestError(str(err)) from None
        elif not math.isfinite(number) or number <= 0:
            raise RequestError(f"{name} must be a positive number of FLOPs, not {value!r}")
        setattr(ask, name, number)
    if ask.budget is not None and ask.mean_flops is not None:
        raise RequestError("budget and mean_flops are the same mean target (a share, FLOPs): give one")
    return ask


def _with_backbone(sources: list[ModelSource], backbone: str, preset_name: str | None) -> list[ModelSource]:
    """Each file source joined with the ResNet of `backbone` into one checkpoint of this project's format
    (in a temporary folder): what a replica loads is then one complete file, like any other model."""
    folder = Path(tempfile.mkdtemp(prefix="blockdrop-serve-"))
    for s in sources:
        model = inference.load(s.checkpoint, preset_name, backbone_file=backbone)
        if model.policy is None:
            raise UserError(f"{s.checkpoint} holds no policy network: not a BlockDrop model")
        s.checkpoint = str(folder / f"{s.label}.pt")
        meta = model.checkpoint.meta if isinstance(model.checkpoint.meta, dict) else {}
        save_checkpoint(s.checkpoint, model.preset, model.backbone, model.policy, meta)
    return sources


def load_sources(args: argparse.Namespace) -> tuple[list[ModelSource], Engine]:
    """The models serve_policy.py's flags name (--model-uri, else the Quickstart's front), resolved and
    each loaded once: a wrong file or URI fails here, before anything is deployed."""
    uri = resolve_uri(args.mlflow_uri)
    if args.model_uris:
        sources = resolve(args.model_uris, uri)
    else:
        try:
            sources = resolve([f"models:/{DEFAULT_MODEL}"], uri)
        except UserError:
            raise UserError(f"no --model-uri and no Quickstart front ({DEFAULT_MODEL}) in {uri}: run "
                            "`scripts/with-venv python -m blockdrop.quickstart` first, or pass --model-uri") from None
    if args.backbone:
        sources = _with_backbone(sources, args.backbone, args.preset)
    return sources, Engine(sources, args.preset)
