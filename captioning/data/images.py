"""Image loading for the datasets: any file PIL reads -> RGB, optionally resized.

Palette, greyscale, alpha, CMYK and 16-bit images (UCM-captions ships TIFFs) are converted to 8-bit RGB;
16-bit samples are scaled (``v / 257``), not clipped. An image of another size is resized, never rejected.
"""

from __future__ import annotations

import os
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2

from captioning.errors import DataError

Size = int | tuple[int, int]  # an int (square) or (height, width), as in torchvision


def _scaled_to_uint8(array: np.ndarray) -> np.ndarray:
    """High bit-depth greyscale samples -> uint8, by the range of the bit depth they use."""
    array = np.asarray(array)
    if array.dtype.kind == "f":
        finite = array[np.isfinite(array)]
        top = float(finite.max()) if finite.size else 1.0
        scale = 255.0 if top <= 1.0 else 1.0  # [0, 1] floats, else already on a 0-255 scale
        return np.clip(np.nan_to_num(array) * scale, 0, 255).round().astype(np.uint8)
    top = int(array.max()) if array.size else 0
    if top <= 255:
        return np.clip(array, 0, 255).astype(np.uint8)
    if top <= 65535:
        return np.clip(np.round(array / 257.0), 0, 255).astype(np.uint8)
    return np.clip(np.round(array / 16843009.0), 0, 255).astype(np.uint8)  # 32-bit: 2**32-1 / 255


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> ``RGB`` (alpha is dropped; 16/32-bit and float greyscale are scaled to 8 bits)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_scaled_to_uint8(np.asarray(image)), mode="L").convert("RGB")
    if mode in ("P", "PA"):
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def _size_hw(size: Size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def resize(image: Image.Image, size: Size | None) -> Image.Image:
    """Resize to ``size`` (int: square; (height, width)) with bicubic filtering; same size: unchanged."""
    if size is None:
        return image
    height, width = _size_hw(size)
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.BICUBIC)


def load_image(source: str | os.PathLike | IO[bytes], size: Size | None = None) -> Image.Image:
    """Open an image file (path or binary file object) as an RGB PIL image, applying EXIF orientation and
    resizing to ``size`` when given. Unreadable input raises ``DataError`` naming the file."""
    name = source if isinstance(source, str | os.PathLike) else getattr(source, "name", "<image stream>")
    try:
        with Image.open(source) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened) or opened
            image = to_rgb(image)
            if image is opened:
                image = image.copy()  # detach from the file handle closed by ``with``
    except FileNotFoundError:
        raise DataError("image file does not exist", path=name) from None
    except UnidentifiedImageError:
        raise DataError("not an image file PIL can read", path=name) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot decode image ({exc})", path=name) from None
    return resize(image, size)


def default_transform(
    mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None
) -> v2.Compose:
    """PIL image -> float tensor ``[3, H, W]`` in [0, 1] (then normalised when ``mean``/``std`` are given)."""
    steps: list = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if mean is not None or std is not None:
        if mean is None or std is None:
            raise ValueError("give both mean and std, or neither")
        steps.append(v2.Normalize(mean=list(mean), std=list(std)))
    return v2.Compose(steps)
