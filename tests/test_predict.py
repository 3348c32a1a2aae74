"""The predict command: scores, decisions, overlays and CSV; models from files and from MLflow; bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.core.artifacts import write_image
from pipeline.deployment.predict import ModelError, decision_threshold, load_any, main
from pipeline.knowledge.saliency import create_saliency, saliency_maps
from pipeline.models.files import load_model
from pipeline.models.inference import predict
from pipeline.training.stage import register_models
from support.helpers import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def folder(tiny, tmp_path: Path) -> Path:
    """Four images at the model's size, one in a subfolder, plus a text file posing as data."""
    _, images = tiny
    folder = tmp_path / "photos"
    for k in range(3):
        write_image(folder / f"img{k}.png", images[k].numpy())
    write_image(folder / "sub" / "img3.png", images[3].numpy())
    (folder / "notes.txt").write_text("not an image\n")
    return folder


def test_folder_scores_images_and_reports_a_non_image_without_stopping(
    tiny, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    paths, images = tiny
    out = tmp_path / "out"
    table = main(["--model", str(paths["consistency"]), str(folder), "--out", str(out), "--batch-size", "2"])
    stderr = capsys.readouterr().err
    assert "notes.txt" in stderr and "not a readable image" in stderr
    written = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert list(written.columns) == ["path", "score", "decision", "threshold", "overlay", "error"]
    assert len(written) == 5
    bad = written[written["path"].str.endswith("notes.txt")].iloc[0]
    assert "not a readable image" in bad["error"] and bad["score"] == "" and bad["overlay"] == ""
    good = written[written["error"] == ""]
    assert len(good) == 4 and set(good["decision"]) <= {"defect", "ok"}
    for overlay in good["overlay"]:
        picture = cv2.imread(overlay)
        assert picture.shape == (*images.shape[1:], 3)  # the image's own size, in colour
    # The decision is score >= threshold; without an evaluate run the threshold is the default.
    scores = good["score"].astype(float)
    assert (good["decision"] == np.where(scores >= 0.5, "defect", "ok")).all()
    assert (table["threshold"] == 0.5).all()


@pytest.mark.parametrize("name", ["baseline", "consistency"])
def test_scores_equal_training_predict(tiny, folder: Path, tmp_path: Path, name: str) -> None:
    paths, images = tiny
    table = main(["--model", str(paths[name]), str(folder), "--out", str(tmp_path / "out"), "--threshold", "0.3"])
    model, config = load_model(paths[name])
    expected = predict(model, config, images[:4])
    got = table.set_index("path")["score"]
    ours = [got[str(folder / f"img{k}.png")] for k in range(3)] + [got[str(folder / "sub" / "img3.png")]]
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)
    assert (table.dropna()["decision"] == np.where(table.dropna()["score"] >= 0.3, "defect", "ok")).all()


def test_images_of_another_size_are_resized_as_prepare_does(tiny, tmp_path: Path) -> None:
    paths, images = tiny
    large = np.kron(images[0].numpy(), np.ones((3, 2), np.uint8))  # 96 x 64
    write_image(tmp_path / "large.png", large)
    table = main(["--model", str(paths["baseline"]), str(tmp_path / "large.png"), "--out", str(tmp_path / "out")])
    model, config = load_model(paths["baseline"])
    resized = cv2.resize(large, (config["width"], config["height"]), interpolation=cv2.INTER_AREA)
    expected = predict(model, config, torch.from_numpy(resized[None]))
    assert table["score"].iloc[0] == pytest.approx(float(expected[0]), abs=1e-6)


