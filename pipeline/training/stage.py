"""A training stage around the loop of ``pipeline.training.loop``: one model per fold, trained
(under torchrun where asked), saved, tracked, summarized and registered.

It owns the stage's files (the fold models, the metrics and plot files, the checkpoints' folder)
and the checkpoints' fingerprint: a digest of the params, the inputs' lineage and the training
code, under which an interrupted stage resumes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd

from pipeline.config import ModelParams, TrainParams
from pipeline.core import distributed
from pipeline.core.artifacts import output_dir, read_json, write_csv, write_json
from pipeline.core.devices import pick_device, resolve_precision
from pipeline.core.progress import log_line
from pipeline.core.tracking import LINEAGE_FILE, StageRun, stage_run
from pipeline.data import training_data
from pipeline.data.prepared import PreparedData
from pipeline.models import losses
from pipeline.models import networks as models
from pipeline.models.files import load_model, save_model
from pipeline.training import loop, objectives
from pipeline.training.loop import format_epoch, train
from pipeline.training.objectives import Objective

ObjectiveFor = Callable[[PreparedData, int], Objective]


@dataclass(frozen=True)
class TrainingStage:
    """A training stage's name, the kind of model it trains and its files (``pipeline.core.layout``)."""

    name: str  # the DVC stage: train_<kind>, or a knowledge round's round_train_guided@round<k>
    kind: str  # "baseline" | "guided" | "round<k>": registered as <dataset>-<kind>
    prepared: Path
    upstream: tuple[Path, ...]  # the stage folders it reads (lineage, and the checkpoint fingerprint)
    out: Path  # fold<k>.pt and run.json
    metrics: Path
    plot: Path
    checkpoints: Path
    section: str = ""  # the params section and the script (stages.<section>); default: the name

    @property
    def params_section(self) -> str:
        return self.section or self.name


def run_training_stage(
    stage: TrainingStage, model_params: ModelParams, params: TrainParams, objective_for: ObjectiveFor
) -> None:
    """Train, save, track and register one model per fold; under ``model.nproc_per_node`` > 1,
    as one of the torchrun processes this launches (rank 0 alone tracks and writes)."""
    device = pick_device(model_params.device)
    section = stage.params_section
    if distributed.launch(
        f"stages.{section}", model_params.nproc_per_node, params.batch_size, f"{section}.batch_size", device
    ):
        return
    data = PreparedData.load(stage.prepared)
    dataset = read_json(stage.prepared / "report.json")["dataset"]
    sections = {"model": model_params, section: params}
    fingerprint = fingerprint_of(sections, *(folder / LINEAGE_FILE for folder in stage.upstream))
    with distributed.process_group(device) as ranks:
        if not ranks.main:
            train_folds(data, model_params, params, objective_for, stage.checkpoints, fingerprint)
            return
        with stage_run(stage.name, sections, dataset=dataset) as run:
            run.link_upstream(*stage.upstream)
            run.tag_compute(str(device), resolve_precision(model_params.precision, device).name)
            with output_dir(stage.out) as out:
                history = train_folds(
                    data, model_params, params, objective_for, stage.checkpoints, fingerprint, run, out
                )
                run.write_lineage(out)
            publish(run, stage, history, dataset)


def train_folds(
    data: PreparedData,
    model_params: ModelParams,
    params: TrainParams,
    objective_for: ObjectiveFor,
    checkpoints: Path,
    fingerprint: str = "",
    run: StageRun | None = None,
    out: Path | None = None,
) -> list[dict]:
    """Train one model per fold into ``out/fold<k>.pt``, logging every epoch; return the history.

    Checkpoints live in ``checkpoints``, outside the stage's outputs (DVC deletes those before a
    stage runs), and are removed once the stage succeeds. Training processes of rank > 0 pass no
    ``run`` and no ``out``: they log and write nothing.
    """
    checkpoints.mkdir(parents=True, exist_ok=True)
    history: list[dict] = []
    for fold in data.folds:

        def log(record: dict, fold: int = fold) -> None:
            log_line(format_epoch(record))
            if run is not None:
                run.log_metrics(
                    {k: v for k, v in record.items() if k not in ("fold", "epoch")},
                    step=record["epoch"],
                    prefix=f"fold{fold}/",
                )

        model, config, fold_history = train(
            data,
            fold,
            model_params,
            params,
            objective_for(data, fold),
            checkpoints / f"fold{fold}.pt",
            log,
            fingerprint,
        )
        if out is not None:
            save_model(out / f"fold{fold}.pt", model, config)
        history.extend(fold_history)
    return history


