"""The evaluation's own logic: baseline against guided, per fold and overall, in numbers and pictures.

``stages/evaluate.py`` runs the models and writes files; everything here works on arrays and
tables, so it is tested without a model. Conventions:

* A *scores frame* has one row per test image: fold, id, label and one score column per model
  (``MODELS``), the defect probabilities. It is ``data/evaluation/scores.csv``.
* Classification figures are those of ``metrics.classification_metrics`` per fold; the headline
  is their mean over folds (how the literature reports AP), with the std (ddof=0) over folds.
* Localization is scored on every defective test image that has a true mask, per image, and
  averaged per fold and over all such images (each image counts once).

Runs of several seeds are combined in ``pipeline.evaluation.seeds``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from pipeline.metrics.classification import CLASSIFICATION_METRICS, MetricsError, summarize_folds
from pipeline.metrics.figures import (
    heatmap_overlay,
    mark_mask,
    overlay_grid,
    plot_training_curves,
    results_table_markdown,
)
from pipeline.metrics.localization import mask_iou, pointing_game_hit, saliency_mass_inside

MODELS = ("baseline", "guided")
# Maps scored against the true mask; all are at the prepared image size.
SALIENCY_MAPS = ("baseline_saliency", "guided_saliency", "guided_segmentation")
# The guided segmentation output is a probability: a pixel at or above this is "defect".
SEGMENTATION_THRESHOLD = 0.5
# Headline classification keys of each model in the metrics file (fold means) ...
HEADLINE = tuple(key for key in CLASSIFICATION_METRICS if key not in ("threshold_best", "n_images", "n_defective"))
# ... those also given with their std over folds, and those given for each fold.
WITH_STD = ("ap", "auroc", "f1_best", "false_alarms_at_full_recall", "missed_at_zero_false_alarms")
PER_FOLD = ("ap", "auroc", "false_alarms_at_full_recall", "missed_at_zero_false_alarms")
# The wrong decisions at the threshold, each kind's picture file stem.
ERROR_KINDS = {"miss": "misses", "false alarm": "false_alarms"}
# Of each model's misses and of its false alarms, the most confident ones are drawn (all are listed),
# in smaller cells than the hardest images': a page of four such grids stays readable at a glance.
ERRORS_DRAWN = 6
ERROR_CELL_HEIGHT = 160

T = TypeVar("T")


def check_test_folds(index: pd.DataFrame, source: str | Path = "index.csv") -> None:
    """Raise MetricsError naming every test fold without a defective or a defect-free image.

    Checked before any model runs: AP is undefined without a defective image (scikit-learn
    returns NaN and a warning), AUROC and false alarms without a defect-free one.
    """
    problems = []
    for fold, labels in index[index["fold"] >= 0].groupby("fold", sort=True)["label"]:
        defective = int((labels == 1).sum())
        if defective == 0 or defective == len(labels):
            missing = "defective" if defective == 0 else "defect-free"
            problems.append(f"fold {fold} has {len(labels)} test images but no {missing} one")
    if index[index["fold"] >= 0].empty:
        problems.append("no test images (every fold is -1)")
    if problems:
        raise MetricsError(
            f"{source}: {'; '.join(problems)}, so AP and the false-alarm counts are undefined. "
            "Rerun prepare with fewer prepare.folds or a data set with defective and defect-free "
            "images in every test fold."
        )


def timed_per_image(
    infer: Callable[[slice], T], count: int, warmup: int = 2, repeats: int = 3, sample: int = 32
) -> tuple[T, float]:
    """``infer(slice(None))`` over ``count`` images, and the seconds it took per image.

    A first call on ``warmup`` images is not timed: one-off costs (memory allocation, kernel
    selection, lazy initialisation) are not the per-image cost a line would pay. The fastest of
    ``repeats`` passes is reported, as ``timeit`` does: slower passes measure other processes
    competing for the machine, not the model. Only the first pass covers every image (its
    result is returned); the others time the first ``sample`` (one inference batch), so that
    timing does not cost three passes over the fold (at 256x704 with flips, most of the stage).
    """
    if count <= 0 or repeats <= 0:
        raise ValueError(f"need images and passes to time, got count={count}, repeats={repeats}")
    infer(slice(0, min(warmup, count)))
    started = time.perf_counter()
    result = infer(slice(None))
    best = (time.perf_counter() - started) / count
    timed = min(sample, count)
    for _ in range(repeats - 1):
        started = time.perf_counter()
        infer(slice(0, timed))
        best = min(best, (time.perf_counter() - started) / timed)
    return result, best


def classification_summary(scores: pd.DataFrame, threshold: float) -> tuple[dict, pd.DataFrame]:
    """Headline metrics per model (fold means, stds over folds, pooled AP, per-fold figures) and
    a long table of every metric per model and fold."""
    headline, rows = {}, []
    for model in MODELS:
        summary = summarize_folds(scores.rename(columns={model: "score"}), threshold)
        mean, std = summary["mean"], summary["std"]
        headline[model] = {
            **{key: mean[key] for key in HEADLINE},
            **{f"{key}_std": std[key] for key in WITH_STD},
            "ap_pooled": summary["pooled"]["ap"],
            **{f"fold{fold}": {key: metrics[key] for key in PER_FOLD} for fold, metrics in summary["per_fold"].items()},
        }
        rows += [{"model": model, "fold": fold, **metrics} for fold, metrics in summary["per_fold"].items()]
    return headline, pd.DataFrame(rows)


def localization_table(
    scores: pd.DataFrame,
    maps: Mapping[str, np.ndarray],
    true_masks: Sequence[np.ndarray | None],
    tolerance: float = 0.0,
) -> pd.DataFrame:
    """One row per defective image with a true mask: how each map points at the defect.

    ``maps`` holds, aligned with the rows of ``scores``, the ``SALIENCY_MAPS`` (N, H, W) and
    ``pseudo_mask`` (the Otsu mask of the baseline saliency). Columns: fold, id,
    mask_area_share (the mass a uniform map would put inside: the chance level), then
    ``<map>.mass_inside``, ``<map>.pointing_game`` (strict), ``<map>.pointing_game_tolerant``
    (only when ``tolerance`` > 0), ``guided_segmentation.iou`` and ``pseudo_mask.iou``.
    """
    if len(true_masks) != len(scores):
        raise MetricsError(f"{len(scores)} scored images but {len(true_masks)} true masks")
    rows = []
    for k, (fold, image_id, label) in enumerate(zip(scores["fold"], scores["id"], scores["label"])):
        mask = true_masks[k]
        if label != 1 or mask is None or not mask.any():
            continue
        row: dict[str, Any] = {"fold": fold, "id": image_id, "mask_area_share": float(mask.mean())}
        for name in (n for n in SALIENCY_MAPS if n in maps):  # a variant without a head has no S
            row[f"{name}.mass_inside"] = saliency_mass_inside(maps[name][k], mask)
            row[f"{name}.pointing_game"] = float(pointing_game_hit(maps[name][k], mask))
            if tolerance > 0:
                row[f"{name}.pointing_game_tolerant"] = float(pointing_game_hit(maps[name][k], mask, tolerance))
        if "guided_segmentation" in maps:
            segmented = maps["guided_segmentation"][k] >= SEGMENTATION_THRESHOLD
            row["guided_segmentation.iou"] = mask_iou(segmented, mask)
        row["pseudo_mask.iou"] = mask_iou(maps["pseudo_mask"][k], mask)
        rows.append(row)
    return pd.DataFrame(rows)


def summarize_localization(table: pd.DataFrame) -> tuple[dict, pd.DataFrame]:
    """Means over all images (nested by map, for the metrics file; {} without any image) and
    a table of the means per fold."""
    if table.empty:
        return {}, pd.DataFrame()
    figures = [c for c in table.columns if c not in ("fold", "id")]
    per_fold = table.groupby("fold", sort=True)[figures].mean()
    per_fold.insert(0, "n_images", table.groupby("fold", sort=True).size())
    overall = {"n_images": float(len(table)), **_nest(table[figures].mean().to_dict())}
    # Kept at the top level: the pseudo-masks are the baseline's knowledge, not a model output.
    overall["pseudo_mask_iou"] = overall.pop("pseudo_mask")["iou"]
    return overall, per_fold.reset_index()


def _nest(flat: Mapping[str, float]) -> dict:
    """{"a.b": 1, "c": 2} -> {"a": {"b": 1}, "c": 2}, as DVC and MLflow flatten it back."""
    nested: dict = {}
    for key, value in flat.items():
        head, _, tail = key.partition(".")
        if tail:
            nested.setdefault(head, {})[tail] = float(value)
        else:
            nested[key] = float(value)
    return nested


def hardest_images(scores: pd.DataFrame, count: int) -> pd.DataFrame:
    """The ``count`` defective images scored lowest and the ``count`` defect-free images scored
    highest, by the mean of both models' scores: hard for both, so neither model is favoured.

    Ties are broken by id, so the picture does not change between identical runs. Defective
    images come first, hardest first. Per fold and then over the folds' picks gives the same
    result as over all images at once.
    """
    ranked = scores.assign(_mean=scores[list(MODELS)].mean(axis=1))
    defective = ranked[ranked["label"] == 1].sort_values(["_mean", "id"], ascending=[True, True])
    defect_free = ranked[ranked["label"] == 0].sort_values(["_mean", "id"], ascending=[False, True])
    return pd.concat([defective.head(count), defect_free.head(count)]).drop(columns="_mean")


def decision_errors(scores: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Every wrong decision at ``threshold`` (defect when ``score >= threshold``, as in
    ``metrics``): one row per model and image, the scores frame's columns plus ``model`` and
    ``kind`` ("miss" or "false alarm"), the most confident first (misses scored lowest, false
    alarms scored highest), ties by id. Per fold and then over the folds' picks gives the same
    first rows of each model and kind as over all images at once.
    """
    found = []
    for model in MODELS:
        missed = scores[(scores["label"] == 1) & (scores[model] < threshold)]
        alarms = scores[(scores["label"] == 0) & (scores[model] >= threshold)]
        found += [
            missed.sort_values([model, "id"]).assign(model=model, kind="miss"),
            alarms.sort_values([model, "id"], ascending=[False, True]).assign(model=model, kind="false alarm"),
        ]
    return pd.concat(found, ignore_index=True)


