"""What a training checkpoints besides its model and optimizer, so that a resumed run goes
on exactly as an uninterrupted one: the RNG states, the position in the data, the running
metric sums, and the one recovery from a divergence."""
from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vqvae2.train import Metrics

# (epoch, batches of it already consumed) -> the rest of that epoch's batches
BatchSource = Callable[[int, int], Iterable[Any]]


def private_generator(seed: int, epoch: int) -> torch.Generator:
    """For a DataLoader: without one, each new iterator draws its seed from torch's global
    RNG, so a run resumed mid-epoch would shift the model's random stream (dropout,
    dead-code restarts) against an uninterrupted run."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


@dataclass(frozen=True)
class Recovery:
    """A divergence gone past: where it was seen, the step training went on from, and the
    factor the learning rate was multiplied by. Kept in checkpoints (as a dict) so a resumed
    attempt knows the one recovery is used."""

    diverged_at: int
    resumed_from: int
    lr_factor: float


class EpochStream:
    """Batches across epochs, tracking how many of the current epoch were handed out."""

    def __init__(self, batches: BatchSource, epoch: int, consumed: int, on_epoch_end: Callable[[int], None]):
        self.batches, self.epoch, self.consumed, self.on_epoch_end = batches, epoch, consumed, on_epoch_end

    def __iter__(self) -> Iterator[Any]:
        while True:
            yielded = False
            for batch in self.batches(self.epoch, self.consumed):
                self.consumed += 1  # before the step runs: a checkpoint after it counts this batch
                yielded = True
                yield batch
            if not yielded and self.consumed == 0:
                raise ValueError("the training data yields no batches")
            self.on_epoch_end(self.epoch)
            self.epoch, self.consumed = self.epoch + 1, 0


def rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class RunningMeans:
    """Running sums of step metrics (tensors, so no device sync per step)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, metrics: Metrics) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0) + v.float()
        self.count += 1

    def pop(self) -> dict[str, float]:
        means = {k: (v / self.count).item() for k, v in self.sums.items()} if self.count else {}
        self.sums, self.count = {}, 0
        return means

    # In checkpoints: a resumed run logs the same means as an uninterrupted one, though
    # the interval they average began before the checkpoint.
    def state_dict(self) -> dict[str, Any]:
        return {"sums": {k: v.detach().cpu() for k, v in self.sums.items()}, "count": self.count}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.sums, self.count = {k: v.to(device) for k, v in state["sums"].items()}, state["count"]
