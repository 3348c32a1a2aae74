"""Data set kind labelme and prepare.group_pattern: files written here, and the real BSData where present."""

from __future__ import annotations

import base64
import io
import json
import shlex
import shutil
import typing
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from test_datasets import raises_naming

from pipeline.config import ConfigError, LabelmeParams, PrepareParams, parse_section
from pipeline.core.artifacts import read_json
from pipeline.core.errors import DataError
from pipeline.data.folds import groups_from_names
from pipeline.data.images import read_gray, read_mask
from pipeline.data.sources import SOURCE_KINDS, load_source
from pipeline.data.sources.base import LoadOptions, SourceSet
from pipeline.data.sources.folder import load_folder
from pipeline.data.sources.labelme import POINT_TOLERANCE, SHAPE_TYPES, load_labelme
from pipeline.data.sources.manifest import load_manifest
from pipeline.experiments import presets
from stages import prepare
from support.helpers import real_dataset

REAL_BSDATA, needs_real_bsdata = real_dataset("BSData")
W, H = 20, 12  # size of the images written here
BSDATA_PATTERN = r"^01_\d{12}_(?P<item>\d+_\d{3})_crop_\d+\."  # the type-2 positions, as docs/datasets.md shows


# --- helpers ------------------------------------------------------------------------------------


def write_image(path: Path, seed: int, shape: tuple[int, ...] = (H, W)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))
    return path


def shape(kind: str, points: list[list[float]], label: str = "scratch", **extra: object) -> dict:
    return {"label": label, "points": points, "group_id": None, "shape_type": kind, "flags": {}, **extra}


def write_annotation(
    path: Path,
    shapes: list[dict],
    image_path: str | None = None,
    width: int = W,
    height: int = H,
    image_data: str | None = None,
) -> Path:
    """A labelme 5 JSON file; imagePath defaults to the image of the same base name beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "version": "5.5.0",
        "flags": {},
        "shapes": shapes,
        "imageData": image_data,
        "imagePath": image_path if image_path is not None else f"{path.stem}.png",
        "imageHeight": height,
        "imageWidth": width,
    }
    path.write_text(json.dumps(document))
    return path


def png_base64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


SQUARE = shape("polygon", [[2, 2], [6, 2], [6, 6], [2, 6]])


def make_set(root: Path, defective: int = 3, good: int = 3) -> Path:
    """root/a0.png... with a square drawn in a JSON beside each of the first ``defective``."""
    for k in range(defective + good):
        write_image(root / f"a{k}.png", k)
        if k < defective:
            write_annotation(root / f"a{k}.json", [SQUARE])
    return root


def with_fillers(root: Path) -> Path:
    """Add y.png (defective) and z0..z3.png, so that two folds of a tiny set can be evaluated."""
    write_image(root / "y.png", 100)
    write_annotation(root / "y.json", [SQUARE])
    for k in range(4):
        write_image(root / f"z{k}.png", 101 + k)
    return root


def drawn(root: Path, name: str, **options: object) -> np.ndarray:
    """The mask of image ``name`` in the labelme set at ``root`` (fillers added)."""
    source = load_labelme(with_fillers(root), folds=2, options=LabelmeParams(**options))
    image = next(image for image in source.images if Path(image.image).name == name)
    return read_mask(image.mask, read_gray(image.image).shape, image.image)


# --- shapes -------------------------------------------------------------------------------------


def expected_pixels(kind: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(inside, outside) pixels (row, column) of each test shape in one_shape_each()."""
    return {
        "polygon": ([(3, 3), (8, 3), (5, 4)], [(3, 8), (1, 5), (10, 5)]),  # triangle (2,2) (2,9) (9,9) in x, y
        "rectangle": ([(3, 2), (6, 5), (4, 4)], [(2, 2), (7, 5), (3, 6)]),
        "circle": ([(6, 10), (6, 13), (3, 10)], [(6, 14), (2, 10), (2, 13)]),
        "line": ([(5, 3), (4, 10), (6, 16)], [(2, 10), (8, 10)]),
        "linestrip": ([(2, 3), (2, 10), (8, 10)], [(8, 3), (5, 16)]),
        "point": ([(6, 10), (6, 12), (4, 10)], [(6, 13), (3, 10), (0, 0)]),
        "mask": ([(4, 3), (5, 6)], [(4, 4), (5, 5), (3, 3), (6, 6)]),
    }[kind]


