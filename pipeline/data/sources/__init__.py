"""The registry of source data-set kinds: which kinds exist, and loading a data set of one of them.

Each kind lives in its own module and describes itself there once as a
:class:`~pipeline.data.sources.base.SourceKind`: KolektorSDD and KolektorSDD2 (``kolektorsdd``), a
manifest CSV (``manifest``), the ``good/`` + ``defect/`` folder convention (``folder``) and images
annotated in labelme (``labelme``); ``docs/datasets.md`` describes the layouts. The ``prepare``
stage calls :func:`load_source`, then reads each image and mask with ``pipeline.data.images``.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.errors import DataError
from pipeline.data.sources.base import LoadOptions, SourceKind, SourceSet
from pipeline.data.sources.folder import FOLDER
from pipeline.data.sources.kolektorsdd import KOLEKTORSDD, KOLEKTORSDD2
from pipeline.data.sources.labelme import LABELME
from pipeline.data.sources.manifest import MANIFEST

# In the order params.yaml's documentation and error messages list them.
_KINDS: dict[str, SourceKind] = {kind.name: kind for kind in (KOLEKTORSDD, KOLEKTORSDD2, MANIFEST, FOLDER, LABELME)}
SOURCE_KINDS = tuple(_KINDS)


def load_source(
    kind: str, path: str | Path | None, folds: int, seed: int, options: LoadOptions | None = None
) -> SourceSet:
    """Load a data set of the given kind (one of :data:`SOURCE_KINDS`)."""
    options = options or LoadOptions()
    if kind not in _KINDS:
        raise DataError(f"unknown data set kind {kind!r}; choose one of {', '.join(SOURCE_KINDS)}")
    if not path:
        raise DataError(f"data set kind {kind!r} needs a path (prepare.path in params.yaml): see docs/datasets.md")
    source_kind = _KINDS[kind]
    if options.group_pattern and source_kind.own_groups:
        raise DataError(
            f"prepare.group_pattern does not apply to dataset {kind!r}: {source_kind.own_groups}; "
            "remove prepare.group_pattern"
        )
    return source_kind.load(path, folds, seed, options)
