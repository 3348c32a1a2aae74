"""A fold's evaluation and the run's from its folds: the models on every test image, timed, their
saliency and segmentation scored against the true masks, and the pictures of the results.

This is the part of the evaluation that runs models (``pipeline.evaluation.results`` works on
the tables it yields); ``stages/evaluate.py`` reads the params, calls it and writes the files.
Models, maps and pseudo-masks are read from the pipeline's layout (``pipeline.core.layout``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.config import EvaluateParams, SaliencyParams
from pipeline.core import layout
from pipeline.core.artifacts import write_csv
from pipeline.core.devices import Precision
from pipeline.core.progress import progress
from pipeline.data.prepared import PreparedData
from pipeline.evaluation.results import (
    MODELS,
    SALIENCY_MAPS,
    classification_summary,
    decision_errors,
    drawn_errors,
    error_pictures,
    hardest_images,
    localization_table,
    overlay_picture,
    plot_training,
    summarize_localization,
    timed_per_image,
)
from pipeline.knowledge.saliency import create_saliency, saliency_maps
from pipeline.metrics.classification import pr_curve
from pipeline.metrics.figures import plot_pr_curves, save_png
from pipeline.models.files import inference_priors, load_model
from pipeline.models.inference import predict, segment
from pipeline.models.networks import GuidedClassifier, PriorAsChannel

BASELINE, GUIDED, SALIENCY, PSEUDO_MASKS = layout.BASELINE, layout.GUIDED, layout.SALIENCY, layout.PSEUDO_MASKS


def evaluate_fold(
    data: PreparedData,
    fold: int,
    saliency: SaliencyParams,
    device: torch.device,
    precision: Precision,
    params: EvaluateParams,
) -> tuple[pd.DataFrame, pd.DataFrame, dict, dict[str, float]]:
    """Scores, per-image localization, overlay candidates and seconds per image on one fold."""
    _, test = data.split(fold)
    images = data.images[test]
    priors = data.load_maps(SALIENCY / f"fold{fold}", test)
    baseline, baseline_config = load_model(BASELINE / f"fold{fold}.pt", device)
    guided, guided_config = load_model(GUIDED / f"fold{fold}.pt", device)
    # A variant that reads a prior at inference reads the baseline's maps; the others read none.
    guided_priors = inference_priors(guided_config, priors)
    seconds = {}
    baseline_scores, seconds["baseline"] = timed_per_image(
        lambda rows: predict(baseline, baseline_config, images[rows]), len(test)
    )
    guided_scores, seconds["guided"] = timed_per_image(
        lambda rows: predict(guided, guided_config, images[rows], _rows(guided_priors, rows)), len(test)
    )
    # Scores above in fp32 and the stored layout, as the released model computes them (its operating
    # point is chosen on them); the saliency maps below on the fast path, within the tolerance the
    # tests state (tests/test_precision.py).
    precision.model(baseline)
    precision.model(guided)
    if guided_priors is not None:
        # The prior the guided model needs at inference: the baseline's saliency, timed as a line would pay it.
        teacher = create_saliency(saliency.method, baseline, saliency.layers, precision)
        _, seconds["teacher_prior"] = timed_per_image(
            lambda rows: saliency_maps(teacher, baseline_config, images[rows], saliency.batch_size), len(test)
        )
    # The guided model's own saliency, with its prior (if any) fed as an extra input channel.
    layers = saliency.layers and [f"guided.{name}" for name in saliency.layers]
    explainer = create_saliency(saliency.method, PriorAsChannel(guided, guided_priors is not None), layers, precision)
    maps = {
        "baseline_saliency": priors.numpy(),
        "guided_saliency": saliency_maps(explainer, guided_config, images, saliency.batch_size, guided_priors)[0],
        "pseudo_mask": data.load_masks(PSEUDO_MASKS / f"fold{fold}", test).numpy() > 0,
    }
    if isinstance(guided, GuidedClassifier):  # variants deployed without the head have no S
        maps["guided_segmentation"] = segment(guided, guided_config, images, guided_priors)
    scores = pd.DataFrame(
        {
            "fold": fold,
            "id": data.index["id"].to_numpy()[test],
            "label": data.index["label"].to_numpy()[test],
            "baseline": baseline_scores,
            "guided": guided_scores,
        }
    )
    true_masks = [data.true_mask(row) for row in test]
    located = localization_table(scores, maps, true_masks, params.pointing_tolerance)
    # Only the fold's hardest and most confident errors can be the run's: keep their maps, not every map.
    drawn = drawn_errors(decision_errors(scores, params.threshold))["id"]
    picked = scores.index[scores["id"].isin(drawn) | scores.index.isin(hardest_images(scores, params.overlays).index)]
    panels = {
        scores["id"][k]: {
            "image": images[k].numpy(),
            "true_mask": true_masks[k],
            **{name: maps[name][k] for name in SALIENCY_MAPS if name in maps},
        }
        for k in picked
    }
    return scores, located, panels, seconds


def inference_timing(fold_seconds: tuple[dict[str, float], ...], where: str, precision: Precision) -> dict:
    """Milliseconds per image of each model, mean over folds (the guided model's without its
    prior; a teacher's prior costs the baseline's saliency on top), and the maps' precision."""
    ms = {name: 1000 * float(np.mean([s[name] for s in fold_seconds])) for name in fold_seconds[0]}
    timing: dict = {
        "where": where,
        "saliency_precision": precision.name,
        **{model: {"inference_ms_per_image": ms[model]} for model in MODELS},
    }
    if "teacher_prior" in ms:  # only a variant reading a prior at inference pays for the baseline's saliency
        timing["guided"]["teacher_prior_ms_per_image"] = ms["teacher_prior"]
        timing["guided"]["inference_ms_per_image_with_teacher_prior"] = ms["guided"] + ms["teacher_prior"]
    return timing


