"""Pictures for reports: saliency overlays, panel grids, PR / training / data-efficiency plots.

Images are RGB uint8 in memory; the conversion to OpenCV's BGR happens only in ``save_png``.
Every file is written atomically (temporary file in the same folder, then ``os.replace``), so a
DVC stage killed mid-write never leaves a truncated PNG behind.

Plots use ``matplotlib.figure.Figure`` directly rather than pyplot: it renders with Agg, needs
no display, leaves the process-wide backend alone and keeps no global figure alive to leak.
"""

from __future__ import annotations

import io
import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from pipeline.core.artifacts import write_bytes

_DPI = 100
# Figure sizes in inches; at _DPI the PNG is 100 pixels per inch.
PR_FIGSIZE = (6.0, 5.0)
METRIC_VS_COUNT_FIGSIZE = (6.0, 4.5)
TRAINING_PANEL_SIZE = (4.0, 3.0)
TRAINING_MAX_COLUMNS = 3

_GRID_GAP = 4  # pixels between panels
_GRID_BACKGROUND = 255
_TEXT_COLOR = (0, 0, 0)
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Gray / RGB / HxWx1 panel -> RGB uint8. bool -> 0/255; floats are taken to be in [0, 1]."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"expected an HxW or HxWx3 image, got shape {image.shape}")
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    elif np.issubdtype(image.dtype, np.floating):
        image = (np.clip(np.nan_to_num(image), 0.0, 1.0) * 255).round().astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"integer images must be uint8, got {image.dtype}")
    return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image


