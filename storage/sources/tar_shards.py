"""Existing WebDataset-style tars (brace patterns, globs, per-split lists) as a source."""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..fsutil import expand_urls, filesystem, fingerprint, redact, storage_errors
from ..shards import iter_samples
from .base import Partition, Reader, SourceItem, content_digest, unit_interval

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm", "tif", "tiff", "gif")


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
        return content_digest({"kind": self.kind, "class_names": self.class_names, "layout": self._patterns(), "tars": prints})

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
        ranked = sorted(expanded, key=lambda u: (unit_interval(config.seed, u.rsplit("/", 1)[-1]), u))
        held = set(ranked[: max(1, round(len(ranked) * config.holdout_fraction))])
        return Partition(
            {"train": [u for u in expanded if u not in held], "test": [u for u in expanded if u in held]},
            self.class_names,
        )

    def open(self) -> _TarReader:
        return _TarReader(self)


class _TarReader(Reader):
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
