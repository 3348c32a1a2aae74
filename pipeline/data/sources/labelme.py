"""The labelme kind: images with labelme annotation files, read and checked, their shapes drawn as masks.

One JSON file per image (labelme 4 and 5), whose ``shapes`` are drawn into the true mask at the
image's size the way labelme's own ``labelme_json_to_dataset`` draws them (Pillow's ImageDraw, with
labelme's line width and point size as defaults). The data set kind built on this is
:func:`load_labelme`; ``docs/datasets.md`` describes the layout and the checks.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, cast

import numpy as np
from PIL import Image, ImageDraw
from pydantic import Field

from pipeline.core.errors import DataError
from pipeline.core.sections import Section
from pipeline.data.folds import grouped_folds, image_groups
from pipeline.data.images import IMAGE_EXTENSIONS, find_duplicates
from pipeline.data.sources.base import SourceImage, SourceKind, SourceSet, id_from_path, natural_key, validate

# The shape types and the points each needs: (fewest, most); None = no upper bound.
_POINTS: dict[str, tuple[int, int | None]] = {
    "polygon": (3, None),
    "rectangle": (2, 2),
    "circle": (2, 2),
    "line": (2, 2),
    "linestrip": (2, None),
    "point": (1, 1),
    "mask": (2, 2),
}
SHAPE_TYPES = tuple(_POINTS)
# labelme's canvas keeps points on 0..W-1 (pixel centres at integers); half a pixel more on each side
# is the outer edge of the border pixels, where converters from other tools put box corners.
POINT_TOLERANCE = 0.5


class LabelmeParams(Section):
    """Dataset labelme (docs/datasets.md): images with labelme JSON annotations."""

    images: str = Field(".", description="folder of the images, relative to prepare.path")
    annotations: str | None = Field(
        None, description="folder of the JSON files, relative to prepare.path; null = beside the images"
    )
    defect_labels: Annotated[list[str], Field(min_length=1)] | None = Field(
        None, description="shape labels that count as defect; null = every label"
    )
    # labelme's own defaults (labelme.utils.shape_to_mask), in pixels of the source image.
    line_width: int = Field(10, ge=1, le=1000, description="width of line and linestrip shapes")
    point_radius: int = Field(5, ge=1, le=1000, description="radius of point shapes")


@dataclass(frozen=True)
class Shape:
    label: str
    kind: str  # one of SHAPE_TYPES
    points: tuple[tuple[float, float], ...]
    mask: bytes | None = None  # kind "mask": the PNG of the box's pixels, as labelme 5 stores it


@dataclass(frozen=True)
class Annotation:
    """One labelme JSON file, checked."""

    file: str  # the JSON file
    width: int  # imageWidth
    height: int  # imageHeight
    image_path: str  # imagePath as written ("" when absent)
    shapes: tuple[Shape, ...]

    def labels(self) -> set[str]:
        return {shape.label for shape in self.shapes}


def read_annotation(path: str | Path) -> Annotation:
    """Parse and check one labelme JSON file; DataError naming the file on anything wrong."""
    try:
        data = json.loads(Path(path).read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read labelme annotation {path} ({exc}); re-save it in labelme or remove it") from exc
    if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
        raise DataError(f"{path} is not a labelme annotation (no list of 'shapes'); remove it from the folder")
    width, height = (_positive_int(data, key, path) for key in ("imageWidth", "imageHeight"))
    _check_image_data(data.get("imageData"), width, height, path)
    image_path = data.get("imagePath") or ""
    if not isinstance(image_path, str):
        raise DataError(f"{path}: imagePath {image_path!r} is not text; re-save the annotation in labelme")
    shapes = tuple(_shape(raw, number, width, height, path) for number, raw in enumerate(data["shapes"]))
    return Annotation(str(path), width, height, image_path, shapes)


def _positive_int(data: dict, key: str, path: str | Path) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"{path}: {key} is {value!r}, not a positive integer; re-save the annotation in labelme")
    return value


def _check_image_data(image_data: object, width: int, height: int, path: str | Path) -> None:
    """Embedded image data (labelme's default) must be an image of the annotation's size; null is fine."""
    if image_data is None:
        return
    try:
        with Image.open(io.BytesIO(base64.b64decode(str(image_data), validate=True))) as embedded:
            size = embedded.size
    except (binascii.Error, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"{path}: imageData is not a base64 image ({exc}); re-save the annotation in labelme, "
            "or set imageData to null"
        ) from exc
    if size != (width, height):
        raise DataError(
            f"{path}: its embedded imageData is {size[0]}x{size[1]} but imageWidth x imageHeight say "
            f"{width}x{height}; re-save the annotation in labelme"
        )


def _shape(raw: object, number: int, width: int, height: int, path: str | Path) -> Shape:
    """One checked shape; ``number`` counts from 0 in the file's order, as messages name it."""
    where = f"{path}: shape {number}"
    if not isinstance(raw, dict) or not isinstance(raw.get("label"), str):
        raise DataError(f"{where} has no text label; fix it in labelme")
    where += f" ({raw['label']!r})"
    kind = raw.get("shape_type") or "polygon"  # labelme's default for files that omit it
    if kind not in SHAPE_TYPES:
        raise DataError(f"{where} has unknown shape_type {kind!r}; known: {', '.join(SHAPE_TYPES)}")
    points = _points(raw.get("points"), where)
    fewest, most = _POINTS[kind]
    if len(points) < fewest or (most is not None and len(points) > most):
        wanted = f"at least {fewest}" if most is None else f"exactly {fewest}"
        plural = "" if fewest == 1 else "s"
        raise DataError(f"{where}: a {kind} needs {wanted} point{plural}, it has {len(points)}; redraw it in labelme")
    for x, y in points:
        if not (
            -POINT_TOLERANCE <= x <= width - 1 + POINT_TOLERANCE
            and -POINT_TOLERANCE <= y <= height - 1 + POINT_TOLERANCE
        ):
            raise DataError(
                f"{where}: point ({x:g}, {y:g}) lies outside the {width}x{height} image (pixels 0..{width - 1}, "
                f"0..{height - 1}, give or take {POINT_TOLERANCE}); move it inside in labelme"
            )
    mask = _mask_png(raw.get("mask"), where) if kind == "mask" else None
    return Shape(raw["label"], kind, points, mask)


def _points(raw: object, where: str) -> tuple[tuple[float, float], ...]:
    try:
        # Not iterable or not pairs: the TypeError/ValueError below reports it.
        points = tuple((float(x), float(y)) for x, y in cast("Iterable[Any]", raw))
    except (TypeError, ValueError):
        raise DataError(f"{where}: points {raw!r} are not a list of [x, y] numbers; fix it in labelme") from None
    if not all(math.isfinite(c) for point in points for c in point):
        raise DataError(f"{where}: points {raw!r} are not all finite numbers; fix it in labelme")
    return points


def _mask_png(raw: object, where: str) -> bytes:
    try:
        return base64.b64decode(str(raw), validate=True) if raw else b""
    except binascii.Error as exc:
        raise DataError(f"{where}: its mask is not base64 ({exc}); redraw the mask in labelme") from exc


# --- pairing annotations with images ------------------------------------------------------------


def image_of(annotation: Annotation, images: dict[str, str], by_stem: dict[str, str], folder: str) -> str:
    """The image an annotation belongs to, one of ``images`` (real path -> image file).

    labelme opens ``imagePath`` relative to the JSON file's folder; where that file does not exist
    (annotations moved to a folder of their own, as in BSData), the image of the JSON file's base
    name in ``folder`` (``by_stem``: base name -> image file) is taken.
    """
    candidate = None
    if annotation.image_path:
        # Annotations saved on Windows write backslashes.
        candidate = Path(annotation.file).parent / annotation.image_path.replace("\\", "/")
        if candidate.is_file():
            real = os.path.realpath(candidate)
            if real not in images:
                raise DataError(
                    f"{annotation.file}: its imagePath is {candidate}, which is not among the images in {folder}; "
                    "move the image there or correct imagePath"
                )
            return images[real]
    stem = Path(annotation.file).stem
    if stem in by_stem:
        return by_stem[stem]
    tried = f"neither {candidate} (its imagePath, relative to the annotation's folder) nor" if candidate else "no"
    raise DataError(
        f"{annotation.file}: its image is missing: {tried} image named {stem}.* in {folder} exists; "
        "add the image or remove the annotation"
    )


def annotations_by_image(folder: Path, image_folder: Path, images: list[Path]) -> dict[str, Annotation]:
    """Image file -> its annotation, for every JSON file directly in ``folder``; each image at most once."""
    by_real = {os.path.realpath(image): str(image) for image in images}
    by_stem: dict[str, str] = {}
    for image in images:
        if image.stem in by_stem:
            raise DataError(
                f"{by_stem[image.stem]} and {image} share the base name {image.stem!r}, so an annotation "
                f"{image.stem}.json could be either's; rename one"
            )
        by_stem[image.stem] = str(image)
    annotated: dict[str, Annotation] = {}
    for file in sorted(folder.iterdir()):
        if not (file.is_file() and file.suffix.lower() == ".json"):
            continue
        annotation = read_annotation(file)
        annotated_image = image_of(annotation, by_real, by_stem, str(image_folder))
        if annotated_image in annotated:
            raise DataError(
                f"{annotated[annotated_image].file} and {file} both annotate {annotated_image}; keep one of them"
            )
        annotated[annotated_image] = annotation
    return annotated


def defect_label_set(wanted: list[str] | None, annotations: list[Annotation], folder: Path) -> frozenset[str] | None:
    """The labels that count as defect (None = every label); each one named must occur somewhere."""
    if wanted is None:
        return None
    found = set().union(*(annotation.labels() for annotation in annotations))
    unused = sorted(set(wanted) - found)
    if unused:
        raise DataError(
            f"prepare.labelme.defect_labels names {', '.join(map(repr, unused))}, which no annotation in {folder} "
            f"uses (labels found: {', '.join(map(repr, sorted(found))) or 'none'}); labels are case-sensitive"
        )
    return frozenset(wanted)


# --- drawing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelmeMask:
    """A true mask drawn from an annotation's defect shapes (a ``pipeline.data.images.MaskSource``)."""

    annotation: Annotation
    defect_labels: frozenset[str] | None  # None = every label
    line_width: int = 10
    point_radius: int = 5

    def __str__(self) -> str:
        return self.annotation.file

    def is_defect(self, shape: Shape) -> bool:
        return self.defect_labels is None or shape.label in self.defect_labels

    def defect_shapes(self) -> list[Shape]:
        return [shape for shape in self.annotation.shapes if self.is_defect(shape)]

    def draw(self, shape: tuple[int, int], image: str | None = None) -> np.ndarray:
        """The mask as bool ``shape`` (height, width), which must be the annotation's image size."""
        annotation = self.annotation
        if tuple(shape) != (annotation.height, annotation.width):
            raise DataError(
                f"{annotation.file} is for a {annotation.width}x{annotation.height} image (imageWidth x imageHeight) "
                f"but its image {image or ''} is {shape[1]}x{shape[0]}; re-annotate the image as it is now in labelme"
            )
        canvas = Image.new("L", (annotation.width, annotation.height), 0)
        pen = ImageDraw.Draw(canvas)
        for number, item in enumerate(annotation.shapes):  # numbered in the file's order, as messages say
            if not self.is_defect(item):
                continue
            if item.kind == "mask":
                _paste_mask(canvas, item, f"{annotation.file}: mask shape {number} ({item.label!r})")
            else:
                _draw(pen, item, self.line_width, self.point_radius)
        return np.asarray(canvas) > 0


def _draw(pen: ImageDraw.ImageDraw, shape: Shape, line_width: int, point_radius: int) -> None:
    """One shape as labelme.utils.shape_to_mask draws it (outline included)."""
    xy = list(shape.points)
    if shape.kind == "polygon":
        pen.polygon(xy, fill=1, outline=1)
    elif shape.kind == "rectangle":
        (x0, y0), (x1, y1) = xy
        pen.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], fill=1, outline=1)
    elif shape.kind == "circle":
        (cx, cy), (px, py) = xy
        r = math.hypot(cx - px, cy - py)
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1, outline=1)
    elif shape.kind in ("line", "linestrip"):
        pen.line(xy, fill=1, width=line_width)
    elif shape.kind == "point":
        ((cx, cy),) = xy
        pen.ellipse([cx - point_radius, cy - point_radius, cx + point_radius, cy + point_radius], fill=1, outline=1)
    else:  # every kind _shape accepts is drawn above or pasted
        raise AssertionError(shape.kind)


