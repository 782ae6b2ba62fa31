"""Stage 6: measure the run and write its report.

- Reconstruction MSE/PSNR on held-out images; codebook usage and perplexity of the
  held-out codes per level; each prior's held-out NLL in bits per code.
- Sample quality through torch-fidelity (FID, KID, precision/recall, IS) in one stated
  feature space (`tasks.fidelity`), against held-out real test images, with reference
  points computed the same way: real train images (the floor), reconstructions, the
  samples at temperature 1 without rejection, and the samples kept by classifier-based
  rejection at each acceptance rate: the paper's trade-off curve (Sec. 4.1, Fig. 5).

The report is `report.json` + `report.md` (with PNGs) in the artifact directory, and a
markdown artifact in the Prefect UI with every grid and plot visible as an image.
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import vqvae2
from storage.codes import CodeDataset
from storage.fsutil import read_bytes, write_bytes, write_json

from .arrays import load_npz
from .artifact_task import Artifact, artifact_task
from .config import PipelineConfig
from .datasets import first_images
from .fidelity import Extractor, fidelity_table, inception_cache_path, resolve_extractor
from .models import load_model
from .report_markdown import render_markdown
from .reporting import Panel, display_scale, image_grid, logger, plot_png, png_bytes, publish_markdown, publish_table
from .sample import load_samples, rate_key
from .train_prior import held_out_bits_per_code, validation_batches

CODE_VERSION = "2"


def uses_domain_features(config: PipelineConfig) -> bool:
    """Whether the evaluation needs the pipeline's own features classifier (no Inception)."""
    if config.evaluate.features != "auto":
        return config.evaluate.features == "domain"
    return not os.path.isfile(config.evaluate.inception_weights or inception_cache_path())


def classifier_roles(config: PipelineConfig) -> list[str]:
    """The judge (rejection sampling) and, without Inception weights, the FID feature network:
    two classifiers trained independently, so the metric never grades with the judge's eyes."""
    if not config.model.num_classes:
        return []
    return ["judge"] + (["features"] if uses_domain_features(config) else [])


def report_artifact(config: PipelineConfig, dataset: dict[str, Any], autoencoder: dict[str, Any],
                    codes: dict[str, Any], priors: list[dict[str, Any]], classifiers: list[dict[str, Any]],
                    samples: dict[str, Any]) -> Artifact:
    inputs = {"dataset": dataset["key"], "autoencoder": autoencoder["key"], "codes": codes["key"],
              "priors": ",".join(p["key"] for p in priors), "classifiers": ",".join(c["key"] for c in classifiers),
              "samples": samples["key"]}
    section = {"evaluate": config.evaluate.model_dump(), "eval_images": config.eval_images}
    return Artifact.of(config.storage.url, "reports", section, inputs, CODE_VERSION, config.storage.storage_options)


def as_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


@torch.no_grad()
def reconstruct(model: vqvae2.VQVAE2, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(chunk).reconstruction.clamp(0, 1) for chunk in images.split(256)])


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


def fidelity_rows(extractor: Extractor, reference: torch.Tensor, sets: dict[str, torch.Tensor],
                  rates: dict[str, float | None]) -> list[dict[str, Any]]:
    """One row of FID/KID/precision/recall/IS per named image set, all against `reference`."""
    rows = []
    for name, metrics in fidelity_table(sets, reference, extractor).items():
        rows.append({"set": name, "rate": rates.get(name), **metrics})
        logger().info(f"{name}: FID {metrics['fid']:.3f}, precision {metrics['precision']:.3f}, "
                      f"recall {metrics['recall']:.3f}, IS {metrics['isc_mean']:.3f}")
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


