"""Stage 5: sample candidate images from the priors (hierarchical ancestral sampling) in
mapped batches, score each with the judge classifier, and select, for every acceptance
rate, the candidates classifier-based rejection keeps (Razavi et al. 2019, Sec. 4.1).

Exactly `num_samples` images are kept at every acceptance rate, spread over the classes
drawn (`sample.classes`, resolved against the dataset's class names; every class without
it) as evenly as can be: each of the C classes keeps k_c = num_samples // C, the first
num_samples % C of them (in the order given) one more, at every rate, so the rates compare
on equal counts. The candidates are drawn round-robin: round j has one candidate of each
class that needs more than j at the lowest rate (a prefix of the classes, the first ones
needing the most), so the first m candidates of a class are the first m it got. At rate r
the stage takes the first `candidates_needed(k_c, r)` candidates of each class and keeps
the k_c the judge is most confident in. The kept indices interleave the classes (the
first kept of every class, then the second, ...), so grid.png's first images cover them.
Each batch draws with its own seed (`sample.seed + batch index`): batches are reproducible
whichever worker draws them.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import torch
from prefect import unmapped

import vqvae2
from storage.artifacts import IN_KEY_WHEN_SET
from storage.fsutil import exists, read_bytes, redact, write_bytes

from ..config import PipelineConfig, Runtime
from ..manifests import Manifest, Record, RootURL
from ..machinery.arrays import load_npz, save_npz
from ..machinery.artifacts import Artifact, Marker
from ..machinery.cached import cached_unit, with_records
from ..machinery.devices import resolve_device
from ..machinery.models import load_model
from ..machinery.reporting import (
    display_scale,
    image_grid,
    logger,
    markdown_image,
    markdown_table,
    png_bytes,
    publish_markdown,
    track,
)
from ..machinery.rounding import rounded
from ..machinery.sampling_plan import SamplingPlan, class_listing
from ..stage import Needs, Settings, Stage, stage_task

if TYPE_CHECKING:  # what it takes, for annotations only: a stage never imports another
    from .ingest import DatasetManifest
    from .train_autoencoder import AutoencoderManifest
    from .train_classifier import ClassifierManifest
    from .train_prior import PriorManifest


class SampleBatch(Record):
    index: int
    url: RootURL
    images: int


class RateRow(Record):
    rate: float
    candidates: int
    kept: int
    judge_confidence_kept: float | None
    judge_confidence_rejected: float | None


class SamplesManifest(Manifest):
    batches: list[RootURL]
    candidates: int
    selections: RootURL  # npz: the kept candidates' indices per acceptance rate
    rates: list[RateRow]
    grid: RootURL
    rejection_grid: RootURL | None
    judge_mean_confidence: float | None
    temperature: float
    top_k: int | None
    seed: int
    num_samples: int  # kept per rate
    classes: list[int] | None = None  # the class indices drawn, in order (None: unconditional)
    class_names: list[str] | None = None  # their names, where the dataset names its classes
    drawn: str | None = None  # the sampling options in words (`vqvae2.SamplingOptions.described`)

    def kept_images(self, storage_options: dict[str, Any] | None = None) -> dict[float, np.ndarray]:
        """{acceptance rate: the uint8 images rejection at that rate kept}."""
        return {rate: images for rate, (images, _) in self.kept(storage_options).items()}

    def kept(self, storage_options: dict[str, Any] | None = None) -> dict[float, tuple[np.ndarray, np.ndarray]]:
        """{acceptance rate: (the uint8 images rejection at that rate kept, the class each was drawn as)}."""
        samples = load_samples(self.batches, storage_options)
        selections = load_npz(self.selections, storage_options)
        return {row.rate: (samples["images"][kept], samples["labels"][kept])
                for row in self.rates for kept in [selections[rate_key(row.rate)]]}


class SampleSettings(Settings):
    num_samples: int  # kept per acceptance rate, spread evenly over the classes
    acceptance_rates: list[float]
    temperature: float
    top_k: int | None
    top_p: Annotated[float | None, IN_KEY_WHEN_SET] = None
    dtype: str  # the priors' precision while sampling
    batch_size: int  # each batch draws with its own seed: part of what is drawn
    seed: int
    num_classes: int
    classes: list[str | int] | None  # the classes drawn, as given (names or indices); None: every class
    grid_size: int  # images in grid.png
    image_size: int  # how much the grids are enlarged

    @classmethod
    def of(cls, config: PipelineConfig, variant: Any = None) -> SampleSettings:
        sample = config.sample
        return cls(num_samples=config.num_samples, acceptance_rates=sample.acceptance_rates,
                   temperature=sample.temperature, top_k=sample.top_k, top_p=sample.top_p, dtype=sample.dtype,
                   batch_size=config.sample_batch_size,
                   seed=sample.seed, num_classes=config.model.num_classes, classes=sample.classes,
                   grid_size=config.evaluate.grid_size, image_size=config.model.image_size)

    def options(self) -> vqvae2.SamplingOptions:
        """How each code is drawn."""
        return vqvae2.SamplingOptions(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)

    def plan(self, dataset: DatasetManifest) -> SamplingPlan:
        """Which candidates to draw from `dataset`'s classes; a bad `sample.classes` fails here."""
        return SamplingPlan.of(self.classes, dataset.class_names, self.num_classes, self.num_samples,
                               self.acceptance_rates)


