"""Latent codes in Zarr v3: written shard by shard in parallel, read in whole chunks for prior training.

One Zarr group per encoded dataset (any fsspec URL)::

    {url}/                       attrs: format, level_shapes, class_names, splits, complete, your attrs
    {url}/{split}/level0         int16  N x h0 x w0   top level first, as the model's encode() returns
    {url}/{split}/level1         int16  N x h1 x w1   (fill -1: never written)
    {url}/{split}/labels         int32  N            (fill -1)
    {url}/{split}/keys           str    N            sample keys, naming each row's shard

All arrays of a split share ``chunk_rows`` rows per chunk (Zstd-compressed). Row ``i``
is sample ``i`` of the split in manifest order, so the encoder of shard ``s`` owns rows
``[offset_s, offset_s + count_s)``. ``chunk_rows`` divides every shard offset, hence
each writer writes whole, aligned chunks and two writers never touch the same chunk.

Protocol: :func:`create_codes` once, :func:`write_codes` per shard (any order, in
parallel), :func:`finish_codes` once (checks every row was written, marks the group
complete). :class:`CodeDataset` refuses an incomplete group.

A shard's rows live in chunk objects of their own (``train/level1/c/3/0/0``, ...), so
:func:`write_codes` returns a record of them: each object's size and SHA-256, read back
once written. A resumed encoding reuses a shard only if :func:`codes_damage` finds its
objects as recorded: reading a shard's compressed codes costs far less than encoding it.
"""
from __future__ import annotations

import hashlib
import itertools
import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset, Sampler
from zarr.codecs import ZstdCodec

from .fsutil import StorageOptions, filesystem, join, redact, storage_errors
from .integrity import REPAIR, DamagedArtifact
from .ranks import rank_share

FORMAT = "vqvae2-codes/1"
CODE_MAX = np.iinfo(np.int16).max  # codebooks up to 32768 entries fit int16
TARGET_CHUNK_BYTES = 1 << 20  # ~1 MiB of raw codes per chunk: few objects, cheap random reads
# With a checksum per chunk: a byte flipped at rest fails the read instead of giving other codes.
_COMPRESSOR = ZstdCodec(level=3, checksum=True)

CodesRecord = dict[str, tuple[int, str]]
"""What :func:`write_codes` wrote: chunk object key relative to the group
(``train/level1/c/3/0/0``) -> (its size in bytes, hex SHA-256 of its bytes)."""


def level_name(level: int) -> str:
    """Array name of a code level; level 0 is the top (coarsest) one."""
    return f"level{level}"


def _offsets(counts: Sequence[int]) -> list[int]:
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist() if len(counts) else []


