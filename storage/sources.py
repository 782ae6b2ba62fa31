"""Where images come from: Fashion-MNIST-style IDX files, a folder of class folders, or
existing tar shards, on any fsspec URL.

A source does three things for :mod:`storage.ingest`:

- ``partition(config)`` splits its items into per-split *units*, one per output shard,
  each a small JSON-able value (an IDX row range, a list of files, a tar URL), so the
  shards can be written independently and in parallel;
- ``open()`` gives a reader whose ``read(split, unit)`` yields :class:`SourceItem` s;
- ``digest()`` fingerprints the content: equal for an unchanged source, different for
  a changed or grown one (IDX: SHA-256 of the files; folders and tars: names, sizes and
  ETags or modification times from one listing, cheap for a nightly re-run).

Sources are frozen dataclasses, so a plan pickles them to other processes;
``storage_options`` (possibly holding credentials) is kept out of ``repr`` and of
:meth:`describe`, which is what manifests record.
"""
from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from .fsutil import (
    StorageOptions,
    exists,
    expand_urls,
    filesystem,
    find,
    fingerprint,
    join,
    md5_file,
    read_bytes,
    redact,
    sha256_file,
    storage_errors,
    write_bytes,
)
from .idx import idx_header, parse_idx
from .shards import iter_samples

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com"
# MD5 sums published with the dataset (zalandoresearch/fashion-mnist README).
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83fd310",
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm", "tif", "tiff", "gif")
_FETCH_BATCH = 64  # files requested at once from an object store (s3fs fetches them concurrently)


@dataclass(frozen=True)
class SourceItem:
    """One input image: ``data`` is an encoded file (bytes) or uint8 pixels; ``error`` says why it is unusable."""

    ref: str  # where it came from, recorded in the sample's json and in skip lists
    label: int
    data: bytes | np.ndarray | None
    error: str | None = None


@dataclass(frozen=True)
class Partition:
    """A source's items cut into shard-sized units per split."""

    units: dict[str, list[Any]]
    class_names: tuple[str, ...] | None  # None: taken from the labels seen (tar sources)
    ignored: tuple[tuple[str, str], ...] = ()  # (ref, reason): files that are no sample at all


class Source(Protocol):
    """What :func:`storage.ingest.plan_ingest` needs from a source."""

    kind: ClassVar[str]

    def describe(self) -> dict[str, Any]: ...
    def digest(self) -> str: ...
    def partition(self, config: Any) -> Partition: ...
    def open(self) -> Any: ...


def source_digest(source: Source) -> str:
    """Content fingerprint of ``source``: same for an unchanged source, new when it changes or grows."""
    return source.digest()


def _digest(payload: Any) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _unit_interval(seed: int, name: str) -> float:
    """A stable pseudo-random number in [0, 1) per (seed, name): decides held-out items and order."""
    h = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def _chunks(items: Sequence[Any], size: int) -> list[Any]:
    return [tuple(items[i : i + size]) for i in range(0, len(items), size)]