def one_shape_each() -> dict[str, dict]:
    box = np.array([[255, 0, 0, 255], [0, 0, 0, 255]], np.uint8)  # 4x2 box from (3, 4) to (6, 5)
    return {
        "polygon": shape("polygon", [[2, 2], [2, 9], [9, 9]]),
        "rectangle": shape("rectangle", [[5, 6], [2, 3]]),  # corners in either order
        "circle": shape("circle", [[10, 6], [13, 6]]),  # centre and a point on the circle: radius 3
        "line": shape("line", [[2, 5], [17, 5]]),
        "linestrip": shape("linestrip", [[3, 2], [10, 2], [10, 9]]),
        "point": shape("point", [[10, 6]]),
        "mask": shape("mask", [[3, 4], [6, 5]], mask=png_base64(box)),
    }


@pytest.mark.parametrize("kind", SHAPE_TYPES)
def test_each_shape_type_is_drawn_at_the_image_size(tmp_path: Path, kind: str) -> None:
    write_image(tmp_path / "a.png", 0)
    write_annotation(tmp_path / "a.json", [one_shape_each()[kind]])
    write_image(tmp_path / "b.png", 1)
    mask = drawn(tmp_path, "a.png", line_width=3, point_radius=2)
    assert mask.shape == (H, W) and mask.dtype == bool
    inside, outside = expected_pixels(kind)
    assert all(mask[p] for p in inside), [p for p in inside if not mask[p]]
    assert not any(mask[p] for p in outside), [p for p in outside if mask[p]]


