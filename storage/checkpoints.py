"""Training checkpoints on any fsspec URL: atomic saves, ``weights_only`` loads, newest-first lookup.

A training run keeps its checkpoints in one directory (usually under its artifact
directory) as ``step-000001000.pt``; every attempt resumes from :func:`load_latest`, the
newest one that loads (a damaged newer one is reported and passed over).
Loading uses ``torch.load(weights_only=True)``: tensors, numbers, strings and
containers of them load; arbitrary pickled objects are refused.
"""
from __future__ import annotations

import io
import re
from collections.abc import Callable
from typing import Any

import torch

from .fsutil import StorageOptions, atomic_open, exists, filesystem, join, read_bytes, redact, remove, storage_errors

_NAME = re.compile(r"^step-(\d+)\.pt$")


def checkpoint_url(dir_url: str, step: int) -> str:
    """``{dir_url}/step-NNNNNNNNN.pt``; the zero padding makes names sort by step."""
    return join(dir_url, f"step-{step:09d}.pt")


def save_checkpoint(url: str, obj: Any, storage_options: StorageOptions = None) -> None:
    """``torch.save`` to ``url`` atomically: a crash mid-save leaves the previous checkpoints intact."""
    with atomic_open(url, storage_options) as f:
        torch.save(obj, f)


def load_checkpoint(url: str, storage_options: StorageOptions = None, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` of ``url`` (read whole: one request on object stores)."""
    data = read_bytes(url, storage_options)
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, ValueError) as err:  # what a truncated or corrupted file raises
        raise ValueError(f"{redact(url)}: not a loadable checkpoint ({err})") from err


def list_checkpoints(dir_url: str, storage_options: StorageOptions = None) -> list[tuple[int, str]]:
    """``[(step, url)]`` of the checkpoints in ``dir_url``, oldest first; empty if the folder is missing."""
    if not exists(dir_url, storage_options):
        return []
    fs, path = filesystem(dir_url, storage_options)
    fs.invalidate_cache(path)
    with storage_errors(dir_url):
        names = [name.rstrip("/").rsplit("/", 1)[-1] for name in fs.ls(path, detail=False)]
    found = [(int(m.group(1)), join(dir_url, name)) for name in names if (m := _NAME.match(name))]
    return sorted(found)


def latest_checkpoint(dir_url: str, storage_options: StorageOptions = None) -> str | None:
    """URL of the highest-step checkpoint in ``dir_url``, or None when there is none."""
    found = list_checkpoints(dir_url, storage_options)
    return found[-1][1] if found else None


def load_latest(
    dir_url: str,
    storage_options: StorageOptions = None,
    map_location: Any = "cpu",
    on_damaged: Callable[[str, ValueError], None] | None = None,
) -> tuple[int, str, Any] | None:
    """``(step, url, state)`` of the newest checkpoint in ``dir_url`` that loads, or None.

    A checkpoint that does not load (truncated or corrupted on the storage) is passed over
    for the next older one, and ``on_damaged(url, error)`` is told; nothing is deleted here."""
    for step, url in reversed(list_checkpoints(dir_url, storage_options)):
        try:
            return step, url, load_checkpoint(url, storage_options, map_location)
        except ValueError as err:
            if on_damaged is not None:
                on_damaged(url, err)
    return None


def prune_checkpoints(dir_url: str, keep: int = 2, storage_options: StorageOptions = None) -> list[str]:
    """Delete all but the ``keep`` newest checkpoints; returns the URLs deleted."""
    if keep < 1:
        raise ValueError(f"prune_checkpoints: keep must be at least 1, got {keep}")
    old = [url for _, url in list_checkpoints(dir_url, storage_options)[:-keep]]
    for url in old:
        remove(url, storage_options)
    return old
