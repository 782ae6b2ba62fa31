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