def summarize(history: list[dict]) -> dict:
    """Last-epoch figures per fold and their mean, for the stage's metrics file."""
    last = {}
    for record in history:
        last[record["fold"]] = record
    per_fold = {f"fold{fold}": {"loss": r["loss"], "test_ap": r["test_ap"]} for fold, r in sorted(last.items())}
    aps = [r["test_ap"] for r in last.values()]
    # No timings: the file must be identical for identical runs (they go to MLflow instead).
    return {"per_fold": per_fold, "test_ap_mean": float(np.nanmean(aps))}


def register_models(run: StageRun, out: Path, dataset: str, kind: str) -> None:
    """Log every fold's model to MLflow and register it as a version of ``<dataset>-<kind>``,
    tagged ``role=fold`` (the release stage registers the deployable version beside them)."""
    for path in sorted(out.glob("fold*.pt")):
        register_model_file(
            run,
            path,
            f"{dataset}-{kind}",
            {"role": "fold", "fold": path.stem.removeprefix("fold"), "pipeline_run": run.pipeline_id},
        )


def register_model_file(run: StageRun, path: Path, registered_name: str, tags: dict[str, str]) -> str:
    """Log one model file to ``run`` and register it as a new version of ``registered_name`` with
    ``tags``; returns the version."""
    load_model(path)  # refuses a file that is not a model of this pipeline before it reaches the registry
    # The file itself is what the version holds: its config (input size, normalisation, variant)
    # rebuilds the network and its weights load without unpickling (pipeline.deployment.predict).
    return run.register_model_file(path, f"model_{path.stem}", registered_name, tags)


# The modules whose code defines a training's computation: a checkpoint written by other code
# would mix two trainings (or fail on changed layers), so their source is part of the fingerprint.
# (A cast: modules imported from files always have a __file__.)
_TRAINING_CODE = cast(
    tuple[str, ...],
    (
        loop.__file__,
        __file__,
        models.__file__,
        objectives.__file__,
        losses.__file__,
        training_data.__file__,
        distributed.__file__,
    ),
)


def fingerprint_of(sections: dict, *input_files: Path) -> str:
    """A digest of a stage's params, inputs and training code: a checkpoint resumes only under the same one."""
    digest = hashlib.sha256(json.dumps({k: v.model_dump() for k, v in sections.items()}, sort_keys=True).encode())
    paths: tuple[str | Path, ...] = (*input_files, *_TRAINING_CODE)
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def publish(run: StageRun, stage: TrainingStage, history: list[dict], dataset: str) -> None:
    """What a training stage leaves besides its models: metrics and plot files for DVC, the
    summary and the registered models in MLflow; then its checkpoints go."""
    summary = summarize(history)
    write_json(stage.metrics, summary)
    # Timings stay out of the DVC files, which must be identical for identical runs.
    write_csv(stage.plot, pd.DataFrame(history).drop(columns="seconds"))
    run.log_metrics({"test_ap_mean": summary["test_ap_mean"], "train_seconds": sum(r["seconds"] for r in history)})
    run.log_artifact(stage.plot)
    register_models(run, stage.out, dataset, stage.kind)
    for checkpoint in stage.checkpoints.glob("*.pt"):
        checkpoint.unlink()
    print(f"  mean test AP over folds (last epoch): {summary['test_ap_mean']:.4f}")
