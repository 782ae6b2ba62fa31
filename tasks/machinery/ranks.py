"""What the ranks of a data-parallel training tell each other. Each helper is a collective
under torchrun (every rank calls it at the same point) and a plain value in one process.
Which rank a process is comes from `storage.ranks`, which the data loaders use too."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from storage.ranks import rank_and_world


def rank_batch_size(global_batch: int) -> int:
    """This rank's share of a global batch: the ranks' gradients are averaged, so equal
    shares make a step equal to one process's step on the whole batch."""
    _, world = rank_and_world()
    if global_batch % world:
        raise ValueError(f"train.batch_size {global_batch} cannot be shared equally by {world} training processes: "
                         "make it a multiple of training.processes")
    return global_batch // world


def gather(value: Any, world: int) -> list[Any]:
    """`value` of every rank, in rank order."""
    if world == 1:
        return [value]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def mean_over_ranks(means: dict[str, float], world: int) -> dict[str, float]:
    if world == 1 or not means:
        return means
    keys = sorted(means)
    values = torch.tensor([means[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return {k: float(v) / world for k, v in zip(keys, values.tolist())}


def rank0_says(flag: bool, world: int) -> bool:
    """Rank 0's decision, on every rank (a decision taken on a clock must be the same everywhere)."""
    if world == 1:
        return flag
    decided = [flag]
    dist.broadcast_object_list(decided, src=0)
    return bool(decided[0])


__all__ = ["gather", "mean_over_ranks", "rank0_says", "rank_and_world", "rank_batch_size"]
