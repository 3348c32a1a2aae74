"""Serving: a trained model as an MLflow pyfunc model that takes image files and scores them.

``log_scoring_model`` logs a model file (with its teacher for variant teacher), the decision
threshold and the operating point it was chosen at as a pyfunc model and registers it; then

    kgi serve models:/<name>@champion -p 5001

serves it over REST (``POST /invocations``). The input is one column ``image`` of image files'
bytes (PNG, JPEG, BMP or TIFF: formats whose size the header tells; any size up to the limits,
gray or colour, read as gray and resized as ``pipeline.deployment.predict`` does); over REST,
MLflow expects a binary column base64-encoded:

    {"dataframe_split": {"columns": ["image"], "data": [["<base64 of a.png>"], ["<base64 of b.jpg>"]]},
     "params": {"heatmap": true}}

The answer is ``{"predictions": [...]}``, one record per image, in order: ``score`` (defect
probability, null where the image could not be read), ``decision`` (``defect`` / ``ok``, empty
on error), ``threshold``, ``operating_point``, ``heatmap`` (with ``params.heatmap`` true: the
overlay predict writes, its longer side capped, a base64 PNG; else empty) and ``error`` (why the
image could not be read or was refused; empty when it was scored). A corrupt, unaccepted or
too large image gets its error and the others are scored; a string that is not base64 at all
makes MLflow refuse the whole request (HTTP 400) before the model sees it. Scores are
``pipeline.deployment.predict``'s: the same reading, resizing and ``Predictor``.

The limits (``ServingParams``: pixels per image and per request, the heatmap's size, the formats,
how many images a worker decodes at once) travel in the logged model's model config; each image
is refused from its header before it is decoded, and reduced to the model's input size (and the
heatmap's) right after, so a worker's memory stays bounded whatever the mix of requests.
"""

from __future__ import annotations

import base64
import re
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext

from pipeline.config import ServingParams
from pipeline.core.errors import DataError, InputError
from pipeline.data.images import check_file, decode_gray, read_header
from pipeline.deployment.predict import SCORING_MODEL_FILE, Predictor, decision, load_file, overlay_picture
from pipeline.knowledge.saliency import METHODS
from pipeline.metrics.figures import png_bytes
from pipeline.models.files import needs_prior

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.models import ModelSignature

IMAGE_COLUMN = "image"
OUTPUT_COLUMNS = ("score", "decision", "threshold", "operating_point", "heatmap", "error")
BATCH_SIZE = 16  # images per forward, as predict's default (each held at the model's input size)
TEACHER_FILE = "teacher.pt"
MODEL_CODE = Path(__file__).with_name("scoring_model.py")  # what the logged model runs to build itself
# What the served code imports; pinned to the versions it was logged with.
REQUIREMENTS = (
    "torch",
    "torchvision",
    "mlflow",
    "numpy",
    "pandas",
    "opencv-contrib-python-headless",
    "pillow",
    "simplejpeg",
    "pydantic",
    "pyyaml",
    "matplotlib",
    "scikit-learn",
    "scipy",
)


class ScoringModel(PythonModel):
    """The pyfunc model: image bytes in, score, decision, threshold (and heatmap) out."""

    def load_context(self, context: PythonModelContext) -> None:
        settings = context.model_config
        teacher = context.artifacts.get("teacher")
        self.operating_point = str(settings["operating_point"])
        self.limits = ServingLimits.of(settings)
        self.predictor = Predictor(
            load_file(Path(context.artifacts["model"])),
            float(settings["threshold"]),
            settings["saliency"],
            load_file(Path(teacher)) if teacher else None,
            settings["teacher_saliency"],
        )

    def predict(self, context: Any, model_input: pd.DataFrame, params: Mapping[str, Any] | None = None) -> pd.DataFrame:
        if IMAGE_COLUMN not in model_input.columns:
            raise InputError(
                f"the request has columns {list(model_input.columns)}; send the image files' bytes "
                f"(base64 in JSON) in a column named {IMAGE_COLUMN!r}"
            )
        heatmap = bool((params or {}).get("heatmap", False))
        return score_images(self.predictor, model_input[IMAGE_COLUMN], heatmap, self.operating_point, self.limits)