def run(settings: SampleSettings, runtime: Runtime, dataset: DatasetManifest, autoencoder: AutoencoderManifest,
        priors: list[PriorManifest], judge: ClassifierManifest | None) -> SamplesManifest:
    plan = settings.plan(dataset)  # a bad sample.classes fails here, before anything is drawn
    if plan.classes:
        logger().info(f"sampling {plan.num_samples} images per acceptance rate of "
                      f"{class_listing(dataset.class_names, plan.classes)}; {plan.candidates} candidates")
    records = runtime.root, runtime.storage_options
    batches = with_records(sample_batch, *records).map(
        range(len(batch_sizes(settings, dataset))), unmapped(settings), unmapped(runtime), unmapped(dataset),
        unmapped(autoencoder), unmapped(priors), unmapped(judge),
    )
    return with_records(finalize_samples, *records)(settings, runtime, dataset, autoencoder, priors, judge,
                                                    track(batches, "sample: batches drawn"))


def publish_samples(samples: SamplesManifest, storage_options: dict[str, Any] | None) -> None:
    """The grid on the run's Artifacts tab (a thumbnail linking to grid.png under the root),
    with how the images were drawn and what each acceptance rate kept."""
    grid = read_bytes(samples.grid, storage_options)
    rows = [{"acceptance rate": r.rate, "candidates": r.candidates, "kept": r.kept,
             "judge confidence, kept": r.judge_confidence_kept} for r in samples.rates]
    drawn = f"{samples.drawn or _options_of_old(samples)}, seed {samples.seed}"
    if samples.classes:
        names = samples.class_names or [None] * len(samples.classes)  # samples made before names were kept
        listed = ", ".join(f"{name} ({index})" if name else str(index) for index, name in zip(samples.classes, names))
        drawn = f"classes {listed}; {drawn}"
    text = (f"# vqvae2 samples\n\n{samples.num_samples} images kept at each acceptance rate, from "
            f"{samples.candidates} candidates ({drawn}). The grid shows the images kept without rejection; "
            f"all of them are under `{redact(samples.url)}`.\n\n{markdown_image(grid, 'samples', samples.grid)}\n\n"
            f"{markdown_table(rows)}\n")
    publish_markdown("vqvae2-samples", text, f"{samples.num_samples} samples ({drawn})")


def _options_of_old(samples: SamplesManifest) -> str:
    """How samples made before the manifest said so in words were drawn."""
    return vqvae2.SamplingOptions(samples.temperature, samples.top_k).described()


def check(config: PipelineConfig, dataset: DatasetManifest | None) -> None:
    """A `sample.classes` the dataset lacks fails once the dataset is known, before any training."""
    if dataset is not None:
        check_classes(config, dataset)


