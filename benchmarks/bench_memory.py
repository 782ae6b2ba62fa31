"""Activation memory and step time of a training step, with and without activation
checkpointing (a script, not a test).

For one preset (default `imagenet-256`) it trains a prior (default the bottom one) and
the autoencoder on random data, one micro-batch per step, and prints per model and mode:

- saved: bytes autograd keeps for backward after the forward (`vqvae2.SavedTensorBytes`,
  parameters left out); the same count on any device;
- peak: on CUDA, torch.cuda.max_memory_allocated during a step above the memory held
  before it (parameters, gradients, optimizer state); on a CPU, the growth of the peak
  resident set during a step (Linux /proc/self/status VmHWM, reset through clear_refs);
- step: the median seconds of a training step (forward, backward, AdamW).

Each model and mode runs in a fresh process, so one's memory never shows in another's.

    python benchmarks/bench_memory.py                       # CPU: the paper's bottom prior at 64 channels
    python benchmarks/bench_memory.py --device cuda --micro-batch 32   # the paper's widths, bf16
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import vqvae2

MODES = ("plain", "checkpointed")


def _config(args: argparse.Namespace) -> vqvae2.ModelConfig:
    """The preset, the prior scaled to --channels (its conditioning stack and code embedding
    in proportion) and the autoencoder to --ae-channels (its residual width in proportion)."""
    config = vqvae2.preset(args.preset)
    level = args.level if args.level >= 0 else config.levels - 1
    prior, autoencoder = config.priors[level], config.autoencoder
    overrides: dict[str, object] = {}
    if args.channels:
        scale = args.channels / prior.channels
        overrides.update({
            f"priors.{level}.channels": args.channels,
            f"priors.{level}.cond_channels": max(1, round(prior.cond_channels * scale)),
            f"priors.{level}.embed_dim": max(1, round(prior.embed_dim * scale)),
        })
        if prior.attention_layers:
            overrides[f"priors.{level}.attention_heads"] = min(prior.attention_heads, args.channels)
    if args.ae_channels:
        scale = args.ae_channels / autoencoder.channels
        overrides.update({"autoencoder.channels": args.ae_channels,
                          "autoencoder.res_channels": max(1, round(autoencoder.res_channels * scale))})
    return vqvae2.apply_overrides(config, overrides)


def _model_and_batch(config: vqvae2.ModelConfig, model: str, level: int, n: int, device: torch.device):
    shapes, k = config.latent_shapes(), config.autoencoder.codebook_size
    labels = torch.randint(max(config.num_classes, 1), (n,), device=device) if config.num_classes else None
    if model == "autoencoder":
        images = torch.rand(n, config.image_channels, config.image_size, config.image_size, device=device)
        return vqvae2.build_autoencoder(config).to(device), images, vqvae2.autoencoder_loss
    prior = vqvae2.build_prior(config, level).to(device)
    codes = torch.randint(k, (n, *shapes[level]), device=device)
    cond = [torch.randint(k, (n, *s), device=device) for s in shapes[:level]] or None
    return prior, (codes, cond, labels if prior.num_classes else None), vqvae2.prior_loss


def _status_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak then undercounts reused memory
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args: argparse.Namespace, model_name: str, mode: str) -> dict[str, float]:
    """One model in one mode, in this process: saved bytes, peak step memory, step seconds."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = _config(args)
    level = args.level if args.level >= 0 else config.levels - 1
    model, batch, loss_fn = _model_and_batch(config, model_name, level, args.micro_batch, device)
    vqvae2.enable_activation_checkpointing(model, enabled=mode == "checkpointed")
    optimizer, _ = vqvae2.make_optimizer(model, config.train_prior)
    amp = "bf16" if args.dtype == "bf16" else "off"

    def step() -> None:
        vqvae2.train_step(model, optimizer, batch, loss_fn, amp=amp, grad_clip=1.0)

    step()  # warm-up: gradients and optimizer state now exist, as in a long run
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        gc.collect()
        _malloc_trim()  # give the warm-up's freed memory back, else the step reuses it unseen
        Path("/proc/self/clear_refs").write_text("5")  # the peak resident set := the current one
        before = _status_kib("VmRSS")
        step()
        peak = (_status_kib("VmHWM") - before) * 1024

    model.train()
    optimizer.zero_grad(set_to_none=True)
    dtype = torch.bfloat16 if amp == "bf16" else None
    with vqvae2.SavedTensorBytes(model) as saved, torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        loss, _ = loss_fn(model, batch)
    loss.backward()
    del loss

    seconds = []
    for _ in range(args.steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return {"saved": saved.bytes, "peak": peak, "step": statistics.median(seconds)}


def _describe(config: vqvae2.ModelConfig, model: str, level: int) -> str:
    if model == "autoencoder":
        a = config.autoencoder
        return (f"autoencoder: {config.image_channels}x{config.image_size}x{config.image_size} images, "
                f"{a.channels} ch, {a.res_blocks} res-blocks of {a.res_channels}, strides {a.strides}")
    p, (h, w) = config.priors[level], config.latent_shapes()[level]
    return (f"prior level {level} ({h}x{w} codes): {p.channels} ch x {p.layers} gated layers, kernel {p.kernel_size}, "
            f"{p.attention_layers} attention, cond stack {p.cond_channels} ch x {p.cond_res_blocks} res-blocks, "
            f"dropout {p.dropout}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="imagenet-256", choices=list(vqvae2.PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--level", type=int, default=-1, help="prior level, top = 0 (default: the bottom)")
    parser.add_argument("--channels", type=int, default=None,
                        help="prior width (default: 64 on a CPU, the preset's on CUDA); 0: the preset's")
    parser.add_argument("--ae-channels", type=int, default=0, help="autoencoder width; 0: the preset's")
    parser.add_argument("--micro-batch", type=int, default=8, help="samples per step (one micro-batch)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                        help="bf16 autocast or fp32 (default: bf16 on CUDA, fp32 on a CPU)")
    parser.add_argument("--models", default="prior,autoencoder", help="comma-separated: prior, autoencoder")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model and mode (median)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # model:mode, run in this process
    args = parser.parse_args()
    on_cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bf16" if on_cuda else "fp32")
    args.channels = (0 if on_cuda else 64) if args.channels is None else args.channels

    if args.child:
        try:
            result = measure(args, *args.child.split(":"))
        except torch.OutOfMemoryError:  # the figure to report: this micro-batch does not fit
            result = {"oom": True}
        print(json.dumps(result))
        return

    config = _config(args)
    level = args.level if args.level >= 0 else config.levels - 1
    on = torch.cuda.get_device_name(args.device) if on_cuda else platform.processor() or platform.machine()
    print(f"preset {config.name}, micro-batch {args.micro_batch}, {args.dtype}, device {args.device} ({on}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads)")
    rows = []
    for model in args.models.split(","):
        print(_describe(config, model, level))
        results = {}
        for mode in MODES:
            child = [sys.executable, __file__, *sys.argv[1:], "--child", f"{model}:{mode}"]
            out = subprocess.run(child, check=True, stdout=subprocess.PIPE, text=True).stdout
            results[mode] = json.loads(out.strip().splitlines()[-1])
        rows.append((model, results))

    mib = 2**20
    peak = "torch.cuda.max_memory_allocated above the step's start" if on_cuda else "peak RSS growth in the step"
    print(f"\n{'model':<12} {'mode':<13} {'saved MiB':>10} {'peak MiB':>10} {'step s':>8}   peak: {peak}")
    for model, results in rows:
        for mode in MODES:
            r = results[mode]
            if "oom" in r:
                print(f"{model:<12} {mode:<13} {'out of memory':>30}")
                continue
            print(f"{model:<12} {mode:<13} {r['saved'] / mib:>10.1f} {r['peak'] / mib:>10.1f} {r['step']:>8.2f}")
        plain, ckpt = results["plain"], results["checkpointed"]
        if "oom" not in plain and "oom" not in ckpt:
            print(f"{model:<12} {'ratio':<13} {plain['saved'] / ckpt['saved']:>9.2f}x "
                  f"{plain['peak'] / max(ckpt['peak'], 1):>9.2f}x {ckpt['step'] / plain['step']:>7.2f}x   "
                  "(saved and peak: plain / checkpointed; step: checkpointed / plain)")

if __name__ == "__main__":
    main()
