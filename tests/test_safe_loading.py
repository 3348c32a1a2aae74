"""Loading a registered model runs nothing stored: each kind of stored file, tampered with, is
refused by predict, export and kgi serve's check with a message naming it, and its payload never runs."""

from __future__ import annotations

import base64
import json
import os
import shutil
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.cli import main as kgi
from pipeline.core.errors import PipelineError
from pipeline.core.tracking import DIGEST_TAG, TamperedModelError, file_digests, stage_run, tracking_uri
from pipeline.deployment import export, serve
from pipeline.deployment.predict import Predictor, load_any, load_file
from pipeline.deployment.serving import log_scoring_model, score_images
from pipeline.models.files import ModelError
from pipeline.training.stage import register_models
from support.helpers import temporary_store

pytestmark = pytest.mark.usefixtures("one_thread")

SCORING, FOLD = "tiny-scoring", "synthetic-guided"


class Payload:
    """Pickled, it calls os.system when unpickled: what a tampered file would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with temporary_store(tmp_path_factory.mktemp("store"), "safe-loading-test") as folder:
        yield folder


@pytest.fixture(scope="module")
def registered(tiny, store: Path) -> dict[str, str]:
    """A fold model as the training stage registers it and a scoring model as the release does."""
    paths, _ = tiny
    out = store / "guided"
    out.mkdir()
    shutil.copyfile(paths["consistency"], out / "fold0.pt")
    with stage_run("train_guided", {}, dataset="synthetic") as run:
        register_models(run, out, "synthetic", "guided")
    log_scoring_model(paths["consistency"], 0.45, "zero_misses", SCORING, aliases=["champion"])
    return {"fold": f"models:/{FOLD}/1", "scoring": f"models:/{SCORING}@champion"}


def stored_folder(uri: str) -> Path:
    """Where the artifact store keeps a version's files (a local store: a folder)."""
    name, _, rest = uri.removeprefix("models:/").partition("/")
    client = MlflowClient(tracking_uri())
    if "@" in name:
        name, alias = name.split("@")
        rest = client.get_model_version_by_alias(name, alias).version
    location = client.get_model_version_download_uri(name, rest)
    if location.startswith("runs:/"):  # a fold model: a folder of its training run's artifacts
        run_id, _, path = location.removeprefix("runs:/").partition("/")
        location = f"{client.get_run(run_id).info.artifact_uri}/{path}"
    return Path(urllib.parse.urlparse(location).path)


def pickle_payload(marker: Path) -> bytes:
    """A file torch.load reads as a zip archive, with a pickle that runs a command if unpickled."""
    path = marker.with_suffix(".payload")
    torch.save({"config": {"kind": "baseline"}, "state_dict": Payload(marker)}, path)
    return path.read_bytes()


def attempts(uri: str, tmp_path: Path) -> dict[str, object]:
    """Each loader's answer for ``uri``: the exception it raised, or kgi serve's exit status."""
    answers: dict[str, object] = {}
    for name, load in (
        ("predict", lambda: load_any(uri)),
        ("export", lambda: export.main([uri, "--format", "onnx", "--out", str(tmp_path / "m.onnx")])),
    ):
        with pytest.raises(PipelineError) as error:
            load()
        answers[name] = error.value
    answers["serve"] = kgi(["serve", uri, "-p", "1"])
    return answers


@pytest.fixture(autouse=True)
def no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """kgi serve's check must refuse before a server starts: starting one fails the test instead."""

    def started(command: list[str]) -> int:
        raise AssertionError(f"kgi serve started a server: {command}")

    monkeypatch.setattr(serve, "run_server", started)


