"""The prepare stage on real and user data sets: what it writes, and what it refuses."""

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.core.artifacts import read_json
from stages import prepare

KOLEKTOR = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "KolektorSDD"


def write_params(folder: Path, **prepare_params) -> None:
    (folder / "params.yaml").write_text(yaml.safe_dump({"prepare": prepare_params}))


def make_folder_dataset(root: Path, good: int = 6, defect: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for kind, count in (("good", good), ("defect", defect)):
        (root / kind).mkdir(parents=True)
        for k in range(count):
            image = rng.integers(0, 255, (40, 30), dtype=np.uint8)
            cv2.imwrite(str(root / kind / f"{kind}{k}.png"), image)
            if kind == "defect":
                mask = np.zeros((40, 30), np.uint8)
                mask[10:12, 5:20] = 255
                cv2.imwrite(str(root / kind / f"{kind}{k}_mask.png"), mask)
    return root


def test_folder_dataset_is_prepared_with_index_report_and_masks(workdir):
    make_folder_dataset(workdir / "images")
    write_params(workdir, dataset="folder", path="images", width=16, height=24, folds=2)
    prepare.main()
    index = pd.read_csv(workdir / "data/prepared/index.csv")
    assert len(index) == 12 and index["label"].sum() == 6
    assert set(index["fold"]) == {0, 1}
    assert index["has_mask"].sum() == 6
    image = cv2.imread(str(workdir / "data/prepared/images" / f"{index['id'][0]}.png"), cv2.IMREAD_UNCHANGED)
    assert image.shape == (24, 16)
    report = read_json(workdir / "data/prepared/report.json")
    assert report["dataset"] == "folder"
    assert report["counts"]["per_fold"]["0"]["defective"] == 3
    assert report["sizes"]["source_height"]["max"] == 40
    assert read_json(workdir / "data/metrics/prepare.json")["test_folds"] == 2


def test_bad_image_stops_prepare_naming_the_file_and_leaves_no_output(workdir):
    root = make_folder_dataset(workdir / "images")
    (root / "defect" / "defect3.png").write_bytes(b"not an image at all")
    write_params(workdir, dataset="folder", path="images", width=16, height=24, folds=2)
    with pytest.raises(ValueError, match="defect3.png"):
        prepare.main()
    assert not (workdir / "data/prepared").exists()
    assert not list((workdir / "data").glob(".prepared*"))


def test_unknown_prepare_key_is_refused_with_its_name(workdir):
    write_params(workdir, dataset="synthetic", widht=16)
    with pytest.raises(ValueError, match="prepare.widht"):
        prepare.main()


@pytest.mark.realdata
@pytest.mark.skipif(not KOLEKTOR.is_dir(), reason=f"KolektorSDD not found at {KOLEKTOR}")
def test_kolektorsdd_is_prepared_by_the_literature_protocol(workdir):
    write_params(workdir, dataset="kolektorsdd", path=str(KOLEKTOR), width=32, height=88, split="cv", folds=3)
    prepare.main()
    index = pd.read_csv(workdir / "data/prepared/index.csv")
    assert len(index) == 399 and index["label"].sum() == 52
    assert index.groupby("group")["fold"].nunique().max() == 1
    report = read_json(workdir / "data/prepared/report.json")
    assert len(report["duplicates"]) == 16
    assert "kos21_Part7" in report["excluded"]
    assert all(counts["defective"] >= 17 for counts in report["counts"]["per_fold"].values())
