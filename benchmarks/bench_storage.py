"""Storage benchmark: ingest all 70,000 Fashion-MNIST images, and peak memory of ingesting and of
reading codes at 7k vs 70k images.

    python3 benchmarks/bench_storage.py [--processes 2] [--root /tmp/bench-storage]

Prints:
- the bare PNG-encode rate of the same (already resized) images, on one core and over a
  pool of ``--processes`` processes, measured in this run (best of ``--rounds``);
- the ingest rate (IDX -> resized PNG -> tar shards + manifest, ``--processes`` workers)
  and its ratio to the bare pool rate (the goal is at least 0.5);
- the same for a folder of 256x256 RGB JPEGs (Fashion-MNIST upscaled, made once under the
  scratch folder, one sub-folder per class): ingest into 256x256 shards against the bare
  rate of decoding, fitting and PNG-encoding the same files over the same pool;
- peak RSS of ingesting 7k and 70k images, and of one epoch of reading 7k and 70k rows of
  codes through CodeDataset + ChunkShuffleSampler, each in a fresh subprocess.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage.idx import read_idx  # noqa: E402
from storage.imaging import encode_png, fit, prepare  # noqa: E402
from storage.sources import FASHION_MNIST_DIR  # noqa: E402

IMAGE_SIZE = 32
LEVELS = [(8, 8), (16, 16)]  # the fashion-mnist preset's code grids, top first
SHARD = 1000


def _peak_rss_mib() -> float:
    # VmHWM, not getrusage: ru_maxrss survives fork + exec, so a child would report its parent's peak.
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def _encode_all(images: np.ndarray) -> int:
    return sum(len(encode_png(Image.fromarray(a))) for a in images)


def fitted_images() -> np.ndarray:
    """All 70k Fashion-MNIST images fitted to 32 x 32, as ingestion fits them."""
    raw = np.concatenate([read_idx(f"{FASHION_MNIST_DIR}/{p}-images-idx3-ubyte.gz") for p in ("train", "t10k")])
    return np.stack([np.asarray(fit(Image.fromarray(a), IMAGE_SIZE, "L")) for a in raw])


def bare_png_rate(fitted: np.ndarray, pool=None, processes: int = 1) -> float:
    """Images/s of PIL PNG encoding alone (in this process, or split over ``pool``)."""
    start = time.perf_counter()
    if pool is None:
        _encode_all(fitted)
    else:
        pool.map(_encode_all, np.array_split(fitted, processes))
    return len(fitted) / (time.perf_counter() - start)


def child_ingest(out: str, per_split: int | None, processes: int) -> dict:
    from storage.ingest import IngestConfig, ingest
    from storage.sources import IdxSource

    start = time.perf_counter()
    config = IngestConfig(image_size=IMAGE_SIZE, mode="L", shard_size=SHARD, max_samples_per_split=per_split)
    manifest = ingest(IdxSource(), out, config, processes=processes)
    seconds = time.perf_counter() - start
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"images": manifest["num_samples"], "seconds": seconds, "peak_rss_mib": _peak_rss_mib(), "children_peak_rss_mib": children}


JPEG_SIZE = 256


def make_jpeg_folder(folder: Path, count: int) -> list[str]:
    """`count` Fashion-MNIST images upscaled to 256x256 RGB JPEGs (quality 90), by class."""
    images = read_idx(f"{FASHION_MNIST_DIR}/train-images-idx3-ubyte.gz")[:count]
    labels = read_idx(f"{FASHION_MNIST_DIR}/train-labels-idx1-ubyte.gz")[:count]
    paths = []
    for i, (pixels, label) in enumerate(zip(images, labels)):
        path = folder / f"class{label}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).resize((JPEG_SIZE, JPEG_SIZE), Image.Resampling.BICUBIC).convert("RGB").save(path, quality=90)
        paths.append(str(path))
    return paths


def _prepare_all(paths: list[str]) -> int:
    return sum(len(prepare(Path(p).read_bytes(), JPEG_SIZE, "RGB")[0]) for p in paths)


def bare_jpeg_rate(paths: list[str], pool, processes: int) -> float:
    """Images/s of decoding, fitting and PNG-encoding the JPEGs over ``pool``, nothing else."""
    start = time.perf_counter()
    pool.map(_prepare_all, [list(part) for part in np.array_split(paths, processes)])
    return len(paths) / (time.perf_counter() - start)


def child_ingest_folder(folder: str, out: str, processes: int) -> dict:
    from storage.ingest import IngestConfig, ingest
    from storage.sources import ImageFolderSource

    start = time.perf_counter()
    config = IngestConfig(image_size=JPEG_SIZE, mode="RGB", shard_size=100, holdout_fraction=0.0)
    manifest = ingest(ImageFolderSource(folder), out, config, processes=processes)
    return {"images": manifest["num_samples"], "seconds": time.perf_counter() - start}


def child_write_codes(url: str, rows: int) -> dict:
    from storage.codes import create_codes, finish_codes, write_codes

    counts = [SHARD] * (rows // SHARD)
    create_codes(url, {"train": counts}, LEVELS)
    rng = np.random.default_rng(0)
    for shard, n in enumerate(counts):
        codes = [rng.integers(0, 512, (n, h, w)) for h, w in LEVELS]
        keys = [f"train-{shard:06d}-{i:06d}" for i in range(n)]
        write_codes(url, "train", shard * SHARD, codes, rng.integers(0, 10, n), keys)
    finish_codes(url)
    return {"rows": rows}


def child_read_codes(url: str) -> dict:
    import torch

    from storage.codes import ChunkShuffleSampler, CodeDataset

    after_imports = _peak_rss_mib()
    dataset = CodeDataset(url, "train")
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, sampler=ChunkShuffleSampler(dataset, seed=0))
    start, rows = time.perf_counter(), 0
    for (top, bottom), labels in loader:
        rows += len(labels)
    seconds = time.perf_counter() - start
    return {"rows": rows, "rows_per_s": rows / seconds, "rss_after_imports_mib": after_imports, "peak_rss_mib": _peak_rss_mib()}


def run_child(*args: str) -> dict:
    """Run this script in a fresh interpreter (its own peak RSS) and return its JSON line."""
    out = subprocess.run([sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="repeat the rate measurements, keep the best")
    parser.add_argument("--root", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--jpegs", type=int, default=1000, help="256x256 JPEGs in the folder case (0: skip it)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "ingest":
            result = child_ingest(rest[0], int(rest[1]) or None, int(rest[2]))
        elif kind == "ingest-folder":
            result = child_ingest_folder(rest[0], rest[1], int(rest[2]))
        elif kind == "write-codes":
            result = child_write_codes(rest[0], int(rest[1]))
        else:
            result = child_read_codes(rest[0])
        print(json.dumps(result))
        return

    root = Path(args.root or tempfile.mkdtemp(prefix="bench-storage-"))
    shutil.rmtree(root, ignore_errors=True)
    print(f"machine: {multiprocessing.cpu_count()} cores; scratch {root}; best of {args.rounds} rounds")
    load = f"{os.getloadavg()[0]:.2f}"

    # Other work on the machine steals cores now and then: alternate the measurements and keep
    # each one's best of --rounds.
    fitted = fitted_images()
    one = many = rate = 0.0
    with multiprocessing.get_context("spawn").Pool(args.processes) as pool:
        pool.map(_encode_all, np.array_split(fitted[: args.processes], args.processes))  # workers up first
        for round_ in range(args.rounds):
            one = max(one, bare_png_rate(fitted))
            many = max(many, bare_png_rate(fitted, pool, args.processes))
            full = run_child("ingest", str(root / f"full-{round_}"), "0", str(args.processes))
            rate = max(rate, full["images"] / full["seconds"])
    print(f"load average before/after: {load} / {os.getloadavg()[0]:.2f}")
    print(f"bare PNG encode, 70,000 images 32x32 L: {one:8.0f} images/s on 1 core, {many:8.0f} images/s over {args.processes} processes")
    print(
        f"ingest ({args.processes} processes), {full['images']} images -> {SHARD}-image shards + manifest: "
        f"{full['images'] / rate:.1f} s, {rate:8.0f} images/s = {rate / many:.2f} x the bare {args.processes}-process "
        f"PNG rate ({rate / one:.2f} x one core's)"
    )

    if args.jpegs:
        paths = make_jpeg_folder(root / "jpegs", args.jpegs)
        bare = folder_rate = 0.0
        with multiprocessing.get_context("spawn").Pool(args.processes) as pool:
            pool.map(_prepare_all, [paths[:1]] * args.processes)  # workers up first
            for round_ in range(args.rounds):
                bare = max(bare, bare_jpeg_rate(paths, pool, args.processes))
                r = run_child("ingest-folder", str(root / "jpegs"), str(root / f"jpeg-ingest-{round_}"), str(args.processes))
                folder_rate = max(folder_rate, r["images"] / r["seconds"])
        print(
            f"ingest ({args.processes} processes), folder of {r['images']} {JPEG_SIZE}x{JPEG_SIZE} JPEGs -> "
            f"{JPEG_SIZE}x{JPEG_SIZE} RGB shards: {folder_rate:8.0f} images/s = {folder_rate / bare:.2f} x the bare "
            f"{args.processes}-process decode + fit + PNG rate ({bare:.0f} images/s)"
        )

    for per_split, label in ((3500, "7k"), (0, "70k")):
        r = run_child("ingest", str(root / f"rss-{label}"), str(per_split), "1")
        print(f"ingest peak RSS, {r['images']:6d} images (1 process): {r['peak_rss_mib']:6.1f} MiB")

    for rows in (7000, 70000):
        url = str(root / f"codes-{rows}.zarr")
        run_child("write-codes", url, str(rows))
        r = run_child("read-codes", url)
        print(
            f"codes read peak RSS, {r['rows']:6d} rows (top 8x8 + bottom 16x16): {r['peak_rss_mib']:6.1f} MiB "
            f"({r['rss_after_imports_mib']:.1f} MiB after imports; {r['rows_per_s']:.0f} rows/s)"
        )
    if args.root is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
