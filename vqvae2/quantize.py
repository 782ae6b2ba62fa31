"""Vector quantizer with an exponential-moving-average codebook.

VQ-VAE (van den Oord et al. 2017, Sec. 3.2 and Appendix A.1) as used by VQ-VAE-2
(Razavi et al. 2019, Sec. 3.1): nearest-neighbour assignment, straight-through
gradients, commitment loss beta * ||z - sg(e)||^2, and codebook vectors updated as EMA
of the encoder outputs assigned to them (decay 0.99) with Laplace smoothing of the
cluster sizes. On top of the paper, for codebook health:

- statistics and EMA run in fp32 even inside autocast (fp16/bf16 EMA sums drift or
  overflow, a known failure of other implementations);
- every forward reports usage (distinct codes hit) and perplexity;
- dead-code restart: a code unused for `dead_code_steps` training steps is re-seeded
  from a current encoder output (Dhariwal et al. 2020, "Jukebox", Sec. 3.1);
- optional k-means initialisation from the first training batch;
- EMA statistics are all-reduced when torch.distributed is initialised, and
  re-seeded vectors are broadcast from rank 0, so every replica keeps one codebook;
- one codebook update per optimizer step under gradient accumulation
  (`accumulate_codebook_updates`): the paper's EMA moves once per batch, so the
  micro-batches of a step only collect their statistics, applied once at its end.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce_sum(t: Tensor) -> Tensor:
    if _distributed():
        dist.all_reduce(t)
    return t


def _broadcast_from_rank0(t: Tensor) -> Tensor:
    if _distributed():
        dist.broadcast(t, src=0)
    return t


def nearest_codes(flat: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest codebook row (squared L2) for each row of `flat` (N, D)."""
    # ||x - e||^2 = ||x||^2 - 2 x.e + ||e||^2; ||x||^2 does not change the argmin.
    distances = torch.addmm(codebook.pow(2).sum(1), flat, codebook.t(), alpha=-2.0)
    return distances.argmin(dim=1)


def code_counts(codes: Tensor, codebook_size: int) -> Tensor:
    """How often each code occurs in `codes` (float, length K)."""
    flat = codes.reshape(-1)
    counts = torch.zeros(codebook_size, device=codes.device, dtype=torch.float32)
    return counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))


def perplexity(counts: Tensor) -> Tensor:
    """exp(entropy) of the code histogram: K for uniform use, 1 for collapse."""
    p = counts / counts.sum().clamp_min(1.0)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum())


def _uniform_rows(flat: Tensor) -> Callable[[int], Tensor]:
    """draw(n): n rows of flat (N, D), picked uniformly with replacement."""
    return lambda n: flat[torch.randint(flat.shape[0], (n,), device=flat.device)]


@dataclass
class StepStatistics:
    """What the training forwards of one optimizer step (its micro-batches) add to a codebook,
    applied at the step's end as one forward over the whole batch would apply them."""

    counts: Tensor  # (K,) code counts, all ranks
    sums: Tensor  # (K, D) sums of the vectors assigned to each code, this rank
    spare: Tensor | None = None  # (m, D) restart candidates, each a uniform pick from all rows seen
    rows: int = 0  # vectors seen on this rank

    def add(self, flat: Tensor, codes: Tensor, counts: Tensor) -> None:
        self.counts += counts
        self.sums.index_add_(0, codes, flat)
        self.rows += flat.shape[0]
        if self.spare is not None:
            # Reservoir sampling with replacement, slot by slot: replacing a slot with
            # probability n / rows-so-far leaves it uniform over every row seen, as the whole
            # batch's draw would be, while holding m rows instead of the whole batch.
            m, n = self.spare.shape[0], flat.shape[0]
            picks = torch.randint(n, (m,), device=flat.device)
            keep = torch.rand(m, device=flat.device) >= n / self.rows
            self.spare = torch.where(keep[:, None], self.spare, flat[picks])

    def take_spare(self, n: int) -> Tensor:
        assert self.spare is not None and n <= self.spare.shape[0], "more dead codes than candidates"
        return self.spare[:n]


@dataclass
class QuantizerOutput:
    quantized: Tensor  # (B, D, H, W), straight-through: forward = codebook vectors, backward = identity
    codes: Tensor  # (B, H, W) int64
    loss: Tensor  # commitment loss beta * ||z - sg(e)||^2 (scalar)
    usage: Tensor  # distinct codes hit in this batch (scalar, all ranks together)
    perplexity: Tensor  # exp(entropy) of the batch's code histogram (scalar)


