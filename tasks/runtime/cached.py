"""One decorator for every cached unit of work: a whole stage, one shard, one sample batch.

    @cached_unit(locate=lambda shard, dataset: ..., name="encode-shard")
    def encode_shard(...) -> EncodedShard: ...

`locate(**params)` names the unit's `Marker`. The unit's Prefect cache key is the path
of its cache record, kept under the storage root inside the unit's artifact
(`cache_records`), so a second machine, a fresh PREFECT_HOME or a re-run after Prefect's
own cache was lost all find it, and Prefect itself reports the unit `Cached`.

- The record exists: Prefect returns its result, `Cached`; the unit does no work.
- No record, but the marker says done (a root written before records were kept here,
  or a record deleted): the unit returns what the marker holds, doing no work, and
  Prefect writes the record, so the next run is `Cached`.
- Not done: the unit runs, then its marker is written, then Prefect's record.
- A damaged marker (a manifest that does not validate): the unit is not done. Its
  stale record is dropped and the unit recomputes, overwriting the marker; the damage is
  logged naming the file and the field. Recomputing is cheap where it matters most:
  a training resumes from its last checkpoint.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
from collections.abc import Callable
from typing import Any

from prefect import Task, task
from prefect.blocks.fields import SecretDict
from prefect.filesystems import WritableFileSystem
from prefect.settings import get_current_settings
from pydantic import Field

from storage.artifacts import canonical_json
from storage.fsutil import exists, join, read_bytes, redact, remove, write_bytes

from .artifacts import ManifestError, UnitMarker
from .failures import retry_unless_permanent
from .reporting import logger

RETRIES = 2  # of an error a retry can cure (`tasks.runtime.failures`); others fail at once
RETRY_DELAYS = [5, 60]
RETRY_JITTER = 0.5  # each wait up to 50% longer at random: retries of many mapped units do not move in step


class CacheRecords(WritableFileSystem):
    """Prefect's cache records, kept under a pipeline's storage root beside the artifacts.

    Prefect wants the result storage of a task saved as a block; the storage options
    (which may hold credentials) are a `SecretDict`, so the UI never shows them.
    """

    _block_type_name = "vqvae2 cache records"
    _description = "Where the vqvae2 pipeline keeps Prefect's cache records: under its storage root."

    root: str = Field(description="The pipeline's storage root (any fsspec URL)")
    storage_options: SecretDict = Field(default_factory=lambda: SecretDict({}))

    def _options(self) -> dict[str, Any] | None:
        return self.storage_options.get_secret_value() or None

    # Prefect calls these with `_sync=True` (its blocks are sync/async dispatching).
    def read_path(self, path: str, _sync: bool = True) -> bytes:
        return read_bytes(join(self.root, path), self._options())

    def write_path(self, path: str, content: bytes, _sync: bool = True) -> str:
        write_bytes(join(self.root, path), content, self._options())
        return path

    def drop(self, path: str) -> None:
        url = join(self.root, path)
        if exists(url, self._options()):
            logger().info(f"dropping the stale cache record {redact(url)}")
            remove(url, self._options())


@functools.lru_cache(maxsize=16)
def _saved_records(root: str, options_json: str, api: str | None) -> CacheRecords:
    records = CacheRecords(root=root, storage_options=SecretDict(json.loads(options_json)))
    name = "vqvae2-records-" + hashlib.sha256(f"{root}\n{options_json}".encode()).hexdigest()[:16]
    records.save(name, overwrite=True)
    return records


def cache_records(root: str, storage_options: dict[str, Any] | None) -> CacheRecords:
    """The (saved) block that keeps Prefect's cache records under `root`; saved once per
    process and Prefect API."""
    return _saved_records(root, canonical_json(storage_options or {}), get_current_settings().api.url)


def with_records(unit: Task, root: str, storage_options: dict[str, Any] | None) -> Task:
    """`unit` keeping its cache records under `root`: how a flow calls a cached unit."""
    return unit.with_options(result_storage=cache_records(root, storage_options))


def _is_done(marker: UnitMarker) -> bool:
    try:
        return marker.is_done()
    except ManifestError:
        return False


def cached_unit(
    *,
    locate: Callable[..., UnitMarker],
    name: str,
    task_run_name: str | None = None,
    retries: int = RETRIES,
    retry_delay_seconds: list[float] | float = RETRY_DELAYS,
    pickled: bool = False,
    **task_options: Any,
):
    """Decorate `fn(**params) -> result` into a cached Prefect task; `locate(**params)` is its marker.

    Results are kept as JSON under the root (`with_records`); a `pickled` one (a result
    JSON cannot hold) is kept in the worker's own Prefect result storage instead."""

    def decorate(fn: Callable[..., Any]) -> Task:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            params = signature.bind(*args, **kwargs).arguments
            marker = locate(**params)
            try:
                done = marker.read()
            except ManifestError as err:
                logger().warning(f"{err}: recomputing it")
                done = None
            if done is not None:
                logger().info(f"{redact(marker.url)} is complete: nothing to do")
                return done
            result = fn(*args, **kwargs)
            marker.write(result)
            return result

        def cache_key(context: Any, parameters: dict[str, Any]) -> str | None:
            if pickled:
                # Kept in the worker's own result storage, never under the root: whoever can
                # write a root must not get to unpickle objects into the flow. Named after the
                # marker's whole URL, since that storage serves every root.
                return "vqvae2-pickled/" + hashlib.sha256(locate(**parameters).url.encode()).hexdigest()[:32]
            storage = context.result_store.result_storage if context and context.result_store else None
            if not isinstance(storage, CacheRecords):
                return None  # called without `with_records`: the marker alone decides
            marker = locate(**parameters)
            try:
                if not _is_done(marker):
                    storage.drop(marker.record)
            except Exception as err:  # noqa: BLE001 - the unit's own run meets the error, and reports it
                # The storage cannot be reached now (a network error of any client library):
                # the unit itself meets the error and is retried. Without a key Prefect would
                # keep no record of its result.
                logger().warning(f"could not check {redact(marker.url)} ({type(err).__name__}): the unit will tell")
            return marker.record

        return task(
            run, name=name, task_run_name=task_run_name, cache_key_fn=cache_key, persist_result=True,
            result_serializer="pickle" if pickled else "json", retries=retries, retry_delay_seconds=retry_delay_seconds,
            retry_jitter_factor=RETRY_JITTER, retry_condition_fn=retry_unless_permanent, **task_options,
        )

    return decorate
