"""Robustness: interrupted training resumes, results repeat, bad params, bad input and an unusable
MLflow store are refused clearly, and no stage leaves half-written outputs.

The fast tests call the library on tiny in-memory data; the `slow` ones run stages and `dvc repro`
as subprocesses in shrunk copies of the project (one thread each: much faster on a shared CPU).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from helpers import (
    ROOT,
    SHRUNK,
    dvc,
    guided,
    make_shrunk_project,
    merge,
    noise_data,
    project_env,
    stages_run,
)
from mlflow.tracking import MlflowClient
from torch import nn

from pipeline.config import (
    ConfigError,
    GuidedParams,
    ModelParams,
    TrainParams,
    load_section,
    parse_section,
)
from pipeline.core.artifacts import (
    atomic_path,
    load_torch,
    output_dir,
    read_json,
    save_torch,
)
from pipeline.core.errors import DataError
from pipeline.core.tracking import (
    FAST_CHECK,
    TrackingError,
    connect,
    environment_defaults,
)
from pipeline.data import images
from pipeline.data.images import read_gray
from pipeline.data.prepared import PreparedData
from pipeline.models.files import save_model
from pipeline.training import loop as training
from pipeline.training.loop import (
    TrainingDiverged,
    _resumable_state,
    learning_rate,
    train,
)
from pipeline.training.objectives import Objective
from pipeline.training.stage import fingerprint_of, summarize, train_folds

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
MODEL = ModelParams(device="cpu")
PARAMS = TrainParams(epochs=3, batch_size=4, seed=0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data() -> PreparedData:
    return noise_data()


@pytest.fixture(scope="module")
def reference(data: PreparedData) -> tuple[nn.Module, list[dict]]:
    """An uninterrupted training run."""
    model, _, history = train(data, 0, MODEL, PARAMS)
    return model, history


def without_timings(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def leftovers(*folders: Path) -> list[Path]:
    return [path for folder in folders for path in folder.glob(".*.tmp-*")]


# --- determinism and resuming -------------------------------------------------------------------


def test_same_seed_gives_identical_metrics_and_weights(data: PreparedData, reference) -> None:
    model, _, history = train(data, 0, MODEL, PARAMS)
    assert without_timings(history) == without_timings(reference[1])
    assert json.dumps(summarize(history)) == json.dumps(summarize(reference[1]))  # the metrics file's content
    assert same_weights(model.state_dict(), reference[0].state_dict())
    _, _, other_seed = train(data, 0, MODEL, PARAMS.model_copy(update={"seed": 1}))
    assert without_timings(other_seed) != without_timings(history)


@pytest.mark.parametrize(
    "is_guided, update",
    [
        (False, {}),
        (True, {}),
        (False, {"lr_schedule": "cosine"}),
        (True, {"ema_epochs": 1.0, "warmup_epochs": 1.5}),
        (False, {"sampling": "undersample", "hard_negatives": 0.5}),
    ],
    ids=["baseline", "guided", "baseline-cosine-lr", "guided-ema-warmup", "baseline-hard-negatives"],
)
def test_run_interrupted_mid_training_resumes_to_the_uninterrupted_result(
    is_guided: bool, update: dict, data: PreparedData, reference, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    params, guidance = PARAMS.model_copy(update=update), None
    if is_guided:
        priors = torch.from_numpy(np.random.default_rng(1).random(data.images.shape, dtype=np.float32))
        params = GuidedParams(**params.model_dump())
        guidance = guided(params, priors, (priors > 0.8).float())
    if is_guided or update:
        uninterrupted, _, uninterrupted_history = train(data, 0, MODEL, params, guidance)
        reference = (uninterrupted, uninterrupted_history)
    checkpoint = tmp_path / "fold0.pt"

    def crash_in_epoch_2(record: dict) -> None:
        if record["epoch"] == 2:  # before epoch 2's checkpoint: the last complete one is epoch 1
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(data, 0, MODEL, params, guidance, checkpoint, crash_in_epoch_2, fingerprint="f")
    assert load_torch(checkpoint)["epoch"] == 0

    logged: list[dict] = []
    model, _, history = train(data, 0, MODEL, params, guidance, checkpoint, logged.append, fingerprint="f")
    assert "resuming fold 0 from its checkpoint after epoch 1" in capsys.readouterr().out
    assert without_timings(history) == without_timings(reference[1])
    assert same_weights(model.state_dict(), reference[0].state_dict())  # momentum and BatchNorm state restored
    assert logged == history  # the resumed run logs every epoch, the restored ones included


def test_cosine_learning_rate_decays_to_zero_batch_by_batch_and_changes_training(data: PreparedData, reference) -> None:
    cosine = PARAMS.model_copy(update={"epochs": 4, "lr": 0.2, "lr_schedule": "cosine"})
    assert [learning_rate(t, cosine) for t in (0, 1, 2, 3, 3.5, 4)] == pytest.approx(
        [0.2, 0.2 * (1 + 2**-0.5) / 2, 0.1, 0.2 * (1 - 2**-0.5) / 2, 0.2 * (1 - np.cos(np.pi / 8)) / 2, 0.0]
    )
    assert [learning_rate(t, PARAMS) for t in (0, 1.5, 3)] == [PARAMS.lr] * 3
    model, _, history = train(data, 0, MODEL, PARAMS.model_copy(update={"lr_schedule": "cosine"}))
    assert [record["lr"] for record in history] == pytest.approx([PARAMS.lr, PARAMS.lr * 0.75, PARAMS.lr * 0.25])
    assert [record["lr"] for record in reference[1]] == [PARAMS.lr] * 3
    assert history[1]["loss"] != reference[1][1]["loss"]
    assert not same_weights(model.state_dict(), reference[0].state_dict())


def test_hard_negatives_change_which_defect_free_images_train(data: PreparedData) -> None:
    undersampled = PARAMS.model_copy(update={"sampling": "undersample"})
    model, _, history = train(data, 0, MODEL, undersampled)
    hard, _, hard_history = train(data, 0, MODEL, undersampled.model_copy(update={"hard_negatives": 0.5}))
    assert without_timings(hard_history) != without_timings(history)
    assert not same_weights(hard.state_dict(), model.state_dict())


def test_hard_negative_scores_are_each_defect_free_images_last_training_logit(data: PreparedData) -> None:
    params = PARAMS.model_copy(update={"sampling": "undersample", "hard_negatives": 0.5, "batch_size": 3})
    run = training.set_up(data, 0, MODEL, params, Objective())
    logits, forward = [], run.objective.forward

    def recorded(*args):
        out = forward(*args)
        logits.append(out[0].detach().float().flatten())
        return out

    run.objective.forward = recorded
    positions = run.sampler.epoch(0)
    training.train_epoch(run, 0)
    by_position = dict(zip(positions.tolist(), torch.cat(logits).tolist()))
    negatives = run.sampler.negatives
    expected = [by_position.get(position, np.inf) for position in negatives]
    np.testing.assert_array_equal(run.sampler.negative_scores, expected)
    assert np.isfinite(run.sampler.negative_scores).sum() == len(positions) // 2


def test_warm_up_ramps_the_learning_rate_from_a_tenth_then_follows_the_schedule() -> None:
    warm = PARAMS.model_copy(update={"epochs": 4, "lr": 0.2, "warmup_epochs": 2.0})
    assert [learning_rate(t, warm) for t in (0, 1, 1.5, 2, 3.5)] == pytest.approx([0.02, 0.11, 0.155, 0.2, 0.2])
    cosine = warm.model_copy(update={"lr_schedule": "cosine"})
    assert learning_rate(1, cosine) == pytest.approx(0.55 * 0.2 * (1 + 2**-0.5) / 2)
    assert learning_rate(3, cosine) == pytest.approx(learning_rate(3, cosine.model_copy(update={"warmup_epochs": 0})))


def test_monitoring_every_other_epoch_scores_the_test_fold_then_and_at_the_end_and_trains_the_same(
    data: PreparedData, reference
) -> None:
    model, _, history = train(data, 0, MODEL, PARAMS.model_copy(update={"monitor_every": 2}))
    aps = [r["test_ap"] for r in history]
    assert np.isnan(aps[0]) and aps[1:] == [r["test_ap"] for r in reference[1]][1:]  # epochs 2 and 3 (the last)
    assert same_weights(model.state_dict(), reference[0].state_dict())
    assert "test AP" not in training.format_epoch(history[0]) and "test AP" in training.format_epoch(history[1])
    assert summarize(history)["test_ap_mean"] == pytest.approx(aps[-1])


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


def test_weight_average_is_the_saved_model_and_is_an_exponential_average_per_step(
    data: PreparedData, reference
) -> None:
    """With ema_epochs the saved weights are the average, not the last ones: rebuilt here from
    the per-step weights of a plain run with the same seed (the averaging never feeds back)."""
    steps: list[list[torch.Tensor]] = []
    original_step = torch.optim.SGD.step

    def recording_step(self, *args, **kwargs):
        result = original_step(self, *args, **kwargs)
        steps.append([p.detach().clone() for p in self.param_groups[0]["params"]])
        return result

    averaged = PARAMS.model_copy(update={"ema_epochs": 0.5})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.SGD, "step", recording_step)
        model, _, history = train(data, 0, MODEL, averaged)
    decay = np.exp(-1 / (0.5 * len(steps) / PARAMS.epochs))
    expected = steps[0][0]  # the average starts at the weights after the first step
    for weights in steps[1:]:
        expected = decay * expected + (1 - decay) * weights[0]
    saved = next(model.parameters())
    assert torch.allclose(saved, expected, atol=1e-6)
    assert not torch.allclose(saved, steps[-1][0], atol=1e-4)  # not the last weights
    assert [r["loss"] for r in history] == [r["loss"] for r in reference[1]]  # training itself is unchanged
    assert [r["test_ap"] for r in history] != [r["test_ap"] for r in reference[1]]  # the average is monitored


def test_checkpoint_of_other_params_or_unreadable_is_not_resumed(
    data: PreparedData, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoint = tmp_path / "fold0.pt"
    train(data, 0, MODEL, PARAMS.model_copy(update={"epochs": 1}), checkpoint=checkpoint, fingerprint="params A")
    assert _resumable_state(checkpoint, "params A")["epoch"] == 0
    assert _resumable_state(checkpoint, "params B") is None
    checkpoint.write_bytes(b"not a checkpoint")  # e.g. cut short by a power loss
    assert _resumable_state(checkpoint, "params A") is None
    assert "ignoring unreadable checkpoint" in capsys.readouterr().out


def test_fingerprint_covers_params_inputs_and_training_code(tmp_path: Path) -> None:
    inputs = tmp_path / "run.json"
    inputs.write_text("a")
    sections = {"train_baseline": PARAMS}
    fingerprint = fingerprint_of(sections, inputs)
    assert fingerprint == fingerprint_of(sections, inputs)
    assert fingerprint != fingerprint_of({"train_baseline": PARAMS.model_copy(update={"lr": 0.02})}, inputs)
    inputs.write_text("b")
    assert fingerprint != fingerprint_of(sections, inputs)


def test_checkpoints_and_models_load_with_weights_only(data: PreparedData, reference, tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint.pt"
    train(data, 0, MODEL, PARAMS.model_copy(update={"epochs": 1}), checkpoint=checkpoint)
    torch.load(checkpoint, weights_only=True)
    save_model(tmp_path / "model.pt", reference[0], {"kind": "baseline", "backbone": "resnet18", "in_channels": 1})
    assert same_weights(torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"], reference[0].state_dict())
    torch.save({"config": {}, "state_dict": {}, "code": Path("x")}, tmp_path / "pickled.pt")  # arbitrary object
    with pytest.raises(ValueError, match="refusing to load .*pickled.pt"):
        load_torch(tmp_path / "pickled.pt")


def test_the_same_training_saves_byte_identical_model_and_checkpoint_files(data: PreparedData, tmp_path: Path) -> None:
    params = PARAMS.model_copy(update={"epochs": 1})
    models = []
    for run in ("first", "second"):
        model, config, _ = train(data, 0, MODEL, params, checkpoint=tmp_path / run / "checkpoint.pt")
        save_model(tmp_path / run / "fold0.pt", model, config)
        models.append((tmp_path / run / "fold0.pt").read_bytes())
    assert models[0] == models[1]  # DVC recognises a retrained model as the one it stored
    # A checkpoint's history holds each epoch's seconds; the same state gives the same bytes.
    state = load_torch(tmp_path / "first" / "checkpoint.pt")
    save_torch(tmp_path / "again.pt", state)
    assert (tmp_path / "again.pt").read_bytes() == (tmp_path / "first" / "checkpoint.pt").read_bytes()


def test_no_temporary_name_leaks_into_a_saved_file(tmp_path: Path) -> None:
    path = tmp_path / "fold0.pt"
    save_torch(path, {"weights": torch.ones(3)})
    content = path.read_bytes()
    assert b".tmp-" not in content and b"fold0" not in content
    # torch names the records of its zip archive; the names must not depend on where it was written.
    save_torch(tmp_path / "elsewhere.pt", {"weights": torch.ones(3)})
    assert (tmp_path / "elsewhere.pt").read_bytes() == content
    assert leftovers(tmp_path) == []


# --- non-finite loss ----------------------------------------------------------------------------


class BreakAtTrainingCall(nn.Module):
    """Wraps a model; its n-th forward pass in training mode gives NaN logits or breaks a weight."""

    def __init__(self, model: nn.Module, call: int, weights: bool) -> None:
        super().__init__()
        self.model, self.call, self.weights, self.calls = model, call, weights, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += self.training
        logits = self.model(x)
        if self.training and self.calls == self.call:
            if not self.weights:
                return logits * float("nan")
            with torch.no_grad():  # after this batch's forward pass: its loss stays finite
                self.model.fc.bias.fill_(float("nan"))
        return logits


class NoTracking:
    def log_metrics(self, *args: object, **kwargs: object) -> None:
        pass


@pytest.mark.parametrize(
    ("weights", "call", "message"),
    [
        (False, 4, r"fold 0: loss is nan at epoch 2, batch 2; lower the learning rate"),
        (True, 2, r"fold 0: the weights are not finite after epoch 1; lower the learning rate"),
    ],
    ids=["nan-loss", "nan-weights"],
)
def test_non_finite_loss_or_weights_stop_training_naming_where_and_write_no_model(
    weights: bool, call: int, message: str, data: PreparedData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 16 training images, 4 defective: undersampled epochs of 8 images, 2 batches of 4.
    params = PARAMS.model_copy(update={"sampling": "undersample"})
    build = training.build_model
    monkeypatch.setattr(
        training, "build_model", lambda config, **kwargs: BreakAtTrainingCall(build(config, **kwargs), call, weights)
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TrainingDiverged, match=message), output_dir(tmp_path / "baseline") as out:
        train_folds(
            data, MODEL, params, lambda data, fold: Objective(), tmp_path / "checkpoints", run=NoTracking(), out=out
        )
    assert not (tmp_path / "baseline").exists()
    assert leftovers(tmp_path) == []


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


# --- MLflow tracking store ----------------------------------------------------------------------


def test_unreachable_tracking_server_is_reported_within_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on port 9
    started = time.perf_counter()
    with pytest.raises(TrackingError, match="'http://127.0.0.1:9' is unreachable or misconfigured"):
        connect()
    assert time.perf_counter() - started < 30  # MLflow's own retries would take about 4 minutes
    assert not set(FAST_CHECK) & set(os.environ)  # the fast-fail settings do not outlive the check


@pytest.mark.parametrize("uri", ["sqlite:///{tmp}/missing/mlflow.db", "nosuchscheme://host/path"])
def test_misconfigured_tracking_uri_is_reported(uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(tmp=tmp_path))
    with pytest.raises(TrackingError, match="MLFLOW_TRACKING_URI"):
        connect()
    assert not (tmp_path / "missing").exists()


def test_fast_check_settings_leave_the_users_own_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in FAST_CHECK:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    with environment_defaults(FAST_CHECK):
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == FAST_CHECK["MLFLOW_HTTP_REQUEST_TIMEOUT"]
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ


# --- input images -------------------------------------------------------------------------------


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that announces width x height 8-bit gray pixels but holds only a few rows."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def test_image_over_the_pixel_limit_is_refused_naming_file_size_limit_and_param(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    cv2.imwrite(str(path), np.zeros((80, 100), np.uint8))
    assert read_gray(str(path), max_pixels=8_000).shape == (80, 100)
    with pytest.raises(DataError) as error:
        read_gray(str(path), max_pixels=7_999)
    for fragment in (str(path), "100x80 = 8,000 pixels", "limit of 7,999", "prepare.max_image_pixels"):
        assert fragment in str(error.value)


def test_huge_image_is_refused_from_its_header_without_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(200_000, 100_000))  # 20 gigapixels in a file of under 1 kB

    def no_decoding(*args: object) -> None:
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(images.cv2, "imdecode", no_decoding)
    with pytest.raises(DataError, match="200000x100000 = 20,000,000,000 pixels, more than the limit of 50,000,000"):
        read_gray(str(path))


def test_image_without_a_readable_header_is_checked_after_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "image.png"
    cv2.imwrite(str(path), np.zeros((80, 100), np.uint8))
    monkeypatch.setattr(images, "_header_size", lambda data: None)  # a format Pillow does not know
    with pytest.raises(DataError, match="100x80"):
        read_gray(str(path), max_pixels=1_000)


# --- atomic outputs -----------------------------------------------------------------------------


def test_failed_block_keeps_the_previous_file_and_folder_and_no_temporary(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    (tmp_path / "metrics.json").write_text("old")
    with pytest.raises(RuntimeError), output_dir(tmp_path / "out") as out:
        (out / "new.txt").write_text("half")
        raise RuntimeError("failed midway")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "metrics.json") as temporary:
        temporary.write_text("half")
        raise RuntimeError("failed midway")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]
    assert (tmp_path / "metrics.json").read_text() == "old"
    assert leftovers(tmp_path) == []


def test_output_folder_is_swapped_in_whole_and_leftovers_of_a_killed_run_removed(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    (tmp_path / ".out.tmp-killed").mkdir()  # what a kill -9 while building leaves
    with output_dir(tmp_path / "out") as out:
        (out / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"]
    assert leftovers(tmp_path) == []
    save_torch(tmp_path / "model.pt", {"w": torch.ones(2)})
    assert torch.equal(load_torch(tmp_path / "model.pt")["w"], torch.ones(2)) and leftovers(tmp_path) == []
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "file").write_text("x")
    # Readable by others as plainly written files are, not private like tempfile's.
    assert (tmp_path / "out").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    assert (tmp_path / "model.pt").stat().st_mode & 0o777 == (plain / "file").stat().st_mode & 0o777


# --- stages and dvc repro, as subprocesses ------------------------------------------------------


@pytest.fixture(scope="module")
def prepared_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shrunk project (3 baseline epochs) where `dvc repro prepare` has run; tests use copies."""
    overrides = merge(copy.deepcopy(SHRUNK), {"train_baseline": {"epochs": 3}})
    project = make_shrunk_project(tmp_path_factory.mktemp("prepared"), overrides)
    dvc(project, "repro", "prepare", **ONE_THREAD)
    return project


