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
from prefect import unmapped

import vqvae2
from storage.fsutil import write_bytes

from ..config import PipelineConfig, Runtime
from ..manifests import AutoencoderManifest, ClassifierManifest, PriorManifest, RateRow, SampleBatch, SamplesManifest
from ..runtime.arrays import save_npz
from ..runtime.artifacts import Artifact, Marker
from ..runtime.cached import cached_unit, with_records
from ..runtime.devices import resolve_device
from ..runtime.models import load_model
from ..runtime.reporting import display_scale, image_grid, logger, png_bytes, track
from ..runtime.samples import load_samples, rate_key
from ..stage import Needs, Settings, Stage, stage_task


class SampleSettings(Settings):
    num_samples: int  # kept per acceptance rate, spread evenly over the classes
    acceptance_rates: list[float]
    temperature: float
    top_k: int | None
    dtype: str  # the priors' precision while sampling
    batch_size: int  # each batch draws with its own seed: part of what is drawn
    seed: int
    num_classes: int
    grid_size: int  # images in grid.png
    image_size: int  # how much the grids are enlarged

    @classmethod
    def of(cls, config: PipelineConfig, variant: Any = None) -> SampleSettings:
        sample = config.sample
        return cls(num_samples=config.num_samples, acceptance_rates=sample.acceptance_rates,
                   temperature=sample.temperature, top_k=sample.top_k, dtype=sample.dtype,
                   batch_size=config.sample_batch_size,
                   seed=sample.seed, num_classes=config.model.num_classes, grid_size=config.evaluate.grid_size,
                   image_size=config.model.image_size)


def run(settings: SampleSettings, runtime: Runtime, autoencoder: AutoencoderManifest, priors: list[PriorManifest],
        judge: ClassifierManifest | None) -> SamplesManifest:
    records = runtime.root, runtime.storage_options
    batches = with_records(sample_batch, *records).map(
        range(len(batch_sizes(settings))), unmapped(settings), unmapped(runtime), unmapped(autoencoder),
        unmapped(priors), unmapped(judge),
    )
    return with_records(finalize_samples, *records)(settings, runtime, autoencoder, priors, judge,
                                                    track(batches, "sample: batches drawn"))


STAGE = Stage(
    name="sample", directory="samples", code_version="1", settings=SampleSettings, output=SamplesManifest,
    inputs={"autoencoder": Needs("train-autoencoder"), "priors": Needs("train-priors"),
            "judge": Needs("train-classifiers", variant="judge", optional=True)},
    run=run, summary="Sample images from the trained priors (mapped per batch), with classifier-based rejection.",
)


@dataclass(frozen=True)
class SamplingPlan:
    """How many candidates to draw, and which of them each acceptance rate keeps."""

    num_classes: int  # 0: unlabelled data, no rejection
    keep_per_class: int
    rates: tuple[float, ...]

    @classmethod
    def of(cls, settings: SampleSettings) -> SamplingPlan:
        classes = settings.num_classes
        if not classes:
            return cls(0, settings.num_samples, (1.0,))
        return cls(classes, math.ceil(settings.num_samples / classes), tuple(settings.acceptance_rates))

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


def batch_sizes(settings: SampleSettings) -> list[int]:
    full, rest = divmod(SamplingPlan.of(settings).candidates, settings.batch_size)
    return [settings.batch_size] * full + ([rest] if rest else [])


def _samples(settings: SampleSettings, runtime: Runtime, autoencoder: AutoencoderManifest,
             priors: list[PriorManifest], judge: ClassifierManifest | None) -> Artifact:
    return STAGE.artifact(settings, {"autoencoder": autoencoder, "priors": priors, "judge": judge}, runtime)


def _batch_marker(index: int, settings: SampleSettings, runtime: Runtime, autoencoder: AutoencoderManifest,
                  priors: list[PriorManifest], judge: ClassifierManifest | None) -> Marker[SampleBatch]:
    return _samples(settings, runtime, autoencoder, priors, judge).unit_marker(f"batch-{index:05d}", SampleBatch)


