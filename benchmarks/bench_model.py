"""Throughput of the model library on this machine (a script, not a test).

Prints, for one preset (default `fashion-mnist`): autoencoder training images/s,
encoding images/s, and the seconds the reference sampler takes for a batch of images
(the yardstick the fast sampler is measured against).

    python benchmarks/bench_model.py                        # fashion-mnist on the CPU
    python benchmarks/bench_model.py --preset smoke --device cuda
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

import vqvae2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Seconds per call, after one warm-up call."""
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fashion-mnist", choices=list(vqvae2.PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-steps", type=int, default=5, help="timed autoencoder steps")
    parser.add_argument("--encode-batch", type=int, default=256)
    parser.add_argument("--samples", type=int, default=64, help="images drawn with the reference sampler")
    args = parser.parse_args()

    device = torch.device(args.device)
    config = vqvae2.preset(args.preset)
    vqvae2.seed_everything(0)
    size, channels = config.image_size, config.image_channels
    train = config.train_autoencoder
    print(f"preset {config.name}: {channels}x{size}x{size} images, latent grids {config.latent_shapes()}, "
          f"codebook {config.autoencoder.codebook_size} x {config.autoencoder.embed_dim}")
    print(f"device {device} ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads), amp={train.amp}, channels_last={train.channels_last}")

    autoencoder = vqvae2.prepare_model(vqvae2.build_autoencoder(config), device, train.channels_last)
    optimizer, _ = vqvae2.make_optimizer(autoencoder, train)
    images = torch.rand(train.batch_size, channels, size, size, device=device)
    step = timed(lambda: vqvae2.autoencoder_step(autoencoder, optimizer, images, amp=train.amp,
                                                  channels_last=train.channels_last), device, args.train_steps)
    print(f"autoencoder training: {train.batch_size / step:10.1f} images/s  (batch {train.batch_size})")

    autoencoder.eval()
    batch = torch.rand(args.encode_batch, channels, size, size, device=device)
    dtype = vqvae2.train.autocast_dtype(train.amp, device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        encode = timed(lambda: autoencoder.encode(batch), device, 3)
    print(f"encoding:             {args.encode_batch / encode:10.1f} images/s  (batch {args.encode_batch})")

    priors = [prior.to(device) for prior in vqvae2.build_priors(config)]
    labels = torch.arange(args.samples, device=device) % max(config.num_classes, 1) if config.num_classes else None
    start = time.perf_counter()
    vqvae2.sample_images(autoencoder, priors, args.samples, labels=labels, seed=0,
                         sampler=vqvae2.sample_level_reference)
    _sync(device)
    seconds = time.perf_counter() - start
    print(f"reference sampling:   {seconds:10.1f} s for {args.samples} images "
          f"({seconds / args.samples:.2f} s/image, one full prior pass per latent position)")


if __name__ == "__main__":
    main()
