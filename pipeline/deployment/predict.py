"""Predict: defect score, decision and heatmap overlay for image files, with a trained model.

    python -m pipeline.deployment.predict --model data/guided/fold0.pt photos/ --out predictions
    python -m pipeline.deployment.predict --model models:/synthetic-guided/3 a.png b.png
    python -m pipeline.deployment.predict --model-name synthetic-guided --model-alias champion photos/

The model is a file written by a training stage (``data/{baseline,guided}/fold<k>.pt``) or a
registered MLflow model (``models:/<name>``: its latest version, ``models:/<name>/<version>``,
``models:/<name>@<alias>``). Images are read as gray and resized to the model's input size the
way ``prepare`` does; folders are searched recursively (hidden files are left out). Writes
``OUT/predictions.csv`` (path, score, decision, threshold, overlay, error) and one overlay PNG per
image under ``OUT/overlays/``: the model's own saliency (Grad-CAM by default) over the image at
its original size. A file that cannot be read as an image gets its error in the CSV and on stderr
and the batch goes on. The decision is ``score >= threshold``; see ``decision_threshold`` for
where the threshold comes from.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline.config import EvaluateParams
from pipeline.core.artifacts import read_json, write_csv
from pipeline.core.devices import pick_device
from pipeline.core.errors import DataError, MissingInputError
from pipeline.core.progress import bars_paused, progress
from pipeline.data.images import read_gray
from pipeline.knowledge.saliency import METHODS, create_saliency, saliency_maps
from pipeline.metrics.figures import heatmap_overlay, save_png
from pipeline.models.files import ModelError, load_model, needs_prior
from pipeline.models.inference import predict
from pipeline.models.networks import GuidedClassifier, PriorAsChannel

# evaluate.threshold's default: the threshold of a model that no evaluate run has scored.
DEFAULT_THRESHOLD: float = EvaluateParams.model_fields["threshold"].default


@dataclass
class LoadedModel:
    """A deployed model (eval mode) with its config and where it came from."""

    model: nn.Module
    config: dict
    source: str  # the file, or the models:/ URI with its resolved version
    run_id: str | None = None  # the MLflow run that trained it, where known
    tracking_uri: str | None = None
    tags: dict[str, str] = field(default_factory=dict)  # the registered version's tags (threshold, ...)


# The trained model file inside a logged scoring model (``pipeline.deployment.serving``): MLflow copies each
# artifact into ``artifacts/`` under its file name.
SCORING_MODEL_FILE = "model.pt"


# --- loading ------------------------------------------------------------------------------------


def load_any(spec: str, device: torch.device | str = "cpu") -> LoadedModel:
    """Load a model from a file path or a ``models:/`` URI; ``ModelError`` names what is wrong."""
    if spec.startswith("models:/"):
        return load_registered(spec, device)
    return load_file(Path(spec), device)


def load_file(path: Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Load a model file written by the training stages, with its training run where known."""
    model, config = load_model(path, device)
    run_id, uri = _lineage(path.parent)
    return LoadedModel(model, config, str(path), run_id, uri)


def _lineage(folder: Path) -> tuple[str | None, str | None]:
    """The MLflow run that wrote the models in ``folder`` (the stage's ``run.json``), if recorded."""
    try:
        record = read_json(folder / "run.json")
        return record["mlflow_run_id"], record.get("tracking_uri")
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def registry_client(uri: str) -> Any:
    """An MLflow client for ``uri``; a SQLite store must exist (MLflow would create an empty one)."""
    from mlflow.tracking import MlflowClient

    from pipeline.core.tracking import sqlite_path

    database = sqlite_path(uri)
    if database is not None and not database.is_file():
        raise ModelError(
            f"no MLflow store at {uri}: set MLFLOW_TRACKING_URI to the store the models were "
            "registered in, or give a model file"
        )
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def load_registered(uri: str, device: torch.device | str = "cpu") -> LoadedModel:
    """Load ``models:/<name>[/<version>|/latest|@<alias>]`` from the registry of ``tracking_uri()``.

    The version's files are checked against the digests recorded at registration before anything
    reads them; then only its model file is loaded (weights only, the network rebuilt from the
    file's config) and its MLmodel read as YAML: nothing stored runs. The threshold and operating
    point travel as the version's tags, or in a scoring model's metadata where the version lacks them.
    """
    from mlflow.exceptions import MlflowException

    from pipeline.core.tracking import FAST_CHECK, environment_defaults, tracking_uri, verified_download

    store = tracking_uri()
    client = registry_client(store)
    with environment_defaults(FAST_CHECK):
        version = registered_version(client, uri, store)
        source = f"models:/{version.name}/{version.version}"
        try:
            with tempfile.TemporaryDirectory() as folder:
                local = verified_download(version, Path(folder))
                metadata = _metadata(local)
                model, config = load_model(_registered_file(local, source))
        except MlflowException as error:
            raise ModelError(f"cannot download {source} from {store} ({str(error).splitlines()[0]})") from error
    carried = {key: str(metadata[key]) for key in ("threshold", "operating_point") if key in metadata}
    return LoadedModel(
        model.to(device).eval(), config, source, version.run_id, store, {**carried, **(version.tags or {})}
    )


