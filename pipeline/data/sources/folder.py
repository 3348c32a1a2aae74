"""The folder kind: ``good/`` and ``defect/`` images, optionally with masks ``<stem>_mask.png`` beside them."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.core.errors import DataError
from pipeline.data.folds import grouped_folds, image_groups
from pipeline.data.images import IMAGE_EXTENSIONS, find_duplicates
from pipeline.data.sources.base import SourceImage, SourceKind, SourceSet, Tree, id_from_path, validate

_FOLDER_EXPECTED = (
    f"folders good/ and defect/ with images ({', '.join(IMAGE_EXTENSIONS)}), optionally masks <stem>_mask.png"
)
_FOLDER_FILE = re.compile(r"(?P<label>good|defect)/(?P<name>[^/]+)")
_MASK_SUFFIX = "_mask.png"


def load_folder(path: str | Path, folds: int = 3, seed: int = 0, group_pattern: str | None = None) -> SourceSet:
    """The folder convention: ``good/`` and ``defect/`` images, masks ``<stem>_mask.png`` beside them.

    Each image is its own group, or its group comes from its file name (``group_pattern``);
    byte-identical copies merged; grouped K-fold assignment.
    """
    tree = Tree(path, _FOLDER_EXPECTED)
    entries: list[tuple[str, int, str]] = []  # (id, label, ref); a list, so validate sees repeated ids
    masks: dict[str, str] = {}
    for relative, (match, ref) in sorted(tree.select(_FOLDER_FILE).items()):
        name = match["name"].lower()
        if name.endswith(_MASK_SUFFIX):
            masks[id_from_path(relative[: -len(_MASK_SUFFIX)])] = ref
        elif name.endswith(IMAGE_EXTENSIONS):
            entries.append((id_from_path(relative), int(match["label"] == "defect"), ref))
    ids = [id_ for id_, _, _ in entries]
    orphans = sorted(masks.keys() - set(ids))
    if orphans:
        raise DataError(f"mask {masks[orphans[0]]} has no image beside it with the same stem; rename or remove it")

    labels = [label for _, label, _ in entries]
    duplicates = find_duplicates({id_: ref for id_, _, ref in entries})
    items = image_groups(group_pattern, ids, [ref for _, _, ref in entries])
    groups, fold_of = grouped_folds(ids, items, labels, duplicates, folds, seed)
    source = SourceSet(
        name=FOLDER.name,
        images=[
            SourceImage(id_, label, group, fold, ref, masks.get(id_))
            for (id_, label, ref), group, fold in zip(entries, groups, fold_of, strict=True)
        ],
        duplicates=duplicates,
        root=str(path),
    )
    validate(source)
    return source


FOLDER = SourceKind("folder", lambda path, folds, seed, options: load_folder(path, folds, seed, options.group_pattern))
