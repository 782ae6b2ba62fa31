"""Whether stored files still hold what was written: the inventory of a folder (every
file's size and SHA-256, recorded once when an artifact completes) and the check of the
folder against it.

    files = inventory(url, known={"train/shard-000000.tar": (size, sha256)})  # the rest is hashed
    for problem in damage(url, files):
        print(problem.path, problem.what)

A reader that meets a damaged file raises :class:`DamagedArtifact`, naming the file and
how to mend it (:data:`REPAIR`): a retry would read the same bytes.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from .fsutil import TMP_MARKER, StorageOptions, find, join, redact, sha256_file

FileRecord = tuple[int, str]  # (size in bytes, hex SHA-256)

REPAIR = ("the stored file is damaged: run `vqvae2 verify --root <storage root> --repair`, then run again: "
          "only the damaged files are made again")


def repair_advice(root: str) -> str:
    """What mends a damaged file of a finished artifact under the storage root `root`."""
    return REPAIR.replace("<storage root>", redact(root))


class DamagedArtifact(ValueError):
    """A stored file of a finished artifact does not read back as it was written."""


@dataclass(frozen=True)
class Damage:
    path: str  # relative to the folder checked
    what: str  # "missing", "has 10 bytes, recorded 20", ...


def inventory(url: str, storage_options: StorageOptions = None, known: Mapping[str, FileRecord] | None = None,
              exclude: Collection[str] = ()) -> dict[str, FileRecord]:
    """`{path relative to url: (size, sha256)}` of every file under the folder `url`, but
    those under the relative prefixes `exclude` and unfinished writes. A file in `known`
    (recorded as it was written) is taken from there when its size agrees; the rest are read."""
    known = known or {}
    files = {}
    for rel, info in sorted(find(url, storage_options).items()):
        if TMP_MARKER in rel or any(rel == prefix or rel.startswith(prefix.rstrip("/") + "/") for prefix in exclude):
            continue
        size, recorded = int(info["size"]), known.get(rel)
        digest = recorded[1] if recorded and recorded[0] == size else sha256_file(join(url, rel), storage_options)
        files[rel] = (size, digest)
    return files


def damage(url: str, files: Mapping[str, FileRecord], storage_options: StorageOptions = None,
           read: bool = True) -> list[Damage]:
    """The files of `files` under the folder `url` that are missing, of another size or with
    other bytes than recorded. Sizes come from one listing; only files of the right size are
    read, and none with `read=False` (a cheap check: a changed byte goes unseen)."""
    present = find(url, storage_options)
    found = []
    for rel, (size, digest) in sorted(files.items()):
        info = present.get(rel)
        if info is None:
            found.append(Damage(rel, "missing"))
        elif int(info["size"]) != size:
            found.append(Damage(rel, f"has {info['size']} bytes, recorded {size}"))
        elif read and sha256_file(join(url, rel), storage_options) != digest:
            found.append(Damage(rel, "other bytes than recorded (SHA-256), same size"))
    return found
