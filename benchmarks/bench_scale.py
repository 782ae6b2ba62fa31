"""ImageNet-1k at 256 px and FFHQ at 1024 px on paper: per stage, the bytes written, the S3
requests, and the time on N Dask worker cores and K GPUs (docs/scale.md).

    python3 benchmarks/bench_scale.py [--cores 64] [--gpus 8]

Every figure is either measured in this run on this machine (marked `here`), taken from a
measurement recorded in the docs (marked with its page), or a stated assumption (marked
`assumed`, with its reason in ASSUMED below). Measured here, on one core:
- the ingest of one image: a natural photo (matplotlib's sample `grace_hopper.jpg`, 512x600
  JPEG, the size of a typical ImageNet original) fitted to 256x256 RGB and encoded as each
  shard format; for FFHQ the same photo as a 1024x1024 PNG fitted to 1024x1024. Time per
  image and bytes per image, and the time to decode one shard image again (what training
  and encoding pay per image read);
- the bytes per code of Zstd-compressed codes (as `storage.codes` writes them) drawn with
  the perplexity of a trained 512-entry codebook;
- the parameters of every model of the imagenet-256 and ffhq-1024 presets (built on the
  meta device), hence the bytes of each model.pt (fp32) and checkpoint (with Adam's two
  moments).
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import math
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHOTO = Path(np.__file__).parents[1] / "matplotlib" / "mpl-data" / "sample_data" / "grace_hopper.jpg"

# What the docs measured, and where (all on one H100, torch 2.11).
H100 = {
    "autoencoder imagenet-256 train samples/s": (2587, "docs/gpus.md: bench_precision, bf16 + channels_last, batch 32"),
    "bottom prior imagenet-256 s per 32 samples": (0.53, "docs/library.md: bench_memory, bf16, paper width"),
    "sampling imagenet-256 s per 16 candidates": (4.66, "docs/library.md: bench_sampling, graphed bf16, paper widths"),
}
# Orchestration per mapped unit, from bench_mapping.py (server API, 2 Dask process workers,
# cached units): CPU seconds in the flow's process and in the Prefect server, the parts
# that more workers do not spread.
FLOW_CPU_S, SERVER_CPU_S = 0.068, 0.063
# Requests per unit of each stage, counted at a real S3 API (bench_s3_requests.py on the
# smoke preset, with training.checkpoint_every 500 and 10: one checkpoint a training, then
# four): an encoded shard wrote 4 chunk objects there; each further chunk object adds its
# PUT, and the HEAD and GET that read it back for its digest (storage.codes.write_codes).
S3_REQUESTS = {"ingest per shard": 28, "encode per shard": 133, "encode per further chunk": 3,
               "training": 35, "per checkpoint": 6, "sample per batch": 22}

ASSUMED = {
    "top prior rate": "the top prior trains 4x as many samples/s as the bottom one: a quarter of its positions "
                      "(32x32 against 64x64) and no 20-block conditioning stack; its 4 attention layers over 1,024 "
                      "positions are cheap beside 20 gated layers",
    "classifier rate": "the judge and feature classifiers (ResNets of the autoencoder's width at the same size) train "
                       "as many samples/s as the autoencoder",
    "encode rate": "encoding is the encoder's forward only: about a sixth of an autoencoder training step (half the "
                   "model, a third of the work of forward + backward), 6x the autoencoder's training rate, unless "
                   "decoding the shards' images is slower",
    "ffhq priors": "FFHQ's priors cost the imagenet-256 bottom prior's time scaled by positions x channels^2 x "
                   "layers (the gated layers' work), attention and conditioning stacks included in that ratio",
    "ffhq autoencoder": "the 1024 px autoencoder trains 16x slower per sample than the 256 px one (16x the pixels)",
    "ffhq png": "an FFHQ original PNG is 1.27 MB (its published 89.1 GB / 70,000 images); ingest keeps PNG at 1024 px, "
                "so a shard image is as large",
    "ddp": "K GPUs train at 0.9 K times one GPU's rate (data-parallel, the gradient all-reduce overlapping backward)",
    "decode workers": "each GPU's training or encoding reads through 8 decode processes (training.num_workers 8)",
    "rejection": "sampling draws enough candidates for the lowest acceptance rate, 0.1: 10 per image kept (FFHQ, "
                 "unlabelled, is sampled without rejection: one candidate per image)",
    "sampling": "drawing a candidate costs the paper widths' measured time per code position (FFHQ's 21,504 "
                "positions against ImageNet's 5,120)",
}

DATASETS = {
    # name: (preset, train images, test images, shard size)
    "ImageNet-1k, 256 px": ("imagenet-256", 1_281_167, 50_000, 1000),
    "FFHQ, 1024 px": ("ffhq-1024", 63_000, 7_000, 1000),  # 90/10 by ingest.holdout_fraction's stable hash
}


def _per_image(make, repeats: int) -> tuple[float, object]:
    result = make()  # warm
    started = time.perf_counter()
    for _ in range(repeats):
        result = make()
    return (time.perf_counter() - started) / repeats, result


def measure_images() -> dict[str, dict[str, float]]:
    """{dataset: {figure: value}}: per-image ingest time and bytes per format, decode time."""
    from storage.imaging import decode_image, prepare

    photo = PHOTO.read_bytes()
    square = Image.open(io.BytesIO(photo)).convert("RGB").resize((1024, 1024), Image.BICUBIC)
    png_1024 = io.BytesIO()
    square.save(png_1024, format="PNG")
    sources = {"ImageNet-1k, 256 px": (photo, 256), "FFHQ, 1024 px": (png_1024.getvalue(), 1024)}
    found = {}
    for name, (data, size) in sources.items():
        figures = {"source bytes": len(data)}
        repeats = 40 if size == 256 else 4
        for image_format in ("png", "webp", "jpeg"):
            seconds, (encoded, _) = _per_image(lambda: prepare(data, size, "RGB", image_format=image_format), repeats)
            figures[f"ingest ms {image_format}"] = 1000 * seconds
            figures[f"bytes {image_format}"] = len(encoded)
            figures[f"decode ms {image_format}"] = 1000 * _per_image(lambda: decode_image(encoded, 3), repeats)[0]
            if image_format == "png":  # a sample batch keeps its images as arrays in a compressed npz
                archive = io.BytesIO()
                np.savez_compressed(archive, images=decode_image(encoded, 3)[None])
                figures["bytes npz"] = len(archive.getvalue())
        found[name] = figures
    return found


def measure_code_bytes(perplexity: float = 240.0, codebook: int = 512) -> float:
    """Bytes per code of int16 codes drawn i.i.d. with `perplexity` (README: a trained fashion-mnist
    codebook's 239 to 297), written with `storage.codes`' compressor in ~1 MiB chunks."""
    import zarr
    from storage.codes import _COMPRESSOR

    # A Zipf-like law whose perplexity is `perplexity`: p_i ~ i^-s, s found by bisection.
    ranks = np.arange(1, codebook + 1, dtype=np.float64)
    low, high = 0.0, 5.0
    for _ in range(60):
        s = (low + high) / 2
        p = ranks ** -s
        p /= p.sum()
        if math.exp(-(p * np.log(p)).sum()) > perplexity:
            low = s
        else:
            high = s
    rows, side = 1024, 32
    codes = np.random.default_rng(0).choice(codebook, size=(rows, side, side), p=p).astype(np.int16)
    array = zarr.create_array(store={}, shape=codes.shape, chunks=(rows // 2, side, side), dtype="int16",
                              compressors=[_COMPRESSOR])
    array[:] = codes
    return array.nbytes_stored() / codes.size


def model_sizes(preset_name: str) -> dict[str, int]:
    """{model: parameters} of a preset, built on the meta device (nothing allocated)."""
    import torch

    import vqvae2

    config = vqvae2.preset(preset_name)
    if not config.num_classes:  # unlabelled: the feature network predicts 4 rotations
        config = dataclasses.replace(config, num_classes=4)
    names = vqvae2.level_names(len(config.priors))
    with torch.device("meta"):
        models = {"autoencoder": vqvae2.build_autoencoder(config),
                  "classifier": vqvae2.build_classifier(config),
                  **{f"prior-{names[level]}": vqvae2.build_prior(config, level) for level in range(len(config.priors))}}
    return {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}


def _hours(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def plan(name: str, images: dict[str, float], code_bytes: float, sizes: dict[str, int], cores: int,
         gpus: int) -> list[tuple[str, str, str, str, str]]:
    """Rows (stage, bytes written, S3 requests, time, from what) for one dataset."""
    from storage.codes import choose_chunk_rows
    from tasks.config import pipeline_config

    preset, train, test, shard = DATASETS[name]
    config = pipeline_config(preset).with_classes(pipeline_config(preset).model.num_classes)
    model = config.model
    total, shards = train + test, math.ceil(train / shard) + math.ceil(test / shard)
    png = 1.27e6 if preset == "ffhq-1024" else images["bytes png"]  # ASSUMED["ffhq png"]: the photo upscaled is smoother
    decode_s = images["decode ms png"] / 1000
    rows = []

    # The workers' share spreads over the cores; the flow's and the server's per unit do not.
    ingest_s = max(total * images["ingest ms png"] / 1000 / cores, shards * max(FLOW_CPU_S, SERVER_CPU_S))
    rows.append(("ingest", _bytes(total * png), f"{shards * S3_REQUESTS['ingest per shard']:,}",
                 f"{_hours(ingest_s)} on {cores} cores",
                 f"{shards:,} shards of {shard:,}; here: {images['ingest ms png']:.0f} ms an image (PNG)"))

    scale = (model.image_size // 256) ** 2
    ae_rate = H100["autoencoder imagenet-256 train samples/s"][0] / scale * 0.9 * gpus
    feed = gpus * 8 / decode_s  # 8 decode processes per GPU
    levels = [tuple(s) for s in model.autoencoder.latent_shapes(model.image_size)]
    codes_per_image = sum(h * w for h, w in levels)

    def training(label: str, steps: int, batch: int, rate: float, params: int, reads_images: bool) -> tuple:
        seconds = steps * batch / (min(rate, feed) if reads_images else rate)
        written = params * 4 + 2 * params * 12  # model.pt + the two checkpoints kept
        checkpoints = steps // 500  # training.checkpoint_every
        requests = S3_REQUESTS["training"] + checkpoints * S3_REQUESTS["per checkpoint"]
        return (label, _bytes(written), f"{requests:,}", f"{_hours(seconds)} on {gpus} GPUs",
                f"{steps:,} steps x {batch}, {params / 1e6:.0f} M parameters")

    rows.append(training("train-autoencoder", model.train_autoencoder.steps, model.train_autoencoder.batch_size,
                         ae_rate, sizes["autoencoder"], True))
    rows.append(training("train-classifiers (x2)", 2 * model.train_classifier.steps,
                         model.train_classifier.batch_size, ae_rate, 2 * sizes["classifier"], True))
    encode_rate = min(6 * ae_rate, feed)
    chunk_rows = choose_chunk_rows([shard] * 4, 2 * codes_per_image)
    chunks = (len(levels) + 2) * math.ceil(shard / chunk_rows)  # a shard's chunk objects: levels, labels, keys
    encode_requests = shards * (S3_REQUESTS["encode per shard"] + S3_REQUESTS["encode per further chunk"]
                                * max(0, chunks - 4))
    rows.append(("encode", _bytes(total * codes_per_image * code_bytes), f"{encode_requests:,}",
                 f"{_hours(max(total / encode_rate, shards * max(FLOW_CPU_S, SERVER_CPU_S)))} on {gpus} GPUs",
                 f"{codes_per_image:,} codes an image at {code_bytes:.2f} B (here)"))

    bottom_per_sample = H100["bottom prior imagenet-256 s per 32 samples"][0] / 32
    paper_bottom = 64 * 64 * 512 ** 2 * 20
    names = [n for n in sizes if n.startswith("prior-")]
    for level, prior in enumerate(model.priors):
        h, w = levels[level]
        if preset == "imagenet-256":
            per_sample = bottom_per_sample if level == 1 else bottom_per_sample / 4
        else:
            per_sample = bottom_per_sample * h * w * prior.channels ** 2 * prior.layers / paper_bottom
        rate = 0.9 * gpus / per_sample
        train = model.prior_training(level)
        rows.append(training(f"train-prior {names[level]}", train.steps, train.batch_size,
                             rate, sizes[names[level]], False))

    candidates = 10 * config.num_samples if model.num_classes else config.num_samples  # no labels: no rejection
    # Drawing costs a step per code position: FFHQ's 21,504 against the paper widths' 5,120.
    sample_s = candidates * H100["sampling imagenet-256 s per 16 candidates"][0] / 16 / gpus * codes_per_image / 5120
    batches = math.ceil(candidates / config.sample_batch_size)
    npz = images["bytes npz"] * (png / images["bytes png"])  # FFHQ: as much larger as its PNG
    rows.append(("sample", _bytes(candidates * (npz + codes_per_image * 2)),
                 f"{batches * S3_REQUESTS['sample per batch']:,}", f"{_hours(sample_s)} on {gpus} GPUs",
                 f"{candidates:,} candidates for {config.num_samples:,} kept"
                 + (" at rate 0.1" if model.num_classes else ", unconditional: no rejection")))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cores", type=int, default=64, help="Dask worker cores (processes of 1 thread) for ingest")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs for the trainings, encoding and sampling")
    args = parser.parse_args()

    images = measure_images()
    code_bytes = measure_code_bytes()
    print("Measured here, per image, one core (a natural photo; FFHQ: it as a 1024x1024 PNG):")
    print("| dataset | format | ingest ms | bytes in the shard | decode ms |")
    print("|---|---|---|---|---|")
    for name, figures in images.items():
        for image_format in ("png", "webp", "jpeg"):
            print(f"| {name} | {image_format} | {figures[f'ingest ms {image_format}']:.2f} | "
                  f"{figures[f'bytes {image_format}']:,} | {figures[f'decode ms {image_format}']:.2f} |")
        print(f"| {name} | sample batch (npz) | | {figures['bytes npz']:,} | |")
    print(f"\ncodes: {code_bytes:.3f} bytes per code (int16, Zstd 3, perplexity 240 of 512)\n")

    for name, (preset, *_rest) in DATASETS.items():
        sizes = model_sizes(preset)
        print(f"{name} (preset {preset}); parameters: "
              + ", ".join(f"{model} {count / 1e6:.1f} M" for model, count in sizes.items()))
        print("| stage | bytes written | S3 requests | time | from |")
        print("|---|---|---|---|---|")
        for row in plan(name, images[name], code_bytes, sizes, args.cores, args.gpus):
            print("| " + " | ".join(row) + " |")
        print()
    print("Assumed:")
    for key, why in ASSUMED.items():
        print(f"- {key}: {why}")


if __name__ == "__main__":
    main()
