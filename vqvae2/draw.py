"""The per-position draw every sampler shares (vqvae2.sampling, vqvae2.fast_sampling,
vqvae2.graph_sampling): how a code is drawn from a row of logits (`SamplingOptions`:
temperature and top-k), and eval mode for the duration of a sample. One copy, so that
samplers given the same generator make the same draws, and a new option is added once."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

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


@dataclass(frozen=True)
class SamplingOptions:
    """How every sampler draws a code from a prior's logits at each position: the softmax
    `temperature` (lower: safer, less varied), `top_k` (draw from the k likeliest codes
    only; None: all) and `top_p` (nucleus sampling, Holtzman et al. 2020: from the fewest
    likeliest codes whose probabilities add up to at least p; None: all). A draw that
    cannot be made fails here, before any sampling work."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def probs(self, logits: Tensor) -> Tensor:
        """Probabilities (B, K) in fp32 of logits (B, K) under these options. No host sync:
        the graph-captured sampler calls it inside its step."""
        logits = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.top_p is not None and self.top_p < 1:
            # Keep a code while the likelier codes before it hold less than top_p: the
            # likeliest always, then as many as the nucleus needs (ties by index, stably).
            ordered, order = torch.sort(probs, dim=-1, descending=True, stable=True)
            before = torch.cumsum(ordered, dim=-1) - ordered
            kept = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, before < self.top_p)
            probs = probs.masked_fill(~kept, 0.0)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        return probs

    def described(self) -> str:
        """The options in words, as reports show them: `temperature 1, top-k off`."""
        nucleus = f", top-p {self.top_p:g}" if self.top_p is not None else ""
        return f"temperature {self.temperature:g}, top-k {self.top_k or 'off'}{nucleus}"


def sample_logits(logits: Tensor, options: SamplingOptions = SamplingOptions(),
                  generator: torch.Generator | None = None) -> Tensor:
    """Draw one index per row of logits (B, K) under `options`."""
    return torch.multinomial(options.probs(logits), 1, generator=generator).squeeze(-1)


def race_draw(probs: Tensor, noise: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One index per row of probs (B, K): argmax(p / q) with q ~ Exp(1) drawn into noise (B, K), fp32.

    The exponential race is how `torch.multinomial` draws a single sample (its fast path, on
    CPU and CUDA), so with the same generator state it makes the same draws as `sample_logits`
    and consumes the generator alike; unlike multinomial it never validates probs on the host
    (a device-to-host sync), so a CUDA graph can capture it."""
    noise.exponential_(1, generator=generator)
    return torch.argmax(probs / noise, dim=-1)
