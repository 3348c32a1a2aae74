"""Image-level detection metrics, cross-validation summaries and saliency localization metrics.

Conventions used throughout:

* Labels are 0 (defect-free) / 1 (defective); scores are defect probabilities, higher = more
  likely defective. An image is called defective when ``score >= threshold``.
* Ties between a defective and a defect-free score always count against the model: in
  ``false_alarms_at_full_recall`` a defect-free image tied with the lowest defective score is a
  false alarm, and in ``missed_at_zero_false_alarms`` a defective image tied with the highest
  defect-free score is a miss. A threshold cannot separate tied images, so claiming either would
  be optimistic. ``ap`` and ``auroc`` follow scikit-learn (tied scores form one threshold step;
  a tied pair counts one half in AUROC).
* Every metric is a finite float. Input that would make one undefined (no defective image, no
  defect-free image, NaN scores) raises :class:`MetricsError` instead of returning NaN, so a NaN
  never reaches MLflow or a results table silently.
"""

from __future__ import annotations

import difflib
import operator
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
)

from pipeline.core.errors import InputError


class MetricsError(InputError):
    """Input for which a metric is undefined or malformed."""


# Key order of ``classification_metrics``; also the columns of fold summaries.
CLASSIFICATION_METRICS = (
    "ap",
    "auroc",
    "accuracy",
    "precision",
    "recall",
    "f1_best",
    "threshold_best",
    "false_alarms_at_full_recall",
    "false_alarm_rate_at_full_recall",
    "missed_at_zero_false_alarms",
    "missed_rate_at_zero_false_alarms",
    "n_images",
    "n_defective",
)