@pytest.mark.slow  # registering two models: about 20 s
@pytest.mark.parametrize(
    ("kind", "relative"),
    [
        ("fold", "model.pt"),
        ("scoring", "artifacts/model.pt"),
        ("scoring", "scoring_model.py"),
        ("scoring", "MLmodel"),
        ("scoring", "code/pipeline/deployment/serving.py"),
    ],
)
def test_a_tampered_file_is_refused_by_every_loader_naming_it_and_runs_nothing(
    registered: dict[str, str], kind: str, relative: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    uri = registered[kind]
    target = stored_folder(uri) / relative
    original = target.read_bytes()
    marker = tmp_path / "ran"
    if relative.endswith(".pt"):
        tampered = pickle_payload(marker)
    elif relative.endswith(".py"):
        tampered = original + f"\nimport os\nos.system('touch {marker}')\n".encode()
    else:  # the MLmodel: load a module of one's choosing instead
        tampered = original.replace(b"loader_module: mlflow.pyfunc.loaders.code_model", b"loader_module: os")
        assert tampered != original
    target.write_bytes(tampered)
    try:
        answers = attempts(uri, tmp_path)
    finally:
        target.write_bytes(original)
    for loader in ("predict", "export"):
        assert isinstance(answers[loader], TamperedModelError), (loader, answers[loader])
        assert f"its file {relative} differs since registration" in str(answers[loader])
    assert answers["serve"] == 1
    assert f"its file {relative} differs" in capsys.readouterr().err
    assert not marker.exists()
    load_any(uri)  # restored, it loads again


@pytest.mark.slow
def test_an_added_file_and_a_missing_digest_are_refused(registered: dict[str, str], tmp_path: Path) -> None:
    folder = stored_folder(registered["fold"])
    added = folder / "extra.pth"
    added.write_bytes(b"import os")
    try:
        with pytest.raises(TamperedModelError, match="its file extra.pth was added"):
            load_any(registered["fold"])
    finally:
        added.unlink()
    client = MlflowClient(tracking_uri())
    recorded = client.get_model_version(FOLD, "1").tags[DIGEST_TAG]
    client.delete_model_version_tag(FOLD, "1", DIGEST_TAG)
    try:
        with pytest.raises(TamperedModelError, match=f"has no {DIGEST_TAG} tag.*register it anew"):
            load_any(registered["fold"])
        assert kgi(["serve", registered["fold"], "-p", "1"]) == 1
    finally:
        client.set_model_version_tag(FOLD, "1", DIGEST_TAG, recorded)


@pytest.mark.slow
def test_with_its_digest_forged_too_a_pickled_model_file_is_still_not_unpickled(
    registered: dict[str, str], tmp_path: Path
) -> None:
    """Someone who can change the registry's tags as well as the files: weights_only still refuses."""
    folder = stored_folder(registered["fold"])
    original = (folder / "model.pt").read_bytes()
    marker = tmp_path / "ran"
    client = MlflowClient(tracking_uri())
    recorded = client.get_model_version(FOLD, "1").tags[DIGEST_TAG]
    (folder / "model.pt").write_bytes(pickle_payload(marker))
    client.set_model_version_tag(FOLD, "1", DIGEST_TAG, json.dumps(file_digests(folder)))
    try:
        with pytest.raises(ModelError, match="model.pt cannot be loaded.*refusing to load"):
            load_any(registered["fold"])
    finally:
        (folder / "model.pt").write_bytes(original)
        client.set_model_version_tag(FOLD, "1", DIGEST_TAG, recorded)
    assert not marker.exists()


@pytest.mark.slow
def test_a_version_holding_a_pt2_graph_is_refused_without_loading_it(
    registered: dict[str, str], store: Path, tmp_path: Path
) -> None:
    """A version registered the old way (an exported graph) is never handed to torch.export.load."""
    marker = tmp_path / "ran"
    graph = tmp_path / "graph" / "model.pt2"
    graph.parent.mkdir()
    graph.write_bytes(pickle_payload(marker))
    client = MlflowClient(tracking_uri())
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(graph), "old_model")
    version = client.create_model_version(FOLD, f"runs:/{run.info.run_id}/old_model", run.info.run_id).version
    client.set_model_version_tag(FOLD, version, DIGEST_TAG, json.dumps(file_digests(graph.parent)))
    with pytest.raises(ModelError, match=r"holds no model file .*it holds model.pt2.*pickled or exported \(pt2\)"):
        load_any(f"models:/{FOLD}/{version}")
    assert not marker.exists()


@pytest.mark.slow
def test_the_pyfunc_model_is_logged_as_code_not_as_a_pickle(registered: dict[str, str]) -> None:
    folder = stored_folder(registered["scoring"])
    stored = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert "scoring_model.py" in stored and not [name for name in stored if name.endswith((".pkl", ".pt2"))]
    assert "model_code_path" in (folder / "MLmodel").read_text()
    tags = MlflowClient(tracking_uri()).get_model_version_by_alias(SCORING, "champion").tags
    # Every stored file has its digest (MLflow writes registered_model_meta into each download).
    assert set(json.loads(tags[DIGEST_TAG])) - {"registered_model_meta"} == stored


def test_a_request_in_another_form_is_told_the_expected_one(tiny) -> None:
    paths, images = tiny
    predictor = Predictor(load_file(paths["baseline"]), 0.5)
    png = cv2.imencode(".png", images[0].numpy())[1].tobytes()
    text = base64.b64encode(png)
    # What MLflow's server hands the model for {"inputs": [...]} or {"instances": [...]}: the base64 text.
    table = score_images(predictor, [text, png, b"\x89PNG not really"])
    assert (
        "arrived as base64 text" in table["error"][0]
        and '{"dataframe_split": {"columns": ["image"]' in (table["error"][0])
    )
    assert table["error"][1] == "" and np.isfinite(table["score"][1])
    assert "is not a readable image" in table["error"][2] and "dataframe_split" not in table["error"][2]


@pytest.mark.slow
def test_kgi_serve_serves_the_checked_copy_not_the_store(
    registered: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    served: dict[str, object] = {}

    def run_server(command: list[str]) -> int:
        folder = Path(option(command, "-m"))
        served.update(command=command, files=file_digests(folder))
        return 0

    monkeypatch.setattr(serve, "run_server", run_server)
    assert kgi(["serve", registered["scoring"], "-p", "5099"]) == 0
    command = served["command"]
    assert isinstance(command, list) and command[1:5] == ["-m", "mlflow", "models", "serve"]
    assert option(command, "--env-manager") == "local"
    assert option(command, "-h") == "127.0.0.1" and option(command, "-p") == "5099"
    recorded = MlflowClient(tracking_uri()).get_model_version_by_alias(SCORING, "champion").tags[DIGEST_TAG]
    assert served["files"] == json.loads(recorded)  # exactly the files that were checked
    assert not Path(option(command, "-m")).exists()  # the copy goes when the server ends
    assert f"{registered['scoring']} is models:/{SCORING}/1" in capsys.readouterr().err


def option(command: list[str], name: str) -> str:
    """The value of the last ``name`` in ``command`` (``python -m mlflow`` has a -m of its own)."""
    return command[len(command) - command[::-1].index(name)]
