"""What every source shares: the item and partition types, the protocol, stable hashing."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np


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


def content_digest(payload: Any) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def unit_interval(seed: int, name: str) -> float:
    """A stable pseudo-random number in [0, 1) per (seed, name): decides held-out items and order."""
    h = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def chunks(items: Sequence[Any], size: int) -> list[Any]:
    return [tuple(items[i : i + size]) for i in range(0, len(items), size)]


class Reader:
    """Base reader: a context manager holding what a worker opens once for many shards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass
