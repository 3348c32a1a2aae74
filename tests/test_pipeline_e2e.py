"""End to end: `dvc repro` of the whole pipeline on a shrunk config, in a temporary copy."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["prepare", "train_baseline", "saliency", "pseudo_labels", "train_guided", "evaluate"]
PROJECT_FILES = ["pipeline", "stages", "dvc.yaml", "params.yaml", "pyproject.toml", ".dvc/config", ".dvc/.gitignore"]

SHRUNK = {
    "prepare": {"width": 64, "height": 64, "synthetic": {"items": 12, "images_per_item": 4, "defect_ratio": 0.3}},
    "train_baseline": {"epochs": 1, "batch_size": 8},
    "train_guided": {"epochs": 2, "batch_size": 8},
    "saliency": {"overlays": 2},
    "evaluate": {"overlays": 1, "pointing_tolerance": 4},
}


def merge(base: dict, update: dict) -> dict:
    for key, value in update.items():
        base[key] = merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return base


def make_shrunk_project(target: Path, overrides: dict = SHRUNK) -> Path:
    """Copy the project's code and config to ``target``, shrink params, commit it in a new git repo."""
    for name in PROJECT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    params = yaml.safe_load((target / "params.yaml").read_text())
    (target / "params.yaml").write_text(yaml.safe_dump(merge(params, overrides)))
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "shrunk copy"]):
        subprocess.run(command, cwd=target, check=True, env=git_env())
    return target


def git_env() -> dict[str, str]:
    return {**os.environ, "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
            "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}


def dvc(project: Path, *args: str) -> str:
    env = {**git_env(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = make_shrunk_project(tmp_path_factory.mktemp("project"))
    output = dvc(project, "repro")
    assert stages_run(output) == STAGES
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
        assert metrics[model]["inference_ms_per_image"] > 0
    assert metrics["guided"]["teacher_prior_ms_per_image"] > 0
    localization = metrics["localization"]
    assert 0.0 <= localization["pseudo_mask_iou"] <= 1.0
    assert localization["n_images"] == metrics["data"]["test_defective"] > 0  # every synthetic defect has a mask
    for name in ("baseline_saliency", "guided_saliency", "guided_segmentation"):
        assert 0.0 <= localization[name]["mass_inside"] <= 1.0
        assert 0.0 <= localization[name]["pointing_game"] <= localization[name]["pointing_game_tolerant"] <= 1.0
    assert 0.0 <= localization["guided_segmentation"]["iou"] <= 1.0
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
    # One `dvc repro` is one pipeline run: all stages share its id.
    assert len({run.data.tags["pipeline_run"] for run in runs}) == 1
    evaluation = by_stage["evaluate"][0]
    assert evaluation.data.tags["upstream.train_guided"] == by_stage["train_guided"][0].info.run_id
    assert "fold0/test_ap" in by_stage["train_baseline"][0].data.metrics
    assert {"baseline.ap", "guided.ap", "localization.pseudo_mask_iou"} <= set(evaluation.data.metrics)
    artifacts = {item.path for item in client.list_artifacts(evaluation.info.run_id)}
    assert {"results.md", "pr_curves.png", "overlays.png", "training_baseline.png", "training_guided.png"} <= artifacts
    names = {model.name for model in client.search_registered_models()}
    assert {"synthetic-baseline", "synthetic-guided"} <= names


@pytest.mark.slow
def test_guided_param_change_reruns_only_guided_training_and_evaluation(project: Path) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train_guided"]["seg_weight"] = 0.5
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert stages_run(dvc(project, "repro")) == ["train_guided", "evaluate"]