def _metadata(local: Path) -> dict:
    """The ``metadata`` of a scoring model's MLmodel file (YAML, read safely); {} for a fold model."""
    import yaml

    mlmodel = local / "MLmodel"
    if not mlmodel.is_file():
        return {}
    return (yaml.safe_load(mlmodel.read_text()) or {}).get("metadata") or {}


def _registered_file(local: Path, source: str) -> Path:
    """The model file of a downloaded version: ``model.pt`` of a fold model, ``artifacts/model.pt``
    of a scoring model (pipeline.deployment.serving). Nothing else is loaded: a version holding a
    pickled or exported (pt2) model instead is refused, since loading either runs stored code."""
    for candidate in (local / SCORING_MODEL_FILE, local / "artifacts" / SCORING_MODEL_FILE):
        if candidate.is_file():
            return candidate
    found = ", ".join(sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())) or "nothing"
    raise ModelError(
        f"{source} holds no model file ({SCORING_MODEL_FILE} or artifacts/{SCORING_MODEL_FILE}; it holds {found}): "
        "it was registered as a pickled or exported (pt2) model, which cannot be loaded without running "
        "stored code; rerun the stage that registers it (dvc repro -f train_guided, dvc repro -f release) "
        "or give the model file data/<kind>/fold<k>.pt"
    )


def registered_version(client: Any, uri: str, store: str) -> Any:
    """The ``ModelVersion`` that ``models:/<name>[/<version>|/latest|@<alias>]`` names in ``client``'s
    registry; ``ModelError`` lists the registered models where there is none."""
    from mlflow.exceptions import MlflowException

    try:
        return _resolve_version(client, uri)
    except MlflowException as error:
        known = ", ".join(sorted(m.name for m in client.search_registered_models())) or "none"
        raise ModelError(
            f"cannot load {uri} from {store} ({str(error).splitlines()[0]}); registered models: {known}"
        ) from error


def _resolve_version(client, uri: str):
    rest = uri.removeprefix("models:/").strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, _, number = rest.partition("/")
    if number and number != "latest":
        return client.get_model_version(name, number)
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        from mlflow.exceptions import MlflowException

        raise MlflowException(f"registered model {name!r} has no versions")
    return max(versions, key=lambda v: int(v.version))


def decision_threshold(loaded: LoadedModel, override: float | None = None) -> tuple[float, str]:
    """(threshold, where it came from).

    ``override`` (``--threshold``) wins. Then a registered version's ``threshold`` tag, which the
    release stage sets at its operating point. Otherwise the threshold the model was evaluated at: the
    ``evaluate.threshold`` param of the latest ``evaluate`` run that consumed the model's training
    run (tag ``upstream.train_<kind>``; the run is known for registered models and for model files
    beside their stage's ``run.json``): the evaluation, not training, chooses a fold model's
    threshold. Without such a run: 0.5, the param's default.
    """
    if override is not None:
        return override, "--threshold"
    if "threshold" in loaded.tags:
        return _tagged_threshold(loaded)
    if loaded.run_id and loaded.tracking_uri:
        from pipeline.core.tracking import FAST_CHECK, environment_defaults

        stage = f"train_{loaded.config['kind']}"
        try:
            with environment_defaults(FAST_CHECK):
                client = registry_client(loaded.tracking_uri)
                experiment = client.get_run(loaded.run_id).info.experiment_id
                runs = client.search_runs(
                    [experiment],
                    f"tags.stage = 'evaluate' and tags.`upstream.{stage}` = '{loaded.run_id}'",
                    order_by=["attributes.start_time DESC"],
                    max_results=1,
                )
            if runs and "evaluate.threshold" in runs[0].data.params:
                return float(runs[0].data.params["evaluate.threshold"]), f"evaluate run {runs[0].info.run_id}"
        except Exception as error:
            return DEFAULT_THRESHOLD, f"default (MLflow lookup failed: {type(error).__name__})"
    untagged = " and no threshold tag: dvc repro release registers a version that has one" if loaded.tags else ""
    return DEFAULT_THRESHOLD, f"default (no evaluate run of this model found{untagged})"


def _tagged_threshold(loaded: LoadedModel) -> tuple[float, str]:
    try:
        threshold = float(loaded.tags["threshold"])
    except ValueError:
        threshold = float("nan")
    if not 0.0 <= threshold <= 1.0:
        raise ModelError(
            f"{loaded.source}: tag threshold={loaded.tags['threshold']!r} is not a probability; "
            "set it with MlflowClient().set_model_version_tag, or pass --threshold"
        )
    return threshold, f"tag threshold of {loaded.source} (operating point {loaded.tags.get('operating_point', '?')})"


