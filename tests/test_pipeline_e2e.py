"""End to end: `dvc repro` of the whole pipeline on a shrunk config, in a temporary copy."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml

from pipeline.core.devices import resolve_precision
from support.browser import check_rendered, needs_chromium
from support.helpers import dvc, kgi, make_shrunk_project, project_env, stages_run

STAGES = ["prepare", "train_baseline", "saliency", "pseudo_labels", "train_guided", "evaluate", "release"]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = make_shrunk_project(tmp_path_factory.mktemp("project"))
    output = dvc(project, "repro")
    assert stages_run(output) == STAGES
    # No terminal here, as in CI: one line per epoch (1 baseline and 2 guided, in the folds and
    # again in the release) and no bar, whose "n/total [elapsed<left" would survive the text
    # mode's turning its carriage returns into newlines.
    assert output.count(" | epoch ") == 6 and not re.search(r"\d+/\d+ \[\d\d:\d\d<", output)
    return project


@pytest.mark.slow
def test_every_output_exists_and_metrics_are_in_range(project: Path) -> None:
    for folder in ("prepared", "baseline", "saliency", "pseudo_masks", "guided", "evaluation"):
        assert (project / "data" / folder / "run.json").is_file(), folder
    index = (project / "data/prepared/index.csv").read_text().splitlines()
    assert len(index) == 1 + 12 * 4
    assert sorted(p.name for p in (project / "data/baseline").glob("*.pt")) == ["fold0.pt"]
    assert len(list((project / "data/saliency/fold0").glob("*.png"))) == 48
    assert len(list((project / "data/pseudo_masks/fold0").glob("*.png"))) == 48
    metrics = json.loads((project / "data/metrics/evaluate.json").read_text())
    for model in ("baseline", "guided"):
        assert 0.0 < metrics[model]["ap"] <= 1.0
        assert metrics[model]["ap"] == metrics[model]["fold0"]["ap"]  # one fold: its AP is the mean
        assert metrics[model]["ap_std"] == 0.0
        assert 0.0 < metrics[model]["ap_pooled"] <= 1.0
        assert 0.0 <= metrics[model]["auroc"] <= 1.0
        assert 0.0 <= metrics[model]["accuracy"] <= 1.0
        assert 0.0 <= metrics[model]["f1_best"] <= 1.0
        assert 0 <= metrics[model]["false_alarms_at_full_recall"] <= metrics["data"]["test_images"]
        assert 0 <= metrics[model]["missed_at_zero_false_alarms"] <= metrics["data"]["test_defective"]
    # Timings stay out of the metrics (identical runs, identical files): in timing.json and MLflow.
    assert "inference_ms_per_image" not in json.dumps(metrics)
    timing = json.loads((project / "data/evaluation/timing.json").read_text())
    assert timing["baseline"]["inference_ms_per_image"] > 0 and timing["guided"]["inference_ms_per_image"] > 0
    assert "teacher_prior_ms_per_image" not in timing["guided"]  # only the teacher variant pays for a prior
    # Which path the maps took is a fact of the machine (model.precision: auto), so it sits beside the timings.
    fast = resolve_precision("auto", torch.device("cpu")).name
    assert timing["saliency_precision"] == fast
    assert json.loads((project / "data/saliency/timing.json").read_text())["precision"] == fast
    localization = metrics["localization"]
    assert 0.0 <= localization["pseudo_mask_iou"] <= 1.0
    assert localization["n_images"] == metrics["data"]["test_defective"] > 0  # every synthetic defect has a mask
    for name in ("baseline_saliency", "guided_saliency"):
        assert 0.0 <= localization[name]["mass_inside"] <= 1.0
        assert 0.0 <= localization[name]["pointing_game"] <= localization[name]["pointing_game_tolerant"] <= 1.0
    # The default variant (consistency) deploys the baseline's graph: no segmentation output to score.
    assert "guided_segmentation" not in localization
    for plot in ("pr_baseline.csv", "pr_guided.csv", "train_baseline.csv", "train_guided.csv"):
        assert (project / "data/plots" / plot).stat().st_size > 0
    evaluation = project / "data/evaluation"
    for picture in ("pr_curves.png", "overlays.png", "training_baseline.png", "training_guided.png"):
        assert (evaluation / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", picture
    results = (evaluation / "results.md").read_text()
    assert "| baseline | image-level | 0 |" in results and "| guided (layercam prior) | image-level | 0 |" in results
    assert len((evaluation / "localization.csv").read_text().splitlines()) == 1 + localization["n_images"]
    assert (evaluation / "per_fold.csv").read_text().count("\nguided,0,") == 1


@pytest.mark.slow
def test_dvc_plots_show_draws_each_plot_once(project: Path) -> None:
    plots = json.loads(dvc(project, "plots", "show", "--json"))["data"]
    top_level = [
        next(iter(item)) if isinstance(item, dict) else item
        for item in yaml.safe_load((project / "dvc.yaml").read_text())["plots"]
    ]
    assert sorted(plots) == sorted(top_level)  # no second, per-file plot of the same data
    assert [len(drawn) for drawn in plots.values()] == [1] * len(plots)
    vega = [drawn[0] for drawn in plots.values() if drawn[0]["type"] == "vega"]
    assert len(vega) == 3 and all(plot["content"]["data"]["values"] for plot in vega)  # drawn with their data


@pytest.mark.slow
def test_second_repro_runs_nothing(project: Path) -> None:
    output = dvc(project, "repro")
    assert stages_run(output) == []
    assert "up to date" in output


@pytest.mark.slow
def test_mlflow_holds_one_run_per_stage_and_both_registered_models(project: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("knowledge-guided")
    runs = client.search_runs([experiment.experiment_id])
    by_stage: dict[str, list] = {}
    for run in runs:
        by_stage.setdefault(run.data.tags["stage"], []).append(run)
    assert {stage: len(found) for stage, found in by_stage.items()} == {stage: 1 for stage in STAGES}
    for stage, (run,) in by_stage.items():
        assert run.info.status == "FINISHED", stage
        assert run.data.metrics, f"{stage} logged no metrics"
        assert run.data.tags["git_commit"] != "unknown"
    computed = {stage: run.data.tags.get("compute.precision") for stage, (run,) in by_stage.items()}
    resolved = resolve_precision("auto", torch.device("cpu")).name  # the shrunk config asks for auto
    assert computed == {
        **{stage: None for stage in STAGES},
        **{stage: resolved for stage in ("train_baseline", "saliency", "train_guided", "evaluate", "release")},
    }
    # One `dvc repro` is one pipeline run: all stages share its id.
    assert len({run.data.tags["pipeline_run"] for run in runs}) == 1
    evaluation = by_stage["evaluate"][0]
    assert evaluation.data.tags["upstream.train_guided"] == by_stage["train_guided"][0].info.run_id
    assert "fold0/test_ap" in by_stage["train_baseline"][0].data.metrics
    assert {"baseline.ap", "guided.ap", "localization.pseudo_mask_iou"} <= set(evaluation.data.metrics)
    artifacts = {item.path for item in client.list_artifacts(evaluation.info.run_id)}
    assert {
        "results.md",
        "report.html",
        "pr_curves.png",
        "overlays.png",
        "training_baseline.png",
        "training_guided.png",
    } <= artifacts
    names = {model.name for model in client.search_registered_models()}
    assert {"synthetic-baseline", "synthetic-guided"} <= names


@needs_chromium
@pytest.mark.slow
def test_report_renders_the_metrics_and_an_identical_run_writes_it_identically(project: Path, tmp_path: Path) -> None:
    report = project / "data/evaluation/report.html"
    metrics = json.loads((project / "data/metrics/evaluate.json").read_text())
    scores = pd.read_csv(project / "data/evaluation/scores.csv", dtype={"id": str})
    threshold = yaml.safe_load((project / "params.yaml").read_text())["evaluate"]["threshold"]
    check_rendered(report, tmp_path, metrics, scores, threshold)
    written = report.read_bytes()
    assert stages_run(dvc(project, "repro", "--force", "--single-item", "evaluate")) == ["evaluate"]
    assert report.read_bytes() == written


@pytest.mark.slow
def test_guided_param_change_reruns_only_guided_training_and_evaluation(project: Path) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train_guided"]["variant"] = "teacher"  # the variant that reads the prior at inference
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert stages_run(dvc(project, "repro")) == ["train_guided", "evaluate", "release"]
    metrics = json.loads((project / "data/metrics/evaluate.json").read_text())
    timing = json.loads((project / "data/evaluation/timing.json").read_text())["guided"]
    assert timing["inference_ms_per_image_with_teacher_prior"] > timing["inference_ms_per_image"]
    assert 0.0 <= metrics["localization"]["guided_segmentation"]["iou"] <= 1.0


@pytest.mark.slow
def test_exp_run_with_a_saliency_param_reruns_saliency_onwards_never_baseline_training(project: Path) -> None:
    # Grad-CAM explains one layer (the defaults name two for LayerCAM).
    output = dvc(project, "exp", "run", "-S", "saliency.method=gradcam", "-S", "saliency.layers=[features.maxpool]")
    assert stages_run(output) == ["saliency", "pseudo_labels", "train_guided", "evaluate", "release"]
    table = dvc(project, "exp", "show", "--csv")
    assert "gradcam" in table and "guided.ap" in table


@pytest.mark.slow
def test_sweep_runs_each_point_as_an_experiment_saves_it_and_plots_ap_against_the_count(project: Path) -> None:
    # Last in this module: the project has been reproduced, so the first point reruns nothing.
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("knowledge-guided")
    releases = len(client.search_runs([experiment.experiment_id], "tags.stage = 'release'"))
    command = [*kgi("sweep", "run"), "pseudo_labels.true_masks", "0,all", "--out", "sweep"]
    result = subprocess.run(command, cwd=project, env=project_env(project), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    # A point runs up to the evaluation, never the release (which no summary reads).
    assert len(client.search_runs([experiment.experiment_id], "tags.stage = 'release'")) == releases
    runs = sorted(path.name for path in (project / "sweep/runs").iterdir())
    assert runs == ["true-masks-0-seed0", "true-masks-all-seed0"]
    for run in runs:
        saved = {path.name for path in (project / "sweep/runs" / run).iterdir()}
        assert {"params.yaml", "evaluate.json", "prepare.json", "pseudo_labels.json", "scores.csv"} <= saved
        assert "release.json" not in saved  # the release did not run for the point
    summary = pd.read_csv(project / "sweep/summary.csv")
    assert sorted(summary["model"]) == ["baseline", "baseline", "guided", "guided"]
    assert summary["true_masks"].min() == 0 and summary["true_masks"].max() > 0
    assert (project / "sweep/ap_vs_true_masks.png").read_bytes()[:4] == b"\x89PNG"
    shown = dvc(project, "exp", "show", "--csv")
    assert "true-masks-0-seed0" in shown and "true-masks-all-seed0" in shown
    # A rerun keeps the finished points instead of training again.
    again = subprocess.run(command, cwd=project, env=project_env(project), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done before, kept") == 2
    sweeps = client.search_runs([experiment.experiment_id], "tags.stage = 'sweep'")
    assert sweeps and "summary.csv" in {item.path for item in client.list_artifacts(sweeps[0].info.run_id)}
