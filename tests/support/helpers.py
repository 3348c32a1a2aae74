"""What several test modules share: shrunk copies of the project and running DVC in them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

if TYPE_CHECKING:  # annotations only: the helpers import torch lazily, where it is needed
    import torch

    from pipeline.data.prepared import PreparedData

ROOT = Path(__file__).resolve().parents[2]


def real_dataset(name: str) -> tuple[Path, pytest.MarkDecorator]:
    """``../shared/datasets/<name>`` beside the project, and a marker skipping a test where it is absent."""
    path = ROOT / "../shared/datasets" / name
    return path, pytest.mark.skipif(
        not path.is_dir(), reason=f"{name} is not at {path.resolve()} (see docs/datasets.md)"
    )


PROJECT_FILES = ["pipeline", "stages", "dvc.yaml", "params.yaml", "pyproject.toml", ".dvc/config", ".dvc/.gitignore"]

SHRUNK = {
    "prepare": {"width": 64, "height": 64, "synthetic": {"items": 12, "images_per_item": 4, "defect_ratio": 0.5}},
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
    return {
        **os.environ,
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
    }


def project_env(project: Path, **extra: str) -> dict[str, str]:
    """The environment a stage runs in inside ``project``: its own MLflow store, this Python first."""
    return {
        **git_env(),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
        **extra,
    }


def dvc(project: Path, *args: str, **extra_env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=project,
        env=project_env(project, **extra_env),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def train_tiny_models(folder: Path, size: int = 32, n: int = 8) -> tuple[dict[str, Path], torch.Tensor]:
    """Baseline and guided models (consistency, teacher) trained one epoch on ``n`` random
    ``size``-pixel images, saved with ``save_model`` as ``folder/<name>.pt``; returns the paths
    and the images (uint8 (n, size, size)). Seconds on one CPU thread."""
    import torch

    from pipeline.config import GuidedParams, ModelParams, TrainParams
    from pipeline.models.files import save_model
    from pipeline.training.loop import train

    data = tiny_data(size, n)
    images = data.images
    generator = torch.Generator().manual_seed(2)
    priors = torch.rand(n, size, size, generator=generator)
    masks = (torch.rand(n, size, size, generator=generator) > 0.8).float()
    model_params = ModelParams(backbone="resnet18", device="cpu")
    paths = {}
    for name, params in (
        ("baseline", TrainParams(epochs=1, batch_size=n)),
        ("consistency", GuidedParams(epochs=1, batch_size=n, variant="consistency")),
        ("teacher", GuidedParams(epochs=1, batch_size=n, variant="teacher")),
    ):
        objective = guided(params, priors, masks) if isinstance(params, GuidedParams) else None
        model, config, _ = train(data, 0, model_params, params, objective)
        paths[name] = folder / f"{name}.pt"
        save_model(paths[name], model, config)
    return paths, images


def tiny_data(size: int = 64, n: int = 8) -> PreparedData:
    """``n`` random ``size``-pixel images, every other one defective; fold 0 (2 images) is the test set."""
    import pandas as pd
    import torch

    from pipeline.data.prepared import PreparedData

    generator = torch.Generator().manual_seed(1)
    index = pd.DataFrame(
        {
            "id": [f"i{k}" for k in range(n)],
            "label": [1, 0] * (n // 2),
            "group": [f"g{k}" for k in range(n)],
            "fold": [0, 0] + [1] * (n - 2),
            "has_mask": False,
        }
    )
    images = torch.randint(0, 256, (n, size, size), dtype=torch.uint8, generator=generator)
    return PreparedData(Path("."), index, images)


def guided(params, priors: torch.Tensor, pseudo_masks: torch.Tensor):
    """The guided objective of ``params`` (GuidedParams) for saliency maps and pseudo-masks of every row."""
    from pipeline.models.variants import VARIANTS
    from pipeline.training.objectives import GuidedObjective, guidance_for

    return GuidedObjective(guidance_for(VARIANTS[params.variant], priors, pseudo_masks), params)


def noise_data() -> PreparedData:
    """24 noise images of 32x32, a quarter defective; fold 0 (8 images) is the test set."""
    import numpy as np
    import pandas as pd
    import torch

    from pipeline.data.prepared import PreparedData

    n = 24
    index = pd.DataFrame(
        {
            "id": [f"im{i}" for i in range(n)],
            "label": [int(i % 4 == 0) for i in range(n)],
            "group": [f"g{i}" for i in range(n)],
            "fold": [0 if i < 8 else -1 for i in range(n)],
            "has_mask": False,
        }
    )
    images = np.random.default_rng(0).integers(0, 256, (n, 32, 32), dtype=np.uint8)
    return PreparedData(Path("."), index, torch.from_numpy(images))


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def leftovers(*folders: Path) -> list[Path]:
    """Temporary files of a writer killed mid-write (pipeline/core/artifacts.py names them so)."""
    return [path for folder in folders for path in folder.glob(".*.tmp-*")]


def kgi(*args: str) -> list[str]:
    """The command line of ``kgi ARGS`` for a subprocess in a project copy (its own code, not the installed one)."""
    return [sys.executable, "-m", "pipeline.cli", *args]


@contextmanager
def temporary_store(folder: Path, experiment: str) -> Iterator[Path]:
    """An MLflow store of its own in ``folder`` for a test module, its experiment named."""
    import mlflow

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        patch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
        yield folder
    mlflow.end_run()
