"""Where every stage's outputs live, as ``dvc.yaml`` declares them (a test keeps the two equal).

Stage scripts take their paths from here and pass them into the library; no library module
chooses a path of its own.
"""

from __future__ import annotations

from pathlib import Path

DATA = Path("data")
PREPARED = DATA / "prepared"
BASELINE = DATA / "baseline"
SALIENCY = DATA / "saliency"
PSEUDO_MASKS = DATA / "pseudo_masks"
GUIDED = DATA / "guided"
EVALUATION = DATA / "evaluation"
RELEASE = DATA / "release"
# Outside every stage's outputs: DVC deletes those before a stage runs, and a killed training
# must find its checkpoints when it is rerun.
CHECKPOINTS = DATA / "checkpoints"


# In the saliency and evaluation folders: the stage's timings, the one file besides run.json that
# differs between two identical runs (so that the metrics files do not).
TIMING = "timing.json"
# In the release folder: the threshold, its operating point and the rates expected there.
OPERATING_POINT = "operating_point.json"
# In the pseudo-mask folder: per fold, the ids whose target is a true mask (mixed supervision).
TRUE_MASKS = "true_masks.json"


def metrics_file(stage: str) -> Path:
    """The stage's metrics for ``dvc metrics`` (small, in git)."""
    return DATA / "metrics" / f"{stage}.json"


def plot_file(name: str) -> Path:
    """A plot's data for ``dvc plots`` (small, in git)."""
    return DATA / "plots" / f"{name}.csv"


def checkpoints(stage: str) -> Path:
    return CHECKPOINTS / stage
