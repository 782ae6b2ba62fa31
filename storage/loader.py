"""Reading shards: a streaming, shuffled, DDP- and worker-aware loader for training, and an
in-order reader for encoding.

:class:`ShardDataset` is a torch ``IterableDataset`` built on webdataset's
``DataPipeline``, ``shuffle`` and ``batched`` stages. It yields whole batches
``(images float32 B x C x H x W in [0, 1], labels int64 B)``; wrap it with
:func:`shard_loader` (a ``DataLoader`` with ``batch_size=None``).

How an epoch is cut, so that every rank gets the same number of batches and a run can
resume mid-epoch:

1. The split's shards are shuffled under ``(seed, epoch)`` and laid end to end.
2. Rank ``r`` of ``W`` takes samples ``[r * n, (r + 1) * n)`` of that sequence with
   ``n = N // W``: equal counts on every rank whatever the shard sizes (the fewer than
   ``W`` left-over samples change with each epoch's shuffle). A rank may start or stop
   inside a shard.
3. The rank's ``len(dataset)`` batches are dealt to DataLoader workers in contiguous
   blocks (the first workers take one more when they do not divide evenly). The
   DataLoader takes batches from its workers in turn, so output batch ``b`` is batch
   ``b // num_workers`` of worker ``b % num_workers``; ``start_batch`` uses that to skip
   what a checkpoint already consumed and to rotate which worker goes first (resume
   with the same ``num_workers`` and ``batch_size``).
4. Each worker shuffles its samples through a buffer seeded by
   ``(seed, epoch, rank, worker)`` and decodes only what it yields.

webdataset has no S3 handler of its own: shards are opened with fsspec inside each
worker (s3fs is not fork-safe, so nothing opened in the parent is reused).

Reading and decoding cost about 250 us an image in one process (tar headers, then PNG),
which on a GPU is slower than training small models on them. With ``decoded_cache_bytes``
a split whose decoded images fit is kept decoded in memory across epochs: from the second
epoch on no shard is opened or decoded again. The cache holds the very tensors the shards
decode to and stands in at the point the raw samples would enter the pipeline, so the
batches are identical with or without it.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .artifacts import read_manifest
from .fsutil import StorageOptions, join, redact
from .imaging import MAX_RATIO, SHARD_FORMATS, ImageError, decode_image
from .ingest import FORMAT
from .integrity import REPAIR, DamagedArtifact
from .ranks import rank_share
from .shards import ShardError, iter_samples

class DamagedShard(ShardError, DamagedArtifact):
    """A shard of a finished dataset that does not read back as it was written."""


Segment = tuple[str, int, int, int]  # (shard URL, first sample, samples to take, samples in the shard)


def dataset_manifest(dataset_url: str, storage_options: StorageOptions = None) -> dict[str, Any]:
    """The manifest of a complete dataset; fails naming the URL if ingestion did not finish."""
    manifest = read_manifest(dataset_url, storage_options)
    if manifest is None:
        raise FileNotFoundError(
            f"{redact(dataset_url)}: no manifest.json; the dataset was not ingested there or its ingest did not finish"
        )
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{redact(dataset_url)}/manifest.json is not a {FORMAT} dataset manifest (storage.ingest writes those)")
    return manifest


def _split_shards(manifest: dict[str, Any], dataset_url: str, split: str) -> list[tuple[str, int]]:
    if split not in manifest["splits"]:
        raise ValueError(f"{redact(dataset_url)} has no split {split!r}; it has {sorted(manifest['splits'])}")
    return [(join(dataset_url, s["name"]), s["num_samples"]) for s in manifest["splits"][split]["shards"]]


Decoded = tuple[torch.Tensor, int, str]  # (uint8 C x H x W, label, key)


def ratio_kept(manifest: dict[str, Any]) -> bool:
    """Whether the dataset's images keep their aspect ratio (cropped to squares when read)."""
    return manifest.get("config", {}).get("resize") == "keep-ratio"


def _read_segments(segments: Sequence[Segment], storage_options: StorageOptions,
                   decoded: dict[str, list[Decoded | None]] | None = None) -> Iterator[dict[str, Any] | Decoded]:
    """Raw samples of each segment, checking that a shard holds what its manifest promises;
    a segment whose samples are all in `decoded` comes from there, already decoded."""
    for url, skip, take, count in segments:
        cached = decoded.get(url) if decoded is not None else None
        if cached is not None and all(item is not None for item in cached[skip:skip + take]):
            yield from cached[skip:skip + take]
            continue
        n = 0
        try:
            with contextlib.closing(iter_samples(url, storage_options)) as samples:
                for sample in itertools.islice(samples, skip, skip + take):
                    sample["__url__"], sample["__index__"] = url, skip + n
                    yield sample
                    n += 1
        except ShardError as err:
            raise DamagedShard(f"{err}; {REPAIR}") from err
        if n < take:
            raise DamagedShard(f"{redact(url)}: ends after {skip + n} samples but the manifest promises {count}: "
                               f"it is truncated; {REPAIR}")


