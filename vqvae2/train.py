"""Training steps for every model, and one loop that all of them share.

A step is `train_step(model, optimizer, batch, loss_fn, ...)`; the loss functions below
say what a batch is for each model. Mixed precision (bf16 autocast, on CUDA by
default) and channels_last are applied here, from outside the models; the quantizers
keep their own statistics in fp32 regardless. Checkpointing, logging and fault
injection are hooks of `fit`, so there is one loop, not one per model.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .autoencoder import VQVAE2
from .classifier import ResNetClassifier
from .config import TrainConfig
from .prior import PixelCNNPrior, bits_per_code

Metrics = dict[str, Tensor]
LossFn = Callable[[nn.Module, Any], tuple[Tensor, Metrics]]
Hook = Callable[[int, Metrics], None]


def level_names(levels: int) -> list[str]:
    """Human names of levels, top first: top, (middle...,) bottom."""
    if levels == 2:
        return ["top", "bottom"]
    if levels == 3:
        return ["top", "middle", "bottom"]
    return ["top"] + [f"middle{i}" for i in range(1, levels - 1)] + ["bottom"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for an `amp` setting ('auto': bf16 on CUDA, none on CPU)."""
    if amp == "off":
        return None
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.bfloat16
    if amp == "auto":
        return None
    raise ValueError(f"amp must be 'auto', 'bf16' or 'off', got {amp!r}")


def prepare_model(model: nn.Module, device: torch.device | str, channels_last: bool = False) -> nn.Module:
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def move_batch(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Tensors of a (nested) batch onto `device`; images (4-D floats) channels_last if asked."""
    if isinstance(batch, Tensor):
        batch = batch.to(device, non_blocking=True)
        if channels_last and batch.ndim == 4 and batch.is_floating_point():
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_batch(b, device, channels_last) for b in batch)
    return batch


# --- what a batch is, per model ------------------------------------------------------


def autoencoder_loss(model: VQVAE2, batch: Tensor | Sequence) -> tuple[Tensor, Metrics]:
    """batch: images (B, C, H, W) in [0, 1], or (images, labels)."""
    images = batch[0] if isinstance(batch, (list, tuple)) else batch
    out = model(images)
    metrics = {"loss": out.loss, "recon_loss": out.recon_loss, "commitment_loss": out.commitment_loss}
    for name, usage, ppl in zip(level_names(model.levels), out.usage, out.perplexity):
        metrics[f"usage_{name}"] = usage.float()
        metrics[f"perplexity_{name}"] = ppl
    return out.loss, metrics


def prior_loss(prior: PixelCNNPrior, batch: Sequence) -> tuple[Tensor, Metrics]:
    """batch: (codes (B, H, W), codes of the levels above or None, labels or None)."""
    codes, cond_codes, labels = batch
    loss = prior.loss(codes, cond_codes, labels)
    return loss, {"loss": loss, "bits_per_code": bits_per_code(loss)}


def classifier_loss(model: ResNetClassifier, batch: Sequence) -> tuple[Tensor, Metrics]:
    """batch: (images (B, C, H, W) in [0, 1], labels (B,))."""
    images, labels = batch
    logits = model(images)
    loss = nn.functional.cross_entropy(logits.float(), labels)
    return loss, {"loss": loss, "accuracy": (logits.argmax(1) == labels).float().mean()}


# --- the step and the loop -------------------------------------------------------------


def make_optimizer(model: nn.Module, config: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with a linear warm-up of `config.warmup_steps`, then a constant rate."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
    return optimizer, scheduler


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Any,
    loss_fn: LossFn,
    *,
    amp: str = "auto",
    channels_last: bool = False,
    grad_clip: float = 0.0,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> Metrics:
    """One optimisation step; returns detached metrics (tensors: no device sync here)."""
    device = next(model.parameters()).device
    batch = move_batch(batch, device, channels_last)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    dtype = autocast_dtype(amp, device)
    with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None):
        loss, metrics = loss_fn(model, batch)
    loss.backward()
    if grad_clip > 0:
        metrics["grad_norm"] = nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return {k: v.detach() for k, v in metrics.items()}


def autoencoder_step(model: VQVAE2, optimizer: torch.optim.Optimizer, images: Tensor, **options) -> Metrics:
    return train_step(model, optimizer, images, autoencoder_loss, **options)


def prior_step(
    prior: PixelCNNPrior,
    optimizer: torch.optim.Optimizer,
    codes: Tensor,
    cond_codes: Sequence[Tensor] | None = None,
    labels: Tensor | None = None,
    **options,
) -> Metrics:
    return train_step(prior, optimizer, (codes, cond_codes, labels), prior_loss, **options)


def classifier_step(
    model: ResNetClassifier, optimizer: torch.optim.Optimizer, images: Tensor, labels: Tensor, **options
) -> Metrics:
    return train_step(model, optimizer, (images, labels), classifier_loss, **options)


def raise_if_diverged(every: int = 50) -> Hook:
    """A hook that fails fast when the loss stops being finite (checked every `every`
    steps: each check waits for the device)."""

    def hook(step: int, metrics: Metrics) -> None:
        if step % every == 0 and not torch.isfinite(metrics["loss"]):
            raise FloatingPointError(f"the loss is {metrics['loss'].item()} at step {step}: training diverged")

    return hook


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Any],
    loss_fn: LossFn,
    config: TrainConfig,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    start_step: int = 0,
    hooks: Sequence[Hook] = (),
) -> int:
    """Train until `config.steps` (counting from `start_step`) or the batches run out.

    Each hook is called as hook(step, metrics) after every step, `step` counting
    completed steps; hooks checkpoint, log, report progress. Returns the last step."""
    step = start_step
    if step >= config.steps:
        return step
    for batch in batches:
        metrics = train_step(
            model, optimizer, batch, loss_fn,
            amp=config.amp, channels_last=config.channels_last, grad_clip=config.grad_clip, scheduler=scheduler,
        )
        step += 1
        for hook in hooks:
            hook(step, metrics)
        if step >= config.steps:
            break
    return step
