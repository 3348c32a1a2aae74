"""The released model: the chosen configuration trained on every labelled image, its threshold
chosen on the cross-validation's out-of-fold scores, registered as the candidate; and the gate
that promotes a candidate to champion.

    python -m pipeline.deployment.release promote [--name NAME]

The release has no test images of its own: what it is known by are the evaluation's
cross-validated figures (``data/metrics/evaluate.json``) and the rates expected at its operating
point, which travel with its registered version (tags ``threshold`` and ``operating_point``, and
the run's ``cross_validation/`` artifacts that ``promote`` checks the gate against).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import (
    GuidedParams,
    ModelParams,
    PseudoLabelParams,
    ReleaseParams,
    SaliencyParams,
    ServingParams,
    TrainParams,
)
from pipeline.core import layout
from pipeline.core.artifacts import read_json, write_json
from pipeline.core.devices import pick_device, resolve_precision
from pipeline.core.errors import InputError, MissingInputError, PipelineError
from pipeline.core.tracking import StageRun, flatten
from pipeline.data.prepared import PreparedData
from pipeline.knowledge.fold_maps import write_fold_maps
from pipeline.knowledge.pseudo_labels import write_fold_targets
from pipeline.metrics.classification import MetricsError
from pipeline.metrics.operating_points import gate_failures, operating_point_summary
from pipeline.models.files import save_model
from pipeline.models.variants import VARIANTS
from pipeline.training.loop import format_epoch, train
from pipeline.training.objectives import GuidedObjective, Objective, load_guidance
from pipeline.training.stage import fingerprint_of

CANDIDATE, CHAMPION = "candidate", "champion"
ROLE = "release"  # the version's ``role`` tag; the fold models' is "fold"
# The release's one "fold": in ``PreparedData.all_training`` no image is tested on it.
FOLD = 0
# The cross-validation files logged with the release run, the figures its gate reads.
CROSS_VALIDATION = "cross_validation"
EVALUATION_METRICS = "evaluate.json"


class GateRefused(PipelineError):
    """The candidate's cross-validated figures fail the gate; the message lists each failure."""


@dataclass(frozen=True)
class ReleaseSections:
    """The params sections the release reads: the chosen configuration and the release's own."""

    model: ModelParams
    train_baseline: TrainParams
    saliency: SaliencyParams
    pseudo_labels: PseudoLabelParams
    train_guided: GuidedParams
    release: ReleaseParams
    serving: ServingParams = field(default_factory=lambda: ServingParams())  # limits the registered model keeps

    def logged(self) -> dict:
        """What the release run logs as params (release.gate is read by promote, not by training)."""
        sections = {name: getattr(self, name) for name in ("model", "train_baseline", "saliency", "pseudo_labels")}
        if self.release.model == "guided":
            sections["train_guided"] = self.train_guided
        return {
            **sections,
            "release.model": self.release.model,
            "release.operating_point": str(self.release.point),
            "serving": self.serving,
        }


def choose_operating_point(scores_csv: Path, model: str, release: ReleaseParams) -> dict:
    """The threshold of ``model`` at the release's operating point on the pooled out-of-fold
    scores (the evaluation's scores.csv), with the rates expected there and their spread over folds."""
    if not scores_csv.is_file():
        raise MissingInputError(f"{scores_csv} not found: run the evaluate stage first (dvc repro evaluate)")
    scores = pd.read_csv(scores_csv)
    if model not in scores.columns:
        raise InputError(f"{scores_csv} has no column {model!r}: rerun the evaluate stage (dvc repro -f evaluate)")
    try:
        summary = operating_point_summary(scores.rename(columns={model: "score"}), release.point)
    except MetricsError as error:
        raise type(error)(f"release.operating_point ({scores_csv}, {model} scores): {error}") from None
    return {"model": model, "scores": str(scores_csv), **summary}


def train_release(
    data: PreparedData, sections: ReleaseSections, out: Path, checkpoints: Path, fingerprint: str, run: StageRun
) -> dict[str, Path]:
    """Train the baseline and, for a guided release, its saliency, pseudo-masks and the guided
    model on every labelled image, through the same functions as the fold stages; returns the
    model files written to ``out`` by kind."""
    everything = data.all_training()
    checkpoints.mkdir(parents=True, exist_ok=True)
    files = {"baseline": out / "baseline.pt"}
    _train_one(
        everything,
        "baseline",
        sections.model,
        sections.train_baseline,
        Objective(),
        files["baseline"],
        checkpoints,
        fingerprint,
        run,
    )
    if sections.release.model == "guided":
        write_guidance(everything, files["baseline"], sections, out)
        guidance = load_guidance(
            everything, FOLD, VARIANTS[sections.train_guided.variant], out / "saliency", out / "pseudo_masks"
        )
        files["guided"] = out / "guided.pt"
        _train_one(
            everything,
            "guided",
            sections.model,
            sections.train_guided,
            GuidedObjective(guidance, sections.train_guided),
            files["guided"],
            checkpoints,
            fingerprint,
            run,
        )
    for checkpoint in checkpoints.glob("*.pt"):
        checkpoint.unlink()
    return files


