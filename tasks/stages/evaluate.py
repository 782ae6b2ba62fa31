"""Stage 6: measure the run and write its report.

- Reconstruction MSE/PSNR on held-out images; codebook usage and perplexity of the
  held-out codes per level; each prior's held-out NLL in bits per code.
- Sample quality through torch-fidelity (FID, KID, precision/recall, IS) in one stated
  feature space (`tasks.fidelity`), against held-out real test images, with reference
  points computed the same way: real train images (the floor), reconstructions, the
  samples at temperature 1 without rejection, and the samples kept by classifier-based
  rejection at each acceptance rate: the paper's trade-off curve (Sec. 4.1, Fig. 5).

The report is `report.json` + `report.md` (with PNGs) in the artifact directory, and a
markdown artifact in the Prefect UI (key `vqvae2-report-<report key>`) with every grid and
plot visible as a thumbnail linking to its full PNG, which the flows publish on every run
(`publish_report`), a run whose stages were all `Cached` included.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from prefect.states import Completed, State

import vqvae2
from storage.artifacts import without_unset_additions
from storage.codes import CodeDataset
from storage.fsutil import find, join, read_bytes, redact, write_bytes, write_json
from vqvae2.config import config_to_dict

from ..config import PipelineConfig, Runtime
from ..fidelity import (
    MIN_IMAGES,
    Extractor,
    ImageKind,
    check_features_available,
    fidelity_table,
    per_class_fid,
    resolve_extractor,
)
from ..manifests import Manifest, Record, RootURL, TrainedManifest, from_root
from ..machinery.artifacts import Artifact, read_typed
from ..machinery.cached import with_records
from ..machinery.devices import resolve_device
from ..machinery.models import load_model, reconstruct
from ..machinery.reporting import (
    Panel,
    display_scale,
    image_grid,
    latest_artifact_ui_url,
    logger,
    pairs_grid,
    plot_png,
    png_bytes,
    publish_named_markdown,
    publish_table,
)
from ..machinery.rounding import rounded
from ..machinery.sampling_plan import resolve_classes
from ..report_markdown import render_markdown
from ..stage import Needs, Settings, Stage, stage_task

if TYPE_CHECKING:  # what it takes, for annotations only: a stage never imports another
    from .encode import CodesManifest
    from .ingest import DatasetManifest
    from .sample import SamplesManifest
    from .train_autoencoder import AutoencoderManifest
    from .train_classifier import ClassifierManifest
    from .train_prior import PriorManifest


class ReportManifest(Manifest):
    report: RootURL  # report.json: a `Report`
    markdown: RootURL  # report.md
    metrics: dict[str, float | int]
    fidelity: list[dict[str, float | int | str | None]]  # one row of FID/KID/PR/IS per image set
    extractor: str  # the feature space of the fidelity rows: inception, domain or self-supervised


class ReportedDataset(Record):
    key: str
    images: int
    source: dict[str, Any]  # as the dataset describes it (credentials redacted)


class ReportedFidelity(Record):
    extractor: dict[str, Any]  # `tasks.fidelity.Extractor.report`: kind, name, description, ...
    reference: str  # the real images every row is measured against
    rows: list[dict[str, Any]]  # one per image set: set, rate, fid, kid_mean, precision, recall, ...


class ReportedSamples(Record):
    candidates: int
    kept_per_rate: int
    temperature: float
    top_k: int | None
    seed: int
    rejection: str = "classifier-based"  # how candidates were rejected (reports before it was kept: the judge)
    drawn: str | None = None  # every sampling option in words (reports before it was kept: temperature and top-k)


class Report(Record):
    """`report.json`: what a run measured, and of what."""

    preset: str
    overrides: dict[str, Any]
    model: dict[str, Any]  # the whole model config
    dataset: ReportedDataset
    metrics: dict[str, float | int]
    fidelity: ReportedFidelity
    training: list[dict[str, Any]]  # a row per trained model: stage, steps, seconds, losses
    samples: ReportedSamples
    seeds: dict[str, int]
    artifacts: dict[str, str]  # what made the report -> its folder, from the storage root
    images: list[str] | None = None  # PNGs beside report.json, in the report's order (None: before it was kept)
    # Per class drawn: the FID of its samples without rejection against its held-out images
    # (`tasks.fidelity.per_class_fid`); [] for an unconditional model; None: before it was kept.
    per_class: list[dict[str, Any]] | None = None


def read_report(manifest: ReportManifest, storage_options: dict[str, Any] | None) -> Report:
    """The report a report manifest names; one that does not read is an error naming the file and the field."""
    report = read_typed(manifest.report, Report, storage_options, "")
    if report is None:
        raise FileNotFoundError(f"{redact(manifest.report)}: the report is gone; `vqvae2 verify --repair` and run "
                                "the evaluate stage again")
    return report


class EvaluateSettings(Settings):
    features: str  # auto, inception, domain or self-supervised
    inception_weights: str | None
    grid_size: int
    eval_images: int  # real images per reference set
    preset: str  # what the report says it describes
    overrides: dict[str, Any]
    model: dict[str, Any]  # the whole model config, recorded in the report

    @classmethod
    def of(cls, config: PipelineConfig, variant: Any = None) -> EvaluateSettings:
        evaluate = config.evaluate
        return cls(features=evaluate.features, inception_weights=evaluate.inception_weights,
                   grid_size=evaluate.grid_size, eval_images=config.eval_images, preset=config.preset,
                   overrides=config.overrides, model=_model_record(config.model))


def _model_record(model: vqvae2.ModelConfig) -> dict[str, Any]:
    # Without the settings added since keys were first made, where they hold their defaults:
    # the report's key then stays that of a config written before them.
    return without_unset_additions(model, config_to_dict(model))


def run(settings: EvaluateSettings, runtime: Runtime, dataset: DatasetManifest, autoencoder: AutoencoderManifest,
        codes: CodesManifest, priors: list[PriorManifest], classifiers: list[ClassifierManifest],
        samples: SamplesManifest) -> ReportManifest:
    return with_records(evaluate, runtime.root, runtime.storage_options)(
        settings, runtime, dataset, autoencoder, codes, priors, classifiers, samples)


def publish_report(manifest: ReportManifest, storage_options: dict[str, Any] | None) -> None:
    """The report's UI artifacts, from its files: the flow publishes them on every run, so a
    run whose stages were all `Cached` still shows its results on its own Artifacts tab."""
    report = read_report(manifest, storage_options)
    folder = manifest.report.rsplit("/", 1)[0]
    names = report.images or sorted(n[: -len(".png")] for n in find(folder, storage_options) if n.endswith(".png"))
    full = {name: join(folder, f"{name}.png") for name in names}  # (reports before "images" was kept: every PNG)
    images = {name: read_bytes(url, storage_options) for name, url in full.items()}
    # The UI gets thumbnails (Prefect keeps the artifact in its database), each a link to its
    # full file. Keyed by the report's own key, as its folder under the root is.
    publish_table(f"vqvae2-fidelity-{manifest.key}", [_fidelity_cells(row) for row in report.fidelity.rows],
                  f"FID/KID/precision/recall/IS per image set ({manifest.extractor} features; report key "
                  f"{manifest.key})", per_config=False)
    publish_named_markdown(report_ui_key(manifest.key), render_markdown(report, images, links=full),
                           f"vqvae2 report ({report.preset}, dataset {report.dataset.key}; report key {manifest.key})")


def report_state(manifest: ReportManifest) -> State:
    """The state a run that wrote `manifest` ends in: Completed, its message naming the report
    and where to read it (the card in Prefect's UI, else its file), so the run's state and its
    last log line ("Finished in state Completed('report ...')") both lead to it. Prefect lists
    a run's cards in an order of its own (random ids): this is how the report is found first."""
    where = latest_artifact_ui_url(report_ui_key(manifest.key)) or manifest.markdown
    return Completed(message=f"report {manifest.key}: {where}", data=manifest)


def report_ui_key(report_key: str) -> str:
    """The report's UI artifact: `vqvae2-report-<key>`, the key of its folder `{root}/reports/<key>/`."""
    return f"vqvae2-report-{report_key}"


def check(config: PipelineConfig, dataset: DatasetManifest | None) -> None:
    """Evaluation must be possible before anything trains, even before a run waits for its turn:
    its feature space, enough held-out images to measure against, and held-out images of
    every class the user chose to draw (its samples are measured against them)."""
    check_features_available(config, classes_known=dataset is not None or config.classes_fixed)
    if dataset is None:
        return
    dataset.require_images("the evaluation (its fidelity metrics)", test=MIN_IMAGES)
    if config.sample.classes is not None and dataset.class_names:
        dataset.require_held_out(resolve_classes(config.sample.classes, dataset.class_names, config.model.num_classes))


STAGE = Stage(
    name="evaluate", directory="reports", code_version="4", settings=EvaluateSettings, output=ReportManifest,
    inputs={"dataset": Needs("ingest"), "autoencoder": Needs("train-autoencoder"), "codes": Needs("encode"),
            "priors": Needs("train-priors"), "classifiers": Needs("train-classifiers"), "samples": Needs("sample")},
    run=run, summary="Measure a finished run and write its report.", publish=publish_report, makes_along=("sample",),
    check=check,
)


def as_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def codebook_metrics(codes: CodesManifest, storage_options: dict[str, Any], names: list[str]) -> dict[str, float]:
    """Distinct codes and perplexity per level over the whole held-out split (chunk by chunk)."""
    dataset = CodeDataset(codes.codes, "test", storage_options=storage_options)
    counts = [np.zeros(codes.codebook_size, dtype=np.int64) for _ in names]
    for chunk in range(dataset.num_chunks):
        levels, _ = dataset.chunk(chunk)
        for total, level in zip(counts, levels):
            total += np.bincount(level.reshape(-1).numpy(), minlength=len(total))
    metrics = {}
    for name, total in zip(names, counts):
        metrics[f"codes_used_{name}"] = int((total > 0).sum())
        metrics[f"perplexity_{name}"] = float(vqvae2.quantize.perplexity(torch.from_numpy(total).float()))
    return metrics


def fidelity_rows(extractor: Extractor, reference: torch.Tensor, sets: dict[str, torch.Tensor],
                  rates: dict[str, float | None]) -> list[dict[str, Any]]:
    """One row of FID/KID/precision/recall/IS per named image set, all against `reference`."""
    rows = []
    for name, metrics in fidelity_table(sets, reference, extractor).items():
        rows.append({"set": name, "rate": rates.get(name), **metrics})
        inception_score = f", IS {rounded(metrics['isc_mean'])}" if "isc_mean" in metrics else ""
        logger().info(f"{name}: FID {rounded(metrics['fid'])}, precision {rounded(metrics['precision'])}, "
                      f"recall {rounded(metrics['recall'])}{inception_score}")
    return rows


def tradeoff_png(rows: list[dict[str, Any]], extractor: Extractor) -> bytes:
    """The paper's trade-off curve: FID, precision and recall against the acceptance rate."""
    sampled = sorted((row for row in rows if row["rate"] is not None), key=lambda row: row["rate"])

    def points(key: str) -> list[tuple[float, float]]:
        return [(row["rate"], row[key]) for row in sampled]

    return plot_png([
        Panel(f"FID ({extractor.kind} features)", "acceptance rate", {"FID": points("fid")}, log_x=True, invert_x=True),
        Panel("precision / recall", "acceptance rate", {"precision": points("precision"), "recall": points("recall")},
              log_x=True, invert_x=True),
    ])


def training_row(manifest: TrainedManifest) -> dict[str, Any]:
    metrics = manifest.metrics
    return {"stage": manifest.display_name, "steps": manifest.steps, "seconds": manifest.seconds,
            "train_loss": metrics.get("loss"), **{k: v for k, v in metrics.items() if k.startswith("val_")}}


@stage_task(STAGE)
def evaluate(settings: EvaluateSettings, runtime: Runtime, dataset: DatasetManifest, autoencoder: AutoencoderManifest,
             codes: CodesManifest, priors: list[PriorManifest], classifiers: list[ClassifierManifest],
             samples: SamplesManifest, artifact: Artifact) -> ReportManifest:
    options = artifact.storage_options
    names = vqvae2.level_names(len(codes.level_shapes))
    test_images, test_labels = dataset.first_images("test", settings.eval_images, options)
    train_images, _ = dataset.first_images("train", settings.eval_images, options)
    device = resolve_device(runtime.training.device)
    recon = reconstruct(load_model(autoencoder, options, device), test_images.to(device)).cpu()
    mse = F.mse_loss(recon, test_images).item()
    metrics: dict[str, Any] = {"recon_mse": mse, "recon_psnr_db": 10 * math.log10(1 / max(mse, 1e-12))}
    metrics.update(codebook_metrics(codes, options, names))
    for prior in priors:
        metrics[f"nll_bits_per_code_{names[prior.level]}"] = prior.bits_per_code(codes, options, settings.eval_images,
                                                                                  device)

    # Sample quality, every row in the same feature space and against the same real images.
    features = next((c for c in classifiers if c.role == "features"), None)
    extractor = resolve_extractor(settings.features, inception_weights=settings.inception_weights,
                                  domain_checkpoint=features.model if features else None, storage_options=options,
                                  self_supervised=features is not None and features.target == "rotations",
                                  images=ImageKind.of(settings.model))  # what `auto` decides from
    logger().info(extractor.summary())  # one line: the features, and why where `auto` picked them
    kept_as = samples.kept(options)  # {rate: (images, the class each was drawn as)}
    kept = {rate: images for rate, (images, _) in kept_as.items()}
    per_class = per_class_fid(torch.from_numpy(kept[1.0]), torch.from_numpy(kept_as[1.0][1]), as_uint8(test_images),
                              test_labels, {c: dataset.class_names[c] for c in samples.classes or []}, extractor)
    sets = {"real train images (floor)": as_uint8(train_images), "reconstructions": as_uint8(recon)}
    rates: dict[str, float | None] = {}
    for rate, images in kept.items():
        name = "samples, no rejection" if rate == 1.0 else f"samples, acceptance rate {rate:g}"
        sets[name], rates[name] = torch.from_numpy(images), rate
    rows = fidelity_rows(extractor, as_uint8(test_images), sets, rates)
    judged = {row.rate: row.judge_confidence_kept for row in samples.rates}
    for row in rows:
        row["judge_confidence"] = judged.get(row["rate"])
    unrejected = next(row for row in rows if row["rate"] == 1.0)
    metrics.update({f"sample_{k}": unrejected[k] for k in ("fid", "kid_mean", "precision", "recall", "isc_mean")
                    if k in unrejected})
    if samples.judge_mean_confidence is not None:
        metrics["sample_judge_confidence"] = samples.judge_mean_confidence
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"evaluation produced non-finite metrics: {bad}")

    scale = display_scale(dataset.image_size)
    images = {
        "samples": png_bytes(image_grid(torch.from_numpy(kept[1.0][: settings.grid_size]).float() / 255), scale),
        "reconstructions": png_bytes(pairs_grid(test_images, recon, settings.grid_size), scale),
        "rejection-tradeoff": tradeoff_png(rows, extractor),
    }
    if samples.rejection_grid:
        images["rejection"] = read_bytes(samples.rejection_grid, options)
    trained: list[TrainedManifest] = [autoencoder, *priors, *classifiers]
    images |= {f"loss-{m.display_name}": read_bytes(m.loss_curve, options) for m in trained}
    for name, png in images.items():
        write_bytes(artifact.path(f"{name}.png"), png, options)

    model = settings.model
    report = Report(
        preset=settings.preset,
        overrides=settings.overrides,
        model=model,
        dataset=ReportedDataset(key=dataset.key, images=dataset.num_samples, source=dataset.source),
        metrics=metrics,
        fidelity=ReportedFidelity(extractor=extractor.report(runtime.root),
                                  reference=f"{len(test_images)} held-out test images", rows=rows),
        training=[training_row(m) for m in trained],
        samples=ReportedSamples(candidates=samples.candidates, kept_per_rate=samples.num_samples,
                                temperature=samples.temperature, top_k=samples.top_k, seed=samples.seed,
                                drawn=samples.drawn,
                                rejection=_rejection(samples, dataset)),
        seeds={"sample": samples.seed, **{name: model[name]["seed"] for name in
                                          ("train_autoencoder", "train_prior", "train_classifier")}},
        # Each artifact's folder from the storage root: the report holds wherever the root moves.
        artifacts={m.directory: from_root(m.url, runtime.root) for m in [dataset, autoencoder, codes, samples]}
        | {m.display_name: from_root(m.url, runtime.root) for m in trained},
        images=list(images),
        per_class=per_class,
    )
    write_json(artifact.path("report.json"), report.model_dump(mode="json"), options)
    write_bytes(artifact.path("report.md"), render_markdown(report, {n: f"{n}.png" for n in images}).encode(), options)
    logger().info(f"report: {artifact.path('report.md')}")
    return ReportManifest(**artifact.identity(), report=artifact.path("report.json"),
                          markdown=artifact.path("report.md"), metrics=metrics, fidelity=rows,
                          extractor=extractor.kind)


def _rejection(samples: SamplesManifest, dataset: DatasetManifest) -> str:
    if samples.judge_mean_confidence is not None:
        return "classifier-based (the judge's confidence in each sample's class)"
    why = "the dataset has no labels" if not dataset.labelled else "the model is unconditional (num_classes=0)"
    return f"off: {why}, so there is no judge and every candidate is kept"


def _fidelity_cells(row: dict[str, Any]) -> dict[str, Any]:
    keys = ("set", "rate", "fid", "kid_mean", "precision", "recall", "isc_mean", "num_generated", "judge_confidence")
    return {k: row.get(k) for k in keys}