def test_rectangle_is_exact_and_shapes_add_up(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", 0)
    shapes = [shape("rectangle", [[2, 3], [5, 6]]), shape("rectangle", [[10, 1], [12, 2]])]
    write_annotation(tmp_path / "a.json", shapes)
    write_image(tmp_path / "b.png", 1)
    expected = np.zeros((H, W), bool)
    expected[3:7, 2:6] = expected[1:3, 10:13] = True  # labelme draws both corners' pixels
    np.testing.assert_array_equal(drawn(tmp_path, "a.png"), expected)


def test_line_width_and_point_radius_are_params(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", 0)
    write_annotation(tmp_path / "a.json", [shape("line", [[2, 6], [17, 6]]), shape("point", [[10, 2]])])
    write_image(tmp_path / "b.png", 1)
    thin = drawn(tmp_path, "a.png", line_width=1, point_radius=1)
    wide = drawn(tmp_path, "a.png", line_width=5, point_radius=3)
    assert thin[:, 5].sum() == 1 and wide[:, 5].sum() == 5  # the line's column where the point is not
    assert thin[:5, 10].sum() == 3 and wide[:6, 10].sum() == 6  # the point's column, above the line


def test_embedded_and_null_image_data_give_the_same_set(tmp_path: Path) -> None:
    for folder, embed in (("null", False), ("embedded", True)):
        image = write_image(tmp_path / folder / "a.png", 0)
        data = base64.b64encode(image.read_bytes()).decode() if embed else None
        write_annotation(tmp_path / folder / "a.json", [SQUARE], image_data=data)
        write_image(tmp_path / folder / "b.png", 1)
    null, embedded = (load_labelme(with_fillers(tmp_path / f), folds=2) for f in ("null", "embedded"))
    assert [(im.id, im.label, im.fold) for im in null.images] == [(im.id, im.label, im.fold) for im in embedded.images]
    assert [im.label for im in null.images][:2] == [1, 0]
    np.testing.assert_array_equal(drawn(tmp_path / "null", "a.png"), drawn(tmp_path / "embedded", "a.png"))


def test_labels_masks_and_images_without_annotation(tmp_path: Path) -> None:
    make_set(tmp_path, defective=2, good=2)
    write_annotation(tmp_path / "a3.json", [])  # annotated, but nothing drawn: defect-free
    source = load_labelme(tmp_path, folds=2)
    assert [(im.id, im.label, im.mask is not None) for im in source.images] == [
        ("a0", 1, True),
        ("a1", 1, True),
        ("a2", 0, False),
        ("a3", 0, True),
    ]
    assert source.name == "labelme" and str(source.images[0].mask) == str(tmp_path / "a0.json")
    assert not drawn(tmp_path, "a3.png").any()
    assert drawn(tmp_path, "a0.png").sum() == 25  # the 5x5 square, outline included


def test_defect_labels_param(tmp_path: Path) -> None:
    make_set(tmp_path, defective=3, good=4)
    write_annotation(tmp_path / "a1.json", [shape("rectangle", [[1, 1], [3, 3]], label="dust")])
    write_annotation(tmp_path / "a2.json", [SQUARE, shape("rectangle", [[10, 1], [12, 3]], label="dust")])
    every = load_labelme(tmp_path, folds=2)
    assert [im.label for im in every.images] == [1, 1, 1, 0, 0, 0, 0]
    scratches = load_labelme(tmp_path, folds=2, options=LabelmeParams(defect_labels=["scratch"]))
    assert [im.label for im in scratches.images] == [1, 0, 1, 0, 0, 0, 0]
    mask = drawn(tmp_path, "a2.png", defect_labels=["scratch"])
    assert mask.sum() == 25 and not mask[1:4, 10:13].any()  # the dust is not drawn
    with raises_naming(tmp_path, "'Scratch'", "'scratch'", "case-sensitive"):
        load_labelme(tmp_path, folds=2, options=LabelmeParams(defect_labels=["Scratch"]))


# --- where the annotations are, and imagePath ---------------------------------------------------


def test_annotations_in_a_folder_of_their_own(tmp_path: Path) -> None:
    for k in range(6):
        write_image(tmp_path / "images" / f"p{k}.jpg", k)
    write_annotation(tmp_path / "labels" / "p0.json", [SQUARE], image_path="../images/p0.jpg")  # labelme's way
    write_annotation(tmp_path / "labels" / "p1.json", [SQUARE], image_path="p1.jpg")  # moved there (BSData)
    write_annotation(tmp_path / "labels" / "renamed.json", [SQUARE], image_path="..\\images\\p2.jpg")  # Windows
    options = LabelmeParams(images="images", annotations="labels")
    source = load_source("labelme", tmp_path, 2, 0, LoadOptions(labelme=options))
    assert [(im.id, im.label) for im in source.images] == [("p0", 1), ("p1", 1), ("p2", 1)] + [
        (f"p{k}", 0) for k in (3, 4, 5)
    ]
    assert str(source.images[2].mask) == str(tmp_path / "labels" / "renamed.json")
    assert source.root == str(tmp_path / "images")


def test_image_path_names_the_image_even_under_another_base_name(tmp_path: Path) -> None:
    make_set(tmp_path, defective=1, good=3)
    write_annotation(tmp_path / "copy_of_a2.json", [SQUARE], image_path="a2.png")
    assert [im.label for im in load_labelme(tmp_path, folds=2).images] == [1, 0, 1, 0]


def test_images_in_subfolders_are_not_read(tmp_path: Path) -> None:
    make_set(tmp_path)
    write_image(tmp_path / "old" / "a0.png", 0)  # as BSData's data/BSD/test/ holds a copy
    assert len(load_labelme(tmp_path, folds=2).images) == 6


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content", ["{not json", "", "[1, 2]", '{"version": "5.5.0"}'], ids=["garbage", "empty", "a list", "no shapes"]
)
def test_unreadable_annotation(tmp_path: Path, content: str) -> None:
    make_set(tmp_path)
    (tmp_path / "a4.json").write_text(content)
    with raises_naming(tmp_path / "a4.json"):
        load_labelme(tmp_path, folds=2)


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        (shape("ellipse", [[2, 2], [5, 5]]), "unknown shape_type 'ellipse'"),
        (shape("polygon", [[2, 2], [5, 5]]), "at least 3 points, it has 2"),
        (shape("rectangle", [[2, 2]]), "exactly 2 points, it has 1"),
        (shape("circle", [[2, 2], [3, 3], [4, 4]]), "exactly 2 points, it has 3"),
        (shape("point", []), "exactly 1 point, it has 0"),
        (shape("polygon", [[2, 2], [5, "x"], [5, 5]]), "not a list of [x, y] numbers"),
        (shape("polygon", [[2, 2], [W - 0.4, 5], [5, 5]]), f"({W - 0.4:g}, 5) lies outside"),
        (shape("point", [[3, -0.6]]), "(3, -0.6) lies outside"),
        (shape("mask", [[3, 4], [6, 5]], mask=png_base64(np.ones((3, 3), np.uint8))), "its mask is 3x3"),
        ({"points": [[1, 1]], "shape_type": "point"}, "no text label"),
    ],
    ids=[
        "unknown type",
        "polygon of 2",
        "rectangle of 1",
        "circle of 3",
        "point of 0",
        "not numbers",
        "outside right",
        "outside top",
        "mask size",
        "no label",
    ],
)
def test_bad_shape_names_the_file_and_shape(tmp_path: Path, bad: dict, expected: str) -> None:
    make_set(tmp_path)
    write_annotation(tmp_path / "a4.json", [SQUARE, bad])
    with raises_naming(tmp_path / "a4.json", "shape 1", expected):
        source = load_labelme(tmp_path, folds=2)
        image = source.images[4]
        read_mask(image.mask, (H, W), image.image)  # a mask's PNG is checked when it is drawn


