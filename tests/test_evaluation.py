"""The evaluation's logic against hand-computed cases; masks and maps are built by the tests."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.evaluation.results import (
    check_test_folds,
    classification_summary,
    decision_errors,
    drawn_errors,
    hardest_images,
    localization_table,
    overlay_picture,
    plot_training,
    results_markdown,
    summarize_localization,
    timed_per_image,
)
from pipeline.evaluation.seeds import combine_runs, combined_markdown
from pipeline.evaluation.seeds import main as combine_main
from pipeline.metrics.classification import MetricsError

# Fold 0 (baseline): 0.8 D, 0.4 ok, 0.35 D, 0.1 ok -> AP 1/2 + 1/2 * 2/3 = 5/6, AUROC 3/4.
# Fold 1 (baseline), one defect: 0.7 ok, 0.6 D, 0.2 ok, 0.1 ok -> AP 1/2, AUROC 2/3.
# Fold 0 (guided), a tie: 0.9 D, 0.5 D, 0.5 ok, 0.1 ok -> AP 1/2 + 1/2 * 2/3 = 5/6, AUROC 3.5/4;
#   the tied ok image is a false alarm at 100% recall and the tied defect a miss at 0 alarms.
# Fold 1 (guided): the defect scores highest -> AP 1, no false alarm, no miss.
SCORES = pd.DataFrame(
    {
        "fold": [0, 0, 0, 0, 1, 1, 1, 1],
        "id": ["a", "b", "c", "d", "e", "f", "g", "h"],
        "label": [0, 0, 1, 1, 0, 0, 0, 1],
        "baseline": [0.1, 0.4, 0.35, 0.8, 0.1, 0.7, 0.2, 0.6],
        "guided": [0.1, 0.5, 0.5, 0.9, 0.1, 0.2, 0.3, 0.9],
    }
)


def _index(labels_by_fold: dict[int, list[int]]) -> pd.DataFrame:
    rows = [
        {"id": f"{fold}_{k}", "label": label, "fold": fold}
        for fold, labels in labels_by_fold.items()
        for k, label in enumerate(labels)
    ]
    return pd.DataFrame(rows)


def test_check_test_folds_names_the_fold_without_a_defect():
    check_test_folds(_index({-1: [0, 0], 0: [0, 1], 1: [1, 0, 0]}))  # training-only rows are ignored
    with pytest.raises(MetricsError, match=r"index.csv: fold 1 has 3 test images but no defective one"):
        check_test_folds(_index({0: [0, 1], 1: [0, 0, 0]}), "index.csv")
    with pytest.raises(MetricsError, match="fold 0 has 2 test images but no defect-free one"):
        check_test_folds(_index({0: [1, 1], 1: [0, 1]}))
    with pytest.raises(MetricsError, match="no test images"):
        check_test_folds(_index({-1: [0, 1]}))


def test_timed_per_image_warms_up_scores_every_image_once_and_keeps_the_fastest_pass():
    calls, durations = [], iter([0.0, 0.5, 0.02, 0.3])  # warm-up, the pass over all, two timed samples

    def infer(rows: slice) -> str:
        calls.append(rows)
        time.sleep(next(durations))
        return f"scores {len(calls)}"

    result, seconds = timed_per_image(infer, count=10, warmup=2, repeats=3, sample=4)
    # The warm-up is separate and not timed; one pass over every image, whose result is returned;
    # the other passes time a sample.
    assert calls == [slice(0, 2), slice(None), slice(0, 4), slice(0, 4)]
    assert result == "scores 2"
    assert 0.005 <= seconds < 0.02  # the 0.02 s pass over 4 images, not the 0.5 s one over 10
    calls.clear()
    durations = iter([0.0, 0.0, 0.0])
    timed_per_image(infer, count=3, warmup=2, repeats=2, sample=32)
    assert calls == [slice(0, 2), slice(None), slice(0, 3)]  # a sample never beyond the images
    with pytest.raises(ValueError):
        timed_per_image(infer, count=0)


def test_classification_summary_per_fold_spread_and_ties():
    metrics, per_fold = classification_summary(SCORES, threshold=0.5)
    baseline, guided = metrics["baseline"], metrics["guided"]
    assert baseline["fold0"]["ap"] == pytest.approx(5 / 6)
    assert baseline["fold1"]["ap"] == pytest.approx(1 / 2)  # the fold with one defect
    assert baseline["ap"] == pytest.approx((5 / 6 + 1 / 2) / 2)
    assert baseline["ap_std"] == pytest.approx((5 / 6 - 1 / 2) / 2)  # ddof=0 over folds
    assert baseline["auroc"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    # Pooled ranking: .8 D, .7, .6 D, .4, .35 D, .2, .1, .1 -> precisions 1, 2/3, 3/5 at each third.
    assert baseline["ap_pooled"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert baseline["false_alarms_at_full_recall"] == pytest.approx((1 + 1) / 2)
    assert guided["fold0"]["false_alarms_at_full_recall"] == 1  # tie counts against the model
    assert guided["fold0"]["missed_at_zero_false_alarms"] == 1
    assert guided["fold1"] == {
        "ap": 1.0,
        "auroc": 1.0,
        "false_alarms_at_full_recall": 0.0,
        "missed_at_zero_false_alarms": 0.0,
    }
    assert guided["ap"] == pytest.approx((5 / 6 + 1) / 2)
    assert guided["auroc"] == pytest.approx((3.5 / 4 + 1) / 2)
    assert guided["false_alarms_at_full_recall_std"] == pytest.approx(0.5)
    assert all(math.isfinite(v) for m in (baseline, guided) for v in m.values() if isinstance(v, float))
    assert list(per_fold[["model", "fold"]].itertuples(index=False, name=None)) == [
        ("baseline", 0),
        ("baseline", 1),
        ("guided", 0),
        ("guided", 1),
    ]
    assert per_fold["n_defective"].tolist() == [2, 1, 2, 1]


def test_classification_summary_refuses_a_fold_without_defects():
    scores = SCORES.assign(label=np.where(SCORES["fold"] == 1, 0, SCORES["label"]))
    with pytest.raises(MetricsError, match="fold 1.*no defective image"):
        classification_summary(scores, 0.5)


def _localization_case() -> tuple[pd.DataFrame, dict, list]:
    """Four 10 x 10 images: three defective with a 2 x 2 mask at rows/cols 4-5, one defect-free.

    a (fold 0): baseline map 1 on the mask and on 4 pixels far away -> mass 1/2, peak inside.
    b (fold 0): baseline peak at (4, 8), 3 pixels right of the mask; no other mass -> mass 0.
    c (fold 1): no true mask -> skipped.
    d (fold 1): defect-free -> skipped.
    """
    scores = pd.DataFrame(
        {"fold": [0, 0, 1, 1], "id": ["a", "b", "c", "d"], "label": [1, 1, 1, 0], "baseline": 0.5, "guided": 0.5}
    )
    mask = np.zeros((10, 10), bool)
    mask[4:6, 4:6] = True
    maps = {name: np.zeros((4, 10, 10)) for name in ("baseline_saliency", "guided_saliency", "guided_segmentation")}
    maps["baseline_saliency"][0][mask] = 1.0
    maps["baseline_saliency"][0][0, 0:4] = 1.0
    maps["baseline_saliency"][1][4, 8] = 1.0
    maps["guided_saliency"][:] = 0.5  # constant: no mass preference, points nowhere
    maps["guided_segmentation"][0][4:6, 4] = 0.9  # half of the mask at >= 0.5
    maps["guided_segmentation"][0][4:6, 5] = 0.4
    maps["guided_segmentation"][1][mask] = 0.5  # exactly at the threshold: whole mask
    maps["pseudo_mask"] = np.zeros((4, 10, 10), bool)
    maps["pseudo_mask"][0][4:6, 4:8] = True  # 4 of 8 pixels right
    return scores, maps, [mask, mask, None, mask]


def test_localization_table_per_image():
    scores, maps, masks = _localization_case()
    table = localization_table(scores, maps, masks)
    assert table["id"].tolist() == ["a", "b"]
    assert table["mask_area_share"].tolist() == [0.04, 0.04]
    assert table["baseline_saliency.mass_inside"].tolist() == pytest.approx([1 / 2, 0.0])
    assert table["baseline_saliency.pointing_game"].tolist() == [1.0, 0.0]
    assert table["guided_saliency.mass_inside"].tolist() == pytest.approx([0.04, 0.04])  # = chance
    assert table["guided_saliency.pointing_game"].tolist() == [0.0, 0.0]
    assert table["guided_segmentation.iou"].tolist() == pytest.approx([1 / 2, 1.0])
    assert table["pseudo_mask.iou"].tolist() == pytest.approx([1 / 2, 0.0])
    assert "baseline_saliency.pointing_game_tolerant" not in table  # strict only by default

    tolerant = localization_table(scores, maps, masks, tolerance=3)
    # b's peak is 3 pixels from the nearest mask pixel (4, 5): a hit at tolerance 3.
    assert tolerant["baseline_saliency.pointing_game_tolerant"].tolist() == [1.0, 1.0]
    assert localization_table(scores, maps, masks, 2.9)["baseline_saliency.pointing_game_tolerant"].tolist() == [
        1.0,
        0.0,
    ]
    with pytest.raises(MetricsError, match="4 scored images but 3 true masks"):
        localization_table(scores, maps, masks[:3])


def test_summarize_localization_per_fold_and_overall():
    scores, maps, masks = _localization_case()
    # A third scored image in fold 1: c gets a mask and a baseline map peaking inside it.
    masks[2] = masks[0]
    maps["baseline_saliency"][2][4, 4] = 1.0
    overall, per_fold = summarize_localization(localization_table(scores, maps, masks, tolerance=3))
    assert overall["n_images"] == 3
    # Each image counts once: (1 + 0 + 1) / 3, not the mean of fold means (1/2 + 1) / 2.
    assert overall["baseline_saliency"]["pointing_game"] == pytest.approx(2 / 3)
    assert overall["baseline_saliency"]["mass_inside"] == pytest.approx((1 / 2 + 0 + 1) / 3)
    assert overall["baseline_saliency"]["pointing_game_tolerant"] == 1.0
    assert overall["guided_segmentation"]["iou"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert overall["pseudo_mask_iou"] == pytest.approx((1 / 2 + 0 + 0) / 3)
    assert overall["mask_area_share"] == pytest.approx(0.04)
    assert per_fold["fold"].tolist() == [0, 1] and per_fold["n_images"].tolist() == [2, 1]
    assert per_fold["baseline_saliency.pointing_game"].tolist() == pytest.approx([1 / 2, 1.0])
    nothing, no_folds = summarize_localization(pd.DataFrame())
    assert nothing == {} and no_folds.empty


def test_hardest_images_by_both_models_ties_by_id():
    scores = pd.DataFrame(
        {
            "fold": 0,
            "id": ["d1", "d2", "d3", "n1", "n2", "n3"],
            "label": [1, 1, 1, 0, 0, 0],
            "baseline": [0.2, 0.1, 0.9, 0.8, 0.3, 0.1],
            "guided": [0.2, 0.3, 0.9, 0.6, 0.5, 0.1],
        }
    )
    hardest = hardest_images(scores, 2)
    # Means: d1 0.2, d2 0.2 (tie, by id), d3 0.9; n1 0.7, n2 0.4, n3 0.1.
    assert hardest["id"].tolist() == ["d1", "d2", "n1", "n2"]
    assert list(hardest.columns) == list(scores.columns)
    assert hardest_images(scores, 10)["id"].tolist() == ["d1", "d2", "d3", "n1", "n2", "n3"]
    # Picking per fold, then among the picks, equals picking at once.
    two_folds = scores.assign(fold=[0, 1, 0, 1, 0, 1])
    picks = pd.concat([hardest_images(rows, 2) for _, rows in two_folds.groupby("fold")])
    assert hardest_images(picks, 2)["id"].tolist() == hardest_images(two_folds, 2)["id"].tolist()


def _read_png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None
    return image


def test_decision_errors_at_the_threshold_most_confident_first_ties_count_as_defect():
    errors = decision_errors(SCORES, 0.5)
    found = list(zip(errors["model"], errors["kind"], errors["id"]))
    # Baseline: c (defect, 0.35) missed, f (ok, 0.7) flagged. Guided: c at exactly 0.5 is called a
    # defect, so no miss; b (ok, 0.5) at the threshold is a false alarm.
    assert found == [("baseline", "miss", "c"), ("baseline", "false alarm", "f"), ("guided", "false alarm", "b")]
    lower = decision_errors(SCORES, 0.15)  # every ok image above 0.15 is flagged, highest first
    assert lower[(lower["model"] == "baseline") & (lower["kind"] == "false alarm")]["id"].tolist() == ["f", "b", "g"]
    assert drawn_errors(lower, 2)["id"].tolist() == ["f", "b", "b", "g"]  # two per model and kind
    assert drawn_errors(lower.iloc[:0], 2).empty


def test_overlay_picture_shows_the_true_mask(tmp_path):
    from pipeline.metrics.figures import save_png

    mask = np.zeros((32, 32), bool)
    mask[10:12, 20:22] = True
    image = np.full((32, 32), 120, np.uint8)
    maps = {
        "baseline_saliency": np.random.default_rng(0).random((32, 32)),
        "guided_saliency": np.zeros((32, 32)),
        "guided_segmentation": np.ones((32, 32)),
    }
    panels = {"d": {"image": image, "true_mask": mask, **maps}, "n": {"image": image, "true_mask": None, **maps}}
    hardest = pd.DataFrame(
        {"fold": [0, 1], "id": ["d", "n"], "label": [1, 0], "baseline": [0.1, 0.9], "guided": [0.2, 0.8]}
    )
    grid = overlay_picture(hardest, panels, "layercam")
    path = tmp_path / "overlays.png"
    save_png(path, grid)
    picture = _read_png(path)
    # Two rows of 256-pixel cells under a header; five columns beside the row titles.
    assert 2 * 256 < picture.shape[0] < 2 * 256 + 60
    assert 5 * 256 < picture.shape[1] < 5 * 256 + 400
    green = (picture == (0, 255, 0)).all(axis=-1)  # BGR and RGB agree on pure green
    assert green.any()  # the true mask, painted and ringed


def test_plot_training_leaves_out_zero_and_repeated_columns(tmp_path):
    csv = tmp_path / "train_baseline.csv"
    pd.DataFrame(
        {
            "fold": [0, 0, 0],
            "epoch": [1, 2, 3],
            "seg_weight": 0.0,
            "loss": [0.9, 0.5, 0.4],
            "cls_loss": [0.9, 0.5, 0.4],
            "seg_loss": 0.0,
            "test_ap": [0.3, 0.6, 0.8],
            "seconds": [1.0, 1.1, 0.9],
        }
    ).to_csv(csv, index=False)
    plot_training(csv, tmp_path / "training.png", "baseline")
    # loss and test_ap remain: one row of two 4 x 3 inch panels at 100 dpi.
    assert _read_png(tmp_path / "training.png").shape == (300, 800, 3)
    pd.read_csv(csv).head(1).to_csv(csv, index=False)  # a one-epoch run still has its curves
    plot_training(csv, tmp_path / "one_epoch.png", "baseline")
    assert _read_png(tmp_path / "one_epoch.png").shape == (300, 800, 3)


def _headline() -> dict:
    metrics, _ = classification_summary(SCORES, 0.5)
    metrics["data"] = {"folds": 2.0, "test_images": 8.0, "test_defective": 3.0}
    return metrics


def test_results_markdown_lists_both_models_in_the_papers_format():
    text = results_markdown("synthetic", _headline(), "layercam")
    lines = text.splitlines()
    assert lines[2].startswith("| Method | Label type | Pixel masks | AP |")
    assert lines[4].startswith("| baseline | image-level | 0 | 66.67 |")  # (5/6 + 1/2) / 2
    assert lines[5].startswith("| guided (layercam prior) | image-level | 0 | 91.67 |")
    assert "Localization" not in text  # no true masks, no section
    scores, maps, masks = _localization_case()
    metrics = {**_headline(), "localization": summarize_localization(localization_table(scores, maps, masks))[0]}
    text = results_markdown("synthetic", metrics, "layercam")
    assert "| baseline layercam | 25.00 | 50.00 |  |" in text
    assert "| uniform map (chance) | 4.00 |" in text
    assert "tolerant" not in text


def test_results_markdown_of_a_variant_without_prior_or_segmentation_head():
    metrics = _headline()
    scores, maps, masks = _localization_case()
    maps.pop("guided_segmentation", None)
    metrics["localization"] = summarize_localization(localization_table(scores, maps, masks))[0]
    text = results_markdown("synthetic", metrics, "layercam")
    assert "teacher" not in text and "guided segmentation" not in text
    assert "| guided layercam |" in text


def test_combine_runs_mean_and_spread_over_seeds(tmp_path):
    first, second = tmp_path / "seed0.csv", tmp_path / "seed1.csv"
    SCORES.to_csv(first, index=False)
    # Seed 1: the baseline ranks fold 0 perfectly (AP 1) and fold 1 as before (AP 1/2).
    SCORES.assign(baseline=[0.1, 0.2, 0.7, 0.8, 0.1, 0.7, 0.2, 0.6]).to_csv(second, index=False)
    table = combine_runs([first, second])
    baseline = table.set_index("model").loc["baseline"]
    assert baseline["runs"] == 2
    assert baseline["ap"] == pytest.approx(((5 / 6 + 1 / 2) / 2 + (1 + 1 / 2) / 2) / 2)
    assert baseline["ap_seed_std"] == pytest.approx((1 - 5 / 6) / 4)
    # Over folds, of the fold APs averaged over seeds: fold 0 (5/6 + 1) / 2, fold 1 1/2.
    assert baseline["ap_fold_std"] == pytest.approx(((5 / 6 + 1) / 2 - 1 / 2) / 2)
    assert table.set_index("model").loc["guided", "ap_seed_std"] == 0.0
    text = combined_markdown(table)
    assert "| baseline | 2 | 70.83 ± 4.17 |" in text and "| guided | 2 |" in text

    combine_main([str(first), str(second), "--out", str(tmp_path / "seeds.md")])
    assert (tmp_path / "seeds.md").read_text() == text
    assert pd.read_csv(tmp_path / "seeds.csv")["model"].tolist() == ["baseline", "guided"]


def test_combine_runs_of_the_images_whose_id_matches(tmp_path):
    first, second = tmp_path / "seed0.csv", tmp_path / "seed1.csv"
    SCORES.to_csv(first, index=False)
    SCORES.to_csv(second, index=False)
    # Fold 1 keeps e (0.1, defect-free) and h (0.6, defective): AP 1; fold 0 as a whole, 5/6.
    table = combine_runs([first, second], ids="^[a-eh]$").set_index("model")
    assert table.loc["baseline", "ap"] == pytest.approx((5 / 6 + 1) / 2)
    combine_main([str(first), str(second), "--ids", "^[a-eh]$", "--out", str(tmp_path / "subset.md")])
    assert "| baseline | 2 | 91.67 ± 0.00 |" in (tmp_path / "subset.md").read_text()
    with pytest.raises(MetricsError, match=r"matches '\^\[ab\]' are not of both classes"):
        combine_runs([first, second], ids="^[ab]")


def test_combine_runs_rejects_mismatched_runs(tmp_path):
    first, other, bad = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    SCORES.to_csv(first, index=False)
    SCORES.assign(id=list("abcdefgz")).to_csv(other, index=False)
    SCORES.drop(columns="guided").to_csv(bad, index=False)
    with pytest.raises(MetricsError, match="b.csv scores other test images"):
        combine_runs([first, other])
    with pytest.raises(MetricsError, match=r"c.csv lacks column\(s\) \['guided'\]"):
        combine_runs([first, bad])
    with pytest.raises(MetricsError, match="at least two runs"):
        combine_runs([first])


def test_stage_stops_with_one_line_naming_the_fold_without_defects(tmp_path, monkeypatch, capsys):
    from pipeline.core.runner import run_stage
    from stages import evaluate

    prepared = tmp_path / "data/prepared"
    (prepared / "images").mkdir(parents=True)
    index = _index({0: [0, 0, 0], -1: [1, 0]}).assign(group=lambda f: f["id"], has_mask=False)
    index.to_csv(prepared / "index.csv", index=False)
    for image_id in index["id"]:
        cv2.imwrite(str(prepared / "images" / f"{image_id}.png"), np.zeros((8, 8), np.uint8))
    (prepared / "report.json").write_text(json.dumps({"dataset": "synthetic"}))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"evaluate": {}, "saliency": {}, "model": {}}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_stage("evaluate", evaluate.main)
    assert exit_info.value.code == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "fold 0 has 3 test images but no defective one" in error and "data/prepared/index.csv" in error
    assert not (tmp_path / "data/metrics").exists() and not (tmp_path / "mlflow.db").exists()