class VectorQuantizer(nn.Module):
    def __init__(
        self,
        codebook_size: int,
        dim: int,
        *,
        beta: float = 0.25,
        decay: float = 0.99,
        eps: float = 1e-5,
        dead_code_steps: int = 100,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
    ) -> None:
        super().__init__()
        self.codebook_size, self.dim = codebook_size, dim
        self.beta, self.decay, self.eps = beta, decay, eps
        self.dead_code_steps, self.kmeans_iters = dead_code_steps, kmeans_iters
        embed = torch.randn(codebook_size, dim)
        self.register_buffer("embed", embed)
        self.register_buffer("embed_sum", embed.clone())
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("steps_unused", torch.zeros(codebook_size, dtype=torch.long))
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self._step: StepStatistics | None = None  # set while a step's updates are collected

    def forward(self, z: Tensor, update: bool | None = None) -> QuantizerOutput:
        """Quantize z (B, D, H, W). `update` (default: self.training) moves the codebook."""
        update = self.training if update is None else update
        with torch.autocast(device_type="cuda" if z.is_cuda else "cpu", enabled=False):
            z = z.float()
            b, d, h, w = z.shape
            flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (B*H*W, D)
            if update and not bool(self.initialized):
                self._kmeans_init(flat.detach())
            codes = nearest_codes(flat.detach(), self.embed)
            quantized = F.embedding(codes, self.embed)
            counts = _all_reduce_sum(code_counts(codes, self.codebook_size))
            if update and self._step is not None:
                self._step.add(flat.detach(), codes, counts)
            elif update:
                self._ema_update(counts, torch.zeros_like(self.embed_sum).index_add_(0, codes, flat.detach()))
                self._restart_dead_codes(counts, _uniform_rows(flat.detach()))
            loss = self.beta * F.mse_loss(flat, quantized)
            quantized = flat + (quantized - flat).detach()
            quantized = quantized.view(b, h, w, d).permute(0, 3, 1, 2)
            return QuantizerOutput(
                quantized=quantized,
                codes=codes.view(b, h, w),
                loss=loss,
                usage=(counts > 0).sum(),
                perplexity=perplexity(counts),
            )

    def lookup(self, codes: Tensor) -> Tensor:
        """Inverse of the assignment: codes (B, H, W) -> codebook vectors (B, D, H, W)."""
        return F.embedding(codes, self.embed).permute(0, 3, 1, 2)

    def begin_step(self) -> None:
        """Collect the statistics of the training forwards from here on, instead of applying them."""
        assert self._step is None, "begin_step called twice without end_step"
        # Only a code unused for dead_code_steps - 1 steps already can die in this one: it
        # needs a restart candidate; no other does.
        may_die = int((self.steps_unused >= self.dead_code_steps - 1).sum()) if self.dead_code_steps > 0 else 0
        self._step = StepStatistics(
            counts=torch.zeros_like(self.cluster_size), sums=torch.zeros_like(self.embed_sum),
            spare=torch.zeros(may_die, self.dim, device=self.embed.device) if may_die else None,
        )

    @torch.no_grad()
    def end_step(self, apply: bool = True) -> None:
        """Apply the collected statistics as one update (unless `apply` is False), and stop collecting."""
        step, self._step = self._step, None
        if apply and step is not None and step.rows:
            self._ema_update(step.counts, step.sums)
            self._restart_dead_codes(step.counts, step.take_spare)

    @torch.no_grad()
    def _ema_update(self, counts: Tensor, sums: Tensor) -> None:
        """counts (K,) of all ranks; sums (K, D) of the vectors assigned to each code, this rank."""
        _all_reduce_sum(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        # Laplace smoothing keeps an unused code's size above zero, so the division is safe.
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        self.embed.copy_(self.embed_sum / smoothed.unsqueeze(1))

    @torch.no_grad()
    def _restart_dead_codes(self, counts: Tensor, draw: Callable[[int], Tensor]) -> None:
        """counts (K,) of this step; draw(n) -> n current encoder outputs (n, D), uniform picks."""
        if self.dead_code_steps <= 0:
            return
        self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
        dead = self.steps_unused >= self.dead_code_steps
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        fresh = _broadcast_from_rank0(draw(n_dead).contiguous())
        self.embed[dead] = fresh
        self.embed_sum[dead] = fresh
        self.cluster_size[dead] = 1.0
        self.steps_unused[dead] = 0

    @torch.no_grad()
    def _kmeans_init(self, flat: Tensor) -> None:
        k = self.codebook_size
        # Fewer vectors than codes: draw with replacement; Lloyd's steps then leave the
        # duplicates where they are, and dead-code restarts spread them later.
        picks = torch.randperm(flat.shape[0], device=flat.device)[:k] if flat.shape[0] >= k else \
            torch.randint(flat.shape[0], (k,), device=flat.device)
        centers = flat[picks].clone()
        counts = torch.ones(k, device=flat.device)
        for _ in range(self.kmeans_iters):
            assign = nearest_codes(flat, centers)
            counts = code_counts(assign, k)
            sums = torch.zeros_like(centers).index_add_(0, assign, flat)
            used = counts > 0
            centers[used] = sums[used] / counts[used].unsqueeze(1)
        _broadcast_from_rank0(centers)
        self.embed.copy_(centers)
        self.embed_sum.copy_(centers)
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)


@contextmanager
def accumulate_codebook_updates(model: nn.Module) -> Iterator[None]:
    """Within: every quantizer of `model` collects the codebook statistics of its training
    forwards; on leaving, it applies them once: one EMA update, one dead-code check.

    For gradient accumulation: the k micro-batches of one optimizer step, all quantized
    by the same codebook, then move it as the whole batch would (the paper's EMA is one
    update per batch: VQ-VAE-2 Sec. 3.1, VQ-VAE Appendix A.1), where k updates would
    decay the old statistics k times per step and make decay and dead-code counts depend
    on the micro-batch size. Two differences from the whole batch: k-means initialisation
    (when configured) sees the first micro-batch only, which must be quantized at once;
    a dead code is re-seeded from a uniform pick over the step's encoder outputs drawn by
    reservoir sampling, so by other random numbers. Nothing is applied when the body raises."""
    quantizers = [m for m in model.modules() if isinstance(m, VectorQuantizer)]
    for quantizer in quantizers:
        quantizer.begin_step()
    applied = False
    try:
        yield
        applied = True
    finally:
        for quantizer in quantizers:
            quantizer.end_step(apply=applied)
