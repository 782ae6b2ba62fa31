"""Reading an ingested dataset's images in the tasks: fixed held-out sets and training batches."""
from __future__ import annotations

from typing import Any

import torch

from storage.loader import ShardDataset, iter_shard_batches, shard_loader

from ..config import Runtime
from ..manifests import DatasetManifest
from .trainer import BatchSource, private_generator


def first_images(dataset: DatasetManifest, split: str, count: int,
                 storage_options: dict[str, Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` images (floats in [0, 1]) and labels of `split`, in file order:
    the same images every time, for validation and evaluation."""
    images, labels, have = [], [], 0
    for index in range(len(dataset.splits[split].shards)):
        for batch_images, batch_labels, _ in iter_shard_batches(dataset.url, split, index, 256, storage_options):
            images.append(batch_images)
            labels.append(batch_labels)
            have += len(batch_images)
            if have >= count:
                return torch.cat(images)[:count], torch.cat(labels)[:count]
    return torch.cat(images), torch.cat(labels)


def train_batches(dataset: DatasetManifest, batch_size: int, seed: int, num_workers: int,
                  runtime: Runtime) -> tuple[BatchSource, int]:
    """(batch source for a `TrainingJob`, batches per epoch) over the train split's shards.
    `num_workers` changes the batch order (the shard readers interleave); the decoded-image
    cache (`training.decoded_cache_mb`) does not."""
    shards = ShardDataset(dataset.url, "train", batch_size=batch_size, seed=seed,
                          storage_options=runtime.storage_options,
                          decoded_cache_bytes=runtime.training.decoded_cache_mb * 2**20)

    def batches(epoch: int, start: int):
        shards.set_epoch(epoch, start)
        return shard_loader(shards, num_workers=num_workers, generator=private_generator(seed, epoch))

    return batches, len(shards)
