"""Sampling speed: the cached and graph-captured samplers against the reference one (a script,
not a test).

By default prints two tables (issue 6):
1. seconds to sample a batch of code grids (all levels) with the reference sampler (one
   full prior pass per position) and with the cached one (`sample_level_fast`), measured
   in the same run, and their ratio, for the `fashion-mnist` preset (8x8 + 16x16) and for
   the `imagenet-256` latent shapes (32x32 + 64x64) at reduced widths. Where a full
   reference run would take too long, its time is H * W times the measured time of one of
   its steps (a full forward and a draw; every step costs the same), and it says so;
2. the seed paper's comparison (Razavi et al. 2019, about 30x): seconds per image to
   sample in latent space and decode, against a pixel-space PixelCNN of the same width and
   depth (256 intensities per subpixel, one step per subpixel, the same cached sampler).

With --widths, prints instead one table (issue 15) at the `imagenet-256` latent shapes
(32x32 + 64x64) and the chosen widths (`paper`: the preset's own, about 250 M parameters per
prior; `reduced`: table 1's; `tiny`: a CPU dry run), for each batch of --batches: seconds per
batch (both levels) of the reference (always extrapolated from one measured step per level),
the cached sampler, and the graph-captured one (`sample_level_graphed`, fp32 and bf16; on a CPU
it runs the same static steps eagerly). The graph-captured sampler captures its graphs in every
call, and its times include that.

TF32 is off throughout (cuDNN convolutions default to TF32 on Ampere and later GPUs, matrix
products do not): with it the reference's full forward rounds its convolutions to TF32 while the
cached step's per-position matrix products stay fp32, so the logits differ by ~1e-3 and so,
soon, do the draws; with it off they should agree code for code, as on a CPU (table 1 and
the --widths table print whether they do).

    python benchmarks/bench_sampling.py                 # about 3 minutes on 2 CPU cores
    python benchmarks/bench_sampling.py --threads 1     # steadier on a CPU other jobs share
    python benchmarks/bench_sampling.py --device cuda
    python benchmarks/bench_sampling.py --device cpu --widths tiny --batches 2,4   # dry run, < 1 minute
    python benchmarks/bench_sampling.py --device cuda --widths paper --batches 16,128
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time

import torch

import vqvae2
from vqvae2.draw import evaluating, sample_logits
from vqvae2.graph_sampling import sample_level_graphed
from vqvae2.sampling import sample_level_reference

# imagenet-256 at widths a 2-core CPU samples in seconds (paper, Appendix A: 512 channels,
# conditioning stack 256, embedding 128); depth, kernels, attention and grids as in the paper.
IMAGENET_REDUCED = {"priors.0.channels": 128, "priors.1.channels": 128, "priors.0.embed_dim": 64,
                    "priors.1.embed_dim": 64, "priors.1.cond_channels": 64}
# The same grids and kinds of layer (attention on top, a conditioning stack below) at a size a
# 2-core CPU samples in seconds: a dry run of the --widths table, not a measurement.
IMAGENET_TINY = {**{f"priors.{level}.{field}": value for level in (0, 1) for field, value in
                    [("channels", 16), ("layers", 4), ("embed_dim", 8)]},
                 "priors.0.attention_layers": 1, "priors.0.attention_heads": 2,
                 "priors.1.cond_channels": 8, "priors.1.cond_res_blocks": 1}
WIDTHS = {"paper": {}, "reduced": IMAGENET_REDUCED, "tiny": IMAGENET_TINY}
sample_level_graphed_bf16 = functools.partial(sample_level_graphed, dtype=torch.bfloat16)


def stopwatch(fn, device: torch.device):
    """(fn(), seconds), synchronising the device around the call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def sample_all_levels(priors, n, labels, sampler, device):
    """(codes top first, seconds) for one batch drawn with `sampler`, seed 0."""
    return stopwatch(lambda: vqvae2.sample_codes(priors, n, labels=labels, seed=0, sampler=sampler), device)


def reference_step_seconds(prior, cond, labels, device, repeats: int = 2) -> float:
    """One step of the reference sampler: a full forward over the whole grid, then a draw."""
    codes = torch.zeros(labels.shape[0], *prior.shape, dtype=torch.long, device=device)
    with torch.no_grad(), evaluating(prior):
        stopwatch(lambda: prior(codes, cond, labels), device)  # warm-up
        times = [stopwatch(lambda: sample_logits(prior(codes, cond, labels)[:, :, 0, 0]), device)[1]
                 for _ in range(repeats)]
    return min(times)


