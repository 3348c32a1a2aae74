"""Reading image files: from a folder or a zip archive, checked before and after decoding.

A file is referred to by its path, or by ``"<zip path>::<member name>"`` for a member of a zip
archive, so the official archives can be used without unpacking them. An image is checked for
truncation and for its size (from its header where possible) before it is decoded as gray, and a
JPEG for corrupt scan data that the decoder would only warn about; a mask is read the same way or
drawn from annotations (:class:`MaskSource`).
"""

from __future__ import annotations

import hashlib
import io
import struct
import zipfile
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

import cv2
import numpy as np
import simplejpeg
from PIL import BmpImagePlugin, ImageFile, JpegImagePlugin, PngImagePlugin, TiffImagePlugin

from pipeline.core.errors import DataError

ZIP_SEPARATOR = "::"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MAX_IMAGE_PIXELS = 50_000_000  # default of prepare.max_image_pixels: about 50 MB decoded as gray
PREPARE_LIMIT = "prepare.max_image_pixels"  # the param a refusal of prepare's advises


class MaskSource(Protocol):
    """A true mask drawn from annotations instead of stored as an image (``sources.labelme.LabelmeMask``)."""

    def draw(self, shape: tuple[int, int], image: str | None = None) -> np.ndarray:
        """The mask as bool ``shape`` (height, width, its image's size); ``image`` names it in errors."""
        ...


def split_ref(ref: str) -> tuple[str, str | None]:
    """(path, member) of a ref; member is None for a plain file: "a.zip::x/1.png" -> ("a.zip", "x/1.png")."""
    archive, separator, member = ref.partition(ZIP_SEPARATOR)
    return (archive, member) if separator else (ref, None)


