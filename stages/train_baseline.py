"""Stage train_baseline: the plain classifier, image-level labels only, one model per fold.

Outputs: data/baseline/fold<k>.pt and run.json; data/metrics/train_baseline.json;
data/plots/train_baseline.csv (per-epoch losses and test AP).
"""

from __future__ import annotations

from pipeline.config import load_section
from pipeline.core import layout
from pipeline.core.runner import run_stage
from pipeline.training.objectives import Objective
from pipeline.training.stage import TrainingStage, run_training_stage

STAGE = TrainingStage(
    "train_baseline",
    "baseline",
    layout.PREPARED,
    upstream=(layout.PREPARED,),
    out=layout.BASELINE,
    metrics=layout.metrics_file("train_baseline"),
    plot=layout.plot_file("train_baseline"),
    checkpoints=layout.checkpoints("train_baseline"),
)


def main() -> None:
    run_training_stage(
        STAGE, load_section("model"), load_section("train_baseline"), objective_for=lambda data, fold: Objective()
    )


if __name__ == "__main__":
    run_stage("train_baseline", main)