@torch.no_grad()
def judge_scores(judge: vqvae2.ResNetClassifier | None, images: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """The judge's probability of each image's intended class (NaN without a judge or labels)."""
    if judge is None or (labels < 0).any():
        return np.full(len(images), np.nan, dtype=np.float32)
    probs = torch.softmax(judge(images).float(), dim=1)
    return probs.gather(1, labels.unsqueeze(1)).squeeze(1).cpu().numpy()


@cached_unit(locate=_batch_marker, name="sample-batch", task_run_name="sample-batch-{index}")
def sample_batch(index: int, settings: SampleSettings, runtime: Runtime, autoencoder: AutoencoderManifest,
                 priors: list[PriorManifest], judge: ClassifierManifest | None) -> SampleBatch:
    """Draw batch `index` of the candidates with its own seed, and let the judge score them."""
    samples = _samples(settings, runtime, autoencoder, priors, judge)
    options, device = runtime.storage_options, resolve_device(runtime.training.device)
    model = load_model(autoencoder, options, device)
    prior_models = [load_model(p, options, device) for p in priors]
    judge_model = load_model(judge, options, device) if judge else None
    size = batch_sizes(settings)[index]
    labels = torch.from_numpy(SamplingPlan.of(settings).labels(index * settings.batch_size, size)).to(device)
    images, codes = vqvae2.sample_images(
        model, prior_models, size, labels=labels if settings.num_classes else None,
        temperature=settings.temperature, top_k=settings.top_k, seed=settings.seed + index,
        dtype=torch.bfloat16 if settings.dtype == "bf16" else None,
    )
    url = samples.path("batches", f"batch-{index:05d}.npz")
    save_npz(
        url, options,
        images=(images * 255).round().to(torch.uint8).cpu().numpy(),
        labels=labels.cpu().numpy(),
        judge_scores=judge_scores(judge_model, images, labels),
        **{f"codes{level}": c.cpu().numpy().astype(np.int16) for level, c in enumerate(codes)},
    )  # fmt: skip
    return SampleBatch(index=index, url=url, images=size)


@stage_task(STAGE, name="finalize-samples")
def finalize_samples(settings: SampleSettings, runtime: Runtime, autoencoder: AutoencoderManifest,
                     priors: list[PriorManifest], judge: ClassifierManifest | None, batches: list[SampleBatch],
                     artifact: Artifact) -> SamplesManifest:
    """Select the kept candidates of every acceptance rate; grids of samples and of rejection."""
    options, plan = artifact.storage_options, SamplingPlan.of(settings)
    urls = [b.url for b in sorted(batches, key=lambda b: b.index)]
    data = load_samples(urls, options)
    scores, labels = data["judge_scores"], data["labels"]
    kept = {rate: plan.kept(scores, labels, rate) for rate in plan.rates}
    save_npz(artifact.path("selections.npz"), options, **{rate_key(rate): idx for rate, idx in kept.items()})
    rows = [
        RateRow(rate=rate, candidates=int(len(plan.pool(rate))), kept=int(len(idx)),
                judge_confidence_kept=_mean(scores[idx]),
                judge_confidence_rejected=_mean(scores[np.setdiff1d(plan.pool(rate), idx)]))
        for rate, idx in kept.items()
    ]
    scale = display_scale(settings.image_size)
    grid = image_grid(torch.from_numpy(data["images"][kept[1.0][: settings.grid_size]]).float() / 255)
    write_bytes(artifact.path("grid.png"), png_bytes(grid, scale), options)
    rejection = plan.num_classes and len(plan.rates) > 1
    if rejection:
        write_bytes(artifact.path("rejection.png"), png_bytes(rejection_grid(data["images"], scores, labels, plan),
                                                              scale), options)
    logger().info(f"{len(scores)} candidates; kept per rate: " +
                  ", ".join(f"{r.rate}: {r.kept} (judge {r.judge_confidence_kept})" for r in rows))
    return SamplesManifest(
        **artifact.identity(), batches=urls, candidates=int(len(scores)), selections=artifact.path("selections.npz"),
        rates=rows, grid=artifact.path("grid.png"), rejection_grid=artifact.path("rejection.png") if rejection else None,
        judge_mean_confidence=_mean(scores), temperature=settings.temperature, top_k=settings.top_k,
        seed=settings.seed, num_samples=int(len(kept[1.0])),
    )


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