def _train_one(
    data: PreparedData,
    kind: str,
    model_params: ModelParams,
    params: TrainParams,
    objective: Objective,
    path: Path,
    checkpoints: Path,
    fingerprint: str,
    run: StageRun,
) -> None:
    print(f"  release: training the {kind} model on all {len(data.index)} labelled images", flush=True)

    def log(record: dict) -> None:
        print(format_epoch(record), flush=True)
        run.log_metrics(
            {k: v for k, v in record.items() if k not in ("fold", "epoch")}, step=record["epoch"], prefix=f"{kind}/"
        )

    model, config, _ = train(
        data, FOLD, model_params, params, objective, checkpoints / f"{kind}.pt", log, f"{fingerprint}-{kind}"
    )
    save_model(path, model, config)


def write_guidance(data: PreparedData, baseline_file: Path, sections: ReleaseSections, out: Path) -> None:
    """The release baseline's saliency maps and pseudo-masks, written as the saliency and
    pseudo_labels stages write a fold's (``out/{saliency,pseudo_masks}/fold0/``), so that the
    guided model reads them through ``objectives.load_guidance`` as the fold models do."""
    device = pick_device(sections.model.device)
    precision = resolve_precision(sections.model.precision, device)  # as the saliency stage computes
    write_fold_maps(data, FOLD, baseline_file, sections.saliency, precision, device, out / "saliency")
    ids = data.index["id"].tolist()
    maps = data.load_maps(out / "saliency" / f"fold{FOLD}", np.arange(len(ids))).numpy()  # as stored
    _, true_rows = write_fold_targets(data, FOLD, maps, sections.pseudo_labels, out / "pseudo_masks" / f"fold{FOLD}")
    write_json(out / "pseudo_masks" / layout.TRUE_MASKS, {f"fold{FOLD}": [ids[row] for row in true_rows]})


def register_release(
    run: StageRun, files: dict[str, Path], kind: str, name: str, point: dict, serving: ServingParams | None = None
) -> str:
    """Register the released model as a new version of ``name``: the scoring model that takes
    image bytes (``pipeline.deployment.serving``; ``kgi serve`` serves it), with its role, threshold
    and operating point as tags, the alias ``candidate`` and ``serving``'s limits in its model config."""
    from pipeline.deployment.serving import log_scoring_model

    version = log_scoring_model(
        files[kind],
        point["threshold"],
        point["operating_point"],
        name,
        teacher_file=files.get("baseline") if kind != "baseline" else None,
        aliases=[CANDIDATE],
        tags={"role": ROLE, "pipeline_run": run.pipeline_id},
        name="release_model",
        serving=serving,
    )
    return str(version.version)


def release_fingerprint(sections: ReleaseSections, *inputs: Path) -> str:
    """The checkpoints' fingerprint: every section the training reads (not the gate, which
    ``promote`` reads) and the lineage of its inputs."""
    trained = {
        name: getattr(sections, name)
        for name in ("model", "train_baseline", "saliency", "pseudo_labels", "train_guided")
    }
    return fingerprint_of({**trained, "release": sections.release.model_copy(update={"gate": {}})}, *inputs)


def gate_figures(evaluation: dict, point: dict) -> dict[str, float]:
    """What a gate can name: evaluate.json's dotted keys and ``operating_point.<figure>``."""
    figures = flatten(evaluation)
    figures.update(flatten({k: v for k, v in point.items() if k != "per_fold"}, "operating_point."))
    return {key: float(value) for key, value in figures.items() if isinstance(value, (int, float))}


@dataclass(frozen=True)
class ReleasePaths:
    """What the release reads and writes (``pipeline.core.layout``)."""

    prepared: Path
    evaluation: Path  # the evaluate stage's folder: scores.csv and run.json
    evaluation_metrics: Path  # data/metrics/evaluate.json
    out: Path
    metrics: Path
    checkpoints: Path


def run_release(sections: ReleaseSections, paths: ReleasePaths) -> None:
    """The release stage: threshold first (it needs no training, so a bad operating point stops
    the stage at once), then the models, the files, the registered candidate."""
    from pipeline.core.artifacts import output_dir
    from pipeline.core.tracking import stage_run

    kind = sections.release.model
    point = choose_operating_point(paths.evaluation / "scores.csv", kind, sections.release)
    data = PreparedData.load(paths.prepared)
    dataset = read_json(paths.prepared / "report.json")["dataset"]
    fingerprint = release_fingerprint(sections, *(folder / "run.json" for folder in (paths.prepared, paths.evaluation)))
    with stage_run("release", sections.logged(), dataset=dataset) as run:
        run.link_upstream(paths.prepared, paths.evaluation)
        device = pick_device(sections.model.device)
        run.tag_compute(str(device), resolve_precision(sections.model.precision, device).name)
        with output_dir(paths.out) as out:
            files = train_release(data, sections, out, paths.checkpoints, fingerprint, run)
            write_json(out / layout.OPERATING_POINT, point)
            run.write_lineage(out)
        run.log_artifact(paths.out / layout.OPERATING_POINT, CROSS_VALIDATION)
        run.log_artifact(paths.evaluation_metrics, CROSS_VALIDATION)
        name = f"{dataset}-{kind}"
        version = register_release(
            run, {k: paths.out / f.name for k, f in files.items()}, kind, name, point, sections.serving
        )
        figures = {k: v for k, v in point.items() if k not in ("per_fold", "scores")}
        run.log_metrics({k: v for k, v in figures.items() if k not in ("model", "operating_point")})
        write_json(paths.metrics, {**figures, "images": len(data.index), "registered": name})
    print(
        f"  {name} version {version} (alias {CANDIDATE}): threshold {point['threshold']:.6g} at "
        f"{point['operating_point']}; expected miss rate {point['miss_rate']:.4f} ± {point['miss_rate_std']:.4f}, "
        f"false-alarm rate {point['false_alarm_rate']:.4f} ± {point['false_alarm_rate_std']:.4f} over folds"
    )


