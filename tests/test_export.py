"""Export to ONNX and TorchScript: stand-alone graphs from uint8 images to predict's scores and decisions."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
import torch
import yaml

from pipeline.core.artifacts import write_image
from pipeline.core.errors import InputError
from pipeline.deployment.export import ExportError, example_inputs, export, fold_images, main, run_exported
from pipeline.knowledge.saliency import create_saliency, saliency_maps
from pipeline.models.files import load_model
from pipeline.models.inference import predict
from support.helpers import ROOT, SHRUNK

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The shrunk e2e project's prepared synthetic images (64x64, 48 images, 3 folds)."""
    from stages import prepare

    folder = tmp_path_factory.mktemp("project")
    (folder / "params.yaml").write_text(yaml.safe_dump({"prepare": {"dataset": "synthetic", **SHRUNK["prepare"]}}))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        prepare.main()
    mlflow.end_run()
    yield folder / "data" / "prepared"


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("name", ["baseline", "consistency", "teacher"])
def test_exported_graph_gives_predicts_scores_and_decisions_from_uint8_images(
    tiny, tmp_path: Path, name: str, fmt: str
) -> None:
    paths, images = tiny
    model, config = load_model(paths[name])
    out = tmp_path / f"{name}.{fmt}"
    assert export(model, config, fmt, out, threshold=0.4) <= 1e-4
    batch = images[:5]  # a batch of another size than the traced one, raw uint8
    priors = None
    if name == "teacher":
        baseline, baseline_config = load_model(paths["baseline"])
        priors = torch.from_numpy(saliency_maps(create_saliency("layercam", baseline), baseline_config, batch)[0])
    expected = predict(model, config, batch, priors)
    scores, decisions = run_exported(out, fmt, (batch,) if priors is None else (batch, priors.unsqueeze(1)))
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-4)
    assert decisions.dtype == np.bool_ and np.array_equal(decisions, expected >= 0.4)


@pytest.mark.parametrize("name", ["baseline", "teacher"])
def test_test_time_flips_average_the_flipped_views_in_predict_and_in_the_export(
    tiny, tmp_path: Path, name: str
) -> None:
    paths, images = tiny
    model, config = load_model(paths[name])
    batch, priors = images[:6], None
    if name == "teacher":  # the prior is flipped with its image
        baseline, baseline_config = load_model(paths["baseline"])
        priors = torch.from_numpy(saliency_maps(create_saliency("layercam", baseline), baseline_config, batch)[0])
    flipped = {**config, "test_time_flips": True}
    views = [
        predict(model, config, batch.flip(dims), priors.flip(dims) if priors is not None else None)
        for dims in ((), (-1,), (-2,))
    ]
    averaged = predict(model, flipped, batch, priors)
    np.testing.assert_allclose(averaged, np.mean(views, axis=0), rtol=0, atol=1e-6)
    assert np.abs(averaged - views[0]).max() > 1e-4  # the flips change the scores of this model
    out = tmp_path / f"{name}.onnx"
    assert export(model, flipped, "onnx", out, threshold=0.5) <= 1e-4
    scores, _ = run_exported(out, "onnx", (batch,) if priors is None else (batch, priors.unsqueeze(1)))
    np.testing.assert_allclose(scores, averaged, rtol=0, atol=1e-4)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_parity_on_a_test_fold_of_prepared_images(
    tiny, prepared: Path, tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture
) -> None:
    paths, _ = tiny
    out = tmp_path / f"m.{fmt}"
    report = main(
        [
            str(paths["consistency"]),
            "--format",
            fmt,
            "--out",
            str(out),
            "--threshold",
            "0.45",
            "--prepared",
            str(prepared),
            "--fold",
            "1",
        ]
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(report))
    images, labels = fold_images(prepared, 1)
    parity = report["parity"]
    assert parity["images"] == len(labels) == 16 and 0 < labels.sum() < len(labels)
    assert parity["max_score_difference"] <= 1e-4 and parity["decisions_differing"] == 0
    assert parity["ap_exported"] == parity["ap_pytorch"]
    config = load_model(paths["consistency"])[1]
    assert images.shape[1:] == (64, 64) != (config["height"], config["width"])  # resized as predict does