def image_bytes(value: object) -> bytes:
    """An image file's bytes from a request value: bytes as they are, a string as base64."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value.encode("ascii"), validate=False)
        except (ValueError, UnicodeEncodeError) as error:
            raise DataError(
                f"the value is a string but not base64 ({error}); send the file's bytes base64-encoded"
            ) from error
    raise DataError(f"the value is a {type(value).__name__}; send the image file's bytes (base64 in JSON)")


# MLflow's server decodes a binary column's base64 only in the dataframe_split / dataframe_records
# forms; in the inputs / instances forms the model gets the base64 text itself as bytes.
EXPECTED_FORM = (
    'send the request in the dataframe_split form with column "image" holding each file\'s bytes '
    'base64-encoded: {"dataframe_split": {"columns": ["image"], "data": [["<base64 of the file>"]]}}'
)
_BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/\s]+={0,2}\s*")


def in_another_form(value: object, position: int) -> DataError | None:
    """The error naming the expected request form where ``value`` is base64 text of an image that
    was never decoded (a request in another form); None otherwise. Only the header is read."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        return None
    raw = bytes(value)
    if len(raw) < 8 or not _BASE64_TEXT.fullmatch(raw):
        return None
    try:
        header = read_header(base64.b64decode(raw))
    except ValueError:
        return None
    if header is None:
        return None
    return DataError(
        f"image {position} arrived as base64 text, not as the file's bytes: the request was in another form "
        f"than dataframe_split (such as inputs or instances), which MLflow passes on undecoded; {EXPECTED_FORM}"
    )


class ServingLimits:
    """A worker's limits (``ServingParams``) and the slots its request threads share.

    MLflow's server answers each request in a thread of its own, so limits per request alone do
    not bound a worker: every image is decoded, and every chunk scored, in one of
    ``concurrent_images`` slots of the worker, and the others wait.
    """

    def __init__(self, params: ServingParams | None = None) -> None:
        self.params = params or ServingParams()
        self.slots = threading.BoundedSemaphore(self.params.concurrent_images)

    @classmethod
    def of(cls, settings: Mapping[str, Any]) -> ServingLimits:
        """From a logged model's model config: its ``serving`` section, else the defaults."""
        try:
            return cls(ServingParams.model_validate(settings.get("serving") or {}))
        except ValueError as error:
            raise InputError(
                f"the scoring model's model_config 'serving' is not valid ({error}); "
                "log it again with valid serving params (params.yaml: serving)"
            ) from error


DEFAULT_LIMITS = ServingLimits()  # for direct callers of score_images; a loaded model has its own


@dataclass
class Reduced:
    """A decoded image reduced right away: the model's input and, for a heatmap, a capped copy."""

    row: dict
    model_input: np.ndarray  # at the model's input size
    picture: np.ndarray | None  # the heatmap's background, longer side at most heatmap_max_side


def score_images(
    predictor: Predictor,
    values: Iterable[object],
    heatmap: bool = False,
    operating_point: str = "",
    limits: ServingLimits = DEFAULT_LIMITS,
) -> pd.DataFrame:
    """One row per value (``OUTPUT_COLUMNS``), in order; unreadable ones get ``error``, not an exception.

    Images are decoded one at a time, each checked from its header against the per-image limit
    and what is left of the request's budget, then reduced at once: a chunk holds small arrays.
    """
    rows: list[dict] = []
    budget = limits.params.max_request_pixels
    for start, chunk in _chunks(list(values), BATCH_SIZE):
        readable: list[Reduced] = []
        for position, value in enumerate(chunk, start):
            row = {
                "score": None,
                "decision": "",
                "threshold": predictor.threshold,
                "operating_point": operating_point,
                "heatmap": "",
                "error": "",
            }
            rows.append(row)
            try:
                data = image_bytes(value)
                pixels = _admit(data, f"image {position}", budget, limits.params)
                with limits.slots:
                    readable.append(_reduce(predictor, row, data, f"image {position}", heatmap, limits.params))
                budget -= pixels
            except DataError as error:
                row["error"] = str(in_another_form(value, position) or error)
        if readable:
            with limits.slots:
                _score(predictor, readable)
    table = pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))
    # Object dtype keeps None for unreadable images: JSON null, where a float column would send NaN.
    table["score"] = pd.Series([row["score"] for row in rows], dtype=object)
    return table


