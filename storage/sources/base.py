"""What every source shares: the item and partition types, the protocol, stable hashing,
and how long a web server may keep a source waiting."""
from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol

import numpy as np

from ..fsutil import redact


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
    class_names: tuple[str, ...] | None  # None: taken from the labels seen (tar sources); (): unlabelled
    ignored: tuple[tuple[str, str], ...] = ()  # (ref, reason): files that are no sample at all


class Source(Protocol):
    """What :func:`storage.ingest.plan_ingest` needs from a source.

    ``partition(config, base)``: ``base`` is ``{split: [unit, ...]}`` of the dataset the
    same source made last time (or None). A source whose units are lists of
    :class:`FileItem` (it can grow) keeps every base unit whose files are all still
    there unchanged, with the same labels, and puts only the other files in new units
    (:func:`grow_units`); other sources ignore it.

    ``check()`` fails fast, naming the URL, when the source is missing or its server does
    not answer (a look at its top, not a listing of all of it): what a run checks before
    it starts.
    """

    kind: ClassVar[str]

    def check(self) -> None: ...
    def describe(self) -> dict[str, Any]: ...
    def digest(self) -> str: ...
    def partition(self, config: Any, base: Mapping[str, Sequence[Any]] | None = None) -> Partition: ...
    def open(self) -> Any: ...


class FileItem(NamedTuple):
    """One file of a source whose units are file lists: where it is (relative to the
    source or a full URL), its label (0 when unlabelled), and its size plus content tag
    or modification time (:func:`storage.fsutil.fingerprint`), so a changed file is a new item."""

    ref: str
    label: int
    fingerprint: str


def grow_units(items: Sequence[FileItem], shard_size: int, base: Sequence[Any] | None = None) -> list[tuple[FileItem, ...]]:
    """Cut one split's ``items`` (in order) into units of ``shard_size``, first keeping, in
    their order, the ``base`` units whose items are all among ``items``: their shards are then
    carried over, not encoded again, and only the rest (new or changed files, and the
    files of base units that lost one) is cut into new units after them."""
    present = set(items)
    kept = []
    for unit in base or ():
        unit = tuple(FileItem(*item) for item in unit)  # JSON gives lists back
        if unit and all(item in present for item in unit):
            kept.append(unit)
    taken = {item for unit in kept for item in unit}
    return kept + chunks([item for item in items if item not in taken], shard_size)


def source_digest(source: Source) -> str:
    """Content fingerprint of ``source``: same for an unchanged source, new when it changes or grows."""
    return source.digest()


def content_digest(payload: Any) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def unit_interval(seed: int, name: str) -> float:
    """A stable pseudo-random number in [0, 1) per (seed, name): decides held-out items and order."""
    h = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def chunks(items: Sequence[Any], size: int) -> list[Any]:
    return [tuple(items[i : i + size]) for i in range(0, len(items), size)]


def is_http(url: str) -> bool:
    return str(url).lower().startswith(("http://", "https://"))


def http_options(url: str, options: Mapping[str, Any] | None, timeout_s: float | None) -> Mapping[str, Any] | None:
    """``options`` for reading ``url``, with a timeout when it is http(s): aiohttp, under
    fsspec's HTTP filesystem, waits 300 s for a server that never answers. The timeout
    bounds each wait (to connect, then between two pieces of a reply), not a whole
    transfer, so a large file that keeps coming is not cut off."""
    if timeout_s is None or not is_http(url):
        return options
    import aiohttp  # fsspec's HTTP filesystem needs it anyway

    timeout = aiohttp.ClientTimeout(total=None, connect=timeout_s, sock_connect=timeout_s, sock_read=timeout_s)
    options = dict(options or {})
    options["client_kwargs"] = {**options.get("client_kwargs", {}), "timeout": timeout}
    return options


def timeout_of(options: Mapping[str, Any] | None) -> float | None:
    """The timeout :func:`http_options` put into ``options``, if any."""
    timeout = (options or {}).get("client_kwargs", {}).get("timeout")
    return getattr(timeout, "sock_read", None)


@contextlib.contextmanager
def answering(url: str, timeout_s: float | None) -> Iterator[None]:
    """A server that did not answer in time, named (fsspec's own timeout error says nothing)."""
    try:
        yield
    except TimeoutError as err:  # fsspec's FSTimeoutError, aiohttp's socket timeouts
        if not is_http(url):
            raise
        within = f"within {timeout_s:g} s " if timeout_s else ""
        raise TimeoutError(f"{redact(url)}: no answer {within}(source.timeout_s); check that the server is up and "
                           "reachable from here, or raise source.timeout_s") from err


class Reader:
    """Base reader: a context manager holding what a worker opens once for many shards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass
