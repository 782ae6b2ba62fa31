"""What a user watching the Prefect UI sees: progress bars, metric tables, markdown
reports with images, loss curves, and log lines.

Artifacts are created only inside a Prefect run; outside one (a notebook calling
`task.fn`) these helpers only log, so the pipeline code never branches on it.
"""
from __future__ import annotations

import base64
import io
import logging
import math
import re
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import quote
from uuid import UUID

import numpy as np
import torch
from PIL import Image
from prefect.artifacts import (
    TableArtifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactUpdate
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort
from prefect.context import get_run_context
from prefect.exceptions import MissingContextError
from prefect.futures import PrefectFuture, as_completed
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.settings import get_current_settings
from pydantic import BaseModel

from .rounding import rounded
from tqdm import tqdm

from storage.fsutil import redact

from ..config import PipelineConfig, config_key

THUMBNAIL_PX = 1024  # the long side of an image embedded in a UI artifact (it lives in Prefect's database)


def in_prefect_run() -> bool:
    try:
        get_run_context()
        return True
    except MissingContextError:
        return False


def logger() -> logging.Logger | logging.LoggerAdapter:
    return get_run_logger() if in_prefect_run() else logging.getLogger("vqvae2")


def ui_key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def config_ui_key(key: str) -> str:
    """`key` with the config key of the running flow's config (`trainings-<config key>`), so
    each config has its own artifact history in the UI (a smoke run does not replace
    fashion-mnist's "latest")."""
    short = flow_run_config_key(flow_run.get_id())
    return ui_key(f"{key}-{short}" if short else key)


def with_config_key(description: str) -> str:
    """A card's description saying which key its name carries: a run's cards carry two (the
    config key; the report's cards, the report key), and a hash alone says neither."""
    short = flow_run_config_key(flow_run.get_id())
    return f"{description} (config key {short})" if short else description


@lru_cache(maxsize=64)
def flow_run_config_key(flow_run_id: str | None) -> str | None:
    """The config key of the config a flow run runs (`config.config_key`: the storage root and the
    fields that decide the artifacts; the name of its run lease holds it too).
    So every run of one config into one root shares it, whichever flow (the pipeline or a
    stage flow), and two configs that would write different artifacts do not; fields that
    decide nothing (devices, log intervals, the runner) leave it alone. A stage's own
    artifact key would not do: it changes with the code version and with any upstream
    input, and differs from stage to stage, so neither the history nor one run's
    artifacts would line up under one key.

    Read from the flow run's `config` parameter, found from wherever a table is published:
    the task's thread (Prefect copies the flow run's context into it; a training's tables
    reach it from the training process through the relay), or a Dask worker (the flow
    run's id is in the task run's context, the parameters come from the API). Cached per
    flow run: trainings publish a table every epoch."""
    if flow_run_id is None:
        return None
    parameters = flow_run.get_parameters()
    # The config itself, or its sections as the flow's parameters (a flow whose UI form
    # shows each section): either way the fields config_key reads.
    config = parameters.get("config", parameters)

    try:
        if not isinstance(config, PipelineConfig):
            sections = {k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in dict(config).items()
                        if k in PipelineConfig.model_fields}
            if not sections:  # a flow that runs no config: the default config's key would be a lie
                return None
            config = PipelineConfig.model_validate(sections)
    except (TypeError, ValueError) as err:  # never fail a run over an artifact's name: use the plain key
        logger().warning(f"artifacts of flow run {flow_run_id} use plain keys: its parameters are no config ({err})")
        return None
    return config_key(config)


class Progress:
    """A progress artifact (a bar in the UI), and a bar in the terminal when there is one."""

    def __init__(self, description: str, total: int) -> None:
        self.total, self.description = max(total, 1), description
        self.id = create_progress_artifact(progress=0.0, description=description) if in_prefect_run() else None
        self.bar = tqdm(total=self.total, desc=description, disable=not sys.stderr.isatty(), leave=False)
        self.last = -1.0

    def update(self, done: int, note: str = "") -> None:
        done = min(done, self.total)
        percent = round(100.0 * done / self.total, 1)
        if self.id is not None and percent != self.last:
            description = f"{self.description}: {note}" if note else self.description
            update_progress_artifact(artifact_id=self.id, progress=percent, description=description)
        self.bar.update(done - self.bar.n)
        if note:
            self.bar.set_postfix_str(note, refresh=False)
        if done == self.total:
            self.bar.close()
        self.last = percent


def track(futures: Sequence[PrefectFuture], description: str) -> list[PrefectFuture]:
    """Wait for mapped tasks, moving a progress bar as each finishes; returns the futures.

    A unit that failed raises its own error here, the first one to fail: handed on, its
    future would leave the task that takes them Pending, and the run's error would be
    Prefect's "Run is in PENDING state" instead of the cause."""
    futures = list(futures)
    progress = Progress(description, len(futures))
    for done, future in enumerate(as_completed(futures), start=1):
        future.result()  # raises a failed unit's exception (its state may not read Failed yet)
        progress.update(done, f"{done}/{len(futures)} done")
    return futures


def publish_table(key: str, rows: Sequence[Mapping[str, Any]], description: str, per_config: bool = True) -> None:
    """A table artifact (a new version of `key` of this config each call: the UI shows the latest);
    `per_config=False`: of `key` itself, which names what the table shows."""
    if in_prefect_run() and rows:
        create_table_artifact(key=config_ui_key(key) if per_config else ui_key(key),
                              table=[_rounded(r) for r in rows],
                              description=with_config_key(description) if per_config else description)


class _RunTable:
    """One table artifact of a flow run, made of parts that arrive from several tasks and
    update it in place: one card in the run's Artifacts tab, however many epochs."""

    def __init__(self, key: str) -> None:
        self.key, self.parts, self.id = key, {}, None
        self.lock = threading.Lock()

    def put(self, part: str, rows: Sequence[Mapping[str, Any]], description: str) -> None:
        with self.lock:  # trainings report concurrently, each from its own thread
            self.parts[part] = [{"part": part, **_rounded(row)} for row in rows]
            table = [row for name in sorted(self.parts) for row in self.parts[name]]
            description = with_config_key(description)
            if self.id is None:
                self.id = create_table_artifact(key=config_ui_key(self.key), table=table, description=description)
                return
            with get_client(sync_client=True) as client:
                client.update_artifact(self.id, ArtifactUpdate(data=TableArtifact(table=table).format(),
                                                               description=description))


# The run tables of the flow runs of this process, by (flow run, key): a table lives as long
# as its flow run, and a process runs few flow runs.
_RUN_TABLES: dict[tuple[str, str], _RunTable] = {}
_RUN_TABLES_LOCK = threading.Lock()


def publish_part(key: str, part: str, rows: Sequence[Mapping[str, Any]], description: str) -> None:
    """`rows` as the part `part` of this flow run's table `key` (the rows a part had before are
    replaced; the other parts kept), created once and then updated in place: every training's
    epochs, say, in one card, not a new card per epoch."""
    if not in_prefect_run() or not rows:
        return
    with _RUN_TABLES_LOCK:
        table = _RUN_TABLES.setdefault((str(flow_run.get_id()), key), _RunTable(key))
    table.put(part, rows, description)


def publish_markdown(key: str, markdown: str, description: str) -> None:
    """A markdown artifact, a new version of `key` of this config."""
    if in_prefect_run():
        create_markdown_artifact(key=config_ui_key(key), markdown=markdown, description=with_config_key(description))


def publish_named_markdown(key: str, markdown: str, description: str) -> UUID | None:
    """A markdown artifact of `key` itself (not of this config's key): its id, None outside a run."""
    if not in_prefect_run():
        return None
    return create_markdown_artifact(key=ui_key(key), markdown=markdown, description=description)


def artifact_ui_url(artifact_id: UUID | str | None) -> str | None:
    """Where Prefect's default UI shows an artifact; None without a UI (ephemeral mode, which
    has no server once the run ends)."""
    base = get_current_settings().ui_url
    return f"{str(base).rstrip('/')}/artifacts/artifact/{artifact_id}" if base and artifact_id else None


def latest_artifact_ui_url(key: str) -> str | None:
    """The UI page of the newest version of the artifact `key`; None without a UI or artifact."""
    if get_current_settings().ui_url is None:
        return None
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(limit=1, sort=ArtifactSort.UPDATED_DESC,
                                      artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[ui_key(key)])))
    return artifact_ui_url(found[0].id) if found else None