def _decode(sample: dict[str, Any], shape: tuple[int, int, int], ratio_kept: bool = False) -> Decoded:
    """``(uint8 C x H x W, label, key)``; a sample that is not ours fails naming its shard.
    `ratio_kept` (ingest.resize keep-ratio): H x W has its shorter side the manifest's size."""
    where = f"{redact(sample['__url__'])}: sample {sample['__key__']!r}"
    try:
        image = next((sample[ext] for ext in SHARD_FORMATS.values() if ext in sample), None)
        if image is None:
            raise KeyError("png")
        pixels, label = decode_image(image, shape[2]), int(sample["cls"])
    except KeyError as err:
        fields = sorted(k for k in sample if not k.startswith("__"))
        raise ShardError(f"{where} has no {err} member (has {fields}); not a shard written by storage.ingest") from err
    except (ImageError, ValueError) as err:
        raise DamagedShard(f"{where}: {err}; {REPAIR}") from err
    size, fits = shape[0], pixels.shape == shape
    if ratio_kept:
        height, width, channels = pixels.shape
        fits = channels == shape[2] and min(height, width) == size and max(height, width) <= MAX_RATIO * size
    if not fits:
        raise ShardError(f"{where}: image is {pixels.shape} (H, W, C), the manifest says {shape}"
                         + (" with the ratio kept" if ratio_kept else ""))
    return torch.from_numpy(pixels).permute(2, 0, 1), label, sample["__key__"]


def square_crop(item: Decoded, size: int, offset: float | None = None) -> Decoded:
    """``item``'s image cut to ``size`` x ``size`` along its longer side: at ``offset`` in
    [0, 1) of the free room (random crops), the centre when None."""
    image, label, key = item
    height, width = image.shape[1:]
    if height == width == size:
        return item
    room = max(height, width) - size
    start = room // 2 if offset is None else int(offset * (room + 1))
    image = image[:, start:start + size, :] if height > width else image[:, :, start:start + size]
    return image, label, key


