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

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PlainSerializer, SerializationInfo, ValidationInfo, WrapValidator

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

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        RECORD_TYPES[cls.__name__] = cls


# Every record type, by class name (each stage module declares its own): how a cache record
# that names its result's class finds it, also where an older version of the code kept it.
RECORD_TYPES: dict[str, type[Record]] = {}


def record_type(qualified_name: Any) -> type[Record] | None:
    """The record type a cache record names (`tasks.stages.ingest.DatasetManifest`), found
    among this package's own record types by its class name, wherever its module was when the
    record was written; None for any other class, which is never imported."""
    if not isinstance(qualified_name, str) or not qualified_name.startswith(__package__ + "."):
        return None
    return RECORD_TYPES.get(qualified_name.rpartition(".")[2])


def qualified_name(model: type[Record]) -> str:
    return f"{model.__module__}.{model.__qualname__}"


class Manifest(Record):
    # The stage's directory under the root: datasets, autoencoder, ... (`Stage.directory`;
    # manifests written before it had this name call it `stage`).
    directory: str = Field(validation_alias=AliasChoices("directory", "stage"))
    key: str
    url: RootURL
    seconds: float | None = None  # how long the stage took to compute it
    # SHA-256 of the artifact's inventory.json: the size and digest of each of its files, as
    # written (`vqvae2 verify` checks them). None in artifacts made before it was kept.
    inventory: str | None = None


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
