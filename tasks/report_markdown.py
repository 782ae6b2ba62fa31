"""A report as Markdown: `report.md` beside its files (images by file name), and the card in
Prefect's UI (images inlined as thumbnails, each followed by where its full file is)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .fidelity import PER_CLASS_MIN
from .machinery.reporting import markdown_image, markdown_table

if TYPE_CHECKING:
    from .stages.evaluate import Report


def per_class_part(report: Report) -> list[str]:
    """The per-class FID table, a class with too few images marked, never left out."""
    if not report.per_class:
        return []
    rows = [{"class": f"{row['class']} {row['name']}", "samples": row["samples"], "reference images": row["reference"],
             "FID": row["fid"] if row["fid"] is not None else f"too few images (under {PER_CLASS_MIN})"}
            for row in report.per_class]
    return ["### Per class", f"Each class's samples without rejection against its held-out images, in the same "
            f"feature space; a class with fewer than {PER_CLASS_MIN} images on either side gets no FID.",
            markdown_table(rows)]


def _source(source: dict[str, Any]) -> str:
    where = source.get("url") or source.get("urls")
    return f"{source.get('kind', 'source')} at `{where}`"


def render_markdown(report: Report, images: Mapping[str, str | bytes],
                    links: Mapping[str, str] | None = None) -> str:
    """`images` maps a name to a file name (report.md) or PNG bytes (inlined as a bounded
    thumbnail, linking to `links[name]`, the URL of the full image, where given)."""
    links = links or {}

    def image(name: str) -> str:
        value = images[name]
        return markdown_image(value, name, links.get(name)) if isinstance(value, bytes) else f"![{name}]({value})"

    fidelity, samples, dataset = report.fidelity, report.samples, report.dataset
    keys = ("set", "fid", "kid_mean", "precision", "recall", "isc_mean", "num_generated", "judge_confidence")
    parts = [
        f"# vqvae2 report: `{report.preset}`",
        f"Dataset `{dataset.key}`: {dataset.images} images, "
        f"{_source(dataset.source)}.",
        "## Samples",
        f"{(samples.drawn or f'temperature {samples.temperature}, top-k {samples.top_k}').capitalize()}, "
        f"seed {samples.seed}; "
        f"{samples.candidates} candidates, {samples.kept_per_rate} kept per acceptance rate. "
        f"Rejection sampling: {samples.rejection}. Without rejection:",
        image("samples"),
    ]
    if "rejection" in images:
        parts += ["Classifier-based rejection: per class (rows), the candidates the judge likes most (left) "
                  "and least (right):", image("rejection")]
    parts += [
        "## Sample quality",
        f"Feature space: **{fidelity.extractor['kind']}**. {fidelity.extractor['description']}. "
        f"Reference: {fidelity.reference}.",
        markdown_table([{k: row.get(k) for k in keys} for row in fidelity.rows]),
        image("rejection-tradeoff"),
        *per_class_part(report),
        "## Reconstructions", "Held-out images (left) and their reconstructions (right):", image("reconstructions"),
        "## Metrics", markdown_table([{"metric": k, "value": v} for k, v in report.metrics.items()]),
        "## Training", markdown_table(report.training),
        "## Loss curves", "\n".join(image(name) for name in images if name.startswith("loss-")),
        "## Artifacts", markdown_table([{"artifact": k, "url": v} for k, v in report.artifacts.items()]),
    ]
    return "\n\n".join(parts)
