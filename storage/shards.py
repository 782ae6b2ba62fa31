"""The shard format: WebDataset tar files, written fast and read with errors that name the shard.

A shard is a plain POSIX (ustar) tar. Each sample is a run of consecutive members
``{key}.{ext}`` sharing one ``key`` (no dots in it), the WebDataset convention; the
shards written by :mod:`storage.ingest` hold ``png`` (lossless image), ``cls``
(decimal label) and ``json`` (source and original size) for every sample.

Writing bypasses :mod:`tarfile`: it builds each 512-byte header in pure Python at
about three times the cost of PNG-encoding a 32 x 32 image, and a shard needs nothing
but regular-file headers. Reading uses :mod:`tarfile` in stream mode, so a shard is
read front to back through any fsspec file (S3 included) without seeking.
"""
from __future__ import annotations

import hashlib

import tarfile
import zlib
from collections.abc import Iterator, Mapping
from typing import BinaryIO

from .fsutil import StorageOptions, filesystem, join, redact, storage_errors

BLOCK = 512
RECORD = 20 * BLOCK  # tar pads the archive to whole records
_MTIME = 0  # fixed, so re-ingesting the same source writes byte-identical shards
MAX_MEMBER_BYTES = 256 << 20  # a bigger "image" in a tar is not read into memory, its sample is skipped


class ShardError(ValueError):
    """A shard that cannot be read back: truncated, foreign, or not what its manifest says."""


def shard_name(index: int) -> str:
    """File name of shard ``index`` of a split: ``shard-000042.tar``."""
    return f"shard-{index:06d}.tar"


def shard_unit(split: str, index: int) -> str:
    """How the work on shard ``index`` of ``split`` is named (ingesting it, encoding it): ``shard-train-000042``."""
    return f"shard-{split}-{index:06d}"


def shard_url(dataset_url: str, split: str, index: int) -> str:
    """``{dataset_url}/{split}/shard-NNNNNN.tar``."""
    return join(dataset_url, split, shard_name(index))


def sample_key(split: str, shard_index: int, position: int) -> str:
    """Key of the ``position``-th sample of a shard: names its shard, has no dots."""
    return f"{split}-{shard_index:06d}-{position:06d}"


def _header_template() -> bytearray:
    h = bytearray(BLOCK)
    h[100:108] = b"0000444\0"  # mode r--r--r--
    h[108:116] = b"0000000\0"  # uid
    h[116:124] = b"0000000\0"  # gid
    h[136:148] = b"%011o\0" % _MTIME
    h[148:156] = b" " * 8  # checksum field counts as spaces while summing
    h[156:157] = b"0"  # regular file
    h[257:265] = b"ustar\x0000"
    return h


