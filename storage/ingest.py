"""Ingestion: a source becomes WebDataset shards plus a manifest, one independent shard at a time.

The three steps map onto a Prefect flow (plan once, map the writers, finalize once)::

    plan = plan_ingest(source, IngestConfig(image_size=32, mode="L"))
    results = [write_shard(task, dataset_url) for task in plan.tasks]   # any order, any worker
    manifest = finalize_dataset(plan, results, dataset_url)

or in one call, over a process pool: ``ingest(source, dataset_url, config, processes=2)``.

Layout under ``dataset_url`` (any fsspec URL)::

    {split}/shard-NNNNNN.tar    samples {key}.png (lossless, image_size^2, mode; or .webp/.jpg), {key}.cls, {key}.json
    {split}/shard-NNNNNN.json   the shard's result record, written just before its tar appears
    manifest.json               written last; its presence marks the dataset complete

Every shard is written under a temporary name and moved into place only when complete.
A shard whose tar and record exist from the same task is reused, not rewritten, so an
interrupted ingest resumes. A source that grows (folders, lists, tars) is ingested
incrementally against ``base``, the dataset it made last time: a shard of the base whose
files are all unchanged is copied over, not decoded and encoded again, and only the new
or changed files make new shards (``carried`` and ``base`` in the manifest say so). The
images, labels and splits are those a fresh ingest would make; which shard holds which
image depends on the history. Unreadable images are skipped and named (file and reason)
in the manifest; :func:`finalize_dataset` refuses to mark the dataset complete when
more than ``max_bad_fraction`` of the images failed, and removes what was written for a
dataset it refuses (:class:`RefusedDataset`); any other failure keeps the whole shards.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from .artifacts import MANIFEST, read_manifest, write_manifest
from .fsutil import (
    StorageOptions, atomic_open, exists, filesystem, join, read_json, redact, remove, sha256_file, storage_errors,
    write_json,
)
from .imaging import MODES, RESIZE_MODES, SHARD_FORMATS, ImageError, prepare
from .shards import ShardWriter, iter_samples, sample_key, shard_name, shard_url
from .sources import Source, SourceItem

FORMAT = "vqvae2-shards/1"
MAX_ENLARGEMENT = 4  # an image enlarged more than this to the model's input holds no detail to learn
MAX_CLASSES = 100_000  # labels a source without class names may use (ImageNet-21k has 21,841)


class RefusedDataset(ValueError):
    """The source's images, as they are, make no dataset: too many are unusable, or their
    labels leave classes empty. The same source and settings (the same dataset) would be
    refused the same way, and a fixed source or other settings make another dataset, so
    nothing written for this one is ever reused: :func:`finalize_dataset` removes it."""


class TooManyBadImages(RefusedDataset):
    """More than ``IngestConfig.max_bad_fraction`` of the source's images could not be used."""


class EmptyClasses(RefusedDataset):
    """Labels taken as classes (a source without class names) leave a class without any image."""


