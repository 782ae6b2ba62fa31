"""Which candidates a sampling draws, of which class, and which of them each acceptance rate
keeps (Razavi et al. 2019, Sec. 4.1): the rule the sample stage and `vqvae2 sample` share,
with the one rule for naming a class (`7`, `sneaker`, `Sneaker`)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

import vqvae2


def class_listing(class_names: Sequence[str], indices: Sequence[int] | None = None, limit: int = 30) -> str:
    """Classes as `7 'Sneaker'`, comma-separated (the first `limit` of them)."""
    indices = range(len(class_names)) if indices is None else indices
    shown = ", ".join(f"{i} {class_names[i]!r}" for i in list(indices)[:limit])
    return shown + (f", ... ({len(indices)} classes)" if len(indices) > limit else "")


def resolve_classes(chosen: Sequence[str | int] | None, class_names: Sequence[str],
                    num_classes: int) -> tuple[int, ...]:
    """The indices of the classes to draw, in the order given: `chosen` (`sample.classes`) by
    name (exact, else case-insensitive, else a string of digits as an index) or by index;
    every class for None; () for unconditional priors. A ValueError naming sample.classes,
    the bad value and the dataset's classes for a class the dataset does not have, a class
    named twice, or classes asked of an unlabelled dataset or of unconditional priors."""
    if chosen is None:
        return tuple(range(num_classes))
    if not class_names:
        raise ValueError(f"sample.classes={list(chosen)!r}, but the dataset has no class labels, so its priors are "
                         "unconditional: leave sample.classes unset (None)")
    listing = f"the dataset's classes are {class_listing(class_names)}"
    if not num_classes:
        raise ValueError(f"sample.classes={list(chosen)!r}, but the priors are unconditional (num_classes=0) and "
                         f"cannot draw chosen classes ({listing}): leave sample.classes unset, or train "
                         "class-conditional priors (num_classes auto)")
    folded = [name.casefold() for name in class_names]
    resolved: dict[int, str | int] = {}
    for value in chosen:
        if isinstance(value, str) and value in class_names:
            index = class_names.index(value)
        elif isinstance(value, str) and folded.count(value.casefold()) == 1:
            index = folded.index(value.casefold())
        elif isinstance(value, str) and value.strip().isdigit():
            index = int(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            index = value
        else:
            raise ValueError(f"sample.classes: {value!r} is no class of the dataset; {listing}")
        if not 0 <= index < len(class_names):
            raise ValueError(f"sample.classes: {value!r} is no class index of the dataset (0 to "
                             f"{len(class_names) - 1}); {listing}")
        if index in resolved:
            raise ValueError(f"sample.classes: {resolved[index]!r} and {value!r} are both class {index} "
                             f"{class_names[index]!r}: name each class once; {listing}")
        resolved[index] = value
    return tuple(resolved)


@dataclass(frozen=True)
class SamplingPlan:
    """How many candidates to draw, of which class, and which of them each acceptance rate keeps."""

    classes: tuple[int, ...]  # the classes drawn, in order; (): unconditional, no labels, no rejection
    num_samples: int  # kept at every rate
    rates: tuple[float, ...]

    @classmethod
    def of(cls, chosen: Sequence[str | int] | None, class_names: Sequence[str], num_classes: int, num_samples: int,
           rates: Sequence[float]) -> SamplingPlan:
        """The plan for `num_samples` images of the classes `chosen` (`resolve_classes`), kept at every rate."""
        classes = resolve_classes(chosen, class_names, num_classes)
        return cls(classes, num_samples, tuple(rates) if classes else (1.0,))

    @cached_property
    def keep(self) -> np.ndarray:
        """Kept per class (in the order of `classes`), at every rate: even, the first ones one more."""
        base, extra = divmod(self.num_samples, len(self.classes))
        return base + (np.arange(len(self.classes)) < extra)

    def needed(self, rate: float) -> np.ndarray:
        """Candidates each class needs for rejection at `rate` to keep its share."""
        return np.array([vqvae2.candidates_needed(int(k), rate) for k in self.keep], dtype=np.int64)

    @cached_property
    def _layout(self) -> tuple[np.ndarray, np.ndarray]:
        """(position in `classes`, rank within its class) of every candidate: round-robin over
        the classes, each round over those that need more candidates than rounds so far."""
        needed = self.needed(min(self.rates))
        drawn = needed[None, :] > np.arange(needed.max())[:, None]  # (round, class): drawn?
        positions = np.broadcast_to(np.arange(len(needed))[None, :], drawn.shape)[drawn]
        ranks = np.broadcast_to(np.arange(len(drawn))[:, None], drawn.shape)[drawn]
        return positions, ranks

    @property
    def candidates(self) -> int:
        return len(self._layout[0]) if self.classes else self.num_samples

    def labels(self, first: int, count: int) -> np.ndarray:
        """Intended classes of candidates first..first+count (-1 without classes)."""
        if not self.classes:
            return np.full(count, -1)
        return np.asarray(self.classes, dtype=np.int64)[self._layout[0][first:first + count]]

    def pool(self, rate: float) -> np.ndarray:
        """Indices of the candidates rejection at `rate` chooses from: the first ones of each class."""
        if not self.classes:
            return np.arange(self.candidates)
        positions, ranks = self._layout
        return np.flatnonzero(ranks < self.needed(rate)[positions])

    def kept(self, scores: np.ndarray, labels: np.ndarray, rate: float) -> np.ndarray:
        """Indices of the candidates rejection at `rate` keeps, `keep` per class, the classes
        interleaved: the first kept (by candidate order) of every class, then the second, ..."""
        pool = self.pool(rate)
        if not self.classes:
            return pool
        chosen = pool[vqvae2.accept_mask(torch.from_numpy(scores[pool]), torch.from_numpy(labels[pool]), rate).numpy()]
        positions = self._layout[0][chosen]
        return chosen[np.lexsort((positions, _occurrence(positions)))]


def _occurrence(values: np.ndarray) -> np.ndarray:
    """How many times each value occurred before, in order: [3, 5, 3, 3] -> [0, 0, 1, 2]."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if len(values) else np.zeros(0, dtype=int)
    counts = np.diff(np.r_[starts, len(values)])
    occurrence = np.empty(len(values), dtype=np.int64)
    occurrence[order] = np.arange(len(values)) - np.repeat(starts, counts)
    return occurrence
