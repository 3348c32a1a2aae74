"""Operating points and release gates: where on the score axis to decide, and whether figures pass.

Thresholds follow the conventions of :mod:`pipeline.metrics.classification`: ``score >= threshold``
flags a defect, and ties count against the model.
"""

from __future__ import annotations

import difflib
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

# The label/score checks and fold summarising are the classification figures' own, shared so a
# gate and a metric reject the same input with the same message.
from pipeline.metrics.classification import MetricsError, _check_labels_scores, _mean_std, _plain

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
            raise MetricsError(
                f"operating point {self.kind} needs a value in [{bounds[0]}, {bounds[1]}], got {self.target!r}"
            )

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
    return {
        "misses": float(misses),
        "miss_rate": misses / int(positive.sum()),
        "false_alarms": float(false_alarms),
        "false_alarm_rate": false_alarms / int((~positive).sum()),
        "precision": (n_flagged - false_alarms) / n_flagged if n_flagged else 0.0,
    }


def operating_threshold(labels: np.ndarray, scores: np.ndarray, point: OperatingPoint) -> float:
    """The decision threshold (``score >= threshold`` is a defect) at ``point`` on these scores.

    Candidates are the defective images' scores, so the threshold flags at least one defect:
    ``zero_misses`` is the lowest of them (the highest threshold that misses no defect), the others
    the lowest candidate meeting their bound (the fewest misses that do). A defect-free image tied
    with the threshold is flagged, as everywhere in ``pipeline.metrics``. Raises
    ``UnreachableOperatingPoint`` naming the closest figure a candidate reaches.
    """
    positive, scores = _check_labels_scores(labels, scores)
    candidates = np.unique(scores[positive])  # ascending
    if point.kind == "zero_misses":
        return float(candidates[0])
    negatives, defects = np.sort(scores[~positive]), np.sort(scores[positive])
    false_alarms = len(negatives) - np.searchsorted(negatives, candidates, side="left")
    hits = len(defects) - np.searchsorted(defects, candidates, side="left")
    # Every kind but zero_misses has bounds, so OperatingPoint has checked that its target is set.
    assert point.target is not None
    meets: np.ufunc
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
            "relax the value or choose another operating point"
        )
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
    return {
        "operating_point": str(point),
        "threshold": threshold,
        **expected,
        **spread,
        "n_images": float(len(frame)),
        "per_fold": per_fold,
    }


# What a gate's condition may compare with: ">= 0.9" passes a figure of at least 0.9.
GATE_COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}
_CONDITION = re.compile(r"\s*(>=|<=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*")


def parse_condition(condition: str) -> tuple[str, float]:
    """``">= 0.9"`` -> (">=", 0.9); anything else raises MetricsError saying the form."""
    match = _CONDITION.fullmatch(str(condition))
    if match is None:
        raise MetricsError(
            f"condition {condition!r} is not '<comparison> <number>' with a comparison of "
            f"{', '.join(GATE_COMPARISONS)} (e.g. '>= 0.9')"
        )
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
        raise MetricsError(
            f"release.gate refers to metric(s) that {source} does not hold: {described}; "
            "fix the key in params.yaml (keys are the dotted paths of those files)"
        )
    failures = []
    for key, condition in gate.items():
        comparison, bound = parse_condition(condition)
        if not GATE_COMPARISONS[comparison](float(figures[key]), bound):
            failures.append(f"{key} = {float(figures[key]):.4g}, needs {comparison} {bound:g}")
    return failures
