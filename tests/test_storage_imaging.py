"""Images as they come: every source image reaches the shards in the model's mode and size
by a stated rule (storage.imaging), and one that cannot be decoded is a named ImageError."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from storage.imaging import ImageError, decode_image, prepare


def _encoded(img: Image.Image, fmt: str = "PNG", **options) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **options)
    return out.getvalue()


def _prepared(data: bytes, size: int, mode: str) -> np.ndarray:
    png, _ = prepare(data, size, mode)
    return decode_image(png)


def test_sixteen_bit_gray_is_scaled_to_eight_bits_not_clipped():
    ramp = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0 .. 65535
    pixels = _prepared(_encoded(Image.fromarray(ramp)), 16, "L")[:, :, 0]
    np.testing.assert_array_equal(pixels, np.arange(256, dtype=np.uint8).reshape(16, 16))


def test_transparent_pixels_become_white():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (255, 0, 0, 255)  # left half opaque red, right half transparent black
    pixels = _prepared(_encoded(Image.fromarray(rgba, "RGBA")), 8, "RGB")
    assert (pixels[:, :4] == (255, 0, 0)).all() and (pixels[:, 4:] == 255).all()


def test_palette_and_cmyk_images_convert_to_the_models_mode():
    gray = Image.fromarray(np.full((8, 8), 100, np.uint8))
    assert (_prepared(_encoded(gray.convert("P")), 8, "L") == 100).all()
    cmyk = Image.new("CMYK", (8, 8), (0, 0, 0, 0))  # no ink: white
    assert (_prepared(_encoded(cmyk, "JPEG", quality=100), 8, "RGB") >= 250).all()


def test_exif_orientation_is_applied():
    tall = np.zeros((16, 8), np.uint8)
    tall[:8] = 255  # top half white
    img = Image.fromarray(tall)
    exif = img.getexif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    png, original = prepare(_encoded(img, "JPEG", quality=100, exif=exif), 8, "L")
    assert original == (16, 8)  # the displayed size: width 16, height 8
    pixels = decode_image(png)[:, :, 0].astype(int)
    assert pixels[:, -2:].mean() > 200 and pixels[:, :2].mean() < 50  # the white half now on the right


def test_a_decompression_bomb_and_a_non_image_are_named_errors(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's limit, stated small for the test
    with pytest.raises(ImageError, match="cannot decode"):
        prepare(_encoded(Image.new("L", (64, 64))), 8, "L")  # 4,096 pixels: over twice the limit
    with pytest.raises(ImageError, match="^not an image: no format Pillow reads recognises the file$"):
        prepare(b"%PDF-1.4 not an image", 8, "L")


def test_resize_pad_keeps_the_whole_image_and_center_crop_fills_the_square():
    wide = np.full((8, 16), 255, np.uint8)  # white, twice as wide as tall
    padded = _prepared_as(_encoded(Image.fromarray(wide)), "resize-pad")
    assert (padded[:2] == 0).all() and (padded[-2:] == 0).all() and (padded[2:6] == 255).all()  # black bars
    assert (_prepared_as(_encoded(Image.fromarray(wide)), "center-crop") == 255).all()


def test_images_below_the_minimum_size_are_named_errors():
    small = _encoded(Image.new("L", (12, 40)))
    with pytest.raises(ImageError, match="12x40 is smaller than ingest.min_size"):
        prepare(small, 8, "L", min_size=16)
    assert prepare(small, 8, "L", min_size=12)[1] == (12, 40)


def _prepared_as(data: bytes, resize: str) -> np.ndarray:
    png, _ = prepare(data, 8, "L", resize)
    return decode_image(png)[:, :, 0]


@pytest.mark.parametrize("image_format, quality, member", [("png", 95, "png"), ("webp", 100, "webp"),
                                                            ("webp", 80, "webp"), ("jpeg", 90, "jpg")])
def test_shards_store_png_webp_or_jpeg_and_read_back_at_the_stated_quality(tmp_path, image_format, quality, member):
    from storage.ingest import IngestConfig, ingest
    from storage.loader import ShardDataset
    from storage.shards import iter_samples
    from storage.sources import ImageFolderSource

    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (8, 8), dtype=np.uint8), np.ones((4, 4), dtype=np.uint8))
    for i in range(6):
        Image.fromarray(np.roll(smooth, i, axis=0)).save(tmp_path / f"img{i}.png")
    config = IngestConfig(image_size=32, mode="L", holdout_fraction=0, image_format=image_format, quality=quality)
    manifest = ingest(ImageFolderSource(str(tmp_path), labels="none"), str(tmp_path / "ds"), config)
    shard = tmp_path / "ds" / manifest["splits"]["train"]["shards"][0]["name"]
    assert {k for k in next(iter_samples(str(shard))) if not k.startswith("__")} == {member, "cls", "json"}
    images, _ = next(iter(ShardDataset(str(tmp_path / "ds"), "train", batch_size=6, seed=0, shuffle=False)))
    assert images.shape == (6, 1, 32, 32)  # gray comes back gray, whatever the format stores
    originals = {np.roll(smooth, i, axis=0).tobytes() for i in range(6)}
    error = max(min(np.abs((img[0].numpy() * 255).round() - np.frombuffer(o, np.uint8).reshape(32, 32)).mean()
                    for o in originals) for img in images)
    assert error == 0 if (image_format, quality) in {("png", 95), ("webp", 100)} else 0 < error < 8
