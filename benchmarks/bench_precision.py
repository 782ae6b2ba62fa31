"""Training throughput by precision and memory layout (a script, not a test).

Which of bf16 autocast and channels_last win, and for which model: for one preset
(default `fashion-mnist-gpu`) it trains each model on random data and prints the median
samples/s of a training step (forward, backward, AdamW) in three modes, and each mode's
ratio to fp32, measured in the same process:

- fp32: no autocast (PyTorch's defaults: cuDNN convolutions may use TF32 on CUDA);
- bf16: bf16 autocast (`train.amp: bf16`, what `auto` picks on CUDA);
- bf16+cl: bf16 autocast with the model and images channels_last (`train.channels_last`).

    python benchmarks/bench_precision.py --device cuda
    python benchmarks/bench_precision.py --device cuda --preset imagenet-256 --models autoencoder --batch 32
    python benchmarks/bench_precision.py --device cpu --preset smoke --steps 2     # a dry run
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import vqvae2

MODES = {"fp32": ("off", False), "bf16": ("bf16", False), "bf16+cl": ("bf16", True)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_and_batch(config: vqvae2.ModelConfig, name: str, n: int, device: torch.device):
    """(model, batch, loss) for 'autoencoder', 'classifier' or 'prior-<level>' on random data."""
    images = torch.rand(n, config.image_channels, config.image_size, config.image_size, device=device)
    labels = torch.randint(max(config.num_classes, 1), (n,), device=device)
    if name == "autoencoder":
        return vqvae2.build_autoencoder(config), images, vqvae2.autoencoder_loss
    if name == "classifier":
        return vqvae2.build_classifier(config), (images, labels), vqvae2.classifier_loss
    level = int(name.removeprefix("prior-"))
    shapes, k = config.latent_shapes(), config.autoencoder.codebook_size
    prior = vqvae2.build_prior(config, level)
    codes = torch.randint(k, (n, *shapes[level]), device=device)
    cond = [torch.randint(k, (n, *s), device=device) for s in shapes[:level]] or None
    return prior, (codes, cond, labels if prior.num_classes else None), vqvae2.prior_loss


def samples_per_second(config: vqvae2.ModelConfig, name: str, mode: str, args: argparse.Namespace) -> float:
    device = torch.device(args.device)
    amp, channels_last = MODES[mode]
    torch.manual_seed(0)
    model, batch, loss_fn = _model_and_batch(config, name, args.batch, device)
    model = vqvae2.prepare_model(model, device, channels_last)
    optimizer, _ = vqvae2.make_optimizer(model, config.train_prior)

    def step() -> None:
        vqvae2.train_step(model, optimizer, batch, loss_fn, amp=amp, grad_clip=1.0, channels_last=channels_last)

    for _ in range(args.warmup):
        step()
    seconds = []
    for _ in range(args.steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return args.batch / statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fashion-mnist-gpu", choices=list(vqvae2.PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="autoencoder,classifier,prior-0,prior-1",
                        help="comma-separated: autoencoder, classifier, prior-<level>")
    parser.add_argument("--batch", type=int, default=128, help="samples per step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model and mode (median)")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    config = vqvae2.preset(args.preset)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"preset {config.name}, batch {args.batch}, {name}, torch {torch.__version__}; "
          f"samples/s of a training step (median of {args.steps}), ratio to fp32")
    print(f"{'model':<12}" + "".join(f"{mode:>20}" for mode in MODES))
    for model in args.models.split(","):
        rates = {mode: samples_per_second(config, model, mode, args) for mode in MODES}
        cells = [f"{rate:10.0f} ({rate / rates['fp32']:4.2f}x)" for rate in rates.values()]
        print(f"{model:<12}" + "".join(f"{cell:>20}" for cell in cells), flush=True)


if __name__ == "__main__":
    main()
