"""Stage 1: the source becomes WebDataset shards (one mapped task per shard) and a manifest.

`plan_dataset` always runs: it digests the source, so an unchanged source maps to the
same dataset key (every later stage is then `Cached`) and a changed or grown one to a
new key (every later stage recomputes).
"""
from __future__ import annotations

from typing import Any

from prefect import task
from prefect.states import Completed

from storage.ingest import IngestPlan, ShardTask, finalize_dataset, plan_ingest, write_shard

from .artifact_task import RETRIES, RETRY_DELAYS, Artifact, artifact_task, unit_task
from .config import PipelineConfig
from .reporting import logger, publish_table

CODE_VERSION = "1"


def dataset_artifact(config: PipelineConfig, source_digest: str) -> Artifact:
    return Artifact.of(
        config.storage.url, "datasets", config.ingest_config().to_dict(), {"source": source_digest}, CODE_VERSION,
        config.storage.storage_options,
    )


@task(name="plan-dataset", retries=RETRIES, retry_delay_seconds=RETRY_DELAYS)
def plan_dataset(config: PipelineConfig):
    """List the shards to write; fails fast, naming the URL, on a missing or malformed source.

    It always runs (it digests the source); it ends `Cached` when the dataset that
    digest names is already complete, i.e. the source did not change."""
    source = config.build_source()
    plan = plan_ingest(source, config.ingest_config())
    dataset = dataset_artifact(config, plan.source_digest)
    if dataset.manifest() is not None:
        return Completed(name="Cached", data=plan, message=f"source unchanged: dataset {dataset.key} is complete")
    counts = ", ".join(f"{split}: {n}" for split, n in plan.num_shards().items())
    logger().info(
        f"source {source.describe()} (digest {plan.source_digest[:12]}): {len(plan.tasks)} shards ({counts}) "
        f"-> {dataset.url}"
    )
    return plan


def _shard_cache_key(context: Any, parameters: dict[str, Any]) -> str | None:
    dataset: Artifact = parameters["dataset"]
    if dataset.manifest() is None:
        return None
    return f"{dataset.cache_key()}-{parameters['shard'].name.replace('/', '-')}"


@unit_task(name="ingest-shard", task_run_name="ingest-{shard.split}-{shard.index}", cache_key_fn=_shard_cache_key)
def ingest_shard(shard: ShardTask, dataset: Artifact):
    """Write one shard (or find it written by an earlier, equal task)."""
    result = write_shard(shard, dataset.url, dataset.storage_options)
    if result.reused:
        return Completed(name="Cached", data=result.to_dict(), message=f"{shard.name} exists")
    if result.skipped:
        logger().warning(f"{shard.name}: skipped {len(result.skipped)} unreadable images: {list(result.skipped)[:3]}")
    return result.to_dict()


def _locate_dataset(plan: IngestPlan, shard_results: list[dict], config: PipelineConfig) -> Artifact:
    return dataset_artifact(config, plan.source_digest)


@artifact_task(locate=_locate_dataset, name="finalize-dataset")
def finalize(plan: IngestPlan, shard_results: list[dict], config: PipelineConfig, artifact: Artifact) -> dict[str, Any]:
    """Check the shards, enforce the bad-image budget, write the dataset manifest last."""
    manifest = finalize_dataset(plan, shard_results, artifact.url, artifact.storage_options)
    rows = [
        {"split": split, "images": info["num_samples"], "shards": len(info["shards"]), "skipped": len(info["skipped"]),
         **{name: n for name, n in zip(manifest["class_names"], info["class_counts"])}}
        for split, info in manifest["splits"].items()
    ]  # fmt: skip
    publish_table("dataset", rows, f"dataset {artifact.key}: images per split and class")
    return manifest