def compare_samplers(config, n, device, full_reference: bool) -> tuple[list[torch.Tensor], float, float, str]:
    """(fast codes, reference seconds, fast seconds, how the reference time was obtained)."""
    torch.manual_seed(0)
    priors = [prior.to(device) for prior in vqvae2.build_priors(config)]
    labels = torch.arange(n, device=device) % config.num_classes
    fast, fast_s = sample_all_levels(priors, n, labels, vqvae2.sample_level_fast, device)
    if full_reference:
        reference, ref_s = sample_all_levels(priors, n, labels, sample_level_reference, device)
        graphed, _ = sample_all_levels(priors, n, labels, sample_level_graphed, device)
        same = ["yes" if all(torch.equal(a, b) for a, b in zip(codes, reference)) else "NO" for codes in (fast, graphed)]
        return fast, ref_s, fast_s, f"measured; codes identical: cached {same[0]}, graphed {same[1]}"
    ref_s = reference_seconds(priors, fast, labels, device, repeats=2)
    return fast, ref_s, fast_s, "extrapolated: H*W x one measured step per level"


def reference_seconds(priors, codes, labels, device, repeats: int) -> float:
    """The reference sampler's time for all levels: H * W times one measured step per level."""
    return sum(
        reference_step_seconds(prior, codes[:level] or None, labels, device, repeats) * prior.shape[0] * prior.shape[1]
        for level, prior in enumerate(priors)
    )


def seconds_or_oom(priors, n, labels, sampler, device) -> tuple[list[torch.Tensor] | None, float | None]:
    """sample_all_levels, or (None, None) where the device runs out of memory: at the paper's
    widths the cached sampler's per-layer conditioning maps alone need ~86 GB at a batch of 128."""
    try:
        return sample_all_levels(priors, n, labels, sampler, device)
    except torch.OutOfMemoryError:
        pass
    if device.type == "cuda":  # after the except block, which kept the failed call's tensors alive
        torch.cuda.empty_cache()
    return None, None


def graphed_table(widths: str, batches: list[int], device: torch.device) -> None:
    """Issue 15's table: reference (extrapolated), cached, graph-captured fp32 and bf16."""
    config = vqvae2.preset("imagenet-256", WIDTHS[widths])
    describe(config)
    torch.manual_seed(0)
    priors = [prior.to(device) for prior in vqvae2.build_priors(config)]
    params = sum(p.numel() for p in priors[0].parameters()) / 1e6
    warm_up(priors, device)
    print(f"\nseconds per batch of imagenet-256 code grids (32x32 + 64x64), {widths} widths "
          f"({params:.3g} M parameters in the top prior), on {device}; reference: H*W x one measured step "
          f"per level (extrapolated); graphed: capture included")
    print(f"{'batch':>5s} {'reference s':>12s} {'cached s':>9s} {'graphed s':>10s} {'graphed bf16 s':>15s} "
          f"{'graphed vs cached':>18s} {'vs reference':>13s}  graphed codes = cached codes")
    for n in batches:
        labels = torch.arange(n, device=device) % config.num_classes
        graphed, graphed_s = sample_all_levels(priors, n, labels, sample_level_graphed, device)
        ref_s = reference_seconds(priors, graphed, labels, device, repeats=1)
        cached, cached_s = seconds_or_oom(priors, n, labels, vqvae2.sample_level_fast, device)
        _, bf16_s = sample_all_levels(priors, n, labels, sample_level_graphed_bf16, device)
        same = "-" if cached is None else "yes" if all(torch.equal(a, b) for a, b in zip(cached, graphed)) else "NO"
        cached_text = "OOM" if cached_s is None else f"{cached_s:.2f}"
        ratio = "-" if cached_s is None else f"{cached_s / graphed_s:.1f}x"
        print(f"{n:5d} {ref_s:12.1f} {cached_text:>9s} {graphed_s:10.2f} {bf16_s:15.2f} {ratio:>18s} "
              f"{ref_s / graphed_s:12.0f}x  {same}", flush=True)


