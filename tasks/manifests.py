"""What the stages hand each other: one frozen, typed manifest per stage output, and the
small results of mapped units (a shard encoded, a batch sampled).

A manifest is `manifest.json` in its artifact directory, written last; it names files,
never holds tensors. The identity fields (`stage`, `key`, `url`) are filled in from where
a manifest is read, so one written by the storage layer alone (a dataset's) reads the
same. A manifest that does not validate is a `ManifestError` naming the artifact and the
field.

Files under the storage root (`RootURL` fields) are URLs in memory and paths relative to
the root at rest, in manifests, unit markers and Prefect's cache records, so a root that
is moved or copied (a folder renamed, a disk synced to S3) works where it lands:
`stored(record, root)` writes the relative form, validating with `located(root)` as
context reads it back as URLs under `root`.
"""
from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, PlainSerializer, SerializationInfo, ValidationInfo, WrapValidator

ROOT = "vqvae2-root"  # the validation/serialization context's key of the storage root
_ARTIFACT_PATH = re.compile(r"[^/]+/[0-9a-f]{16}(/|$)")  # {stage directory}/{key}...: where a root's files lie


def _root(info: ValidationInfo | SerializationInfo) -> str | None:
    context = info.context
    return context.get(ROOT) if isinstance(context, dict) else None


def _resolve(value: Any, handler: Any, info: ValidationInfo) -> str:
    value, root = handler(value), _root(info)
    if not root or "://" in value or value.startswith(("/", "~")):
        return value  # no root to resolve against, or already a URL (written before paths were relative)
    prefix = root.rstrip("/") + "/"
    if value.startswith(prefix) and _ARTIFACT_PATH.match(value[len(prefix):]):
        return value  # a relative root's URL, written before paths were relative
    return prefix + value


def _relative(value: str, info: SerializationInfo) -> str:
    root = _root(info)
    return from_root(value, root) if root else value


def from_root(url: str, root: str) -> str:
    """`url`'s path from `root` when it lies under it (what reports show), else `url` itself."""
    prefix = root.rstrip("/") + "/"
    return url[len(prefix):] if url.startswith(prefix) else url


# A file or folder under the storage root: its URL in memory, its path from the root at rest.
RootURL = Annotated[str, WrapValidator(_resolve), PlainSerializer(_relative, return_type=str)]


def located(root: str) -> dict[str, str]:
    """The pydantic context that reads (or writes) root-relative paths as (from) URLs under `root`."""
    return {ROOT: root}


class Record(BaseModel):
    # Unknown fields are ignored, so a newer writer's manifest still reads; a missing
    # field or a wrong type is an error.
    model_config = ConfigDict(frozen=True, extra="ignore")


class Manifest(Record):
    stage: str  # the stage's directory under the root: datasets, autoencoder, ...
    key: str
    url: RootURL
    seconds: float | None = None  # how long the stage took to compute it
    # SHA-256 of the artifact's inventory.json: the size and digest of each of its files, as
    # written (`vqvae2 verify` checks them). None in artifacts made before it was kept.
    inventory: str | None = None


# --- ingest ------------------------------------------------------------------------------


class Skipped(Record):
    ref: str
    reason: str


class ShardInfo(Record):
    name: str
    num_samples: int
    offset: int  # rows of the split before this shard


class SplitInfo(Record):
    num_samples: int
    class_counts: list[int]
    shards: list[ShardInfo]
    skipped: list[Skipped]


class DatasetManifest(Manifest):
    format: str
    source: dict[str, Any]  # the source as its describe() tells it (credentials redacted)
    source_digest: str
    config: dict[str, Any]  # the storage.ingest.IngestConfig it was made with
    image_size: int
    mode: str
    channels: int
    class_names: list[str]
    num_samples: int
    num_skipped: int
    splits: dict[str, SplitInfo]
    ignored: list[Skipped]
    carried: int = 0  # images copied in shards of `base`, the dataset the source made before it grew
    base: RootURL | None = None

    @property
    def labelled(self) -> bool:
        return bool(self.class_names)

    def shard_counts(self) -> dict[str, list[int]]:
        """{split: [samples per shard]}, what storage.codes.create_codes takes."""
        return {split: [s.num_samples for s in info.shards] for split, info in self.splits.items()}

    def shard_units(self) -> list[tuple[str, int]]:
        """(split, shard index) of every shard, in a stable order."""
        return [(split, i) for split, info in sorted(self.splits.items()) for i in range(len(info.shards))]


# --- trainings -----------------------------------------------------------------------------


class TrainingSummary(Record):
    """What one training run left: its final model, curves and metrics."""

    steps: int
    resumed_from_step: int
    epochs: int
    metrics: dict[str, float]
    model: RootURL  # model.pt, a vqvae2.to_checkpoint dict
    loss_curve: RootURL
    history: RootURL
    device: str
    processes: int = 1  # data-parallel ranks it trained with
    # Each time it diverged and went on from an earlier checkpoint at a lower learning rate
    # (at most once): {"diverged_at": step, "resumed_from": step, "lr_factor": 0.5}.
    recoveries: list[dict[str, int | float]] = []


class TrainedManifest(Manifest, TrainingSummary):
    @property
    def display_name(self) -> str:
        """autoencoder, prior-top, classifier-judge, ...: how reports and logs name it."""
        raise NotImplementedError


class AutoencoderManifest(TrainedManifest):
    dataset: str
    latent_shapes: list[tuple[int, int]]  # code grid of every level, top first
    codebook_size: int

    @property
    def display_name(self) -> str:
        return "autoencoder"


class PriorManifest(TrainedManifest):
    codes: str
    level: int
    level_name: str  # prior-top, prior-bottom, ...

    @property
    def display_name(self) -> str:
        return self.level_name


class ClassifierManifest(TrainedManifest):
    dataset: str
    role: str  # judge (rejection sampling) or features (the FID feature network)
    target: str = "labels"  # what it learned to predict: labels, or rotations (self-supervised)

    @property
    def display_name(self) -> str:
        return f"classifier-{self.role}"


# --- encode --------------------------------------------------------------------------------


class EncodedShard(Record):
    split: str
    index: int
    rows: int
    offset: int
    # storage.codes.CodesRecord: chunk object key -> (size, sha256) as write_codes wrote
    # it; a resumed encoding checks it before reusing the shard. None in markers written
    # before it was kept: those are trusted as before (their rows cannot be checked, and
    # encoding every finished shard of an interrupted run again would cost more than the
    # damage it might find; finish_codes still finds rows never written).
    chunks: dict[str, tuple[int, str]] | None = None


class CodesManifest(Manifest):
    codes: RootURL  # codes.zarr
    dataset: str
    autoencoder: str
    level_shapes: list[tuple[int, int]]
    rows: dict[str, int]
    codebook_size: int
    class_names: list[str]


# --- sample --------------------------------------------------------------------------------


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


# --- evaluate ------------------------------------------------------------------------------


class ReportManifest(Manifest):
    report: RootURL  # report.json
    markdown: RootURL  # report.md
    metrics: dict[str, float | int]
    fidelity: list[dict[str, float | int | str | None]]  # one row of FID/KID/PR/IS per image set
    extractor: str  # the feature space of the fidelity rows: inception or domain
