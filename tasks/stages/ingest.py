"""Stage 1: the source becomes WebDataset shards (one mapped task per shard) and a manifest.

The dataset's key digests the source's content and the ingest settings: an unchanged
source maps to the same dataset (every later stage is then `Cached`), a changed or
grown one to a new key (every later stage recomputes). A grown one is ingested
incrementally: `{root}/datasets/source-<id>.json` names the last dataset this source made under
these settings, and its shards whose files are unchanged are copied, not encoded again.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from functools import cached_property
from typing import Any

import torch
from prefect import unmapped

from storage.artifacts import artifact_url
from storage.fsutil import exists, join, read_json, redact, write_json
from storage.ingest import IngestConfig, IngestPlan, ShardResult, ShardTask, finalize_dataset, finished_shard, plan_ingest
from storage.ingest import write_shard as write_shard_files
from storage.loader import ShardDataset, iter_shard_batches, shard_loader
from storage.shards import shard_name, shard_unit
from storage.sources import Source

from ..config import PipelineConfig, Runtime
from ..setting_forms import Setting
from ..manifests import Manifest, Record, RootURL
from ..machinery.artifacts import Artifact, Marker
from ..machinery.cached import cached_unit, with_records
from ..machinery.failures import SettingError
from ..machinery.reporting import logger, publish_table, track
from ..machinery.training_state import BatchSource, private_generator
from ..stage import SOURCE, Settings, Stage, stage_task


class Skipped(Record):
    ref: str
    reason: str


class ShardInfo(Record):
    name: str
    num_samples: int
    offset: int  # rows of the split before this shard


class SplitInfo(Record):
    num_samples: int
    class_counts: list[int]
    shards: list[ShardInfo]
    skipped: list[Skipped]


_SPLIT_WORDS = {"train": "training", "test": "held-out (test)"}


class DatasetManifest(Manifest):
    format: str
    source: dict[str, Any]  # the source as its describe() tells it (credentials redacted)
    source_digest: str
    config: dict[str, Any]  # the storage.ingest.IngestConfig it was made with
    image_size: int
    mode: str
    channels: int
    class_names: list[str]
    num_samples: int
    num_skipped: int
    splits: dict[str, SplitInfo]
    ignored: list[Skipped]
    carried: int = 0  # images copied in shards of `base`, the dataset the source made before it grew
    base: RootURL | None = None

    @property
    def labelled(self) -> bool:
        return bool(self.class_names)

    def shard_counts(self) -> dict[str, list[int]]:
        """{split: [samples per shard]}, what storage.codes.create_codes takes."""
        return {split: [s.num_samples for s in info.shards] for split, info in self.splits.items()}

    def shard_units(self) -> list[tuple[str, int]]:
        """(split, shard index) of every shard, in a stable order."""
        return [(split, i) for split, info in sorted(self.splits.items()) for i in range(len(info.shards))]

    # Its readers: what the stages that take a dataset read of it.

    def require_images(self, needed_by: str, *, train: int = 0, test: int = 0) -> None:
        """Fail, saying what is needed, when the train or the held-out (test) split holds fewer
        images than `needed_by` takes: a stage's check, once the ingest made the dataset and
        before any training (a one-image folder crashed the autoencoder with KeyError: 'test')."""
        have = {split: self.splits[split].num_samples if split in self.splits else 0 for split in ("train", "test")}
        need = {"train": train, "test": test}
        if all(have[split] >= n for split, n in need.items()):
            return
        wanted = " and ".join(f"{n} {_SPLIT_WORDS[split]}" for split, n in need.items() if n) + " images"
        held_out = "" if have["test"] >= test else (
            f", or hold more of them out (a source without splits of its own holds out ingest.holdout_fraction="
            f"{self.config.get('holdout_fraction')} of its images)")
        raise ValueError(f"{redact(self.url)}: {have['train']} {_SPLIT_WORDS['train']} and {have['test']} "
                         f"{_SPLIT_WORDS['test']} images; {needed_by} needs at least {wanted}: give the source more "
                         f"images{held_out}")

    def require_held_out(self, classes: Sequence[int]) -> None:
        """Fail when a class chosen to draw (`sample.classes`) has no held-out image: its samples
        could not be measured against its own images."""
        held_out = self.splits["test"].class_counts
        missing = [self.class_names[c] for c in classes if c >= len(held_out) or not held_out[c]]
        if missing:
            raise ValueError(f"sample.classes: {', '.join(map(repr, missing))} has no held-out (test) image in "
                             f"{redact(self.url)}, so its samples cannot be measured against its own images: "
                             "give the source test images of it, or draw other classes")

    def first_images(self, split: str, count: int,
                     storage_options: dict[str, Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `count` images (floats in [0, 1]) and labels of `split`, in file order:
        the same images every time, for validation and evaluation."""
        images, labels, have = [], [], 0
        for index in range(len(self.splits[split].shards)):
            for batch_images, batch_labels, _ in iter_shard_batches(self.url, split, index, 256, storage_options):
                images.append(batch_images)
                labels.append(batch_labels)
                have += len(batch_images)
                if have >= count:
                    return torch.cat(images)[:count], torch.cat(labels)[:count]
        return torch.cat(images), torch.cat(labels)

    def train_batches(self, batch_size: int, seed: int, num_workers: int, runtime: Runtime) -> tuple[BatchSource, int]:
        """(batch source for a `TrainingJob`, batches per epoch) over the train split's shards.
        `num_workers` changes the batch order (the shard readers interleave); the decoded-image
        cache (`training.decoded_cache_mb`) does not."""
        shards = ShardDataset(self.url, "train", batch_size=batch_size, seed=seed,
                              storage_options=runtime.storage_options,
                              decoded_cache_bytes=runtime.training.decoded_cache_mb * 2**20)

        def batches(epoch: int, start: int):
            shards.set_epoch(epoch, start)
            return shard_loader(shards, num_workers=num_workers, generator=private_generator(seed, epoch))

        return batches, len(shards)


