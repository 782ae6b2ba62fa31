"""The content-addressed artifact store: ``{root}/{directory}/{key}/``, complete once ``manifest.json`` exists.

``key`` digests everything that determines a stage's output (the stage's directory, its
config section, the keys of its inputs, a code version), so equal work lands in the
same directory and a finished one is found instead of redone::

    key = artifact_key("autoencoder", settings, {"dataset": dataset_key}, code_version="1")
    url = artifact_url(root, "autoencoder", key)
    manifest = read_manifest(url)          # None: not there or not finished
    ...                                    # write outputs under url
    write_manifest(url, {"metrics": ...})  # last: marks it complete

Readers ignore directories without a manifest; :func:`clean_incomplete` removes
abandoned ones. Checkpoints live in :mod:`storage.checkpoints`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image

from .fsutil import StorageOptions, exists, find, join, modified_time, read_json, redact, remove, write_bytes, write_json

MANIFEST = "manifest.json"
KEY_LENGTH = 16  # hex digits of SHA-256 kept: 64 bits, no collision among any realistic number of runs


# A setting added after keys were first made enters a key only when it differs from its
# default, so that adding it leaves every existing key (and the artifacts it names) as it was:
#     pydantic:    top_p: Annotated[float | None, IN_KEY_WHEN_SET] = None
#     dataclasses: ema_decay: float = field(default=0.0, metadata=IN_KEY_WHEN_SET)
# (vqvae2's dataclasses, which import nothing of storage, spell it {"in_key": "when set"}).
IN_KEY_WHEN_SET = MappingProxyType({"in_key": "when set"})


def canonical_json(obj: Any) -> str:
    """One spelling per value: sorted keys, no spaces; dataclasses and pydantic models become
    dicts, without their `IN_KEY_WHEN_SET` fields that hold their defaults."""
    return json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def without_unset_additions(obj: Any, data: Any) -> Any:
    """`data`, the plain form of `obj` (a dataclass or pydantic model, or a list of them),
    without the `IN_KEY_WHEN_SET` fields, at any depth, whose values are their defaults."""
    if isinstance(obj, (list, tuple)) and isinstance(data, (list, tuple)):
        return [without_unset_additions(o, d) for o, d in zip(obj, data)]
    fields = _fields(obj)
    if fields is None or not isinstance(data, dict):
        return data
    kept = {}
    for name, value in data.items():
        field = fields.get(name)
        if field is not None:
            marks, default = field
            if any(_marks_addition(m) for m in marks) and getattr(obj, name) == default:
                continue
            value = without_unset_additions(getattr(obj, name), value)
        kept[name] = value
    return kept


def _fields(obj: Any) -> dict[str, tuple[list[Any], Any]] | None:
    """{field: (its marks, its default)} of a dataclass or pydantic model instance, else None."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: ([f.metadata], f.default) for f in dataclasses.fields(obj)}
    model_fields = getattr(type(obj), "model_fields", None)  # pydantic, without importing it
    if isinstance(model_fields, dict) and hasattr(obj, "model_dump"):
        return {name: (list(info.metadata), info.default) for name, info in model_fields.items()}
    return None


def _marks_addition(mark: Any) -> bool:
    return isinstance(mark, Mapping) and mark.get("in_key") == "when set"


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _plain(without_unset_additions(obj, dataclasses.asdict(obj)))
    if hasattr(obj, "model_dump"):  # pydantic, without importing it
        return _plain(without_unset_additions(obj, obj.model_dump(mode="json")))
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise ValueError(f"artifact_key: {type(obj).__name__} {obj!r} has no canonical JSON form; pass plain data")


def artifact_key(directory: str, config_section: Any, input_keys: Sequence[str] | Mapping[str, str],
                 code_version: str) -> str:
    """Stable digest of (stage directory, config section, input keys, code version): the artifact's name."""
    payload = {"stage": directory, "config": config_section, "inputs": input_keys, "code_version": str(code_version)}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:KEY_LENGTH]


def artifact_url(root: str, stage: str, key: str) -> str:
    """``{root}/{stage}/{key}``: the stage's directory and the artifact key."""
    return join(root, stage, key)


def write_manifest(url: str, manifest: Mapping[str, Any], storage_options: StorageOptions = None) -> dict[str, Any]:
    """Write ``{url}/manifest.json`` atomically; call it after every other output is in place."""
    manifest = dict(manifest)
    write_json(join(url, MANIFEST), manifest, storage_options)
    return manifest


def read_manifest(url: str, storage_options: StorageOptions = None) -> dict[str, Any] | None:
    """The manifest of the artifact at ``url``, or None while it is missing or incomplete."""
    path = join(url, MANIFEST)
    if not exists(path, storage_options):
        return None
    return read_json(path, storage_options)


def list_artifacts(root: str, stage: str, storage_options: StorageOptions = None) -> list[str]:
    """Keys of the complete artifacts of ``stage``."""
    return sorted(k for k, complete in _stage_dirs(root, stage, storage_options).items() if complete)


def _stage_dirs(root: str, stage: str, storage_options: StorageOptions) -> dict[str, bool]:
    """``{key: complete}`` for every directory under ``{root}/{stage}``."""
    stage_url = join(root, stage)
    if not exists(stage_url, storage_options):
        return {}
    dirs: dict[str, bool] = {}
    for rel in find(stage_url, storage_options):
        key, _, rest = rel.partition("/")
        if not rest:  # a file beside the artifact directories is none of them
            continue
        dirs[key] = dirs.get(key, False) or rest == MANIFEST
    return dirs


def clean_incomplete(
    root: str,
    stage: str | None = None,
    *,
    min_age_s: float = 3600.0,
    storage_options: StorageOptions = None,
    keep: Sequence[str] = (),
) -> list[str]:
    """Delete artifact directories without a manifest whose newest file is older than ``min_age_s``.

    The age guard spares directories a running task is still writing; ``keep`` names keys
    to spare whatever their age (the one a stage is about to resume). Returns the URLs
    removed. ``stage=None`` cleans every stage under ``root``.
    """
    if not exists(root, storage_options):
        return []
    stages = [stage] if stage is not None else sorted({rel.split("/", 1)[0] for rel in find(root, storage_options) if "/" in rel})
    removed = []
    now = time.time()
    for st in stages:
        for key, complete in _stage_dirs(root, st, storage_options).items():
            if complete or key in keep:
                continue
            url = artifact_url(root, st, key)
            files = find(url, storage_options)
            newest = max((modified_time(info) or now for info in files.values()), default=0.0)
            if now - newest >= min_age_s:
                remove(url, storage_options)
                removed.append(redact(url))
    return removed


def save_png(url: str, image: np.ndarray, storage_options: StorageOptions = None) -> None:
    """Write a uint8 image (H x W gray, H x W x 3 RGB, or H x W x 1) as PNG, atomically."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise ValueError(
            f"save_png({redact(url)}): need a uint8 H x W or H x W x {{1,3,4}} array, got {image.dtype} {image.shape}"
        )
    out = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image).save(out, format="PNG")
    write_bytes(url, out.getvalue(), storage_options)
