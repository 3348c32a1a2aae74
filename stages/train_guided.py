"""Stage train_guided: the same backbone retrained with the baseline's knowledge.

What the guided model reads and what its auxiliary loss targets depend on the variant
(``pipeline/models/variants.py``): the baseline's saliency map as a prior channel, the Otsu pseudo-masks
as the segmentation head's target with a loss weight that decays over the epochs, or the
saliency maps as the target of the consistency loss. Under mixed supervision an image's true
mask replaces its pseudo-mask and, where the target is the saliency, its saliency map. One model
per fold, each guided by the baseline of the same fold (never by a model that saw its test images).
Outputs: data/guided/fold<k>.pt and run.json; data/metrics/train_guided.json;
data/plots/train_guided.csv.
``python -m stages.train_guided round<k>`` trains knowledge round k's model (dvc.yaml's
round_train_guided) on data/round<k>_saliency and data/round<k>_pseudo_masks into data/round<k>.
"""

from __future__ import annotations

from pipeline.config import load_round, load_section
from pipeline.core import layout
from pipeline.core.layout import KnowledgeRound
from pipeline.core.runner import run_round_stage
from pipeline.data.prepared import PreparedData
from pipeline.models.variants import VARIANTS
from pipeline.training.objectives import GuidedObjective, load_guidance
from pipeline.training.stage import TrainingStage, run_training_stage


def training_stage(knowledge_round: KnowledgeRound) -> TrainingStage:
    return TrainingStage(
        knowledge_round.stage("train_guided"),
        knowledge_round.name,  # registered as <dataset>-guided, <dataset>-round2, ...
        layout.PREPARED,
        upstream=(layout.PREPARED, knowledge_round.saliency, knowledge_round.pseudo_masks),
        out=knowledge_round.model,
        metrics=knowledge_round.metrics("train_guided"),
        plot=knowledge_round.plot("train_guided"),
        checkpoints=knowledge_round.checkpoints("train_guided"),
        section="train_guided",
    )


def main(round_name: str | None = None) -> None:
    """The stage for the knowledge round ``round_name``; None: the first (the pipeline's own stage)."""
    knowledge_round = load_round(round_name)
    params = load_section("train_guided")

    def objective_for(data: PreparedData, fold: int) -> GuidedObjective:
        variant = VARIANTS[params.variant]
        guidance = load_guidance(data, fold, variant, knowledge_round.saliency, knowledge_round.pseudo_masks)
        return GuidedObjective(guidance, params)

    run_training_stage(training_stage(knowledge_round), load_section("model"), params, objective_for)


if __name__ == "__main__":
    run_round_stage("train_guided", main)
