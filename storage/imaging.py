"""Pixels in and out of shards: decode any source image once, bring it to the model's
resolution and colour mode, store it as lossless PNG; decode PNG back to arrays.

Resizing scales the shorter side to the target and centre-crops the longer one, so
objects keep their aspect ratio (the usual ImageNet/FFHQ preprocessing; Razavi et al.
2019, Sec. 4, train on centre-cropped squares).
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MODES = {"L": 1, "RGB": 3}  # colour mode -> channels

# PIL reports a broken file through any of these; each becomes a skipped, named sample.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, UnidentifiedImageError)


class ImageError(ValueError):
    """An input image that cannot be decoded; the reason is the message."""


def _flatten_alpha(img: Image.Image) -> Image.Image:
    # Transparent pixels often hold black RGB; composite on white like a viewer would.
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img


def fit(img: Image.Image, size: int, mode: str) -> Image.Image:
    """``img`` as a ``size`` x ``size`` image in ``mode``: shorter side scaled, centre crop."""
    img = _flatten_alpha(img)
    if img.mode != mode:
        img = img.convert(mode)
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    # BICUBIC in PIL widens its kernel when shrinking, so it also antialiases.
    return img.resize(
        (size, size), Image.Resampling.BICUBIC, box=(left / scale, top / scale, (left + size) / scale, (top + size) / scale)
    )


def load(data: bytes | np.ndarray) -> Image.Image:
    """Decode an encoded image file, or wrap a uint8 H x W (x C) array; raises :class:`ImageError`."""
    if isinstance(data, np.ndarray):
        if data.ndim == 2 and data.dtype == np.uint8:  # IDX rows: frombuffer skips fromarray's checks
            return Image.frombuffer("L", data.shape[::-1], np.ascontiguousarray(data), "raw", "L", 0, 1)
        return Image.fromarray(data)
    if not data:
        raise ImageError("empty file")
    try:
        img = Image.open(io.BytesIO(data))
        img = ImageOps.exif_transpose(img)  # camera photos store their rotation in EXIF
        img.load()
    except _DECODE_ERRORS as err:
        raise ImageError(f"cannot decode image: {err}") from err
    return img


def prepare(data: bytes | np.ndarray, size: int, mode: str) -> tuple[bytes, tuple[int, int]]:
    """PNG bytes of the fitted image and the original ``(width, height)``; raises :class:`ImageError`."""
    img = load(data)
    try:
        fitted = fit(img, size, mode)
    except _DECODE_ERRORS as err:  # some formats decode lazily, during convert/resize
        raise ImageError(f"cannot convert image: {err}") from err
    return encode_png(fitted), img.size


def encode_png(img: Image.Image) -> bytes:
    """Lossless PNG bytes of ``img``."""
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """uint8 array H x W x C (C = 1 for gray) of a PNG; raises :class:`ImageError`."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            pixels = np.array(img)  # a writable copy: torch tensors are made from it
    except _DECODE_ERRORS as err:
        raise ImageError(f"cannot decode PNG: {err}") from err
    return pixels[:, :, None] if pixels.ndim == 2 else pixels
