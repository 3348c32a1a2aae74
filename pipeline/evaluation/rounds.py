"""The knowledge rounds side by side: what each round's knowledge was worth and what its model made of it.

Each round (``pipeline.core.layout.KnowledgeRound``) leaves three metrics files: its maps' pointing
game and saliency mass inside the true masks (the maps of the model it learns from), its
pseudo-masks' IoU with the true masks, and its guided model's test AP. ``kgi rounds`` reads them,
with the baseline's AP as round 0, into one table. A round not run yet shows empty cells.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from pipeline.config import PARAMS_FILE, knowledge_rounds, read_params
from pipeline.core import layout
from pipeline.core.artifacts import read_json
from pipeline.metrics.figures import results_table_markdown

# (column, metrics file of the round's stage, key in it)
COLUMNS = (
    ("pointing_game", "saliency", "pointing_game"),
    ("mass_inside", "saliency", "mass_inside"),
    ("pseudo_mask_iou_train", "pseudo_labels", "iou_train"),
    ("pseudo_mask_iou_test", "pseudo_labels", "iou_test"),
    ("ap", "train_guided", "test_ap_mean"),
)


def _metrics(path: Path) -> dict:
    """A stage's metrics file; empty where the stage has not run."""
    return read_json(path) if path.is_file() else {}


def rounds_table(root: Path = Path(".")) -> pd.DataFrame:
    """One row per round of ``root``'s params (round 0: the baseline, AP only)."""
    rounds = [layout.FIRST_ROUND, *knowledge_rounds(read_params(root / PARAMS_FILE)).values()]
    baseline_ap = _metrics(root / layout.metrics_file("train_baseline")).get("test_ap_mean", math.nan)
    rows = [{"round": 0, "model": layout.BASELINE.name, "learns_from": "", "ap": float(baseline_ap)}]
    for number, knowledge_round in enumerate(rounds, start=1):
        row: dict = {"round": number, "model": knowledge_round.name, "learns_from": knowledge_round.learns_from}
        files = {stage: _metrics(root / knowledge_round.metrics(stage)) for _, stage, _ in COLUMNS}  # each read once
        for column, stage, key in COLUMNS:
            row[column] = float(files[stage].get(key, math.nan))
        rows.append(row)
    return pd.DataFrame(rows, columns=["round", "model", "learns_from", *(c for c, _, _ in COLUMNS)])


def rounds_markdown(table: pd.DataFrame) -> str:
    """The table in percent, one decimal; a round not run yet shows empty cells."""
    rows = table.to_dict("records")
    for row in rows:
        for column, _, _ in COLUMNS:
            row[column] = "" if math.isnan(row[column]) else f"{100 * row[column]:.1f}"
    return results_table_markdown(rows, list(table.columns))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Per knowledge round (params rounds): the pointing game and saliency mass of the maps it "
        "learns from, its pseudo-masks' IoU and its model's test AP, in %, from the project's metrics files"
    )
    parser.add_argument("--project", type=Path, default=Path("."), help="the project's root (default: here)")
    parser.add_argument("--out", type=Path, help="also write the table here (.md) and beside it as .csv")
    args = parser.parse_args(argv)
    table = rounds_table(args.project)
    text = rounds_markdown(table)
    if args.out:
        args.out.write_text(text)
        table.to_csv(args.out.with_suffix(".csv"), index=False)
    print(text, end="")
