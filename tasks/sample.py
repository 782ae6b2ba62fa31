"""Stage 5: sample candidate images from the priors (hierarchical ancestral sampling) in
mapped batches, score each with the judge classifier, and select, for every acceptance
rate, the candidates classifier-based rejection keeps (Razavi et al. 2019, Sec. 4.1).

Candidate i is sampled for class i mod C, so every class gets its share, and the first
m candidates of a class are the first m it got. At rate r the stage takes the first
`candidates_needed(k, r)` candidates of each class and keeps the r share the judge is
most confident in: exactly k per class at every rate, so the rates compare on equal
sample counts. Each batch draws with its own seed (`sample.seed + batch index`): batches
are reproducible whichever worker draws them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from prefect.states import Completed

import vqvae2
from storage.fsutil import exists, write_bytes

from .arrays import load_npz, save_npz
from .artifact_task import Artifact, artifact_task, unit_task
from .config import PipelineConfig
from .models import load_model
from .reporting import display_scale, image_grid, logger, png_bytes
from .training import resolve_device

CODE_VERSION = "1"


def samples_artifact(config: PipelineConfig, autoencoder: dict[str, Any], priors: list[dict[str, Any]],
                     judge: dict[str, Any] | None) -> Artifact:
    section = {"sample": config.sample.model_dump(), "num_samples": config.num_samples}
    inputs = {"autoencoder": autoencoder["key"], "priors": ",".join(p["key"] for p in priors),
              "judge": judge["key"] if judge else ""}
    return Artifact.of(config.storage.url, "samples", section, inputs, CODE_VERSION, config.storage.storage_options)


@dataclass(frozen=True)
class SamplingPlan:
    """How many candidates to draw, and which of them each acceptance rate keeps."""

    num_classes: int  # 0: unlabelled data, no rejection
    keep_per_class: int
    rates: tuple[float, ...]

    @classmethod
    def of(cls, config: PipelineConfig) -> SamplingPlan:
        classes = config.model.num_classes
        if not classes:
            return cls(0, config.num_samples, (1.0,))
        return cls(classes, math.ceil(config.num_samples / classes), tuple(config.sample.acceptance_rates))

    @property
    def candidates(self) -> int:
        if not self.num_classes:
            return self.keep_per_class
        return self.num_classes * vqvae2.candidates_needed(self.keep_per_class, min(self.rates))

    def labels(self, first: int, count: int) -> np.ndarray:
        """Intended classes of candidates first..first+count (-1 without classes)."""
        index = np.arange(first, first + count)
        return index % self.num_classes if self.num_classes else np.full(count, -1)

    def pool(self, rate: float) -> np.ndarray:
        """Indices of the candidates rejection at `rate` chooses from: the first ones of each class."""
        if not self.num_classes:
            return np.arange(self.candidates)
        per_class = vqvae2.candidates_needed(self.keep_per_class, rate)
        return np.flatnonzero(np.arange(self.candidates) // self.num_classes < per_class)

    def kept(self, scores: np.ndarray, labels: np.ndarray, rate: float) -> np.ndarray:
        """Indices of the candidates rejection at `rate` keeps: `keep_per_class` per class."""
        pool = self.pool(rate)
        if not self.num_classes:
            return pool
        return pool[vqvae2.accept_mask(torch.from_numpy(scores[pool]), torch.from_numpy(labels[pool]), rate).numpy()]


def batch_sizes(config: PipelineConfig) -> list[int]:
    full, rest = divmod(SamplingPlan.of(config).candidates, config.sample.batch_size)
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


@unit_task(name="sample-batch", task_run_name="sample-batch-{index}", cache_key_fn=_batch_cache_key)
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
    labels = torch.from_numpy(SamplingPlan.of(config).labels(index * config.sample.batch_size, size)).to(device)
    images, codes = vqvae2.sample_images(
        model, prior_models, size, labels=labels if config.model.num_classes else None,
        temperature=config.sample.temperature, top_k=config.sample.top_k, seed=config.sample.seed + index,
    )
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
    """Select the kept candidates of every acceptance rate; grids of samples and of rejection."""
    options, plan = artifact.storage_options, SamplingPlan.of(config)
    manifest: dict[str, Any] = {"batches": [b["url"] for b in sorted(batches, key=lambda b: b["index"])]}
    data = load_samples(manifest, options)
    scores, labels = data["judge_scores"], data["labels"]
    kept = {rate: plan.kept(scores, labels, rate) for rate in plan.rates}
    save_npz(artifact.path("selections.npz"), options, **{rate_key(rate): idx for rate, idx in kept.items()})
    rows = []
    for rate, idx in kept.items():
        rejected = np.setdiff1d(plan.pool(rate), idx)
        rows.append({"rate": rate, "candidates": int(len(plan.pool(rate))), "kept": int(len(idx)),
                     "judge_confidence_kept": _mean(scores[idx]), "judge_confidence_rejected": _mean(scores[rejected])})
    scale = display_scale(config.model.image_size)
    grid = image_grid(torch.from_numpy(data["images"][kept[1.0][: config.evaluate.grid_size]]).float() / 255)
    write_bytes(artifact.path("grid.png"), png_bytes(grid, scale), options)
    if plan.num_classes and len(plan.rates) > 1:
        rejection = rejection_grid(data["images"], scores, labels, plan)
        write_bytes(artifact.path("rejection.png"), png_bytes(rejection, scale), options)
    logger().info(f"{len(scores)} candidates; kept per rate: " +
                  ", ".join(f"{r['rate']}: {r['kept']} (judge {r['judge_confidence_kept']})" for r in rows))
    return {
        **manifest,
        "candidates": int(len(scores)),
        "selections": artifact.path("selections.npz"),
        "rates": rows,
        "grid": artifact.path("grid.png"),
        "rejection_grid": artifact.path("rejection.png") if plan.num_classes and len(plan.rates) > 1 else None,
        "judge_mean_confidence": _mean(scores),
        "temperature": config.sample.temperature,
        "top_k": config.sample.top_k,
        "seed": config.sample.seed,
        "num_samples": int(len(kept[1.0])),
    }


def rate_key(rate: float) -> str:
    return f"rate_{rate:g}"


def _mean(values: np.ndarray) -> float | None:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()) if len(values) and np.isfinite(values).all() else None


def rejection_grid(images: np.ndarray, scores: np.ndarray, labels: np.ndarray, plan: SamplingPlan,
                   per_side: int = 6) -> np.ndarray:
    """One row per class: its `per_side` candidates the judge likes most (left) and least (right)."""
    rows = []
    for label in range(plan.num_classes):
        mine = np.flatnonzero(labels == label)
        order = mine[np.argsort(-scores[mine], kind="stable")]
        picks = np.concatenate([order[:per_side], order[::-1][:per_side][::-1]])
        rows.append(images[picks])
    grid = torch.from_numpy(np.concatenate(rows)).float() / 255
    return image_grid(grid, columns=2 * per_side)
