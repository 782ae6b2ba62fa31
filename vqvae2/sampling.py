"""Hierarchical ancestral sampling (Razavi et al. 2019, Sec. 3.2 and Algorithm 2).

Sample the top code grid from its prior, then each lower grid given all grids above,
then decode. A level sampler is any callable with the signature of `LevelSampler`.
`vqvae2.fast_sampling.sample_level_fast` evaluates the prior incrementally (one cached step
per position); the reference sampler here runs the whole prior once per position: slow
(H * W full passes) but obviously right, the yardstick the tests hold the fast ones to.
`vqvae2.graph_sampling.sample_level_graphed` is the cached sampler's math on static buffers,
captured as CUDA graphs on a GPU (and optionally in bf16). With the same seed all three
give the same codes (on one device, in fp32 with TF32 off), so the default is simply the
fastest for the device: the graphed one on CUDA (1.4x the cached one at the imagenet-256
paper widths on an H100, the same codes), the cached one elsewhere.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Protocol

import torch
from torch import Tensor

from .autoencoder import VQVAE2
from .draw import SamplingOptions, evaluating, sample_logits
from .fast_sampling import sample_level_fast
from .graph_sampling import sample_level_graphed
from .prior import PixelCNNPrior


class LevelSampler(Protocol):
    def __call__(
        self,
        prior: PixelCNNPrior,
        n: int,
        cond_codes: Sequence[Tensor] | None,
        labels: Tensor | None,
        options: SamplingOptions,
        generator: torch.Generator | None,
    ) -> Tensor: ...


@torch.no_grad()
def sample_level_reference(
    prior: PixelCNNPrior,
    n: int,
    cond_codes: Sequence[Tensor] | None = None,
    labels: Tensor | None = None,
    options: SamplingOptions = SamplingOptions(),
    generator: torch.Generator | None = None,
) -> Tensor:
    """n code grids (n, H, W) from one prior, one full forward pass per position."""
    device = next(prior.parameters()).device
    height, width = prior.shape
    codes = torch.zeros(n, height, width, dtype=torch.long, device=device)
    with evaluating(prior):
        for r in range(height):
            for c in range(width):
                logits = prior(codes, cond_codes, labels)[:, :, r, c]
                codes[:, r, c] = sample_logits(logits, options, generator)
    return codes


def _per_level(value, levels: int, name: str) -> list:
    if isinstance(value, (list, tuple)):  # one per level
        if len(value) != levels:
            raise ValueError(f"{name} has {len(value)} entries, the hierarchy has {levels} levels")
        return list(value)
    return [value] * levels


@torch.no_grad()
def sample_codes(
    priors: Sequence[PixelCNNPrior],
    n: int,
    *,
    labels: Tensor | None = None,
    options: SamplingOptions | Sequence[SamplingOptions] = SamplingOptions(),
    seed: int | None = None,
    sampler: LevelSampler | None = None,
    dtype: torch.dtype | None = None,
) -> list[Tensor]:
    """Code grids for n samples, top first: each level given all the levels above it.

    `options` (temperature, top-k) may be given per level (top first). The same seed gives
    the same codes on the same device, whichever sampler (`sample_level_reference` is the
    slow yardstick); None picks the fastest for the priors' device. `dtype` (say
    torch.bfloat16) samples with copies of the priors in that precision, through the
    graphed sampler, the draw in fp32: other codes than fp32's."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    device = next(priors[0].parameters()).device
    if dtype is not None:
        if sampler is not None:
            raise ValueError("give a sampler or a dtype, not both: only the graphed sampler samples in another dtype")
        sampler = partial(sample_level_graphed, dtype=dtype)
    elif sampler is None:
        sampler = sample_level_graphed if device.type == "cuda" else sample_level_fast
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    per_level = _per_level(options, len(priors), "options")
    if labels is not None:
        labels = labels.to(device)
    codes: list[Tensor] = []
    for prior, level_options in zip(priors, per_level):
        level_labels = labels if prior.num_classes else None
        cond = list(codes) if prior.conditional else None
        codes.append(sampler(prior, n, cond, level_labels, level_options, generator))
    return codes


@torch.no_grad()
def sample_images(
    autoencoder: VQVAE2, priors: Sequence[PixelCNNPrior], n: int, **kwargs
) -> tuple[Tensor, list[Tensor]]:
    """n images (n, C, H, W) in [0, 1] and their code grids (top first)."""
    codes = sample_codes(priors, n, **kwargs)
    with evaluating(autoencoder):
        images = autoencoder.decode_codes(codes).clamp(0, 1)
    return images, codes