class _Reader:
    """Base reader: a context manager holding what a worker opens once for many shards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass


# --- IDX ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class IdxSource:
    """A folder of MNIST-style IDX files: ``train-images-idx3-ubyte[.gz]``, ``train-labels-...``,
    ``t10k-images-...``, ``t10k-labels-...`` (the test split). Units are row ranges."""

    url: str = FASHION_MNIST_DIR
    class_names: tuple[str, ...] = FASHION_MNIST_CLASSES
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)
    kind: ClassVar[str] = "idx"
    PREFIXES: ClassVar[dict[str, str]] = {"train": "train", "test": "t10k"}

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "url": redact(self.url), "class_names": list(self.class_names)}

    def files(self) -> dict[str, tuple[str, str]]:
        """``{split: (images URL, labels URL)}``; fails naming the folder if a file is missing."""
        present = set(find(self.url, self.storage_options))
        files = {}
        for split, prefix in self.PREFIXES.items():
            pair = []
            for kind in ("images-idx3", "labels-idx1"):
                name = f"{prefix}-{kind}-ubyte"
                found = [n for n in (name, name + ".gz") if n in present]
                if not found:
                    raise FileNotFoundError(f"{redact(self.url)}: no {name}[.gz]; is this an MNIST-style IDX folder?")
                pair.append(join(self.url, found[-1]))
            files[split] = (pair[0], pair[1])
        return files

    def digest(self) -> str:
        hashes = {
            split: [sha256_file(u, self.storage_options) for u in pair] for split, pair in self.files().items()
        }
        return _digest({"kind": self.kind, "class_names": self.class_names, "files": hashes})

    def partition(self, config: Any) -> Partition:
        units = {}
        for split, (images_url, labels_url) in self.files().items():
            labels = parse_idx(read_bytes(labels_url, self.storage_options), labels_url)
            with _IdxRows(images_url, self.storage_options) as rows:
                if rows.count != len(labels):
                    raise ValueError(f"{redact(images_url)}: {rows.count} images but {len(labels)} labels")
            if len(labels) and int(labels.max()) >= len(self.class_names):
                raise ValueError(
                    f"{redact(labels_url)}: label {int(labels.max())} but only {len(self.class_names)} "
                    "class_names; pass the dataset's class names to IdxSource"
                )
            n = min(len(labels), config.max_samples_per_split or len(labels))
            units[split] = [(start, min(start + config.shard_size, n)) for start in range(0, n, config.shard_size)]
        return Partition(units, tuple(self.class_names))

    def open(self) -> _IdxReader:
        return _IdxReader(self)


class _IdxRows:
    """Streams rows of an IDX file front to back; a gzip file cannot seek, so rows are read in order."""

    def __init__(self, url: str, storage_options: StorageOptions):
        fs, path = filesystem(url, storage_options)
        self.url = url
        with storage_errors(url):
            self._raw = fs.open(path, "rb")
        head = self._raw.read(2)
        self._raw.seek(0)
        self._stream = gzip.GzipFile(fileobj=self._raw) if head == b"\x1f\x8b" else self._raw
        head = self._stream.read(4)
        head += self._stream.read(4 * head[3] if len(head) == 4 else 0)  # byte 3: number of dimensions
        dtype, shape, _ = idx_header(head, url)
        self.count, self.row_shape = shape[0], tuple(shape[1:])
        self.dtype = dtype.newbyteorder(">")
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * dtype.itemsize
        self.position = 0  # next row the stream will return

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (``start`` must not be behind the stream)."""
        assert start >= self.position, "IDX rows are read front to back"
        while self.position < start:  # skip in bounded blocks
            n = min(start - self.position, max(1, (1 << 22) // self.row_bytes))
            self._exact(n * self.row_bytes)
            self.position += n
        data = self._exact((stop - start) * self.row_bytes)
        self.position = stop
        return np.frombuffer(data, self.dtype).reshape((stop - start, *self.row_shape)).astype(self.dtype.newbyteorder("="))

    def _exact(self, n: int) -> bytes:
        try:
            data = self._stream.read(n)
        except (OSError, EOFError) as err:
            raise ValueError(f"{redact(self.url)}: not a readable IDX file ({err})") from err
        if len(data) != n:
            raise ValueError(f"{redact(self.url)}: IDX file ends early; it is truncated, fetch it again")
        return data

    def __enter__(self) -> _IdxRows:
        return self

    def __exit__(self, *exc) -> None:
        self._raw.close()


class _IdxReader(_Reader):
    def __init__(self, source: IdxSource):
        self.source = source
        self.files = source.files()
        self._labels: dict[str, np.ndarray] = {}
        self._rows: dict[str, _IdxRows] = {}

    def read(self, split: str, unit: Sequence[int]) -> Iterator[SourceItem]:
        start, stop = unit
        images_url, labels_url = self.files[split]
        if split not in self._labels:
            self._labels[split] = parse_idx(read_bytes(labels_url, self.source.storage_options), labels_url)
        rows = self._rows.get(split)
        if rows is None or rows.position > start:  # consecutive shards continue one stream
            if rows is not None:
                rows.__exit__()
            rows = self._rows[split] = _IdxRows(images_url, self.source.storage_options)
        name = images_url.rsplit("/", 1)[-1]
        for i, pixels in enumerate(rows.read(start, stop), start):
            yield SourceItem(f"{name}#{i}", int(self._labels[split][i]), pixels)

    def close(self) -> None:
        for rows in self._rows.values():
            rows.__exit__()
        self._rows.clear()


def fetch_fashion_mnist(
    dest_url: str,
    mirror: str = FASHION_MNIST_MIRROR,
    storage_options: StorageOptions = None,
    md5: Mapping[str, str] = FASHION_MNIST_MD5,
) -> IdxSource:
    """Download Fashion-MNIST from ``mirror`` into ``dest_url``, checking each file's MD5.

    Files already present with the right checksum are kept. ``mirror`` may be any fsspec
    URL (http(s), s3, a local copy; a copy that was re-gzipped, like Debian's, needs its
    own ``md5``). Never called by the tests against the network.
    """
    for name, expected in md5.items():
        target = join(dest_url, name)
        if exists(target, storage_options) and md5_file(target, storage_options) == expected:
            continue
        url = join(mirror, name)
        data = read_bytes(url)
        got = hashlib.md5(data).hexdigest()
        if got != expected:
            raise ValueError(
                f"{redact(url)}: MD5 {got} differs from the published {expected}; "
                "the download is corrupt or the mirror changed; try again or use another mirror"
            )
        write_bytes(target, data, storage_options)
    return IdxSource(dest_url, storage_options=storage_options)


def fashion_mnist_source(download_to: str | None = None, storage_options: StorageOptions = None) -> IdxSource:
    """Fashion-MNIST from the Debian package's folder, or else downloaded (with checksums) to ``download_to``."""
    if all(exists(join(FASHION_MNIST_DIR, name)) for name in FASHION_MNIST_MD5):
        return IdxSource(FASHION_MNIST_DIR)
    if download_to is None:
        raise FileNotFoundError(
            f"Fashion-MNIST is not in {FASHION_MNIST_DIR}: `apt-get install dataset-fashion-mnist`, "
            "or pass download_to=<URL> to fetch it from the official mirror"
        )
    return fetch_fashion_mnist(download_to, storage_options=storage_options)


# --- image folder ------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageFolderSource:
    """``{url}/{class}/.../{image}``, or ``{url}/train/{class}/...`` plus ``{url}/test/{class}/...``.

    Without ``train``/``test`` folders, a stable hash of each file's path (and the
    config's seed) puts ``holdout_fraction`` of the files into ``test``, so files keep
    their split when the folder grows. Within a split, files are ordered by that hash,
    which mixes classes across shards. Hidden files (``.name``) are ignored; any other
    file that does not decode is skipped and named in the manifest.
    """

    url: str
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)
    kind: ClassVar[str] = "image_folder"
    SPLITS: ClassVar[tuple[str, ...]] = ("train", "test")

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "url": redact(self.url)}

    def listing(self) -> dict[str, dict]:
        """Visible files, ``{relative path: info}``."""
        files = find(self.url, self.storage_options)
        return {rel: info for rel, info in files.items() if not any(p.startswith(".") for p in rel.split("/"))}

    def digest(self) -> str:
        files = sorted((rel, fingerprint(info)) for rel, info in self.listing().items())
        return _digest({"kind": self.kind, "files": files})

    def partition(self, config: Any) -> Partition:
        files = sorted(self.listing())
        top = {rel.split("/")[0] for rel in files if "/" in rel}
        presplit = "train" in top and top <= set(self.SPLITS)
        items: dict[str, list[tuple[str, str]]] = {split: [] for split in self.SPLITS}
        ignored = []
        for rel in files:
            parts = rel.split("/")
            if presplit:
                split, parts = parts[0], parts[1:]
            else:
                split = "test" if _unit_interval(config.seed, rel) < config.holdout_fraction else "train"
            if len(parts) < 2:
                ignored.append((rel, "not inside a class folder"))
                continue
            items[split].append((rel, parts[0]))
        class_names = tuple(sorted({cls for split_items in items.values() for _, cls in split_items}))
        if not class_names:
            raise ValueError(f"{redact(self.url)}: no class folders with files; expected {{url}}/<class>/<image>")
        index = {name: i for i, name in enumerate(class_names)}
        units = {}
        for split, split_items in items.items():
            ordered = sorted(split_items, key=lambda item: (_unit_interval(config.seed, item[0]), item[0]))
            ordered = ordered[: config.max_samples_per_split or len(ordered)]
            if ordered:
                units[split] = _chunks([(rel, index[cls]) for rel, cls in ordered], config.shard_size)
        return Partition(units, class_names, tuple(ignored))

    def open(self) -> _FolderReader:
        return _FolderReader(self)