def warm_up(priors, device) -> None:
    """One forward per prior at a batch of 1: the device's libraries initialise before any timing."""
    codes: list[torch.Tensor] = []
    with torch.no_grad(), evaluating(*priors):
        for prior in priors:
            labels = torch.zeros(1, dtype=torch.long, device=device) if prior.num_classes else None
            prior(torch.zeros(1, *prior.shape, dtype=torch.long, device=device), codes or None, labels)
            codes.append(torch.zeros(1, *prior.shape, dtype=torch.long, device=device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe(config) -> None:
    print(f"{config.name}: priors " + "; ".join(
        f"{p.channels} ch x {p.layers} layers, kernel {p.kernel_size}, {p.attention_layers} attention"
        + (f", cond stack {p.cond_channels} ch x {p.cond_res_blocks} blocks" if level else "")
        for level, p in enumerate(config.priors)))


def pixel_prior(config, size: int, rows: int) -> vqvae2.PixelCNNPrior:
    """A pixel-space gated PixelCNN as wide and deep as the top prior (no attention, which
    only flatters it: its per-step cost would grow with the 65k-long key/value cache), over
    `rows` rows of `size` pixels, 256 intensities, class-conditional like the latent priors."""
    stack = dataclasses.replace(config.priors[0], attention_layers=0)
    return vqvae2.PixelCNNPrior(stack, num_codes=256, shape=(rows, size), num_classes=config.num_classes)


def latent_versus_pixel(config, priors_codes_seconds, n, device, rows: int):
    """(latent seconds per image, pixel seconds per image, how the pixel time was obtained)."""
    autoencoder = vqvae2.build_autoencoder(config).to(device).eval()
    codes, latent_s = priors_codes_seconds
    with torch.no_grad():
        _, decode_s = stopwatch(lambda: autoencoder.decode_codes(codes), device)
    size, channels = config.image_size, config.image_channels
    rows = min(rows, size)
    torch.manual_seed(0)
    prior = pixel_prior(config, size, rows).to(device)
    labels = torch.arange(n, device=device) % config.num_classes
    _, pixel_s = stopwatch(lambda: vqvae2.sample_level_fast(prior, n, labels=labels), device)
    pixel_s *= size / rows * channels  # every subpixel is one step, and every row costs the same
    how = "measured" if rows == size and channels == 1 else f"{rows} of {size} rows measured, x{channels} subpixels"
    return (latent_s + decode_s) / n, pixel_s / n, how


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--fashion-batch", type=int, default=16)
    parser.add_argument("--imagenet-batch", type=int, default=8)
    parser.add_argument("--pixel-rows", type=int, default=4, help="rows of the 256x256 pixel model to time")
    parser.add_argument("--widths", choices=sorted(WIDTHS), default=None,
                        help="print only the graph-captured sampler's table, at these widths")
    parser.add_argument("--batches", default="16,128", help="batch sizes of the --widths table, comma-separated")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # See the module docstring: TF32 convolutions would make the samplers' codes differ.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, TF32 off, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    if args.widths:
        graphed_table(args.widths, [int(b) for b in args.batches.split(",")], device)
        print(f"(load average {os.getloadavg()[0]:.2f} at the end)")
        return

    fashion = vqvae2.preset("fashion-mnist")
    imagenet = vqvae2.preset("imagenet-256", IMAGENET_REDUCED)
    runs = [  # (label, config, batch, run the reference in full, rows of the pixel model to time)
        ("fashion-mnist  8x8 + 16x16", fashion, args.fashion_batch, True, fashion.image_size),
        ("imagenet-256  32x32 + 64x64", imagenet, args.imagenet_batch, False, args.pixel_rows),
    ]
    for _, config, *_ in runs:
        describe(config)

    print("\n1. seconds to sample one batch of code grids (all levels), reference vs cached")
    print(f"{'latent grids':30s} {'batch':>5s} {'reference s':>12s} {'cached s':>9s} {'speed-up':>9s}  reference time")
    sampled = []
    for label, config, n, full, _ in runs:
        codes, ref_s, fast_s, how = compare_samplers(config, n, device, full)
        sampled.append((codes, fast_s))
        print(f"{label:30s} {n:5d} {ref_s:12.1f} {fast_s:9.2f} {ref_s / fast_s:8.0f}x  {how}", flush=True)

    print("\n2. seconds per image: latent sampling (cached) + decoding vs a pixel-space PixelCNN (cached)")
    print(f"{'image':30s} {'latent+decode':>13s} {'pixel-space':>12s} {'speed-up':>9s}  pixel-space time")
    for (_, config, n, _, rows), done in zip(runs, sampled):
        latent, pixel, how = latent_versus_pixel(config, done, n, device, rows)
        image = f"{config.name} {config.image_channels}x{config.image_size}x{config.image_size}"
        print(f"{image:30s} {latent:13.3f} {pixel:12.2f} {pixel / latent:8.1f}x  {how}", flush=True)
    print(f"(the paper reports latent sampling about 30x faster at 256x256x3; load average "
          f"{os.getloadavg()[0]:.2f} at the end)")


if __name__ == "__main__":
    main()
