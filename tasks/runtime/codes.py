"""Reading encoded datasets (Zarr codes) in the tasks: batches for one level's prior and
its held-out likelihood, shared by prior training and the report."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.data import DataLoader

import vqvae2
from storage.codes import CodeDataset

from ..manifests import CodesManifest


def level_batch(batch: Any, level: int, prior: vqvae2.PixelCNNPrior) -> tuple:
    """A CodeDataset batch (codes per level, labels) -> what `prior_loss` takes for `level`."""
    levels, labels = batch
    return levels[level], (list(levels[:level]) if prior.conditional else None), (labels if prior.num_classes else None)


def validation_batches(codes: CodesManifest, storage_options: dict[str, Any] | None, rows: int, batch_size: int):
    """The first `rows` rows of the test split, in order, as CodeDataset batches."""
    dataset = CodeDataset(codes.codes, "test", storage_options=storage_options)
    indices = range(min(rows, len(dataset)))
    return DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size)


@torch.no_grad()
def held_out_bits_per_code(prior: vqvae2.PixelCNNPrior, level: int, batches: Iterable[Any]) -> float:
    """The prior's mean negative log-likelihood of held-out codes, in bits per code."""
    device = next(prior.parameters()).device
    total, count = 0.0, 0
    for batch in batches:
        target, cond, labels = vqvae2.train.move_batch(level_batch(batch, level, prior), device)
        total += prior.loss(target, cond, labels).item() * target.numel()
        count += target.numel()
    return vqvae2.bits_per_code(total / max(count, 1))