class Reader:
    """Reads the bytes of refs, opening each zip archive once per batch instead of per member."""

    def __init__(self) -> None:
        self._archives: dict[str, zipfile.ZipFile] = {}

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for archive in self._archives.values():
            archive.close()

    def read(self, ref: str) -> bytes:
        path, member = split_ref(ref)
        try:
            if member is None:
                return Path(path).read_bytes()
            if path not in self._archives:
                self._archives[path] = zipfile.ZipFile(path)
            return self._archives[path].read(member)
        except (OSError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise DataError(f"cannot read {ref} ({exc}); check that the file exists and is readable") from exc


def _truncation(data: bytes) -> str | None:
    """Why ``data`` looks cut short, or None.

    Some decoder builds return a partial image (the missing rows grey) for a truncated file instead
    of failing, so the formats' own end markers are checked before decoding.
    """
    if data.startswith(b"\xff\xd8"):
        # The end marker must follow the last scan's start; scan data never holds FF D9, and looking
        # for it after the scan rather than at the very end accepts files with trailing bytes.
        last_scan = data.rfind(b"\xff\xda")
        if last_scan == -1 or data.find(b"\xff\xd9", last_scan) == -1:
            return "the JPEG end marker (FF D9) is missing"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None if b"IEND" in data[-64:] else "the PNG end chunk (IEND) is missing"
    if data.startswith(b"BM") and len(data) >= 6:
        announced = int.from_bytes(data[2:6], "little")  # 0 is allowed by writers that skip it
        if len(data) < announced:
            return f"its BMP header announces {announced} bytes but it has {len(data)}"
    return None


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header says before anything is decoded: its format (Pillow's name) and size."""

    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


# Formats whose size Pillow reads from the header alone, by Pillow's name: the parsers are called
# directly rather than through ``Image.open``, which also checks Pillow's process-wide
# ``Image.MAX_IMAGE_PIXELS``. Switching that global off around each call raced between the
# server's request threads (one thread's restore re-enabled it under another's parse); the
# direct parsers read it nowhere, so no global is touched and our own limits decide alone.
HEADER_PARSERS: dict[str, type[ImageFile.ImageFile]] = {
    "PNG": PngImagePlugin.PngImageFile,
    "JPEG": JpegImagePlugin.JpegImageFile,
    "BMP": BmpImagePlugin.BmpImageFile,
    "TIFF": TiffImagePlugin.TiffImageFile,
}
_SIGNATURES = {
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "JPEG": (b"\xff\xd8\xff",),
    "BMP": (b"BM",),
    "TIFF": (b"II*\x00", b"MM\x00*"),
}


def read_header(data: bytes) -> ImageHeader | None:
    """Format and (width, height) from the file's header alone; None for a format outside
    ``HEADER_PARSERS`` or a header Pillow cannot parse (then only decoding can tell the size)."""
    for name, signatures in _SIGNATURES.items():
        if data.startswith(signatures):
            try:
                with HEADER_PARSERS[name](io.BytesIO(data)) as image:
                    width, height = image.size
            # A damaged header: what Image.open itself takes as "not this format", and OSError/ValueError.
            except (OSError, SyntaxError, ValueError, IndexError, TypeError, struct.error, EOFError):
                return None
            return ImageHeader(name, width, height)
    return None


def check_file(data: bytes, ref: str) -> ImageHeader | None:
    """Refuse an empty or truncated file (``DataError`` naming ``ref``); its header where readable."""
    if not data:
        raise DataError(f"{ref} is empty (0 bytes); replace it with the original file")
    why = _truncation(data)
    if why:
        raise DataError(f"{ref} is truncated: {why}; replace it with a complete copy")
    return read_header(data)


def _check_size(width: int, height: int, ref: str, max_pixels: int, param: str) -> None:
    if width * height > max_pixels:
        raise DataError(
            f"{ref} is {width}x{height} = {width * height:,} pixels, more than the limit of {max_pixels:,}; "
            f"raise {param} in params.yaml if the machine has the memory, or downscale the image"
        )


def _check_jpeg_scan(data: bytes, ref: str) -> None:
    """Refuse a JPEG whose compressed data libjpeg-turbo only warns about (garbled scan data,
    bad Huffman codes, a premature end): OpenCV prints such a warning on stderr and returns the
    garbled pixels as if whole. simplejpeg's strict mode raises on it; decoding at an eighth of
    the size still entropy-decodes every byte of the scan, at 1/64 of the memory. OpenCV then
    decodes the pixels, so that they stay those prepare has always read (EXIF orientation too)."""
    try:
        simplejpeg.decode_jpeg(data, colorspace="GRAY", min_factor=8, strict=True)
    except ValueError as error:
        raise DataError(
            f"{ref} is a corrupt JPEG ({error}); its pixels would be garbled: replace it with an intact copy"
        ) from error


def decode_gray(data: bytes, ref: str, max_pixels: int = MAX_IMAGE_PIXELS, param: str = PREPARE_LIMIT) -> np.ndarray:
    """Decode an image file's bytes as uint8 H x W gray; ``ref`` names it in errors (``DataError``),
    ``param`` the setting that raises ``max_pixels`` (prepare's; serving passes its own)."""
    header = check_file(data, ref)
    # The header tells the size before decoding: a small file can decode to gigabytes.
    if header is not None:
        _check_size(header.width, header.height, ref, max_pixels, param)
    if header is not None and header.format == "JPEG":
        _check_jpeg_scan(data, ref)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    except cv2.error:
        image = None
    if image is None or image.size == 0:
        raise DataError(
            f"{ref} is not a readable image (OpenCV cannot decode it); replace it or remove it from the data set"
        )
    # Formats Pillow cannot parse are checked after decoding (OpenCV refuses above 2^30 pixels).
    _check_size(image.shape[1], image.shape[0], ref, max_pixels, param)
    return image


def read_gray(ref: str, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read an image as uint8 H x W gray; ``ref`` is a path or ``"<zip path>::<member>"``.

    An image of more than ``max_pixels`` pixels is refused, from its header where possible.
    """
    with Reader() as reader:
        return decode_gray(reader.read(ref), ref, max_pixels)


def read_mask(
    ref: str | MaskSource, shape: tuple[int, int], image: str | None = None, max_pixels: int = MAX_IMAGE_PIXELS
) -> np.ndarray:
    """Read (or draw) a mask as bool H x W (non-zero = defect); it must have ``shape``, its image's size.

    ``image`` (the image's ref) is only used to name the image in the error message.
    """
    if not isinstance(ref, str):
        return ref.draw(cast(tuple[int, int], tuple(shape)), image)  # the same two ints, as a tuple
    mask = read_gray(ref, max_pixels)
    if mask.shape != tuple(shape):
        of = f"its image {image}" if image else "its image"
        raise DataError(
            f"mask {ref} is {mask.shape[1]}x{mask.shape[0]} (width x height) but {of} is "
            f"{shape[1]}x{shape[0]}; a mask must have exactly its image's size"
        )
    return mask > 0


def find_duplicates(refs: dict[str, str]) -> list[list[str]]:
    """Sets of ids (each sorted, the list sorted) whose files have identical bytes (SHA-1)."""
    by_digest: dict[str, list[str]] = defaultdict(list)
    with Reader() as reader:
        for id_, ref in refs.items():
            by_digest[hashlib.sha1(reader.read(ref)).hexdigest()].append(id_)
    return sorted(sorted(ids) for ids in by_digest.values() if len(ids) > 1)
