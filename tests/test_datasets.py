"""Tests for pipeline.data sources, images and folds: the real KolektorSDD where present, small trees written here."""

from __future__ import annotations

import re
import shutil
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.core.errors import DataError
from pipeline.data.folds import assign_group_folds
from pipeline.data.images import find_duplicates, read_gray, read_mask
from pipeline.data.sources import load_source
from pipeline.data.sources.base import SourceImage, SourceSet, validate
from pipeline.data.sources.folder import load_folder
from pipeline.data.sources.kolektorsdd import load_kolektorsdd, load_kolektorsdd2
from pipeline.data.sources.manifest import load_manifest
from support.helpers import real_dataset

REAL_KSDD, needs_real_ksdd = real_dataset("KolektorSDD")
SHAPE = (12, 8)  # height, width of the synthetic images


# --- helpers ------------------------------------------------------------------------------------


def write_image(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return path


def noise(seed: int, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    """An image whose bytes differ for every seed, so that only deliberate copies are duplicates."""
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def mask_array(defect: bool, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    if defect:
        mask[2:5, 2:5] = 255
    return mask


def make_ksdd(root: Path, items: dict[str, list[bool]]) -> Path:
    """A KolektorSDD-like tree: items[kosNN][k] says whether PartK is defective."""
    for n, (item, parts) in enumerate(items.items()):
        for k, defect in enumerate(parts):
            write_image(root / item / f"Part{k}.jpg", noise(100 * n + k))
            write_image(root / item / f"Part{k}_label.bmp", mask_array(defect))
    return root


# Six items with one defective part each, so that three folds get two defective items each.
KSDD_ITEMS = {f"kos{n:02d}": [True, False, False] for n in range(1, 7)}


def make_ksdd2(root: Path, splits: dict[str, list[bool]]) -> Path:
    for s, (split, defects) in enumerate(splits.items()):
        for i, defect in enumerate(defects):
            write_image(root / split / f"{10000 + i}.png", noise(1000 * s + i))
            write_image(root / split / f"{10000 + i}_GT.png", mask_array(defect))
    return root


def make_folder(root: Path, good: int = 3, defect: int = 3) -> Path:
    for i in range(good):
        write_image(root / "good" / f"g{i}.png", noise(i))
    for i in range(defect):
        write_image(root / "defect" / f"d{i}.jpg", noise(500 + i))
        write_image(root / "defect" / f"d{i}_mask.png", mask_array(True))
    return root


def write_manifest(root: Path, rows: list[str], header: str = "image,label") -> Path:
    path = root / "manifest.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def manifest_images(root: Path, count: int) -> list[str]:
    """Write count images under root/img/ and return their paths relative to root."""
    return [write_image(root / "img" / f"{i}.png", noise(i)).relative_to(root).as_posix() for i in range(count)]


def raises_naming(*files: object) -> pytest.RaisesExc[DataError]:
    """pytest.raises(DataError) whose message must name every one of ``files``."""
    return pytest.raises(DataError, match="(?s)" + "".join(f"(?=.*{re.escape(str(f))})" for f in files))


def folds_of(source: SourceSet, key) -> dict[str, set[int]]:
    folds: dict[str, set[int]] = defaultdict(set)
    for image in source.images:
        folds[key(image)].add(image.fold)
    return folds


def summary(source: SourceSet) -> tuple:
    """Everything a loader decides, without the refs (which differ between folder and zip)."""
    rows = [(im.id, im.label, im.group, im.fold, im.mask is not None) for im in source.images]
    return rows, source.duplicates, source.excluded


# --- the real KolektorSDD -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_ksdd() -> SourceSet:
    return load_kolektorsdd(REAL_KSDD, folds=3, seed=0)


@pytest.mark.realdata
@needs_real_ksdd
def test_real_kolektorsdd_counts(real_ksdd: SourceSet) -> None:
    labels = Counter(image.label for image in real_ksdd.images)
    assert len(real_ksdd.images) == 399
    assert labels == {1: 52, 0: 347}
    assert list(real_ksdd.excluded) == ["kos21_Part7"]
    assert "kos21_Part6" in real_ksdd.excluded["kos21_Part7"]
    assert "kos21_Part7" not in {image.id for image in real_ksdd.images}
    assert all(image.mask is not None for image in real_ksdd.images)


@pytest.mark.realdata
@needs_real_ksdd
def test_real_kolektorsdd_folds_hold_whole_items_and_copies(real_ksdd: SourceSet) -> None:
    assert {image.fold for image in real_ksdd.images} == {0, 1, 2}
    item_folds = folds_of(real_ksdd, lambda image: image.id.split("_")[0])
    assert len(item_folds) == 50
    assert all(len(folds) == 1 for folds in item_folds.values())
    fold_of = {image.id: image.fold for image in real_ksdd.images}
    for copies in real_ksdd.duplicates:
        assert len({fold_of[id_] for id_ in copies}) == 1, copies
    defects = [sum(im.label for im in real_ksdd.images if im.fold == k) for k in range(3)]
    assert sum(defects) == 52 and max(defects) - min(defects) <= 1


@pytest.mark.realdata
@needs_real_ksdd
def test_real_kolektorsdd_cross_item_copies(real_ksdd: SourceSet) -> None:
    # 16 pairs: kos01/PartK = kos26/PartK and kos27/PartK = kos34/PartK for K = 0..7.
    expected = sorted([f"kos01_Part{k}", f"kos26_Part{k}"] for k in range(8))
    expected += sorted([f"kos27_Part{k}", f"kos34_Part{k}"] for k in range(8))
    assert real_ksdd.duplicates == sorted(expected)
    label = {image.id: image.label for image in real_ksdd.images}
    defective_pairs = [copies for copies in real_ksdd.duplicates if label[copies[0]]]
    assert defective_pairs == [["kos01_Part5", "kos26_Part5"], ["kos27_Part0", "kos34_Part0"]]
    assert all(label[a] == label[b] for a, b in real_ksdd.duplicates)
    groups = {image.group for image in real_ksdd.images}
    assert {"kos01+kos26", "kos27+kos34"} <= groups and len(groups) == 48


@pytest.mark.realdata
@needs_real_ksdd
def test_real_kolektorsdd_zip_loads_like_folder(real_ksdd: SourceSet, tmp_path: Path) -> None:
    # A few real files: the copies kos01/kos26 Part5 and Part0, the excluded kos21/Part7 with its
    # twin, and a defective and a defect-free part of two more items (three defective groups).
    label = {image.id: image.label for image in real_ksdd.images}
    chosen = ["kos01_Part0", "kos01_Part5", "kos26_Part0", "kos26_Part5", "kos21_Part6", "kos21_Part7"]
    for item in ("kos02", "kos03"):
        parts = [f"{item}_Part{k}" for k in range(8)]
        chosen += [next(p for p in parts if label[p]), next(p for p in parts if not label[p])]
    folder = tmp_path / "unpacked" / "KolektorSDD"
    archive = tmp_path / "KolektorSDD.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for id_ in chosen:
            item, part = id_.split("_")
            for name in (f"{item}/{part}.jpg", f"{item}/{part}_label.bmp"):
                (folder / item).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(REAL_KSDD / name, folder / name)
                zipped.write(REAL_KSDD / name, f"KolektorSDD/{name}")

    from_folder = load_kolektorsdd(tmp_path / "unpacked")
    from_zip = load_kolektorsdd(archive)
    assert summary(from_zip) == summary(from_folder)
    assert len(from_zip.images) == 9 and list(from_zip.excluded) == ["kos21_Part7"]
    assert ["kos01_Part5", "kos26_Part5"] in from_zip.duplicates
    first = from_zip.images[0]
    assert first.image == f"{archive}::KolektorSDD/kos01/Part0.jpg"
    np.testing.assert_array_equal(read_gray(first.image), read_gray(str(REAL_KSDD / "kos01/Part0.jpg")))


# --- loaders on small trees ---------------------------------------------------------------------


def test_kolektorsdd_labels_groups_and_exclusion(tmp_path: Path) -> None:
    root = make_ksdd(tmp_path / "ksdd", {**KSDD_ITEMS, "kos21": [True] + [False] * 7})
    shutil.copyfile(root / "kos21/Part6.jpg", root / "kos21/Part7.jpg")
    shutil.copyfile(root / "kos02/Part1.jpg", root / "kos05/Part1.jpg")  # a copy across items
    source = load_kolektorsdd(root)
    by_id = {image.id: image for image in source.images}
    assert source.name == "kolektorsdd" and source.masks_required
    assert len(source.images) == 6 * 3 + 7 and list(source.excluded) == ["kos21_Part7"]
    assert [id_ for id_, image in by_id.items() if image.label] == [f"kos{n:02d}_Part0" for n in (1, 2, 3, 4, 5, 6, 21)]
    assert source.duplicates == [["kos02_Part1", "kos05_Part1"]]
    assert by_id["kos02_Part0"].group == by_id["kos05_Part2"].group == "kos02+kos05"
    assert by_id["kos01_Part0"].group == "kos01"
    assert by_id["kos01_Part0"].mask == str(root / "kos01/Part0_label.bmp")
    assert all(len(folds) == 1 for folds in folds_of(source, lambda image: image.group).values())


def test_kolektorsdd_zip_without_top_folder(tmp_path: Path) -> None:
    root = make_ksdd(tmp_path / "ksdd", KSDD_ITEMS)
    archive = tmp_path / "KolektorSDD.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for file in sorted(root.rglob("*")):
            zipped.write(file, file.relative_to(root).as_posix())
        zipped.writestr("__MACOSX/kos01/._Part0.jpg", b"resource fork")
    assert summary(load_kolektorsdd(archive, seed=3)) == summary(load_kolektorsdd(root, seed=3))


@pytest.mark.parametrize("zipped", [False, True], ids=["folder", "zip"])
def test_kolektorsdd2_fixed_split(tmp_path: Path, zipped: bool) -> None:
    root = make_ksdd2(tmp_path / "KolektorSDD2", {"train": [True, False, False], "test": [False, True]})
    path: Path = root
    if zipped:
        path = Path(shutil.make_archive(str(tmp_path / "KolektorSDD2"), "zip", tmp_path, "KolektorSDD2"))
    source = load_kolektorsdd2(path)
    assert [(im.id, im.label, im.fold, im.group) for im in source.images] == [
        ("ksdd2_test_10000", 0, 0, "ksdd2_test_10000"),
        ("ksdd2_test_10001", 1, 0, "ksdd2_test_10001"),
        ("ksdd2_train_10000", 1, -1, "ksdd2_train_10000"),
        ("ksdd2_train_10001", 0, -1, "ksdd2_train_10001"),
        ("ksdd2_train_10002", 0, -1, "ksdd2_train_10002"),
    ]
    assert source.images[0].mask.endswith("test/10000_GT.png")
    np.testing.assert_array_equal(read_gray(source.images[2].image), noise(0))


def test_manifest_split_labels_masks_and_groups(tmp_path: Path) -> None:
    images = manifest_images(tmp_path, 4)
    write_image(tmp_path / "img/1_mask.png", mask_array(True))
    csv_path = write_manifest(
        tmp_path,
        [
            f"{images[0]},good,,a,train",
            f"{images[1]},defect,img/1_mask.png,a,train",
            f"{images[2]},0,,,test",
            f" {images[3]} ,1,,,TEST",
        ],
        header="\ufeffImage,Label,mask,group,split",
    )
    source = load_manifest(csv_path)
    assert [(im.id, im.label, im.group, im.fold) for im in source.images] == [
        ("img_0", 0, "a", -1),
        ("img_1", 1, "a", -1),
        ("img_2", 0, "img_2", 0),
        ("img_3", 1, "img_3", 0),
    ]
    assert source.images[1].mask == str(tmp_path / "img/1_mask.png") and source.images[0].mask is None
    assert source.images[0].image == str(tmp_path / "img/0.png")


def test_manifest_fold_column(tmp_path: Path) -> None:
    images = manifest_images(tmp_path, 4)
    rows = [f"{image},{i % 2},{fold}" for i, (image, fold) in enumerate(zip(images, [0, 0, 1, 1], strict=True))]
    source = load_manifest(write_manifest(tmp_path, rows, header="image,label,fold"))
    assert [im.fold for im in source.images] == [0, 0, 1, 1]


def test_manifest_kfold_keeps_groups_and_copies_together(tmp_path: Path) -> None:
    images = manifest_images(tmp_path, 12)
    shutil.copyfile(tmp_path / images[1], tmp_path / images[11])  # copy of a defective image, another group
    rows = [f"{image},{int(i % 4 == 1)},item{i // 2}" for i, image in enumerate(images)]
    source = load_manifest(write_manifest(tmp_path, rows, header="image,label,group"), folds=3, seed=1)
    assert source.duplicates == [["img_1", "img_11"]]
    assert {im.fold for im in source.images} == {0, 1, 2}
    assert all(len(folds) == 1 for folds in folds_of(source, lambda image: image.group).values())
    assert source.images[11].group == source.images[1].group == "item0+item5"


def test_folder_convention(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "parts")
    (root / "good/notes.txt").write_text("ignored")
    source = load_folder(root, folds=3, seed=0)
    assert [(im.id, im.label, im.mask is not None) for im in source.images] == [
        ("defect_d0", 1, True),
        ("defect_d1", 1, True),
        ("defect_d2", 1, True),
        ("good_g0", 0, False),
        ("good_g1", 0, False),
        ("good_g2", 0, False),
    ]
    assert source.images[0].mask == str(root / "defect/d0_mask.png")
    assert sorted(im.fold for im in source.images if im.label) == [0, 1, 2]
    assert all(im.group == im.id for im in source.images)


def test_load_source_dispatches_and_rejects_unknown_kinds(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "parts")
    assert summary(load_source("folder", root, 3, 0)) == summary(load_folder(root, 3, 0))
    with pytest.raises(DataError, match="kolektorsdd, kolektorsdd2, manifest, folder"):
        load_source("mvtec", root, 3, 0)
    with pytest.raises(DataError, match="needs a path"):
        load_source("folder", None, 3, 0)


def test_find_duplicates(tmp_path: Path) -> None:
    a = write_image(tmp_path / "a.png", noise(1))
    b = write_image(tmp_path / "b.png", noise(2))
    shutil.copyfile(a, tmp_path / "c.png")
    refs = {"c": str(tmp_path / "c.png"), "b": str(b), "a": str(a)}
    assert find_duplicates(refs) == [["a", "c"]]


def test_read_mask_is_boolean(tmp_path: Path) -> None:
    mask = read_mask(str(write_image(tmp_path / "m.bmp", mask_array(True))), SHAPE)
    assert mask.dtype == bool and mask.sum() == 9


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"this is not an image", b""], ids=["garbage", "empty"])
def test_unreadable_image(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with raises_naming(path):
        read_gray(str(path))


@pytest.mark.parametrize("extension", [".png", ".jpg", ".bmp"])
def test_truncated_image(tmp_path: Path, extension: str) -> None:
    path = write_image(tmp_path / f"image{extension}", noise(7, (64, 48)))
    path.write_bytes(path.read_bytes()[:-100])
    with raises_naming(path, "truncated"):
        read_gray(str(path))


def test_jpeg_with_bytes_after_its_end_marker_is_read(tmp_path: Path) -> None:
    path = write_image(tmp_path / "image.jpg", noise(7, (64, 48)))
    path.write_bytes(path.read_bytes() + b"\0" * 4096)  # some writers append padding or metadata
    assert read_gray(str(path)).shape == (64, 48)


def test_truncated_image_in_zip(tmp_path: Path) -> None:
    data = cv2.imencode(".jpg", noise(7, (64, 48)))[1].tobytes()
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("a/whole.jpg", data)
        zipped.writestr("a/cut.jpg", data[: len(data) // 2])
    assert read_gray(f"{archive}::a/whole.jpg").shape == (64, 48)
    with raises_naming(f"{archive}::a/cut.jpg", "truncated"):
        read_gray(f"{archive}::a/cut.jpg")
    with raises_naming(f"{archive}::a/missing.jpg"):
        read_gray(f"{archive}::a/missing.jpg")


def test_mask_size_differs_from_image(tmp_path: Path) -> None:
    image = write_image(tmp_path / "part.png", noise(1))
    mask = write_image(tmp_path / "part_mask.png", mask_array(True, (10, 8)))
    with raises_naming(mask, image, "8x10", "8x12"):
        read_mask(str(mask), read_gray(str(image)).shape, image=str(image))


def test_kolektorsdd_image_without_mask(tmp_path: Path) -> None:
    root = make_ksdd(tmp_path / "ksdd", KSDD_ITEMS)
    (root / "kos03/Part0_label.bmp").unlink()
    with raises_naming(root / "kos03/Part0.jpg", root / "kos03/Part0_label.bmp"):
        load_kolektorsdd(root)


def test_kolektorsdd2_image_without_mask(tmp_path: Path) -> None:
    root = make_ksdd2(tmp_path / "ksdd2", {"train": [True, False], "test": [True, False]})
    (root / "test/10000_GT.png").unlink()
    with raises_naming(root / "test/10000.png", root / "test/10000_GT.png"):
        load_kolektorsdd2(root)


def test_validate_requires_masks_where_the_layout_does() -> None:
    images = [SourceImage(f"i{k}", k % 2, f"i{k}", k // 2, f"/data/i{k}.png", f"/data/i{k}_GT.png") for k in range(4)]
    images[3] = SourceImage("i3", 1, "i3", 1, "/data/i3.png", None)
    validate(SourceSet("manifest", images, root="/data/manifest.csv"))  # masks optional there
    with raises_naming("/data/i3.png"):
        validate(SourceSet("kolektorsdd2", images, root="/data", masks_required=True))


@pytest.mark.parametrize("value", ["../outside.png", "img/../../outside.png", "/etc/hostname"])
def test_manifest_row_outside_its_folder(tmp_path: Path, value: str) -> None:
    root = tmp_path / "set"
    images = manifest_images(root, 2)
    csv_path = write_manifest(root, [f"{images[0]},0", f"{value},1", f"{images[1]},1"])
    with raises_naming(f"{csv_path} line 3", value, "outside"):
        load_manifest(csv_path)


@pytest.mark.parametrize("column", ["image", "mask"])
def test_manifest_row_missing_file(tmp_path: Path, column: str) -> None:
    images = manifest_images(tmp_path, 2)
    row = "img/missing.png,1," if column == "image" else f"{images[1]},1,img/missing.png"
    csv_path = write_manifest(tmp_path, [f"{images[0]},0,", row], header="image,label,mask")
    with raises_naming(f"{csv_path} line 3", tmp_path / "img/missing.png", "does not exist"):
        load_manifest(csv_path)


def test_manifest_bad_label(tmp_path: Path) -> None:
    images = manifest_images(tmp_path, 2)
    csv_path = write_manifest(tmp_path, [f"{images[0]},0", f"{images[1]},scratch"])
    with raises_naming(f"{csv_path} line 3", "scratch"):
        load_manifest(csv_path)


def test_class_without_images(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "parts", good=4, defect=0)
    (root / "defect").mkdir()
    with raises_naming(root, "no defective images"):
        load_folder(root)


def test_fold_without_defective_image(tmp_path: Path) -> None:
    images = manifest_images(tmp_path, 6)
    labels_folds = [(1, 0), (0, 0), (1, 1), (0, 1), (0, 2), (0, 2)]
    rows = [f"{image},{label},{fold}" for image, (label, fold) in zip(images, labels_folds, strict=True)]
    csv_path = write_manifest(tmp_path, rows, header="image,label,fold")
    with raises_naming(csv_path, "fold 2", "no defective image"):
        load_manifest(csv_path)


def test_test_split_without_defective_image(tmp_path: Path) -> None:
    images = manifest_images(tmp_path, 4)
    rows = [f"{images[0]},1,train", f"{images[1]},0,train", f"{images[2]},0,test", f"{images[3]},0,test"]
    csv_path = write_manifest(tmp_path, rows, header="image,label,split")
    with raises_naming(csv_path, "test split", "no defective image"):
        load_manifest(csv_path)


def test_too_few_defective_groups_for_the_folds(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "parts", good=6, defect=2)
    with raises_naming(root, "no defective image"):
        load_folder(root, folds=3)


def test_repeated_ids(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "parts")
    write_image(root / "good/g0.jpg", noise(99))
    with raises_naming(root / "good/g0.jpg", root / "good/g0.png", "good_g0"):
        load_folder(root)


@pytest.mark.parametrize(
    ("loader", "expected"),
    [
        (load_kolektorsdd, "kos01..kos50"),
        (load_kolektorsdd2, "train/ and test/"),
        (load_manifest, "columns image,label"),
        (load_folder, "good/ and defect/"),
    ],
)
def test_missing_path(tmp_path: Path, loader, expected: str) -> None:
    with raises_naming(tmp_path / "nowhere", expected):
        loader(tmp_path / "nowhere")


def test_wrong_layout(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    write_image(root / "Part0.jpg", noise(0))
    write_image(root / "Part0_label.bmp", mask_array(True))
    with raises_naming(root, "kos01..kos50 with PartN.jpg and PartN_label.bmp"):
        load_kolektorsdd(root)
    with raises_naming(root, "good/ and defect/"):
        load_folder(root)
    (tmp_path / "not.zip").write_bytes(b"plain text")
    with raises_naming(tmp_path / "not.zip", "neither a folder nor a zip"):
        load_kolektorsdd(tmp_path / "not.zip")


def test_kolektorsdd2_without_test_split(tmp_path: Path) -> None:
    root = make_ksdd2(tmp_path / "ksdd2", {"train": [True, False]})
    with raises_naming(root, "test/"):
        load_kolektorsdd2(root)


def test_manifest_without_required_column(tmp_path: Path) -> None:
    images = manifest_images(tmp_path, 2)
    csv_path = write_manifest(tmp_path, images, header="image")
    with raises_naming(csv_path, "label"):
        load_manifest(csv_path)


# --- assign_group_folds -------------------------------------------------------------------------


def grouped_labels(defects_per_group: list[int], size: int = 4) -> tuple[list[str], list[int]]:
    groups, labels = [], []
    for g, defects in enumerate(defects_per_group):
        groups += [f"g{g:02d}"] * size
        labels += [1] * defects + [0] * (size - defects)
    return groups, labels


def test_assign_group_folds_keeps_groups_whole_and_balances_defects() -> None:
    groups, labels = grouped_labels([1, 0] * 6)  # 12 groups of 4 images, 6 of them with a defect
    folds = assign_group_folds(groups, labels, folds=3, seed=0)
    fold_of_group: dict[str, set[int]] = defaultdict(set)
    for group, fold in zip(groups, folds, strict=True):
        fold_of_group[group].add(fold)
    assert all(len(f) == 1 for f in fold_of_group.values())
    assert [sum(label for label, f in zip(labels, folds, strict=True) if f == k) for k in range(3)] == [2, 2, 2]
    assert Counter(folds) == {0: 16, 1: 16, 2: 16}


def test_assign_group_folds_balances_uneven_defect_counts() -> None:
    groups, labels = grouped_labels([4, 3, 3, 2, 2, 1, 1, 1, 0, 0], size=5)
    folds = assign_group_folds(groups, labels, folds=3, seed=5)
    defects = [sum(label for label, f in zip(labels, folds, strict=True) if f == k) for k in range(3)]
    assert sorted(defects) == [5, 6, 6]


def test_assign_group_folds_is_deterministic_and_seeded() -> None:
    groups, labels = grouped_labels([1, 0] * 10)
    first = assign_group_folds(groups, labels, folds=3, seed=0)
    assert assign_group_folds(groups, labels, folds=3, seed=0) == first
    reordered = assign_group_folds(groups[::-1], labels[::-1], folds=3, seed=0)
    assert reordered[::-1] == first  # input order does not matter
    assert any(assign_group_folds(groups, labels, folds=3, seed=s) != first for s in range(1, 10))


def test_assign_group_folds_needs_enough_groups() -> None:
    with pytest.raises(DataError, match="at least 3 groups"):
        assign_group_folds(["a", "a", "b"], [1, 0, 1], folds=3, seed=0)