def test_a_fold_without_test_images_is_refused_naming_the_option(tiny, prepared: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"--fold 7: .* has test folds \[0, 1, 2\]"):
        main(
            [
                str(tiny[0]["baseline"]),
                "--format",
                "torchscript",
                "--out",
                str(tmp_path / "m.pt"),
                "--prepared",
                str(prepared),
                "--fold",
                "7",
            ]
        )


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:FutureWarning")
def test_size_threshold_and_operating_point_travel_with_the_file(tiny, tmp_path: Path) -> None:
    paths, _ = tiny
    main(
        [
            str(paths["consistency"]),
            "--format",
            "onnx",
            "--out",
            str(tmp_path / "m.onnx"),
            "--threshold",
            "0.3",
            "--operating-point",
            "max_false_alarm_rate: 0.1",
        ]
    )
    props = {p.key: json.loads(p.value) for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    config = load_model(paths["consistency"])[1]
    assert props == {
        "input_size": {"height": 32, "width": 32},
        "threshold": 0.3,
        "threshold_from": "--threshold",
        "operating_point": "max_false_alarm_rate: 0.1",
        "pipeline_config": config,
    }
    main([str(paths["teacher"]), "--format", "torchscript", "--out", str(tmp_path / "t.pt"), "--threshold", "0.3"])
    extra = dict.fromkeys(f"{key}.json" for key in props)
    scripted = torch.jit.load(str(tmp_path / "t.pt"), _extra_files=extra)
    assert json.loads(extra["pipeline_config.json"])["variant"] == "teacher"
    assert json.loads(extra["threshold.json"]) == 0.3 and json.loads(extra["operating_point.json"]) == ""
    score, decision = scripted(*example_inputs(json.loads(extra["pipeline_config.json"]), batch=1))
    assert score.shape == decision.shape == (1,)


@pytest.mark.slow  # logging the scoring model and an ONNX export: about 40 s
def test_threshold_and_operating_point_come_from_the_registered_version(
    tiny, prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.deployment.serving import log_scoring_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "export-test")
    log_scoring_model(tiny[0]["baseline"], 0.35, "zero_misses", "tiny-release", aliases=["champion"])
    report = main(
        [
            "models:/tiny-release@champion",
            "--format",
            "onnx",
            "--out",
            str(tmp_path / "r.onnx"),
            "--prepared",
            str(prepared),
            "--fold",
            "0",
        ]
    )
    mlflow.end_run()
    assert report["threshold"] == 0.35 and report["operating_point"] == "zero_misses"
    assert report["threshold_from"] == "tag threshold of models:/tiny-release/1 (operating point zero_misses)"
    props = {p.key: json.loads(p.value) for p in onnx.load(str(tmp_path / "r.onnx")).metadata_props}
    assert props["threshold"] == 0.35 and props["operating_point"] == "zero_misses"
    assert report["parity"]["decisions_differing"] == 0


def test_a_diverging_export_is_not_written(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.deployment.export

    model, config = load_model(tiny[0]["baseline"])
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export(model, config, "tflite", tmp_path / "m.tflite", 0.5)

    def drifting(path: Path, fmt: str, inputs: tuple) -> tuple[np.ndarray, np.ndarray]:
        scores, decisions = run_exported(path, fmt, inputs)
        return scores + 2e-4, decisions  # a runtime that computes differently in the fourth decimal

    monkeypatch.setattr(pipeline.deployment.export, "run_exported", drifting)
    with pytest.raises(ExportError, match=r"differ from PyTorch's by 0.0002.*m.pt was not written"):
        export(model, config, "torchscript", tmp_path / "m.pt", 0.5)
    assert not (tmp_path / "m.tflite").exists() and not (tmp_path / "m.pt").exists()


def docs_example() -> str:
    """The Python block of docs/deploy.md that scores an image with onnxruntime alone."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    return re.search(r"<!-- example: onnx-alone -->\s*```python\n(.*?)```", text, re.S).group(1)


def test_the_docs_example_scores_as_predict_without_this_project(tiny, tmp_path: Path) -> None:
    paths, images = tiny
    model, config = load_model(paths["baseline"])
    export(model, config, "onnx", tmp_path / "model.onnx", threshold=0.45)
    write_image(tmp_path / "part.png", images[3].numpy())
    # Isolated mode, no PYTHONPATH, run outside the repository: only installed packages import.
    code = docs_example() + "\nassert not any(m.split('.')[0] in ('pipeline', 'torch') for m in sys.modules)\n"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-I", "-c", code, "model.onnx", "part.png"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    expected = float(predict(model, config, images[3:4])[0])
    assert answer["score"] == pytest.approx(expected, abs=1e-4)
    assert answer["defect"] == (expected >= 0.45) and answer["threshold"] == 0.45
