"""params.yaml: bad keys, types and values are refused naming the key and what is allowed; a stage
with bad params exits before any work."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, TrainParams, load_section, parse_section
from support.helpers import ROOT, make_shrunk_project, project_env


def test_variance_params_are_validated_with_a_message_naming_them() -> None:
    for section, values, message in [
        ("train_baseline", {"warmup_epochs": -1}, "train_baseline.warmup_epochs"),
        ("train_guided", {"epochs": 4, "warmup_epochs": 4}, "warmup_epochs .4.0. must be below epochs .4."),
        ("train_guided", {"ema_epochs": "long"}, "train_guided.ema_epochs"),
        ("train_baseline", {"sampling": "balanced"}, "train_baseline.sampling"),
        ("model", {"test_time_flips": "maybe"}, "model.test_time_flips"),
        ("train_guided", {"monitor_every": 0}, "train_guided.monitor_every"),
        ("train_baseline", {"hard_negatives": 1.5}, "train_baseline.hard_negatives"),
        ("train_guided", {"hard_negatives": 0.5}, "hard_negatives needs sampling: undersample"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_section(section, values)


def test_sharper_prior_params_are_validated_with_a_message_naming_them() -> None:
    for section, values, message in [
        ("saliency", {"reference_weight": 1.5}, "saliency.reference_weight"),
        ("saliency", {"reference_weight": "half"}, "saliency.reference_weight"),
        ("saliency", {"reference_layer": ""}, "saliency.reference_layer: is empty; use null"),
        ("saliency", {"reference_layer": 2}, "saliency.reference_layer"),
        ("saliency", {"reference_bank": 0}, "saliency.reference_bank"),
        ("pseudo_labels", {"refine": "bilateral"}, "pseudo_labels.refine.*'none' or 'guided_filter'"),
        ("pseudo_labels", {"refine_radius": 0}, "pseudo_labels.refine_radius"),
        ("pseudo_labels", {"refine_eps": 0}, "pseudo_labels.refine_eps"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_section(section, values)


# --- params -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params_text", "expected"),
    [
        ("trian_baseline: {epochs: 2}", ["unknown section(s) trian_baseline", "allowed: prepare, model"]),
        (
            "prepare: {synthetic: {itmes: 3}}",
            ["unknown key 'prepare.synthetic.itmes'", "allowed here: items, images_per_item"],
        ),
        ("train_baseline: {epochs: ten}", ["train_baseline.epochs: expected a whole number, got the text 'ten'"]),
        # Strict types: a quoted number or switch is text, refused with what to write instead.
        (
            'train_baseline: {epochs: "10"}',
            ["train_baseline.epochs: expected a whole number, got the text '10'; write epochs: 10 without quotes"],
        ),
        (
            "train_baseline: {epochs: 10.0}",
            ["train_baseline.epochs: expected a whole number, got 10.0; write epochs: 10"],
        ),
        (
            'train_baseline: {lr: "1e-3"}',
            ["train_baseline.lr: expected a number, got the text '1e-3'; write lr: 1e-3 without"],
        ),
        (
            'model: {pin_memory: "true"}',
            ["model.pin_memory: expected true or false, got the text 'true'; write pin_memory: true without quotes"],
        ),
        ("model: {pin_memory: 1}", ["model.pin_memory: expected true or false, got 1; write pin_memory: true"]),
        ('prepare: {synthetic: {items: "4"}}', ["prepare.synthetic.items: expected a whole number, got the text '4'"]),
        # A union (a number or 'all') names the key alone and says what to write, once.
        (
            'prepare: {defective_images: "5"}',
            ["prepare.defective_images: expected a whole number, got the text '5'; write"],
        ),
        ("train_baseline: {batch_size: yes}", ["train_baseline.batch_size", "not a boolean"]),
        ("train_baseline: {lr: 0}", ["train_baseline.lr", "greater than 0"]),
        ("train_baseline: {momentum: 1.5}", ["train_baseline.momentum", "less than 1"]),
        ("train_baseline: {seed: 99999999999}", ["train_baseline.seed", "less than or equal to 4294967295"]),
        ("train_guided: {seg_weight: .nan}", ["train_guided.seg_weight", "finite number"]),
        ("model: {backbone: resnet50}", ["model.backbone", "'resnet18' or 'vgg16'"]),
        ("prepare: {max_image_pixels: 0}", ["prepare.max_image_pixels", "greater than or equal to 1"]),
        # Another stage's section is checked too: `dvc repro` stops at its first stage.
        ("evaluate: {threshold: 2}", ["evaluate.threshold", "less than 1"]),
        ("train_baseline: {epochs: 2\n", ["params.yaml is not valid YAML"]),
        ("- a list", ["must hold a mapping of sections"]),
    ],
)
def test_bad_params_are_refused_naming_the_key_and_what_is_allowed(
    params_text: str, expected: list[str], tmp_path: Path
) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(params_text)
    with pytest.raises(ConfigError) as error:
        load_section("train_baseline", path)
    for fragment in expected:
        assert fragment in str(error.value)


def test_valid_params_take_defaults_and_read_numbers_as_dvc_does(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    # YAML 1.2 (DVC's ruamel.yaml) reads 1e-3 as a number, PyYAML's YAML 1.1 as text; a whole
    # number is a valid float; null stays None where allowed.
    path.write_text("train_baseline: {lr: 1e-3, weight_decay: 0}\ntrain_guided: {seg_weight: 2}\nprepare:\n")
    assert load_section("train_baseline", path) == TrainParams(lr=0.001, weight_decay=0.0)
    assert load_section("train_guided", path).seg_weight == 2.0
    prepare = load_section("prepare", path)
    assert prepare.max_image_pixels == 50_000_000 and prepare.path is None


def test_dvc_set_param_overrides_validate_with_their_types(tmp_path: Path) -> None:
    from dvc.utils.hydra import apply_overrides  # what `dvc exp run -S` writes params.yaml with

    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    overrides = ["train_baseline.epochs=10", "train_baseline.lr=1e-5", "model.pin_memory=true"]
    apply_overrides(path, [*overrides, "train_guided.seg_weight=2", "prepare.defective_images=all", "seed=3"])
    assert "lr: 1e-05" in path.read_text()  # text to PyYAML's YAML 1.1
    baseline, model = load_section("train_baseline", path), load_section("model", path)
    assert (baseline.epochs, baseline.lr, baseline.seed, model.pin_memory) == (10, 1e-5, 3, True)
    assert load_section("train_guided", path).seg_weight == 2.0


@pytest.mark.slow
def test_stage_with_bad_params_exits_before_any_work(tmp_path: Path) -> None:
    project = make_shrunk_project(tmp_path / "project", {"train_baseline": {"epochs": 2, "eopchs": 3}})
    result = subprocess.run(
        [sys.executable, "-m", "stages.train_baseline"],
        cwd=project,
        env=project_env(project),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1
    message = result.stderr.strip()
    assert message.count("\n") == 0, message  # one line, no traceback
    assert "unknown key 'train_baseline.eopchs' (allowed here: epochs, batch_size" in message
    assert not (project / "data").exists() and not (project / "mlflow.db").exists()


def test_a_method_that_explains_one_layer_is_refused_two_naming_the_key() -> None:
    one = parse_section("saliency", {"method": "gradcam", "layers": ["features.maxpool"]})
    assert one.layers == ["features.maxpool"]
    with pytest.raises(ConfigError, match=r"saliency.method 'gradcam' explains 1 layer, saliency.layers names 2"):
        parse_section("saliency", {"method": "gradcam", "layers": ["features.relu", "features.maxpool"]})