def drawn_errors(errors: pd.DataFrame, count: int = ERRORS_DRAWN) -> pd.DataFrame:
    """The first ``count`` rows of each model and kind of ``decision_errors``: those drawn."""
    return errors.groupby(["model", "kind"], sort=False).head(count)


def error_pictures(
    errors: pd.DataFrame, panels: Mapping[str, Mapping[str, np.ndarray]], method: str
) -> dict[str, np.ndarray]:
    """``errors_<model>_<kind>.png`` -> the overlay grid of that model's drawn errors of that
    kind (``drawn_errors``); a model without errors of a kind gets no picture."""
    pictures = {}
    for (model, kind), rows in drawn_errors(errors).groupby(["model", "kind"], sort=False):
        pictures[f"errors_{model}_{ERROR_KINDS[kind]}.png"] = overlay_picture(rows, panels, method, ERROR_CELL_HEIGHT)
    return pictures


def overlay_picture(
    hardest: pd.DataFrame, panels: Mapping[str, Mapping[str, np.ndarray]], method: str, cell_height: int = 256
) -> np.ndarray:
    """The overlay grid: per image (rows of ``hardest``) the image, its true mask, both models'
    saliency and the guided segmentation, the true-mask outline on every heatmap.

    ``panels[id]`` holds "image" (uint8 H x W), "true_mask" (bool or None) and the
    ``SALIENCY_MAPS`` in [0, 1]. Every panel is scaled to ``cell_height`` pixels.
    """
    rows, titles = [], []
    for item in hardest.itertuples(index=False):
        panel = panels[item.id]
        image, mask = panel["image"], panel["true_mask"]
        # Dimmed, so the mask drawn on it stands out while the part stays recognisable.
        shown_mask = (0.6 * image).astype(np.uint8)
        heatmaps = [heatmap_overlay(image, panel[name]) for name in SALIENCY_MAPS if name in panel]
        if mask is not None and mask.any():
            shown_mask = mark_mask(shown_mask, mask, color=(0, 255, 0))
            shown_mask[mask] = (0, 255, 0)
            heatmaps = [mark_mask(heat, mask) for heat in heatmaps]
        rows.append([image, shown_mask, *heatmaps])
        kind = "DEFECT" if item.label == 1 else "no defect"
        titles.append(f"{item.id} (fold {item.fold})\n{kind}\nbaseline {item.baseline:.2f}\nguided {item.guided:.2f}")
    columns = ["image", "true mask", f"baseline {method}", f"guided {method}", "guided segmentation (prob.)"][
        : 2 + len(heatmaps)
    ]
    return overlay_grid(rows, titles, columns, cell_height)


