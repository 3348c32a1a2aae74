"""Stage release: the chosen model trained on every labelled image, at a threshold chosen on the
cross-validation's pooled out-of-fold scores, registered as the alias ``candidate``.

``release.model`` says which model (guided: its baseline, saliency and pseudo-masks first);
``release.operating_point`` where the threshold lies; ``serving`` the limits the registered model keeps.
The logic lives in ``pipeline.deployment.release``.
Outputs: data/release/{baseline.pt, guided.pt, operating_point.json, run.json, saliency/,
pseudo_masks/}; data/metrics/release.json.
"""

from __future__ import annotations

from pipeline.config import load_section
from pipeline.core import layout
from pipeline.core.runner import run_stage
from pipeline.deployment.release import ReleasePaths, ReleaseSections, run_release

PATHS = ReleasePaths(
    prepared=layout.PREPARED,
    evaluation=layout.EVALUATION,
    evaluation_metrics=layout.metrics_file("evaluate"),
    out=layout.RELEASE,
    metrics=layout.metrics_file("release"),
    checkpoints=layout.checkpoints("release"),
)


def main() -> None:
    sections = ReleaseSections(
        model=load_section("model"),
        train_baseline=load_section("train_baseline"),
        saliency=load_section("saliency"),
        pseudo_labels=load_section("pseudo_labels"),
        train_guided=load_section("train_guided"),
        release=load_section("release"),
        serving=load_section("serving"),
    )
    run_release(sections, PATHS)


if __name__ == "__main__":
    run_stage("release", main)
