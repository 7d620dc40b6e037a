"""Image intake: bytes -> validated RGB ``PIL.Image``; runs in a thread pool, off the event loop.

Order of checks for one image (each failure names the image by index and filename):

1. 0 bytes -> 400 ``empty-image``.
2. ``Image.open(fp, formats=ALLOWED)`` reads only the header (lazy). Not an allowed format (a text file
   named ``.jpg``, a PDF, ...) -> 415 ``unsupported-image``. TIFFs Pillow cannot open (e.g. more than 4
   bands stored as plain samples) are read with tifffile.
3. width x height from the header > ``max_pixels`` (``CAPTIONER_MAX_IMAGE_PIXELS``) -> 413 ``image-too-large``,
   before any pixel is decoded. The configured cap is the only one: Pillow's fixed guard (89.5 MP warning,
   179 MP error) is switched off in this process, or it would refuse images the setting allows and answer
   with its own numbers. A file in an allowed format whose header Pillow cannot even read (a PNG cut off
   after its IHDR) -> 413 if the dimensions it declares are over the cap, else 400 ``invalid-image``.
4. ``load()`` decodes the first frame (GIF/TIFF: first frame/page); truncated or corrupt -> 400
   ``invalid-image``.
5. EXIF orientation is applied (``ImageOps.exif_transpose``).
6. Mode -> RGB: L/LA/P/PA/RGBA/CMYK/YCbCr/1 by Pillow's ``convert``; 16-bit, 32-bit integer and float
   images are scaled to 8 bits per image (min-max over the bands used); images with more than 3 bands keep
   the first 3 (TIFFs with more than 8 bits per sample are read with tifffile so no precision is lost).
   Each such step is recorded in ``notes``.
"""

from __future__ import annotations

import base64
import binascii
import io
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.problems import Problem, problem_type

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_MAGIC_NAMES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"%PDF", "PDF"),
    (b"PK\x03\x04", "zip archive"),
    (b"\x1f\x8b", "gzip data"),
)
# The (format, magic) pairs whose header can be recognised even when Pillow cannot open the file.
_FORMAT_MAGIC = (("PNG", b"\x89PNG\r\n\x1a\n"), ("JPEG", b"\xff\xd8\xff"), ("GIF", b"GIF87a"), ("GIF", b"GIF89a"),
                 ("BMP", b"BM"), ("TIFF", TIFF_MAGIC[0]), ("TIFF", TIFF_MAGIC[1]), ("TIFF", TIFF_MAGIC[2]),
                 ("TIFF", TIFF_MAGIC[3]))
CAP_SETTING = "CAPTIONER_MAX_IMAGE_PIXELS"
HIGH_DEPTH_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F", "I;32", "I;32B", "I;32L"}


@dataclass
class RawImage:
    """One image as it arrived: position in the request, client-side filename (if any), bytes."""

    index: int
    filename: str | None
    data: bytes

    @property
    def label(self) -> str:
        return describe(self.index, self.filename)


@dataclass
class DecodedImage:
    index: int
    filename: str | None
    image: Image.Image | None  # RGB, EXIF orientation applied (dropped once preprocessed, unless kept)
    format: str
    width: int  # after EXIF orientation
    height: int
    notes: list[str] = field(default_factory=list)
    decode_ms: float = 0.0

    def info(self) -> dict[str, Any]:
        return {"format": self.format, "width": self.width, "height": self.height, "notes": self.notes}


def describe(index: int, filename: str | None) -> str:
    return f"image {index}" + (f" ({filename!r})" if filename else "")


class ImageProblem(Problem):
    """A per-image error; ``index``/``filename`` say which image."""

    def __init__(self, slug: str, raw_index: int, filename: str | None, message: str):
        super().__init__(slug, f"{describe(raw_index, filename)}: {message}")
        self.index = raw_index
        self.filename = filename
        self.message = message

    def entry(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "filename": self.filename,
            "type": problem_type(self.slug),
            "status": self.status,
            "detail": self.message,
        }


def combine(errors: list[ImageProblem], total: int) -> Problem:
    """One problem for a request whose images failed: the first error's type and status, all listed."""
    first = errors[0]
    if len(errors) == 1:
        detail = first.detail
    else:
        detail = f"{len(errors)} of {total} images were rejected; first: {first.detail}"
    return Problem(first.slug, detail, status=first.status, errors=[e.entry() for e in errors])