def choose_chunk_rows(shard_counts: Sequence[int], row_bytes: int, target_bytes: int = TARGET_CHUNK_BYTES) -> int:
    """The largest row count that divides every shard offset and keeps a chunk near ``target_bytes``.

    With equal shards of ``shard_size`` that is a divisor of ``shard_size``. Shards
    shortened by skipped images make offsets irregular and chunks smaller (still correct).
    """
    offsets = [o for o in _offsets(shard_counts) if o > 0]
    g = math.gcd(*offsets) if offsets else max(1, sum(shard_counts))
    cap = max(1, target_bytes // max(1, row_bytes))
    return max(d for d in range(1, min(g, cap) + 1) if g % d == 0)


def _open(url: str, mode: str, storage_options: StorageOptions) -> zarr.Group:
    try:
        return zarr.open_group(url, mode=mode, storage_options=dict(storage_options) if storage_options else None)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{redact(url)}: no codes group there (create_codes first): {err}") from err
    except PermissionError as err:
        raise PermissionError(f"{redact(url)}: access denied; check the credentials") from err


def create_codes(
    url: str,
    shard_counts: Mapping[str, Sequence[int]],
    level_shapes: Sequence[Sequence[int]],
    *,
    chunk_rows: int | None = None,
    class_names: Sequence[str] | None = None,
    attrs: Mapping[str, Any] | None = None,
    storage_options: StorageOptions = None,
) -> dict[str, Any]:
    """Create the (empty) arrays for every split; call once, before the per-shard writers.

    ``shard_counts`` is ``{split: [samples per shard]}`` (see
    :func:`storage.ingest.shard_counts`); ``level_shapes`` is ``[(h, w), ...]``, top level
    first. Calling it again with the same layout (a retry) leaves the group as it is.
    Returns the group's attributes.
    """
    shapes = [tuple(int(d) for d in s) for s in level_shapes]
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise ValueError(f"create_codes: level_shapes must be [(h, w), ...] top first, got {level_shapes!r}")
    row_bytes = sum(h * w for h, w in shapes) * 2
    splits = {}
    for split, counts in shard_counts.items():
        counts = [int(c) for c in counts]
        rows = chunk_rows or choose_chunk_rows(counts, row_bytes)
        bad = [o for o in _offsets(counts) if o % rows]
        if bad:
            raise ValueError(
                f"create_codes: chunk_rows={rows} does not divide the {split!r} shard offsets {bad[:5]}; "
                "writers of neighbouring shards would share chunks. Leave chunk_rows=None to choose one"
            )
        splits[split] = {"num_rows": sum(counts), "chunk_rows": rows, "shard_counts": counts, "shard_offsets": _offsets(counts)}
    layout = {"format": FORMAT, "level_shapes": [list(s) for s in shapes], "splits": splits}

    try:
        found = _open(url, "r", storage_options)
        existing = dict(found.attrs)
    except FileNotFoundError:
        existing = {}
    if existing.get("format") == FORMAT and _arrays_readable(found, splits, len(shapes)):
        # The layout attrs go last, so their presence means "created" (its arrays too, unless
        # `vqvae2 verify --repair` dropped a damaged one: then the group is made again).
        if {k: existing.get(k) for k in layout} != layout:
            raise ValueError(f"{redact(url)}: a codes group with another layout exists; use a new URL (key) for new codes")
        return existing

    group = _open(url, "w", storage_options)  # absent, or half-created by a crashed attempt
    for split, info in splits.items():
        n, rows = info["num_rows"], info["chunk_rows"]
        sub = group.create_group(split)
        for level, (h, w) in enumerate(shapes):
            sub.create_array(level_name(level), shape=(n, h, w), chunks=(rows, h, w), dtype="int16", fill_value=-1, compressors=_COMPRESSOR)
        sub.create_array("labels", shape=(n,), chunks=(rows,), dtype="int32", fill_value=-1, compressors=_COMPRESSOR)
        sub.create_array("keys", shape=(n,), chunks=(rows,), dtype=str, compressors=_COMPRESSOR)
    group.attrs.update({**dict(attrs or {}), **layout, "class_names": list(class_names or []), "complete": False})
    return dict(group.attrs)


def _arrays_readable(group: zarr.Group, splits: Mapping[str, Any], levels: int) -> bool:
    names = [level_name(level) for level in range(levels)] + ["labels", "keys"]
    try:
        for split in splits:
            for name in names:
                group[f"{split}/{name}"]
    except (KeyError, FileNotFoundError, ValueError):
        return False
    return True


def write_codes(
    url: str,
    split: str,
    start_row: int,
    codes: Sequence[Any],
    labels: Any,
    keys: Sequence[str],
    storage_options: StorageOptions = None,
) -> CodesRecord:
    """Write rows ``[start_row, start_row + len(labels))`` of ``split``: one shard's codes.

    ``codes`` holds one N x h x w integer array (or tensor) per level, top first. The
    row range must start on a chunk boundary and end on one (or at the split's end).
    Returns the record of the chunk objects written, for :func:`codes_damage`.
    """
    group = _open(url, "r+", storage_options)
    info = group.attrs["splits"].get(split)
    if info is None:
        raise ValueError(f"{redact(url)}: no split {split!r}; it has {sorted(group.attrs['splits'])}")
    labels = _numpy(labels).astype(np.int64).reshape(-1)
    n, end, rows = len(labels), start_row + len(labels), info["chunk_rows"]
    shapes = group.attrs["level_shapes"]
    if len(codes) != len(shapes) or len(keys) != n:
        raise ValueError(f"write_codes: need {len(shapes)} code levels and {n} keys for {n} labels, got {len(codes)} and {len(keys)}")
    if start_row % rows or (end % rows and end != info["num_rows"]) or end > info["num_rows"]:
        raise ValueError(
            f"write_codes: rows [{start_row}, {end}) of {split!r} are not whole chunks of {rows} rows "
            f"within [0, {info['num_rows']}); write exactly one shard's rows at its manifest offset"
        )
    arrays = []
    for level, (array, (h, w)) in enumerate(zip(codes, shapes)):
        array = _numpy(array)
        if array.shape != (n, h, w):
            raise ValueError(f"write_codes: level {level} codes are {array.shape}, expected {(n, h, w)}")
        if array.size and (array.min() < 0 or array.max() > CODE_MAX):
            raise ValueError(f"write_codes: level {level} codes must lie in [0, {CODE_MAX}] to fit int16")
        arrays.append(array.astype(np.int16))
    if n and (labels.min() < 0 or labels.max() > np.iinfo(np.int32).max):
        raise ValueError("write_codes: labels must be non-negative int32 values")
    for level, array in enumerate(arrays):
        group[f"{split}/{level_name(level)}"][start_row:end] = array
    group[f"{split}/labels"][start_row:end] = labels.astype(np.int32)
    group[f"{split}/keys"][start_row:end] = np.asarray(list(keys), dtype=object)
    fs, root = filesystem(url, storage_options)
    record = {}
    for key in _chunk_keys(group, split, start_row, end):
        data = _chunk_bytes(fs, root, url, key)
        record[key] = (len(data), hashlib.sha256(data).hexdigest())
    return record


def codes_damage(
    url: str, split: str, start_row: int, num_rows: int, record: CodesRecord, storage_options: StorageOptions = None
) -> str | None:
    """What differs between rows ``[start_row, start_row + num_rows)`` of ``split`` and
    ``record`` (what :func:`write_codes` returned for them), or None when nothing does.

    Reads the rows' chunk objects (compressed bytes, one read each, nothing decoded) and
    names the first one missing, of another size or with other bytes than recorded.
    """
    end = start_row + num_rows
    try:
        group = _open(url, "r", storage_options)
    except FileNotFoundError:
        return f"{redact(url)}: the codes group is gone, and rows [{start_row}, {end}) of {split!r} with it"
    if split not in group.attrs.get("splits", {}):
        return f"{redact(url)}: no split {split!r}, hence not its rows [{start_row}, {end})"
    keys = _chunk_keys(group, split, start_row, end)
    if sorted(keys) != sorted(record):
        return (f"{redact(url)}/{split}: rows [{start_row}, {end}) are not in the chunk objects their record names "
                "(a record of other rows, or of another layout)")
    fs, root = filesystem(url, storage_options)
    for key in keys:
        data = _chunk_bytes(fs, root, url, key)
        size, digest = record[key]
        if len(data) != size:
            found = "is missing" if not data else f"has {len(data)} bytes"
            return f"{redact(join(url, key))} (rows [{start_row}, {end})) {found}; its record says {size} bytes"
        if hashlib.sha256(data).hexdigest() != digest:
            return f"{redact(join(url, key))} (rows [{start_row}, {end})) has other bytes than its record (SHA-256)"
    return None


def _chunk_keys(group: zarr.Group, split: str, start_row: int, end: int) -> list[str]:
    """Keys (relative to the group) of the chunk objects that hold rows [start_row, end) of
    every array of ``split``; the writer of those rows owns them whole (module docstring)."""
    rows = group.attrs["splits"][split]["chunk_rows"]
    names = [level_name(level) for level in range(len(group.attrs["level_shapes"]))] + ["labels", "keys"]
    keys = []
    for name in names:
        array = group[f"{split}/{name}"]
        # Chunked by `rows` along the rows; one chunk across every other dimension (create_codes).
        for coords in itertools.product(range(start_row // rows, -(-end // rows)), *map(range, array.cdata_shape[1:])):
            keys.append(f"{array.path}/{array.metadata.encode_chunk_key(coords)}")
    return keys


def _chunk_bytes(fs: Any, root: str, url: str, key: str) -> bytes:
    try:
        with storage_errors(join(url, key)):
            return fs.cat_file(join(root, key))
    except FileNotFoundError:
        # Zarr stores no chunk that holds only fill values: 0 bytes, in a record as on reading.
        return b""


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def finish_codes(url: str, storage_options: StorageOptions = None) -> dict[str, Any]:
    """Check every row of every split was written, then mark the group complete; returns its attrs."""
    group = _open(url, "r+", storage_options)
    for split, info in group.attrs["splits"].items():
        labels, rows = group[f"{split}/labels"], info["chunk_rows"]
        for first in range(0, info["num_rows"], rows):  # chunk by chunk: bounded memory
            unwritten = np.flatnonzero(labels[first : first + rows] < 0)
            if unwritten.size:
                row = first + int(unwritten[0])
                shard = int(np.searchsorted(info["shard_offsets"], row, side="right")) - 1
                raise ValueError(
                    f"{redact(url)}: split {split!r} row {row} (shard {shard}) was never written; "
                    "run write_codes for that shard, then finish_codes again"
                )
    _remove_unrenamed_chunks(url, storage_options)
    group.attrs["complete"] = True
    return dict(group.attrs)


def _remove_unrenamed_chunks(url: str, storage_options: StorageOptions) -> None:
    """Zarr's local store writes a chunk to ``<chunk>.<uuid>.partial`` and renames it; a writer
    killed in between leaves that file, which nothing reads and a later write of the chunk
    does not replace. Object stores write each object whole, so only a local group has them."""
    fs, root = filesystem(url, storage_options)
    if "file" not in fs.protocol:
        return
    for leftover in fs.glob(join(root, "**", "*.partial")):
        fs.rm_file(leftover)


def read_codes_info(url: str, storage_options: StorageOptions = None) -> dict[str, Any]:
    """The group's attributes (layout, class names, completeness, caller's attrs)."""
    return dict(_open(url, "r", storage_options).attrs)


class CodeDataset(Dataset):
    """Map-style dataset of one split's codes: ``item i -> (tuple of int64 h x w tensors, top first; label)``.

    Rows are served from whole chunks held in a small LRU cache (``cache_chunks``), so
    memory stays bounded whatever N is; pair it with :class:`ChunkShuffleSampler` for a
    random epoch order that still reads each chunk once per worker.
    """

    def __init__(self, url: str, split: str = "train", *, cache_chunks: int = 8, storage_options: StorageOptions = None):
        self.url, self.split, self.cache_chunks = url, split, max(1, cache_chunks)
        self.storage_options = dict(storage_options or {})
        attrs = read_codes_info(url, storage_options)
        if not attrs.get("complete"):
            raise ValueError(f"{redact(url)}: the codes are incomplete; finish_codes was not called or a writer failed")
        if split not in attrs["splits"]:
            raise ValueError(f"{redact(url)}: no split {split!r}; it has {sorted(attrs['splits'])}")
        info = attrs["splits"][split]
        self.num_rows, self.chunk_rows = info["num_rows"], info["chunk_rows"]
        self.level_shapes = [tuple(s) for s in attrs["level_shapes"]]
        self.class_names = list(attrs.get("class_names", []))
        self._state: tuple[int, zarr.Group, OrderedDict] | None = None

    def __len__(self) -> int:
        return self.num_rows

    @property
    def num_chunks(self) -> int:
        return -(-self.num_rows // self.chunk_rows)

    def _opened(self) -> tuple[zarr.Group, OrderedDict]:
        # Opened lazily and per process: a DataLoader worker must not reuse the parent's store.
        if self._state is None or self._state[0] != os.getpid():
            self._state = (os.getpid(), _open(self.url, "r", self.storage_options)[self.split], OrderedDict())
        return self._state[1], self._state[2]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_state": None}

    def chunk(self, index: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Codes (one int64 tensor per level) and labels of chunk ``index``, through the cache."""
        group, cache = self._opened()
        if index in cache:
            cache.move_to_end(index)
            return cache[index]
        rows = slice(index * self.chunk_rows, min((index + 1) * self.chunk_rows, self.num_rows))
        where = f"{redact(self.url)}/{self.split}: chunk {index} (rows [{rows.start}, {rows.stop}))"
        try:
            levels = [group[level_name(i)][rows].astype(np.int64) for i in range(len(self.level_shapes))]
            labels = group["labels"][rows].astype(np.int64)
        except (RuntimeError, ValueError) as err:  # zstd: a cut or altered chunk object
            raise DamagedArtifact(f"{where} does not read ({err}); {REPAIR}") from err
        if (labels < 0).any() or any((level < 0).any() for level in levels):
            # Complete codes hold no fill value: a chunk object of these rows is gone.
            raise DamagedArtifact(f"{where} holds rows that were never written: a chunk object is missing; {REPAIR}")
        entry = ([torch.from_numpy(level) for level in levels], torch.from_numpy(labels))
        cache[index] = entry
        if len(cache) > self.cache_chunks:
            cache.popitem(last=False)
        return entry

    def __getitem__(self, i: int) -> tuple[tuple[torch.Tensor, ...], int]:
        if not -self.num_rows <= i < self.num_rows:
            raise IndexError(f"row {i} outside 0..{self.num_rows - 1}")
        i %= self.num_rows
        levels, labels = self.chunk(i // self.chunk_rows)
        j = i % self.chunk_rows
        return tuple(level[j].clone() for level in levels), int(labels[j])

    def key(self, i: int) -> str:
        """Sample key of row ``i`` (names the shard it came from)."""
        group, _ = self._opened()
        return str(group["keys"][i])


class ChunkShuffleSampler(Sampler[int]):
    """Random order that visits chunks in a shuffled order, ``window`` chunks at a time,
    shuffling rows only within the window: each chunk is read once per epoch if
    ``window`` <= the dataset's ``cache_chunks``.

    Under DDP every rank gets ``N // world_size`` rows, a contiguous stretch of the
    epoch's order (so ranks read disjoint chunks, but for the stretch ends).
    ``start`` skips rows this rank already consumed this epoch (resume).
    """

    def __init__(
        self,
        dataset: CodeDataset,
        *,
        seed: int = 0,
        epoch: int = 0,
        start: int = 0,
        shuffle: bool = True,
        window: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        self.num_rows, self.chunk_rows = dataset.num_rows, dataset.chunk_rows
        self.window = window or dataset.cache_chunks
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size, self.per_rank = rank_share(self.num_rows, rank, world_size, "ChunkShuffleSampler")
        self.set_epoch(epoch, start)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        num_chunks = -(-self.num_rows // self.chunk_rows)
        chunks = rng.permutation(num_chunks) if self.shuffle else np.arange(num_chunks)
        lo = self.rank * self.per_rank + self.start
        hi = (self.rank + 1) * self.per_rank
        position = 0
        for first in range(0, num_chunks, self.window):
            rows = np.concatenate(
                [np.arange(c * self.chunk_rows, min((c + 1) * self.chunk_rows, self.num_rows)) for c in chunks[first : first + self.window]]
            )
            if self.shuffle:  # also for windows this rank skips: every rank draws the same stream
                rng.shuffle(rows)
            if position + len(rows) > lo and position < hi:
                yield from rows[max(0, lo - position) : hi - position].tolist()
            position += len(rows)
            if position >= hi:
                return
