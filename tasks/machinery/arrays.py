"""Small numpy archives (sample batches) on any storage URL."""
from __future__ import annotations

import io
from typing import Any

import numpy as np

from storage.fsutil import read_bytes, write_bytes


def save_npz(url: str, storage_options: dict[str, Any] | None = None, **arrays: np.ndarray) -> None:
    out = io.BytesIO()
    np.savez_compressed(out, **arrays)
    write_bytes(url, out.getvalue(), storage_options)


def load_npz(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(read_bytes(url, storage_options)), allow_pickle=False) as data:
        return {name: data[name] for name in data.files}
