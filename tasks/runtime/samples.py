"""Reading a sample stage's output: its batches and the candidates each acceptance rate kept."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..manifests import SamplesManifest
from .arrays import load_npz


def rate_key(rate: float) -> str:
    """The name of an acceptance rate's selection in `selections.npz`."""
    return f"rate_{rate:g}"


def load_samples(batch_urls: list[str], storage_options: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """All sample batches, concatenated: images, labels, judge_scores, codes per level."""
    parts = [load_npz(url, storage_options) for url in batch_urls]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def kept_images(samples: SamplesManifest, storage_options: dict[str, Any] | None = None) -> dict[float, np.ndarray]:
    """{acceptance rate: the uint8 images rejection at that rate kept}."""
    images = load_samples(samples.batches, storage_options)["images"]
    selections = load_npz(samples.selections, storage_options)
    return {row.rate: images[selections[rate_key(row.rate)]] for row in samples.rates}