STAGE = Stage(
    name="sample", directory="samples", code_version="2", settings=SampleSettings, output=SamplesManifest,
    # The dataset: its class names, which sample.classes names.
    inputs={"dataset": Needs("ingest"), "autoencoder": Needs("train-autoencoder"), "priors": Needs("train-priors"),
            "judge": Needs("train-classifiers", variant="judge", optional=True)},
    run=run, summary="Sample images from the trained priors (mapped per batch), with classifier-based rejection.",
    publish=publish_samples, check=check,
)


def check_classes(config: PipelineConfig, dataset: DatasetManifest) -> None:
    """A bad `sample.classes` fails here, as it would when the stage starts: what a flow calls
    once the dataset is known (after `with_dataset_classes`), so the error comes before any training."""
    SampleSettings.of(config).plan(dataset)


def batch_sizes(settings: SampleSettings, dataset: DatasetManifest) -> list[int]:
    full, rest = divmod(settings.plan(dataset).candidates, settings.batch_size)
    return [settings.batch_size] * full + ([rest] if rest else [])


def _samples(settings: SampleSettings, runtime: Runtime, dataset: DatasetManifest, autoencoder: AutoencoderManifest,
             priors: list[PriorManifest], judge: ClassifierManifest | None) -> Artifact:
    inputs = {"dataset": dataset, "autoencoder": autoencoder, "priors": priors, "judge": judge}
    return STAGE.artifact(settings, inputs, runtime)


def batch_name(index: int) -> str:
    """Batch `index`: its unit marker's name, and its file's under batches/."""
    return f"batch-{index:05d}"


def _batch_marker(index: int, settings: SampleSettings, runtime: Runtime, dataset: DatasetManifest,
                  autoencoder: AutoencoderManifest, priors: list[PriorManifest],
                  judge: ClassifierManifest | None) -> Marker[SampleBatch]:
    samples = _samples(settings, runtime, dataset, autoencoder, priors, judge)
    marker = samples.unit_marker(batch_name(index), SampleBatch)

    def read() -> SampleBatch | None:  # a batch whose file is gone (`vqvae2 verify --repair`) is drawn again
        batch = marker.read()
        return batch if batch is None or exists(batch.url, runtime.storage_options) else None

    # Complete samples are trusted whole: their batch files are looked for only while drawing.
    return dataclasses.replace(marker, read=read, done=lambda: samples.is_complete() or read() is not None)


