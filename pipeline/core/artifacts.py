"""Writing stage outputs so that a failed or killed stage never leaves half of one behind.

Files go to a temporary name in the same folder and are renamed into place (an atomic operation
on POSIX); whole output folders are built under a temporary name and swapped in at the end.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch

from pipeline.core.errors import InputError, MissingInputError


def _umask() -> int:
    """The process's umask: reading it means setting it, so this runs once, at import."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


# tempfile creates files 0600 and folders 0700; outputs get the modes that a plain write gives,
# so that others on a shared machine can read them as before.
_UMASK = _umask()
FILE_MODE, DIR_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK


def _temporary_prefix(path: Path) -> str:
    """The name prefix of ``path``'s temporary siblings (hidden, and recognisable as leftovers)."""
    return f".{path.name}.tmp-"


def _remove_leftovers(path: Path) -> None:
    """Delete temporary siblings of ``path`` that a killed run (kill -9, power loss) left behind."""
    for leftover in path.parent.glob(f"{_temporary_prefix(path)}*"):
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The suffix stays last: writers such as cv2.imwrite pick the format from it.
    handle, temporary = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=path.suffix, dir=path.parent)
    os.close(handle)
    os.chmod(temporary, FILE_MODE)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


@contextmanager
def output_dir(path: str | Path) -> Iterator[Path]:
    """Build a stage's output folder under a temporary name and swap it in when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path)
    building = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), dir=path.parent))
    building.chmod(DIR_MODE)
    try:
        yield building
        # Move the old folder aside in one rename rather than deleting it in place: a kill at any
        # moment then leaves the complete old folder, the complete new one, or none.
        if path.exists():
            os.replace(path, tempfile.mkdtemp(prefix=_temporary_prefix(path), dir=path.parent))
        os.replace(building, path)
    finally:
        _remove_leftovers(path)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_csv(path: str | Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as temporary:
        frame.to_csv(temporary, index=False)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def save_torch(path: str | Path, obj: Any) -> None:
    """``torch.save`` to ``path`` atomically; the same object always gives the same bytes.

    Saved through a buffer: writing to a file, torch names the records of its zip archive after
    that file, which here would be a random temporary name, so two saves of the same weights
    would differ (and DVC would store every retrained model anew).
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())


def load_torch(path: str | Path) -> Any:
    """Load a checkpoint without unpickling arbitrary objects (tensors and plain containers only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise InputError(
            f"refusing to load {path}: it holds objects other than tensors and plain containers, "
            "which could run code when loaded; load only files written by this pipeline"
        ) from error


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Write an 8-bit (gray or RGB) or 16-bit gray PNG atomically."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    with atomic_path(path) as temporary:
        if not cv2.imwrite(str(temporary), image):
            raise OSError(f"could not write image {path}")


def read_image(path: str | Path, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    image = cv2.imread(str(path), flags)
    if image is None:
        raise MissingInputError(f"cannot read image {path}: missing or corrupt; rerun the stage that writes it")
    return image


def write_map(path: str | Path, saliency: np.ndarray) -> None:
    """Store a [0, 1] map losslessly enough (16-bit PNG: steps of 1/65535)."""
    write_image(path, np.round(np.clip(saliency, 0.0, 1.0) * 65535.0).astype(np.uint16))


def read_map(path: str | Path) -> np.ndarray:
    return read_image(path).astype(np.float32) / 65535.0