def _admit(data: bytes, ref: str, budget: int, params: ServingParams) -> int:
    """The image's pixels from its header, once its format, size and the request's budget allow it."""
    header = check_file(data, ref)
    accepted = ", ".join(name.upper() for name in params.formats)
    if header is None or header.format.lower() not in params.formats:
        what = f"a {header.format} file" if header else "not a file whose header gives its size"
        raise DataError(
            f"{ref} is not a readable image of an accepted format ({what}; serving.formats accepts "
            f"{accepted}); send it as one of those"
        )
    if header.pixels > params.max_image_pixels:
        raise DataError(
            f"{ref} is {header.width}x{header.height} = {header.pixels:,} pixels, more than the limit of "
            f"{params.max_image_pixels:,} (serving.max_image_pixels); downscale it, or ask the model's "
            "publisher to raise serving.max_image_pixels"
        )
    if header.pixels > budget:
        raise DataError(
            f"{ref} is {header.width}x{header.height} = {header.pixels:,} pixels, more than the "
            f"{max(budget, 0):,} left of this request's {params.max_request_pixels:,} "
            "(serving.max_request_pixels) after its earlier images; send it in another request"
        )
    return header.pixels


def _reduce(predictor: Predictor, row: dict, data: bytes, ref: str, heatmap: bool, params: ServingParams) -> Reduced:
    """Decode one image and keep only its reductions: the full-size array is freed on return."""
    image = decode_gray(data, ref, params.max_image_pixels, "serving.max_image_pixels")
    picture = _capped(image, params.heatmap_max_side) if heatmap else None
    return Reduced(row, predictor.resize(image), picture)


def _capped(image: np.ndarray, max_side: int) -> np.ndarray:
    """``image`` shrunk (area interpolation) so that its longer side is at most ``max_side``."""
    height, width = image.shape
    scale = max_side / max(height, width)
    if scale >= 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _chunks(values: list, size: int) -> Iterable[tuple[int, list]]:
    for start in range(0, len(values), size):
        yield start, values[start : start + size]


def _score(predictor: Predictor, readable: list[Reduced]) -> None:
    # The inputs are at the model's size already: Predictor's resize leaves them as they are.
    images = [item.model_input for item in readable]
    heatmap = readable[0].picture is not None
    maps: list[np.ndarray | None]
    if heatmap:
        scores, drawn = predictor(images)
        maps = list(drawn)
    else:
        scores, maps = predictor.scores(images), [None] * len(images)
    for item, score, saliency in zip(readable, scores, maps):
        item.row.update(score=float(score), decision=decision(float(score), predictor.threshold))
        if saliency is not None and item.picture is not None:
            picture = overlay_picture(item.picture, saliency, float(score), predictor.threshold)
            item.row["heatmap"] = base64.b64encode(png_bytes(picture)).decode("ascii")


# --- logging and registering ---------------------------------------------------------------------


def log_scoring_model(
    model_file: str | Path,
    threshold: float,
    operating_point: str,
    registered_name: str,
    *,
    teacher_file: str | Path | None = None,
    aliases: Iterable[str] = (),
    tags: Mapping[str, str] | None = None,
    saliency: str = "gradcam",
    teacher_saliency: str = "layercam",
    name: str = "scoring_model",
    serving: ServingParams | None = None,
) -> ModelVersion:
    """Log ``model_file`` as a ``ScoringModel`` and register it as a new version of ``registered_name``.

    The threshold and operating point go into the logged model's metadata and model config, and
    onto the version as tags ``threshold`` and ``operating_point`` (what ``predict`` and
    ``export`` read); ``tags`` are added to the version, each of ``aliases`` is pointed at it.
    Logs into the active MLflow run, or into a new run of ``tracking.connect()``'s experiment.
    Returns the registered ``ModelVersion``.
    """
    if not 0.0 <= float(threshold) <= 1.0:
        raise InputError(f"threshold {threshold} for {registered_name}: it must be a probability in [0, 1]")
    for option, method in (("saliency", saliency), ("teacher_saliency", teacher_saliency)):
        if method not in METHODS:
            raise InputError(f"{option}={method!r}: choose one of {', '.join(METHODS)}")
    loaded = load_file(Path(model_file))
    teacher = load_file(Path(teacher_file)) if teacher_file is not None else None
    Predictor(loaded, float(threshold), saliency, teacher, teacher_saliency)  # refuses a missing or wrong teacher
    settings = {
        "threshold": float(threshold),
        "operating_point": str(operating_point),
        "saliency": saliency,
        "teacher_saliency": teacher_saliency,
        "serving": (serving or ServingParams()).model_dump(),
    }
    with tempfile.TemporaryDirectory() as folder, _active_run(registered_name):
        artifacts = {"model": shutil.copyfile(model_file, Path(folder) / SCORING_MODEL_FILE)}
        if teacher_file is not None and needs_prior(loaded.config):
            artifacts["teacher"] = shutil.copyfile(teacher_file, Path(folder) / TEACHER_FILE)
        with warnings.catch_warnings():
            # An input example would be a whole image file in the MLmodel folder; the signature says it all.
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            info = _log(name, artifacts, settings, loaded.config, registered_name)
    return _tag_version(registered_name, str(info.registered_model_version), settings, tags or {}, aliases)