@torch.no_grad()
def judge_scores(judge: vqvae2.ResNetClassifier | None, images: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """The judge's probability of each image's intended class (NaN without a judge or labels)."""
    if judge is None or (labels < 0).any():
        return np.full(len(images), np.nan, dtype=np.float32)
    probs = torch.softmax(judge(images).float(), dim=1)
    return probs.gather(1, labels.unsqueeze(1)).squeeze(1).cpu().numpy()


def draw_batch(settings: SampleSettings, plan: SamplingPlan, index: int, size: int, autoencoder: vqvae2.VQVAE2,
               priors: list[vqvae2.PixelCNNPrior]) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Batch `index` of the candidates `plan` lays out, `size` of them, drawn with its own seed
    (`sample.seed + index`): (images, codes per level, labels). The sample stage's batches and
    `vqvae2 sample` draw through here, so the same settings draw the same images."""
    device = next(autoencoder.parameters()).device
    labels = torch.from_numpy(plan.labels(index * settings.batch_size, size)).to(device)
    images, codes = vqvae2.sample_images(
        autoencoder, priors, size, labels=labels if plan.classes else None, options=settings.options(),
        seed=settings.seed + index, dtype=torch.bfloat16 if settings.dtype == "bf16" else None,
    )
    return images, codes, labels


@cached_unit(locate=_batch_marker, name="sample-batch", task_run_name="sample-batch-{index}")
def sample_batch(index: int, settings: SampleSettings, runtime: Runtime, dataset: DatasetManifest,
                 autoencoder: AutoencoderManifest, priors: list[PriorManifest],
                 judge: ClassifierManifest | None) -> SampleBatch:
    """Draw batch `index` of the candidates, and let the judge score them."""
    samples = _samples(settings, runtime, dataset, autoencoder, priors, judge)
    options, device = runtime.storage_options, resolve_device(runtime.training.device)
    judge_model = load_model(judge, options, device) if judge else None
    images, codes, labels = draw_batch(settings, settings.plan(dataset), index, batch_sizes(settings, dataset)[index],
                                       load_model(autoencoder, options, device),
                                       [load_model(p, options, device) for p in priors])
    url = samples.path("batches", f"{batch_name(index)}.npz")
    save_npz(
        url, options,
        images=(images * 255).round().to(torch.uint8).cpu().numpy(),
        labels=labels.cpu().numpy(),
        judge_scores=judge_scores(judge_model, images, labels),
        **{f"codes{level}": c.cpu().numpy().astype(np.int16) for level, c in enumerate(codes)},
    )  # fmt: skip
    return SampleBatch(index=index, url=url, images=len(images))


@stage_task(STAGE, name="finalize-samples")
def finalize_samples(settings: SampleSettings, runtime: Runtime, dataset: DatasetManifest,
                     autoencoder: AutoencoderManifest, priors: list[PriorManifest], judge: ClassifierManifest | None,
                     batches: list[SampleBatch], artifact: Artifact) -> SamplesManifest:
    """Select the kept candidates of every acceptance rate; grids of samples and of rejection."""
    options, plan = artifact.storage_options, settings.plan(dataset)
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
    rejection = bool(plan.classes) and len(plan.rates) > 1
    if rejection:
        write_bytes(artifact.path("rejection.png"), png_bytes(rejection_grid(data["images"], scores, labels, plan),
                                                              scale), options)
    kept_per_rate = (f"{rounded(r.rate)}: {r.kept} (judge {rounded(r.judge_confidence_kept)})" for r in rows)
    logger().info(f"{len(scores)} candidates; kept per rate: " + ", ".join(kept_per_rate))
    return SamplesManifest(
        **artifact.identity(), batches=urls, candidates=int(len(scores)), selections=artifact.path("selections.npz"),
        rates=rows, grid=artifact.path("grid.png"), rejection_grid=artifact.path("rejection.png") if rejection else None,
        judge_mean_confidence=_mean(scores), temperature=settings.temperature, top_k=settings.top_k,
        drawn=settings.options().described(),
        seed=settings.seed, num_samples=int(len(kept[1.0])), classes=list(plan.classes) or None,
        class_names=[dataset.class_names[c] for c in plan.classes] if plan.classes and dataset.class_names else None,
    )


def _mean(values: np.ndarray) -> float | None:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()) if len(values) and np.isfinite(values).all() else None


def rejection_grid(images: np.ndarray, scores: np.ndarray, labels: np.ndarray, plan: SamplingPlan,
                   per_side: int = 6) -> np.ndarray:
    """One row per class drawn: its `per_side` candidates the judge likes most (left) and least
    (right); fewer a side when a class has fewer candidates, the same number in every row."""
    mine = [np.flatnonzero(labels == label) for label in plan.classes]
    mine = [m for m in mine if len(m)]  # a class that keeps nothing (num_samples < classes) draws nothing
    side = min([per_side, *(len(m) for m in mine)])
    rows = []
    for candidates in mine:
        order = candidates[np.argsort(-scores[candidates], kind="stable")]
        rows.append(images[np.concatenate([order[:side], order[::-1][:side][::-1]])])
    grid = torch.from_numpy(np.concatenate(rows)).float() / 255
    return image_grid(grid, columns=2 * side)


# --- reading the samples ------------------------------------------------------------------------


def rate_key(rate: float) -> str:
    """The name of an acceptance rate's selection in `selections.npz`."""
    return f"rate_{rate:g}"


def load_samples(batch_urls: list[str], storage_options: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """All sample batches, concatenated: images, labels, judge_scores, codes per level."""
    parts = [load_npz(url, storage_options) for url in batch_urls]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
