"""`vqvae2 verify`: every finished artifact under a storage root checked against what was
recorded when it was made, and, with `repair`, the damaged files dropped so that the next
run of the configs that made them makes exactly those again.

A complete artifact's manifest holds the digest of its `inventory.json`, which holds the
size and SHA-256 of each of its files (`Artifact.write_inventory`). A file that is missing,
of another size or with other bytes is damaged; so is a manifest, an inventory or a
Prefect cache record that does not read. Sizes come from one listing per artifact; every
file of the right size is read once.

Repairing an artifact removes its manifest first (from then on it is unfinished, whatever
happens next), then its damaged files. The next run of its stage finds its intact units
done (shards, code chunks and sample batches are checked against their own records; a
training resumes from its newest intact checkpoint) and makes the rest again: every unit
is a function of the artifact's inputs, so the root ends as an undisturbed run leaves it,
and the artifacts made from this one keep their keys and stay `Cached`. A damaged cache
record alone is removed alone: Prefect's record of a finished unit is written again.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

from storage.artifacts import MANIFEST, list_artifacts
from storage.fsutil import exists, find, join, read_bytes, redact, remove
from storage.integrity import Damage, DamagedArtifact, damage

from .manifests import Manifest
from .machinery.artifacts import INVENTORY, RECORDS, Artifact, ManifestError
from .stages import STAGES


@dataclass(frozen=True)
class Checked:
    """One complete artifact, checked."""

    artifact: Artifact
    files: int  # files its inventory records (0: made before inventories were kept)
    damaged: list[Damage] = field(default_factory=list)  # paths relative to the artifact

    @property
    def recorded(self) -> bool:
        return self.files > 0 or bool(self.damaged)

    @property
    def finished_damaged(self) -> bool:
        """Whether its stage must run again: a damaged file beyond Prefect's cache records."""
        return any(not d.path.startswith(f"{RECORDS}/") for d in self.damaged)


def verify_root(root: str, storage_options: dict | None = None) -> list[Checked]:
    """Every complete artifact of every stage under `root`, checked, in pipeline order."""
    return list(_check_all(root, storage_options or {}))


def _check_all(root: str, storage_options: dict) -> Iterator[Checked]:
    seen = set()
    for stage in STAGES:
        if stage.directory in seen:
            continue
        seen.add(stage.directory)
        for key in list_artifacts(root, stage.directory, storage_options):
            yield _check(Artifact(root, stage.directory, key, storage_options), stage.output)


def _check(artifact: Artifact, output: type[Manifest]) -> Checked:
    records = _damaged_records(artifact)
    try:
        manifest = artifact.read(output)
    except ManifestError as err:
        return Checked(artifact, 0, [Damage(MANIFEST, _reason(err, artifact.path(MANIFEST))), *records])
    if manifest is None:  # removed since it was listed
        return Checked(artifact, 0, records)
    if manifest.inventory is None:
        return Checked(artifact, 0, records)
    try:
        files = artifact.read_inventory(manifest.inventory)
    except (DamagedArtifact, FileNotFoundError) as err:
        return Checked(artifact, 0, [Damage(INVENTORY, _reason(err, artifact.path(INVENTORY))), *records])
    return Checked(artifact, len(files), damage(artifact.url, files, artifact.storage_options) + records)


def _damaged_records(artifact: Artifact) -> list[Damage]:
    """Prefect's cache records of the artifact that do not read as JSON."""
    folder = artifact.path(RECORDS)
    if not exists(folder, artifact.storage_options):
        return []
    found = []
    for name in sorted(find(folder, artifact.storage_options)):
        try:
            json.loads(read_bytes(join(folder, name), artifact.storage_options))
        except ValueError as err:
            found.append(Damage(f"{RECORDS}/{name}", f"not valid JSON ({err})"))
    return found


def _reason(err: Exception, url: str) -> str:
    """An error's message without the URL it starts with (the report names the file)."""
    return str(err).removeprefix(redact(url)).lstrip(": ") or type(err).__name__


@dataclass
class Repaired:
    """What `repair` did to each damaged file `verify_root` listed: dropped it, or found it
    missing already. The manifests removed with them are not counted: nothing was wrong
    with those, they only mark their artifacts finished."""

    dropped: list[str] = field(default_factory=list)  # URLs of the damaged files removed
    missing: list[str] = field(default_factory=list)  # URLs of the damaged files that were not there to remove


def repair(checked: list[Checked]) -> Repaired:
    """Drop what `verify_root` found damaged, each artifact's manifest first (see the module doc)."""
    done = Repaired()
    for result in checked:
        artifact, options = result.artifact, result.artifact.storage_options
        damaged = [artifact.path(d.path) for d in result.damaged]
        manifest = artifact.path(MANIFEST)
        if result.finished_damaged and manifest not in damaged and exists(manifest, options):
            remove(manifest, options)
        for url in dict.fromkeys(damaged):  # a damaged manifest comes first (`_check`)
            if exists(url, options):
                remove(url, options)
                done.dropped.append(redact(url))
            else:
                done.missing.append(redact(url))
    return done