class IngestSettings(Settings):
    config: IngestConfig  # image size and mode from the model, sharding from the `ingest` section

    @classmethod
    def of(cls, config: PipelineConfig, variant: Any = None) -> IngestSettings:
        model, options = config.model, config.ingest
        limit = options.max_samples_per_split
        if limit is None and config.source.resolved_kind != "tars":  # a tar's count is unknown until it is read
            limit = config.preset_default("max_samples_per_split", None)
        return cls(config=IngestConfig.of(dataclasses.replace(options, max_samples_per_split=limit),
                                          image_size=model.image_size, mode="L" if model.image_channels == 1 else "RGB"))


def run(settings: IngestSettings, runtime: Runtime, source: Source) -> DatasetManifest:
    records = runtime.root, runtime.storage_options
    plan = plan_dataset(settings, runtime, source)  # pickled: kept by the worker, not under the root
    # Cached only when whole: a dataset with a shard gone is reopened before its shards are
    # looked at (they are then checked against their records, and the missing ones written).
    STAGE.artifact(settings, {"source": plan.source_digest}, runtime).read_whole(DatasetManifest)
    written = with_records(write_shard, *records).map(plan.tasks, unmapped(plan.source_digest), unmapped(source),
                                                      unmapped(settings), unmapped(runtime))
    shards = track(written, "ingest: shards written")
    return with_records(finalize, *records)(settings, runtime, plan.source_digest, plan, shards)


STAGE = Stage(
    name="ingest", directory="datasets", code_version="1", settings=IngestSettings, output=DatasetManifest,
    inputs={"source": SOURCE}, run=run, summary="Shard the source into WebDataset tars (mapped per shard).",
)