def timing_note(timing: dict) -> str:
    """The one line the stage prints about ``inference_timing``."""
    costs = ", ".join(f"{model} {timing[model]['inference_ms_per_image']:.2f}" for model in MODELS)
    prior = timing["guided"].get("teacher_prior_ms_per_image")
    return f"Inference ms per image on {timing['where']}: {costs}" + (
        f" (+ {prior:.2f} for the prior)" if prior else ""
    )


def write_pictures(
    out: Path, dataset: str, scores: pd.DataFrame, metrics: dict, panels: dict, params: EvaluateParams, method: str
) -> None:
    """The PR curves (and their plot data), overlays of the hardest images and of the wrong
    decisions at the threshold, and the training curves."""
    curves = {}
    for model in MODELS:
        curves[model] = pr_curve(scores["label"].to_numpy(), scores[model].to_numpy())
        curves[model].attrs["ap"] = metrics[model]["ap"]  # the legend shows the fold-mean AP
        write_csv(layout.plot_file(f"pr_{model}"), curves[model])
    folds = int(metrics["data"]["folds"])
    pooled = f"\n{folds} folds pooled; legend: AP mean over folds" * (folds > 1)
    plot_pr_curves(
        curves, out / "pr_curves.png", title=f"{dataset}: precision-recall, {len(scores)} test images{pooled}"
    )
    if params.overlays:
        picked = hardest_images(scores[scores["id"].isin(panels)], params.overlays)
        save_png(out / "overlays.png", overlay_picture(picked, panels, method))
    for name, picture in error_pictures(decision_errors(scores, params.threshold), panels, method).items():
        save_png(out / name, picture)
    for model in MODELS:
        plot_training(
            layout.plot_file(f"train_{model}"), out / f"training_{model}.png", f"{dataset}: {model} training, per epoch"
        )


def _rows(priors: torch.Tensor | None, rows) -> torch.Tensor | None:
    return None if priors is None else priors[rows]


def evaluate_folds(
    data: PreparedData, saliency: SaliencyParams, device: torch.device, precision: Precision, params: EvaluateParams
) -> tuple[pd.DataFrame, pd.DataFrame, dict, dict]:
    """``evaluate_fold`` on every fold: the scores frame, the localization table (empty without a
    true mask), the overlay panels by image id, and the inference timing."""
    fold_scores, fold_located, fold_panels, fold_seconds = zip(
        *[
            evaluate_fold(data, fold, saliency, device, precision, params)
            for fold in progress(data.folds, "evaluate", "fold")
        ]
    )
    scores = pd.concat(fold_scores, ignore_index=True)
    located = pd.concat([t for t in fold_located if not t.empty] or [pd.DataFrame()], ignore_index=True)
    panels = {image_id: panel for found in fold_panels for image_id, panel in found.items()}
    timing = inference_timing(fold_seconds, f"{device} ({torch.get_num_threads()} threads)", precision)
    return scores, located, panels, timing


def evaluation_metrics(
    scores: pd.DataFrame, located: pd.DataFrame, folds: int, threshold: float
) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """The metrics file's figures (classification per model, the test data, localization), the
    long table of every metric per model and fold, and the localization means per fold."""
    metrics, per_fold = classification_summary(scores, threshold)
    metrics["data"] = {
        "folds": float(folds),
        "test_images": float(len(scores)),
        "test_defective": float(scores["label"].sum()),
    }
    metrics["localization"], located_per_fold = summarize_localization(located)
    return metrics, per_fold, located_per_fold
