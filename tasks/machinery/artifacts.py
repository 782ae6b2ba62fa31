"""Where stage outputs live and how a finished one is recognised.

An `Artifact` is `{root}/{directory}/{artifact key}/`, complete once its typed `manifest.json` exists.
A `Marker` says, for any cached unit (a whole stage, one shard, one sample batch),
where "done" is written and how to read the unit's result back; the cached-unit
decorator (`tasks.machinery.cached`) asks nothing else.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from pydantic import TypeAdapter, ValidationError

from storage.artifacts import MANIFEST, artifact_url, clean_incomplete
from storage.fsutil import exists, join, read_bytes, redact, remove, sweep_temporaries, write_bytes
from storage.integrity import Damage, DamagedArtifact, FileRecord, damage, inventory

from ..manifests import Manifest, located

R = TypeVar("R")
M = TypeVar("M", bound=Manifest)


ABANDONED_AFTER_S = 24 * 3600.0  # a stage writing into its folder less often than this is not running
RECORDS = ".prefect"  # the folder of an artifact that holds Prefect's cache records of its units
INVENTORY = "inventory.json"  # every file of a complete artifact: size and SHA-256 (`Artifact.write_inventory`)


class ManifestError(ValueError):
    """A manifest or unit marker that exists but does not validate: names the file and the field."""


def logger():
    """The run's logger, imported when there is something to log: reading a finished artifact
    (`vqvae2 ls`, `report`) then needs no Prefect."""
    from .reporting import logger as run_logger

    return run_logger()


def _nothing(result: Any) -> None:
    return None


class UnitMarker(Protocol[R]):
    """What the cached-unit decorator asks of a unit: `Marker`, or an object that works
    the same and computes its parts lazily."""

    url: str
    record: str

    def read(self) -> R | None: ...
    def write(self, result: R) -> None: ...
    def is_done(self) -> bool: ...


@dataclass(frozen=True)
class Marker(Generic[R]):
    """Where one cached unit records that it is done.

    `read()` is the unit's result when it is done, None when it is not, and raises
    `ManifestError` when what it finds is damaged; `write(result)` runs after the unit's
    work and marks it done (last). `record` is where Prefect keeps its cache record of
    the unit, relative to the storage root: inside the artifact, so it goes when the
    artifact goes.
    """

    url: str
    record: str
    read: Callable[[], R | None]
    write: Callable[[R], None] = _nothing
    done: Callable[[], bool] | None = None  # a cheaper test than read(), when there is one

    def is_done(self) -> bool:
        return self.done() if self.done is not None else self.read() is not None


def read_typed(url: str, model: Any, storage_options: dict[str, Any] | None, root: str,
               extra: dict[str, Any] | None = None):
    """The JSON file at `url` validated as `model` (a pydantic model or a dataclass type), its
    paths read as URLs under `root`, or None if there is no such file; `extra` fields are
    filled in before validating."""
    if not exists(url, storage_options):
        return None
    try:
        parsed = json.loads(read_bytes(url, storage_options))
    except ValueError as err:
        raise ManifestError(f"{redact(url)}: not valid JSON ({err})") from None
    if extra:
        if not isinstance(parsed, dict):
            raise ManifestError(f"{redact(url)}: expected a JSON object, got {type(parsed).__name__}")
        parsed = {**parsed, **extra}
    try:
        return TypeAdapter(model).validate_python(parsed, context=located(root))
    except ValidationError as err:
        problem = err.errors()[0]
        where = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        raise ManifestError(f"{redact(url)}: field `{where}`: {problem['msg']}") from None


def write_typed(url: str, result: Any, storage_options: dict[str, Any] | None, root: str) -> None:
    """Write `result` as JSON, its URLs under `root` as paths relative to it."""
    data = TypeAdapter(type(result)).dump_json(result, indent=1, context=located(root))
    write_bytes(url, data, storage_options)


@dataclass(frozen=True)
class Artifact:
    """Where one stage output lives; everything a task needs to read or write it."""

    root: str
    directory: str  # the stage's directory under the root (`Stage.directory`)
    key: str
    storage_options: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def url(self) -> str:
        return artifact_url(self.root, self.directory, self.key)

    def path(self, *parts: str) -> str:
        return join(self.url, *parts)

    def identity(self) -> dict[str, str]:
        return {"directory": self.directory, "key": self.key, "url": self.url}

    def record(self, unit: str) -> str:
        """Prefect's cache record of one unit of this artifact, relative to the root."""
        return f"{self.directory}/{self.key}/{RECORDS}/{unit}.json"

    def read(self, model: type[M]) -> M | None:
        """The complete artifact's manifest, None while it is incomplete; `ManifestError` if damaged."""
        return read_typed(self.path(MANIFEST), model, self.storage_options, self.root, extra=self.identity())

    def read_whole(self, model: type[M]) -> M | None:
        """The manifest of a complete artifact whose files are all there at their recorded
        sizes, by one listing (nothing is hashed: a changed byte is `vqvae2 verify`'s to
        find). A file missing or cut short makes the artifact unfinished again, as
        `vqvae2 verify --repair` leaves it: its manifest removed first, then the files cut
        short, one line saying so; None is returned, and the stage makes those files again
        (its intact units and checkpoints are reused)."""
        try:
            manifest = self.read(model)
        except ManifestError:  # damaged: the stage's own unit names it and makes the artifact again
            return None
        if manifest is None or manifest.inventory is None:  # unfinished, or made before inventories
            return manifest
        try:
            lost = damage(self.url, self.read_inventory(manifest.inventory), self.storage_options, read=False)
        except FileNotFoundError:
            lost = [Damage(INVENTORY, "missing")]
        except DamagedArtifact as err:
            lost = [Damage(INVENTORY, str(err).removeprefix(redact(self.path(INVENTORY))).lstrip(": "))]
        if not lost:
            return manifest
        named = "; ".join(f"{d.path}: {d.what}" for d in lost[:3]) + (f"; and {len(lost) - 3} more" if len(lost) > 3 else "")
        logger().warning(f"{redact(self.url)} is not whole ({named}): making {'it' if len(lost) == 1 else 'them'} again")
        for url in [self.path(MANIFEST), *(self.path(d.path) for d in lost if d.what != "missing")]:
            if exists(url, self.storage_options):
                remove(url, self.storage_options)
        return None

    def is_complete(self) -> bool:
        """Whether the manifest exists (not read: a cheap check, for units of a finished artifact)."""
        return exists(self.path(MANIFEST), self.storage_options)

    def require(self, model: type[M], producer: str) -> M:
        """The manifest of a complete artifact, or a clear error naming the stage that makes it."""
        manifest = self.read(model)
        if manifest is None:
            raise FileNotFoundError(
                f"no complete {self.directory} artifact for this config at {redact(self.url)}: run the `{producer}` "
                "stage (or the whole pipeline) with the same config and storage root first"
            )
        return manifest

    def marker(self, model: type[M]) -> Marker[M]:
        """The whole stage's marker: its manifest, written last."""
        return Marker(
            url=self.path(MANIFEST), record=self.record("stage"), read=lambda: self.read(model),
            write=lambda manifest: write_typed(self.path(MANIFEST), manifest, self.storage_options, self.root),
        )

    def write_inventory(self, known: Mapping[str, FileRecord] | None = None) -> str:
        """Record the size and SHA-256 of every file of the artifact (but its manifest and
        Prefect's records) in `inventory.json`; returns that file's digest, for the manifest.
        `known`: files whose digest was recorded as they were written (shards, code chunks)."""
        files = inventory(self.url, self.storage_options, known, exclude=(MANIFEST, RECORDS, INVENTORY))
        lines = [f"{json.dumps(path)}: [{size}, {json.dumps(digest)}]" for path, (size, digest) in files.items()]
        data = ("{\n" + ",\n".join(lines) + "\n}\n").encode()  # a file a line
        write_bytes(self.path(INVENTORY), data, self.storage_options)
        return hashlib.sha256(data).hexdigest()

    def read_inventory(self, digest: str) -> dict[str, FileRecord]:
        """The artifact's inventory, checked against the `digest` its manifest recorded."""
        data = read_bytes(self.path(INVENTORY), self.storage_options)
        if hashlib.sha256(data).hexdigest() != digest:
            raise DamagedArtifact(f"{redact(self.path(INVENTORY))}: other bytes than its manifest records (SHA-256)")
        try:
            return {path: (int(size), str(sha)) for path, (size, sha) in json.loads(data).items()}
        except (ValueError, TypeError, AttributeError) as err:
            raise DamagedArtifact(f"{redact(self.path(INVENTORY))}: not an inventory ({err})") from None

    def tidy_stage(self) -> None:
        """At the start of the stage that owns them: remove its abandoned artifact folders
        (no manifest, untouched for a day: a failed run of a config since changed; a run of
        this key resumes into its own, so it is kept whatever its age) and the temporaries
        that killed writers left anywhere under the stage."""
        stage_url = join(self.root, self.directory)
        abandoned = clean_incomplete(self.root, self.directory, min_age_s=ABANDONED_AFTER_S,
                                     storage_options=self.storage_options, keep=[self.key])
        if abandoned:
            logger().info(f"removed {len(abandoned)} incomplete {self.directory} folders untouched for a day: {abandoned}")
        swept = sweep_temporaries(stage_url, self.storage_options)
        if swept:
            logger().info(f"removed {len(swept)} unfinished writes of killed processes: {swept}")

    def unit_marker(self, unit: str, model: Any) -> Marker:
        """A mapped unit's marker: `units/{unit}.json` holding its result, written after its output."""
        url = self.path("units", f"{unit}.json")
        return Marker(
            url=url, record=self.record(unit), read=lambda: read_typed(url, model, self.storage_options, self.root),
            write=lambda result: write_typed(url, result, self.storage_options, self.root),
        )