class _PlanMarker:
    """Planning is done when the dataset this source's content names is complete. The
    source's digest (hashing or listing all of it) is taken only when the key needs it,
    and nothing is read back: without Prefect's record (a pickle, kept by the worker, never
    under the root), planning again costs what reading a plan back would."""

    def __init__(self, settings: IngestSettings, runtime: Runtime, source: Source) -> None:
        self.settings, self.runtime, self.source = settings, runtime, source

    @cached_property
    def dataset(self) -> Artifact:
        return STAGE.artifact(self.settings, {"source": self.source.digest()}, self.runtime)

    @property
    def url(self) -> str:
        return self.dataset.url

    @property
    def record(self) -> str:
        return self.dataset.record("plan")

    def read(self) -> None:
        return None

    def write(self, plan: IngestPlan) -> None:
        return None

    def is_done(self) -> bool:
        return self.dataset.read(DatasetManifest) is not None


def _without_credentials(plan: IngestPlan) -> IngestPlan:
    """The plan as Prefect keeps it under the root: the source without its storage options
    (they may hold credentials); each shard's writer gets them back from the flow."""
    bare = dataclasses.replace(plan.source, storage_options=None)
    return dataclasses.replace(plan, source=bare, tasks=tuple(dataclasses.replace(t, source=bare) for t in plan.tasks))


@cached_unit(locate=_PlanMarker, name="plan-dataset", pickled=True)
def plan_dataset(settings: IngestSettings, runtime: Runtime, source: Source) -> IngestPlan:
    """List the shards to write; fails fast, naming the URL, on a missing or malformed source."""
    digest = source.digest()
    dataset = STAGE.artifact(settings, {"source": digest}, runtime)
    base = previous_dataset(settings, runtime, source, dataset.key)
    plan = plan_ingest(source, settings.config, digest=digest, base=base, storage_options=runtime.storage_options)
    plan = _without_credentials(plan)
    counts = ", ".join(f"{split}: {n}" for split, n in plan.num_shards().items())
    carried = sum(1 for task in plan.tasks if task.carry)
    grown = f"; {carried} shards carried over from {plan.base}" if plan.base else ""
    logger().info(f"source {source.describe()} (digest {digest[:12]}): {len(plan.tasks)} shards "
                  f"({counts}) -> {dataset.url}{grown}")
    return plan


def lineage_url(settings: IngestSettings, runtime: Runtime, source: Source) -> str:
    """Where the last dataset this source (by its description, not its content) made under
    `settings` is named: what a grown source is ingested against."""
    identity = STAGE.described_key(settings, {"source": source})
    return join(runtime.root, STAGE.directory, f"source-{identity}.json")  # a file beside the datasets: none of them


def previous_dataset(settings: IngestSettings, runtime: Runtime, source: Source, key: str) -> str | None:
    """The URL of the complete dataset this source made last time, if it is not `key` itself."""
    url = lineage_url(settings, runtime, source)
    if not exists(url, runtime.storage_options):
        return None
    previous = read_json(url, runtime.storage_options).get("dataset")
    if not previous or previous == key:
        return None
    return artifact_url(runtime.root, STAGE.directory, previous)


def _shard_marker(shard: ShardTask, digest: str, source: Source, settings: IngestSettings,
                  runtime: Runtime) -> Marker[ShardResult]:
    dataset = STAGE.artifact(settings, {"source": digest}, runtime)
    read = functools.partial(finished_shard, shard, dataset.url, runtime.storage_options)
    # A complete dataset is trusted whole (its manifest is written last): reading every shard
    # back to check its digest is for resuming an unfinished one, never for a cached re-run.
    return Marker(url=dataset.path(shard.name), record=dataset.record(shard_unit(shard.split, shard.index)),
                  read=read, done=lambda: dataset.is_complete() or read() is not None)


@cached_unit(locate=_shard_marker, name="ingest-shard", task_run_name="ingest-{shard.split}-{shard.index}")
def write_shard(shard: ShardTask, digest: str, source: Source, settings: IngestSettings, runtime: Runtime) -> ShardResult:
    """Write one shard of the dataset of `source`, whose content digest is `digest`."""
    dataset = STAGE.artifact(settings, {"source": digest}, runtime)
    result = write_shard_files(dataclasses.replace(shard, source=source), dataset.url, runtime.storage_options)
    if result.skipped:
        logger().warning(f"{shard.name}: skipped {len(result.skipped)} unreadable images: {list(result.skipped)[:3]}")
    return result


