"""Named presets: plain data returning a `ModelConfig`, overridable field by field.

| preset          | image        | latent grids (top first)   | codebook |
|-----------------|--------------|----------------------------|----------|
| `smoke`         | 16x16 gray   | 4x4, 8x8                   | 32 x 16  |
| `fashion-mnist` | 32x32 gray   | 8x8, 16x16                 | 512 x 64 |
| `fashion-mnist-gpu` | 32x32 gray | 8x8, 16x16               | 512 x 64 |
| `imagenet-256`  | 256x256 RGB  | 32x32, 64x64               | 512 x 64 |
| `ffhq-1024`     | 1024x1024 RGB| 32x32, 64x64, 128x128      | 512 x 64 |

The paper-scale presets follow "Generating Diverse High-Fidelity Images with VQ-VAE-2"
(Appendix A, tables of hyper-parameters); `smoke` runs the whole pipeline on a 2-core
CPU in seconds and exists for tests.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .config import (
    AutoencoderConfig,
    ClassifierConfig,
    ModelConfig,
    PriorConfig,
    TrainConfig,
    apply_overrides,
)


def smoke() -> ModelConfig:
    return ModelConfig(
        name="smoke",
        image_size=16,
        image_channels=1,
        num_classes=10,
        autoencoder=AutoencoderConfig(
            channels=32, res_channels=16, res_blocks=1, strides=(2, 2),
            codebook_size=32, embed_dim=16, dead_code_steps=10, kmeans_init=True,
        ),
        priors=(
            PriorConfig(channels=32, layers=2, kernel_size=3, attention_layers=1, attention_heads=2,
                        dropout=0.0, embed_dim=16),
            PriorConfig(channels=32, layers=2, kernel_size=3, dropout=0.0, embed_dim=16,
                        cond_channels=16, cond_res_blocks=1),
        ),
        classifier=ClassifierConfig(widths=(16, 32), blocks_per_stage=1),
        train_autoencoder=TrainConfig(steps=40, batch_size=32, lr=2e-3),
        train_prior=TrainConfig(steps=40, batch_size=32, lr=2e-3),
        train_classifier=TrainConfig(steps=40, batch_size=32, lr=2e-3),
    )


def fashion_mnist() -> ModelConfig:
    # The paper's shapes scaled to 32x32 gray images and sized so the whole pipeline
    # trains on a 2-core CPU in well under an hour; raise the widths on a GPU.
    return ModelConfig(
        name="fashion-mnist",
        image_size=32,
        image_channels=1,
        num_classes=10,
        autoencoder=AutoencoderConfig(
            channels=64, res_channels=32, res_blocks=2, strides=(2, 2),
            codebook_size=512, embed_dim=64, dead_code_steps=100, kmeans_init=True,
        ),
        # The priors as measured best per CPU-minute by benchmarks/bench_quality.py (docs/evaluation.md):
        # about one epoch is far from converged, so no dropout and twice the paper's usual rate,
        # with a Polyak average of the weights for sampling; and the top prior, less than half
        # the bottom's time per step, trains twice the steps in the time the bottom takes anyway.
        priors=(
            PriorConfig(channels=64, layers=8, kernel_size=5, attention_layers=2, attention_heads=4,
                        dropout=0.0, embed_dim=32, steps=2000),
            # The bottom prior in batches of 32, twice the steps (the same images and time): it learns
            # from each step where the top one does not; its conditioning stack on the top's 8x8 grid,
            # 8 blocks that see the whole of it in the time 2 take on the 16x16 grid.
            PriorConfig(channels=64, layers=6, kernel_size=3, dropout=0.0, embed_dim=32,
                        cond_channels=64, cond_res_blocks=8, cond_resolution="above", batch_size=32, steps=2000),
        ),
        classifier=ClassifierConfig(widths=(32, 64, 128), blocks_per_stage=1, dropout=0.1),
        # About 1.6 epochs of the 60,000 training images for the autoencoder, 1 for the bottom prior, 2 for the top.
        # Every training in bf16 autocast, the image models also channels_last: on a CPU with bf16 arithmetic
        # (AVX512-BF16 or AMX: Intel Xeons since Cooper Lake, AMD since Zen 4) a step takes 1.3x to 2.4x less
        # time than in fp32 (benchmarks/bench_precision.py --device cpu), the whole run 18.5 minutes where fp32
        # took 30.8, to better samples (docs/evaluation.md). Elsewhere bf16 is emulated and slower: the
        # trainings say so, and `amp: off` trains in fp32.
        train_autoencoder=TrainConfig(steps=1500, batch_size=64, lr=1e-3, warmup_steps=100, amp="bf16",
                                      channels_last=True),
        train_prior=TrainConfig(steps=1000, batch_size=64, lr=2e-3, warmup_steps=100, ema_decay=0.995, amp="bf16"),
        train_classifier=TrainConfig(steps=1000, batch_size=64, lr=1e-3, amp="bf16", channels_last=True),
    )


def fashion_mnist_gpu() -> ModelConfig:
    # `fashion-mnist` at a GPU's width: twice the channels, deeper priors with a wider
    # conditioning stack, and about ten epochs of training where the CPU preset affords one
    # or two; still minutes on one GPU (docs/gpus.md). About 3.2 epochs of the 60,000
    # training images for the autoencoder, 4.3 for each prior, 2.1 for each classifier, so
    # the whole pipeline takes about 8 minutes on one H100 (benchmarks/gpu_estimate.py).
    # Precision and layout as measured fastest on an H100 (benchmarks/bench_precision.py):
    # the autoencoder in bf16 and channels_last (1.18x fp32), the priors in fp32 (bf16
    # 0.85x for the top one at this width: more kernels).
    return apply_overrides(fashion_mnist(), {
        "name": "fashion-mnist-gpu",
        "autoencoder": {"channels": 128, "res_channels": 64},
        # The CPU preset's prior training (no dropout, 2e-3, an average, the top's own steps) was
        # measured on a CPU at one epoch; at four, on a GPU, it is not yet: this keeps what was.
        "priors.0": {"channels": 128, "layers": 12, "embed_dim": 64, "dropout": 0.1, "steps": None},
        "priors.1": {"channels": 128, "layers": 10, "kernel_size": 5, "embed_dim": 64, "cond_channels": 128,
                     "cond_res_blocks": 4, "dropout": 0.1, "cond_resolution": "level", "batch_size": None,
                     "steps": None},
        "classifier": {"widths": [64, 128, 256], "blocks_per_stage": 2},
        # `auto` is bf16 on a GPU: what the CPU preset spells out.
        "train_autoencoder": {"batch_size": 128, "warmup_steps": 200, "channels_last": True, "amp": "auto"},
        "train_prior": {"steps": 2000, "batch_size": 128, "warmup_steps": 200, "amp": "off", "lr": 1e-3,
                        "ema_decay": 0.0},
        "train_classifier": {"batch_size": 128, "warmup_steps": 100, "amp": "auto", "channels_last": False},
    })


def imagenet_256() -> ModelConfig:
    # Appendix A (ImageNet): VQ-VAE hidden 128, residual 64, 2 layers, codebook 512 x 64;
    # top prior 32x32, 512 units, 20 layers, 4 attention layers of 8 heads, dropout 0.1;
    # bottom prior 64x64, 512 units, 20 layers, no attention, 20 conditioning res-blocks.
    return ModelConfig(
        name="imagenet-256",
        image_size=256,
        image_channels=3,
        num_classes=1000,
        autoencoder=AutoencoderConfig(
            channels=128, res_channels=64, res_blocks=2, strides=(4, 2), codebook_size=512, embed_dim=64,
        ),
        priors=(
            PriorConfig(channels=512, layers=20, kernel_size=5, attention_layers=4, attention_heads=8,
                        dropout=0.1, embed_dim=128),
            PriorConfig(channels=512, layers=20, kernel_size=5, dropout=0.1, embed_dim=128,
                        cond_channels=256, cond_res_blocks=20),
        ),
        classifier=ClassifierConfig(widths=(64, 128, 256, 512), blocks_per_stage=2),
        # channels_last: 1.47x fp32 and 1.10x plain bf16 at 256x256 on an H100 (bench_precision.py).
        train_autoencoder=TrainConfig(steps=304_741, batch_size=128, lr=3e-4, channels_last=True),
        train_prior=TrainConfig(steps=2_601_000, batch_size=512, lr=3e-4),
        train_classifier=TrainConfig(steps=100_000, batch_size=256, lr=1e-3),
    )


def ffhq_1024() -> ModelConfig:
    # Sec. 4 (FFHQ): three levels, 32x32 top, 64x64 middle, 128x128 bottom. Attention in the
    # top and (one block) middle priors and none at 128x128 is our choice, for memory.
    return ModelConfig(
        name="ffhq-1024",
        image_size=1024,
        image_channels=3,
        num_classes=0,
        autoencoder=AutoencoderConfig(
            channels=128, res_channels=64, res_blocks=2, strides=(8, 2, 2), codebook_size=512, embed_dim=64,
        ),
        priors=(
            PriorConfig(channels=512, layers=20, kernel_size=5, attention_layers=4, attention_heads=8,
                        dropout=0.1, embed_dim=128, class_conditional=False),
            PriorConfig(channels=512, layers=20, kernel_size=5, attention_layers=1, attention_heads=8,
                        dropout=0.1, embed_dim=128, cond_channels=256, cond_res_blocks=16, class_conditional=False),
            PriorConfig(channels=256, layers=10, kernel_size=5, dropout=0.1, embed_dim=64,
                        cond_channels=128, cond_res_blocks=8, class_conditional=False),
        ),
        classifier=ClassifierConfig(widths=(32, 64, 128, 256, 256, 256), blocks_per_stage=1),
        # channels_last: 1.47x fp32 and 1.10x plain bf16 at 256x256 on an H100 (bench_precision.py).
        train_autoencoder=TrainConfig(steps=304_741, batch_size=128, lr=3e-4, channels_last=True),
        train_prior=TrainConfig(steps=1_000_000, batch_size=256, lr=3e-4),
        train_classifier=TrainConfig(steps=50_000, batch_size=64, lr=1e-3),
    )


PRESETS: Mapping[str, Callable[[], ModelConfig]] = {
    "smoke": smoke,
    "fashion-mnist": fashion_mnist,
    "fashion-mnist-gpu": fashion_mnist_gpu,
    "imagenet-256": imagenet_256,
    "ffhq-1024": ffhq_1024,
}


def preset(name: str, overrides: Mapping[str, Any] | None = None) -> ModelConfig:
    """The named preset with `overrides` (dotted paths, see `apply_overrides`) applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return apply_overrides(PRESETS[name](), overrides)
