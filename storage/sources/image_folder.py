"""A folder of class folders (optionally under ``train/`` and ``test/``) on any fsspec URL."""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..fsutil import filesystem, find, fingerprint, redact, storage_errors
from .base import Partition, Reader, SourceItem, chunks, content_digest, unit_interval

_FETCH_BATCH = 64  # files requested at once from an object store (s3fs fetches them concurrently)


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
        return content_digest({"kind": self.kind, "files": files})

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
                split = "test" if unit_interval(config.seed, rel) < config.holdout_fraction else "train"
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
            ordered = sorted(split_items, key=lambda item: (unit_interval(config.seed, item[0]), item[0]))
            ordered = ordered[: config.max_samples_per_split or len(ordered)]
            if ordered:
                units[split] = chunks([(rel, index[cls]) for rel, cls in ordered], config.shard_size)
        return Partition(units, class_names, tuple(ignored))

    def open(self) -> _FolderReader:
        return _FolderReader(self)


class _FolderReader(Reader):
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