def test_points_within_half_a_pixel_of_the_pixel_grid_are_accepted(tmp_path: Path) -> None:
    assert POINT_TOLERANCE == 0.5
    make_set(tmp_path)
    edge = shape("rectangle", [[-0.5, -0.5], [W - 0.5, H - 0.5]])
    write_annotation(tmp_path / "a4.json", [edge])
    assert drawn(tmp_path, "a4.png").all()


def test_size_mismatch_names_annotation_and_image(tmp_path: Path) -> None:
    make_set(tmp_path)
    write_annotation(tmp_path / "a0.json", [SQUARE], width=W + 1)
    image = load_labelme(tmp_path, folds=2).images[0]
    with raises_naming(tmp_path / "a0.json", tmp_path / "a0.png", f"{W + 1}x{H}", f"is {W}x{H}"):
        read_mask(image.mask, read_gray(image.image).shape, image.image)


def test_embedded_image_data_of_another_size(tmp_path: Path) -> None:
    make_set(tmp_path)
    other = write_image(tmp_path / "elsewhere" / "big.png", 9, (H + 2, W))
    write_annotation(tmp_path / "a0.json", [SQUARE], image_data=base64.b64encode(other.read_bytes()).decode())
    with raises_naming(tmp_path / "a0.json", f"{W}x{H + 2}", "imageData"):
        load_labelme(tmp_path, folds=2)


def test_annotation_whose_image_is_missing(tmp_path: Path) -> None:
    make_set(tmp_path)
    write_annotation(tmp_path / "gone.json", [SQUARE])
    with raises_naming(tmp_path / "gone.json", "image is missing", tmp_path / "gone.png"):
        load_labelme(tmp_path, folds=2)


def test_two_annotations_of_one_image(tmp_path: Path) -> None:
    make_set(tmp_path)
    write_annotation(tmp_path / "second.json", [SQUARE], image_path="a0.png")
    with raises_naming(tmp_path / "a0.json", tmp_path / "second.json", "both annotate"):
        load_labelme(tmp_path, folds=2)


