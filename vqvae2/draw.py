"""The per-position draw every sampler shares (vqvae2.sampling, vqvae2.fast_sampling,
vqvae2.graph_sampling): temperature and top-k over a row of logits, and eval mode for the
duration of a sample. One copy, so that samplers given the same generator make the same draws."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Put modules in eval mode (dropout off) and restore their modes afterwards."""
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def check_draw(temperature: float, top_k: int | None) -> None:
    """Fail fast on a draw that cannot be made, before any sampling work."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")


def tempered_probs(logits: Tensor, temperature: float = 1.0, top_k: int | None = None) -> Tensor:
    """Probabilities (B, K) in fp32 after temperature and top-k truncation of logits (B, K).
    No check, no host sync: the graph-captured sampler calls it inside its step."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits, dim=-1)


def sample_logits(
    logits: Tensor, temperature: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """Draw one index per row of logits (B, K) after temperature and top-k truncation."""
    check_draw(temperature, top_k)
    return torch.multinomial(tempered_probs(logits, temperature, top_k), 1, generator=generator).squeeze(-1)


def race_draw(probs: Tensor, noise: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One index per row of probs (B, K): argmax(p / q) with q ~ Exp(1) drawn into noise (B, K), fp32.

    The exponential race is how `torch.multinomial` draws a single sample (its fast path, on
    CPU and CUDA), so with the same generator state it makes the same draws as `sample_logits`
    and consumes the generator alike; unlike multinomial it never validates probs on the host
    (a device-to-host sync), so a CUDA graph can capture it."""
    noise.exponential_(1, generator=generator)
    return torch.argmax(probs / noise, dim=-1)
