"""Training steps for every model, and one loop that all of them share.

A step is `train_step(model, optimizer, batch, loss_fn, ...)`; the loss functions below
say what a batch is for each model. Mixed precision (bf16 autocast, on CUDA by
default), channels_last, gradient accumulation over micro-batches and activation
checkpointing are applied here, from outside the models; the quantizers keep their own
statistics in fp32 regardless. Checkpointing, logging and fault injection are hooks of
`fit`, so there is one loop, not one per model.
"""
from __future__ import annotations

import functools
import math
import random
import weakref
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.checkpoint import checkpoint

from .autoencoder import VQVAE2
from .classifier import ResNetClassifier
from .config import TrainConfig
from .layers import Decoder, Encoder, ResBlock
from .pixelcnn import CausalSelfAttention, GatedLayer
from .prior import PixelCNNPrior, bits_per_code
from .quantize import accumulate_codebook_updates

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


def bf16_is_native(device: torch.device) -> bool:
    """Whether `device` does bf16 arithmetic in hardware: a CUDA GPU that supports it, or a CPU
    with AVX512-BF16 or AMX (oneDNN's bf16 kernels). Elsewhere bf16 autocast is emulated and
    slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(probe() for probe in probes if probe is not None)


def prepare_model(model: nn.Module, device: torch.device | str, channels_last: bool = False) -> nn.Module:
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


# --- activation checkpointing ----------------------------------------------------------
# Blocks that keep only their inputs between forward and backward and run again in
# backward (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"): the
# priors' gated layers and attention blocks, the residual blocks of their conditioning
# stacks, and the autoencoder's encoders and decoders whole (their residual stacks and
# the full-resolution convolutions around them). Only the outermost block is
# checkpointed, never one inside another. None holds a quantizer (its forward moves the
# codebook) or a BatchNorm (its running statistics would move twice): the classifier
# has no such blocks, and the flag does nothing there.
CHECKPOINTED_BLOCKS: tuple[type[nn.Module], ...] = (GatedLayer, CausalSelfAttention, ResBlock, Encoder, Decoder)


class _Recomputed:
    """A block's forward under torch.utils.checkpoint, when training with gradients; as is otherwise
    (eval, no_grad, and the cached sampler, which calls the layers' own vertical/horizontal)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        forward = type(self.module).forward.__get__(self.module)
        if self.module.training and torch.is_grad_enabled():
            # Non-reentrant: works with inputs that need no gradient and with DDP; it saves
            # and restores the RNG state, so dropout draws the same masks when recomputed.
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)


def enable_activation_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Checkpoint (or, enabled=False, stop checkpointing) the outermost blocks of `model`
    of the CHECKPOINTED_BLOCKS types; returns how many. In place and reversible: the
    blocks' forward is shadowed on the instance, so the module tree, parameter names and
    state_dict keys stay as they are (checkpoints load either way). `fit` calls it when
    `TrainConfig.activation_checkpointing` is set."""
    blocks = list(_outermost_blocks(model))
    for block in blocks:
        if enabled:
            block.forward = _Recomputed(block)
        else:
            block.__dict__.pop("forward", None)
    return len(blocks)


def _outermost_blocks(module: nn.Module) -> Iterable[nn.Module]:
    if isinstance(module, CHECKPOINTED_BLOCKS):
        yield module
    else:
        for child in module.children():
            yield from _outermost_blocks(child)


class SavedTensorBytes:
    """Bytes that autograd holds for backward, of the tensors saved while this context was
    active, counted when it exits: each storage once, the model's parameters left out. The
    activation memory of a training forward, measured the same way on any device
    (torch.autograd.graph.saved_tensors_hooks). Wrap the forward only (backward recomputes
    checkpointed blocks and saves again); read `bytes` after the context."""

    def __init__(self, model: nn.Module | None = None) -> None:
        params = model.parameters() if model is not None else ()
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.saved: list[weakref.ref[Tensor]] = []
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: Tensor) -> Tensor:
        # A weak reference: a tensor saved by a branch the loss never uses (the last layer's
        # vertical stack) is freed during the forward, and its address may be reused.
        self.saved.append(weakref.ref(t))
        return t

    def __enter__(self) -> SavedTensorBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
        storages = {}
        for ref in self.saved:
            t = ref()
            if t is not None and t.untyped_storage().data_ptr() not in self.skip:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        self.bytes = sum(storages.values())


# --- batches ---------------------------------------------------------------------------


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


def batch_length(batch: Any) -> int:
    """Samples in a (nested) batch: the first dimension of its first tensor."""
    first = next(_tensors(batch), None)
    if first is None:
        raise ValueError(f"a batch needs a tensor to count its samples, got {batch!r:.80}")
    return first.shape[0]


def _tensors(batch: Any) -> Iterable[Tensor]:
    if isinstance(batch, Tensor):
        yield batch
    elif isinstance(batch, (list, tuple)):
        for item in batch:
            yield from _tensors(item)


def split_batch(batch: Any, size: int | None) -> list[Any]:
    """A (nested) batch cut along the first dimension of every tensor into micro-batches of
    `size` samples (the last may be smaller); [batch] itself when size is None or >= the batch."""
    n = batch_length(batch)
    if size is None or size >= n:
        return [batch]
    return [_rows(batch, start, min(start + size, n)) for start in range(0, n, size)]


def _rows(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, Tensor):
        return batch[start:stop]
    if isinstance(batch, (list, tuple)):
        return type(batch)(_rows(b, start, stop) for b in batch)
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


ROTATIONS = 4  # 0, 90, 180 and 270 degrees


def rotated(images: Tensor) -> tuple[Tensor, Tensor]:
    """Every image turned by each quarter turn, and which turn: (4B, C, H, W), (4B,)."""
    turns = [torch.rot90(images, k, dims=(2, 3)) for k in range(ROTATIONS)]
    labels = torch.arange(ROTATIONS, device=images.device).repeat_interleave(len(images))
    return torch.cat(turns), labels


def rotation_loss(model: ResNetClassifier, batch: Sequence) -> tuple[Tensor, Metrics]:
    """Self-supervised: predict which quarter turn an image was given (Gidaris et al. 2018,
    "Unsupervised Representation Learning by Predicting Image Rotations"). Needs no labels,
    so an unlabelled dataset still gets a feature network trained on its own images.
    batch: (images (B, C, H, W) in [0, 1], labels ignored); square images."""
    images, labels = rotated(batch[0])
    return classifier_loss(model, (images, labels))


# --- the step and the loop -------------------------------------------------------------


def make_optimizer(model: nn.Module, config: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with a linear warm-up of `config.warmup_steps`, then `config.lr_schedule`."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, config))
    return optimizer, scheduler


def lr_factor(config: TrainConfig, step: int) -> float:
    """The rate of step `step` (from 0) as a fraction of `config.lr`."""
    warmup = config.warmup_steps
    if warmup and step < warmup:
        return (step + 1) / warmup
    if config.lr_schedule == "cosine":
        done = min(1.0, (step - warmup) / max(1, config.steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * done))
    return 1.0


# --- a Polyak average of the weights ---------------------------------------------------


def polyak_average(model: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of `model`'s parameters (Polyak & Juditsky 1992), for
    `update_parameters(model)` after every optimizer step; None when decay is 0. Its decay
    ramps up as min(decay, (1 + n) / (10 + n)) after n updates, so the early average is not
    held back by the random initial weights (TensorFlow's ExponentialMovingAverage). The
    buffers are not averaged (codebooks are averages already; counters cannot be): use
    `averaged_model`, which takes them from the model. Its `state_dict` resumes it exactly."""
    if not decay:
        return None
    return AveragedModel(model, multi_avg_fn=functools.partial(_ema_update, decay), use_buffers=False)


