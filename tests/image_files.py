"""Real image files, as users have them, written with Pillow from Fashion-MNIST pixels:
a folder of mixed formats (one file corrupt), and tar shards in img2dataset's layout."""
from __future__ import annotations

import csv
import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

FORMATS = ("png", "jpg", "webp", "bmp", "png16")  # png16: 16-bit gray, what a scanner or microscope writes


def encoded(pixels: np.ndarray, fmt: str) -> bytes:
    """One gray uint8 image as a file of format `fmt` (see FORMATS)."""
    buffer = io.BytesIO()
    if fmt == "png16":
        Image.fromarray(pixels.astype(np.uint16) * 257).save(buffer, format="PNG")
    else:
        Image.fromarray(pixels).save(buffer, format={"jpg": "JPEG"}.get(fmt, fmt.upper()))
    return buffer.getvalue()


def write_folder(folder: Path, images: np.ndarray, names: Sequence[str] | None = None) -> list[Path]:
    """`images` as files cycling through FORMATS, under `folder/<names[i]>/` when names are
    given (a class-folder tree), else flat; plus one file that is not an image at all."""
    paths = []
    for i, pixels in enumerate(images):
        fmt = FORMATS[i % len(FORMATS)]
        path = folder / (names[i] if names is not None else "") / f"img{i:05d}.{fmt.removesuffix('16')}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encoded(pixels, fmt))
        paths.append(path)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but the rest of it was never written")
    return paths


def tar_bytes(members: Sequence[tuple[str, bytes]]) -> bytes:
    """A tar of `(name, data)` members, written by Python's tarfile as other tools would."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


def img2dataset_tar(images: np.ndarray, labels: Sequence[int], first_key: int) -> bytes:
    """One tar as img2dataset writes it: per sample {key}.jpg, {key}.txt (caption) and
    {key}.json (its metadata), here with the label in the json field `label`."""
    members = []
    for i, (pixels, label) in enumerate(zip(images, labels)):
        key = f"{first_key + i:09d}"
        meta = {"url": f"https://images.example.com/{key}.jpg", "key": key, "status": "success",
                "caption": f"item {key}", "width": 28, "height": 28, "label": int(label)}
        members += [(f"{key}.jpg", encoded(pixels, "jpg")), (f"{key}.txt", meta["caption"].encode()),
                    (f"{key}.json", json.dumps(meta).encode())]
    return tar_bytes(members)


def truncated_tars(folder: Path) -> str:
    """Three tar shards of four 8 x 8 PNGs each, the second cut short; their brace URL."""
    folder.mkdir()
    for t in range(3):
        data = tar_bytes([(f"{t}{i:03d}.png", encoded(np.full((8, 8), 40 * i, dtype=np.uint8), "png"))
                          for i in range(4)])
        (folder / f"{t:05d}.tar").write_bytes(data[:700] if t == 1 else data)
    return f"{folder}/{{00000..00002}}.tar"


def png_file(path: Path, seed: int = 0) -> Path:
    """A 12x12 gray PNG of random pixels at `path` (its folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoded(np.random.default_rng(seed).integers(0, 255, (12, 12), dtype=np.uint8), "png"))
    return path


def csv_list(path: Path, rows: Sequence[str]) -> Path:
    """A CSV list source at `path`: a `path` column holding `rows`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path"])
        writer.writerows([row] for row in rows)
    return path