def sniff(data: bytes) -> str:
    """A short guess of what non-image bytes are, for error messages."""
    for magic, name in _MAGIC_NAMES:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[:4] in TIFF_MAGIC:
        return "TIFF"
    head = data[:512]
    if b"\x00" not in head:
        try:
            head.decode("utf-8")
            return "text"
        except UnicodeDecodeError:
            pass
    return "unknown data"


def decode_base64(value: Any, index: int, filename: str | None) -> bytes:
    if not isinstance(value, str):
        raise ImageProblem("invalid-base64", index, filename, f"expected a base64 string, got {type(value).__name__}")
    if value.startswith("data:"):  # data URL: data:image/png;base64,....
        _, _, value = value.partition(",")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageProblem("invalid-base64", index, filename, f"not valid base64 ({exc})") from None


def pillow_open():
    """Pillow's own ``Image.open``. ultralytics replaces ``PIL.Image.open`` process-wide with a wrapper that,
    on an unidentified file, tries to install and register a HEIF decoder; untrusted uploads must never
    trigger that, so intake calls the original (the wrapper keeps it as ``_image_open``)."""
    opener = Image.open
    if getattr(opener, "__module__", "PIL.Image") != "PIL.Image":
        original = getattr(sys.modules.get(opener.__module__), "_image_open", None)
        if getattr(original, "__module__", None) == "PIL.Image":
            return original
        raise RuntimeError(f"PIL.Image.open is replaced by {opener.__module__}.{opener.__name__}; refusing to use it")
    return opener


def decode_image(raw: RawImage, *, formats: list[str], max_pixels: int) -> DecodedImage:
    """Validate and decode one image; raise ImageProblem (never anything else for bad input)."""
    start = time.perf_counter()
    index, filename, data = raw.index, raw.filename, raw.data

    def fail(slug: str, message: str) -> ImageProblem:
        return ImageProblem(slug, index, filename, message)

    if not data:
        raise fail("empty-image", "has 0 bytes")
    is_tiff = data[:4] in TIFF_MAGIC
    notes: list[str] = []
    _configured_cap_only()
    try:
        image = pillow_open()(io.BytesIO(data), formats=formats)
    except UnidentifiedImageError:
        if is_tiff and "TIFF" in formats:
            rgb, fmt = _decode_tiff_raw(data, max_pixels, notes, fail), "TIFF"
            return _done(raw, rgb, fmt, notes, start)
        claimed = _claimed_format(data)
        if claimed in formats:  # the right magic, but the header itself is cut off or corrupt
            size = _png_size(data) if claimed == "PNG" else None
            if size is not None:
                check_pixels(size, max_pixels, fail)
            declared = f" (it declares {size[0]}x{size[1]} pixels)" if size else ""
            raise fail("invalid-image", f"a {claimed} whose header cannot be read: the file is truncated or "
                       f"corrupt after {len(data)} bytes{declared}") from None
        kind = sniff(data)
        allowed = ", ".join(formats)
        raise fail("unsupported-image", f"not an image in an allowed format (looks like {kind}; allowed: {allowed})") from None
    except Exception as exc:  # a decoder choking on a corrupt header
        raise fail("invalid-image", f"corrupt header ({type(exc).__name__}: {exc})") from None

    width, height = image.size
    if width <= 0 or height <= 0:
        raise fail("invalid-image", f"has an empty size {width}x{height}")
    check_pixels((width, height), max_pixels, fail)
    fmt = image.format or "unknown"
    if is_tiff and _tiff_needs_raw(image):
        rgb = _decode_tiff_raw(data, max_pixels, notes, fail)
        return _done(raw, rgb, fmt, notes, start)
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        notes.append(f"first of {frames} frames used")
        check_pixels(image.size, max_pixels, fail)  # counting frames re-reads frame 0 (a GIF frame may grow it)
    try:
        image.load()
    except Exception as exc:
        raise fail("invalid-image", f"truncated or corrupt {fmt} ({type(exc).__name__}: {exc})") from None

    try:
        orientation = _orientation(image)
        oriented = ImageOps.exif_transpose(image)
        if orientation not in (None, 1):
            notes.append(f"EXIF orientation {orientation} applied")
        image = oriented if oriented is not None else image
    except Exception as exc:  # unreadable EXIF: keep the pixels as stored
        notes.append(f"EXIF orientation unreadable, ignored ({type(exc).__name__})")
    rgb = to_rgb(image, notes)
    return _done(raw, rgb, fmt, notes, start)


def check_pixels(size: tuple[int, int], max_pixels: int, fail) -> None:
    width, height = size
    if width * height > max_pixels:
        raise fail("image-too-large", f"{width}x{height} = {width * height} pixels is more than the cap of "
                   f"{max_pixels} ({CAP_SETTING})")


