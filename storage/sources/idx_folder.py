"""MNIST-style IDX folders (Fashion-MNIST by default), streamed row range by row range."""
from __future__ import annotations

import gzip
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..fsutil import (
    StorageOptions,
    exists,
    filesystem,
    find,
    join,
    md5_file,
    read_bytes,
    redact,
    sha256_file,
    storage_errors,
    write_bytes,
)
from ..idx import idx_header, parse_idx
from .base import Partition, Reader, SourceItem, answering, content_digest, http_options, timeout_of

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com"
# MD5 sums published with the dataset (zalandoresearch/fashion-mnist README).
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


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

    @classmethod
    def holds_idx_files(cls, url: str, storage_options: StorageOptions = None) -> bool:
        """Whether the folder at ``url`` has IDX train images at its top (one listing, not a
        recursive one: a folder of images may hold millions of files below)."""
        fs, path = filesystem(url, storage_options)
        with answering(url, timeout_of(storage_options)), storage_errors(url):
            names = fs.ls(path, detail=False) if fs.isdir(path) else []
        prefix = f"{cls.PREFIXES['train']}-images-idx3-ubyte"
        return any(name.rstrip("/").rsplit("/", 1)[-1].startswith(prefix) for name in names)

    def check(self) -> None:
        """The folder holds the four IDX files."""
        with answering(self.url, timeout_of(self.storage_options)):
            self.files()

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
        return content_digest({"kind": self.kind, "class_names": self.class_names, "files": hashes})

    def partition(self, config: Any, base: Any = None) -> Partition:
        """Row ranges per split; ``base`` is ignored: IDX files are replaced whole, never grown."""
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


class _IdxReader(Reader):
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
    timeout_s: float | None = 30.0,
) -> IdxSource:
    """Download Fashion-MNIST from ``mirror`` into ``dest_url``, checking each file's MD5.

    Files already present with the right checksum are kept. ``mirror`` may be any fsspec
    URL (http(s), s3, a local copy; a copy that was re-gzipped, like Debian's, needs its
    own ``md5``). ``timeout_s``: how long an http(s) mirror may take to answer
    (:func:`storage.sources.base.http_options`). Never called by the tests against the network.
    """
    for name, expected in md5.items():
        target = join(dest_url, name)
        if exists(target, storage_options) and md5_file(target, storage_options) == expected:
            continue
        url = join(mirror, name)
        with answering(url, timeout_s):
            data = read_bytes(url, http_options(url, None, timeout_s))
        got = hashlib.md5(data).hexdigest()
        if got != expected:
            raise ValueError(
                f"{redact(url)}: MD5 {got} differs from the published {expected}; "
                "the download is corrupt or the mirror changed; try again or use another mirror"
            )
        write_bytes(target, data, storage_options)
    return IdxSource(dest_url, storage_options=storage_options)


def fashion_mnist_source(download_to: str | None = None, storage_options: StorageOptions = None,
                         timeout_s: float | None = 30.0) -> IdxSource:
    """Fashion-MNIST from the Debian package's folder, or else downloaded (with checksums) to ``download_to``."""
    if all(exists(join(FASHION_MNIST_DIR, name)) for name in FASHION_MNIST_MD5):
        return IdxSource(FASHION_MNIST_DIR)
    if download_to is None:
        raise FileNotFoundError(
            f"Fashion-MNIST is not in {FASHION_MNIST_DIR}: `apt-get install dataset-fashion-mnist`, "
            "or pass download_to=<URL> to fetch it from the official mirror"
        )
    return fetch_fashion_mnist(download_to, storage_options=storage_options, timeout_s=timeout_s)