class ShardWriter:
    """Appends samples to a binary stream as an uncompressed ustar archive.

    >>> with atomic_open(url) as f, ShardWriter(f) as w:
    ...     w.write("train-000000-000000", {"png": png, "cls": b"3", "json": b"{}"})
    """

    FLUSH_BYTES = 1 << 20  # few large writes: each write to an fsspec file costs a Python call chain

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.bytes_written = 0
        self._digest = hashlib.sha256()  # of every byte written: the shard's record keeps it
        self._template = _header_template()
        self._template_sum = sum(self._template)
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    def _header(self, name: bytes, size: int) -> bytes:
        if len(name) > 100:
            raise ValueError(f"tar member name {name!r} is longer than 100 bytes; use a shorter sample key")
        size_field = b"%011o\0" % size
        h = self._template.copy()
        h[0 : len(name)] = name
        h[124:136] = size_field
        # The checksum sums every header byte; only the name and size differ from the template.
        h[148:156] = b"%06o\0 " % (self._template_sum + sum(name) + sum(size_field))
        return bytes(h)

    def write(self, key: str, fields: Mapping[str, bytes]) -> None:
        """Write one sample: a member ``{key}.{ext}`` per field, fields in sorted order."""
        if "." in key or not key:
            raise ValueError(f"sample key {key!r} must be non-empty and have no dots (WebDataset splits on them)")
        for ext in sorted(fields):
            data = fields[ext]
            self._pending += [self._header(f"{key}.{ext}".encode(), len(data)), data, bytes(-len(data) % BLOCK)]
            self._pending_bytes += BLOCK + len(data) + (-len(data) % BLOCK)
        if self._pending_bytes >= self.FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        data = b"".join(self._pending)
        self.stream.write(data)
        self._digest.update(data)
        self.bytes_written += self._pending_bytes
        self._pending, self._pending_bytes = [], 0

    def close(self) -> None:
        """End the archive: two zero blocks, padded to a whole record."""
        self._flush()
        end = 2 * BLOCK + (-(self.bytes_written + 2 * BLOCK) % RECORD)
        self.stream.write(bytes(end))
        self._digest.update(bytes(end))
        self.bytes_written += end

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the archive written so far (all of it, once closed)."""
        return self._digest.hexdigest()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


def _split_name(name: str) -> tuple[str, str] | tuple[None, None]:
    """``dir/key.ext.more`` -> ``("dir/key", "ext.more")``, as WebDataset splits member names."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name[:dot], name[dot + 1 :].lower()) if dot > slash else (None, None)


def _unsafe(name: str) -> bool:
    # Nothing is ever extracted to disk, but such a name in a shard someone else made says
    # the tar was crafted, and its key would travel into refs and logs.
    return name.startswith("/") or ".." in name.split("/")


def iter_samples(url: str, storage_options: StorageOptions = None) -> Iterator[dict[str, bytes | str]]:
    """Samples of the tar at ``url`` as ``{"__key__": key, ext: bytes, ...}``, in file order.

    A member larger than ``MAX_MEMBER_BYTES`` or with an absolute or ``..`` name is not
    read; its sample gets ``"__problem__"`` saying why (a source reader skips and counts
    it). Raises :class:`ShardError` naming the shard if it is truncated, not a tar, or
    repeats a field within a sample; ``FileNotFoundError`` naming it if it is missing.
    """
    fs, path = filesystem(url, storage_options)
    with storage_errors(url):
        handle = fs.open(path, "rb")
    sample: dict[str, bytes | str] = {}
    with handle:
        try:
            with tarfile.open(fileobj=handle, mode="r|*") as archive:
                for member in archive:
                    key, ext = _split_name(member.name)
                    if not member.isreg() or key is None:
                        continue
                    if sample and sample["__key__"] != key:
                        yield sample
                        sample = {}
                    if ext in sample:
                        raise ShardError(f"{redact(url)}: sample {key!r} has two '{ext}' members; not a WebDataset shard")
                    sample["__key__"] = key
                    if _unsafe(member.name):
                        sample["__problem__"] = f"member {member.name!r} has an absolute or '..' name"
                        continue
                    if member.size > MAX_MEMBER_BYTES:
                        sample["__problem__"] = (f"member {member.name!r} has {member.size} bytes, more than the "
                                                 f"{MAX_MEMBER_BYTES} an image file may have (MAX_MEMBER_BYTES)")
                        continue
                    sample[ext] = archive.extractfile(member).read()
                    if len(sample[ext]) != member.size:
                        raise tarfile.ReadError(f"member {member.name} is cut short")
                # tarfile stops quietly at a cut between members; a complete archive
                # still holds the second of its two zero end blocks.
                if len(archive.fileobj.read(BLOCK)) != BLOCK:
                    raise tarfile.ReadError("no end-of-archive marker")
        except (tarfile.TarError, EOFError, zlib.error) as err:
            raise ShardError(
                f"{redact(url)}: not a readable tar shard ({err}); it is truncated or not a tar file"
            ) from err
    if sample:
        yield sample
