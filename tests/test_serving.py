"""The scoring endpoint: a pyfunc model of image bytes, registered, served over REST, scoring as predict does."""

from __future__ import annotations

import base64
import json
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest

from pipeline.core.errors import InputError
from pipeline.core.tracking import DIGEST_TAG
from pipeline.deployment.predict import decision_threshold, load_any, main
from pipeline.deployment.serving import log_scoring_model, request_body, score_images, served
from pipeline.models.files import ModelError
from support.helpers import temporary_store

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "tiny-release"
CHAMPION = f"models:/{NAME}@champion"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with temporary_store(tmp_path_factory.mktemp("store"), "serving-test") as folder:
        yield folder


@pytest.fixture(scope="module")
def released(tiny, store: Path):
    """The tiny consistency model logged as a scoring model, version 1 of NAME with alias champion."""
    paths, _ = tiny
    return log_scoring_model(
        paths["consistency"], 0.45, "zero_misses", NAME, aliases=["champion"], tags={"kind": "release"}
    )


@pytest.fixture(scope="module")
def photos(tiny, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real image files of another size than the model's: PNG and JPEG, gray and colour; and a corrupt one."""
    _, images = tiny
    folder = tmp_path_factory.mktemp("photos")
    files = {}
    for k, (name, colour) in enumerate(
        (("gray.png", False), ("colour.png", True), ("gray.jpg", False), ("colour.jpg", True))
    ):
        gray = np.kron(images[k].numpy(), np.ones((2, 3), np.uint8))  # 64 x 96, the model reads 32 x 32
        picture = np.stack([gray, np.flipud(gray), 255 - gray], axis=-1) if colour else gray
        files[name] = folder / name
        assert cv2.imwrite(str(files[name]), picture)
    files["corrupt.png"] = folder / "corrupt.png"
    files["corrupt.png"].write_bytes(files["gray.png"].read_bytes()[:40])  # cut short: no IEND chunk
    return files


def predicted(photos: dict[str, Path], out: Path, threshold: float) -> pd.DataFrame:
    """What the predict command says about the readable photos, by file name."""
    paths = [str(path) for name, path in photos.items() if not name.startswith("corrupt")]
    return (
        main(["--model", CHAMPION, *paths, "--out", str(out), "--threshold", str(threshold)])
        .assign(name=lambda t: t["path"].map(lambda p: Path(p).name))
        .set_index("name")
    )


def check_answers(answers: pd.DataFrame, photos: dict[str, Path], expected: pd.DataFrame) -> None:
    answers = answers.set_axis(list(photos)).replace({np.nan: None})
    corrupt = answers.loc["corrupt.png"]
    assert "truncated" in corrupt["error"] and corrupt["score"] is None and corrupt["decision"] == ""
    scored = answers.drop(index="corrupt.png")
    assert (scored["error"] == "").all() and (scored["threshold"] == 0.45).all()
    assert (scored["operating_point"] == "zero_misses").all()
    np.testing.assert_allclose(scored["score"].astype(float), expected.loc[scored.index, "score"], rtol=0, atol=1e-6)
    assert list(scored["decision"]) == list(expected.loc[scored.index, "decision"])


@pytest.mark.slow  # logging the scoring model: about 15 s
def test_pyfunc_scores_image_bytes_as_predict_does(released, photos: dict[str, Path], tmp_path: Path) -> None:
    assert str(released.version) == "1" and released.aliases == ["champion"]
    digests = json.loads(released.tags.pop(DIGEST_TAG))
    assert released.tags == {"threshold": "0.45", "operating_point": "zero_misses", "kind": "release"}
    # Every file of the version has its digest: the model file, the code file, the MLmodel, the package.
    assert {"MLmodel", "artifacts/model.pt", "scoring_model.py", "code/pipeline/deployment/serving.py"} <= set(digests)
    assert not [name for name in digests if name.endswith((".pkl", ".pt2"))]  # nothing pickled is stored
    expected = predicted(photos, tmp_path / "predict", 0.45)
    model = mlflow.pyfunc.load_model(CHAMPION)
    assert model.metadata.metadata["threshold"] == 0.45 and model.metadata.metadata["operating_point"] == "zero_misses"
    contents = [path.read_bytes() for path in photos.values()]
    answers = model.predict(pd.DataFrame({"image": contents}), params={"heatmap": True})
    check_answers(answers, photos, expected)
    # The heatmap is the overlay predict writes, as a PNG.
    heatmap = base64.b64decode(answers["heatmap"].iloc[0])
    overlay = cv2.imread(expected.loc["gray.png", "overlay"])
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(heatmap, np.uint8), cv2.IMREAD_COLOR), overlay)
    assert answers["heatmap"].iloc[-1] == ""
    # Base64 strings, as JSON carries them, score alike; no heatmap unless asked for.
    strings = [base64.b64encode(content).decode() for content in contents]
    again = score_images(model.unwrap_python_model().predictor, strings, operating_point="zero_misses")
    check_answers(again, photos, expected)
    assert (again["heatmap"] == "").all()