def copy_project(project: Path, target: Path) -> Path:
    shutil.copytree(project, target, symlinks=True)
    return target


def start(project: Path, *command: str) -> tuple[subprocess.Popen, Path]:
    """Start a command in its own process group, its output going to a file (read it with .read_text())."""
    log = project / f"{command[-1]}.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            command,
            cwd=project,
            env=project_env(project, **ONE_THREAD),
            start_new_session=True,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    return process, log


@pytest.mark.slow
def test_training_killed_mid_epoch_resumes_under_dvc_repro_with_the_same_result(
    prepared_project: Path, tmp_path: Path
) -> None:
    killed = copy_project(prepared_project, tmp_path / "killed")
    uninterrupted = copy_project(prepared_project, tmp_path / "uninterrupted")
    dvc_repro = (sys.executable, "-m", "dvc", "repro", "train_baseline")
    reference, reference_log = start(uninterrupted, *dvc_repro)  # runs meanwhile, on the other core
    victim, victim_log = start(killed, *dvc_repro)
    checkpoint = killed / "data/checkpoints/train_baseline/fold0.pt"
    deadline = time.monotonic() + 240
    while not checkpoint.exists():  # written (atomically) right after epoch 1
        assert victim.poll() is None and time.monotonic() < deadline, victim_log.read_text()
        time.sleep(0.02)
    os.killpg(victim.pid, signal.SIGKILL)  # dvc and the stage, as a lost machine or the OOM killer would
    victim.wait()
    done = load_torch(checkpoint)["epoch"] + 1
    assert done < 3 and not (killed / "data/baseline").exists(), victim_log.read_text()

    output = dvc(killed, "repro", "train_baseline", **ONE_THREAD)  # no stale lock: DVC drops a dead pid's
    assert stages_run(output) == ["train_baseline"]
    assert f"resuming fold 0 from its checkpoint after epoch {done}" in output
    assert reference.wait(timeout=300) == 0, reference_log.read_text()

    for name in ("data/metrics/train_baseline.json", "data/plots/train_baseline.csv"):
        assert (killed / name).read_text() == (uninterrupted / name).read_text(), name
    assert same_weights(
        load_torch(killed / "data/baseline/fold0.pt")["state_dict"],
        load_torch(uninterrupted / "data/baseline/fold0.pt")["state_dict"],
    )
    assert not checkpoint.exists() and leftovers(killed / "data") == []

    # The resumed MLflow run holds every epoch, with the uninterrupted run's values, and the seed.
    def test_ap_history(project: Path) -> dict[int, float]:
        client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
        run_id = read_json(project / "data/baseline/run.json")["mlflow_run_id"]
        assert client.get_run(run_id).data.params["train_baseline.seed"] == "0"
        return {m.step: m.value for m in client.get_metric_history(run_id, "fold0/test_ap")}

    assert test_ap_history(killed) == test_ap_history(uninterrupted)
    assert sorted(test_ap_history(killed)) == [1, 2, 3]