def _paste_mask(canvas: Image.Image, shape: Shape, where: str) -> None:
    """labelme 5's mask shape: a PNG of the box from the first point to the second, both included."""
    try:
        with Image.open(io.BytesIO(shape.mask or b"")) as png:
            pixels = np.asarray(png.convert("L")) > 0
    except (OSError, ValueError) as exc:
        raise DataError(f"{where}: its mask is not a PNG image ({exc}); redraw the mask in labelme") from exc
    (x0, y0), (x1, y1) = (tuple(int(c) for c in point) for point in shape.points)
    box = (y1 - y0 + 1, x1 - x0 + 1)
    if pixels.shape != box:
        raise DataError(
            f"{where}: its mask is {pixels.shape[1]}x{pixels.shape[0]} but its box from ({x0}, {y0}) to ({x1}, {y1}) "
            f"is {box[1]}x{box[0]}; redraw the mask in labelme"
        )
    region = np.asarray(canvas.crop((x0, y0, x1 + 1, y1 + 1))) > 0
    canvas.paste(Image.fromarray(((region | pixels) * 255).astype(np.uint8)), (x0, y0))


# --- the data set kind --------------------------------------------------------------------------


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
    path: str | Path,
    folds: int = 3,
    seed: int = 0,
    group_pattern: str | None = None,
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
    images = sorted(
        (file for file in image_folder.iterdir() if file.is_file() and file.suffix.lower() in IMAGE_EXTENSIONS),
        key=lambda file: natural_key(file.name),
    )
    if not images:
        raise DataError(f"found no images in {image_folder}; expected {_LABELME_EXPECTED}")
    annotated = annotations_by_image(annotation_folder, image_folder, images)
    defect_labels = defect_label_set(options.defect_labels, list(annotated.values()), annotation_folder)
    masks = {
        image: LabelmeMask(annotation, defect_labels, options.line_width, options.point_radius)
        for image, annotation in annotated.items()
    }
    refs = [str(image) for image in images]
    ids = [id_from_path(image.name) for image in images]
    labels = [int(ref in masks and bool(masks[ref].defect_shapes())) for ref in refs]
    duplicates = find_duplicates(dict(zip(ids, refs, strict=True)))
    groups, fold_of = grouped_folds(ids, image_groups(group_pattern, ids, refs), labels, duplicates, folds, seed)
    source = SourceSet(
        name=LABELME.name,
        images=[
            SourceImage(id_, label, group, fold, ref, masks.get(ref))
            for id_, label, group, fold, ref in zip(ids, labels, groups, fold_of, refs, strict=True)
        ],
        duplicates=duplicates,
        root=str(image_folder),
    )
    validate(source)
    return source


LABELME = SourceKind(
    "labelme",
    lambda path, folds, seed, options: load_labelme(path, folds, seed, options.group_pattern, options.labelme),
)