def _log(name: str, artifacts: dict[str, Path], settings: dict, config: dict, registered_name: str) -> Any:
    return mlflow.pyfunc.log_model(
        name=name,
        # Models from code: the logged model stores this small file, not a cloudpickle of a
        # ScoringModel (which anyone able to change the store could make run code when loaded).
        python_model=str(MODEL_CODE),
        artifacts={k: str(v) for k, v in artifacts.items()},
        # The served process imports this package: it travels with the model (code/pipeline).
        code_paths=[str(Path(__file__).parents[1])],
        model_config=settings,
        signature=scoring_signature(),
        metadata={
            "pipeline_config": config,
            "threshold": settings["threshold"],
            "operating_point": settings["operating_point"],
        },
        pip_requirements=[f"{package}=={package_version(package).split('+')[0]}" for package in REQUIREMENTS],
        registered_model_name=registered_name,
    )


def scoring_signature() -> ModelSignature:
    """Input: column ``image`` (binary); output: ``OUTPUT_COLUMNS``; param ``heatmap`` (default false)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    types = {"score": "double", "threshold": "double"}
    return ModelSignature(
        inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]),
        outputs=Schema([ColSpec(types.get(c, "string"), c) for c in OUTPUT_COLUMNS]),
        params=ParamSchema([ParamSpec("heatmap", "boolean", False)]),
    )


@contextmanager
def _active_run(registered_name: str) -> Iterator[None]:
    """The active MLflow run, or a new one (ended on exit) where none is active."""
    if mlflow.active_run() is not None:
        yield
        return
    from pipeline.core.tracking import connect

    connect()
    with mlflow.start_run(run_name=f"scoring-{registered_name}"):
        yield


def _tag_version(
    registered_name: str, number: str, settings: Mapping[str, Any], tags: Mapping[str, str], aliases: Iterable[str]
) -> ModelVersion:
    from mlflow.tracking import MlflowClient

    from pipeline.core.tracking import record_digests

    client = MlflowClient()  # the fluent API's store: the one the model was just registered in
    for key, value in {
        "threshold": str(settings["threshold"]),
        "operating_point": settings["operating_point"],
        **tags,
    }.items():
        client.set_model_version_tag(registered_name, number, key, str(value))
    # Before any alias points at it: a version is served or loaded only with its digests.
    record_digests(client, registered_name, number)
    for alias in aliases:
        client.set_registered_model_alias(registered_name, alias, number)
    return client.get_model_version(registered_name, number)


# --- the REST server ------------------------------------------------------------------------------


def request_body(files: Iterable[bytes], heatmap: bool = False) -> bytes:
    """The JSON body of ``POST /invocations`` for image files' bytes (see the module's docstring)."""
    import json

    data = [[base64.b64encode(content).decode("ascii")] for content in files]
    return json.dumps(
        {"dataframe_split": {"columns": [IMAGE_COLUMN], "data": data}, "params": {"heatmap": heatmap}}
    ).encode()


@contextmanager
def served(model_uri: str, port: int, workers: int = 1, start_timeout: float = 180.0) -> Iterator[str]:
    """Run ``kgi serve`` for ``model_uri`` on 127.0.0.1:``port`` (``mlflow models serve`` in this Python's
    environment, once the version's files are checked); yield its base URL once it answers ``/ping``,
    stop it on exit."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    from pipeline.core.errors import SetupError

    # Through kgi serve: the version's files are checked against their digests before it starts.
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "serve",
        model_uri,
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-w",
        str(workers),
    ]
    log = tempfile.TemporaryFile()  # noqa: SIM115 (the server writes to it until the finally below closes it)
    server = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy(), start_new_session=True
    )  # its workers end with it (the process group)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-2000:]
                raise SetupError(
                    f"kgi serve {model_uri} did not answer on {url} within "
                    f"{start_timeout:.0f} s (exit code {server.poll()}); its output ends:\n{tail}"
                )
            time.sleep(0.5)
        yield url
    finally:
        _stop(server)
        log.close()


def _stop(server) -> None:
    import os
    import signal
    import subprocess

    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
