"""Stage 6: measure the run and write its report.

First version of the metrics (FID and friends come with the evaluation issue):
reconstruction MSE/PSNR on held-out images, codebook usage and perplexity of the
held-out codes per level, each prior's held-out NLL in bits per code, and the judge's
confidence in the samples. The report is `report.json` + `report.md` (with PNGs) in
the artifact directory, and a markdown artifact in the Prefect UI with the sample
and reconstruction grids and the loss curves visible as images.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import vqvae2
from storage.codes import CodeDataset
from storage.fsutil import read_bytes, write_bytes, write_json

from .artifact_task import Artifact, artifact_task
from .config import PipelineConfig
from .models import load_model
from .reporting import image_grid, logger, markdown_image, png_bytes, publish_markdown, publish_table
from .sample import load_samples
from .train_autoencoder import held_out_images
from .train_prior import level_batch, validation_batches

CODE_VERSION = "1"


def report_artifact(config: PipelineConfig, dataset: dict[str, Any], autoencoder: dict[str, Any],
                    codes: dict[str, Any], priors: list[dict[str, Any]], classifiers: list[dict[str, Any]],
                    samples: dict[str, Any]) -> Artifact:
    inputs = {"dataset": dataset["key"], "autoencoder": autoencoder["key"], "codes": codes["key"],
              "priors": ",".join(p["key"] for p in priors), "classifiers": ",".join(c["key"] for c in classifiers),
              "samples": samples["key"]}
    section = {"evaluate": config.evaluate.model_dump(), "eval_images": config.eval_images}
    return Artifact.of(config.storage.url, "reports", section, inputs, CODE_VERSION, config.storage.storage_options)


@torch.no_grad()
def reconstruction_metrics(model: vqvae2.VQVAE2, images: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
    recon = torch.cat([model(chunk).reconstruction.clamp(0, 1) for chunk in images.split(256)])
    mse = F.mse_loss(recon, images).item()
    return {"mse": mse, "psnr_db": 10 * math.log10(1 / max(mse, 1e-12))}, recon


def codebook_metrics(codes: dict[str, Any], storage_options: dict[str, Any], names: list[str]) -> dict[str, float]:
    """Distinct codes and perplexity per level over the whole held-out split (chunk by chunk)."""
    dataset = CodeDataset(codes["codes"], "test", storage_options=storage_options)
    counts = [np.zeros(codes["codebook_size"], dtype=np.int64) for _ in names]
    for chunk in range(dataset.num_chunks):
        levels, _ = dataset.chunk(chunk)
        for total, level in zip(counts, levels):
            total += np.bincount(level.reshape(-1).numpy(), minlength=len(total))
    metrics = {}
    for name, total in zip(names, counts):
        metrics[f"codes_used_{name}"] = int((total > 0).sum())
        metrics[f"perplexity_{name}"] = float(vqvae2.quantize.perplexity(torch.from_numpy(total).float()))
    return metrics


@torch.no_grad()
def prior_nll(prior: vqvae2.PixelCNNPrior, level: int, codes: dict[str, Any], storage_options: dict[str, Any],
              rows: int) -> float:
    total, count = 0.0, 0
    for batch in validation_batches(codes, storage_options, rows, 128):
        target, cond, labels = level_batch(batch, level, prior)
        total += prior.loss(target, cond, labels).item() * target.numel()
        count += target.numel()
    return vqvae2.bits_per_code(total / max(count, 1))


def pairs_grid(originals: torch.Tensor, reconstructions: torch.Tensor, count: int) -> np.ndarray:
    """Originals and their reconstructions side by side, column pairs."""
    n = max(1, min(count // 2, len(originals)))
    interleaved = torch.stack([originals[:n], reconstructions[:n]], dim=1).flatten(0, 1)
    columns = 2 * max(1, round(math.sqrt(n)))
    return image_grid(interleaved, columns=columns)


def _scale(image_size: int) -> int:
    return max(1, 128 // image_size)  # small images are enlarged so the grid is readable in the UI


@artifact_task(locate=report_artifact, name="evaluate")
def evaluate(config: PipelineConfig, dataset: dict[str, Any], autoencoder: dict[str, Any], codes: dict[str, Any],
             priors: list[dict[str, Any]], classifiers: list[dict[str, Any]], samples: dict[str, Any],
             artifact: Artifact) -> dict[str, Any]:
    options, model_config = artifact.storage_options, config.model
    names = vqvae2.level_names(model_config.levels)
    images, _ = held_out_images(dataset, config.eval_images, options)
    recon_metrics, recon = reconstruction_metrics(load_model(autoencoder, options), images)
    metrics: dict[str, Any] = {f"recon_{k}": v for k, v in recon_metrics.items()}
    metrics.update(codebook_metrics(codes, options, names))
    for level, prior in enumerate(priors):
        metrics[f"nll_bits_per_code_{names[level]}"] = prior_nll(load_model(prior, options), level, codes, options,
                                                                 config.eval_images)
    if samples.get("judge_mean_confidence") is not None:
        metrics["sample_judge_confidence"] = samples["judge_mean_confidence"]
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"evaluation produced non-finite metrics: {bad}")

    scale = _scale(model_config.image_size)
    sampled = load_samples(samples, options)["images"][: config.evaluate.grid_size]
    grids = {
        "samples": png_bytes(image_grid(torch.from_numpy(sampled).float() / 255), scale),
        "reconstructions": png_bytes(pairs_grid(images, recon, config.evaluate.grid_size), scale),
    }
    for name, png in grids.items():
        write_bytes(artifact.path(f"{name}.png"), png, options)
    stages = [autoencoder, *priors, *classifiers]
    curves = {stage_name(m): read_bytes(m["loss_curve"], options) for m in stages}
    for name, png in curves.items():
        write_bytes(artifact.path(f"loss-{name}.png"), png, options)
    training = [training_row(m) for m in stages]

    report = {
        "preset": config.preset,
        "overrides": config.overrides,
        "dataset": {"key": dataset["key"], "images": dataset["num_samples"], "source": dataset["source"]},
        "metrics": metrics,
        "training": training,
        "samples": {k: samples.get(k) for k in ("num_samples", "temperature", "top_k", "seed")},
        "artifacts": {m["stage"]: m["url"] for m in [dataset, autoencoder, codes, samples]}
        | {stage_name(m): m["url"] for m in stages},
    }
    write_json(artifact.path("report.json"), report, options)
    files = {name: f"{name}.png" for name in grids} | {f"loss-{n}": f"loss-{n}.png" for n in curves}
    write_bytes(artifact.path("report.md"), render_markdown(report, files).encode(), options)
    publish_markdown("vqvae2-report", render_markdown(
        report, {name: png for name, png in grids.items()} | {f"loss-{n}": png for n, png in curves.items()}
    ), f"vqvae2 report ({config.preset}, dataset {dataset['key']})")
    publish_table("vqvae2-metrics", [{"metric": k, "value": v} for k, v in metrics.items()], "vqvae2 evaluation")
    logger().info(f"report: {artifact.path('report.md')}")
    return {"report": artifact.path("report.json"), "markdown": artifact.path("report.md"), "metrics": metrics}


def stage_name(manifest: dict[str, Any]) -> str:
    """autoencoder, prior-top, prior-bottom, classifier-judge, ..."""
    return manifest.get("level_name") or (f"classifier-{manifest['role']}" if "role" in manifest else manifest["stage"])


def training_row(manifest: dict[str, Any]) -> dict[str, Any]:
    metrics = manifest["metrics"]
    val = {k: v for k, v in metrics.items() if k.startswith("val_")}
    return {"stage": stage_name(manifest), "steps": manifest["steps"], "seconds": manifest.get("seconds"),
            "train_loss": metrics.get("loss"), **val}


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _table(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: dict[str, Any], images: dict[str, str | bytes]) -> str:
    """The report as markdown; an image is a relative file name or PNG bytes (inlined)."""

    def image(name: str) -> str:
        value = images[name]
        return markdown_image(value, name) if isinstance(value, bytes) else f"![{name}]({value})"

    curves = [name for name in images if name.startswith("loss-")]
    return "\n\n".join([
        f"# vqvae2 report: `{report['preset']}`",
        f"Dataset `{report['dataset']['key']}`: {report['dataset']['images']} images from "
        f"`{report['dataset']['source']}`.",
        "## Samples", f"{report['samples']['num_samples']} samples (temperature {report['samples']['temperature']}, "
        f"top-k {report['samples']['top_k']}, seed {report['samples']['seed']}); the first ones:", image("samples"),
        "## Reconstructions", "Held-out images (left) and their reconstructions (right):", image("reconstructions"),
        "## Metrics", _table([{"metric": k, "value": v} for k, v in report["metrics"].items()]),
        "## Training", _table(report["training"]),
        "## Loss curves", "\n".join(image(name) for name in curves),
        "## Artifacts", _table([{"artifact": k, "url": v} for k, v in report["artifacts"].items()]),
    ])