def _shard_digests(params: dict[str, Any]) -> dict[str, tuple[int, str]]:
    """The shards' sizes and SHA-256 as their writers recorded them: not read again for the inventory."""
    return {f"{r.split}/{shard_name(r.index)}": (r.num_bytes, r.sha256) for r in params["shards"] if r.sha256}


@stage_task(STAGE, name="finalize-dataset", known_files=_shard_digests)
def finalize(settings: IngestSettings, runtime: Runtime, source: str, plan: IngestPlan, shards: list[ShardResult],
             artifact: Artifact) -> DatasetManifest:
    """Check the shards, enforce the bad-image budget, write the dataset manifest last."""
    # Not written here: the stage's marker writes the manifest, with its identity, once.
    written = finalize_dataset(plan, shards, artifact.url, artifact.storage_options, write=False)
    manifest = DatasetManifest(**written, **artifact.identity())
    write_json(lineage_url(settings, runtime, plan.source), {"dataset": artifact.key,
                                                             "source_digest": plan.source_digest},
               artifact.storage_options)
    new = manifest.num_samples - manifest.carried
    logger().info(f"dataset {artifact.key}: {manifest.num_samples} images, {new} new"
                  + (f", {manifest.carried} carried over from {manifest.base}" if manifest.base else ""))
    rows = [
        {"split": split, "images": info.num_samples, "shards": len(info.shards), "skipped": len(info.skipped),
         **{name: n for name, n in zip(manifest.class_names, info.class_counts)}}
        for split, info in manifest.splits.items()
    ]  # fmt: skip
    publish_table("dataset", rows, f"dataset {artifact.key}: images per split and class")
    return manifest


def with_dataset_classes(config: PipelineConfig, dataset: DatasetManifest) -> PipelineConfig:
    """The config whose model has the dataset's classes (0, an unconditional model, for
    unlabelled data or a single class), and one log line saying which. Unless num_classes
    is a number, the model takes them: left unset, the config stays as it is when the
    preset has that number (Fashion-MNIST's runs keep their keys) and takes the dataset's
    otherwise; `auto` always writes it in. A number of classes the dataset does not have
    fails here, after ingest and before any training, rather than mid-training (a label out
    of range) or, worse, by sampling classes that do not exist."""
    found = len(dataset.class_names)
    adopted = found if found >= 2 else 0
    labels = f"the dataset has {found} class{'es' if found > 1 else ''}" if found else "the dataset has no labels"
    if config.classes_fixed:
        _check_fixed_classes(dataset, config)
        logger().info(f"num_classes: {config.model.num_classes}, as set ({labels})")
        return config
    if config.classes_from_data:
        logger().info(f"num_classes auto: {adopted} ({labels})")
        return config.with_classes(adopted)
    preset = config.model.num_classes
    if adopted == preset:
        logger().info(f"num_classes: {adopted}, the dataset's and the preset's ({labels})")
        return config
    logger().info(f"num_classes: {adopted}, the dataset's ({labels}; the preset {config.preset!r} has {preset})")
    return config.with_classes(adopted)


def _check_fixed_classes(dataset: DatasetManifest, config: PipelineConfig) -> None:
    """A fixed number of classes the dataset does not have: say what to set (in the advice,
    in the form of where the user is: `--set num_classes=3` or the run's parameters)."""
    found, expected = len(dataset.class_names), config.model.num_classes
    if expected and not found:
        raise SettingError(
            f"the dataset has no labels (source {dataset.source}) but the model has num_classes={expected} (preset "
            f"{config.preset!r}): leave the override num_classes unset, or set it to 0 or auto, for unconditional "
            "priors, or give the source labels (source.labels)",
            Setting("num_classes", 0),
        )
    if expected and expected != found:
        names = ", ".join(dataset.class_names[:12]) + (", ..." if found > 12 else "")
        raise SettingError(
            f"the dataset has {found} classes ({names}) but the model has num_classes={expected} (preset "
            f"{config.preset!r}): set the override num_classes to {found} or auto, or 0 for unconditional priors, "
            f"or use a source with {expected} classes",
            Setting("num_classes", found),
        )
