"""Metrics against hand-computed cases; expected numbers are worked out in the comments."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipeline.metrics.classification import (
    CLASSIFICATION_METRICS,
    MetricsError,
    classification_metrics,
    pr_curve,
    summarize_folds,
)
from pipeline.metrics.localization import localization_metrics, mask_iou, pointing_game_hit, saliency_mass_inside

# Case A, ranked by score: 0.8 (defect), 0.4 (ok), 0.35 (defect), 0.1 (ok).
LABELS_A = np.array([0, 0, 1, 1])
SCORES_A = np.array([0.1, 0.4, 0.35, 0.8])

# Case B, one defect: 0.7 (ok), 0.6 (defect), 0.2 (ok), 0.1 (ok).
LABELS_B = np.array([0, 0, 0, 1])
SCORES_B = np.array([0.1, 0.7, 0.2, 0.6])


def test_hand_case():
    m = classification_metrics(LABELS_A, SCORES_A, threshold=0.5)
    assert list(m) == list(CLASSIFICATION_METRICS)
    # AP = sum over thresholds of (recall gain) * precision: 0.5 * 1 (at 0.8) + 0.5 * 2/3 (at 0.35).
    assert m["ap"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    # Of the 4 (defect, ok) pairs only (0.35, 0.4) is ranked wrong.
    assert m["auroc"] == pytest.approx(3 / 4)
    # At 0.5 only 0.8 is called defective: right on 0.8, 0.4, 0.1; the defect 0.35 is missed.
    assert m["accuracy"] == pytest.approx(3 / 4)
    assert m["precision"] == pytest.approx(1.0)
    assert m["recall"] == pytest.approx(1 / 2)
    # F1 per threshold: 0.8 -> 2/3, 0.4 -> 1/2, 0.35 -> 2*(2/3)/(5/3) = 0.8, 0.1 -> 2/3.
    assert m["f1_best"] == pytest.approx(0.8)
    assert m["threshold_best"] == pytest.approx(0.35)
    # Catching the defect at 0.35 also flags the ok image at 0.4; allowing no alarm above 0.4
    # misses the defect at 0.35.
    assert m["false_alarms_at_full_recall"] == 1
    assert m["false_alarm_rate_at_full_recall"] == pytest.approx(1 / 2)
    assert m["missed_at_zero_false_alarms"] == 1
    assert m["missed_rate_at_zero_false_alarms"] == pytest.approx(1 / 2)
    assert (m["n_images"], m["n_defective"]) == (4, 2)
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())


def test_ties_count_against_the_model():
    # A defect and an ok image both score 0.5.
    labels = np.array([0, 1, 0, 1, 0])
    scores = np.array([0.2, 0.5, 0.5, 0.9, 0.1])
    m = classification_metrics(labels, scores)
    assert m["false_alarms_at_full_recall"] == 1  # the tied ok image is flagged
    assert m["false_alarm_rate_at_full_recall"] == pytest.approx(1 / 3)
    assert m["missed_at_zero_false_alarms"] == 1  # the tied defect is missed
    assert m["missed_rate_at_zero_false_alarms"] == pytest.approx(1 / 2)
    # Tied scores are one threshold step: 0.5 * 1 (at 0.9) + 0.5 * 2/3 (at 0.5).
    assert m["ap"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    # Pairs: 0.9 beats all three ok images; 0.5 beats 0.2 and 0.1 and ties 0.5 (half).
    assert m["auroc"] == pytest.approx(5.5 / 6)
    # score >= threshold is defective, so both 0.5 images are flagged at 0.5.
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(1.0)


def test_perfect_separation():
    m = classification_metrics(np.array([0, 0, 1]), np.array([0.1, 0.2, 0.3]))
    assert m["ap"] == m["auroc"] == m["f1_best"] == 1.0
    assert m["threshold_best"] == pytest.approx(0.3)
    assert m["false_alarms_at_full_recall"] == m["missed_at_zero_false_alarms"] == 0


def test_precision_is_zero_when_nothing_is_flagged():
    m = classification_metrics(LABELS_A, SCORES_A, threshold=0.9)
    assert m["precision"] == 0.0 and m["recall"] == 0.0
    assert m["accuracy"] == pytest.approx(1 / 2)


def test_single_defect():
    m = classification_metrics(LABELS_B, SCORES_B)
    assert m["ap"] == pytest.approx(1 / 2)  # the defect is ranked second
    assert m["auroc"] == pytest.approx(2 / 3)
    assert m["false_alarms_at_full_recall"] == 1
    assert m["missed_at_zero_false_alarms"] == 1
    assert m["missed_rate_at_zero_false_alarms"] == 1.0


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([0, 0, 0], [0.1, 0.2, 0.3], "no defective image"),
        ([1, 1], [0.1, 0.2], "no defect-free image"),
        ([0, 1], [0.1, np.nan], "NaN"),
        ([0, 2], [0.1, 0.2], "0 or 1"),
        ([0, 1], [0.1], "labels but"),
        ([], [], "no images"),
    ],
)
def test_undefined_input_raises(labels, scores, message):
    with pytest.raises(MetricsError, match=message):
        classification_metrics(np.array(labels), np.array(scores, dtype=float))


def _two_folds() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "fold": [0] * 4 + [1] * 4,
            "label": np.concatenate([LABELS_A, LABELS_B]),
            "score": np.concatenate([SCORES_A, SCORES_B]),
        }
    )


def test_summarize_folds_with_a_one_defect_fold():
    summary = summarize_folds(_two_folds())
    assert set(summary) == {"per_fold", "mean", "std", "pooled"}
    assert list(summary["per_fold"]) == [0, 1]
    assert all(type(fold) is int for fold in summary["per_fold"])  # JSON-friendly keys
    ap_a, ap_b = 5 / 6, 1 / 2
    assert summary["per_fold"][1]["ap"] == pytest.approx(ap_b)
    assert summary["mean"]["ap"] == pytest.approx((ap_a + ap_b) / 2)
    assert summary["std"]["ap"] == pytest.approx(abs(ap_a - ap_b) / 2)  # ddof=0
    assert summary["mean"]["n_images"] == 4
    # Pooled ranking: .8 D, .7 ok, .6 D, .4 ok, .35 D, .2, .1, .1 ok -> recall thirds at
    # precisions 1, 2/3 and 3/5.
    assert summary["pooled"]["ap"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert summary["pooled"]["n_images"] == 8
    # Lowest defect 0.35 is beaten or tied by ok images 0.7 and 0.4.
    assert summary["pooled"]["false_alarms_at_full_recall"] == 2


def test_summarize_folds_with_seeds():
    first = _two_folds().assign(seed=0)
    # Seed 1 ranks fold 0 perfectly (AP 1) and fold 1 the same as seed 0 (AP 1/2).
    second = _two_folds().assign(seed=1)
    second.loc[second["fold"] == 0, "score"] = [0.1, 0.2, 0.7, 0.8]
    summary = summarize_folds(pd.concat([first, second], ignore_index=True))
    assert summary["per_seed"][0]["ap"] == pytest.approx((5 / 6 + 1 / 2) / 2)
    assert summary["per_seed"][1]["ap"] == pytest.approx((1 + 1 / 2) / 2)
    assert summary["seed_std"]["ap"] == pytest.approx((1 - 5 / 6) / 4)
    assert summary["per_fold"][0]["ap"] == pytest.approx((5 / 6 + 1) / 2)
    assert summary["mean"]["ap"] == pytest.approx(((5 / 6 + 1) / 2 + 1 / 2) / 2)
    # Pooled per seed, then averaged: still 8 images, not 16.
    assert summary["pooled"]["n_images"] == 8


def test_summarize_folds_names_the_bad_fold():
    frame = _two_folds()
    frame.loc[frame["fold"] == 1, "label"] = 0
    with pytest.raises(MetricsError, match="fold 1.*no defective image"):
        summarize_folds(frame)
    with pytest.raises(MetricsError, match="score"):
        summarize_folds(frame.drop(columns="score"))


def test_pr_curve_table():
    curve = pr_curve(LABELS_A, SCORES_A)
    assert list(curve.columns) == ["precision", "recall", "threshold"]
    # Thresholds ascending; the padded last point (precision 1, recall 0) sits above all scores.
    np.testing.assert_allclose(curve["threshold"], [0.1, 0.35, 0.4, 0.8, 1.0])
    np.testing.assert_allclose(curve["precision"], [1 / 2, 2 / 3, 1 / 2, 1, 1])
    np.testing.assert_allclose(curve["recall"], [1, 1, 1 / 2, 1 / 2, 0])
    assert curve.notna().all().all()


def _square_mask(size: int = 32) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[10:20, 10:20] = True
    return mask


def _gaussian(center: tuple[int, int], sigma: float = 1.5, size: int = 32) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return np.exp(-((yy - center[0]) ** 2 + (xx - center[1]) ** 2) / (2 * sigma**2))


def test_saliency_mass_and_pointing_game():
    mask = _square_mask()
    inside, outside = _gaussian((15, 15)), _gaussian((2, 2))
    assert saliency_mass_inside(inside, mask) > 0.99
    assert pointing_game_hit(inside, mask)
    assert saliency_mass_inside(outside, mask) == pytest.approx(0.0, abs=1e-6)
    assert not pointing_game_hit(outside, mask)
    # A uniform map spreads its mass by area: 100 of 1024 pixels.
    assert saliency_mass_inside(np.ones((32, 32)), mask) == pytest.approx(100 / 1024)
    assert saliency_mass_inside(np.zeros((32, 32)), mask) == 0.0


def test_pointing_game_ties_and_blank_maps():
    mask = _square_mask()
    tied = np.zeros((32, 32))
    tied[0, 0] = tied[15, 15] = 1.0  # two maxima, one inside
    assert pointing_game_hit(tied, mask)
    assert not pointing_game_hit(np.zeros((32, 32)), mask)
    assert not pointing_game_hit(np.full((32, 32), 0.3), mask)


def test_mask_iou():
    pred = np.zeros((4, 4), dtype=bool)
    true = np.zeros((4, 4), dtype=bool)
    assert mask_iou(pred, true) == 1.0
    true[0:2, 1:3] = True
    assert mask_iou(pred, true) == 0.0
    pred[0:2, 0:2] = True  # overlaps true in column 1: 2 pixels of a 6-pixel union
    assert mask_iou(pred, true) == pytest.approx(2 / 6)
    assert mask_iou(true, true) == 1.0
    with pytest.raises(MetricsError):
        mask_iou(pred, true[:3])


def test_localization_metrics_skip_defect_free_images():
    mask = _square_mask()
    empty = np.zeros_like(mask)
    result = localization_metrics([_gaussian((15, 15)), _gaussian((2, 2)), _gaussian((2, 2))], [mask, mask, empty])
    assert result["n_images"] == 2
    assert result["pointing_game"] == pytest.approx(1 / 2)
    assert result["mass_inside"] == pytest.approx(1 / 2, abs=0.01)


def test_localization_metrics_errors():
    mask = _square_mask()
    with pytest.raises(MetricsError, match="index 1"):
        localization_metrics([_gaussian((15, 15)), np.zeros((16, 16))], [mask, mask])
    with pytest.raises(MetricsError, match="no defective image"):
        localization_metrics([np.zeros((32, 32))], [np.zeros((32, 32), dtype=bool)])
    with pytest.raises(MetricsError, match="2 saliency maps but 1 masks"):
        localization_metrics([np.zeros((32, 32))] * 2, [mask])


def test_pointing_game_tolerance_in_pixels():
    mask = _square_mask()  # rows and columns 10-19
    saliency = np.zeros((32, 32))
    saliency[15, 22] = 1.0  # 3 pixels right of column 19
    assert not pointing_game_hit(saliency, mask)  # strict
    assert not pointing_game_hit(saliency, mask, tolerance=2.9)
    assert pointing_game_hit(saliency, mask, tolerance=3)
    diagonal = np.zeros((32, 32))
    diagonal[22, 22] = 1.0  # 3 right and 3 below the corner (19, 19): sqrt(18) = 4.24 pixels
    assert not pointing_game_hit(diagonal, mask, tolerance=4.2)
    assert pointing_game_hit(diagonal, mask, tolerance=4.25)
    # Tolerance never rescues a map that points nowhere, nor finds an empty mask.
    assert not pointing_game_hit(np.full((32, 32), 0.3), mask, tolerance=100)
    assert not pointing_game_hit(saliency, np.zeros_like(mask), tolerance=100)
    with pytest.raises(MetricsError, match="tolerance"):
        pointing_game_hit(saliency, mask, tolerance=-1)
