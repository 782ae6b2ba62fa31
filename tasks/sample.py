"""Stage 5: sample images from the priors (hierarchical ancestral sampling), in mapped
batches, and score each with the judge classifier.

Labels cycle through the classes, so every class gets its share; each batch draws
with its own seed (`sample.seed + batch index`), so batches are reproducible and
independent of how they are spread over workers.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from prefect import task
from prefect.states import Completed

import vqvae2
from storage.fsutil import exists, write_bytes

from .arrays import load_npz, save_npz
from .artifact_task import RETRIES, RETRY_DELAYS, Artifact, artifact_task
from .config import PipelineConfig
from .models import load_model
from .reporting import image_grid, logger, png_bytes
from .training import resolve_device

CODE_VERSION = "1"


def samples_artifact(config: PipelineConfig, autoencoder: dict[str, Any], priors: list[dict[str, Any]],
                     judge: dict[str, Any] | None) -> Artifact:
    section = {"sample": config.sample.model_dump(), "num_samples": config.num_samples}
    inputs = {"autoencoder": autoencoder["key"], "priors": ",".join(p["key"] for p in priors),
              "judge": judge["key"] if judge else ""}
    return Artifact.of(config.storage.url, "samples", section, inputs, CODE_VERSION, config.storage.storage_options)


def batch_sizes(config: PipelineConfig) -> list[int]:
    full, rest = divmod(config.num_samples, config.sample.batch_size)
    return [config.sample.batch_size] * full + ([rest] if rest else [])


def _batch_url(samples: Artifact, index: int) -> str:
    return samples.path("batches", f"batch-{index:05d}.npz")


def _batch_cache_key(context: Any, parameters: dict[str, Any]) -> str | None:
    samples: Artifact = parameters["samples"]
    if not exists(_batch_url(samples, parameters["index"]), samples.storage_options):
        return None
    return f"{samples.cache_key()}-{parameters['index']}"


@torch.no_grad()
def judge_scores(judge: vqvae2.ResNetClassifier | None, images: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """The judge's probability of each image's intended class (NaN without a judge or labels)."""
    if judge is None or (labels < 0).any():
        return np.full(len(images), np.nan, dtype=np.float32)
    probs = torch.softmax(judge(images).float(), dim=1)
    return probs.gather(1, labels.unsqueeze(1)).squeeze(1).cpu().numpy()


@task(name="sample-batch", task_run_name="sample-batch-{index}", cache_key_fn=_batch_cache_key, persist_result=True,
      retries=RETRIES, retry_delay_seconds=RETRY_DELAYS)
def sample_batch(config: PipelineConfig, autoencoder: dict[str, Any], priors: list[dict[str, Any]],
                 judge: dict[str, Any] | None, samples: Artifact, index: int) -> dict[str, Any]:
    url = _batch_url(samples, index)
    if exists(url, samples.storage_options):
        return Completed(name="Cached", data={"index": index, "url": url}, message=f"batch {index} exists")
    options, device = samples.storage_options, resolve_device(config.training.device)
    model = load_model(autoencoder, options, device)
    prior_models = [load_model(p, options, device) for p in priors]
    judge_model = load_model(judge, options, device) if judge else None
    size = batch_sizes(config)[index]
    first = index * config.sample.batch_size
    num_classes = config.model.num_classes
    labels = (torch.arange(first, first + size, device=device) % num_classes) if num_classes else None
    images, codes = vqvae2.sample_images(
        model, prior_models, size, labels=labels, temperature=config.sample.temperature, top_k=config.sample.top_k,
        seed=config.sample.seed + index,
    )
    labels = labels if labels is not None else torch.full((size,), -1, device=device)
    save_npz(
        url, options,
        images=(images * 255).round().to(torch.uint8).cpu().numpy(),
        labels=labels.cpu().numpy(),
        judge_scores=judge_scores(judge_model, images, labels),
        **{f"codes{level}": c.cpu().numpy().astype(np.int16) for level, c in enumerate(codes)},
    )  # fmt: skip
    return {"index": index, "url": url, "images": size}


def load_samples(manifest: dict[str, Any], storage_options: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """All sample batches of a samples manifest, concatenated."""
    parts = [load_npz(url, storage_options) for url in manifest["batches"]]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def _locate_samples(config: PipelineConfig, autoencoder: dict[str, Any], priors: list[dict[str, Any]],
                    judge: dict[str, Any] | None, batches: list[dict[str, Any]]) -> Artifact:
    return samples_artifact(config, autoencoder, priors, judge)


@artifact_task(locate=_locate_samples, name="finalize-samples")
def finalize_samples(config: PipelineConfig, autoencoder: dict[str, Any], priors: list[dict[str, Any]],
                     judge: dict[str, Any] | None, batches: list[dict[str, Any]], artifact: Artifact) -> dict[str, Any]:
    manifest = {"batches": [b["url"] for b in sorted(batches, key=lambda b: b["index"])]}
    data = load_samples(manifest, artifact.storage_options)
    grid = image_grid(torch.from_numpy(data["images"][: config.evaluate.grid_size]).float() / 255)
    write_bytes(artifact.path("grid.png"), png_bytes(grid), artifact.storage_options)
    scores = data["judge_scores"]
    summary = {
        "num_samples": int(len(data["images"])),
        "grid": artifact.path("grid.png"),
        "judge_mean_confidence": float(np.nanmean(scores)) if np.isfinite(scores).any() else None,
        "temperature": config.sample.temperature,
        "top_k": config.sample.top_k,
        "seed": config.sample.seed,
    }
    logger().info(f"sampled {summary['num_samples']} images; judge confidence {summary['judge_mean_confidence']}")
    return {**manifest, **summary}