def plot_training(history_csv: str | Path, path: str | Path, title: str) -> None:
    """The training-curves picture of one training stage's per-epoch CSV (data/plots/train_*.csv).

    Wall-clock seconds, all-zero columns (the baseline's segmentation loss and weight) and
    copies of an earlier column (the baseline's loss is its classification loss) are left out:
    they would only take panels.
    """
    history = pd.read_csv(history_csv).drop(columns="seconds", errors="ignore")
    keep: list[str] = []
    for column in history.columns:
        values = history[column]
        if column in ("epoch", "fold", "seed") or (
            values.fillna(0).ne(0).any() and not any(values.equals(history[k]) for k in keep)
        ):
            keep.append(column)
    plot_training_curves(history[keep], path, title)


def results_markdown(title: str, metrics: Mapping[str, Any], method: str) -> str:
    """The results in the paper's format (method, label type, pixel masks, AP) and the
    localization against the true masks, as Markdown (no timings: identical runs write identical
    files; the evaluation's ``timing.json`` has them)."""
    rows = [
        {
            "Method": "baseline" if m == "baseline" else f"guided ({method} prior)",
            "Label type": "image-level",
            "Pixel masks": 0,
            "AP": metrics[m]["ap"],
            "AP std (folds)": metrics[m]["ap_std"],
            "AUROC": metrics[m]["auroc"],
            "F1 (best)": metrics[m]["f1_best"],
            "False alarms at 100% recall": metrics[m]["false_alarms_at_full_recall"],
            "Missed at 0 false alarms": metrics[m]["missed_at_zero_false_alarms"],
        }
        for m in MODELS
    ]
    data = metrics["data"]
    text = [
        f"# {title}\n",
        results_table_markdown(rows, list(rows[0])),
        f"Test images: {data['test_images']:.0f} ({data['test_defective']:.0f} defective) in "
        f"{data['folds']:.0f} fold(s). AP, AUROC, F1 and counts are means over folds; false alarms "
        "and misses are images of one fold, each fold's model at its own threshold.\n",
    ]
    loc = metrics.get("localization")
    if loc:
        names = {
            "baseline_saliency": f"baseline {method}",
            "guided_saliency": f"guided {method}",
            "guided_segmentation": "guided segmentation",
        }
        rows = [
            {
                "Map": label,
                "Mass inside mask %": loc[name]["mass_inside"],
                "Pointing game %": loc[name]["pointing_game"],
                "Pointing game, tolerant %": loc[name].get("pointing_game_tolerant"),
                "IoU %": loc[name].get("iou"),
            }
            for name, label in names.items()
            if name in loc
        ]
        rows += [
            {"Map": "Otsu pseudo-mask of baseline", "IoU %": loc["pseudo_mask_iou"]},
            {"Map": "uniform map (chance)", "Mass inside mask %": loc["mask_area_share"]},
        ]
        tolerant = "pointing_game_tolerant" in loc["baseline_saliency"]
        columns = [c for c in rows[0] if tolerant or c != "Pointing game, tolerant %"]
        text += [
            "## Localization against the true masks\n",
            results_table_markdown(rows, columns),
            f"Over {loc['n_images']:.0f} defective test images with a true mask, each counted once.\n",
        ]
    return "\n".join(text)