def test_teacher_variant_needs_the_baseline_and_uses_its_saliency(tiny, folder: Path, tmp_path: Path) -> None:
    paths, images = tiny
    with pytest.raises(ModelError, match="variant teacher.*--teacher"):
        main(["--model", str(paths["teacher"]), str(folder), "--out", str(tmp_path / "out")])
    with pytest.raises(ModelError, match="must be a baseline"):
        main(["--model", str(paths["teacher"]), "--teacher", str(paths["consistency"]), str(folder)])
    table = main(
        [
            "--model",
            str(paths["teacher"]),
            "--teacher",
            str(paths["baseline"]),
            str(folder / "img0.png"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    baseline, baseline_config = load_model(paths["baseline"])
    priors = torch.from_numpy(saliency_maps(create_saliency("layercam", baseline), baseline_config, images[:1])[0])
    guided, config = load_model(paths["teacher"])
    assert table["score"].iloc[0] == pytest.approx(float(predict(guided, config, images[:1], priors)[0]), abs=1e-6)


@pytest.mark.slow  # logging a model exports its graph: about 10 s
def test_registered_model_by_name_with_the_threshold_of_its_evaluate_run(
    tiny, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.core.tracking import stage_run

    paths, _images = tiny
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "predict-test")
    stage_out = tmp_path / "guided"
    stage_out.mkdir()
    (stage_out / "fold0.pt").write_bytes(paths["consistency"].read_bytes())
    with stage_run("train_guided", {}, dataset="synthetic") as run:  # as the training stage registers
        register_models(run, stage_out, "synthetic", "guided")
        run.write_lineage(stage_out)
    with stage_run("evaluate", {"evaluate": {"threshold": 0.25}}, dataset="synthetic") as run:
        run.link_upstream(stage_out)

    by_name = main(["--model-name", "synthetic-guided", str(folder), "--out", str(tmp_path / "a")])
    by_uri = main(["--model", "models:/synthetic-guided/1", str(folder), "--out", str(tmp_path / "b")])
    by_file = main(["--model", str(stage_out / "fold0.pt"), str(folder), "--out", str(tmp_path / "c")])
    for table in (by_name, by_uri, by_file):
        assert (table["threshold"] == 0.25).all()  # the evaluate run's, found through run.json for the file
        np.testing.assert_allclose(table["score"], by_file["score"], atol=1e-6)
    loaded = load_any("models:/synthetic-guided")  # the latest version
    assert loaded.source == "models:/synthetic-guided/1"
    assert decision_threshold(loaded, 0.9) == (0.9, "--threshold")
    with pytest.raises(ModelError, match="registered models: synthetic-guided"):
        load_any("models:/synthetic-baseline/1")


def test_wrong_kinds_of_model_file_are_refused_naming_the_file(tiny, tmp_path: Path) -> None:
    paths, _ = tiny
    text = tmp_path / "model.txt"
    text.write_text("hello")
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    weights_only = tmp_path / "state.pt"
    torch.save(torch.load(paths["baseline"], weights_only=True)["state_dict"], weights_only)
    pickled = tmp_path / "pickled.pt"
    torch.save(torch.nn.Linear(2, 1), pickled)
    wrong_weights = tmp_path / "mismatch.pt"
    checkpoint = torch.load(paths["teacher"], weights_only=True)
    torch.save(
        {"config": torch.load(paths["baseline"], weights_only=True)["config"], "state_dict": checkpoint["state_dict"]},
        wrong_weights,
    )
    for path, why in (
        (text, "not a PyTorch file"),
        (tensor, "holds a Tensor"),
        (weights_only, "holds a dict with keys"),
        (pickled, "cannot be loaded"),
        (wrong_weights, "weights do not fit"),
        (tmp_path / "missing.pt", "not found"),
        (tmp_path, "is a folder"),
    ):
        with pytest.raises(ModelError, match="expected a model file") as error:
            load_any(str(path))
        assert str(path) in str(error.value) and why in str(error.value)


def test_command_line_reports_a_wrong_model_in_one_line(tmp_path: Path) -> None:
    text = tmp_path / "model.pt"
    text.write_text("not a model")
    (tmp_path / "a.png").write_bytes(b"")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "predict", "--model", str(text), str(tmp_path / "a.png")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1
    assert f"error: {text} is not a PyTorch file" in result.stderr and "Traceback" not in result.stderr


def test_a_batch_with_no_readable_image_fails_after_writing_the_csv(tiny, tmp_path: Path) -> None:
    paths, _ = tiny
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(ValueError, match="none of the 1 files"):
        main(["--model", str(paths["baseline"]), str(tmp_path / "broken.png"), "--out", str(tmp_path / "out")])
    table = pd.read_csv(tmp_path / "out" / "predictions.csv", keep_default_na=False)
    assert "truncated" in table["error"].iloc[0]