def pairs_grid(originals: torch.Tensor, reconstructions: torch.Tensor, count: int) -> np.ndarray:
    """Originals and their reconstructions side by side, column pairs."""
    n = max(1, min(count // 2, len(originals)))
    interleaved = torch.stack([originals[:n], reconstructions[:n]], dim=1).flatten(0, 1)
    return image_grid(interleaved, columns=2 * max(1, round(math.sqrt(n))))


def stage_name(manifest: dict[str, Any]) -> str:
    """autoencoder, prior-top, prior-bottom, classifier-judge, ..."""
    return manifest.get("level_name") or (f"classifier-{manifest['role']}" if "role" in manifest else manifest["stage"])


def training_row(manifest: dict[str, Any]) -> dict[str, Any]:
    metrics = manifest["metrics"]
    return {"stage": stage_name(manifest), "steps": manifest["steps"], "seconds": manifest.get("seconds"),
            "train_loss": metrics.get("loss"), **{k: v for k, v in metrics.items() if k.startswith("val_")}}


@artifact_task(locate=report_artifact, name="evaluate")
def evaluate(config: PipelineConfig, dataset: dict[str, Any], autoencoder: dict[str, Any], codes: dict[str, Any],
             priors: list[dict[str, Any]], classifiers: list[dict[str, Any]], samples: dict[str, Any],
             artifact: Artifact) -> dict[str, Any]:
    options, model_config = artifact.storage_options, config.model
    names = vqvae2.level_names(model_config.levels)
    test_images, _ = first_images(dataset, "test", config.eval_images, options)
    train_images, _ = first_images(dataset, "train", config.eval_images, options)
    recon = reconstruct(load_model(autoencoder, options), test_images)
    mse = F.mse_loss(recon, test_images).item()
    metrics: dict[str, Any] = {"recon_mse": mse, "recon_psnr_db": 10 * math.log10(1 / max(mse, 1e-12))}
    metrics.update(codebook_metrics(codes, options, names))
    for level, prior in enumerate(priors):
        metrics[f"nll_bits_per_code_{names[level]}"] = held_out_bits_per_code(
            load_model(prior, options), level, validation_batches(codes, options, config.eval_images, 128))

    # Sample quality, every row in the same feature space and against the same real images.
    features = next((c for c in classifiers if c.get("role") == "features"), None)
    extractor = resolve_extractor(config.evaluate.features, inception_weights=config.evaluate.inception_weights,
                                  domain_checkpoint=features["model"] if features else None, storage_options=options)
    sampled = load_samples(samples, options)["images"]
    selections = load_npz(samples["selections"], options)
    sets = {"real train images (floor)": as_uint8(train_images), "reconstructions": as_uint8(recon)}
    rates: dict[str, float | None] = {}
    for row in samples["rates"]:
        name = "samples, no rejection" if row["rate"] == 1.0 else f"samples, acceptance rate {row['rate']:g}"
        sets[name] = torch.from_numpy(sampled[selections[rate_key(row["rate"])]])
        rates[name] = row["rate"]
    rows = fidelity_rows(extractor, as_uint8(test_images), sets, rates)
    for row in rows:
        judge = next((r for r in samples["rates"] if r["rate"] == row["rate"]), {})
        row["judge_confidence"] = judge.get("judge_confidence_kept")
    unrejected = next(row for row in rows if row["rate"] == 1.0)
    metrics.update({f"sample_{k}": unrejected[k] for k in ("fid", "kid_mean", "precision", "recall", "isc_mean")})
    if samples.get("judge_mean_confidence") is not None:
        metrics["sample_judge_confidence"] = samples["judge_mean_confidence"]
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"evaluation produced non-finite metrics: {bad}")

    scale = display_scale(model_config.image_size)
    images = {
        "samples": png_bytes(image_grid(torch.from_numpy(sampled[selections[rate_key(1.0)]][: config.evaluate.grid_size])
                                        .float() / 255), scale),
        "reconstructions": png_bytes(pairs_grid(test_images, recon, config.evaluate.grid_size), scale),
        "rejection-tradeoff": tradeoff_png(rows, extractor),
    }
    if samples.get("rejection_grid"):
        images["rejection"] = read_bytes(samples["rejection_grid"], options)
    stages = [autoencoder, *priors, *classifiers]
    images |= {f"loss-{stage_name(m)}": read_bytes(m["loss_curve"], options) for m in stages}
    for name, png in images.items():
        write_bytes(artifact.path(f"{name}.png"), png, options)

    report = {
        "preset": config.preset,
        "overrides": config.overrides,
        "dataset": {"key": dataset["key"], "images": dataset["num_samples"], "source": dataset["source"]},
        "metrics": metrics,
        "fidelity": {"extractor": extractor.report(), "reference": f"{len(test_images)} held-out test images",
                     "rows": rows},
        "training": [training_row(m) for m in stages],
        "samples": {"candidates": samples["candidates"], "kept_per_rate": samples["num_samples"],
                    "temperature": samples["temperature"], "top_k": samples["top_k"], "seed": samples["seed"]},
        "seeds": {"sample": config.sample.seed, "train_autoencoder": model_config.train_autoencoder.seed,
                  "train_prior": model_config.train_prior.seed, "train_classifier": model_config.train_classifier.seed},
        "artifacts": {m["stage"]: m["url"] for m in [dataset, autoencoder, codes, samples]}
        | {stage_name(m): m["url"] for m in stages},
    }
    write_json(artifact.path("report.json"), report, options)
    write_bytes(artifact.path("report.md"), render_markdown(report, {n: f"{n}.png" for n in images}).encode(), options)
    publish_markdown("vqvae2-report", render_markdown(report, images),
                     f"vqvae2 report ({config.preset}, dataset {dataset['key']})")
    publish_table("vqvae2-fidelity", [_fidelity_cells(row) for row in rows],
                  f"FID/KID/precision/recall/IS per image set ({extractor.kind} features)")
    logger().info(f"report: {artifact.path('report.md')}")
    return {"report": artifact.path("report.json"), "markdown": artifact.path("report.md"), "metrics": metrics,
            "fidelity": rows, "extractor": extractor.kind}


def _fidelity_cells(row: dict[str, Any]) -> dict[str, Any]:
    keys = ("set", "rate", "fid", "kid_mean", "precision", "recall", "isc_mean", "num_generated", "judge_confidence")
    return {k: row.get(k) for k in keys}