def _configured_cap_only() -> None:
    """Switch Pillow's process-wide decompression-bomb guard off: intake checks every header against the
    configured cap before decoding (``check_pixels``), and Pillow's fixed 89.5 / 179 MP limits would
    otherwise refuse images the setting allows, quoting numbers no setting controls. Idempotent."""
    Image.MAX_IMAGE_PIXELS = None


def _claimed_format(data: bytes) -> str | None:
    """The allowed-format name the magic bytes announce (None: no known image magic)."""
    for name, magic in _FORMAT_MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG's IHDR chunk (the first chunk, right after the signature), if present."""
    if len(data) >= 24 and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return None


def _done(raw: RawImage, rgb: Image.Image, fmt: str, notes: list[str], start: float) -> DecodedImage:
    return DecodedImage(
        index=raw.index,
        filename=raw.filename,
        image=rgb,
        format=fmt,
        width=rgb.width,
        height=rgb.height,
        notes=notes,
        decode_ms=(time.perf_counter() - start) * 1000.0,
    )


def _orientation(image: Image.Image) -> int | None:
    try:
        return image.getexif().get(0x0112)
    except Exception:
        return None


def to_rgb(image: Image.Image, notes: list[str]) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in HIGH_DEPTH_MODES:
        array = np.asarray(image)
        notes.append(f"{mode} image scaled to 8 bits (min-max over the image)")
        return Image.fromarray(scale_to_uint8(array)).convert("RGB")
    if mode in ("P", "PA"):
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("LA", "La", "RGBA", "RGBa"):
        notes.append("alpha channel dropped")
    return image.convert("RGB")


def scale_to_uint8(array: np.ndarray) -> np.ndarray:
    """Per-image min-max scaling of any numeric array to uint8 (NaN -> 0); uint8 passes through."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    values = array.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(array.shape, dtype=np.uint8)
    low, high = values[finite].min(), values[finite].max()
    span = high - low if high > low else 1.0
    scaled = np.where(finite, (values - low) / span * 255.0, 0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _tiff_needs_raw(image: Image.Image) -> bool:
    """Pillow keeps only the top 8 bits of multi-band 16-bit TIFFs; read those with tifffile instead."""
    tags = getattr(image, "tag_v2", None)
    if tags is None:
        return False
    bits = tags.get(258, (8,))
    bits = bits if isinstance(bits, tuple) else (bits,)
    samples = tags.get(277, 1)
    return max(bits) > 8 and samples >= 2


def _decode_tiff_raw(data: bytes, max_pixels: int, notes: list[str], fail) -> Image.Image:
    try:
        import tifffile
    except ImportError:  # a dependency of the service (pyproject); say so instead of failing with a 500
        raise fail("unsupported-image", "this TIFF layout (more than 8 bits per sample with several bands, or "
                   "bands Pillow cannot read) needs the tifffile package, which this server lacks") from None

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tiff:
            page = tiff.pages.first
            width, height = int(page.imagewidth), int(page.imagelength)
            check_pixels((width, height), max_pixels, fail)
            samples = int(page.samplesperpixel)
            nbytes = width * height * samples * np.dtype(page.dtype).itemsize
            if nbytes > 8 * max_pixels:
                raise fail("image-too-large", f"{samples} bands of {page.dtype} would take {nbytes} bytes decoded")
            array = page.asarray()
            axes = page.axes
    except ImageProblem:
        raise
    except Exception as exc:
        raise fail("invalid-image", f"TIFF cannot be decoded ({type(exc).__name__}: {exc})") from None
    # -> [H, W, C]
    array = np.asarray(array)
    if "S" in axes:
        array = np.moveaxis(array, axes.index("S"), -1)
        axes = axes.replace("S", "") + "S"
    keep = [i for i, a in enumerate(axes) if a in "YXS"]
    for i in reversed(range(len(axes))):
        if i not in keep:
            array = np.take(array, 0, axis=i)
    if array.ndim == 2:
        array = array[:, :, None]
    bands = array.shape[-1]
    if bands >= 3:
        used = array[:, :, :3]
        if bands > 3:
            notes.append(f"{bands} bands: the first 3 used as RGB")
    else:
        used = np.repeat(array[:, :, :1], 3, axis=2)
        if bands == 2:
            notes.append("2 bands: the first used as grey")
    if used.dtype != np.uint8:
        notes.append(f"{array.dtype} samples scaled to 8 bits (min-max over the image)")
    return Image.fromarray(np.ascontiguousarray(scale_to_uint8(used)), "RGB")