@dataclass(frozen=True)
class ShardingOptions:
    """How a source is cut into shards: the user's choices (the pipeline config's `ingest` section).

    Pydantic validates it as a config section (`__pydantic_config__`: unknown fields are
    errors, the comments under the fields are their descriptions), without storage
    importing pydantic. Its errors name a field as the user sets it (`ingest.shard_size`,
    the `--set` key); :class:`IngestConfig`'s, made in code, by its class.
    """

    __pydantic_config__ = {"extra": "forbid", "use_attribute_docstrings": True}
    _FIELDS = "ingest."  # how errors name the fields: a class attribute, not a field

    shard_size: int = 1000
    """Images per WebDataset shard (the unit of mapped work)"""
    max_bad_fraction: float = 0.01
    """Fail if more than this share of the source's images is unreadable"""
    holdout_fraction: float = 0.1
    """Share held out as `test` when the source has no split of its own"""
    seed: int = 0
    """Seeds the held-out selection and the order of image-folder files"""
    max_samples_per_split: int | None = None
    """Keep only the first N images of each split (None: all; the pipeline's presets may choose)"""
    resize: Literal["center-crop", "resize-pad", "keep-ratio"] = "center-crop"
    """How an image becomes a square: center-crop scales the shorter side and crops the longer one;
    resize-pad scales the longer side and pads the shorter one with black, keeping the whole image;
    keep-ratio scales the shorter side and stores the longer one (up to twice as long), and training
    takes a random square of it each epoch (augmentation), encoding and evaluation the centre one"""
    min_size: int = 0
    """Skip (and count as skipped) images whose shorter side has fewer pixels; 0: keep every size, but refuse a
    dataset where more than max_bad_fraction of the images would be enlarged over 4 times to the model's input"""
    image_format: Literal["png", "webp", "jpeg"] = "png"
    """How shards store images: png (lossless); webp or jpeg at `quality`, several times smaller at 256 px and
    above, at the cost of compression artefacts the autoencoder then learns"""
    quality: int = 95
    """webp/jpeg quality, 1 to 100 (webp at 100 is lossless)"""

    def __post_init__(self) -> None:
        self._need(_is_int(self.shard_size) and self.shard_size >= 1, "shard_size", "a positive integer")
        self._need(_is_fraction(self.max_bad_fraction), "max_bad_fraction", "a number in [0, 1)")
        self._need(_is_fraction(self.holdout_fraction), "holdout_fraction", "a number in [0, 1)")
        self._need(_is_int(self.seed), "seed", "an integer")
        self._need(
            self.max_samples_per_split is None or (_is_int(self.max_samples_per_split) and self.max_samples_per_split >= 1),
            "max_samples_per_split",
            "None or a positive integer",
        )
        self._need(self.resize in RESIZE_MODES, "resize", f"one of {', '.join(RESIZE_MODES)}")
        self._need(_is_int(self.min_size) and self.min_size >= 0, "min_size", "an integer >= 0")
        self._need(self.image_format in SHARD_FORMATS, "image_format", f"one of {', '.join(SHARD_FORMATS)}")
        self._need(_is_int(self.quality) and 1 <= self.quality <= 100, "quality", "an integer from 1 to 100")

    def _need(self, ok: bool, name: str, what: str) -> None:
        if not ok:
            raise ValueError(f"{self._FIELDS}{name} must be {what}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class IngestConfig(ShardingOptions):
    """How a source becomes shards. Part of the dataset's content key: change it, get a new dataset."""

    _FIELDS = "IngestConfig."

    image_size: int = 32  # output images are image_size x image_size (shorter side scaled, centre crop)
    mode: str = "L"  # "L" (gray, 1 channel) or "RGB" (3 channels)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._need(_is_int(self.image_size) and self.image_size >= 1, "image_size", "a positive integer")
        self._need(self.mode in MODES, "mode", f"one of {sorted(MODES)}")

    @classmethod
    def of(cls, options: ShardingOptions, *, image_size: int, mode: str) -> IngestConfig:
        return cls(**dataclasses.asdict(options), image_size=image_size, mode=mode)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_fraction(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1


@dataclass(frozen=True)
class ShardTask:
    """One output shard: everything a worker needs to write ``{split}/shard-{index}.tar``."""

    source: Source
    config: IngestConfig
    split: str
    index: int
    unit: Any  # the source's description of the shard's items (row range, file list, tar URL)
    class_names: tuple[str, ...] | None
    carry: str | None = None  # a base dataset's shard with this very unit: copied, not encoded again

    @property
    def name(self) -> str:
        return f"{self.split}/{shard_name(self.index)}"

    def digest(self) -> str:
        """Identity of the work: a finished shard is reused only if it was written by an equal task."""
        payload = [self.source.describe(), self.config.to_dict(), self.split, self.index, self.unit, self.class_names]
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class IngestPlan:
    """The shards to write, known before any is written (so a caller can map over them)."""

    source: Source
    config: IngestConfig
    source_digest: str
    class_names: tuple[str, ...] | None
    tasks: tuple[ShardTask, ...]
    ignored: tuple[tuple[str, str], ...] = ()  # (file, reason) for files that are no sample at all
    base: str | None = None  # the dataset whose shards some tasks carry over

    def num_shards(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for task in self.tasks:
            counts[task.split] = counts.get(task.split, 0) + 1
        return counts


@dataclass(frozen=True)
class ShardResult:
    """What writing one shard produced; JSON-able through :meth:`to_dict`."""

    split: str
    index: int
    num_samples: int
    class_counts: tuple[int, ...]  # samples per label, index = label
    skipped: tuple[tuple[str, str], ...]  # (source ref, reason) of unusable images
    num_bytes: int
    reused: bool = False  # found complete from an earlier run
    carried: bool = False  # copied from the base dataset, not encoded
    sha256: str | None = None  # of the tar as written (None in records written before it was kept)
    undersized: int = 0  # images kept that were enlarged more than MAX_ENLARGEMENT times (`enlarged_past`)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShardResult:
        return cls(
            d["split"], d["index"], d["num_samples"], tuple(d["class_counts"]),
            tuple(tuple(s) for s in d["skipped"]), d["num_bytes"], d.get("reused", False), d.get("carried", False),
            d.get("sha256"), d.get("undersized", 0),
        )  # fmt: skip


def plan_ingest(
    source: Source,
    config: IngestConfig,
    *,
    digest: str | None = None,
    base: str | None = None,
    storage_options: StorageOptions = None,
) -> IngestPlan:
    """List the shards ``source`` becomes under ``config``; fails fast on a missing or malformed source.

    ``digest`` skips recomputing :func:`storage.sources.source_digest` when the caller has it.
    ``base``: the URL of the dataset this source made last time under the same config
    (on ``storage_options``' storage); its shards whose units the source keeps are copied.
    """
    base_units = shard_units(base, storage_options) if base else {}
    partition = source.partition(config, {split: [u for _, u in units] for split, units in base_units.items()} or None)
    carried = {(split, _frozen(unit)): url for split, units in base_units.items() for url, unit in units}
    tasks = tuple(
        ShardTask(source, config, split, index, unit, partition.class_names, carried.get((split, _frozen(unit))))
        for split in sorted(partition.units)
        for index, unit in enumerate(partition.units[split])
    )
    if not tasks:
        raise ValueError(f"{source.describe()}: the source holds no images")
    return IngestPlan(source, config, digest or source.digest(), partition.class_names, tasks, partition.ignored,
                      base if any(t.carry for t in tasks) else None)


def _frozen(unit: Any) -> Any:
    """A unit as a hashable value, whether it came from a source (tuples) or from JSON (lists)."""
    return tuple(_frozen(u) for u in unit) if isinstance(unit, (list, tuple)) else unit


def shard_units(dataset_url: str, storage_options: StorageOptions = None) -> dict[str, list[tuple[str, Any]]]:
    """``{split: [(shard URL, unit), ...]}`` of a complete dataset, from its shard records;
    empty for a dataset that is incomplete or predates recorded units."""
    manifest = read_manifest(dataset_url, storage_options)
    if manifest is None:
        return {}
    fs, root = filesystem(dataset_url, storage_options)
    records = {}
    for split, info in manifest["splits"].items():
        names = [shard["name"][: -len(".tar")] for shard in info["shards"]]
        paths = [f"{root.rstrip('/')}/{name}.json" for name in names]
        with storage_errors(dataset_url):
            blobs = fs.cat(paths, on_error="return")  # one batch: concurrent on an object store
        records[split] = []
        for name, path in zip(names, paths):
            record = json.loads(blobs[path]) if isinstance(blobs.get(path), bytes) else {}
            if "unit" in record:
                records[split].append((join(dataset_url, f"{name}.tar"), record["unit"]))
    return records


def write_shard(task: ShardTask, dataset_url: str, storage_options: StorageOptions = None) -> ShardResult:
    """Write one shard (or reuse it if an earlier run finished it); safe to retry."""
    return write_shards([task], dataset_url, storage_options)[0]


def write_shards(
    tasks: Sequence[ShardTask], dataset_url: str, storage_options: StorageOptions = None
) -> list[ShardResult]:
    """Write several shards of one plan in order, sharing one source reader.

    Consecutive IDX shards then continue one decompression stream instead of each
    re-reading the file from its start.
    """
    if not tasks:
        return []
    with tasks[0].source.open() as reader:
        return [_write(task, reader, dataset_url, storage_options) for task in tasks]


def _record_url(dataset_url: str, task: ShardTask) -> str:
    return shard_url(dataset_url, task.split, task.index)[: -len(".tar")] + ".json"


def finished_shard(task: ShardTask, dataset_url: str, storage_options: StorageOptions = None) -> ShardResult | None:
    """The result of ``task`` if an equal task already wrote its shard (tar and record) and
    the tar still has the size and SHA-256 its record says (a truncated, damaged or replaced
    one is made again), else None. Reading a shard back costs far less than making it."""
    url, record_url = shard_url(dataset_url, task.split, task.index), _record_url(dataset_url, task)
    if not exists(record_url, storage_options):
        return None
    record = read_json(record_url, storage_options)
    if record.get("task") != task.digest():
        return None
    result = ShardResult.from_dict(record["result"])
    fs, path = filesystem(url, storage_options)
    try:
        size = fs.info(path)["size"]
    except FileNotFoundError:
        return None
    if size != result.num_bytes or (result.sha256 is not None and sha256_file(url, storage_options) != result.sha256):
        return None
    return dataclasses.replace(result, reused=True)


def _write(task: ShardTask, reader: Any, dataset_url: str, storage_options: StorageOptions) -> ShardResult:
    done = finished_shard(task, dataset_url, storage_options)
    if done is not None:
        return done
    if task.carry is not None:
        return _carry(task, dataset_url, storage_options)
    url, record_url = shard_url(dataset_url, task.split, task.index), _record_url(dataset_url, task)

    config = task.config
    counts: list[int] = []  # samples per label
    skipped: list[tuple[str, str]] = []
    written = undersized = 0
    with atomic_open(url, storage_options) as f:
        with ShardWriter(f) as writer:
            for item in reader.read(task.split, task.unit):
                problem = _problem(item, task.class_names)
                if problem is None:
                    try:
                        image, size = prepare(item.data, config.image_size, config.mode, config.resize,
                                              config.min_size, config.image_format, config.quality)
                    except ImageError as err:
                        problem = str(err)
                if problem is not None:
                    skipped.append((item.ref, problem))
                    continue
                undersized += enlarged_past(size, config)
                meta = {"source": item.ref, "original_size": list(size)}
                writer.write(
                    sample_key(task.split, task.index, written),
                    {SHARD_FORMATS[config.image_format]: image, "cls": b"%d" % item.label,
                     "json": json.dumps(meta).encode()},
                )
                counts.extend([0] * (item.label + 1 - len(counts)))
                counts[item.label] += 1
                written += 1
        result = ShardResult(task.split, task.index, written, tuple(counts), tuple(skipped), writer.bytes_written,
                             sha256=writer.sha256, undersized=undersized)
        _write_record(record_url, task, result, storage_options)
    return result


def _write_record(record_url: str, task: ShardTask, result: ShardResult, storage_options: StorageOptions) -> None:
    # The record goes first: a visible tar always has one (a record alone means "redo"). Its
    # unit lets a later ingest of the grown source find what this shard already holds.
    write_json(record_url, {"task": task.digest(), "result": result.to_dict(), "unit": task.unit}, storage_options)


def _carry(task: ShardTask, dataset_url: str, storage_options: StorageOptions) -> ShardResult:
    """Copy the base dataset's shard of the same unit (the bytes a fresh encode would write),
    with its record's counts; no image is decoded or encoded. A shard that moved to another
    index (an earlier one of the base was dropped) is re-packed under keys naming its new place."""
    base = ShardResult.from_dict(read_json(task.carry[: -len(".tar")] + ".json", storage_options)["result"])
    url = shard_url(dataset_url, task.split, task.index)
    num_bytes, sha256 = base.num_bytes, base.sha256
    with atomic_open(url, storage_options) as out:
        if base.index == task.index:
            src_fs, src_path = filesystem(task.carry, storage_options)
            with storage_errors(task.carry), src_fs.open(src_path, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 22)
        else:
            with ShardWriter(out) as writer:
                for position, sample in enumerate(iter_samples(task.carry, storage_options)):
                    fields = {ext: data for ext, data in sample.items() if not ext.startswith("__")}
                    writer.write(sample_key(task.split, task.index, position), fields)
            num_bytes, sha256 = writer.bytes_written, writer.sha256
        result = dataclasses.replace(base, split=task.split, index=task.index, num_bytes=num_bytes, sha256=sha256,
                                     carried=True)
        _write_record(_record_url(dataset_url, task), task, result, storage_options)
    return result


def _problem(item: SourceItem, class_names: tuple[str, ...] | None) -> str | None:
    if item.error is not None:
        return item.error
    if class_names == ():  # unlabelled: every image is class 0 in the shards
        return None if item.label == 0 else f"label {item.label} in an unlabelled source"
    if item.label < 0 or (class_names is not None and item.label >= len(class_names)):
        return f"label {item.label} outside the {len(class_names or ())} classes"
    if item.label >= MAX_CLASSES:  # labels without class names: each one would add a count to every record
        return f"label {item.label}, more than {MAX_CLASSES} classes; give the source its class_names"
    return None


def finalize_dataset(
    plan: IngestPlan,
    results: Iterable[ShardResult | Mapping[str, Any]],
    dataset_url: str,
    storage_options: StorageOptions = None,
    *,
    write: bool = True,
) -> dict[str, Any]:
    """Check every shard exists, enforce ``max_bad_fraction``, write ``manifest.json`` last; return it.

    ``write=False`` only returns it, for a caller that completes the dataset with a manifest
    of its own (the pipeline's, with more fields): two writes would leave, if the process
    died between them, a complete dataset with the lesser manifest."""
    by_shard = {}
    for r in results:
        r = r if isinstance(r, ShardResult) else ShardResult.from_dict(r)
        by_shard[(r.split, r.index)] = r
    missing = [t.name for t in plan.tasks if (t.split, t.index) not in by_shard]
    if missing:
        raise ValueError(f"{redact(dataset_url)}: no result for shards {missing[:5]} (of {len(missing)}); write them first")
    ordered = [by_shard[(t.split, t.index)] for t in plan.tasks]
    with _removed_if_refused(dataset_url, storage_options):
        _check_bad_fraction(plan, ordered, dataset_url)
        _check_enlargement(plan, ordered, dataset_url)
        _check_shards_exist(ordered, dataset_url, storage_options)
        if plan.class_names is None:  # classes from the labels seen: they must run 0, 1, ... without a gap
            _check_no_empty_classes(ordered, dataset_url, storage_options)

    if plan.class_names == ():  # unlabelled: no class names, no counts per class
        num_classes, class_names = 0, []
    else:
        num_classes = max([len(plan.class_names or ())] + [len(r.class_counts) for r in ordered])
        class_names = list(plan.class_names or (str(i) for i in range(num_classes)))
    splits: dict[str, Any] = {}
    for r in ordered:
        split = splits.setdefault(r.split, {"num_samples": 0, "class_counts": [0] * num_classes, "shards": [], "skipped": []})
        split["shards"].append({"name": f"{r.split}/{shard_name(r.index)}", "num_samples": r.num_samples, "offset": split["num_samples"]})
        split["num_samples"] += r.num_samples
        for label, n in enumerate(r.class_counts[:num_classes]):
            split["class_counts"][label] += n
        split["skipped"] += [{"ref": ref, "reason": reason} for ref, reason in r.skipped]
    manifest = {
        "format": FORMAT,
        "source": plan.source.describe(),
        "source_digest": plan.source_digest,
        "config": plan.config.to_dict(),
        "image_size": plan.config.image_size,
        "mode": plan.config.mode,
        "channels": MODES[plan.config.mode],
        "class_names": class_names,
        "num_samples": sum(s["num_samples"] for s in splits.values()),
        "num_skipped": sum(len(s["skipped"]) for s in splits.values()),
        "carried": sum(r.num_samples for r in ordered if r.carried),  # copied from `base`, not encoded
        "base": redact(plan.base) if plan.base else None,
        "splits": splits,
        "ignored": [{"ref": ref, "reason": reason} for ref, reason in plan.ignored],
    }
    if write:
        write_manifest(dataset_url, manifest, storage_options)
    return manifest


@contextlib.contextmanager
def _removed_if_refused(dataset_url: str, storage_options: StorageOptions) -> Iterator[None]:
    """Remove the dataset's folder (shards, records, Prefect's records of them) when its
    images are refused (:class:`RefusedDataset`): it would only be refused again, and a
    folder without a manifest left behind looks like an ingest to resume. Any other failure
    (a network error, a full disk) keeps every whole shard for the next run to reuse."""
    try:
        yield
    except RefusedDataset:
        try:
            if exists(dataset_url, storage_options):
                remove(dataset_url, storage_options)
        except OSError:  # the refusal is what the user must see; the stage's tidying sweeps the folder later
            pass
        raise


def _check_bad_fraction(plan: IngestPlan, results: Sequence[ShardResult], dataset_url: str) -> None:
    bad = [s for r in results for s in r.skipped]
    total = len(bad) + sum(r.num_samples for r in results)
    if total and len(bad) <= plan.config.max_bad_fraction * total:
        return
    examples = "; ".join(f"{ref}: {reason}" for ref, reason in bad[:5])
    raise TooManyBadImages(
        f"{redact(dataset_url)}: {len(bad)} of {total} images could not be used, more than "
        f"ingest.max_bad_fraction={plan.config.max_bad_fraction}; fix or remove them, or raise "
        f"max_bad_fraction. First ones: {examples or 'none (the source is empty)'}"
    )


def enlarged_past(size: tuple[int, int], config: IngestConfig) -> bool:
    """Whether an image of `size` (width, height) is enlarged more than MAX_ENLARGEMENT times
    to fit the model, and `ingest.min_size` left it to the default rule (0)."""
    return not config.min_size and min(size) * MAX_ENLARGEMENT < config.image_size


def _check_enlargement(plan: IngestPlan, results: Sequence[ShardResult], dataset_url: str) -> None:
    """Fail when more than `max_bad_fraction` of the images kept are far smaller than the
    model's input: enlarged past MAX_ENLARGEMENT times they hold only blur, which every stage
    would then learn (five 1x1 images trained a whole pipeline before this). A few such
    images among many, as ImageNet has, are kept."""
    undersized = sum(r.undersized for r in results)
    total = sum(r.num_samples for r in results)
    if undersized <= plan.config.max_bad_fraction * total:
        return
    smallest = -(-plan.config.image_size // MAX_ENLARGEMENT)
    raise TooManyBadImages(
        f"{redact(dataset_url)}: {undersized} of {total} images have a shorter side under {smallest} pixels, and the "
        f"model's {plan.config.image_size}-pixel input would enlarge them more than {MAX_ENLARGEMENT} times, into "
        f"blur: give larger images, or skip these with ingest.min_size={smallest}; up to ingest.max_bad_fraction="
        f"{plan.config.max_bad_fraction} of the images may be this small"
    )


def _check_no_empty_classes(results: Sequence[ShardResult], dataset_url: str, storage_options: StorageOptions) -> None:
    """Fail, naming the samples with the labels past the first gap, when labels taken as
    classes (a source without class names) leave a class between 0 and the largest without
    any image: label 9 in a set of 0, 1 and 2 would make ten classes, six of them empty, and
    a model that trains, samples and reports on classes that do not exist."""
    totals: list[int] = []
    for r in results:
        totals.extend([0] * (len(r.class_counts) - len(totals)))
        for label, n in enumerate(r.class_counts):
            totals[label] += n
    empty = [label for label, n in enumerate(totals) if n == 0]
    if not empty:
        return
    beyond = {label for label, n in enumerate(totals) if n and label > empty[0]}
    samples = _samples_labelled(beyond, results, dataset_url, storage_options)
    shown = ", ".join(f"{ref} (label {label})" for ref, label in samples[:5])
    more = sum(totals[label] for label in beyond) - len(samples[:5])
    raise EmptyClasses(
        f"{redact(dataset_url)}: the labels seen leave {len(empty)} of {len(totals)} classes (0 to {len(totals) - 1}) "
        f"without any image: {_ranges(empty)}. Samples labelled above class {empty[0]}: {shown}" + (f" and {more} more" if more else "")
        + ". Give the source its class names (source.class_names) to declare the classes, which allows empty "
        "ones, or fix these labels"
    )


def _samples_labelled(labels: set[int], results: Sequence[ShardResult], dataset_url: str,
                      storage_options: StorageOptions, limit: int = 5) -> list[tuple[str, int]]:
    """``(source ref, label)`` of the first ``limit`` samples with one of ``labels``, read back
    from the shards that hold them (an error path: the shards' records count, not name, them)."""
    found: list[tuple[str, int]] = []
    for r in results:
        if not any(label < len(r.class_counts) and r.class_counts[label] for label in labels):
            continue
        for sample in iter_samples(shard_url(dataset_url, r.split, r.index), storage_options):
            label = int(sample["cls"])
            if label in labels:
                found.append((json.loads(sample["json"])["source"], label))
                if len(found) == limit:
                    return found
    return found


def _ranges(labels: Sequence[int]) -> str:
    """``3-8, 11`` for ``[3, 4, 5, 6, 7, 8, 11]``."""
    runs: list[list[int]] = []
    for label in labels:
        if runs and label == runs[-1][-1] + 1:
            runs[-1].append(label)
        else:
            runs.append([label])
    return ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)


def _check_shards_exist(results: Sequence[ShardResult], dataset_url: str, storage_options: StorageOptions) -> None:
    for split in sorted({r.split for r in results}):
        fs, path = filesystem(join(dataset_url, split), storage_options)
        fs.invalidate_cache(path)  # the shards were written by other processes
        with storage_errors(join(dataset_url, split)):
            present = {name.rsplit("/", 1)[-1] for name in fs.ls(path, detail=False)}
        lost = [shard_name(r.index) for r in results if r.split == split and shard_name(r.index) not in present]
        if lost:
            raise FileNotFoundError(f"{redact(join(dataset_url, split))}: shards {lost[:5]} are missing; write them again")


def shard_counts(manifest: Mapping[str, Any]) -> dict[str, list[int]]:
    """``{split: [samples per shard]}`` of a dataset manifest (what :func:`storage.codes.create_codes` takes)."""
    return {split: [s["num_samples"] for s in info["shards"]] for split, info in manifest["splits"].items()}


def ingest(
    source: Source,
    dataset_url: str,
    config: IngestConfig,
    *,
    processes: int = 1,
    storage_options: StorageOptions = None,
    base: str | None = None,
) -> dict[str, Any]:
    """Plan, write every shard (over ``processes`` worker processes), finalize; return the manifest.

    A dataset whose manifest exists is complete and returned as is. ``base``: the dataset
    the source made before it grew, whose unchanged shards are copied (see the module doc).
    """
    done = read_manifest(dataset_url, storage_options)
    if done is not None:
        return done
    plan = plan_ingest(source, config, base=base, storage_options=storage_options)
    tasks = list(plan.tasks)
    if processes <= 1:
        results = write_shards(tasks, dataset_url, storage_options)
    else:
        # Contiguous groups keep each worker's IDX reads sequential. Spawned, not forked:
        # a fork would inherit the parent's s3fs event loop and connection pool.
        size = -(-len(tasks) // processes)
        groups = [tasks[i : i + size] for i in range(0, len(tasks), size)]
        with ProcessPoolExecutor(len(groups), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(write_shards, group, dataset_url, storage_options) for group in groups]
            results = [r for f in futures for r in f.result()]
    return finalize_dataset(plan, results, dataset_url, storage_options)


__all__ = [
    "FORMAT", "MANIFEST", "EmptyClasses", "IngestConfig", "IngestPlan", "RefusedDataset", "ShardResult", "ShardTask",
    "ShardingOptions", "TooManyBadImages", "finalize_dataset", "finished_shard", "ingest", "plan_ingest",
    "shard_counts", "write_shard", "write_shards",
]  # fmt: skip