def _rounded(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}


def format_metrics(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{k}={rounded(v)}" for k, v in metrics.items())


# --- images --------------------------------------------------------------------------------


def image_grid(images: torch.Tensor, columns: int | None = None, pad: int = 1) -> np.ndarray:
    """Images (N, C, H, W) in [0, 1] -> one uint8 grid (rows x cols), H x W (gray) or H x W x 3."""
    from torchvision.utils import make_grid

    n, c, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    # White cells fill the last row and one extra row: make_grid then always draws `columns`
    # cells a row (it narrows to n when n < columns) and pads even one image (it returns a
    # lone image bare). The extra row is cropped off.
    blank = torch.ones(rows * columns - n + columns, c, h, w)
    cells = torch.cat([images.detach().float().cpu().clamp(0, 1), blank])
    grid = make_grid(cells, nrow=columns, padding=pad, pad_value=1.0)  # gray comes back as 3 copies
    grid = grid[:c, : rows * (h + pad) + pad]
    array = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return array[:, :, 0] if c == 1 else array


def pairs_grid(originals: torch.Tensor, reconstructions: torch.Tensor, count: int) -> np.ndarray:
    """Originals and their reconstructions side by side, in column pairs; `count` images in all."""
    n = max(1, min(count // 2, len(originals)))
    interleaved = torch.stack([originals[:n], reconstructions[:n]], dim=1).flatten(0, 1)
    return image_grid(interleaved, columns=2 * max(1, round(math.sqrt(n))))


def display_scale(image_size: int) -> int:
    """Enlargement that makes a grid of small images readable in the UI."""
    return max(1, 128 // image_size)


def png_bytes(image: np.ndarray, scale: int = 1) -> bytes:
    """uint8 H x W (x 3) -> PNG bytes, optionally enlarged (nearest) so small images stay visible."""
    pil = Image.fromarray(image)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    out = io.BytesIO()
    pil.save(out, format="PNG", optimize=True)
    return out.getvalue()


def thumbnail_png(png: bytes, size: int = THUMBNAIL_PX) -> bytes:
    """PNG bytes no larger than `size` on the long side (aspect kept, LANCZOS); a smaller
    image comes back as it is. An ffhq-1024 grid of 64 images is ~8k x 8k pixels."""
    image = Image.open(io.BytesIO(png))
    if max(image.size) <= size:
        return png
    if image.mode not in ("L", "LA", "RGB", "RGBA"):  # palette or 1-bit: resample in full colour
        image = image.convert("RGBA")
    image.thumbnail((size, size), Image.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


_KEPT_IN_LINKS = ":/?#[]@!$&'*+,;=%~"  # a URL's own delimiters; the rest is escaped


def full_size_note(url: str, alt: str) -> str:
    """Where the full image is, as markdown: a link where a browser can follow one (http or
    https), else the path or URL as text. A local path is one on the worker's machine, and
    `s3://` opens in no browser: as links they would be dead wherever the UI is read. A
    `user:password@` part never reaches the UI."""
    shown = redact(url)
    if shown.startswith(("http://", "https://")):
        # Spaces and parentheses would end a markdown link: escaped.
        return f"[{alt}: full size]({quote(shown, safe=_KEPT_IN_LINKS)})"
    fence = "``" if "`" in shown else "`"
    return f"{alt}, full size: {fence}{shown}{fence}"


def markdown_image(png: bytes, alt: str, full: str | None = None) -> str:
    """An inline image the Prefect UI renders without access to the storage root: a thumbnail
    (the artifact lives in Prefect's database), then where the full image is (`full_size_note`).
    Not an image inside a link: Prefect's default (V1) UI shows such a link's text raw."""
    inline = f"![{alt}](data:image/png;base64,{base64.b64encode(thumbnail_png(png)).decode()})"
    return f"{inline}\n\n{full_size_note(full, alt)}" if full else inline


@dataclass(frozen=True)
class Panel:
    """One plot: named series of (x, y) points."""

    title: str
    xlabel: str
    series: Mapping[str, Sequence[tuple[float, float]]]
    log_x: bool = False
    invert_x: bool = False


def plot_png(panels: Sequence[Panel]) -> bytes:
    """Line plots side by side, as PNG bytes; a y range wider than 50x gets a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.4), dpi=100, squeeze=False)
    try:
        for ax, panel in zip(axes[0], panels):
            for label, points in panel.series.items():
                if len(points) == 1:  # a run that logged once: no line to draw, so a clear point and its value
                    (x, y), = points
                    ax.plot([x], [y], marker="o", markersize=9, linestyle="none", label=label)
                    ax.annotate(f"{y:.4g}", (x, y), textcoords="offset points", xytext=(8, 8))
                elif points:
                    ax.plot(*zip(*points), marker="o" if len(points) < 20 else None, label=label)
            values = [y for points in panel.series.values() for _, y in points if y > 0]
            if values and max(values) / min(values) > 50:
                ax.set_yscale("log")
            if panel.log_x:
                ax.set_xscale("log")
                xs = sorted({x for points in panel.series.values() for x, _ in points})
                if 0 < len(xs) <= 12:  # label the measured points, not just the decades
                    ax.set_xticks(xs, [f"{x:g}" for x in xs])
                    ax.minorticks_off()
            if panel.invert_x:
                ax.invert_xaxis()
            ax.set_xlabel(panel.xlabel)
            ax.set_title(panel.title)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        out = io.BytesIO()
        fig.savefig(out, format="png")
        return out.getvalue()
    finally:
        plt.close(fig)


def loss_curve_png(history: Sequence[Mapping[str, float]], title: str, keys: Sequence[str] = ("loss",)) -> bytes:
    """The training loss (and other `keys`) against the step."""
    series = {key: [(row["step"], row[key]) for row in history if key in row] for key in keys}
    return plot_png([Panel(title, "step", series)])


def _markdown_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_markdown_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
