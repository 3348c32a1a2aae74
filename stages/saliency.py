"""Stage saliency: extract the baseline's saliency map of every image, the network's "knowledge".

For each fold, the baseline of that fold explains every image (its training images become the
guided model's pseudo-masks; its test images get the prior channel the guided model reads at
inference). Maps are 16-bit PNGs in [0, 1] at the prepared image size.
Outputs: data/saliency/fold<k>/<id>.png, overlays.png, report.json, run.json;
data/metrics/saliency.json (localization against true masks, where there are any).
``python -m stages.saliency round<k>`` does the same for knowledge round k (dvc.yaml's
round_saliency): the maps of round k - 1's model, in data/round<k>_saliency.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.config import load_round, load_section
from pipeline.core import layout
from pipeline.core.artifacts import output_dir, read_json, write_json
from pipeline.core.devices import pick_device, resolve_precision
from pipeline.core.progress import log_line, progress
from pipeline.core.runner import run_round_stage
from pipeline.core.tracking import stage_run
from pipeline.data.prepared import PreparedData
from pipeline.knowledge.fold_maps import fold_localization, overlay_rows, write_fold_maps
from pipeline.metrics.classification import mean_over_folds
from pipeline.metrics.figures import overlay_grid, save_png

PREPARED = layout.PREPARED


def main(round_name: str | None = None) -> None:
    """The stage for the knowledge round ``round_name``; None: the first (the pipeline's own stage)."""
    knowledge_round = load_round(round_name)
    model_params = load_section("model")
    params = load_section("saliency")
    device = pick_device(model_params.device)
    precision = resolve_precision(model_params.precision, device)
    data = PreparedData.load(PREPARED)
    dataset = read_json(PREPARED / "report.json")["dataset"]
    with stage_run(
        knowledge_round.stage("saliency"),
        {"saliency": params, "model.device": model_params.device, "model.precision": model_params.precision},
        dataset,
    ) as run:
        run.link_upstream(PREPARED, knowledge_round.teacher)
        run.tag_compute(str(device), precision.name)
        report: dict = {"method": params.method, "invalid_maps": {}}
        images_per_second: dict[str, float] = {}
        localization: dict[str, dict] = {}
        overlays = []
        with output_dir(knowledge_round.saliency) as out:
            for fold in progress(data.folds, "saliency", "fold"):
                maps, valid, seconds = write_fold_maps(
                    data,
                    fold,
                    knowledge_round.teacher / f"fold{fold}.pt",
                    params,
                    precision,
                    device,
                    out,
                    bar=f"fold {fold}",
                )
                invalid = data.index["id"][~valid].tolist()
                report["invalid_maps"][f"fold{fold}"] = invalid
                images_per_second[f"fold{fold}"] = len(maps) / seconds
                if invalid:
                    log_line(f"  fold {fold}: {len(invalid)} all-zero maps (reported in report.json): {invalid[:5]}")
                _, test_rows = data.split(fold)
                localization[f"fold{fold}"] = fold_localization(data, maps, test_rows)
                overlays += overlay_rows(data, maps, test_rows, params.overlays // len(data.folds) or 1)
            if params.overlays and overlays:
                titles, rows = zip(*overlays[: params.overlays])
                save_png(out / "overlays.png", overlay_grid(rows, titles, ["image + true mask", params.method]))
                run.log_artifact(out / "overlays.png")
            write_json(out / "report.json", report)
            speed = float(np.mean(list(images_per_second.values())))
            write_json(
                out / layout.TIMING,
                {"images_per_second": speed, "per_fold": images_per_second, "precision": precision.name},
            )
            run.write_lineage(out)
        metrics: dict[str, Any] = {"per_fold": localization}
        means = mean_over_folds(localization, keys=("mass_inside", "pointing_game"))
        metrics.update(means)
        write_json(knowledge_round.metrics("saliency"), metrics)
        run.log_metrics({**means, "images_per_second": speed})
        print(f"  {speed:.1f} images/s; localization on test images: {means}")


if __name__ == "__main__":
    run_round_stage("saliency", main)
