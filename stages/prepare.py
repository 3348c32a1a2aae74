"""Stage prepare: read (or generate) the data set, split it, resize it, write it with its report.

Outputs: data/prepared/{images,masks}/<id>.png, index.csv, report.json, training_subsets.json
(the defective images each fold's models train on), run.json; data/metrics/prepare.json.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from pipeline.config import PrepareParams, load_section
from pipeline.core import layout
from pipeline.core.artifacts import output_dir, write_csv, write_json
from pipeline.core.errors import DataError
from pipeline.core.runner import run_stage
from pipeline.core.tracking import stage_run
from pipeline.data import synthetic
from pipeline.data.folds import assign_group_folds
from pipeline.data.images import read_gray, read_mask
from pipeline.data.prepared import SUBSETS_FILE, RawImage, count_table, defective_subsets, group_table, write_prepared
from pipeline.data.sources import load_source
from pipeline.data.sources.base import LoadOptions

OUT = layout.PREPARED


def synthetic_images(params: PrepareParams) -> tuple[Iterator[RawImage], dict]:
    p = params.synthetic
    generated = list(
        synthetic.generate(
            p.items, p.images_per_item, params.width, params.height, p.defect_ratio, p.defect_contrast, params.seed
        )
    )
    folds = assign_group_folds([g.group for g in generated], [g.label for g in generated], params.folds, params.seed)
    kinds = {g.id: g.kind for g in generated}
    images = (
        RawImage(g.id, g.label, g.group, _split(fold, params), g.image, g.mask) for g, fold in zip(generated, folds)
    )
    return images, {"duplicates": [], "excluded": {}, "defect_kinds": dict(Counter(kinds.values()))}


def source_images(params: PrepareParams) -> tuple[Iterator[RawImage], dict]:
    options = LoadOptions(params.group_pattern, params.labelme)
    source = load_source(params.dataset, params.path, params.folds, params.seed, options)  # validated

    def read() -> Iterator[RawImage]:
        for item in source.images:
            image = read_gray(item.image, params.max_image_pixels)
            mask = None
            if item.mask:
                mask = read_mask(item.mask, image.shape, item.image, params.max_image_pixels)
            yield RawImage(item.id, item.label, item.group, _split(item.fold, params), image, mask)

    return read(), {"duplicates": source.duplicates, "excluded": source.excluded}


def _split(fold: int, params: PrepareParams) -> int:
    """Hold-out keeps fold 0 as the test set and trains on the rest (one model instead of k)."""
    return -1 if params.split == "holdout" and fold != 0 else fold


def main() -> None:
    params = load_section("prepare")
    with stage_run("prepare", {"prepare": params}, dataset=params.dataset) as run:
        images, extra = synthetic_images(params) if params.dataset == "synthetic" else source_images(params)
        with output_dir(OUT) as out:
            index, size_stats = write_prepared(out, images, params.width, params.height)
            counts = count_table(index)
            if not set(index["fold"]) - {-1}:
                raise DataError("no test fold: every image is training-only; check the split")
            for fold in sorted(set(index["fold"]) - {-1}):
                if index.loc[index["fold"] == fold, "label"].sum() == 0:
                    raise DataError(f"test fold {fold} has no defective image; use fewer folds")
            kept = defective_subsets(index, params.defective_images, params.subset_seed)
            trained_on = {str(fold): len(ids) for fold, ids in kept.items()}
            report = {
                "dataset": params.dataset,
                "split": params.split,
                "counts": counts,
                "defective_training_images": trained_on,
                "sizes": size_stats,
                "groups": group_table(index),
                **extra,
            }
            write_json(
                out / SUBSETS_FILE,
                {"defective_images": params.defective_images, "subset_seed": params.subset_seed, "kept": kept},
            )
            write_csv(out / "index.csv", index)
            write_json(out / "report.json", report)
            run.write_lineage(out)
            run.log_artifact(out / "report.json")
            run.log_artifact(out / "index.csv")
        run.log_metrics(
            {
                "images": counts["images"],
                "defective": counts["defective"],
                "groups": counts["groups"],
                "duplicate_sets": len(extra["duplicates"]),
            }
        )
        write_json(
            layout.metrics_file("prepare"),
            {
                "images": counts["images"],
                "defective": counts["defective"],
                "defect_free": counts["defect_free"],
                "test_folds": len(set(index["fold"]) - {-1}),
                "defective_training_images": trained_on,
            },
        )
        print(
            f"  {counts['images']} images, {counts['defective']} defective, {counts['groups']} groups, "
            f"per fold {counts['per_fold']}; "
            f"defective images trained on, per fold: {trained_on}"
        )


if __name__ == "__main__":
    run_stage("prepare", main)