class _FolderReader(_Reader):
    def __init__(self, source: ImageFolderSource):
        self.fs, self.root = filesystem(source.url, source.storage_options)
        self.url = source.url

    def read(self, split: str, unit: Sequence[Sequence[Any]]) -> Iterator[SourceItem]:
        for i in range(0, len(unit), _FETCH_BATCH):
            batch = unit[i : i + _FETCH_BATCH]
            paths = [f"{self.root.rstrip('/')}/{rel}" for rel, _ in batch]
            with storage_errors(self.url):
                blobs = self.fs.cat(paths, on_error="return")
            for (rel, label), path in zip(batch, paths):
                data = blobs.get(path, FileNotFoundError("vanished after listing"))
                if isinstance(data, Exception):
                    yield SourceItem(rel, label, None, f"unreadable: {type(data).__name__}: {data}")
                else:
                    yield SourceItem(rel, label, data)


# --- existing tar shards -----------------------------------------------------------------


@dataclass(frozen=True)
class TarSource:
    """Existing WebDataset-style tars: each becomes one output shard (units are tar URLs).

    ``urls`` is a pattern or list of patterns (brace ``{000..099}`` and glob ``*``
    forms, any fsspec URL), or ``{"train": patterns, "test": patterns}``. Without
    explicit splits, whole tars are held out for ``test`` by a stable hash of their
    names (at least one, so at least two tars are needed). A sample's image is its
    first member with an image extension; its label is ``cls`` (class 0 if absent).
    """

    urls: str | Sequence[str] | Mapping[str, str | Sequence[str]]
    class_names: tuple[str, ...] | None = None
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)
    kind: ClassVar[str] = "tar"

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "urls": self._patterns(), "class_names": self.class_names}

    def _patterns(self) -> dict[str, list[str]] | list[str]:
        def listed(p):
            return [redact(p)] if isinstance(p, str) else [redact(u) for u in p]

        if isinstance(self.urls, Mapping):
            return {split: listed(p) for split, p in self.urls.items()}
        return listed(self.urls)

    def expand(self) -> dict[str, list[str]] | list[str]:
        """The tar URLs, per split when given per split."""
        if isinstance(self.urls, Mapping):
            return {split: expand_urls(p, self.storage_options) for split, p in self.urls.items()}
        return expand_urls(self.urls, self.storage_options)

    def digest(self) -> str:
        expanded = self.expand()
        urls = [u for us in expanded.values() for u in us] if isinstance(expanded, dict) else expanded
        prints = []
        for url in urls:
            fs, path = filesystem(url, self.storage_options)
            with storage_errors(url):
                prints.append((redact(url), fingerprint(fs.info(path))))
        return _digest({"kind": self.kind, "class_names": self.class_names, "layout": self._patterns(), "tars": prints})

    def partition(self, config: Any) -> Partition:
        if config.max_samples_per_split is not None:
            raise ValueError(
                "IngestConfig.max_samples_per_split cannot apply to tar sources (their sample counts are "
                "unknown until read); select fewer tars with a brace pattern instead"
            )
        expanded = self.expand()
        if isinstance(expanded, dict):
            return Partition({split: list(urls) for split, urls in expanded.items() if urls}, self.class_names)
        if config.holdout_fraction == 0:
            return Partition({"train": list(expanded)}, self.class_names)
        if len(expanded) < 2:
            raise ValueError(
                f"{self._patterns()}: a held-out test split needs at least two tars; "
                "pass urls={'train': ..., 'test': ...} or set IngestConfig.holdout_fraction=0"
            )
        ranked = sorted(expanded, key=lambda u: (_unit_interval(config.seed, u.rsplit("/", 1)[-1]), u))
        held = set(ranked[: max(1, round(len(ranked) * config.holdout_fraction))])
        return Partition(
            {"train": [u for u in expanded if u not in held], "test": [u for u in expanded if u in held]},
            self.class_names,
        )

    def open(self) -> _TarReader:
        return _TarReader(self)


class _TarReader(_Reader):
    def __init__(self, source: TarSource):
        self.storage_options = source.storage_options

    def read(self, split: str, unit: str) -> Iterator[SourceItem]:
        for sample in iter_samples(unit, self.storage_options):
            ref = f"{redact(unit)}#{sample['__key__']}"
            image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
            try:
                label = int(sample.get("cls", b"0"))
            except ValueError:
                yield SourceItem(ref, -1, None, f"cls {sample['cls'][:20]!r} is not an integer label")
                continue
            if image is None:
                fields = sorted(k for k in sample if not k.startswith("__"))
                yield SourceItem(ref, label, None, f"no image member (has: {', '.join(fields)})")
            else:
                yield SourceItem(ref, label, image)