@pytest.mark.slow  # logging and starting mlflow models serve: about a minute on a busy machine
def test_served_endpoint_answers_as_predict_and_survives_a_corrupt_image(
    released, photos: dict[str, Path], tmp_path: Path
) -> None:
    expected = predicted(photos, tmp_path / "predict", 0.45)
    with socket.socket() as probe:  # a free port; the server binds it right after
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with served(CHAMPION, port) as url:
        answers = []
        gray = base64.b64encode(photos["gray.png"].read_bytes()).decode()
        for body in (
            request_body([path.read_bytes() for path in photos.values()]),
            request_body([photos["gray.png"].read_bytes()]),
            json.dumps({"inputs": [gray]}).encode(),  # another form: MLflow hands the model the text
        ):
            request = urllib.request.Request(
                f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=60) as answer:
                answers.append(json.loads(answer.read())["predictions"])
        with urllib.request.urlopen(f"{url}/ping", timeout=10) as answer:
            assert answer.status == 200  # still alive after the corrupt image
    check_answers(pd.DataFrame(answers[0]), photos, expected)
    assert answers[1][0]["score"] == pytest.approx(expected.loc["gray.png", "score"], abs=1e-6)
    assert answers[0][-1]["score"] is None  # JSON null, not NaN
    assert answers[2][0]["score"] is None and "arrived as base64 text" in answers[2][0]["error"]
    assert '{"dataframe_split": {"columns": ["image"]' in answers[2][0]["error"]


@pytest.mark.slow
def test_predict_reads_the_released_threshold_and_operating_point(released) -> None:
    loaded = load_any(CHAMPION)
    assert loaded.source == f"models:/{NAME}/1"
    threshold, origin = decision_threshold(loaded)
    assert threshold == 0.45 and origin.startswith(f"tag threshold of models:/{NAME}/1 (operating point")
    assert decision_threshold(loaded, 0.2) == (0.2, "--threshold")


def test_log_scoring_model_refuses_bad_input_naming_it(tiny, tmp_path: Path) -> None:
    paths, _ = tiny
    with pytest.raises(InputError, match="threshold 1.5 for x"):
        log_scoring_model(paths["baseline"], 1.5, "zero_misses", "x")
    with pytest.raises(InputError, match="saliency='nope'"):
        log_scoring_model(paths["baseline"], 0.5, "zero_misses", "x", saliency="nope")
    with pytest.raises(ModelError, match="variant teacher.*--teacher"):
        log_scoring_model(paths["teacher"], 0.5, "zero_misses", "x")
    with pytest.raises(ModelError, match="not found"):
        log_scoring_model(tmp_path / "missing.pt", 0.5, "zero_misses", "x")


def test_every_kind_of_bad_value_gets_its_own_error_and_the_rest_is_scored(tiny, photos: dict[str, Path]) -> None:
    from pipeline.deployment.predict import Predictor, load_file

    paths, _ = tiny
    predictor = Predictor(load_file(paths["baseline"]), 0.5)
    good = photos["gray.png"].read_bytes()
    values = [good, None, 42, "a", base64.b64encode(b"not an image").decode(), "", base64.b64encode(good).decode()]
    table = score_images(predictor, values, operating_point="min_precision: 0.9")
    errors = list(table["error"])
    # The same image in two places of one fp32 batch: equal up to float order (oneDNN's kernels on a CPU
    # with AVX-512 sum another place of the batch in another order: 3e-8 apart there).
    assert errors[0] == errors[-1] == "" and table["score"][0] == pytest.approx(table["score"][6], abs=1e-6)
    assert "is a NoneType" in errors[1] and "is a int" in errors[2] and "not base64" in errors[3]
    assert "image 4 is not a readable image" in errors[4] and "image 5 is empty" in errors[5]
    assert table["score"][1:6].isna().all() and (table["decision"][1:6] == "").all()
    assert (table["operating_point"] == "min_precision: 0.9").all() and (table["threshold"] == 0.5).all()


@pytest.mark.slow  # logging a second scoring model: about 15 s
def test_a_teacher_variant_model_carries_its_baseline(
    tiny, store: Path, photos: dict[str, Path], tmp_path: Path
) -> None:
    paths, _ = tiny
    log_scoring_model(
        paths["teacher"],
        0.2,
        "zero_misses",
        "tiny-teacher",
        teacher_file=paths["baseline"],
        teacher_saliency="layercam",
        aliases=["champion"],
    )
    model = mlflow.pyfunc.load_model("models:/tiny-teacher@champion")
    answers = model.predict(pd.DataFrame({"image": [photos["colour.jpg"].read_bytes()]}))
    expected = main(
        [
            "--model",
            str(paths["teacher"]),
            "--teacher",
            str(paths["baseline"]),
            str(photos["colour.jpg"]),
            "--out",
            str(tmp_path / "out"),
            "--threshold",
            "0.2",
        ]
    )
    assert answers["score"][0] == pytest.approx(expected["score"][0], abs=1e-6)
    assert answers["decision"][0] == expected["decision"][0] and answers["threshold"][0] == 0.2