def test_image_path_outside_the_images_folder(tmp_path: Path) -> None:
    make_set(tmp_path / "set")
    write_image(tmp_path / "other.png", 7)
    write_annotation(tmp_path / "set" / "a0.json", [SQUARE], image_path="../other.png")
    with raises_naming(tmp_path / "set" / "a0.json", "not among the images"):
        load_labelme(tmp_path / "set", folds=2)


def test_missing_folders_are_named(tmp_path: Path) -> None:
    make_set(tmp_path)
    with raises_naming(tmp_path / "labels", "prepare.labelme.annotations"):
        load_labelme(tmp_path, folds=2, options=LabelmeParams(annotations="labels"))
    with raises_naming(tmp_path / "nowhere"):
        load_labelme(tmp_path / "nowhere")


# --- item groups from file names ----------------------------------------------------------------


BSDATA_LIKE = [
    "01_200828110014_277500_315_crop_2.jpg",
    "01_200905041126_277500_315_crop_2.jpg",
    "01_200828110055_305000_090_crop_2.jpg",
    "01_200907090023_305000_090_crop_1.jpg",
    "01_200828110135_332500_225_crop_2.jpg",
    "01_200906072940_332500_225_crop_2.jpg",
]


def test_group_pattern_named_group_or_whole_match() -> None:
    refs = [f"/data/{name}" for name in BSDATA_LIKE]
    assert groups_from_names(BSDATA_PATTERN, refs) == ["277500_315"] * 2 + ["305000_090"] * 2 + ["332500_225"] * 2
    assert groups_from_names(r"\d+_\d{3}(?=_crop)", refs[:3]) == ["277500_315", "277500_315", "305000_090"]
    assert groups_from_names(r"^[^_]+", ["/z/archive.zip::lot7_a.png"]) == ["lot7"]  # a zip member's own name


def test_a_name_the_group_pattern_does_not_match_is_an_error_naming_the_file() -> None:
    with raises_naming("/data/KGT1-S-060-A02_crop_0.jpg", BSDATA_PATTERN, "does not match"):
        groups_from_names(BSDATA_PATTERN, ["/data/" + BSDATA_LIKE[0], "/data/KGT1-S-060-A02_crop_0.jpg"])
    with raises_naming("/data/b.png", "empty"):
        groups_from_names(r"(?P<item>x*)", ["/data/b.png"])


def test_an_alternative_makes_an_unmatched_name_its_own_group() -> None:
    pattern = BSDATA_PATTERN + "|.*"
    assert groups_from_names(pattern, ["/d/" + BSDATA_LIKE[0], "/d/KGT1-S-060-A02_crop_0.jpg"]) == [
        "277500_315",
        "KGT1-S-060-A02_crop_0.jpg",
    ]


def folds_of_groups(source: SourceSet) -> dict[str, set[int]]:
    folds: dict[str, set[int]] = defaultdict(set)
    for image in source.images:
        folds[image.group].add(image.fold)
    return folds


def test_labelme_groups_from_names_keep_each_position_in_one_fold(tmp_path: Path) -> None:
    for k, name in enumerate(BSDATA_LIKE):
        write_image(tmp_path / name, k)
        if k % 2:  # the later image of each position is pitted
            write_annotation(tmp_path / name.replace(".jpg", ".json"), [SQUARE], image_path=name)
    source = load_labelme(tmp_path, folds=3, group_pattern=BSDATA_PATTERN)
    groups = folds_of_groups(source)
    assert sorted(groups) == ["277500_315", "305000_090", "332500_225"]
    assert all(len(folds) == 1 for folds in groups.values())
    assert sorted(fold for folds in groups.values() for fold in folds) == [0, 1, 2]


def test_folder_and_manifest_take_the_group_pattern(tmp_path: Path) -> None:
    for k in range(8):
        write_image(tmp_path / "parts" / ("defect" if k % 2 else "good") / f"lot{k // 2}_{k}.png", k)
    source = load_folder(tmp_path / "parts", folds=2, group_pattern=r"^lot\d+")
    assert Counter(im.group for im in source.images) == {"lot0": 2, "lot1": 2, "lot2": 2, "lot3": 2}
    assert all(len(folds) == 1 for folds in folds_of_groups(source).values())
    rows = [f"parts/{'defect' if k % 2 else 'good'}/lot{k // 2}_{k}.png,{k % 2}" for k in range(8)]
    (tmp_path / "manifest.csv").write_text("\n".join(["image,label", *rows]) + "\n")
    manifest = load_manifest(tmp_path / "manifest.csv", folds=2, group_pattern=r"^lot\d+")
    assert [im.group for im in manifest.images] == [f"lot{k // 2}" for k in range(8)]


