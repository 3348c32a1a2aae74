"""The evaluation's report for a person: one self-contained HTML file, ``data/evaluation/report.html``.

Everything it shows is embedded: pictures as ``data:`` URIs, the style inline, no script, and a
Content-Security-Policy that lets the page load nothing but its own ``data:`` images, so it opens
the same from a mail attachment, an MLflow artifact view or a machine without network. Identical
runs write identical reports: no timestamps, no timings (those stay in ``timing.json``), and the
pictures are the evaluation's own PNG files, themselves identical for identical runs.

Every headline number sits in an element with ``data-metric="<model>.<key>"`` (or
``data-count``), the key it shows from the metrics file, so that a reader's tools (and the tests)
can check it against ``data/metrics/evaluate.json``.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.evaluation.results import ERROR_KINDS, ERRORS_DRAWN, MODELS, decision_errors

# (metrics key, row label, shown as a percentage): the headline table, one column per model.
HEADLINE_ROWS = (
    ("ap", "AP %, mean over folds (± std over folds)", True),
    ("ap_pooled", "AP %, all folds' test images pooled", True),
    ("auroc", "AUROC %", True),
    ("f1_best", "F1 % at the best threshold", True),
    ("precision", "precision % at the decision threshold", True),
    ("recall", "recall % at the decision threshold", True),
    ("false_alarms_at_full_recall", "false alarms at 100% recall (images per fold)", False),
    ("missed_at_zero_false_alarms", "misses at 0 false alarms (images per fold)", False),
)
# The pictures of the evaluation folder that the report shows, with their captions.
PR_CURVES = ("pr_curves.png", "Precision-recall of both models over every test image.")
OVERLAYS = (
    "overlays.png",
    "The hardest defective and defect-free images for both models: image, true mask "
    "(green), both models' saliency and the guided segmentation, the true mask outlined on each heatmap.",
)
TRAINING = tuple((f"training_{model}.png", f"{model} training, per epoch and fold.") for model in MODELS)
LOCALIZATION_MAPS = ("baseline_saliency", "guided_saliency", "guided_segmentation")
LOCALIZATION_KEYS = {
    "mass_inside": "mass inside mask %",
    "pointing_game": "pointing game %",
    "pointing_game_tolerant": "pointing game, tolerant %",
    "iou": "IoU %",
}
STYLE = """
body { font-family: sans-serif; margin: 2em auto; padding: 0 1.5em; max-width: 80em; color: #222; line-height: 1.4; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #eee; }
img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figure { margin: 0.5em 0 1.5em; }
figcaption, .note { color: #555; font-size: 0.9em; }
"""
# The page may load its own data: images and inline style, nothing else (no network, no script).
POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


@dataclass(frozen=True)
class ReportInputs:
    """What the report shows: the evaluation's outputs and the prepared data's report."""

    title: str
    metrics: Mapping  # data/metrics/evaluate.json
    scores: pd.DataFrame  # data/evaluation/scores.csv
    localization_per_fold: pd.DataFrame  # data/evaluation/localization_per_fold.csv
    data_report: Mapping  # data/prepared/report.json
    threshold: float  # the decision threshold (evaluate.threshold)
    method: str  # saliency.method
    pictures: Path  # the folder holding the evaluation's PNG files


def report_html(inputs: ReportInputs) -> str:
    """The whole report as one HTML document."""
    sections = [
        _headline(inputs),
        _data_summary(inputs.data_report),
        _decisions(inputs),
        _section("Precision-recall", _figure(inputs.pictures, *PR_CURVES)),
        _localization(inputs),
        _section("Training", *(_figure(inputs.pictures, *picture) for picture in TRAINING)),
    ]
    title = _text(inputs.title)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">\n'
        f"<title>{title}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{title}</h1>\n"
        + "\n".join(sections)
        + "\n</body>\n</html>\n"
    )


def write_report(path: str | Path, inputs: ReportInputs) -> None:
    Path(path).write_text(report_html(inputs), encoding="utf-8")


def _text(value: object) -> str:
    return html.escape(str(value), quote=True)


def _percent(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _number(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}"


def _metric(key: str, value: float, percent: bool) -> str:
    """A number tagged with the metrics-file key it shows."""
    shown = _percent(value) if percent else _number(value)
    return f'<span data-metric="{_text(key)}">{shown}</span>'


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A table of cells already escaped (or built of escaped parts)."""
    head = "".join(f"<th>{cell}</th>" for cell in header)
    body = "\n".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _section(title: str, *parts: str) -> str:
    return f"<section>\n<h2>{_text(title)}</h2>\n" + "\n".join(parts) + "\n</section>"


def _figure(folder: Path, name: str, caption: str) -> str:
    """The PNG ``folder/name`` embedded as a data: URI, or a note where it was not drawn."""
    path = folder / name
    if not path.is_file():
        return f'<p class="note">{_text(name)} was not drawn for this run.</p>'
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{encoded}" alt="{_text(name)}">'
        f"<figcaption>{_text(caption)}</figcaption></figure>"
    )


def _headline(inputs: ReportInputs) -> str:
    metrics, rows = inputs.metrics, []
    for key, label, percent in HEADLINE_ROWS:
        cells = [_text(label)]
        for model in MODELS:
            cell = _metric(f"{model}.{key}", metrics[model][key], percent)
            if f"{key}_std" in metrics[model]:
                cell += " ± " + _metric(f"{model}.{key}_std", metrics[model][f"{key}_std"], percent)
            cells.append(cell)
        rows.append(cells)
    data = metrics["data"]
    note = (
        f"{data['test_images']:.0f} test images ({data['test_defective']:.0f} defective) in "
        f"{data['folds']:.0f} fold(s), each image scored by the model of the fold that never trained on it; "
        f"decision threshold {inputs.threshold:g} (defect when the score is at least that), "
        f"saliency method {inputs.method}."
    )
    return _section("Baseline against guided", _table(["", *MODELS], rows), f'<p class="note">{_text(note)}</p>')


def _data_summary(report: Mapping) -> str:
    """Counts per fold and per group of the prepared data set (data/prepared/report.json)."""
    counts = report["counts"]
    trained = report.get("defective_training_images", {})
    folds = [
        [
            _text("training only" if fold == "-1" else fold),
            str(row["images"]),
            str(row["defective"]),
            str(row["images"] - row["defective"]),
            _text(trained.get(fold, "")),
        ]
        for fold, row in sorted(counts["per_fold"].items(), key=lambda item: int(item[0]))
    ]
    groups = [
        [_text(group), str(row["images"]), str(row["defective"]), _text(row["fold"])]
        for group, row in sorted(report.get("groups", {}).items())
    ]
    size = report.get("sizes", {}).get("prepared_size", {})
    note = (
        f"Data set {report['dataset']} ({report.get('split', '')} split): {counts['images']} images, "
        f"{counts['defective']} defective, {counts['defect_free']} defect-free, {counts['groups']} groups "
        "(an item's images stay in one fold)"
        + (f", prepared at {size['width']}×{size['height']}" if size else "")
        + "."
    )
    fold_table = _table(["fold", "images", "defective", "defect-free", "defective images trained on"], folds)
    group_table = _table(["group", "images", "defective", "fold"], groups)
    return _section(
        "Data set",
        f"<p>{_text(note)}</p>",
        fold_table,
        f"<details><summary>{len(groups)} groups</summary>\n{group_table}\n</details>",
    )


def _decisions(inputs: ReportInputs) -> str:
    """Misses and false alarms of each model at the decision threshold, listed and drawn."""
    errors = decision_errors(inputs.scores, inputs.threshold)
    totals = {1: int(inputs.scores["label"].sum()), 0: int((inputs.scores["label"] == 0).sum())}
    note = (
        f"At threshold {inputs.threshold:g}, over all folds. Of each model's misses and false alarms, the "
        f"{ERRORS_DRAWN} most confident are drawn (image, true mask, both models' saliency); all are listed."
    )
    parts = [f'<p class="note">{_text(note)}</p>']
    rows = []
    for model in MODELS:
        mine = errors[errors["model"] == model]
        rows.append(
            [_text(model)]
            + [
                f'<span data-count="{model}.{stem}">{int((mine["kind"] == kind).sum())}</span>'
                f" of {totals[int(kind == 'miss')]}"
                for kind, stem in ERROR_KINDS.items()
            ]
        )
    parts.append(_table(["model", "misses (of defective)", "false alarms (of defect-free)"], rows))
    for model in MODELS:
        for kind, stem in ERROR_KINDS.items():
            found = errors[(errors["model"] == model) & (errors["kind"] == kind)]
            parts.append(_error_list(inputs.pictures, model, stem, found))
    return _section("Decisions at the threshold", *parts)


def _error_list(folder: Path, model: str, stem: str, found: pd.DataFrame) -> str:
    plural = stem.replace("_", " ")
    title = f"<h3>{_text(model)}, {plural}: {len(found)}</h3>"
    if found.empty:
        return title
    rows = [
        [_text(row.id), _text(row.fold), _number(row.baseline), _number(row.guided)]
        for row in found.itertuples(index=False)
    ]
    listed = _table(["image", "fold", "baseline score", "guided score"], rows)
    caption = f"The {min(len(found), ERRORS_DRAWN)} most confident {plural} of {model}."
    picture = _figure(folder, f"errors_{model}_{stem}.png", caption)
    return f"{title}\n{picture}\n<details><summary>all {len(found)}</summary>\n{listed}\n</details>"


def _localization(inputs: ReportInputs) -> str:
    """How each map points at the true defects: means over images, per fold, and the overlays."""
    located = inputs.metrics.get("localization") or {}
    overlays = _figure(inputs.pictures, *OVERLAYS)
    if not located:
        return _section(
            "Localization", "<p>No defective test image has a true mask: localization is not scored.</p>", overlays
        )
    maps = [name for name in LOCALIZATION_MAPS if name in located]
    # A figure no map has (the tolerant pointing game without a tolerance) gets no column; IoU always has
    # one, last: the pseudo-masks have it.
    keys = [key for key in LOCALIZATION_KEYS if key == "iou" or any(key in located[name] for name in maps)]
    rows = [
        [_text(name.replace("_", " "))]
        + [
            _metric(f"localization.{name}.{key}", located[name][key], True) if key in located[name] else ""
            for key in keys
        ]
        for name in maps
    ]
    iou = ["" for _ in keys[:-1]] + [_metric("localization.pseudo_mask_iou", located["pseudo_mask_iou"], True)]
    rows += [
        [_text("Otsu pseudo-mask of the baseline"), *iou],
        [
            _text("uniform map (chance)"),
            _metric("localization.mask_area_share", located["mask_area_share"], True),
            *["" for _ in keys[1:]],
        ],
    ]
    header = ["map", *(LOCALIZATION_KEYS[key] for key in keys)]
    per_fold = inputs.localization_per_fold
    fold_rows = [
        [_text(column)] + [_percent(value) if column != "n_images" else f"{value:.0f}" for value in per_fold[column]]
        for column in per_fold.columns
        if column != "fold"
    ]
    fold_table = _table(["per fold", *(_text(f"fold {fold}") for fold in per_fold.get("fold", []))], fold_rows)
    note = (
        f"Over {located['n_images']:.0f} defective test images with a true mask, each counted once; "
        f"saliency method {inputs.method}."
    )
    return _section(
        "Localization",
        _table(header, rows),
        f'<p class="note">{_text(note)}</p>',
        f"<details><summary>per fold</summary>\n{fold_table}\n</details>",
        overlays,
    )