@pytest.mark.slow
def test_stage_reports_an_unreachable_tracking_server_before_training(prepared_project: Path, tmp_path: Path) -> None:
    project = copy_project(prepared_project, tmp_path / "project")
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "stages.train_baseline"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=600,
        env=project_env(project, MLFLOW_TRACKING_URI="http://127.0.0.1:9", **ONE_THREAD),
    )
    assert result.returncode == 1
    assert time.perf_counter() - started < 60
    assert "[train_baseline] error: MLflow tracking store 'http://127.0.0.1:9' is unreachable" in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "epoch" not in result.stdout
    assert not (project / "data/baseline").exists() and not (project / "data/checkpoints").exists()


@pytest.mark.slow
def test_stage_failing_on_bad_input_midway_keeps_its_previous_outputs(prepared_project: Path, tmp_path: Path) -> None:
    project = copy_project(prepared_project, tmp_path / "project")
    source = tmp_path / "images"
    names = ["defect/a", "defect/b", "defect/c", "good/a", "good/b", "good/c", "good/d", "good/e", "good/f"]
    for value, name in enumerate(names):  # distinct bytes: copies would be merged into one group
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(source / f"{name}.png"), np.full((24, 24), value, np.uint8))
    cv2.imwrite(str(source / "defect/z.png"), np.zeros((200, 200), np.uint8))  # read after a, b, c: midway
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["prepare"].update(dataset="folder", path=str(source), max_image_pixels=10_000)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    before = {path: path.read_bytes() for path in (project / "data").rglob("*") if path.is_file()}

    result = subprocess.run(
        [sys.executable, "-m", "stages.prepare"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=600,
        env=project_env(project, **ONE_THREAD),
    )
    assert result.returncode == 1
    assert f"{source / 'defect/z.png'} is 200x200 = 40,000 pixels, more than the limit of 10,000" in result.stderr
    assert {path: path.read_bytes() for path in (project / "data").rglob("*") if path.is_file()} == before
