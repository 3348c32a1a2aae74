"""Pictures are valid PNGs of the expected size; tables list header and rows."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from pipeline.metrics.classification import pr_curve
from pipeline.metrics.figures import (
    METRIC_VS_COUNT_FIGSIZE,
    PR_FIGSIZE,
    TRAINING_PANEL_SIZE,
    heatmap_overlay,
    mark_mask,
    mask_outline,
    overlay_grid,
    plot_metric_vs_count,
    plot_pr_curves,
    plot_training_curves,
    results_table_markdown,
    save_png,
    set_count_ticks,
)

DPI = 100


def _read_png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f"{path} is not a readable image"
    return image


def _pixels(figsize: tuple[float, float]) -> tuple[int, int]:
    return round(figsize[1] * DPI), round(figsize[0] * DPI)


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_heatmap_overlay_gray_and_rgb():
    gray = np.full((20, 30), 100, dtype=np.uint8)
    saliency = np.zeros((20, 30))
    saliency[5, 5] = 1.0
    out = heatmap_overlay(gray, saliency, alpha=1.0)
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    # JET: hot is red, cold is blue, and the result is RGB (not OpenCV's BGR).
    assert out[5, 5, 0] > out[5, 5, 2] and out[0, 0, 2] > out[0, 0, 0]
    # alpha 0 leaves the image untouched.
    np.testing.assert_array_equal(heatmap_overlay(gray, saliency, alpha=0.0)[..., 1], gray)
    # A coarse map is resized to the image.
    rgb = np.zeros((20, 30, 3), dtype=np.uint8)
    assert heatmap_overlay(rgb, np.ones((5, 5))).shape == (20, 30, 3)
    with pytest.raises(ValueError):
        heatmap_overlay(gray, saliency, alpha=1.5)


def test_mask_outline_draws_the_contour_only():
    image = np.zeros((20, 20), dtype=np.uint8)
    mask = np.zeros((20, 20), dtype=bool)
    mask[5:15, 5:15] = True
    out = mask_outline(image, mask, color=(0, 255, 0))
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    assert tuple(out[5, 10]) == (0, 255, 0)
    assert tuple(out[10, 10]) == (0, 0, 0) and tuple(out[0, 0]) == (0, 0, 0)
    assert image.max() == 0  # input left alone


def test_mark_mask_rings_only_small_masks():
    image = np.zeros((100, 100), dtype=np.uint8)
    pit = np.zeros((100, 100), dtype=bool)
    pit[50:52, 50:52] = True
    ringed = mark_mask(image, pit, color=(0, 255, 0))
    # The ring passes clear of the pit: beside it on the row, nothing between.
    row = ringed[51, 52:70, 1]
    assert row.max() > 100 and row[:2].max() == 0  # anti-aliased ring
    scratch = np.zeros((100, 100), dtype=bool)
    scratch[50, 10:90] = True
    np.testing.assert_array_equal(mark_mask(image, scratch), mask_outline(image, scratch, (255, 255, 255)))
    assert mark_mask(image, np.zeros_like(pit)).max() == 0


def test_overlay_grid_row_titles_with_several_lines():
    panel = np.zeros((64, 64), dtype=np.uint8)
    one = overlay_grid([[panel]], ["item007_part3"], ["image"], cell_height=64)
    three = overlay_grid([[panel]], ["item007_part3\nDEFECT\nguided 0.12"], ["image"], cell_height=64)
    # The title column is as wide as the longest line, not as the whole text.
    assert one.shape == three.shape
    assert (three[:, :20] < 128).sum() > (one[:, :20] < 128).sum()  # more ink: the extra lines


def test_overlay_grid_size_and_aspect(tmp_path):
    tall_gray = np.full((100, 40), 200, dtype=np.uint8)
    square_rgb = np.zeros((50, 50, 3), dtype=np.uint8)
    grid = overlay_grid(
        [[tall_gray, square_rgb], [square_rgb, None]],
        row_titles=["baseline", "guided"],
        column_titles=["image", "Grad-CAM"],
        cell_height=64,
    )
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
    # Two rows of 64-pixel cells plus a header; cells as wide as the widest panel (square: 64).
    assert 2 * 64 < grid.shape[0] < 2 * 64 + 60
    assert 2 * 64 < grid.shape[1] < 2 * 64 + 200
    path = tmp_path / "grid.png"
    save_png(path, grid)
    assert _read_png(path).shape == grid.shape
    with pytest.raises(ValueError, match="row 1"):
        overlay_grid([[tall_gray, tall_gray], [tall_gray]], ["a", "b"], ["x", "y"])


def test_save_png_is_atomic_rgb_and_creates_folders(tmp_path):
    image = np.zeros((7, 9, 3), dtype=np.uint8)
    image[..., 0] = 255  # red in RGB
    path = tmp_path / "nested" / "folder" / "red.png"
    save_png(path, image)
    read = _read_png(path)
    assert read.shape == (7, 9, 3)
    assert tuple(read[0, 0]) == (0, 0, 255)  # OpenCV reads BGR: red stays red
    save_png(path, np.zeros((3, 4), dtype=np.uint8))  # overwrite, gray
    assert _read_png(path).shape == (3, 4, 3)
    assert _no_temp_files(path.parent)


def test_plot_pr_curves(tmp_path):
    curve = pr_curve(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    fold_mean = curve.copy()
    fold_mean.attrs["ap"] = 0.9
    path = tmp_path / "plots" / "pr.png"
    plot_pr_curves({"baseline": curve, "guided": fold_mean}, path)
    assert _read_png(path).shape == (*_pixels(PR_FIGSIZE), 3)
    assert _no_temp_files(path.parent)


def test_plot_training_curves(tmp_path):
    history = pd.DataFrame(
        {
            "epoch": [0, 1, 2] * 2,
            "fold": [0] * 3 + [1] * 3,
            "loss": [1.0, 0.6, 0.4, 1.1, 0.7, 0.5],
            "seg_loss": [0.9, 0.5, 0.3, 0.8, 0.6, 0.2],
            "val_ap": [np.nan, 0.7, 0.8, np.nan, 0.6, 0.9],  # logged on some epochs only
            "lr": [1e-3] * 6,
        }
    )
    path = tmp_path / "training.png"
    plot_training_curves(history, path, "guided, resnet18")
    width, height = TRAINING_PANEL_SIZE
    # Four metrics: three columns, two rows.
    assert _read_png(path).shape == (round(2 * height * DPI), round(3 * width * DPI), 3)


def test_plot_metric_vs_count(tmp_path):
    frame = pd.DataFrame(
        {
            "n_defective": [5, 10, 20] * 2,
            "model": ["baseline"] * 3 + ["guided"] * 3,
            "ap_mean": [0.5, 0.7, 0.8, 0.8, 0.9, 0.95],
            "ap_std": [0.1, 0.05, 0.03, 0.05, 0.03, 0.02],
        }
    )
    path = tmp_path / "efficiency.png"
    plot_metric_vs_count(frame, "n_defective", path, "AP against defective training images")
    assert _read_png(path).shape == (*_pixels(METRIC_VS_COUNT_FIGSIZE), 3)
    with pytest.raises(ValueError, match="ap_std"):
        plot_metric_vs_count(frame.drop(columns="ap_std"), "n_defective", path, "t")


@pytest.mark.parametrize(("ticks", "scale"), [([5, 10, 20], "linear"), ([10, 20, 262], "log")])
def test_count_axis_turns_logarithmic_only_past_a_factor_of_ten(ticks, scale):
    axes = Figure().add_subplot()
    set_count_ticks(axes, ticks)
    assert axes.get_xscale() == scale
    assert list(axes.get_xticks()) == ticks
    assert [label.get_text() for label in axes.get_xticklabels()] == [str(tick) for tick in ticks]


def test_results_table_markdown():
    rows = [
        {"Model": "baseline", "AP": 0.971234, "FA@100% recall %": 0.05, "loss": 0.123456, "n": 3},
        {"Model": "guided | ours", "AP": np.float32(0.99), "loss": float("nan"), "n": 3},
    ]
    columns = ["Model", "AP", "FA@100% recall %", "loss", "n"]
    table = results_table_markdown(rows, columns)
    lines = table.strip().split("\n")
    assert lines[0] == "| Model | AP | FA@100% recall % | loss | n |"
    assert lines[1] == "| --- | --- | --- | --- | --- |"
    assert lines[2] == "| baseline | 97.12 | 5.00 | 0.1235 | 3 |"
    assert lines[3] == "| guided \\| ours | 99.00 |  | n/a | 3 |"
    assert len(lines) == 4
