"""Stage 1: the source becomes WebDataset shards (one mapped task per shard) and a manifest.

The dataset's key digests the source's content and the ingest settings: an unchanged
source maps to the same dataset (every later stage is then `Cached`), a changed or
grown one to a new key (every later stage recomputes).
"""
from __future__ import annotations

import dataclasses
from functools import cached_property
from typing import Any

from prefect import unmapped

from storage.ingest import IngestConfig, IngestPlan, ShardResult, ShardTask, finalize_dataset, finished_shard, plan_ingest
from storage.ingest import write_shard as write_shard_files
from storage.sources import Source

from ..config import PipelineConfig, Runtime
from ..manifests import DatasetManifest
from ..runtime.artifacts import Artifact, Marker
from ..runtime.cached import cached_unit, with_records
from ..runtime.reporting import logger, publish_table, track
from ..stage import SOURCE, Settings, Stage, stage_task


class IngestSettings(Settings):
    config: IngestConfig  # image size and mode from the model, sharding from the `ingest` section

    @classmethod
    def of(cls, config: PipelineConfig, variant: Any = None) -> IngestSettings:
        model, options = config.model, config.ingest
        limit = config.preset_default("max_samples_per_split", options.max_samples_per_split)
        return cls(config=IngestConfig.of(dataclasses.replace(options, max_samples_per_split=limit),
                                          image_size=model.image_size, mode="L" if model.image_channels == 1 else "RGB"))


def run(settings: IngestSettings, runtime: Runtime, source: Source) -> DatasetManifest:
    records = runtime.root, runtime.storage_options
    plan = with_records(plan_dataset, *records)(settings, runtime, source)
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
    and nothing is read back: without Prefect's record, planning again costs what
    reading a plan back would."""

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


@cached_unit(locate=_PlanMarker, name="plan-dataset", result_serializer="pickle")
def plan_dataset(settings: IngestSettings, runtime: Runtime, source: Source) -> IngestPlan:
    """List the shards to write; fails fast, naming the URL, on a missing or malformed source."""
    plan = _without_credentials(plan_ingest(source, settings.config))
    counts = ", ".join(f"{split}: {n}" for split, n in plan.num_shards().items())
    dataset = STAGE.artifact(settings, {"source": plan.source_digest}, runtime)
    logger().info(f"source {source.describe()} (digest {plan.source_digest[:12]}): {len(plan.tasks)} shards "
                  f"({counts}) -> {dataset.url}")
    return plan


def _shard_marker(shard: ShardTask, digest: str, source: Source, settings: IngestSettings,
                  runtime: Runtime) -> Marker[ShardResult]:
    dataset = STAGE.artifact(settings, {"source": digest}, runtime)
    return Marker(url=dataset.path(shard.name), record=dataset.record(f"shard-{shard.split}-{shard.index:06d}"),
                  read=lambda: finished_shard(shard, dataset.url, runtime.storage_options))


@cached_unit(locate=_shard_marker, name="ingest-shard", task_run_name="ingest-{shard.split}-{shard.index}")
def write_shard(shard: ShardTask, digest: str, source: Source, settings: IngestSettings, runtime: Runtime) -> ShardResult:
    """Write one shard of the dataset of `source`, whose content digest is `digest`."""
    dataset = STAGE.artifact(settings, {"source": digest}, runtime)
    result = write_shard_files(dataclasses.replace(shard, source=source), dataset.url, runtime.storage_options)
    if result.skipped:
        logger().warning(f"{shard.name}: skipped {len(result.skipped)} unreadable images: {list(result.skipped)[:3]}")
    return result


@stage_task(STAGE, name="finalize-dataset")
def finalize(settings: IngestSettings, runtime: Runtime, source: str, plan: IngestPlan, shards: list[ShardResult],
             artifact: Artifact) -> DatasetManifest:
    """Check the shards, enforce the bad-image budget, write the dataset manifest last."""
    written = finalize_dataset(plan, shards, artifact.url, artifact.storage_options)
    manifest = DatasetManifest(**written, **artifact.identity())
    rows = [
        {"split": split, "images": info.num_samples, "shards": len(info.shards), "skipped": len(info.skipped),
         **{name: n for name, n in zip(manifest.class_names, info.class_counts)}}
        for split, info in manifest.splits.items()
    ]  # fmt: skip
    publish_table("dataset", rows, f"dataset {artifact.key}: images per split and class")
    return manifest


def check_classes(dataset: DatasetManifest, config: PipelineConfig) -> None:
    """The model's classes are the data's: a class-conditional model of another number of
    classes than the dataset holds fails here, after ingest and before any training, rather
    than mid-training (a label out of range) or, worse, by sampling classes that do not exist."""
    expected, found = config.model.num_classes, len(dataset.class_names)
    if expected and expected != found:
        names = ", ".join(dataset.class_names[:12]) + (", ..." if found > 12 else "")
        raise ValueError(
            f"the dataset has {found} classes ({names}) but the model has num_classes={expected} (preset "
            f"{config.preset!r}): set the override num_classes to {found} (--set num_classes={found}), or 0 for "
            f"unconditional priors, or use a source with {expected} classes"
        )
