"""Grouped folds: which images share a physical item (group), and which fold each group tests in.

All images of a group land in the same fold, so no item is trained on and tested on at once;
byte-identical copies are merged into one group first, and ``prepare.group_pattern`` derives groups
from file names where a layout has no item information.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import PurePath

import numpy as np

from pipeline.core.errors import DataError
from pipeline.data.images import split_ref


def assign_group_folds(groups: Sequence[str], labels: Sequence[int], folds: int, seed: int) -> list[int]:
    """Fold index (0..folds-1) per image, keeping each group whole and balancing defective images.

    Greedy: groups sorted by defect count, then size, descending (ties in a seeded random order)
    each go to the fold with the fewest defective images (ties: fewest images); groups without
    defects go to the fold with the fewest images. The result does not depend on input order.
    """
    if len(groups) != len(labels):
        raise ValueError(f"{len(groups)} groups but {len(labels)} labels")
    if folds < 2:
        raise DataError(f"cross-validation needs at least 2 folds, got {folds}")
    size = Counter(groups)
    defects = Counter(group for group, label in zip(groups, labels, strict=True) if label)
    if len(size) < folds:
        raise DataError(
            f"{folds} folds need at least {folds} groups (physical items), got {len(size)}; use fewer folds"
        )
    names = sorted(size)
    tie_break = np.random.default_rng(seed).permutation(len(names))
    order = sorted(range(len(names)), key=lambda i: (-defects[names[i]], -size[names[i]], tie_break[i]))
    fold_defects, fold_images = [0] * folds, [0] * folds
    fold_of: dict[str, int] = {}
    for i in order:
        group = names[i]
        if defects[group]:
            fold = min(range(folds), key=lambda k: (fold_defects[k], fold_images[k], k))
        else:
            fold = min(range(folds), key=lambda k: (fold_images[k], fold_defects[k], k))
        fold_of[group] = fold
        fold_defects[fold] += defects[group]
        fold_images[fold] += size[group]
    return [fold_of[group] for group in groups]


def merge_duplicate_groups(ids: Sequence[str], groups: Sequence[str], duplicates: list[list[str]]) -> list[str]:
    """Groups with the groups of byte-identical images merged ("kos01+kos26").

    A copy in training and its twin in test would leak, so copies must share a group, and the
    merged name keeps them together in any later grouped split as well.
    """
    parent = {group: group for group in groups}

    def root(group: str) -> str:
        while parent[group] != group:
            group = parent[group]
        return group

    group_of = dict(zip(ids, groups, strict=True))
    for copies in duplicates:
        roots = sorted({root(group_of[id_]) for id_ in copies})
        for other in roots[1:]:
            parent[other] = roots[0]
    members: dict[str, set[str]] = defaultdict(set)
    for group in parent:
        members[root(group)].add(group)
    return ["+".join(sorted(members[root(group)])) for group in groups]


def grouped_folds(
    ids: Sequence[str], groups: Sequence[str], labels: Sequence[int], duplicates: list[list[str]], folds: int, seed: int
) -> tuple[list[str], list[int]]:
    """(merged groups, folds): grouped K-fold with byte-identical copies in one group."""
    merged = merge_duplicate_groups(ids, groups, duplicates)
    return merged, assign_group_folds(merged, labels, folds, seed)


def groups_from_names(pattern: str, refs: Sequence[str]) -> list[str]:
    """Each image's group from its file name (prepare.group_pattern): the named group ``item`` of the
    pattern's first match in the name, or the whole match where the pattern has no such group or it
    took no part. A name the pattern does not match is an error: a silent fallback would split an
    item's near-copies across folds. Ending the pattern in ``|.*`` makes such an image its own group.
    """
    compiled = re.compile(pattern)
    groups = []
    for ref in refs:
        name = PurePath(split_ref(ref)[1] or ref).name
        match = compiled.search(name)
        group = None if match is None else match.groupdict().get("item") or match.group(0)
        if not group:
            found = "matches only an empty string in its name" if match else "does not match its name"
            raise DataError(
                f"{ref}: prepare.group_pattern '{pattern}' {found}, so the image's item is unknown; widen the "
                "pattern (ending it in '|.*' makes such an image its own group) or rename the file"
            )
        groups.append(group)
    return groups


def image_groups(pattern: str | None, ids: Sequence[str], refs: Sequence[str]) -> list[str]:
    """Groups of a layout without item information: from the names, else each image its own."""
    return groups_from_names(pattern, refs) if pattern else list(ids)
