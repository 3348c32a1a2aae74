"""Rendering the evaluation report in a real headless browser (Debian's chromium) and reading back
what it shows: every picture as the browser decoded it and every number tagged with its metric."""

from __future__ import annotations

import base64
import html
import json
import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (apt-get install chromium; .ci/run installs it), "
    "so the report cannot be rendered in a browser",
)

# After the page's load event every picture has been fetched and decoded (or has failed): the check
# writes what the browser made of each into the DOM, which --dump-dom then prints.
IMAGE_CHECK = """<script>
addEventListener("load", () => {
  const found = [...document.images].map(img => ({alt: img.alt, complete: img.complete,
                                                  width: img.naturalWidth, height: img.naturalHeight}));
  const out = document.createElement("pre");
  out.id = "image-check";
  out.textContent = JSON.stringify(found);
  document.body.appendChild(out);
});
</script>"""
REPORT_POLICY = "default-src 'none';"
# Shown as percentages (metric x 100); every other tagged number is shown as it is.
PERCENT_KEYS = {
    "ap",
    "ap_std",
    "ap_pooled",
    "auroc",
    "auroc_std",
    "f1_best",
    "f1_best_std",
    "precision",
    "recall",
    "mass_inside",
    "pointing_game",
    "pointing_game_tolerant",
    "iou",
    "pseudo_mask_iou",
    "mask_area_share",
}
HEADLINE_KEYS = (
    "ap",
    "ap_std",
    "ap_pooled",
    "auroc",
    "f1_best",
    "precision",
    "recall",
    "false_alarms_at_full_recall",
    "missed_at_zero_false_alarms",
)


class _Tagged(HTMLParser):
    """Text of the elements carrying data-metric / data-count, image sources and link targets."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, dict[str, str]] = {"data-metric": {}, "data-count": {}}
        self.sources: list[str] = []
        self._open: tuple[str, str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = dict(attrs)
        self.sources += [attributes[name] for name in ("src", "href") if name in attributes]
        for kind in self.values:
            if kind in attributes:
                self._open = (kind, attributes[kind])

    def handle_data(self, data: str) -> None:
        if self._open:
            kind, key = self._open
            self.values[kind][key] = self.values[kind].get(key, "") + data

    def handle_endtag(self, tag: str) -> None:
        self._open = None


def tagged(html_text: str) -> _Tagged:
    parser = _Tagged()
    parser.feed(html_text)
    return parser


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    assert CHROMIUM is not None, "the tests that render carry needs_chromium, which skips them here"
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp / 'profile'}",
        "--virtual-time-budget=10000",
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def render(report: Path, tmp: Path) -> tuple[str, list[dict], np.ndarray]:
    """The DOM chromium built from ``report``, what it decoded of each picture, and a screenshot."""
    text = report.read_text(encoding="utf-8")
    tmp.mkdir(parents=True, exist_ok=True)
    # The report forbids every script; the checked copy lets the one inline check run, nothing more.
    assert REPORT_POLICY in text, "the report has lost its Content-Security-Policy"
    checked = tmp / "checked.html"
    checked.write_text(
        text.replace(REPORT_POLICY, REPORT_POLICY + " script-src 'unsafe-inline';", 1).replace(
            "</body>", IMAGE_CHECK + "</body>", 1
        ),
        encoding="utf-8",
    )
    dom = _chromium(tmp, "--dump-dom", checked.as_uri()).stdout
    start = dom.index('<pre id="image-check">') + len('<pre id="image-check">')
    images = json.loads(html.unescape(dom[start : dom.index("</pre>", start)]))
    shot = tmp / "report.png"
    _chromium(tmp, f"--screenshot={shot}", "--window-size=1280,4000", report.as_uri())
    screenshot = cv2.imread(str(shot))
    assert screenshot is not None, f"chromium wrote no readable screenshot {shot}"
    return dom, images, screenshot


def _metric(metrics: dict, key: str) -> float:
    value: Any = metrics
    for part in key.split("."):
        value = value[part]
    return float(value)


def check_rendered(report: Path, tmp: Path, metrics: dict, scores: pd.DataFrame, threshold: float) -> np.ndarray:
    """Assert that the report renders, every picture loaded, and the numbers are the metrics';
    returns the screenshot."""
    original = tagged(report.read_text(encoding="utf-8"))
    assert original.sources and all(source.startswith("data:") for source in original.sources), (
        "the report refers to something outside itself"
    )
    for source in original.sources:  # each embedded picture is a PNG that decodes
        decoded = cv2.imdecode(np.frombuffer(base64.b64decode(source.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
        assert decoded is not None and decoded.size > 0
    dom, images, shot = render(report, tmp)
    assert len(images) == len(original.sources)
    assert all(image["complete"] and image["width"] > 0 and image["height"] > 0 for image in images), images
    shown = tagged(dom).values
    for model in ("baseline", "guided"):
        assert {f"{model}.{key}" for key in HEADLINE_KEYS} <= set(shown["data-metric"])
    for key, text in shown["data-metric"].items():
        scale = 100 if key.rsplit(".", 1)[-1] in PERCENT_KEYS else 1
        decimals = len(text.split(".")[1]) if "." in text else 0
        expected = scale * _metric(metrics, key)
        assert math.isclose(float(text), expected, abs_tol=0.5 * 10**-decimals + 1e-9), (key, text, expected)
    for model in ("baseline", "guided"):
        defective, flagged = scores["label"] == 1, scores[model] >= threshold
        assert int(shown["data-count"][f"{model}.misses"]) == int((defective & ~flagged).sum())
        assert int(shown["data-count"][f"{model}.false_alarms"]) == int((~defective & flagged).sum())
    assert shot is not None and shot.shape[0] > 0
    # A page that rendered holds text and pictures: far from one flat colour.
    assert float(shot.std()) > 20 and (shot < 128).mean() > 0.01
    return shot
