"""Image-level detection metrics, cross-validation summaries and the means over folds of any figures.

Localization figures are in :mod:`pipeline.metrics.localization`, operating points and release gates
in :mod:`pipeline.metrics.operating_points`.

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

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

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
        raise MetricsError(f"labels and scores must be 1-D, got shapes {labels.shape} and {scores.shape}")
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
        raise MetricsError(f"no defective image among {labels.size}: AP, AUROC and recall are undefined")
    if need_negatives and positive.all():
        raise MetricsError(f"no defect-free image among {labels.size}: AUROC and false alarms are undefined")
    return positive, scores


def _best_f1(positive: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 over the thresholds of the PR curve, and the (lowest) threshold reaching it."""
    precision, recall, thresholds = precision_recall_curve(positive, scores)
    # The curve's last point (precision 1, recall 0) has no threshold and F1 0: drop it.
    precision, recall = precision[:-1], recall[:-1]
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def classification_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
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


def _mean_std(metric_dicts: Sequence[Mapping[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
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

    per_fold = {fold: _mean_std([by_fold[fold] for by_fold in per_seed_folds.values()])[0] for fold in folds}
    mean, std = _mean_std(list(per_fold.values()))
    per_seed = {seed: _mean_std(list(by_fold.values()))[0] for seed, by_fold in per_seed_folds.items()}
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
    return pd.DataFrame({"precision": precision, "recall": recall, "threshold": np.append(thresholds, above_all)})


def mean_over_folds(per_fold: Mapping[str, Mapping[str, float]], keys: Sequence[str] | None = None) -> dict[str, float]:
    """Mean of each figure over the folds that have it (all figures, or only ``keys``)."""
    names = sorted({k for figures in per_fold.values() for k in figures}) if keys is None else keys
    return {
        k: float(np.mean([f[k] for f in per_fold.values() if k in f]))
        for k in names
        if any(k in f for f in per_fold.values())
    }
