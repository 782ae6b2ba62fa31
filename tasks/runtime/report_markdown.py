"""The run report as markdown: the same text for `report.md` (images as files beside it)
and for the Prefect UI's markdown artifact (thumbnails inlined as data URIs, each linking
to its full image under the storage root)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .reporting import markdown_image


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def table(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _source(source: dict[str, Any]) -> str:
    where = source.get("url") or source.get("urls")
    return f"{source.get('kind', 'source')} at `{where}`"


def render_markdown(report: dict[str, Any], images: Mapping[str, str | bytes],
                    links: Mapping[str, str] | None = None) -> str:
    """`images` maps a name to a file name (report.md) or PNG bytes (inlined as a bounded
    thumbnail, linking to `links[name]`, the URL of the full image, where given)."""
    links = links or {}

    def image(name: str) -> str:
        value = images[name]
        return markdown_image(value, name, links.get(name)) if isinstance(value, bytes) else f"![{name}]({value})"

    fidelity, samples = report["fidelity"], report["samples"]
    keys = ("set", "fid", "kid_mean", "precision", "recall", "isc_mean", "num_generated", "judge_confidence")
    parts = [
        f"# vqvae2 report: `{report['preset']}`",
        f"Dataset `{report['dataset']['key']}`: {report['dataset']['images']} images, "
        f"{_source(report['dataset']['source'])}.",
        "## Samples",
        f"Temperature {samples['temperature']}, top-k {samples['top_k']}, seed {samples['seed']}; "
        f"{samples['candidates']} candidates, {samples['kept_per_rate']} kept per acceptance rate. "
        f"Rejection sampling: {samples.get('rejection', 'classifier-based')}. Without rejection:",
        image("samples"),
    ]
    if "rejection" in images:
        parts += ["Classifier-based rejection: per class (rows), the candidates the judge likes most (left) "
                  "and least (right):", image("rejection")]
    parts += [
        "## Sample quality",
        f"Feature space: **{fidelity['extractor']['kind']}**. {fidelity['extractor']['description']}. "
        f"Reference: {fidelity['reference']}.",
        table([{k: row.get(k) for k in keys} for row in fidelity["rows"]]),
        image("rejection-tradeoff"),
        "## Reconstructions", "Held-out images (left) and their reconstructions (right):", image("reconstructions"),
        "## Metrics", table([{"metric": k, "value": v} for k, v in report["metrics"].items()]),
        "## Training", table(report["training"]),
        "## Loss curves", "\n".join(image(name) for name in images if name.startswith("loss-")),
        "## Artifacts", table([{"artifact": k, "url": v} for k, v in report["artifacts"].items()]),
    ]
    return "\n\n".join(parts)
