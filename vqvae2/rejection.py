"""Classifier-based rejection sampling (Razavi et al. 2019, Sec. 4.1).

The paper samples class-conditionally, scores every sample with a pretrained
classifier (the *judge*) and keeps those the judge is most confident belong to the
class they were sampled for; lowering the acceptance rate trades diversity (recall)
for quality (precision, FID), the trade-off curve of its Fig. 5.

Selection is per intended class, so every class keeps its share of the samples and
rejection cannot quietly drop the hard classes. Counts are exact inverses of each
other: `keep_count(candidates_needed(k, rate), rate) == k` for every k >= 1.

    labels = torch.arange(n) % num_classes
    scores = torch.softmax(judge(images), 1).gather(1, labels[:, None]).squeeze(1)
    kept = images[vqvae2.accept_mask(scores, labels, rate=0.25)]
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

# Rates such as 0.1 or 0.3 are not exact in binary: 30 * 0.1 is 3.0000000000000004 and
# 10 * 0.3 is 2.9999999999999996. Products within this relative distance of an integer
# count as that integer, so floors and ceilings land where the decimal arithmetic would.
_INTEGER_TOLERANCE = 1e-9


def check_rate(rate: float) -> float:
    """`rate` as a float, or a ValueError saying what an acceptance rate is."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
        raise ValueError(
            f"acceptance rate must be a number in (0, 1], the fraction of candidates kept per class "
            f"(1.0 keeps all, 0.1 keeps the best tenth), got {rate!r}"
        )
    return float(rate)


def _snap(value: float) -> float:
    nearest = round(value)
    return float(nearest) if abs(value - nearest) <= _INTEGER_TOLERANCE * max(1.0, abs(value)) else value


def keep_count(num_candidates: int, rate: float) -> int:
    """How many of a class's `num_candidates` are kept at `rate`: floor(rate * n), but at
    least one when the class has any, so that no class vanishes from the kept set."""
    rate = check_rate(rate)
    if num_candidates < 0:
        raise ValueError(f"num_candidates must be >= 0, got {num_candidates}")
    if num_candidates == 0:
        return 0
    return max(1, math.floor(_snap(num_candidates * rate)))


def candidates_needed(n_keep: int, rate: float) -> int:
    """Candidates to generate per class so that `n_keep` of them are kept at `rate`
    (the lowest rate of a sweep: higher rates then keep more)."""
    rate = check_rate(rate)
    if n_keep < 0:
        raise ValueError(f"n_keep must be >= 0, got {n_keep}")
    return math.ceil(_snap(n_keep / rate))


def accept_mask(scores: Tensor | np.ndarray, labels: Tensor | np.ndarray, rate: float) -> Tensor:
    """Which candidates to keep: within each intended class, the `keep_count` with the
    highest judge score (the judge's probability of that class).

    scores: (N,) floats, labels: (N,) ints, the class each candidate was sampled for
    (any integer; each distinct value is a group). Returns a (N,) bool tensor on the
    scores' device. Ties go to the earlier candidate, so the result is deterministic.
    """
    rate = check_rate(rate)
    scores = torch.as_tensor(scores)
    labels = torch.as_tensor(labels, device=scores.device)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"scores and labels must be 1-D and of equal length, got {tuple(scores.shape)} "
                         f"and {tuple(labels.shape)}")
    if not scores.is_floating_point() or labels.is_floating_point():
        raise ValueError(f"scores must be floats and labels integers, got {scores.dtype} and {labels.dtype}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN: those candidates were never judged (no judge classifier, or "
                         "unconditional samples); score every candidate before rejecting")
    n = len(scores)
    # Best first, then grouped by class; both sorts are stable, so ties keep index order.
    order = torch.sort(scores, descending=True, stable=True).indices
    order = order[torch.sort(labels[order], stable=True).indices]
    _, counts = torch.unique_consecutive(labels[order], return_counts=True)
    starts = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    rank = torch.arange(n, device=scores.device) - starts  # position within its class, best = 0
    quota = torch.tensor([keep_count(int(c), rate) for c in counts], dtype=torch.long, device=scores.device)
    mask = torch.zeros(n, dtype=torch.bool, device=scores.device)
    mask[order] = rank < torch.repeat_interleave(quota, counts)
    return mask
