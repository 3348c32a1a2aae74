"""Source data sets: which images exist, their labels, masks, groups and folds.

The ``prepare`` stage calls :func:`load_source` and :func:`validate`, then reads each image with
:func:`read_gray` and its mask with :func:`read_mask`. Five layouts are supported (see
``docs/datasets.md``): KolektorSDD (unpacked folder or the official zip), KolektorSDD2, a manifest
CSV, a ``good/`` + ``defect/`` folder convention and images annotated in labelme (the JSON format
is ``pipeline/data/labelme.py``). Loading decodes nothing but the KolektorSDD(2) masks, which give the
labels, so it stays fast; images are checked when they are read. Where a data set has no item
column, ``prepare.group_pattern`` derives each image's group from its file name.

A file is referred to by its path, or by ``"<zip path>::<member name>"`` for a member of a zip
archive, so the official archives can be used without unpacking them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import zipfile
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Protocol

import cv2
import numpy as np
from PIL import Image

from pipeline.core.errors import DataError
from pipeline.data import labelme
from pipeline.data.labelme import LabelmeParams

ZIP_SEPARATOR = "::"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MAX_IMAGE_PIXELS = 50_000_000  # default of prepare.max_image_pixels: about 50 MB decoded as gray

class MaskSource(Protocol):
    """A true mask drawn from annotations instead of stored as an image (``labelme.LabelmeMask``)."""

    def draw(self, shape: tuple[int, int], image: str | None = None) -> np.ndarray:
        """The mask as bool ``shape`` (height, width, its image's size); ``image`` names it in errors."""
        ...


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


# --- reading files ------------------------------------------------------------------------------


def _split_ref(ref: str) -> tuple[str, str | None]:
    archive, separator, member = ref.partition(ZIP_SEPARATOR)
    return (archive, member) if separator else (ref, None)


class _Reader:
    """Reads the bytes of refs, opening each zip archive once per batch instead of per member."""

    def __init__(self) -> None:
        self._archives: dict[str, zipfile.ZipFile] = {}

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for archive in self._archives.values():
            archive.close()

    def read(self, ref: str) -> bytes:
        path, member = _split_ref(ref)
        try:
            if member is None:
                return Path(path).read_bytes()
            if path not in self._archives:
                self._archives[path] = zipfile.ZipFile(path)
            return self._archives[path].read(member)
        except (OSError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise DataError(f"cannot read {ref} ({exc}); check that the file exists and is readable") from exc


def _truncation(data: bytes) -> str | None:
    """Why ``data`` looks cut short, or None.

    Some decoder builds return a partial image (the missing rows grey) for a truncated file instead
    of failing, so the formats' own end markers are checked before decoding.
    """
    if data.startswith(b"\xff\xd8"):
        # The end marker must follow the last scan's start; scan data never holds FF D9, and looking
        # for it after the scan rather than at the very end accepts files with trailing bytes.
        last_scan = data.rfind(b"\xff\xda")
        if last_scan == -1 or data.find(b"\xff\xd9", last_scan) == -1:
            return "the JPEG end marker (FF D9) is missing"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None if b"IEND" in data[-64:] else "the PNG end chunk (IEND) is missing"
    if data.startswith(b"BM") and len(data) >= 6:
        announced = int.from_bytes(data[2:6], "little")  # 0 is allowed by writers that skip it
        if len(data) < announced:
            return f"its BMP header announces {announced} bytes but it has {len(data)}"
    return None


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the file's header alone, or None where Pillow cannot parse it."""
    # Pillow's own decompression-bomb limit would interfere with ours (prepare.max_image_pixels).
    pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (OSError, SyntaxError, ValueError):  # unknown or damaged header: OpenCV will judge it
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit


def _check_size(width: int, height: int, ref: str, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise DataError(
            f"{ref} is {width}x{height} = {width * height:,} pixels, more than the limit of {max_pixels:,}; "
            "raise prepare.max_image_pixels in params.yaml if the machine has the memory, or downscale the image"
        )


def decode_gray(data: bytes, ref: str, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode an image file's bytes as uint8 H x W gray; ``ref`` names it in errors (``DataError``)."""
    if not data:
        raise DataError(f"{ref} is empty (0 bytes); replace it with the original file")
    why = _truncation(data)
    if why:
        raise DataError(f"{ref} is truncated: {why}; replace it with a complete copy")
    # The header tells the size before decoding: a small file can decode to gigabytes.
    size = _header_size(data)
    if size is not None:
        _check_size(*size, ref, max_pixels)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    except cv2.error:
        image = None
    if image is None or image.size == 0:
        raise DataError(
            f"{ref} is not a readable image (OpenCV cannot decode it); replace it or remove it from the data set"
        )
    # Formats Pillow cannot parse are checked after decoding (OpenCV refuses above 2^30 pixels).
    _check_size(image.shape[1], image.shape[0], ref, max_pixels)
    return image


def read_gray(ref: str, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read an image as uint8 H x W gray; ``ref`` is a path or ``"<zip path>::<member>"``.

    An image of more than ``max_pixels`` pixels is refused, from its header where possible.
    """
    with _Reader() as reader:
        return decode_gray(reader.read(ref), ref, max_pixels)


def read_mask(
    ref: str | MaskSource, shape: tuple[int, int], image: str | None = None, max_pixels: int = MAX_IMAGE_PIXELS
) -> np.ndarray:
    """Read (or draw) a mask as bool H x W (non-zero = defect); it must have ``shape``, its image's size.

    ``image`` (the image's ref) is only used to name the image in the error message.
    """
    if not isinstance(ref, str):
        return ref.draw(tuple(shape), image)
    mask = read_gray(ref, max_pixels)
    if mask.shape != tuple(shape):
        of = f"its image {image}" if image else "its image"
        raise DataError(
            f"mask {ref} is {mask.shape[1]}x{mask.shape[0]} (width x height) but {of} is "
            f"{shape[1]}x{shape[0]}; a mask must have exactly its image's size"
        )
    return mask > 0


def find_duplicates(refs: dict[str, str]) -> list[list[str]]:
    """Sets of ids (each sorted, the list sorted) whose files have identical bytes (SHA-1)."""
    by_digest: dict[str, list[str]] = defaultdict(list)
    with _Reader() as reader:
        for id_, ref in refs.items():
            by_digest[hashlib.sha1(reader.read(ref)).hexdigest()].append(id_)
    return sorted(sorted(ids) for ids in by_digest.values() if len(ids) > 1)


# --- finding a layout's files -------------------------------------------------------------------


class _Tree:
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


def _id_from_path(relative: str) -> str:
    """A filename-safe id from a relative path: "good/a b.png" -> "good_a_b"."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", PurePath(relative).with_suffix("").as_posix()).strip("_")


# --- folds --------------------------------------------------------------------------------------


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


def _merge_duplicate_groups(ids: Sequence[str], groups: Sequence[str], duplicates: list[list[str]]) -> list[str]:
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


def _grouped_folds(
    ids: Sequence[str],
    groups: Sequence[str],
    labels: Sequence[int],
    duplicates: list[list[str]],
    folds: int,
    seed: int,
) -> tuple[list[str], list[int]]:
    """(merged groups, folds): grouped K-fold with byte-identical copies in one group."""
    merged = _merge_duplicate_groups(ids, groups, duplicates)
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
        name = PurePath(_split_ref(ref)[1] or ref).name
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


def _image_groups(pattern: str | None, ids: Sequence[str], refs: Sequence[str]) -> list[str]:
    """Groups of a layout without item information: from the names, else each image its own."""
    return groups_from_names(pattern, refs) if pattern else list(ids)


# --- loaders ------------------------------------------------------------------------------------


def _natural_key(text: str) -> list[int | str]:
    """Sort key putting "Part10" after "Part9"."""
    return [int(token) if token.isdigit() else token for token in re.split(r"(\d+)", text)]


def _images_and_masks(
    tree: _Tree, pattern: re.Pattern[str], make_id: Callable[[re.Match[str]], str], mask_suffix: str, layout: str
) -> tuple[dict[str, str], dict[str, str]]:
    """id -> image ref and id -> mask ref for a layout that pairs every image with a mask.

    ``pattern`` has a group ``mask`` that matches only mask files. Labels come from the masks, so an
    image without one (or a mask without its image: an incomplete copy) is an error.
    """
    images: dict[str, str] = {}
    masks: dict[str, str] = {}
    for match, ref in tree.select(pattern).values():
        (masks if match["mask"] else images)[make_id(match)] = ref
    unmasked = sorted(images.keys() - masks.keys(), key=_natural_key)
    if unmasked:
        image = images[unmasked[0]]
        raise DataError(
            f"{image} has no mask: expected {re.sub(r'[.][^.]*$', mask_suffix, image)}; every {layout} image "
            "needs one (labels come from the masks), so unpack the official archive again"
        )
    orphans = sorted(masks.keys() - images.keys(), key=_natural_key)
    if orphans:
        raise DataError(
            f"{masks[orphans[0]]} has no image beside it; the copy is incomplete, unpack the official archive again"
        )
    return images, masks


def _labels_from_masks(ids: Sequence[str], masks: dict[str, str]) -> list[int]:
    with _Reader() as reader:
        return [int(decode_gray(reader.read(masks[id_]), masks[id_]).any()) for id_ in ids]


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
    tree = _Tree(path, _KSDD_EXPECTED)
    images, masks = _images_and_masks(
        tree, _KSDD_FILE, lambda m: f"{m['item']}_Part{m['part']}", "_label.bmp", "KolektorSDD"
    )
    excluded = {id_: reason for id_, reason in _KSDD_EXCLUDED.items() if id_ in images}
    ids = sorted(images.keys() - excluded.keys(), key=_natural_key)
    labels = _labels_from_masks(ids, masks)
    duplicates = find_duplicates({id_: images[id_] for id_ in ids})
    items = [id_.split("_")[0] for id_ in ids]
    groups, fold_of = _grouped_folds(ids, items, labels, duplicates, folds, seed)
    source = SourceSet(
        name="kolektorsdd",
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
    tree = _Tree(path, _KSDD2_EXPECTED)
    images, masks = _images_and_masks(
        tree, _KSDD2_FILE, lambda m: f"ksdd2_{m['split']}_{_id_from_path(m['stem'])}", "_GT.png", "KolektorSDD2"
    )
    for split in ("train", "test"):
        if not any(id_.startswith(f"ksdd2_{split}_") for id_ in images):
            raise DataError(f"{path} has no images in {split}/; expected {_KSDD2_EXPECTED}")
    ids = sorted(images, key=_natural_key)
    labels = _labels_from_masks(ids, masks)
    source = SourceSet(
        name="kolektorsdd2",
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


_MANIFEST_EXPECTED = "a CSV file with columns image,label and optionally mask,group and split or fold"
_LABELS = {"0": 0, "1": 1, "good": 0, "defect": 1}
_SPLITS = {"train": -1, "test": 0}


def _manifest_file(root: Path, value: str, where: str, column: str) -> tuple[str, str]:
    """(relative path, path to read) of a manifest cell, which must name a file inside ``root``."""
    if not value:
        raise DataError(f"{where}: the {column} cell is empty; give a path relative to {root}")
    # Lexical check: the row's text must stay inside the root; a symlink there is the user's choice.
    relative = os.path.normpath(value)
    if os.path.isabs(value) or relative == os.pardir or relative.startswith(os.pardir + os.sep):
        raise DataError(
            f"{where}: {column} {value!r} points outside the manifest's folder {root}; "
            "paths must be relative to that folder and stay inside it"
        )
    full = os.path.join(root, relative)
    if not os.path.isfile(full):
        raise DataError(
            f"{where}: {column} file {full} does not exist; fix the path (relative to {root}) or drop the row"
        )
    return PurePath(relative).as_posix(), full


def _manifest_fold(row: dict[str, str], where: str) -> int:
    """The fold a manifest row gives, from its split or fold cell."""
    if "split" in row:
        split = row["split"].lower()
        if split not in _SPLITS:
            raise DataError(f"{where}: split {row['split']!r} is neither train nor test")
        return _SPLITS[split]
    try:
        fold = int(row["fold"])
    except ValueError:
        fold = None
    if fold is None or fold < -1:
        raise DataError(f"{where}: fold {row['fold']!r} is not an integer >= -1 (-1 = training only)")
    return fold


def _manifest_rows(csv_path: Path) -> tuple[list[str], list[tuple[str, dict[str, str]]]]:
    """The manifest's lower-case column names and its non-empty rows, each with where it is."""
    if not csv_path.is_file():
        raise DataError(f"manifest {csv_path} does not exist; expected {_MANIFEST_EXPECTED}")
    rows: list[tuple[str, dict[str, str]]] = []
    try:
        # utf-8-sig: spreadsheet programs write a byte-order mark before the header.
        with open(csv_path, newline="", encoding="utf-8-sig") as file:
            reader = csv.DictReader(file)
            columns = [c.strip().lower() for c in reader.fieldnames or []]
            reader.fieldnames = columns
            for row in reader:
                cells = {k: (v or "").strip() for k, v in row.items() if k is not None}
                if any(cells.values()):
                    rows.append((f"{csv_path} line {reader.line_num}", cells))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot parse manifest {csv_path} ({exc}); expected {_MANIFEST_EXPECTED}") from exc
    return columns, rows


def _check_manifest_columns(csv_path: Path, columns: list[str], group_pattern: str | None) -> None:
    missing = [c for c in ("image", "label") if c not in columns]
    if missing:
        raise DataError(f"manifest {csv_path} lacks column(s) {', '.join(missing)}; expected {_MANIFEST_EXPECTED}")
    if "split" in columns and "fold" in columns:
        raise DataError(f"manifest {csv_path} has both a split and a fold column; keep one of them")
    given = [column for column in ("group", "split", "fold") if column in columns]
    if group_pattern and given:
        raise DataError(
            f"manifest {csv_path} has a {given[0]} column, so prepare.group_pattern cannot set its groups and "
            "folds; remove the column or prepare.group_pattern"
        )


def load_manifest(csv_path: str | Path, folds: int = 3, seed: int = 0, group_pattern: str | None = None) -> SourceSet:
    """A manifest CSV: one row per image, paths relative to the CSV's folder.

    Folds come from a ``split`` or ``fold`` column; without either, grouped K-fold assignment
    (byte-identical copies merged first) on a ``group`` column or else ``group_pattern``.
    """
    csv_path = Path(csv_path)
    root = csv_path.parent
    columns, rows = _manifest_rows(csv_path)
    _check_manifest_columns(csv_path, columns, group_pattern)
    fixed_folds = "split" in columns or "fold" in columns
    ids: list[str] = []
    labels: list[int] = []
    groups: list[str] = []
    fold_of: list[int] = []
    image_refs: list[str] = []
    mask_refs: list[str | None] = []
    for where, row in rows:
        relative, image_ref = _manifest_file(root, row["image"], where, "image")
        label = _LABELS.get(row["label"].lower())
        if label is None:
            raise DataError(f"{where}: label {row['label']!r} is not one of 0, 1, good, defect")
        ids.append(_id_from_path(relative))
        labels.append(label)
        groups.append(row.get("group") or ids[-1])
        if fixed_folds:
            fold_of.append(_manifest_fold(row, where))
        image_refs.append(image_ref)
        mask_refs.append(_manifest_file(root, row["mask"], where, "mask")[1] if row.get("mask") else None)

    duplicates = find_duplicates(dict(zip(ids, image_refs, strict=True)))
    if group_pattern:
        groups = groups_from_names(group_pattern, image_refs)
    if not fixed_folds:
        groups, fold_of = _grouped_folds(ids, groups, labels, duplicates, folds, seed)
    source = SourceSet(
        name="manifest",
        images=[
            SourceImage(*fields) for fields in zip(ids, labels, groups, fold_of, image_refs, mask_refs, strict=True)
        ],
        duplicates=duplicates,
        root=str(csv_path),
    )
    validate(source)
    return source


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
    tree = _Tree(path, _FOLDER_EXPECTED)
    entries: list[tuple[str, int, str]] = []  # (id, label, ref); a list, so validate sees repeated ids
    masks: dict[str, str] = {}
    for relative, (match, ref) in sorted(tree.select(_FOLDER_FILE).items()):
        name = match["name"].lower()
        if name.endswith(_MASK_SUFFIX):
            masks[_id_from_path(relative[: -len(_MASK_SUFFIX)])] = ref
        elif name.endswith(IMAGE_EXTENSIONS):
            entries.append((_id_from_path(relative), int(match["label"] == "defect"), ref))
    ids = [id_ for id_, _, _ in entries]
    orphans = sorted(masks.keys() - set(ids))
    if orphans:
        raise DataError(f"mask {masks[orphans[0]]} has no image beside it with the same stem; rename or remove it")

    labels = [label for _, label, _ in entries]
    duplicates = find_duplicates({id_: ref for id_, _, ref in entries})
    items = _image_groups(group_pattern, ids, [ref for _, _, ref in entries])
    groups, fold_of = _grouped_folds(ids, items, labels, duplicates, folds, seed)
    source = SourceSet(
        name="folder",
        images=[
            SourceImage(id_, label, group, fold, ref, masks.get(id_))
            for (id_, label, ref), group, fold in zip(entries, groups, fold_of, strict=True)
        ],
        duplicates=duplicates,
        root=str(path),
    )
    validate(source)
    return source


_LABELME_EXPECTED = (
    f"images ({', '.join(IMAGE_EXTENSIONS)}) with labelme JSON files of the same base name beside them "
    "or in the folder prepare.labelme.annotations"
)


def _labelme_folder(root: Path, relative: str, key: str) -> Path:
    folder = root / relative
    if not folder.is_dir():
        raise DataError(
            f"{folder} is not a folder: prepare.{key} ({relative!r}) is relative to prepare.path {root}; "
            f"expected {_LABELME_EXPECTED}"
        )
    return folder


def load_labelme(
    path: str | Path, folds: int = 3, seed: int = 0, group_pattern: str | None = None,
    options: LabelmeParams | None = None,
) -> SourceSet:
    """Images annotated in labelme: the images directly in ``options.images`` (subfolders are not
    read), each with at most one JSON annotation beside it or in ``options.annotations``.

    An image is defective when its annotation has a shape of a defect label; without an annotation
    or such a shape it is defect-free. Masks are drawn from the shapes when the image is read. Each
    image is its own group unless ``group_pattern`` derives groups from the names; grouped K-fold.
    """

    options = options or LabelmeParams()
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; expected {_LABELME_EXPECTED} in it")
    image_folder = _labelme_folder(root, options.images, "labelme.images")
    annotation_folder = image_folder
    if options.annotations is not None:
        annotation_folder = _labelme_folder(root, options.annotations, "labelme.annotations")
    images = sorted((file for file in image_folder.iterdir() if file.is_file()
                     and file.suffix.lower() in IMAGE_EXTENSIONS), key=lambda file: _natural_key(file.name))
    if not images:
        raise DataError(f"found no images in {image_folder}; expected {_LABELME_EXPECTED}")
    annotated = labelme.annotations_by_image(annotation_folder, image_folder, images)
    defect_labels = labelme.defect_label_set(options.defect_labels, list(annotated.values()), annotation_folder)
    masks = {image: labelme.LabelmeMask(annotation, defect_labels, options.line_width, options.point_radius)
             for image, annotation in annotated.items()}
    refs = [str(image) for image in images]
    ids = [_id_from_path(image.name) for image in images]
    labels = [int(ref in masks and bool(masks[ref].defect_shapes())) for ref in refs]
    duplicates = find_duplicates(dict(zip(ids, refs, strict=True)))
    groups, fold_of = _grouped_folds(ids, _image_groups(group_pattern, ids, refs), labels, duplicates, folds, seed)
    source = SourceSet(
        name="labelme",
        images=[
            SourceImage(id_, label, group, fold, ref, masks.get(ref))
            for id_, label, group, fold, ref in zip(ids, labels, groups, fold_of, refs, strict=True)
        ],
        duplicates=duplicates,
        root=str(image_folder),
    )
    validate(source)
    return source


@dataclass(frozen=True)
class LoadOptions:
    """What a loader may need beyond path, folds and seed (prepare's params)."""

    group_pattern: str | None = None
    labelme: LabelmeParams = field(default_factory=LabelmeParams)


_LOADERS: dict[str, Callable[[str | Path, int, int, LoadOptions], SourceSet]] = {
    "kolektorsdd": lambda path, folds, seed, options: load_kolektorsdd(path, folds, seed),
    # A fixed split: no folds, no seed.
    "kolektorsdd2": lambda path, folds, seed, options: load_kolektorsdd2(path),
    "manifest": lambda path, folds, seed, options: load_manifest(path, folds, seed, options.group_pattern),
    "folder": lambda path, folds, seed, options: load_folder(path, folds, seed, options.group_pattern),
    "labelme": lambda path, folds, seed, options: load_labelme(
        path, folds, seed, options.group_pattern, options.labelme),
}
SOURCE_KINDS = tuple(_LOADERS)
# Kinds whose groups the layout itself gives, so prepare.group_pattern would contradict it.
_OWN_GROUPS = {
    "kolektorsdd": "its items are the kosNN folders",
    "kolektorsdd2": "its official split fixes the folds",
}


def load_source(
    kind: str, path: str | Path | None, folds: int, seed: int, options: LoadOptions | None = None
) -> SourceSet:
    """Load a data set of the given kind (one of :data:`SOURCE_KINDS`)."""
    options = options or LoadOptions()
    if kind not in _LOADERS:
        raise DataError(f"unknown data set kind {kind!r}; choose one of {', '.join(SOURCE_KINDS)}")
    if not path:
        raise DataError(f"data set kind {kind!r} needs a path (prepare.path in params.yaml): see docs/datasets.md")
    if options.group_pattern and kind in _OWN_GROUPS:
        raise DataError(
            f"prepare.group_pattern does not apply to dataset {kind!r}: {_OWN_GROUPS[kind]}; "
            "remove prepare.group_pattern"
        )
    return _LOADERS[kind](path, folds, seed, options)


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
