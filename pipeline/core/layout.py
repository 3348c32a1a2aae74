"""Where every stage's outputs live, as ``dvc.yaml`` declares them (a test keeps the two equal).

Stage scripts take their paths from here and pass them into the library; no library module
chooses a path of its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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


@dataclass(frozen=True)
class KnowledgeRound:
    """One round of knowledge transfer: a model's saliency maps, their pseudo-masks and the guided
    model trained on them (docs/method.md: "Knowledge rounds").

    The first round is the pipeline's own saliency, pseudo_labels and train_guided stages, learning
    from the baseline; round ``k`` > 1 (params ``rounds``) learns from round ``k - 1``'s model and
    keeps its files beside the first round's, each name prefixed ``round<k>_``.
    """

    name: str  # the model folder's name: "guided" for the first round, else "round<k>"
    learns_from: str  # the model folder whose saliency it learns from: "baseline", "guided", "round<k-1>"

    @property
    def first(self) -> bool:
        return self.name == FIRST_ROUND.name

    def _named(self, name: str) -> str:
        return name if self.first else f"{self.name}_{name}"

    def stage(self, name: str) -> str:
        return round_stage(name, self.name)

    @property
    def teacher(self) -> Path:
        """The folder of the model whose saliency this round learns from (fold<k>.pt)."""
        return DATA / self.learns_from

    @property
    def saliency(self) -> Path:
        return DATA / self._named("saliency")

    @property
    def pseudo_masks(self) -> Path:
        return DATA / self._named("pseudo_masks")

    @property
    def model(self) -> Path:
        return DATA / self.name

    def metrics(self, stage: str) -> Path:
        return metrics_file(self._named(stage))

    def plot(self, stage: str) -> Path:
        return plot_file(self._named(stage))

    def checkpoints(self, stage: str) -> Path:
        return checkpoints(self._named(stage))


FIRST_ROUND = KnowledgeRound(GUIDED.name, BASELINE.name)


def round_stage(stage: str, round_name: str | None) -> str:
    """The DVC stage that runs ``stage`` (saliency, pseudo_labels, train_guided) for a round: the
    stage itself for the first round (``round_name`` None or "guided"), else dvc.yaml's foreach
    stage ``round_<stage>@<round>``."""
    return stage if round_name in (None, FIRST_ROUND.name) else f"round_{stage}@{round_name}"


def project_root() -> Path:
    """The project's root, also from inside the temporary copy a queued experiment runs in.

    ``dvc exp run --queue`` / ``--temp`` run the stages in ``<root>/.dvc/tmp/exps/tmp<random>/``,
    deleted afterwards, and set ``DVC_ROOT`` to ``<root>`` for them (``dvc repro`` sets it to the
    repository root, the working directory). ``DVC_ROOT`` counts only where the working directory
    lies inside it, so a stale value exported in a shell cannot redirect a stage run by hand; the
    ``.dvc/tmp/exps`` layout is the fallback. Otherwise (no DVC): the working directory.
    """
    cwd = Path.cwd().resolve()
    declared = os.environ.get("DVC_ROOT")
    if declared:
        root = Path(declared).resolve()
        if (root / ".dvc").is_dir() and (cwd == root or root in cwd.parents):
            return root
    for parent in cwd.parents:
        if parent.name == "exps" and parent.parent.name == "tmp" and parent.parent.parent.name == ".dvc":
            return parent.parent.parent.parent
    return cwd
