"""MLflow tracking for the stages: one run per stage execution, linked into a lineage.

DVC may restore a stage's outputs from its run cache without running the script, so nothing is
logged for it then. To keep MLflow coherent anyway, every stage writes ``run.json`` (its MLflow
run id) into its own output folder. The file travels with the cached outputs, so a downstream
stage always knows which MLflow run produced the exact artifacts it consumed, and tags its own run
with ``upstream.<stage>`` = that run id. The evaluation run therefore links to the full chain of
runs behind its numbers, whether those stages ran now or were restored.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keeps CI logs readable

import mlflow
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from pipeline.core.artifacts import read_json, write_json
from pipeline.core.errors import SetupError
from pipeline.core.layout import project_root

DEFAULT_EXPERIMENT = "knowledge-guided"
LINEAGE_FILE = "run.json"
# Seconds a writer waits for another's lock on a SQLite store (Python's default is 5): queued
# experiments on several workers write to one file, and a loaded machine can hold a lock longer.
SQLITE_BUSY_TIMEOUT = 60


class TrackingError(SetupError):
    """The MLflow tracking store cannot be reached or used."""


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store in the project root.

    The project root, not the working directory: a queued experiment runs in a temporary copy of
    the project that DVC deletes afterwards, with its store. A SQLite URI gets a busy timeout
    unless it names one (``?timeout=``), so concurrent writers wait for each other's lock.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and "timeout=" not in uri:
        uri += ("&" if "?" in uri else "?") + f"timeout={SQLITE_BUSY_TIMEOUT}"
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (its query left out), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def git_commit() -> str:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def pipeline_run_id() -> str:
    """An id shared by the stages of one ``dvc repro`` / ``dvc exp run`` invocation.

    ``PIPELINE_RUN_ID`` wins when set. Otherwise the id is derived from the DVC process that runs
    the stages (its pid and start time), found among this process's ancestors; a stage run by
    hand gets a fresh id.
    """
    if os.environ.get("PIPELINE_RUN_ID"):
        return os.environ["PIPELINE_RUN_ID"]
    try:
        import psutil

        for ancestor in psutil.Process().parents():
            command = " ".join(ancestor.cmdline())
            if "dvc" in Path(command.split(" ")[0]).name or " -m dvc" in command or "/dvc " in command:
                return uuid.uuid5(uuid.NAMESPACE_OID, f"{ancestor.pid}-{ancestor.create_time()}").hex[:12]
    except Exception:
        pass
    return uuid.uuid4().hex[:12]


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, BaseModel):
            value = value.model_dump()
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# For the check at stage start only: MLflow's defaults (7 retries with exponential backoff, 120 s
# timeout) keep a stage waiting about 4 minutes before it reports an unreachable server.
FAST_CHECK = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


@contextmanager
def environment_defaults(defaults: Mapping[str, str]) -> Iterator[None]:
    """Set the variables that the user has not set, for the duration of the block."""
    added = {name: value for name, value in defaults.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


@contextmanager
def _store_lock(database: Path | None) -> Iterator[None]:
    """Hold an exclusive lock beside a SQLite store while the block runs (nothing for a server).

    MLflow builds a new store's tables without a lock of its own, and two stages that find no
    experiment both create it: two queued experiments starting together on a fresh store then fail
    ("table ... already exists", a duplicate experiment). The lock makes one of them do it first.
    """
    if database is None:
        yield
        return
    with open(database.with_name(database.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _ensure_experiment(client: MlflowClient, database: Path | None) -> None:
    if client.get_experiment_by_name(experiment_name()) is not None:
        return
    # Keep a SQLite store's artifacts beside the database, whatever the working directory is later.
    location = (database.parent / "mlartifacts").resolve().as_uri() if database else None
    try:
        client.create_experiment(experiment_name(), artifact_location=location)
    except Exception:
        # Another client of the same server created it in the meantime: that one is as good.
        if client.get_experiment_by_name(experiment_name()) is None:
            raise


def connect() -> MlflowClient:
    """Point MLflow at the store and check it answers, before a stage does any work."""
    uri = tracking_uri()
    database = sqlite_path(uri)
    if database is not None and not database.parent.is_dir():
        # MLflow would create a missing folder, so a typo in the path would silently start a new store.
        raise TrackingError(
            f"MLflow tracking store {uri!r}: folder {database.parent} does not exist; "
            "create it or fix MLFLOW_TRACKING_URI"
        )
    try:
        with environment_defaults(FAST_CHECK), _store_lock(database):
            client = MlflowClient(uri)
            _ensure_experiment(client, database)
    except Exception as error:
        raise TrackingError(
            f"MLflow tracking store {uri!r} is unreachable or misconfigured ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). Fix MLFLOW_TRACKING_URI or unset it "
            "to use sqlite:///mlflow.db in the project root."
        ) from error
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_name())
    return client


class StageRun:
    """The active MLflow run of one stage, with the lineage it records."""

    def __init__(self, stage: str, run: mlflow.ActiveRun, pipeline_id: str) -> None:
        self.stage = stage
        self.run_id = run.info.run_id
        self.pipeline_id = pipeline_id

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, prefix: str = "") -> None:
        # Any: nested mappings are flattened and values that are not numbers left out.
        finite = {f"{prefix}{k}": float(v) for k, v in flatten(metrics).items() if _is_number(v)}
        mlflow.log_metrics(finite, step=step)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=folder)
        else:
            mlflow.log_artifact(str(path), artifact_path=folder)

    def tag_compute(self, device: str, precision: str) -> None:
        """Tag the run with the device and precision (``Precision.name``) it computed in: the params
        hold what was asked (``model.precision: auto``), these what that resolved to on this machine."""
        mlflow.set_tags({"compute.device": device, "compute.precision": precision})

    def link_upstream(self, *output_dirs: str | Path) -> dict[str, str]:
        """Tag this run with the MLflow runs that produced the given stage outputs."""
        links = {}
        for folder in output_dirs:
            lineage = Path(folder) / LINEAGE_FILE
            if lineage.is_file():
                record = read_json(lineage)
                # A knowledge round's stage is round_<stage>@round<k>, and MLflow refuses '@' in a tag's name.
                stage = record["stage"].replace("@", ":")
                links[f"upstream.{stage}"] = record["mlflow_run_id"]
                links[f"upstream.{stage}.pipeline_run"] = record["pipeline_run_id"]
        mlflow.set_tags(links)
        return links

    def write_lineage(self, output_dir: str | Path) -> None:
        write_json(
            Path(output_dir) / LINEAGE_FILE,
            {
                "stage": self.stage,
                "mlflow_run_id": self.run_id,
                "pipeline_run_id": self.pipeline_id,
                "tracking_uri": tracking_uri(),
                "experiment": experiment_name(),
            },
        )

    def register_model_file(self, path: str | Path, name: str, registered_name: str, tags: Mapping[str, str]) -> str:
        """Log a model file as ``<name>/model.pt`` of this run and register that folder as a new
        version of ``registered_name`` with ``tags`` and its files' digests; returns the version.

        The model file alone (its ``config`` and ``state_dict``) is what a version holds: it loads
        with ``weights_only=True`` and the network is rebuilt from its config, where a pickled or
        exported (pt2) object would run code while it is loaded.
        """
        import shutil
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            mlflow.log_artifact(str(shutil.copyfile(path, Path(folder) / REGISTERED_MODEL_FILE)), artifact_path=name)
        client = MlflowClient(tracking_uri())
        try:
            client.create_registered_model(registered_name)
        except mlflow.exceptions.MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":  # a name registered before is what we want
                raise
        version = str(client.create_model_version(registered_name, f"runs:/{self.run_id}/{name}", self.run_id).version)
        for key, value in tags.items():
            client.set_model_version_tag(registered_name, version, key, value)
        record_digests(client, registered_name, version)
        return version


# --- what a registered version holds, and the check that it is what was registered -----------

# The model file of a registered version: ``<folder>/model.pt`` (a fold model) or, in a scoring
# model (pipeline.deployment.serving), ``<folder>/artifacts/model.pt``.
REGISTERED_MODEL_FILE = "model.pt"
# The version tag holding the SHA-256 of every file of the version, as JSON {relative path: digest}.
DIGEST_TAG = "artifact_sha256"


class TamperedModelError(SetupError):
    """A registered version's files are not those it was registered with (or lack digests)."""


