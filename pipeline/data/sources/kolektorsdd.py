"""KolektorSDD and KolektorSDD2: their unpacked folders or official zips, labels from their masks.

KolektorSDD is split by K-fold cross-validation grouped by item (the ``kosNN`` folders);
KolektorSDD2 keeps its official train/test split and has no item information.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.core.errors import DataError
from pipeline.data.folds import grouped_folds
from pipeline.data.images import find_duplicates
from pipeline.data.sources.base import (
    SourceImage,
    SourceKind,
    SourceSet,
    Tree,
    id_from_path,
    images_and_masks,
    labels_from_masks,
    natural_key,
    validate,
)

_KSDD_EXPECTED = "folders kos01..kos50 with PartN.jpg and PartN_label.bmp"
_KSDD_FILE = re.compile(r"(?P<item>kos\d\d)/Part(?P<part>\d+)(?:(?P<mask>_label\.bmp)|\.jpg)")
# The literature's protocol (its reference implementation) counts 399 images.
_KSDD_EXCLUDED = {
    "kos21_Part7": "byte-identical copy of kos21_Part6; the literature's protocol leaves it out (399 images)"
}


def load_kolektorsdd(path: str | Path, folds: int = 3, seed: int = 0) -> SourceSet:
    """KolektorSDD from its unpacked folder or the official zip: K-fold CV grouped by item.

    Labels come from the masks (non-empty = defective); byte-identical copies across items are
    put in one merged group ("kos01+kos26"), hence one fold.
    """
    tree = Tree(path, _KSDD_EXPECTED)
    images, masks = images_and_masks(
        tree, _KSDD_FILE, lambda m: f"{m['item']}_Part{m['part']}", "_label.bmp", "KolektorSDD"
    )
    excluded = {id_: reason for id_, reason in _KSDD_EXCLUDED.items() if id_ in images}
    ids = sorted(images.keys() - excluded.keys(), key=natural_key)
    labels = labels_from_masks(ids, masks)
    duplicates = find_duplicates({id_: images[id_] for id_ in ids})
    items = [id_.split("_")[0] for id_ in ids]
    groups, fold_of = grouped_folds(ids, items, labels, duplicates, folds, seed)
    source = SourceSet(
        name=KOLEKTORSDD.name,
        images=[
            SourceImage(id_, label, group, fold, images[id_], masks[id_])
            for id_, label, group, fold in zip(ids, labels, groups, fold_of, strict=True)
        ],
        duplicates=duplicates,
        excluded=excluded,
        root=str(path),
        masks_required=True,
    )
    validate(source)
    return source


_KSDD2_EXPECTED = "folders train/ and test/ with NNNNN.png and NNNNN_GT.png"
_KSDD2_FILE = re.compile(r"(?P<split>train|test)/(?P<stem>[^/]+?)(?P<mask>_GT)?\.png")


def load_kolektorsdd2(path: str | Path) -> SourceSet:
    """KolektorSDD2 (folder or zip): its fixed split, train -> fold -1, test -> fold 0.

    Labels come from the ``_GT.png`` masks; the data set has no item information, so each image is
    its own group.
    """
    tree = Tree(path, _KSDD2_EXPECTED)
    images, masks = images_and_masks(
        tree, _KSDD2_FILE, lambda m: f"ksdd2_{m['split']}_{id_from_path(m['stem'])}", "_GT.png", "KolektorSDD2"
    )
    for split in ("train", "test"):
        if not any(id_.startswith(f"ksdd2_{split}_") for id_ in images):
            raise DataError(f"{path} has no images in {split}/; expected {_KSDD2_EXPECTED}")
    ids = sorted(images, key=natural_key)
    labels = labels_from_masks(ids, masks)
    source = SourceSet(
        name=KOLEKTORSDD2.name,
        images=[
            SourceImage(id_, label, id_, -1 if id_.startswith("ksdd2_train_") else 0, images[id_], masks[id_])
            for id_, label in zip(ids, labels, strict=True)
        ],
        duplicates=find_duplicates(images),
        root=str(path),
        masks_required=True,
    )
    validate(source)
    return source


KOLEKTORSDD = SourceKind(
    "kolektorsdd",
    lambda path, folds, seed, options: load_kolektorsdd(path, folds, seed),
    own_groups="its items are the kosNN folders",
)
KOLEKTORSDD2 = SourceKind(
    # A fixed split: no folds, no seed.
    "kolektorsdd2",
    lambda path, folds, seed, options: load_kolektorsdd2(path),
    own_groups="its official split fixes the folds",
)
