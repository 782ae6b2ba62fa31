"""Existing WebDataset-style tars (brace patterns, globs, per-split lists) as a source, img2dataset's output included.

img2dataset (``output_format="webdataset"``) writes ``00000.tar``, ``00001.tar``, ... each
holding per sample ``{key}.jpg`` (or ``.png`` / ``.webp``), ``{key}.txt`` (the caption) and
``{key}.json`` (url, key, status, caption, sizes, exif, sha256 and any extra input columns),
with ``00000.parquet`` and ``00000_stats.json`` beside the tars; a pattern such as
``{url}/*.tar`` selects the tars only. Each tar becomes one output shard. Units are
``(tar URL, fingerprint)`` pairs, so a grown set of tars re-encodes only its new or changed tars.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import braceexpand

from ..fsutil import expand_urls, filesystem, fingerprint, redact, storage_errors
from ..shards import iter_samples
from .base import Partition, Reader, SourceItem, answering, content_digest, timeout_of, unit_interval

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm", "tif", "tiff", "gif")
JSON_LABEL = "json:"  # label="json:FIELD": the label is FIELD of each sample's .json member
_DIGITS = re.compile(r"[0-9]+")

Tar = tuple[str, str]  # (tar URL, storage.fsutil.fingerprint of it): one unit


@dataclass(frozen=True)
class TarSource:
    """Existing WebDataset-style tars: each becomes one output shard.

    ``urls`` is a pattern or list of patterns (brace ``{000..099}`` and glob ``*``
    forms, any fsspec URL), or ``{"train": patterns, "test": patterns}``. Without
    explicit splits, a stable hash of each tar's name (and the config's seed) holds
    ``holdout_fraction`` of the tars out for ``test``, at least one (so at least two
    tars are needed); a tar of the previous dataset (``base``) keeps its split.

    A sample's image is its first member with an image extension. ``label`` says where
    its class comes from: ``"cls"`` (the ``.cls`` member, class 0 if absent), ``"json:FIELD"``
    (FIELD of the ``.json`` member: an integer, a digit string, or one of ``class_names``)
    or ``None`` (unlabelled: every image is class 0, ``.json`` and ``.txt`` are not read).
    A sample whose label cannot be read is skipped and named, never a crash.
    """

    urls: str | Sequence[str] | Mapping[str, str | Sequence[str]]
    class_names: tuple[str, ...] | None = None  # None: names "0", "1", ... of the labels seen
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)
    label: str | None = "cls"
    kind: ClassVar[str] = "tar"

    def __post_init__(self) -> None:
        if not (self.label in (None, "cls") or _json_field(self.label)):
            raise ValueError(
                f"TarSource.label must be 'cls' (the .cls member), 'json:FIELD' (FIELD of each sample's .json, "
                f"e.g. 'json:label') or None (unlabelled), got {self.label!r}"
            )
        if self.class_names is None:
            return
        names = tuple(self.class_names)  # JSON gives a list back
        object.__setattr__(self, "class_names", names)
        if self.label is None:
            raise ValueError("TarSource.class_names needs a label: an unlabelled source (label=None) has no classes")
        if not names or len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
            raise ValueError(
                f"TarSource.class_names must be distinct strings, or None to name the labels seen, got {names!r}; "
                "an unlabelled source is label=None"
            )

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "urls": self._patterns(), "class_names": self.class_names, "label": self.label}

    def _patterns(self) -> dict[str, list[str]] | list[str]:
        def listed(p):
            return [redact(p)] if isinstance(p, str) else [redact(u) for u in p]

        if isinstance(self.urls, Mapping):
            return {split: listed(p) for split, p in self.urls.items()}
        return listed(self.urls)

    def check(self) -> None:
        """The first tar of each pattern exists (a glob matches one) and its first sample reads
        as a tar's (a gzip file or a page of HTML posing as one is refused now, a few KiB read,
        not after Prefect has started): the rest is listed and read at planning."""
        patterns = self.urls.values() if isinstance(self.urls, Mapping) else [self.urls]
        for p in patterns:
            for pattern in [p] if isinstance(p, str) else p:
                first = next(iter(braceexpand.braceexpand(pattern)))
                with answering(first, timeout_of(self.storage_options)):
                    url = expand_urls(first, self.storage_options)[0]
                    next(iter_samples(url, self.storage_options), None)

    def expand(self) -> dict[str, list[str]] | list[str]:
        """The tar URLs, per split when given per split."""
        if isinstance(self.urls, Mapping):
            return {split: expand_urls(p, self.storage_options) for split, p in self.urls.items()}
        return expand_urls(self.urls, self.storage_options)

    def listing(self) -> dict[str, list[Tar]] | list[Tar]:
        """``(tar URL, fingerprint)`` of every tar, per split when given per split, as the store holds them now."""
        self._forget_listings()
        expanded = self.expand()
        if isinstance(expanded, dict):
            return {split: self._fingerprinted(urls) for split, urls in expanded.items()}
        return self._fingerprinted(expanded)

    def _forget_listings(self) -> None:
        # s3fs answers globs and info() from listings it cached earlier in this process, so
        # a tar added or rewritten since would be missed or keep its old fingerprint.
        patterns = self.urls.values() if isinstance(self.urls, Mapping) else [self.urls]
        for p in patterns:
            for pattern in [p] if isinstance(p, str) else p:
                filesystem(pattern, self.storage_options)[0].invalidate_cache()

    def _fingerprinted(self, urls: Sequence[str]) -> list[Tar]:
        tars = []
        for url in urls:
            fs, path = filesystem(url, self.storage_options)
            with storage_errors(url):
                tars.append((url, fingerprint(fs.info(path))))
        return tars

    def digest(self) -> str:
        listed = self.listing()
        tars = [t for ts in listed.values() for t in ts] if isinstance(listed, dict) else listed
        return content_digest({
            "kind": self.kind, "label": self.label, "class_names": self.class_names, "layout": self._patterns(),
            "tars": [(redact(url), print_) for url, print_ in tars],
        })  # fmt: skip

    def partition(self, config: Any, base: Mapping[str, Sequence[Any]] | None = None) -> Partition:
        """One unit per tar; ``base``'s units still present (same URL and fingerprint) come first in each split, in
        its order, so their shards keep their index and only new or changed tars are encoded again."""
        if config.max_samples_per_split is not None:
            raise ValueError(
                "ingest.max_samples_per_split cannot apply to tar sources (their sample counts are "
                "unknown until read); select fewer tars with a brace pattern instead"
            )
        listed = self.listing()
        if isinstance(listed, dict):
            splits = listed
        elif config.holdout_fraction == 0:
            splits = {"train": listed}
        elif len(listed) < 2:
            raise ValueError(
                f"{self._patterns()}: a held-out test split needs at least two tars; "
                "pass urls={'train': ..., 'test': ...} or set ingest.holdout_fraction=0"
            )
        else:
            splits = _hold_out(listed, config, base or {})
        units = {split: _base_first(tars, (base or {}).get(split, ())) for split, tars in splits.items() if tars}
        return Partition(units, () if self.label is None else self.class_names)

    def open(self) -> _TarReader:
        return _TarReader(self)


def _json_field(label: Any) -> str | None:
    """FIELD of a ``"json:FIELD"`` label, else None."""
    if isinstance(label, str) and label.startswith(JSON_LABEL) and len(label) > len(JSON_LABEL):
        return label[len(JSON_LABEL) :]
    return None


def _name(url: str) -> str:
    return url.rsplit("/", 1)[-1]


def _as_tar(unit: Any) -> Tar | None:
    """A unit of a base dataset (JSON gives lists back) as a pair; None for one of another form."""
    if isinstance(unit, (list, tuple)) and len(unit) == 2 and all(isinstance(x, str) for x in unit):
        return (unit[0], unit[1])
    return None


def _hold_out(tars: Sequence[Tar], config: Any, base: Mapping[str, Sequence[Any]]) -> dict[str, list[Tar]]:
    """Whole tars for ``test``, decided per tar name (not by rank), so tars that arrive later move none."""
    earlier = {t[0]: split for split in ("train", "test") for t in map(_as_tar, base.get(split, ())) if t}
    rank = {url: unit_interval(config.seed, _name(url)) for url, _ in tars}
    fresh = {url: "test" if r < config.holdout_fraction else "train" for url, r in rank.items()}
    split_of = {url: earlier.get(url, fresh[url]) for url, _ in tars}
    # A few tars may all fall on one side of the threshold; both splits must hold one.
    ranked = sorted(split_of, key=lambda url: (rank[url], url))
    if "test" not in split_of.values():
        split_of[ranked[0]] = "test"
    if "train" not in split_of.values():
        split_of[ranked[-1]] = "train"
    return {split: [t for t in tars if split_of[t[0]] == split] for split in ("train", "test")}


def _base_first(tars: Sequence[Tar], base: Sequence[Any]) -> list[Tar]:
    present = set(tars)
    kept = list(dict.fromkeys(t for t in map(_as_tar, base) if t in present))
    taken = set(kept)
    return kept + [t for t in tars if t not in taken]


class _LabelError(ValueError):
    """Why a sample has no usable label; becomes the reason it is skipped."""


class _TarReader(Reader):
    def __init__(self, source: TarSource):
        self.storage_options = source.storage_options
        self.label = source.label
        self.class_names = source.class_names

    def read(self, split: str, unit: str | Sequence[str]) -> Iterator[SourceItem]:
        url = unit if isinstance(unit, str) else unit[0]  # a bare URL: a plan made before units had fingerprints
        for sample in iter_samples(url, self.storage_options):
            ref = f"{redact(url)}#{sample['__key__']}"
            if "__problem__" in sample:
                yield SourceItem(ref, 0, None, str(sample["__problem__"]))
                continue
            image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
            if image is None:
                fields = sorted(k for k in sample if not k.startswith("__"))
                yield SourceItem(ref, 0, None, f"no image member (has: {', '.join(fields)})")
                continue
            try:
                label = self._label(sample)
            except _LabelError as err:
                yield SourceItem(ref, -1, None, str(err))
                continue
            yield SourceItem(ref, label, image)

    def _label(self, sample: Mapping[str, Any]) -> int:
        if self.label is None:
            return 0
        if self.label == "cls":
            try:
                return int(sample.get("cls", b"0"))
            except ValueError:
                raise _LabelError(f"cls {sample['cls'][:20]!r} is not an integer label") from None
        key, name = sample["__key__"], _json_field(self.label)
        if "json" not in sample:
            raise _LabelError(f"sample {key}: no .json member to read the label field {name!r} from")
        try:
            meta = json.loads(sample["json"])
        except ValueError as err:  # UnicodeDecodeError included
            raise _LabelError(f"sample {key}: its .json does not parse ({err})") from None
        if not isinstance(meta, dict) or name not in meta:
            raise _LabelError(f"sample {key}: its .json has no label field {name!r}")
        return _class_index(meta[name], self.class_names, f"sample {key}: .json field {name!r}")


def _class_index(value: Any, class_names: tuple[str, ...] | None, what: str) -> int:
    """A label value of a .json as a class index: a name of ``class_names`` (looked up first), an int or digits."""
    if isinstance(value, str) and class_names and value in class_names:
        return class_names.index(value)
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        index = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        index = value
    else:
        hint = "a class index or one of class_names" if class_names else "a class index (set class_names for names)"
        raise _LabelError(f"{what} is {_short(value)}, not {hint}")
    if index < 0 or (class_names is not None and index >= len(class_names)):
        classes = f"the {len(class_names)} class_names" if class_names else "class indices (0 or more)"
        raise _LabelError(f"{what} is {_short(value)}, outside {classes}")
    return index


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