def heatmap_overlay(image: np.ndarray, saliency: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a JET-coloured saliency map over an image; returns RGB uint8 of the image's size.

    ``saliency`` is clipped to [0, 1]; a map of another size (a coarse CAM) is resized
    bilinearly to the image first.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = _to_rgb_uint8(image)
    saliency = np.asarray(saliency, dtype=np.float32)
    if saliency.ndim != 2:
        raise ValueError(f"saliency must be HxW, got shape {saliency.shape}")
    height, width = rgb.shape[:2]
    if saliency.shape != (height, width):
        saliency = cv2.resize(saliency, (width, height), interpolation=cv2.INTER_LINEAR)
    levels = (np.clip(np.nan_to_num(saliency), 0.0, 1.0) * 255).round().astype(np.uint8)
    heat = cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(rgb, 1.0 - alpha, heat, alpha, 0.0)


def mask_outline(
    image_rgb: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (0, 255, 0), thickness: int | None = None
) -> np.ndarray:
    """Copy of the image (gray is promoted to RGB) with the mask's outer contours drawn on it.

    By default the line is about 1/200 of the image's longer side, so it is still visible
    after ``overlay_grid`` shrinks a 1250-pixel KolektorSDD image to a 256-pixel cell.
    """
    rgb = _to_rgb_uint8(image_rgb).copy()
    mask = np.asarray(mask)
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {rgb.shape[:2]}")
    if thickness is None:
        thickness = max(1, round(max(mask.shape) / 200))
    contours, _ = cv2.findContours(mask.astype(bool).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(rgb, contours, -1, tuple(int(c) for c in color), thickness)
    return rgb


def mark_mask(
    image_rgb: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (255, 255, 255), small: float = 0.1
) -> np.ndarray:
    """``mask_outline``, plus a ring around a mask whose extent is below ``small`` of the
    image's longer side: the outline of a 3-pixel pit is a dot that nobody finds at a glance.
    """
    rgb = mask_outline(image_rgb, mask, color)
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return rgb
    longer = max(mask.shape)
    extent = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
    if extent < small * longer:
        centre = (round((cols.min() + cols.max()) / 2), round((rows.min() + rows.max()) / 2))
        # Clear of the defect itself, so the ring never hides what it points at.
        radius = round(extent / 2 + max(3, longer / 25))
        cv2.circle(rgb, centre, radius, tuple(int(c) for c in color), max(1, round(longer / 200)), cv2.LINE_AA)
    return rgb


def _fitted_text_scale(text: str, max_width: int, scale: float) -> float:
    """Largest font scale <= ``scale`` at which ``text`` fits in ``max_width`` pixels."""
    width = cv2.getTextSize(text, _FONT, scale, 1)[0][0]
    return scale if width <= max_width or width == 0 else scale * max_width / width


def _put_text(canvas: np.ndarray, text: str, left: int, top: int, width: int, height: int, scale: float) -> None:
    """Draw ``text`` centred in the box (left, top, width, height), shrunk to fit its width."""
    scale = _fitted_text_scale(text, width - 2 * _GRID_GAP, scale)
    (text_w, text_h), _ = cv2.getTextSize(text, _FONT, scale, 1)
    origin = (left + (width - text_w) // 2, top + (height + text_h) // 2)
    cv2.putText(canvas, text, origin, _FONT, scale, _TEXT_COLOR, 1, cv2.LINE_AA)


def _put_lines(canvas: np.ndarray, text: str, left: int, top: int, width: int, height: int, scale: float) -> None:
    """Draw the lines of ``text`` ("\\n"-separated) as a block centred in the box."""
    lines = text.split("\n")
    line_height = height // len(lines) if len(lines) == 1 else _line_height(scale)
    block_top = top + (height - line_height * len(lines)) // 2
    for number, line in enumerate(lines):
        _put_text(canvas, line, left, block_top + number * line_height, width, line_height, scale)


def _line_height(scale: float) -> int:
    return cv2.getTextSize("Ag", _FONT, scale, 1)[0][1] * 2


def _text_width(text: str, scale: float) -> int:
    return max(cv2.getTextSize(line, _FONT, scale, 1)[0][0] for line in text.split("\n"))


def _scaled_width(panel: np.ndarray, cell_height: int) -> int:
    return max(1, round(panel.shape[1] * cell_height / panel.shape[0]))


def overlay_grid(
    rows: Sequence[Sequence[np.ndarray | None]],
    row_titles: Sequence[str],
    column_titles: Sequence[str],
    cell_height: int = 256,
) -> np.ndarray:
    """Grid of panels (gray or RGB, any size) with column titles on top and row titles left.

    Each panel is scaled to ``cell_height`` keeping its aspect ratio and centred in a cell as
    wide as the widest scaled panel; ``None`` leaves a cell blank. Row titles may hold several
    lines separated by "\\n". Returns RGB uint8.
    """
    if not rows or not column_titles:
        raise ValueError("overlay_grid needs at least one row and one column")
    if len(rows) != len(row_titles):
        raise ValueError(f"{len(rows)} rows but {len(row_titles)} row titles")
    for index, row in enumerate(rows):
        if len(row) != len(column_titles):
            raise ValueError(f"row {index} has {len(row)} panels but there are {len(column_titles)} columns")

    panels = [[None if p is None else _to_rgb_uint8(p) for p in row] for row in rows]
    cell_width = max(
        (_scaled_width(p, cell_height) for row in panels for p in row if p is not None), default=cell_height
    )
    font_scale = max(0.4, cell_height / 512)
    header = cv2.getTextSize("Ag", _FONT, font_scale, 1)[0][1] + 4 * _GRID_GAP
    left = max(_text_width(t, font_scale) for t in row_titles) + 4 * _GRID_GAP

    canvas = np.full(
        (header + len(rows) * (cell_height + _GRID_GAP), left + len(column_titles) * (cell_width + _GRID_GAP), 3),
        _GRID_BACKGROUND,
        dtype=np.uint8,
    )
    for col, title in enumerate(column_titles):
        _put_text(canvas, title, left + col * (cell_width + _GRID_GAP), 0, cell_width, header, font_scale)
    for r, (row, title) in enumerate(zip(panels, row_titles, strict=True)):
        top = header + r * (cell_height + _GRID_GAP)
        _put_lines(canvas, title, 0, top, left, cell_height, font_scale)
        for col, panel in enumerate(row):
            if panel is None:
                continue
            panel_w = _scaled_width(panel, cell_height)
            # INTER_AREA when shrinking, so thin defects are averaged in rather than skipped.
            interpolation = cv2.INTER_AREA if panel.shape[0] > cell_height else cv2.INTER_LINEAR
            x = left + col * (cell_width + _GRID_GAP) + (cell_width - panel_w) // 2
            canvas[top : top + cell_height, x : x + panel_w] = cv2.resize(
                panel, (panel_w, cell_height), interpolation=interpolation
            )
    return canvas


def png_bytes(image_rgb: np.ndarray) -> bytes:
    """An RGB (or gray) image encoded as a PNG file's bytes."""
    rgb = _to_rgb_uint8(image_rgb)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"OpenCV could not encode a PNG of an image of shape {rgb.shape}")
    return encoded.tobytes()


def save_png(path: str | Path, image_rgb: np.ndarray) -> None:
    """Save an RGB (or gray) image as PNG atomically, creating parent folders."""
    write_bytes(path, png_bytes(image_rgb))


def _save_figure(figure: Figure, path: str | Path) -> None:
    buffer = io.BytesIO()
    # No bbox_inches="tight": the PNG keeps the exact figure size, which tests and reports rely on.
    figure.savefig(buffer, format="png", dpi=_DPI)
    write_bytes(path, buffer.getvalue())


def _curve_ap(curve: pd.DataFrame) -> float:
    """AP of a curve from ``metrics.pr_curve``: scikit-learn's step sum -sum(dR * P)."""
    recall = curve["recall"].to_numpy()
    precision = curve["precision"].to_numpy()
    return float(-np.sum(np.diff(recall) * precision[:-1]))


def plot_pr_curves(curves: Mapping[str, pd.DataFrame], path: str | Path, title: str = "Precision-recall") -> None:
    """Plot PR curves (tables from ``metrics.pr_curve``) in one PNG, one line per name.

    The legend shows each curve's AP: ``curve.attrs["ap"]`` when set (e.g. the fold-mean AP,
    which differs from the AP of a pooled curve), otherwise the AP computed from the curve.
    """
    if not curves:
        raise ValueError("no curves to plot")
    figure = Figure(figsize=PR_FIGSIZE)
    axes = figure.add_subplot()
    for name, curve in curves.items():
        ap = float(curve.attrs.get("ap", _curve_ap(curve)))
        # Steps, not straight segments: precision between two thresholds does not interpolate.
        axes.plot(curve["recall"], curve["precision"], drawstyle="steps-post", label=f"{name} (AP {100 * ap:.2f}%)")
    axes.set(xlim=(0.0, 1.02), ylim=(0.0, 1.02), xlabel="Recall", ylabel="Precision", title=title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left")
    figure.tight_layout()
    _save_figure(figure, path)


def plot_training_curves(history: pd.DataFrame, path: str | Path, title: str) -> None:
    """One subplot per metric column, one line per fold (per seed and fold if ``seed`` exists).

    Every column other than epoch, fold and seed is a metric; missing values (a metric logged
    only on some epochs) are skipped rather than breaking the line.
    """
    missing = {"epoch", "fold"} - set(history.columns)
    if missing:
        raise ValueError(f"training history lacks column(s) {sorted(missing)}")
    keys = ["seed", "fold"] if "seed" in history.columns else ["fold"]
    metrics = [c for c in history.columns if c not in {"epoch", *keys}]
    if not metrics:
        raise ValueError("training history has no metric columns")

    n_cols = min(TRAINING_MAX_COLUMNS, len(metrics))
    n_rows = math.ceil(len(metrics) / n_cols)
    panel_w, panel_h = TRAINING_PANEL_SIZE
    figure = Figure(figsize=(panel_w * n_cols, panel_h * n_rows))
    axes_grid = figure.subplots(n_rows, n_cols, squeeze=False)
    groups = list(history.sort_values("epoch").groupby(keys, sort=True))
    for axes, metric in zip(axes_grid.flat, metrics):
        for key, rows in groups:
            key = key if isinstance(key, tuple) else (key,)
            label = " ".join(f"{name} {value}" for name, value in zip(keys, key))
            points = rows[["epoch", metric]].dropna()
            axes.plot(points["epoch"], points[metric], marker="." if len(points) < 30 else None, label=label)
        axes.set(title=metric, xlabel="epoch")
        axes.grid(alpha=0.3)
    for axes in list(axes_grid.flat)[len(metrics) :]:
        axes.set_visible(False)
    axes_grid.flat[0].legend(fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    _save_figure(figure, path)


def set_count_ticks(axes: Axes, ticks: Sequence[float]) -> None:
    """Ticks at the sweep's values (5, 10, 20, ...), the only meaningful x positions, on a log axis
    where they span more than a factor of 10 (5 to 262 defective images): the few-defect points
    stay apart."""
    if ticks[0] > 0 and ticks[-1] > 10 * ticks[0]:
        axes.set_xscale("log")
        axes.minorticks_off()
    axes.set_xticks(ticks, [f"{tick:.3g}" for tick in ticks])


def plot_metric_vs_count(frame: pd.DataFrame, x: str, path: str | Path, title: str) -> None:
    """AP (``ap_mean`` ± ``ap_std``) against ``x`` (e.g. number of training images), per model."""
    missing = {x, "model", "ap_mean", "ap_std"} - set(frame.columns)
    if missing:
        raise ValueError(f"frame lacks column(s) {sorted(missing)}")
    figure = Figure(figsize=METRIC_VS_COUNT_FIGSIZE)
    axes = figure.add_subplot()
    for model, rows in frame.sort_values(x).groupby("model", sort=True):
        axes.errorbar(rows[x], rows["ap_mean"], yerr=rows["ap_std"], marker="o", capsize=3, label=str(model))
    set_count_ticks(axes, sorted(frame[x].unique()))
    axes.set(xlabel=x.replace("_", " "), ylabel="AP")
    axes.set_title(title, fontsize="medium", wrap=True)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    _save_figure(figure, path)


def _format_cell(value: object, column: str) -> str:
    if value is None:
        return ""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        value = float(value)
        if math.isnan(value):
            return "n/a"
        if column.startswith("AP") or column.endswith("%"):
            return f"{100 * value:.2f}"
        return f"{value:.4g}"
    # Pipes would split the cell; newlines would end the row.
    return str(value).replace("|", "\\|").replace("\n", " ")


def results_table_markdown(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> str:
    """GitHub Markdown table of ``rows`` restricted to ``columns`` (missing values left blank).

    Float cells in a column whose name starts with "AP" or ends with "%" are fractions shown as
    percentages with 2 decimals and no % sign (0.9712 -> 97.12); other floats get 4 significant
    digits; integers and strings are printed as they are.
    """
    if not columns:
        raise ValueError("a table needs at least one column")

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    lines = [line([_format_cell(c, "") for c in columns]), line(["---"] * len(columns))]
    lines += [line([_format_cell(row.get(c), c) for c in columns]) for row in rows]
    return "\n".join(lines) + "\n"
