"""Stage train_guided: the same backbone retrained with the baseline's knowledge.

What the guided model reads and what its auxiliary loss targets depend on the variant
(``pipeline/models/variants.py``): the baseline's saliency map as a prior channel, the Otsu pseudo-masks
as the segmentation head's target with a loss weight that decays over the epochs, or the
saliency maps as the target of the consistency loss. Under mixed supervision an image's true
mask replaces its pseudo-mask and, where the target is the saliency, its saliency map. One model
per fold, each guided by the baseline of the same fold (never by a model that saw its test images).
Outputs: data/guided/fold<k>.pt and run.json; data/metrics/train_guided.json;
data/plots/train_guided.csv.
"""

from __future__ import annotations

from pipeline.config import load_section
from pipeline.core import layout
from pipeline.core.runner import run_stage
from pipeline.data.prepared import PreparedData
from pipeline.models.variants import VARIANTS
from pipeline.training.objectives import GuidedObjective, load_guidance
from pipeline.training.stage import TrainingStage, run_training_stage

STAGE = TrainingStage(
    "train_guided",
    "guided",
    layout.PREPARED,
    upstream=(layout.PREPARED, layout.SALIENCY, layout.PSEUDO_MASKS),
    out=layout.GUIDED,
    metrics=layout.metrics_file("train_guided"),
    plot=layout.plot_file("train_guided"),
    checkpoints=layout.checkpoints("train_guided"),
)


def main() -> None:
    params = load_section("train_guided")

    def objective_for(data: PreparedData, fold: int) -> GuidedObjective:
        guidance = load_guidance(data, fold, VARIANTS[params.variant], layout.SALIENCY, layout.PSEUDO_MASKS)
        return GuidedObjective(guidance, params)

    run_training_stage(STAGE, load_section("model"), params, objective_for)


if __name__ == "__main__":
    run_stage("train_guided", main)
