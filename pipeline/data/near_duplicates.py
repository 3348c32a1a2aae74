"""Near-duplicate images across groups, the leaks byte comparison cannot see.

``prepare`` merges the groups of byte-identical images, so that a copy and its twin share a
fold. A copy that is not byte-identical (re-encoded, renumbered, the same part photographed
again) leaks between folds just as well. This check gives every prepared image imagehash's
perceptual hash (the sign pattern of a 32x32 thumbnail's lowest 8x8 DCT frequencies: 64 bits)
and lists the pairs of images of different groups whose hashes differ in at most
``--max-distance`` bits, with their folds:

    python -m pipeline.data.near_duplicates data/prepared --max-distance 4 --out near_duplicates.json

It exits with status 1 where such a pair is split between folds (a test image and a training
image of another fold); put their groups together (``prepare.group_pattern``, a manifest's
group column) and prepare again.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import torch
from PIL import Image

from pipeline.core.artifacts import write_json
from pipeline.data.prepared import PreparedData

COLUMNS = ["id_a", "id_b", "group_a", "group_b", "fold_a", "fold_b", "distance", "crosses_folds"]
ROWS_PER_CHUNK = 256  # distances of this many images to all others at a time: memory stays ~N x 16k bytes


def perceptual_hashes(images: torch.Tensor) -> np.ndarray:
    """imagehash's pHash of each uint8 image (N, H, W): bool (N, 64)."""
    return np.stack([imagehash.phash(Image.fromarray(image)).hash.flatten() for image in images.numpy()])


def near_duplicate_pairs(index: pd.DataFrame, hashes: np.ndarray, max_distance: int) -> pd.DataFrame:
    """Pairs of images of different groups within ``max_distance`` bits, closest first.

    ``crosses_folds``: the two images are tested in different folds, or one is tested while the
    other trains only (fold -1), so that a model is tested on a near-copy of its training image.
    """
    groups, folds, ids = index["group"].to_numpy(), index["fold"].to_numpy(), index["id"].to_numpy()
    rows = []
    for start in range(0, len(hashes), ROWS_PER_CHUNK):
        chunk = hashes[start : start + ROWS_PER_CHUNK]
        distances = (chunk[:, None, :] != hashes[None, :, :]).sum(axis=2)
        for offset, other in zip(*np.nonzero(distances <= max_distance)):
            a = start + offset
            if a < other and groups[a] != groups[other]:
                rows.append(
                    (
                        ids[a],
                        ids[other],
                        groups[a],
                        groups[other],
                        int(folds[a]),
                        int(folds[other]),
                        int(distances[offset, other]),
                        bool(folds[a] != folds[other]),
                    )
                )
    return pd.DataFrame(rows, columns=COLUMNS).sort_values(["distance", "id_a", "id_b"], ignore_index=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prepared", type=Path, help="a prepared data folder (data/prepared)")
    parser.add_argument("--max-distance", type=int, default=4, help="bits of the 64 that may differ (default 4)")
    parser.add_argument("--out", type=Path, help="write the pairs and a summary to this JSON file")
    args = parser.parse_args(argv)
    data = PreparedData.load(args.prepared)
    pairs = near_duplicate_pairs(data.index, perceptual_hashes(data.images), args.max_distance)
    crossing = pairs[pairs["crosses_folds"]]
    groups = sorted({tuple(sorted(pair)) for pair in zip(pairs["group_a"], pairs["group_b"])})
    print(
        f"{len(pairs)} near-duplicate pair(s) across groups within {args.max_distance} of 64 bits, between "
        f"{len(groups)} pair(s) of groups: {', '.join('+'.join(g) for g in groups) or 'none'}; "
        f"{len(crossing)} split between folds"
    )
    if len(crossing):
        print(crossing.to_string(index=False))
    if args.out:
        write_json(
            args.out,
            {
                "prepared": str(args.prepared),
                "max_distance": args.max_distance,
                "images": len(data.index),
                "group_pairs": ["+".join(g) for g in groups],
                "split_between_folds": len(crossing),
                "pairs": pairs.to_dict(orient="records"),
            },
        )
    return 1 if len(crossing) else 0
