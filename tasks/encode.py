"""Stage 3: encode every shard of the dataset into Zarr code arrays (one mapped task per
shard, each writing its own chunk-aligned rows), then mark the codes complete."""
from __future__ import annotations

from typing import Any

import torch
from prefect import task
from prefect.states import Completed

from storage.codes import create_codes, finish_codes, write_codes
from storage.fsutil import exists, read_json, write_json
from storage.ingest import shard_counts
from storage.loader import iter_shard_batches

from .artifact_task import RETRIES, RETRY_DELAYS, Artifact, artifact_task, unit_task
from .config import PipelineConfig
from .models import load_model
from .reporting import logger
from .training import resolve_device

CODE_VERSION = "1"


def codes_artifact(config: PipelineConfig, dataset: dict[str, Any], autoencoder: dict[str, Any]) -> Artifact:
    return Artifact.of(config.storage.url, "codes", {}, {"dataset": dataset["key"], "autoencoder": autoencoder["key"]},
                       CODE_VERSION, config.storage.storage_options)


def codes_url(artifact: Artifact) -> str:
    return artifact.path("codes.zarr")


def _marker(artifact: Artifact, split: str, index: int) -> str:
    return artifact.path("shards", f"{split}-{index:06d}.json")


def shard_units(dataset: dict[str, Any]) -> list[tuple[str, int]]:
    """(split, shard index) of every shard, the units `encode_shard` is mapped over."""
    return [(split, i) for split, info in sorted(dataset["splits"].items()) for i in range(len(info["shards"]))]


@task(name="prepare-codes", retries=RETRIES, retry_delay_seconds=RETRY_DELAYS)
def prepare_codes(config: PipelineConfig, dataset: dict[str, Any], autoencoder: dict[str, Any]) -> Artifact:
    """Create the (empty) code arrays once, before the per-shard writers; a retry finds them."""
    artifact = codes_artifact(config, dataset, autoencoder)
    if artifact.manifest() is not None:
        return Completed(name="Cached", data=artifact, message=f"codes {artifact.key} are complete")
    create_codes(
        codes_url(artifact), shard_counts(dataset), autoencoder["latent_shapes"],
        class_names=dataset["class_names"], attrs={"dataset": dataset["key"], "autoencoder": autoencoder["key"]},
        storage_options=artifact.storage_options,
    )
    return artifact


def _shard_cache_key(context: Any, parameters: dict[str, Any]) -> str | None:
    artifact: Artifact = parameters["codes"]
    split, index = parameters["unit"]
    if not exists(_marker(artifact, split, index), artifact.storage_options):
        return None
    return f"{artifact.cache_key()}-{split}-{index}"


@unit_task(name="encode-shard", task_run_name="encode-{unit[0]}-{unit[1]}", cache_key_fn=_shard_cache_key)
def encode_shard(config: PipelineConfig, dataset: dict[str, Any], autoencoder: dict[str, Any], codes: Artifact,
                 unit: tuple[str, int]):
    split, index = unit
    marker = _marker(codes, split, index)
    if exists(marker, codes.storage_options):
        return Completed(name="Cached", data=read_json(marker, codes.storage_options), message=f"{split}/{index} encoded")
    device = resolve_device(config.training.device)
    model = load_model(autoencoder, codes.storage_options, device)
    levels: list[list[torch.Tensor]] = []
    labels, keys = [], []
    for images, batch_labels, batch_keys in iter_shard_batches(
        dataset["url"], split, index, config.encode.batch_size, config.storage.storage_options
    ):
        batch_codes = model.encode(images.to(device))
        levels = levels or [[] for _ in batch_codes]
        for store, level_codes in zip(levels, batch_codes):
            store.append(level_codes.cpu())
        labels.append(batch_labels)
        keys += batch_keys
    offset = dataset["splits"][split]["shards"][index]["offset"]
    write_codes(codes_url(codes), split, offset, [torch.cat(level) for level in levels], torch.cat(labels), keys,
                codes.storage_options)
    result = {"split": split, "index": index, "rows": len(keys), "offset": offset}
    write_json(marker, result, codes.storage_options)  # after the rows: the marker means "written"
    return result


def _locate_codes(config: PipelineConfig, dataset: dict[str, Any], autoencoder: dict[str, Any],
                  shard_results: list[dict]) -> Artifact:
    return codes_artifact(config, dataset, autoencoder)


@artifact_task(locate=_locate_codes, name="finalize-codes")
def finalize_codes(config: PipelineConfig, dataset: dict[str, Any], autoencoder: dict[str, Any],
                   shard_results: list[dict], artifact: Artifact) -> dict[str, Any]:
    """Check every row was written, mark the arrays complete, record codebook usage."""
    info = finish_codes(codes_url(artifact), artifact.storage_options)
    rows = {split: v["num_rows"] for split, v in info["splits"].items()}
    logger().info(f"codes complete: {rows} rows per split")
    return {
        "codes": codes_url(artifact),
        "dataset": dataset["key"],
        "autoencoder": autoencoder["key"],
        "level_shapes": info["level_shapes"],
        "rows": rows,
        "codebook_size": autoencoder["codebook_size"],
        "class_names": dataset["class_names"],
    }
