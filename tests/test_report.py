"""The evaluation report: built from hand-made evaluation outputs, rendered in headless chromium."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_evaluation import SCORES

from pipeline.data.prepared import count_table, group_table
from pipeline.evaluation.report import ReportInputs, report_html, write_report
from pipeline.evaluation.results import (
    classification_summary,
    decision_errors,
    error_pictures,
    hardest_images,
    overlay_picture,
    plot_training,
    summarize_localization,
)
from pipeline.metrics.classification import pr_curve
from pipeline.metrics.figures import plot_pr_curves, save_png
from support.browser import check_rendered, needs_chromium, tagged

# Two folds of four images (test_evaluation's); a group name and the title carry markup that must
# arrive as text.
GROUPS = ["<b>item</b> 1", "item 1", "item 2", "item 2", "item 3", "item 3", "item 4", "item 4"]
THRESHOLD = 0.5


def _panels() -> dict:
    rng = np.random.default_rng(0)
    panels = {}
    for image_id, label in zip(SCORES["id"], SCORES["label"]):
        mask = None
        if label:
            mask = np.zeros((32, 48), bool)
            mask[10:14, 20:26] = True
        panels[image_id] = {
            "image": rng.integers(0, 256, (32, 48), dtype=np.uint8),
            "true_mask": mask,
            "baseline_saliency": rng.random((32, 48)),
            "guided_saliency": rng.random((32, 48)),
        }
    return panels


def _localization() -> tuple[dict, pd.DataFrame]:
    table = pd.DataFrame(
        {
            "fold": [0, 0, 1],
            "id": ["c", "d", "h"],
            "mask_area_share": [0.02, 0.02, 0.02],
            "baseline_saliency.mass_inside": [0.1, 0.3, 0.2],
            "baseline_saliency.pointing_game": [1.0, 0.0, 1.0],
            "guided_saliency.mass_inside": [0.4, 0.5, 0.6],
            "guided_saliency.pointing_game": [1.0, 1.0, 0.0],
            "pseudo_mask.iou": [0.1, 0.2, 0.3],
        }
    )
    return summarize_localization(table)


@pytest.fixture()
def inputs(tmp_path) -> ReportInputs:
    """The evaluation's outputs for SCORES, pictures drawn by the evaluation's own functions."""
    metrics, _ = classification_summary(SCORES, THRESHOLD)
    metrics["data"] = {"folds": 2.0, "test_images": 8.0, "test_defective": 3.0}
    metrics["localization"], per_fold = _localization()
    curves = {model: pr_curve(SCORES["label"].to_numpy(), SCORES[model].to_numpy()) for model in ("baseline", "guided")}
    plot_pr_curves(curves, tmp_path / "pr_curves.png")
    panels = _panels()
    save_png(tmp_path / "overlays.png", overlay_picture(hardest_images(SCORES, 1), panels, "layercam"))
    for name, picture in error_pictures(decision_errors(SCORES, THRESHOLD), panels, "layercam").items():
        save_png(tmp_path / name, picture)
    history = pd.DataFrame(
        {"fold": [0, 0, 1, 1], "epoch": [1, 2, 1, 2], "loss": [0.9, 0.5, 0.8, 0.6], "test_ap": [0.5, 0.7, 0.4, 0.9]}
    )
    history.to_csv(tmp_path / "history.csv", index=False)
    for model in ("baseline", "guided"):
        plot_training(tmp_path / "history.csv", tmp_path / f"training_{model}.png", model)
    index = SCORES[["id", "label", "fold"]].assign(group=GROUPS)
    data_report = {
        "dataset": "synthetic",
        "split": "kfold",
        "counts": count_table(index),
        "groups": group_table(index),
        "defective_training_images": {"0": 1, "1": 2},
        "sizes": {"prepared_size": {"width": 48, "height": 32}},
    }
    return ReportInputs("synthetic <&> test", metrics, SCORES, per_fold, data_report, THRESHOLD, "layercam", tmp_path)


def test_report_is_one_file_of_escaped_text_and_embedded_pictures(inputs):
    text = report_html(inputs)
    assert text == report_html(inputs)  # identical inputs, identical file
    parsed = tagged(text)
    # PR curves, overlays, two training pictures, baseline's miss and false alarm, guided's false alarm.
    assert len(parsed.sources) == 7 and all(source.startswith("data:image/png;base64,") for source in parsed.sources)
    assert "<b>item</b>" not in text and "&lt;b&gt;item&lt;/b&gt; 1" in text
    assert "<title>synthetic &lt;&amp;&gt; test</title>" in text
    assert "<script" not in text and "http" not in text.replace('http-equiv="Content-Security-Policy"', "")
    assert parsed.values["data-count"] == {
        "baseline.misses": "1",
        "baseline.false_alarms": "1",
        "guided.misses": "0",
        "guided.false_alarms": "1",
    }
    assert parsed.values["data-metric"]["baseline.ap"] == "66.67"  # folds 5/6 and 1/2


def test_report_without_overlays_or_localization_says_so(inputs):
    (inputs.pictures / "overlays.png").unlink()
    metrics = {**inputs.metrics, "localization": {}}
    text = report_html(
        ReportInputs(
            inputs.title,
            metrics,
            inputs.scores,
            pd.DataFrame(),
            inputs.data_report,
            inputs.threshold,
            inputs.method,
            inputs.pictures,
        )
    )
    assert "overlays.png was not drawn for this run" in text
    assert "localization is not scored" in text


@needs_chromium
@pytest.mark.slow
def test_report_renders_in_chromium_with_every_picture_and_the_metrics_numbers(inputs, tmp_path):
    report = tmp_path / "report.html"
    write_report(report, inputs)
    shot = check_rendered(report, tmp_path / "browser", inputs.metrics, SCORES, THRESHOLD)
    assert shot.shape[1] == 1280
