"""Export to ONNX and TorchScript: the exported file gives the PyTorch model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from pipeline.export import example_inputs, export, main, run_exported
from pipeline.model_files import load_model
from pipeline.saliency import create_saliency, saliency_maps
from pipeline.training_data import to_input


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("name", ["baseline", "consistency", "teacher"])
def test_exported_model_gives_the_pytorch_logits(tiny, tmp_path: Path, name: str, fmt: str) -> None:
    paths, images = tiny
    model, config = load_model(paths[name])
    out = tmp_path / f"{name}.{fmt}"
    assert export(model, config, fmt, out, threshold=0.4) <= 1e-4
    # Real images, normalised as predict does, in a batch of another size than the traced one.
    inputs = (to_input(images[:5], config["in_channels"], config["mean"], config["std"]),)
    if name == "teacher":
        baseline, baseline_config = load_model(paths["baseline"])
        prior = saliency_maps(create_saliency("layercam", baseline), baseline_config, images[:5])[0]
        inputs += (torch.from_numpy(prior).unsqueeze(1),)
        expected = model(*inputs)[0]
    else:
        expected = model(*inputs)
    np.testing.assert_allclose(run_exported(out, fmt, inputs), expected.detach().numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:FutureWarning")
def test_config_and_threshold_travel_with_the_file(tiny, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    paths, _ = tiny
    main([str(paths["consistency"]), "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--threshold", "0.3"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["inputs"] == ["images"] and report["max_logit_difference"] <= 1e-4
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(props["pipeline_config"]) == load_model(paths["consistency"])[1]
    assert json.loads(props["threshold"]) == 0.3
    main([str(paths["teacher"]), "--format", "torchscript", "--out", str(tmp_path / "t.pt"), "--threshold", "0.3"])
    extra = {"pipeline_config.json": "", "threshold.json": ""}
    scripted = torch.jit.load(str(tmp_path / "t.pt"), _extra_files=extra)
    assert json.loads(extra["pipeline_config.json"])["variant"] == "teacher"
    assert scripted(*example_inputs(json.loads(extra["pipeline_config.json"]), batch=1)).shape == (1,)


def test_an_unknown_format_is_refused(tiny, tmp_path: Path) -> None:
    model, config = load_model(tiny[0]["baseline"])
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export(model, config, "tflite", tmp_path / "m.tflite", 0.5)
    assert not (tmp_path / "m.tflite").exists()
