"""Which DDP rank this process is: what the shard loader and the code sampler split data by."""
from __future__ import annotations

import torch


def rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` as given, else from an initialised ``torch.distributed``, else ``(0, 1)``."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def rank_share(total: int, rank: int | None, world_size: int | None, what: str) -> tuple[int, int, int]:
    """``(rank, world_size, per_rank)``: every rank gets ``total // world_size`` items.

    Equal shares are what keeps DDP from hanging: a rank with one batch more would wait
    forever in a collective the others never join.
    """
    rank, world_size = rank_and_world(rank, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"{what}: rank {rank} outside world_size {world_size}")
    if total < world_size:
        raise ValueError(f"{what}: {total} items cannot be shared by {world_size} ranks")
    return rank, world_size, total // world_size