def _ema_update(decay: float, averaged: list[Tensor], current: list[Tensor], updates: Tensor) -> None:
    # A tensor weight: reading `updates` on the host would wait for the device at every step.
    kept = torch.clamp((1 + updates) / (10 + updates), max=decay).to(averaged[0].dtype)
    torch._foreach_lerp_(averaged, current, 1 - kept)


def averaged_model(average: AveragedModel | None, model: nn.Module) -> nn.Module:
    """What to evaluate, sample from and publish: the average's weights with `model`'s
    buffers (codebooks, BatchNorm statistics), or `model` itself without an average."""
    if average is None:
        return model
    with torch.no_grad():
        for kept, live in zip(average.module.buffers(), model.buffers(), strict=True):
            kept.copy_(live)
    return average.module


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
    micro_batch_size: int | None = None,
) -> Metrics:
    """One optimisation step; returns detached metrics (tensors: no device sync here).

    With `micro_batch_size`, the batch runs as micro-batches whose gradients add up before
    the one optimizer step (gradient accumulation): each micro-batch's mean loss is scaled
    by its share of the batch, so the step equals the whole batch's up to float rounding,
    in the activation memory of one micro-batch. Metrics are the micro-batches' values
    averaged by size (so `usage_*`, distinct codes hit, counts a micro-batch's codes), and
    codebooks move once per step (`accumulate_codebook_updates`). What is not the whole
    batch's: dropout masks (other random numbers) and BatchNorm (the classifier), which
    normalises each micro-batch by its own statistics, as under DDP."""
    device = next(model.parameters()).device
    batch = move_batch(batch, device, channels_last)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    dtype = autocast_dtype(amp, device)
    parts, total = split_batch(batch, micro_batch_size), batch_length(batch)
    metrics: Metrics = {}
    with accumulate_codebook_updates(model) if len(parts) > 1 else nullcontext():
        for i, part in enumerate(parts):
            share = batch_length(part) / total
            # A model wrapped in DDP all-reduces the gradients in every backward outside its
            # no_sync(): only the last micro-batch's backward needs to, once per step.
            last = i == len(parts) - 1
            with nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
                with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None):
                    loss, part_metrics = loss_fn(model, part)
                (loss * share).backward()
            for name, value in part_metrics.items():
                metrics[name] = metrics.get(name, 0) + value.detach() * share
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
    completed steps; hooks checkpoint, log, report progress. Returns the last step.
    `config.micro_batch_size` splits every batch (see `train_step`);
    `config.activation_checkpointing` switches it on for `model`, in place."""
    step = start_step
    if step >= config.steps:
        return step
    if config.activation_checkpointing:
        enable_activation_checkpointing(model)
    for batch in batches:
        metrics = train_step(
            model, optimizer, batch, loss_fn,
            amp=config.amp, channels_last=config.channels_last, grad_clip=config.grad_clip, scheduler=scheduler,
            micro_batch_size=config.micro_batch_size,
        )
        step += 1
        for hook in hooks:
            hook(step, metrics)
        if step >= config.steps:
            break
    return step