def _crop_offset(seed: int, epoch: int, key: str) -> float:
    """Where a training crop of sample `key` falls this epoch: a function of (seed, epoch, key)
    alone, so a resumed epoch, any worker and any rank cut the same crop."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _collate(samples: list[tuple[torch.Tensor, int, str]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    images = torch.stack([s[0] for s in samples]).float().div_(255)
    return images, torch.tensor([s[1] for s in samples], dtype=torch.int64), [s[2] for s in samples]


class ShardDataset(IterableDataset):
    """Batches of one split of an ingested dataset, shuffled, split by DDP rank and DataLoader worker.

    Args:
        dataset_url: the dataset directory (holding ``manifest.json``), any fsspec URL.
        split: ``"train"``, ``"test"``, ...
        batch_size: samples per batch; every rank yields ``len(self)`` batches.
        shuffle: shuffle shards (per epoch) and samples (through a buffer).
        seed, epoch: the shuffle is a function of both; see :meth:`set_epoch`.
        start_batch: batches of this epoch already consumed (resume from a checkpoint).
        shuffle_buffer: samples held per worker for shuffling (raw PNG bytes).
        drop_last: drop each rank's last, smaller batch.
        rank, world_size: default to ``torch.distributed`` when initialised, else 0 and 1.
        decoded_cache_bytes: keep the split's decoded images in memory across epochs (in
            each process that iterates this object) when they take at most this many bytes;
            0: never. Speed only: the batches are the same.
    """

    def __init__(
        self,
        dataset_url: str,
        split: str = "train",
        *,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        start_batch: int = 0,
        shuffle_buffer: int = 1000,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        storage_options: StorageOptions = None,
        decoded_cache_bytes: int = 0,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"ShardDataset: batch_size must be a positive integer, got {batch_size}")
        manifest = dataset_manifest(dataset_url, storage_options)
        self.dataset_url, self.split = dataset_url, split
        self.shards = _split_shards(manifest, dataset_url, split)
        self.shape = (manifest["image_size"], manifest["image_size"], manifest["channels"])
        self.ratio_kept = ratio_kept(manifest)
        self.class_names = list(manifest["class_names"])
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.shuffle_buffer, self.drop_last = shuffle_buffer, drop_last
        self.storage_options = dict(storage_options or {})
        total = sum(n for _, n in self.shards)
        where = f"ShardDataset({redact(dataset_url)}, {split!r})"
        self.rank, self.world_size, self.samples_per_rank = rank_share(total, rank, world_size, where)
        per_image = int(np.prod(self.shape)) * (MAX_RATIO if self.ratio_kept else 1)  # at most: kept ratios vary
        fits = 0 < total * per_image <= decoded_cache_bytes
        # shard URL -> its samples, decoded, by position (None: not decoded yet)
        self._decoded: dict[str, list[Decoded | None]] | None = {} if fits else None
        self._shard_sizes = dict(self.shards)
        self.set_epoch(epoch, start_batch)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (and resume position) the next iteration yields."""
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        """Batches per rank per epoch (equal on every rank)."""
        full, rest = divmod(self.samples_per_rank, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def _worker_batches(self, worker: int, num_workers: int) -> tuple[int, int]:
        """``[first, stop)`` batch numbers of this rank dealt to ``worker``."""
        share, extra = divmod(len(self), num_workers)
        first = worker * share + min(worker, extra)
        return first, first + share + (1 if worker < extra else 0)

    def segments(self, worker: int = 0, num_workers: int = 1) -> list[Segment]:
        """The shard pieces ``worker`` reads this epoch, in order."""
        order = list(range(len(self.shards)))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards)).tolist()
        first, stop = self._worker_batches(worker, num_workers)
        lo = self.rank * self.samples_per_rank + first * self.batch_size
        hi = self.rank * self.samples_per_rank + min(stop * self.batch_size, self.samples_per_rank)
        pieces, position = [], 0
        for i in order:
            url, count = self.shards[i]
            start, end = max(lo, position), min(hi, position + count)
            if start < end:
                pieces.append((url, start - position, end - start, count))
            position += count
        return pieces

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        loader_worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader asks its workers in turn starting from worker 0, but after
        # start_batch batches it is worker start_batch % num_workers's turn: rotate roles.
        worker = (loader_worker + self.start_batch) % num_workers
        first, stop = self._worker_batches(worker, num_workers)
        consumed = self.start_batch // num_workers + (1 if worker < self.start_batch % num_workers else 0)
        skip = min(consumed, stop - first) * self.batch_size
        rng = random.Random(int(np.random.SeedSequence([self.seed, self.epoch, self.rank, worker]).generate_state(1)[0]))
        segments = self.segments(worker, num_workers)
        stages = [
            lambda: _read_segments(segments, self.storage_options, self._decoded),
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng) if self.shuffle else None,
            lambda samples: itertools.islice(samples, skip, None),  # resume: drop before decoding
            wds.map(self._decode),
            wds.batched(self.batch_size, collation_fn=lambda batch: _collate(batch)[:2], partial=not self.drop_last),
        ]
        yield from wds.DataPipeline(*stages)

    def _decode(self, sample: dict[str, Any] | Decoded) -> Decoded:
        if isinstance(sample, tuple):  # from the cache
            return self._crop(sample)
        item = _decode(sample, self.shape, self.ratio_kept)
        if self._decoded is not None:
            url = sample["__url__"]
            self._decoded.setdefault(url, [None] * self._shard_sizes[url])[sample["__index__"]] = item
        return self._crop(item)

    def _crop(self, item: Decoded) -> Decoded:
        """A square: random per epoch when shuffling (training), else the centre."""
        if not self.ratio_kept:
            return item
        offset = _crop_offset(self.seed, self.epoch, item[2]) if self.shuffle else None
        return square_crop(item, self.shape[0], offset)


def shard_loader(dataset: ShardDataset, num_workers: int = 0, **kwargs: Any) -> DataLoader:
    """A DataLoader over ``dataset``'s batches (``batch_size=None``: the dataset batches itself)."""
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, **kwargs)


def iter_shard_batches(
    dataset_url: str,
    split: str,
    index: int,
    batch_size: int,
    storage_options: StorageOptions = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """Shard ``index`` of ``split`` in file order as ``(images, labels, keys)`` batches (for encoding).

    Its rows in a codes array start at the shard's ``offset`` in the manifest.
    """
    manifest = dataset_manifest(dataset_url, storage_options)
    shards = _split_shards(manifest, dataset_url, split)
    if not 0 <= index < len(shards):
        raise ValueError(f"{redact(dataset_url)} split {split!r} has shards 0..{len(shards) - 1}, not {index}")
    url, count = shards[index]
    shape, kept = (manifest["image_size"], manifest["image_size"], manifest["channels"]), ratio_kept(manifest)
    samples = (square_crop(_decode(s, shape, kept), shape[0])
               for s in _read_segments([(url, 0, count, count)], storage_options))
    while batch := list(itertools.islice(samples, batch_size)):
        yield _collate(batch)
