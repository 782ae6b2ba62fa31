"""Prefect tasks whose output is a content-addressed artifact (ARCHITECTURE.md, "Contracts").

`@artifact_task(...)` turns `fn(..., artifact) -> manifest` into a Prefect task that

- locates its artifact `{root}/{stage}/{key}/` from its parameters (the key digests the
  stage, its config section, the keys of its inputs and the stage's code version);
- has Prefect cache key = that artifact key, but only while the artifact is complete,
  so deleting an artifact makes the next run recompute it instead of trusting a stale
  cache entry;
- when the artifact is already complete (say the Prefect cache was lost), returns its
  manifest at once in a `Cached` state, doing no work and rewriting nothing;
- otherwise runs `fn`, which writes its outputs under `artifact.url`, and then writes
  `manifest.json` last (unless `fn` wrote it itself, as dataset ingestion does), so a
  crash never leaves an artifact that looks complete;
- returns the manifest with the artifact's identity (stage, key, url) filled in;
- retries with a delay, on the same artifact directory (training resumes there).
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prefect import task
from prefect.states import Completed

from storage.artifacts import artifact_key, artifact_url, read_manifest, write_manifest
from storage.fsutil import join

RETRIES = 2
RETRY_DELAYS = [5, 60]


@dataclass(frozen=True)
class Artifact:
    """Where one stage output lives; everything a task needs to read or write it."""

    root: str
    stage: str
    key: str
    storage_options: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, root: str, stage: str, config_section: Any, inputs: dict[str, str], code_version: str,
           storage_options: dict[str, Any] | None = None) -> Artifact:
        return cls(root, stage, artifact_key(stage, config_section, inputs, code_version), dict(storage_options or {}))

    @property
    def url(self) -> str:
        return artifact_url(self.root, self.stage, self.key)

    def path(self, *parts: str) -> str:
        return join(self.url, *parts)

    def manifest(self) -> dict[str, Any] | None:
        return read_manifest(self.url, self.storage_options)

    def identify(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return {**manifest, "stage": self.stage, "key": self.key, "url": self.url}

    def cache_key(self) -> str:
        # The same key under another root is another artifact.
        root = hashlib.sha256(self.root.encode()).hexdigest()[:8]
        return f"vqvae2-{self.stage}-{self.key}-{root}"


def unit_task(*, name: str, task_run_name: str, cache_key_fn: Callable[[Any, dict[str, Any]], str | None]):
    """A task for one unit of a mapped stage (a shard, a batch) that writes part of an
    artifact; `cache_key_fn` returns a key only once the unit's output exists."""
    return task(name=name, task_run_name=task_run_name, cache_key_fn=cache_key_fn, persist_result=True,
                retries=RETRIES, retry_delay_seconds=RETRY_DELAYS)


def require(artifact: Artifact, producer: str) -> dict[str, Any]:
    """The manifest of a complete artifact, or a clear error naming the stage that makes it."""
    manifest = artifact.manifest()
    if manifest is None:
        raise FileNotFoundError(
            f"no complete {artifact.stage} artifact for this config at {artifact.url}: run the `{producer}` "
            "stage (or the whole pipeline) with the same config and storage root first"
        )
    return artifact.identify(manifest)


def artifact_task(
    *,
    locate: Callable[..., Artifact],
    name: str | None = None,
    task_run_name: str | None = None,
    retries: int = RETRIES,
    retry_delay_seconds: list[float] | float = RETRY_DELAYS,
    **task_options: Any,
):
    """Decorate `fn(*params, artifact: Artifact) -> dict`; `locate(*params)` names its artifact."""

    def decorate(fn: Callable[..., dict[str, Any]]):
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any):
            artifact = locate(*args, **kwargs)
            done = artifact.manifest()
            if done is not None:
                return Completed(
                    name="Cached", data=artifact.identify(done), message=f"{artifact.stage}/{artifact.key} is complete"
                )
            started = time.time()
            manifest = {**fn(*args, artifact=artifact, **kwargs), "seconds": round(time.time() - started, 3)}
            if artifact.manifest() is not None:
                return artifact.identify(manifest)
            return write_manifest(artifact.url, artifact.identify(manifest), artifact.storage_options)

        # Prefect binds parameters by signature: show it fn's, without the artifact.
        signature = inspect.signature(fn)
        run.__signature__ = signature.replace(
            parameters=[p for p in signature.parameters.values() if p.name != "artifact"]
        )
        del run.__wrapped__

        def cache_key(context: Any, parameters: dict[str, Any]) -> str | None:
            artifact = locate(**parameters)
            return artifact.cache_key() if artifact.manifest() is not None else None

        return task(
            run,
            name=name or fn.__name__.replace("_", "-"),
            task_run_name=task_run_name,
            cache_key_fn=cache_key,
            persist_result=True,
            retries=retries,
            retry_delay_seconds=retry_delay_seconds,
            **task_options,
        )

    return decorate