def file_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder``, by path relative to it (POSIX separators)."""
    digests = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digests[path.relative_to(folder).as_posix()] = digest.hexdigest()
    return digests


def record_digests(client: MlflowClient, registered_name: str, version: str) -> dict[str, str]:
    """Tag ``version`` with the digests of its files as stored (read back from the artifact store)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        local = _download_version(registered_name, version, Path(folder))
        digests = file_digests(local)
    client.set_model_version_tag(registered_name, version, DIGEST_TAG, json.dumps(digests, sort_keys=True))
    return digests


def verified_download(version: Any, folder: Path) -> Path:
    """Download ``version`` (a ``ModelVersion``) into ``folder`` and check every file against the
    digests recorded at registration, before anything reads it; returns the local model folder.

    ``TamperedModelError`` names the first file that differs, is missing or was added.
    """
    source = f"models:/{version.name}/{version.version}"
    recorded = (version.tags or {}).get(DIGEST_TAG)
    if recorded is None:
        raise TamperedModelError(
            f"{source} has no {DIGEST_TAG} tag: it was registered before versions carried their files' "
            "digests (or by other code), so nothing shows its files are the ones registered; register it "
            "anew (dvc repro -f release, or the training stage) and use the new version"
        )
    try:
        expected = json.loads(recorded)
    except ValueError:
        expected = None
    if not isinstance(expected, dict):
        raise TamperedModelError(f"{source}: its {DIGEST_TAG} tag is not a JSON object of digests; register it anew")
    local = _download_version(version.name, str(version.version), folder)
    found = file_digests(local)
    for relative in sorted(set(expected) | set(found)):
        if expected.get(relative) != found.get(relative):
            what = "is missing" if relative not in found else "was added" if relative not in expected else "differs"
            raise TamperedModelError(
                f"refusing {source}: its file {relative} {what} since registration (SHA-256 tag {DIGEST_TAG}); "
                "the artifact store was changed: nothing of it was loaded. Register the model anew from its "
                "stage's files (dvc repro -f release) or restore the store"
            )
    return local


def _download_version(registered_name: str, version: str, folder: Path) -> Path:
    store = tracking_uri()
    uri = f"models:/{registered_name}/{version}"
    return Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(folder), tracking_uri=store, registry_uri=store))


def _is_number(value: Any) -> bool:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    return number == number and abs(number) != float("inf")


@contextmanager
def stage_run(stage: str, params: Mapping[str, Any], dataset: str | None = None) -> Iterator[StageRun]:
    """Open the MLflow run of one stage: tags, flattened params, status FAILED on error."""
    connect()
    pipeline_id = pipeline_run_id()
    tags = {"stage": stage, "git_commit": git_commit(), "pipeline_run": pipeline_id}
    if dataset:
        tags["dataset"] = dataset
    # Set by `dvc exp run` (queued or not): the experiment, as `dvc exp show` names it, and its baseline.
    for tag, variable in (("dvc_experiment", "DVC_EXP_NAME"), ("dvc_baseline", "DVC_EXP_BASELINE_REV")):
        if os.environ.get(variable):
            tags[tag] = os.environ[variable]
    with mlflow.start_run(run_name=f"{stage}-{pipeline_id}", tags=tags) as run:
        mlflow.log_params(flatten(params))
        yield StageRun(stage, run, pipeline_id)
