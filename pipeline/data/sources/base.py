"""What every data-set kind builds on: the images it lists, the files it finds, the checks it passes.

A loader lists a data set's images as :class:`SourceImage` in a :class:`SourceSet` and decodes
nothing but the masks that give labels (KolektorSDD(2)), so loading stays fast; images are checked
when they are read (``pipeline.data.images``). :class:`Tree` finds a layout's files in a folder or a
zip archive, and :func:`validate` refuses a set that cannot give a meaningful evaluation. Each kind
describes itself to the registry (``pipeline.data.sources``) as a :class:`SourceKind`.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

from pipeline.core.errors import DataError
from pipeline.data.images import ZIP_SEPARATOR, MaskSource, Reader, decode_gray

if TYPE_CHECKING:
    from pipeline.data.sources.labelme import LabelmeParams


@dataclass(frozen=True)
class SourceImage:
    """One image of a source data set, not yet read."""

    id: str  # unique and filename-safe, e.g. "kos01_Part0"
    label: int  # 1 = defective, 0 = defect-free
    group: str  # physical item: all images of a group always land in the same fold
    fold: int  # fold in which the image is a test image; -1 = training only
    image: str  # path, or "<zip path>::<member>"
    mask: str | MaskSource | None  # same form, or drawn from annotations; None when the image has no mask


@dataclass
class SourceSet:
    """The images of one data set with the facts ``prepare`` reports about it."""

    name: str  # the kind: "kolektorsdd", "kolektorsdd2", "manifest", "folder", "labelme"
    images: list[SourceImage]
    duplicates: list[list[str]] = field(default_factory=list)  # ids with identical image bytes
    excluded: dict[str, str] = field(default_factory=dict)  # id -> why it was left out
    root: str = ""  # where it was loaded from; error messages name it
    masks_required: bool = False  # the layout gives every image a mask (labels come from masks)


def _default_labelme_params() -> LabelmeParams:
    # Imported when first needed: the labelme module builds its loader on this one.
    from pipeline.data.sources.labelme import LabelmeParams

    return LabelmeParams()


@dataclass(frozen=True)
class LoadOptions:
    """What a loader may need beyond path, folds and seed (prepare's params)."""

    group_pattern: str | None = None
    labelme: LabelmeParams = field(default_factory=_default_labelme_params)


@dataclass(frozen=True)
class SourceKind:
    """One data-set kind as the registry knows it; each kind's module defines its own once."""

    name: str  # prepare.dataset in params.yaml, and the name of the sets it loads
    load: Callable[[str | Path, int, int, LoadOptions], SourceSet]  # (path, folds, seed, options)
    # Why prepare.group_pattern does not apply where the layout itself gives the groups; None = it applies.
    own_groups: str | None = None


# --- finding a layout's files -------------------------------------------------------------------


class Tree:
    """The relative file names of a folder or a zip archive, and the refs to read them by."""

    # Deep enough for every supported layout inside one top folder, e.g. "KolektorSDD/kos01/Part0.jpg".
    DEPTH = 3

    def __init__(self, path: str | Path, expected: str) -> None:
        self.path = Path(path)
        self.expected = expected
        if self.path.is_dir():
            self.is_archive = False
            self.names = self._list_folder()
        elif self.path.is_file() and zipfile.is_zipfile(self.path):
            self.is_archive = True
            try:
                with zipfile.ZipFile(self.path) as archive:
                    names = archive.namelist()
            except (OSError, zipfile.BadZipFile) as exc:
                raise DataError(f"cannot open zip archive {self.path} ({exc}); download it again") from exc
            # __MACOSX/ holds resource forks that the macOS archiver adds beside every file.
            self.names = [n for n in names if not n.endswith("/") and not n.startswith("__MACOSX/")]
        elif self.path.exists():
            raise DataError(f"{self.path} is neither a folder nor a zip archive; expected {expected} in it")
        else:
            raise DataError(f"{self.path} does not exist; expected a folder or zip archive with {expected}")

    def _list_folder(self) -> list[str]:
        names = []
        for directory, subdirectories, files in os.walk(self.path):
            relative = Path(directory).relative_to(self.path)
            if len(relative.parts) >= self.DEPTH - 1:
                subdirectories.clear()
            names += [(relative / name).as_posix() for name in files]
        return names

    def ref(self, name: str) -> str:
        return f"{self.path}{ZIP_SEPARATOR}{name}" if self.is_archive else str(self.path / name)

    def select(self, pattern: re.Pattern[str]) -> dict[str, tuple[re.Match[str], str]]:
        """Files whose name relative to the data set's top matches ``pattern``: name -> (match, ref).

        The top is the folder or archive itself, or a single folder inside it: archives are often
        packed with one top folder and unpacked into one.
        """
        by_top: dict[str, dict[str, tuple[re.Match[str], str]]] = defaultdict(dict)
        for name in self.names:
            first, _, rest = name.partition("/")
            for top, relative in (("", name), (first, rest)):
                match = pattern.fullmatch(relative)
                if match:
                    by_top[top][relative] = (match, self.ref(name))
        if not by_top:
            raise DataError(
                f"found no data set in {self.path}: expected {self.expected} directly in it or inside one top folder"
            )
        if len(by_top) > 1:
            tops = ", ".join(sorted(f"{top or '.'}/" for top in by_top))
            raise DataError(f"{self.path} holds more than one copy of the data set (in {tops}); point to one of them")
        return next(iter(by_top.values()))


def id_from_path(relative: str) -> str:
    """A filename-safe id from a relative path: "good/a b.png" -> "good_a_b"."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", PurePath(relative).with_suffix("").as_posix()).strip("_")


def natural_key(text: str) -> list[int | str]:
    """Sort key putting "Part10" after "Part9"."""
    return [int(token) if token.isdigit() else token for token in re.split(r"(\d+)", text)]


def images_and_masks(
    tree: Tree, pattern: re.Pattern[str], make_id: Callable[[re.Match[str]], str], mask_suffix: str, layout: str
) -> tuple[dict[str, str], dict[str, str]]:
    """id -> image ref and id -> mask ref for a layout that pairs every image with a mask.

    ``pattern`` has a group ``mask`` that matches only mask files. Labels come from the masks, so an
    image without one (or a mask without its image: an incomplete copy) is an error.
    """
    images: dict[str, str] = {}
    masks: dict[str, str] = {}
    for match, ref in tree.select(pattern).values():
        (masks if match["mask"] else images)[make_id(match)] = ref
    unmasked = sorted(images.keys() - masks.keys(), key=natural_key)
    if unmasked:
        image = images[unmasked[0]]
        raise DataError(
            f"{image} has no mask: expected {re.sub(r'[.][^.]*$', mask_suffix, image)}; every {layout} image "
            "needs one (labels come from the masks), so unpack the official archive again"
        )
    orphans = sorted(masks.keys() - images.keys(), key=natural_key)
    if orphans:
        raise DataError(
            f"{masks[orphans[0]]} has no image beside it; the copy is incomplete, unpack the official archive again"
        )
    return images, masks


def labels_from_masks(ids: Sequence[str], masks: dict[str, str]) -> list[int]:
    """Each id's label from its mask: 1 where the mask has a non-zero pixel (defective), else 0."""
    with Reader() as reader:
        return [int(decode_gray(reader.read(masks[id_]), masks[id_]).any()) for id_ in ids]


# --- validation ---------------------------------------------------------------------------------


def validate(source: SourceSet) -> None:
    """Raise DataError when the set cannot give a meaningful train/test evaluation."""
    where = source.root or source.name
    images = source.images
    if not images:
        raise DataError(f"found no images in {where}")
    repeated = sorted(id_ for id_, n in Counter(im.id for im in images).items() if n > 1)
    if repeated:
        files = ", ".join(im.image for im in images if im.id == repeated[0])
        raise DataError(
            f"{where}: image id {repeated[0]!r} is used by more than one file ({files}); rename one of them"
        )
    for image in images:
        if image.label not in (0, 1):
            raise DataError(f"{where}: {image.image} has label {image.label!r}; expected 0 or 1")
        if image.fold < -1:
            raise DataError(f"{where}: {image.image} has fold {image.fold}; expected -1 (training only) or 0..K-1")
        if source.masks_required and image.mask is None:
            raise DataError(f"{image.image} has no mask, but the {source.name} layout gives every image one")
    for label, kind in ((0, "defect-free"), (1, "defective")):
        if not any(im.label == label for im in images):
            raise DataError(f"{where} has no {kind} images; the pipeline needs both classes")

    test_folds = sorted({im.fold for im in images if im.fold >= 0})
    if not test_folds:
        raise DataError(f"{where} has no test images (every fold is -1); mark some as test or use cross-validation")
    if test_folds != list(range(len(test_folds))):
        raise DataError(f"{where}: folds must be numbered 0..K-1 without gaps, got {test_folds}")
    fixed_split = any(im.fold == -1 for im in images) and test_folds == [0]
    for fold in test_folds:
        name = "the test split" if fixed_split else f"fold {fold}"
        test_labels = {im.label for im in images if im.fold == fold}
        if 1 not in test_labels:
            raise DataError(
                f"{name} of {where} has no defective image, so it cannot be evaluated; "
                "use fewer folds or add defective images"
            )
        train_labels = {im.label for im in images if im.fold != fold}
        if train_labels != {0, 1}:
            raise DataError(f"the training images for {name} of {where} lack a class; use fewer folds or add images")
