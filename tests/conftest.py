"""Fixtures that several test modules share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import torch

from support.helpers import train_tiny_models


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    """A temporary project root for running a stage's main(), with its own MLflow store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    yield tmp_path
    mlflow.end_run()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: on a busy machine a second thread only waits (seconds per test, not ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> tuple[dict[str, Path], torch.Tensor]:
    """Tiny trained models (baseline, consistency, teacher) and their images, once per module."""
    return train_tiny_models(tmp_path_factory.mktemp("models"))
