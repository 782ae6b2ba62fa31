"""Pixels in and out of shards: decode any source image once, bring it to the model's
resolution and colour mode, store it as lossless PNG (or WebP / JPEG at a stated
quality, for large images where PNG shards would be several times bigger); decode back
to arrays.

Resizing keeps the aspect ratio: `center-crop` (the default) scales the shorter side to the
target and centre-crops the longer one (the usual ImageNet/FFHQ preprocessing; Razavi et
al. 2019, Sec. 4, train on centre-cropped squares); `resize-pad` scales the longer side and
pads the shorter one with black, so nothing of the image is lost; `keep-ratio` scales the
shorter side to the target and keeps the longer one (up to `MAX_RATIO` times the target,
centre-cropped beyond), and training then takes a random square crop each epoch
(`storage.loader`), encoding and evaluation the centre one.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MODES = {"L": 1, "RGB": 3}  # colour mode -> channels
RESIZE_MODES = ("center-crop", "resize-pad", "keep-ratio")
MAX_RATIO = 2  # keep-ratio: a longer side beyond twice the shorter is centre-cropped to that
SHARD_FORMATS = {"png": "png", "webp": "webp", "jpeg": "jpg"}  # format -> its member's extension in a shard

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


def _eight_bit(img: Image.Image) -> Image.Image:
    # Pillow turns 16-bit gray (modes I;16*, and I, as which some 16-bit PNGs open) into L by
    # clipping at 255, so all but the darkest pixels become white. The rule here: such images
    # hold 16-bit values, and 0..65535 maps linearly onto 0..255.
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        pixels = np.asarray(img, dtype=np.float64) / 257
        return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")
    return img


def fit(img: Image.Image, size: int, mode: str, resize: str = "center-crop") -> Image.Image:
    """``img`` as a ``size`` x ``size`` image in ``mode``, resized as ``resize`` says.
    Transparent images are composited on white; 16-bit gray is scaled to 8 bits."""
    img = _eight_bit(_flatten_alpha(img))
    if img.mode != mode:
        img = img.convert(mode)
    w, h = img.size
    if (w, h) == (size, size):
        return img
    if resize == "resize-pad":
        scale = size / max(w, h)
        inner = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
        square = Image.new(mode, (size, size))  # black
        square.paste(inner, ((size - inner.width) // 2, (size - inner.height) // 2))
        return square
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    out_w, out_h = (size, size)
    if resize == "keep-ratio":
        out_w, out_h = min(new_w, MAX_RATIO * size), min(new_h, MAX_RATIO * size)
    left, top = (new_w - out_w) // 2, (new_h - out_h) // 2
    # BICUBIC in PIL widens its kernel when shrinking, so it also antialiases.
    return img.resize(
        (out_w, out_h), Image.Resampling.BICUBIC,
        box=(left / scale, top / scale, (left + out_w) / scale, (top + out_h) / scale),
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
    except Image.UnidentifiedImageError as err:  # its message names an anonymous in-memory buffer
        raise ImageError("not an image: no format Pillow reads recognises the file") from err
    except _DECODE_ERRORS as err:
        raise ImageError(f"cannot decode image: {err}") from err
    return img


def prepare(data: bytes | np.ndarray, size: int, mode: str, resize: str = "center-crop", min_size: int = 0,
            image_format: str = "png", quality: int = 95) -> tuple[bytes, tuple[int, int]]:
    """The fitted image encoded as ``image_format`` (PNG by default) and the original
    ``(width, height)``; raises :class:`ImageError` for an image that does not decode or is
    smaller than ``min_size``."""
    img = load(data)
    if min(img.size) < min_size:
        raise ImageError(f"{img.size[0]}x{img.size[1]} is smaller than ingest.min_size ({min_size} pixels)")
    try:
        fitted = fit(img, size, mode, resize)
    except _DECODE_ERRORS as err:  # some formats decode lazily, during convert/resize
        raise ImageError(f"cannot convert image: {err}") from err
    return encode(fitted, image_format, quality), img.size


def encode(img: Image.Image, image_format: str = "png", quality: int = 95) -> bytes:
    """``img`` as PNG (lossless), WebP (lossless at quality 100) or JPEG (4:4:4 chroma, so
    colour edges are not halved) bytes."""
    out = io.BytesIO()
    if image_format == "webp":
        img.save(out, format="WEBP", quality=quality, lossless=quality == 100, method=4)
    elif image_format == "jpeg":
        img.save(out, format="JPEG", quality=quality, subsampling=0)
    else:
        img.save(out, format="PNG")
    return out.getvalue()


def encode_png(img: Image.Image) -> bytes:
    """Lossless PNG bytes of ``img``."""
    return encode(img, "png")


def decode_image(data: bytes, channels: int | None = None) -> np.ndarray:
    """uint8 array H x W x C of a shard's image (PNG, WebP or JPEG); C = ``channels`` when
    given (WebP stores gray as RGB), else 1 for gray; raises :class:`ImageError`."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if channels is not None and MODES.get(img.mode) != channels:
                img = img.convert({1: "L", 3: "RGB"}[channels])
            pixels = np.array(img)  # a writable copy: torch tensors are made from it
    except _DECODE_ERRORS as err:
        raise ImageError(f"cannot decode image: {err}") from err
    return pixels[:, :, None] if pixels.ndim == 2 else pixels