def _check_labels_scores(
    labels: np.ndarray, scores: np.ndarray, *, need_negatives: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Return labels as a bool array and scores as float64, or raise MetricsError."""
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or scores.ndim != 1:
        raise MetricsError(
            f"labels and scores must be 1-D, got shapes {labels.shape} and {scores.shape}"
        )
    if labels.shape != scores.shape:
        raise MetricsError(f"{labels.size} labels but {scores.size} scores")
    if labels.size == 0:
        raise MetricsError("no images to evaluate")
    if not np.isin(labels, (0, 1)).all():
        raise MetricsError(f"labels must be 0 or 1, got values {np.unique(labels).tolist()}")
    if not np.isfinite(scores).all():
        raise MetricsError(f"{int((~np.isfinite(scores)).sum())} scores are NaN or infinite")
    positive = labels.astype(bool)
    if not positive.any():
        raise MetricsError(
            f"no defective image among {labels.size}: AP, AUROC and recall are undefined"
        )
    if need_negatives and positive.all():
        raise MetricsError(
            f"no defect-free image among {labels.size}: AUROC and false alarms are undefined"
        )
    return positive, scores


def _best_f1(positive: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 over the thresholds of the PR curve, and the (lowest) threshold reaching it."""
    precision, recall, thresholds = precision_recall_curve(positive, scores)
    # The curve's last point (precision 1, recall 0) has no threshold and F1 0: drop it.
    precision, recall = precision[:-1], recall[:-1]
    denominator = precision + recall
    f1 = np.divide(
        2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0
    )
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def classification_metrics(
    labels: np.ndarray, scores: np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """Image-level detection metrics, keys in the order of ``CLASSIFICATION_METRICS``.

    ``precision`` is 0 when no image reaches ``threshold``. Counts (``n_images``, false alarms,
    misses) are returned as floats too, so the dict can go straight to ``mlflow.log_metrics``.
    Raises MetricsError when either class is absent.
    """
    if not np.isfinite(threshold):
        raise MetricsError(f"threshold must be finite, got {threshold}")
    positive, scores = _check_labels_scores(labels, scores)
    negative = ~positive
    n_pos, n_neg = int(positive.sum()), int(negative.sum())

    predicted = scores >= threshold
    true_pos = int((predicted & positive).sum())
    n_predicted = int(predicted.sum())
    f1_best, threshold_best = _best_f1(positive, scores)

    # Ties count against the model in both counts (see the module docstring).
    false_alarms = int((scores[negative] >= scores[positive].min()).sum())
    missed = int((scores[positive] <= scores[negative].max()).sum())

    return {
        "ap": float(average_precision_score(positive, scores)),
        "auroc": float(roc_auc_score(positive, scores)),
        "accuracy": float((predicted == positive).mean()),
        "precision": true_pos / n_predicted if n_predicted else 0.0,
        "recall": true_pos / n_pos,
        "f1_best": f1_best,
        "threshold_best": threshold_best,
        "false_alarms_at_full_recall": float(false_alarms),
        "false_alarm_rate_at_full_recall": false_alarms / n_neg,
        "missed_at_zero_false_alarms": float(missed),
        "missed_rate_at_zero_false_alarms": missed / n_pos,
        "n_images": float(positive.size),
        "n_defective": float(n_pos),
    }


def _plain(key: Hashable) -> Hashable:
    """numpy scalars -> Python scalars, so summaries serialise to JSON/YAML unchanged."""
    return key.item() if isinstance(key, np.generic) else key


def _mean_std(
    metric_dicts: Sequence[Mapping[str, float]],
) -> tuple[dict[str, float], dict[str, float]]:
    table = pd.DataFrame(list(metric_dicts))
    mean = {k: float(v) for k, v in table.mean().items()}
    std = {k: float(v) for k, v in table.std(ddof=0).items()}
    return mean, std


def _frame_metrics(rows: pd.DataFrame, threshold: float) -> dict[str, float]:
    return classification_metrics(rows["label"].to_numpy(), rows["score"].to_numpy(), threshold)


def _per_fold(frame: pd.DataFrame, threshold: float) -> dict[Hashable, dict[str, float]]:
    per_fold = {}
    for fold, rows in frame.groupby("fold", sort=True):
        try:
            per_fold[_plain(fold)] = _frame_metrics(rows, threshold)
        except MetricsError as error:
            raise MetricsError(f"fold {_plain(fold)!r}: {error}") from error
    return per_fold


def summarize_folds(frame: pd.DataFrame, threshold: float = 0.5) -> dict:
    """Cross-validation summary of per-image predictions (columns fold, label, score[, seed]).

    Returns ``per_fold`` {fold: metrics}, ``mean`` and ``std`` (ddof=0) of each metric over
    folds (fold-mean AP is what the literature reports) and ``pooled`` (metrics over all rows).

    With a ``seed`` column each (seed, fold) is one evaluation, and every seed must cover the
    same folds. Then ``per_fold`` holds each fold's metrics averaged over seeds, ``mean``/``std``
    are taken over those, ``pooled`` is the mean over seeds of each seed's pooled metrics (rows
    of different seeds are the same images scored by different models, so pooling across seeds
    would count each image once per seed), ``per_seed`` is {seed: fold-mean metrics} and
    ``seed_std`` the std (ddof=0) of those over seeds.
    """
    missing = {"fold", "label", "score"} - set(frame.columns)
    if missing:
        raise MetricsError(f"prediction frame lacks column(s) {sorted(missing)}")
    if frame.empty:
        raise MetricsError("prediction frame has no rows")

    if "seed" not in frame.columns:
        per_fold = _per_fold(frame, threshold)
        mean, std = _mean_std(list(per_fold.values()))
        pooled = _frame_metrics(frame, threshold)
        return {"per_fold": per_fold, "mean": mean, "std": std, "pooled": pooled}

    per_seed_folds: dict[Hashable, dict[Hashable, dict[str, float]]] = {}
    pooled_by_seed = []
    for seed, rows in frame.groupby("seed", sort=True):
        try:
            per_seed_folds[_plain(seed)] = _per_fold(rows, threshold)
            pooled_by_seed.append(_frame_metrics(rows, threshold))
        except MetricsError as error:
            raise MetricsError(f"seed {_plain(seed)!r}: {error}") from error

    fold_sets = {seed: tuple(folds) for seed, folds in per_seed_folds.items()}
    if len(set(fold_sets.values())) > 1:
        raise MetricsError(f"seeds cover different folds: {fold_sets}")
    folds = next(iter(fold_sets.values()))

    per_fold = {
        fold: _mean_std([by_fold[fold] for by_fold in per_seed_folds.values()])[0]
        for fold in folds
    }
    mean, std = _mean_std(list(per_fold.values()))
    per_seed = {
        seed: _mean_std(list(by_fold.values()))[0] for seed, by_fold in per_seed_folds.items()
    }
    _, seed_std = _mean_std(list(per_seed.values()))
    return {
        "per_fold": per_fold,
        "mean": mean,
        "std": std,
        "pooled": _mean_std(pooled_by_seed)[0],
        "per_seed": per_seed,
        "seed_std": seed_std,
    }


def pr_curve(labels: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """Precision-recall curve (scikit-learn's points, recall decreasing) as a DVC plot table.

    scikit-learn gives one threshold fewer than points: the last point (precision 1, recall 0)
    is reached only above every score, so its threshold is padded with a value above all scores
    (1.0 for probabilities below 1). Needs at least one defective image.
    """
    positive, scores = _check_labels_scores(labels, scores, need_negatives=False)
    precision, recall, thresholds = precision_recall_curve(positive, scores)
    above_all = max(1.0, float(np.nextafter(thresholds[-1], np.inf)))
    return pd.DataFrame(
        {"precision": precision, "recall": recall, "threshold": np.append(thresholds, above_all)}
    )


def _check_map_and_mask(saliency: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    saliency = np.asarray(saliency, dtype=np.float64)
    mask = np.asarray(mask).astype(bool)
    if saliency.shape != mask.shape:
        raise MetricsError(f"saliency shape {saliency.shape} != mask shape {mask.shape}")
    if not np.isfinite(saliency).all():
        raise MetricsError("saliency map contains NaN or infinite values")
    return saliency, mask


def saliency_mass_inside(saliency: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's total mass inside ``mask``; 0.0 for a map with no mass.

    Negative values (e.g. overshoot of bicubic upsampling) carry no mass and are clipped to 0:
    the metric asks where the positive evidence lies.
    """
    saliency, mask = _check_map_and_mask(saliency, mask)
    saliency = np.clip(saliency, 0.0, None)
    total = saliency.sum()
    return float(saliency[mask].sum() / total) if total > 0 else 0.0


def pointing_game_hit(saliency: np.ndarray, mask: np.ndarray, tolerance: float = 0.0) -> bool:
    """Whether the map's maximum falls inside ``mask``, or within ``tolerance`` pixels of it.

    ``tolerance`` 0 is the strict game. Zhang et al. (2018) allow 15 pixels at 224 pixels,
    because a map's peak on a 1-pixel-wide scratch is a matter of interpolation as much as of
    knowledge. Distances are Euclidean, from the peak pixel to the nearest mask pixel.

    Ties: if several pixels share the maximum, a hit is any of them. A constant map (all zero
    included) points nowhere and is a miss, otherwise a blank map would hit every mask; so is
    any map against an empty mask.
    """
    saliency, mask = _check_map_and_mask(saliency, mask)
    if tolerance < 0 or not np.isfinite(tolerance):
        raise MetricsError(f"pointing-game tolerance must be a finite number >= 0, got {tolerance}")
    peak = saliency.max()
    if peak == saliency.min() or not mask.any():
        return False
    peaks = saliency == peak
    if tolerance == 0:
        return bool((peaks & mask).any())
    # Distance of every pixel to the nearest mask pixel (the zeros of the input).
    distance = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return bool((distance[peaks] <= tolerance).any())


def mask_iou(pred: np.ndarray, true: np.ndarray) -> float:
    """Intersection over union of two boolean masks; 1.0 when both are empty."""
    pred, true = np.asarray(pred).astype(bool), np.asarray(true).astype(bool)
    if pred.shape != true.shape:
        raise MetricsError(f"mask shapes differ: {pred.shape} vs {true.shape}")
    union = int((pred | true).sum())
    return float((pred & true).sum() / union) if union else 1.0


def localization_metrics(
    saliency_maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]
) -> dict[str, float]:
    """Mean ``mass_inside`` and ``pointing_game`` hit rate over images with a non-empty mask.

    Defect-free images (empty masks) are skipped, since there is nothing to point at; their
    shapes are still checked. ``n_images`` is the number of defective images scored.
    """
    if len(saliency_maps) != len(masks):
        raise MetricsError(f"{len(saliency_maps)} saliency maps but {len(masks)} masks")
    mass, hits = [], []
    for index, (saliency, mask) in enumerate(zip(saliency_maps, masks, strict=True)):
        try:
            saliency, mask = _check_map_and_mask(saliency, mask)
        except MetricsError as error:
            raise MetricsError(f"image index {index}: {error}") from error
        if mask.any():
            mass.append(saliency_mass_inside(saliency, mask))
            hits.append(pointing_game_hit(saliency, mask))
    if not mass:
        raise MetricsError(f"no defective image (non-empty mask) among {len(masks)}")
    return {
        "mass_inside": float(np.mean(mass)),
        "pointing_game": float(np.mean(hits)),
        "n_images": float(len(mass)),
    }


def mean_over_folds(per_fold: Mapping[str, Mapping[str, float]], keys: Sequence[str] | None = None) -> dict[str, float]:
    """Mean of each figure over the folds that have it (all figures, or only ``keys``)."""
    names = sorted({k for figures in per_fold.values() for k in figures}) if keys is None else keys
    return {k: float(np.mean([f[k] for f in per_fold.values() if k in f]))
            for k in names if any(k in f for f in per_fold.values())}


# --- operating points and gates ---------------------------------------------------------------

# The operating points a decision threshold can be chosen at, and what the value of each is
# (None: it takes none). ``release.operating_point`` is one of them (``pipeline.config``).
OPERATING_POINTS: dict[str, tuple[float, float] | None] = {
    "zero_misses": None,
    "max_false_alarm_rate": (0.0, 1.0),  # share of defect-free images flagged, at most
    "min_precision": (0.0, 1.0),  # share of flagged images that are defective, at least
}


@dataclass(frozen=True)
class OperatingPoint:
    """Where on the score axis to decide: ``kind`` (a key of ``OPERATING_POINTS``) and its value."""

    kind: str
    target: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in OPERATING_POINTS:
            raise MetricsError(f"unknown operating point {self.kind!r}; allowed: {', '.join(OPERATING_POINTS)}")
        bounds = OPERATING_POINTS[self.kind]
        if bounds is None and self.target is not None:
            raise MetricsError(f"operating point {self.kind} takes no value; write just {self.kind}")
        if bounds is not None and (self.target is None or not bounds[0] <= self.target <= bounds[1]):
            raise MetricsError(f"operating point {self.kind} needs a value in [{bounds[0]}, {bounds[1]}], "
                               f"got {self.target!r}")

    def __str__(self) -> str:
        return self.kind if self.target is None else f"{self.kind}={self.target:g}"


class UnreachableOperatingPoint(MetricsError):
    """No threshold on the given scores meets the operating point."""


def rates_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Misses and false alarms (counts and rates) and precision when ``score >= threshold`` flags."""
    positive, scores = _check_labels_scores(labels, scores)
    flagged = scores >= threshold
    misses, false_alarms = int((positive & ~flagged).sum()), int((~positive & flagged).sum())
    n_flagged = int(flagged.sum())
    return {"misses": float(misses), "miss_rate": misses / int(positive.sum()),
            "false_alarms": float(false_alarms), "false_alarm_rate": false_alarms / int((~positive).sum()),
            "precision": (n_flagged - false_alarms) / n_flagged if n_flagged else 0.0}


def operating_threshold(labels: np.ndarray, scores: np.ndarray, point: OperatingPoint) -> float:
    """The decision threshold (``score >= threshold`` is a defect) at ``point`` on these scores.

    Candidates are the defective images' scores, so the threshold flags at least one defect:
    ``zero_misses`` is the lowest of them (the highest threshold that misses no defect), the others
    the lowest candidate meeting their bound (the fewest misses that do). A defect-free image tied
    with the threshold is flagged, as everywhere in this module. Raises
    ``UnreachableOperatingPoint`` naming the closest figure a candidate reaches.
    """
    positive, scores = _check_labels_scores(labels, scores)
    candidates = np.unique(scores[positive])  # ascending
    if point.kind == "zero_misses":
        return float(candidates[0])
    negatives, defects = np.sort(scores[~positive]), np.sort(scores[positive])
    false_alarms = len(negatives) - np.searchsorted(negatives, candidates, side="left")
    hits = len(defects) - np.searchsorted(defects, candidates, side="left")
    if point.kind == "max_false_alarm_rate":
        figure, meets, best = false_alarms / len(negatives), np.less_equal, np.argmin
    else:
        figure, meets, best = hits / (hits + false_alarms), np.greater_equal, np.argmax
    reached = np.flatnonzero(meets(figure, point.target))
    if len(reached) == 0:
        closest = int(best(figure))
        raise UnreachableOperatingPoint(
            f"no threshold reaches {point} on these {len(scores)} scores: the closest is "
            f"{point.kind.split('_', 1)[1]} {figure[closest]:.4f} at threshold {candidates[closest]:.6g}; "
            "relax the value or choose another operating point")
    return float(candidates[reached[0]])


def operating_point_summary(frame: pd.DataFrame, point: OperatingPoint) -> dict:
    """The threshold at ``point`` on pooled out-of-fold scores (columns fold, label, score), the
    rates expected there, and their spread: each fold's rates at that same pooled threshold."""
    missing = {"fold", "label", "score"} - set(frame.columns)
    if missing:
        raise MetricsError(f"score table lacks column(s) {sorted(missing)}")
    threshold = operating_threshold(frame["label"].to_numpy(), frame["score"].to_numpy(), point)
    expected = rates_at(frame["label"].to_numpy(), frame["score"].to_numpy(), threshold)
    per_fold = {}
    for fold, rows in frame.groupby("fold", sort=True):
        try:
            per_fold[f"fold{_plain(fold)}"] = rates_at(rows["label"].to_numpy(), rows["score"].to_numpy(), threshold)
        except MetricsError as error:
            raise MetricsError(f"fold {_plain(fold)!r}: {error}") from error
    _, std = _mean_std(list(per_fold.values()))
    spread = {f"{name}_std": std[name] for name in ("miss_rate", "false_alarm_rate", "precision")}
    return {"operating_point": str(point), "threshold": threshold, **expected, **spread,
            "n_images": float(len(frame)), "per_fold": per_fold}


# What a gate's condition may compare with: ">= 0.9" passes a figure of at least 0.9.
GATE_COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_CONDITION = re.compile(r"\s*(>=|<=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*")


def parse_condition(condition: str) -> tuple[str, float]:
    """``">= 0.9"`` -> (">=", 0.9); anything else raises MetricsError saying the form."""
    match = _CONDITION.fullmatch(str(condition))
    if match is None:
        raise MetricsError(f"condition {condition!r} is not '<comparison> <number>' with a comparison of "
                           f"{', '.join(GATE_COMPARISONS)} (e.g. '>= 0.9')")
    return match.group(1), float(match.group(2))


def gate_failures(figures: Mapping[str, float], gate: Mapping[str, str], source: str) -> list[str]:
    """The gate's conditions that ``figures`` fail, each as a readable reason; [] when all pass.

    A gate key that ``figures`` lacks raises MetricsError naming the closest known keys: a
    misspelt metric must not pass a gate by being skipped.
    """
    unknown = [key for key in gate if key not in figures]
    if unknown:
        hints = {key: difflib.get_close_matches(key, list(figures), n=3, cutoff=0.5) for key in unknown}
        described = "; ".join(f"{key!r} (closest: {', '.join(near) or 'none'})" for key, near in hints.items())
        raise MetricsError(f"release.gate refers to metric(s) that {source} does not hold: {described}; "
                           "fix the key in params.yaml (keys are the dotted paths of those files)")
    failures = []
    for key, condition in gate.items():
        comparison, bound = parse_condition(condition)
        if not GATE_COMPARISONS[comparison](float(figures[key]), bound):
            failures.append(f"{key} = {float(figures[key]):.4g}, needs {comparison} {bound:g}")
    return failures
