"""Input images: the pixel limit, from the header where it can be read, and after decoding where not."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.core.errors import DataError
from pipeline.data import images
from pipeline.data.images import read_gray

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
    monkeypatch.setattr(images, "read_header", lambda data: None)  # a format Pillow does not know
    with pytest.raises(DataError, match="100x80"):
        read_gray(str(path), max_pixels=1_000)