def test_group_pattern_is_refused_where_the_layout_gives_groups(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", 0)
    (tmp_path / "manifest.csv").write_text("image,label,group\na.png,1,x\n")
    with raises_naming(tmp_path / "manifest.csv", "group column", "prepare.group_pattern"):
        load_manifest(tmp_path / "manifest.csv", group_pattern=".*")
    for kind in ("kolektorsdd", "kolektorsdd2"):
        with raises_naming(kind, "prepare.group_pattern does not apply"):
            load_source(kind, tmp_path, 3, 0, LoadOptions(group_pattern=".*"))


def test_group_pattern_params_are_checked() -> None:
    with pytest.raises(ConfigError, match="prepare.group_pattern: .*not a valid regular expression"):
        parse_section("prepare", {"dataset": "labelme", "path": "x", "group_pattern": "(unclosed"})
    with pytest.raises(ConfigError, match="prepare.group_pattern: is empty; use null"):
        parse_section("prepare", {"dataset": "folder", "path": "x", "group_pattern": ""})
    with pytest.raises(ConfigError, match="does not apply to dataset 'synthetic'"):
        parse_section("prepare", {"group_pattern": ".*"})
    with pytest.raises(ConfigError, match="prepare.labelme.defect_labels"):
        parse_section("prepare", {"dataset": "labelme", "path": "x", "labelme": {"defect_labels": []}})


def test_config_lists_every_loader_kind() -> None:
    dataset = PrepareParams.model_fields["dataset"].annotation
    assert typing.get_args(dataset) == ("synthetic", *SOURCE_KINDS)


# --- the prepare stage --------------------------------------------------------------------------


def write_params(folder: Path, **prepare_params: object) -> None:
    (folder / "params.yaml").write_text(yaml.safe_dump({"prepare": prepare_params}))


def test_prepare_draws_labelme_masks_reads_rgb_of_any_size_and_reports_groups(workdir: Path) -> None:
    root = workdir / "shots"
    for k in range(8):  # two positions per lot; RGB images of two sizes, as BSData has
        size = (H, W, 3) if k % 2 else (2 * H, 2 * W, 3)
        write_image(root / "images" / f"lot{k // 2}_{k}.jpg", k, size)
        if k % 2:
            rectangle = shape("rectangle", [[0, 0], [size[1] / 2 - 1, size[0] - 1]])  # the left half
            write_annotation(root / "labels" / f"lot{k // 2}_{k}.json", [rectangle], width=size[1], height=size[0])
    write_params(
        workdir,
        dataset="labelme",
        path="shots",
        width=W,
        height=16,
        folds=2,
        group_pattern=r"^lot\d",
        labelme={"images": "images", "annotations": "labels"},
    )
    prepare.main()
    index = pd.read_csv(workdir / "data/prepared/index.csv")
    assert len(index) == 8 and index["label"].sum() == 4 and index["has_mask"].sum() == 4
    assert index.groupby("group")["fold"].nunique().max() == 1
    for id_ in index["id"]:
        image = cv2.imread(str(workdir / f"data/prepared/images/{id_}.png"), cv2.IMREAD_UNCHANGED)
        assert image.shape == (16, W)  # gray, at the prepared size
    mask = cv2.imread(str(workdir / "data/prepared/masks/lot0_1.png"), cv2.IMREAD_UNCHANGED) > 0
    assert mask[:, : W // 2].all() and not mask[:, W // 2 :].any()
    report = read_json(workdir / "data/prepared/report.json")
    assert report["groups"] == {
        f"lot{n}": {"images": 2, "defective": 1, "fold": int(index.loc[index["group"] == f"lot{n}", "fold"].iloc[0])}
        for n in range(4)
    }
    assert report["sizes"]["source_width"] == {"min": W, "max": 2 * W, "mean": 1.5 * W}


def test_prepare_refuses_groups_that_leave_a_fold_without_a_defective_image(workdir: Path) -> None:
    root = workdir / "shots"
    for k in range(9):  # three lots, only two of them with a defect
        write_image(root / f"lot{k // 3}_{k}.png", k)
    for k in (0, 3):
        write_annotation(root / f"lot{k // 3}_{k}.json", [SQUARE])
    write_params(workdir, dataset="labelme", path="shots", width=16, height=16, folds=3, group_pattern=r"^lot\d")
    with pytest.raises(DataError, match="fold 2 of .*shots has no defective image"):
        prepare.main()
    write_params(workdir, dataset="labelme", path="shots", width=16, height=16, folds=2, group_pattern=r"^lot\d")
    prepare.main()  # two folds: one defective lot each


# --- the real BSData ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bsdata_params() -> PrepareParams:
    """The cpu-bsdata preset's prepare section, with the path from this test file."""
    section = presets.load_preset("cpu-bsdata")["prepare"]
    return typing.cast(PrepareParams, parse_section("prepare", {**section, "path": str(REAL_BSDATA)}))


@pytest.fixture(scope="module")
def real_bsdata(bsdata_params: PrepareParams) -> SourceSet:
    options = LoadOptions(bsdata_params.group_pattern, bsdata_params.labelme)
    return load_source("labelme", bsdata_params.path, bsdata_params.folds, bsdata_params.seed, options)


@pytest.mark.realdata
@needs_real_bsdata
def test_real_bsdata_counts_groups_and_folds(real_bsdata: SourceSet) -> None:
    assert len(real_bsdata.images) == 1104
    assert sum(image.label for image in real_bsdata.images) == 394
    assert sum(image.mask is not None for image in real_bsdata.images) == 394
    groups = folds_of_groups(real_bsdata)
    positions = Counter(image.group for image in real_bsdata.images if image.id.startswith("01_"))
    assert len(positions) == 15 and sum(positions.values()) == 1035
    assert all(len(folds) == 1 for folds in groups.values())
    assert {image.fold for image in real_bsdata.images} == {0, 1, 2}
    # Crops of one type-1 photograph are one item: 69 images of 61 photographs.
    assert len(groups) - len(positions) == 61


@pytest.mark.realdata
@needs_real_bsdata
def test_real_bsdata_masks_match_their_images(real_bsdata: SourceSet) -> None:
    sizes = Counter()
    for image in real_bsdata.images:
        with Image.open(image.image) as opened:  # the header's size: decoding 1,104 JPEGs takes long
            width, height = opened.size
        sizes[(width, height)] += 1
        if image.mask is not None:
            assert read_mask(image.mask, (height, width), image.image).any(), image.mask
    assert sizes.most_common(2)[0][0] in {(1130, 460), (1540, 645)}
    first = read_gray(real_bsdata.images[0].image)  # RGB on disk, gray here
    assert first.ndim == 2 and first.dtype == np.uint8


def test_cpu_bsdata_preset_survives_dvc_exp_run_set_params(tmp_path: Path) -> None:
    from dvc.utils.hydra import apply_overrides  # what `dvc exp run -S` does to params.yaml

    params = tmp_path / "params.yaml"
    shutil.copy(Path(__file__).parents[1] / "params.yaml", params)
    command = shlex.split(presets.exp_run_command("cpu-bsdata", params_path=params))
    apply_overrides(str(params), [arg for arg in command[5:] if arg != "-S"])
    prepared = yaml.safe_load(params.read_text())["prepare"]
    assert prepared["group_pattern"] == presets.load_preset("cpu-bsdata")["prepare"]["group_pattern"]
    assert prepared["labelme"]["annotations"] == "label" and (prepared["width"], prepared["height"]) == (272, 112)