# --- promotion ------------------------------------------------------------------------------------


def candidate_version(client, name: str):
    """The version of ``name`` holding the alias ``candidate``, checked to carry a threshold."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, CANDIDATE)
    except MlflowException:
        known = ", ".join(sorted(m.name for m in client.search_registered_models())) or "none"
        raise InputError(
            f"no version of {name!r} has the alias {CANDIDATE!r} (registered models: {known}): "
            "run the release stage first (dvc repro release), or pass --name"
        ) from None
    if "threshold" not in version.tags:
        raise InputError(
            f"{name} version {version.version} (alias {CANDIDATE}) has no 'threshold' tag: it was "
            "registered before releases carried their operating point; rerun the release stage "
            "(dvc repro -f release) to register a candidate that has one"
        )
    return version


def candidate_figures(version, tracking: str) -> dict[str, float]:
    """The cross-validated figures logged with the candidate's release run."""
    import mlflow

    with tempfile.TemporaryDirectory() as folder:
        try:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    run_id=version.run_id, artifact_path=CROSS_VALIDATION, dst_path=folder, tracking_uri=tracking
                )
            )
            return gate_figures(read_json(local / EVALUATION_METRICS), read_json(local / layout.OPERATING_POINT))
        except (OSError, mlflow.exceptions.MlflowException) as error:
            raise InputError(
                f"{version.name} version {version.version}: its run {version.run_id} holds no "
                f"{CROSS_VALIDATION}/ figures ({type(error).__name__}); it was not registered by the "
                "release stage: rerun it (dvc repro -f release)"
            ) from None


def trial_uri(name: str) -> str:
    """The candidate of ``name``, as ``kgi serve`` and ``kgi predict --model`` take it."""
    return f"models:/{name}@{CANDIDATE}"


def promote(name: str, gate: dict[str, str]) -> str:
    """Give ``name``'s candidate the alias ``champion`` if its cross-validated figures pass
    ``gate``; otherwise raise ``GateRefused`` listing every failed condition."""
    from mlflow.tracking import MlflowClient

    from pipeline.core.tracking import connect, tracking_uri

    if not gate:
        raise InputError(
            "release.gate in params.yaml is empty: write at least one condition, e.g. "
            "release.gate: {guided.ap: '>= 0.9'}"
        )
    connect()
    client = MlflowClient(tracking_uri())
    version = candidate_version(client, name)
    figures = candidate_figures(version, tracking_uri())
    failures = gate_failures(figures, gate, f"the cross-validated figures of {name} version {version.version}")
    if failures:
        # The first run on the default params may well end here: say how to try the candidate anyway.
        raise GateRefused(
            f"{name} version {version.version} stays {CANDIDATE}, not promoted to {CHAMPION}: "
            + "; ".join(failures)
            + f" (release.gate in params.yaml). To serve the candidate for a trial: kgi serve {trial_uri(name)}"
        )
    client.set_registered_model_alias(name, CHAMPION, version.version)
    passed = "; ".join(f"{key} = {figures[key]:.4g} {condition}" for key, condition in gate.items())
    return (
        f"{name} version {version.version} promoted to {CHAMPION} (threshold {version.tags['threshold']}, "
        f"{version.tags.get('operating_point', '?')}): {passed}"
    )


def default_name(prepared: Path, release: ReleaseParams) -> str:
    """``<dataset>-<model>``: the name the release stage registers under."""
    report = prepared / "report.json"
    if not report.is_file():
        raise MissingInputError(f"{report} not found: pass --name, or run the pipeline (dvc repro)")
    return f"{read_json(report)['dataset']}-{release.model}"


def main(argv: Sequence[str] | None = None) -> None:
    """``kgi promote``: the candidate becomes champion if it passes release.gate."""
    from pipeline.config import load_section

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", help="registered model (default: <dataset>-<release.model>)")
    args = parser.parse_args(argv)
    release = load_section("release")
    print(promote(args.name or default_name(layout.PREPARED, release), release.gate))
