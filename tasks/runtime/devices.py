"""Which device a stage computes on."""
from __future__ import annotations

import torch


def resolve_device(choice: str) -> torch.device:
    """`training.device` as a torch device: auto is CUDA when there is one."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("training.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)