def operating_point(loaded: LoadedModel) -> str:
    """The operating point the threshold was chosen at (the version's tag), or ``""`` where none was."""
    return loaded.tags.get("operating_point", "")


# --- predicting ---------------------------------------------------------------------------------


def collect_inputs(inputs: Sequence[str | Path], exclude: Path | None = None) -> list[Path]:
    """Files named and files under folders named (recursively, sorted, hidden ones left out)."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if not item.is_dir():
            files.append(item)  # a missing file is reported with the rest, not fatal
            continue
        for path in sorted(item.rglob("*")):
            parts = path.relative_to(item).parts
            if (
                path.is_file()
                and not any(p.startswith(".") for p in parts)
                and not (exclude is not None and exclude.resolve() in path.resolve().parents)
            ):
                files.append(path)
    return files


class Predictor:
    """Scores and saliency maps of a model for batches of gray images of any size."""

    def __init__(
        self,
        loaded: LoadedModel,
        threshold: float,
        saliency: str = "gradcam",
        teacher: LoadedModel | None = None,
        teacher_saliency: str = "layercam",
    ) -> None:
        self.loaded, self.config, self.threshold = loaded, loaded.config, threshold
        self.height, self.width = int(self.config["height"]), int(self.config["width"])
        self.teacher = None
        if needs_prior(self.config):
            if teacher is None:
                raise ModelError(
                    f"{loaded.source} is a guided model of variant teacher: it reads the baseline's "
                    "saliency map at inference; pass --teacher with the baseline of the same fold "
                    "(data/baseline/fold<k>.pt)"
                )
            self._check_teacher(teacher)
            self.teacher = create_saliency(teacher_saliency, teacher.model)
            self.teacher_config = teacher.config
        model = loaded.model
        # Saliency explains one-input models: the guided model gets its prior as the last channel.
        explained = PriorAsChannel(model, self.teacher is not None) if isinstance(model, GuidedClassifier) else model
        self.explainer = create_saliency(saliency, explained)

    def _check_teacher(self, teacher: LoadedModel) -> None:
        config = teacher.config
        if config["kind"] != "baseline" or (config["height"], config["width"]) != (self.height, self.width):
            raise ModelError(
                f"--teacher {teacher.source} must be a baseline model of input size "
                f"{self.width}x{self.height}; it is a {config['kind']} model of "
                f"{config['width']}x{config['height']}"
            )

    def resize(self, image: np.ndarray) -> np.ndarray:
        """As ``data.write_prepared`` resizes (area interpolation: thin scratches stay visible)."""
        return cv2.resize(image, (self.width, self.height), interpolation=cv2.INTER_AREA)

    def inputs(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the model reads for gray uint8 images of any size: the resized batch and its priors."""
        batch = torch.from_numpy(np.stack([self.resize(image) for image in images]))
        priors = None
        if self.teacher is not None:
            priors = torch.from_numpy(saliency_maps(self.teacher, self.teacher_config, batch, len(batch))[0])
        return batch, priors

    def scores(self, images: list[np.ndarray]) -> np.ndarray:
        """Defect probabilities (N,) alone: no saliency backward (what serving does by default)."""
        batch, priors = self.inputs(images)
        return predict(self.loaded.model, self.config, batch, priors, len(batch))

    def __call__(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(scores (N,), saliency maps (N, height, width) in [0, 1]) for gray uint8 images."""
        batch, priors = self.inputs(images)
        scores = predict(self.loaded.model, self.config, batch, priors, len(batch))
        maps = saliency_maps(self.explainer, self.config, batch, len(batch), priors)[0]
        return scores, maps


def predict_files(predictor: Predictor, files: Sequence[Path], out: Path, batch_size: int = 16) -> pd.DataFrame:
    """Score every file, write its overlay under ``out/overlays`` and ``out/predictions.csv``."""
    rows: list[dict] = []
    names: set[str] = set()
    bar = progress(files, "predict", "file")
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        readable: list[tuple[dict, np.ndarray]] = []
        for path in chunk:
            row = {
                "path": str(path),
                "score": np.nan,
                "decision": "",
                "threshold": predictor.threshold,
                "overlay": "",
                "error": "",
            }
            rows.append(row)
            try:
                readable.append((row, read_gray(str(path))))
            except DataError as error:
                row["error"] = str(error)
                with bars_paused():
                    print(f"skipped {path}: {error}", file=sys.stderr, flush=True)
        if readable:
            scores, maps = predictor([image for _, image in readable])
            for (row, image), score, saliency in zip(readable, scores, maps):
                overlay = out / "overlays" / _unique_name(Path(str(row["path"])), names)
                save_png(overlay, overlay_picture(image, saliency, score, predictor.threshold))
                row.update(score=float(score), decision=decision(score, predictor.threshold), overlay=str(overlay))
        bar.update(len(chunk))
    bar.close()
    table = pd.DataFrame(rows, columns=["path", "score", "decision", "threshold", "overlay", "error"])
    write_csv(out / "predictions.csv", table)
    return table


def decision(score: float, threshold: float) -> str:
    """``defect`` where ``score >= threshold``, else ``ok`` (as metrics.py decides)."""
    return "defect" if score >= threshold else "ok"


def overlay_picture(image: np.ndarray, saliency: np.ndarray, score: float, threshold: float) -> np.ndarray:
    """The overlay predict writes: the saliency map over the image at its own size, labelled (RGB)."""
    return _label(heatmap_overlay(image, saliency), score, threshold)


def _unique_name(path: Path, taken: set[str]) -> str:
    """``<stem>.png``; images of the same stem (a.png, a.jpg, sub/a.png) get ``<stem>_<n>.png``."""
    name, number = f"{path.stem}.png", 1
    while name in taken:
        name, number = f"{path.stem}_{number}.png", number + 1
    taken.add(name)
    return name


def _label(rgb: np.ndarray, score: float, threshold: float) -> np.ndarray:
    """The decision and score written in the corner, so an overlay is readable on its own."""
    text = f"{decision(score, threshold)} {score:.3f}"
    scale = max(0.35, min(rgb.shape[:2]) / 400)
    (width, height), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    rgb = rgb.copy()
    cv2.rectangle(rgb, (0, 0), (width + 4, height + base + 4), (0, 0, 0), -1)
    cv2.putText(rgb, text, (2, height + 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return rgb


# --- command line -------------------------------------------------------------------------------


def model_spec(args: argparse.Namespace) -> str:
    """``--model``, or the ``models:/`` URI of ``--model-name`` with its version or alias."""
    if args.model:
        return args.model
    if args.model_alias:
        return f"models:/{args.model_name}@{args.model_alias}"
    return f"models:/{args.model_name}/{args.model_version or 'latest'}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model file (data/guided/fold0.pt) or models:/<name>[/<version>|@<alias>]")
    source.add_argument("--model-name", help="registered MLflow model, e.g. synthetic-guided")
    version = parser.add_mutually_exclusive_group()
    version.add_argument("--model-version", help="with --model-name (default: the latest version)")
    version.add_argument("--model-alias", help="with --model-name, e.g. champion")
    parser.add_argument("inputs", nargs="+", help="image files and folders")
    parser.add_argument("--out", type=Path, default=Path("predictions"), help="output folder (default: predictions)")
    parser.add_argument(
        "--threshold",
        type=float,
        help="decision threshold (default: the registered version's tag threshold, else the model's evaluate run's)",
    )
    parser.add_argument("--saliency", default="gradcam", choices=list(METHODS), help="overlay heatmap method")
    parser.add_argument("--teacher", help="baseline model (file or models:/ URI) for a guided model of variant teacher")
    parser.add_argument(
        "--teacher-saliency",
        default="layercam",
        choices=list(METHODS),
        help="the teacher's prior method: saliency.method of the run (default layercam)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    args = parser.parse_args(argv)
    if (args.model_version or args.model_alias) and not args.model_name:
        parser.error("--model-version and --model-alias go with --model-name")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        parser.error(f"--threshold must be a probability in [0, 1], got {args.threshold}")
    return args


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    device = pick_device(args.device)
    loaded = load_any(model_spec(args), device)
    teacher = load_any(args.teacher, device) if args.teacher else None
    threshold, origin = decision_threshold(loaded, args.threshold)
    predictor = Predictor(loaded, threshold, args.saliency, teacher, args.teacher_saliency)
    files = collect_inputs(args.inputs, exclude=args.out)
    if not files:
        raise MissingInputError(f"no files in {' '.join(args.inputs)}")
    config = loaded.config
    print(
        f"model {loaded.source}: {config['kind']} {config.get('variant', '')} {config['backbone']} "
        f"{config['width']}x{config['height']}; threshold {threshold} ({origin}); {len(files)} files",
        file=sys.stderr,
    )
    table = predict_files(predictor, files, args.out, args.batch_size)
    scored = int(table["error"].eq("").sum())
    print(
        json.dumps(
            {
                "scored": scored,
                "skipped": len(table) - scored,
                "defects": int(table["decision"].eq("defect").sum()),
                "csv": str(args.out / "predictions.csv"),
            }
        )
    )
    if scored == 0:
        raise DataError(f"none of the {len(table)} files could be read as an image; see {args.out / 'predictions.csv'}")
    return table
