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
from prefect.results import get_default_result_storage
from prefect.settings import get_current_settings
from pydantic import Field

from storage.artifacts import canonical_json
from storage.fsutil import exists, join, read_bytes, redact, remove, write_bytes

from ..manifests import Record, located, qualified_name, record_type
from .artifacts import RECORDS, ManifestError, UnitMarker
from .failures import retry_unless_permanent
from .reporting import logger
from .turns import check_turn

RETRIES = 2  # of an error a retry can cure (`tasks.machinery.failures`); others fail at once
RETRY_DELAYS = [5, 60]
RETRY_JITTER = 0.5  # each wait up to 50% longer at random: retries of many mapped units do not move in step


class CacheRecords(WritableFileSystem):
    """Prefect's cache records, kept under a pipeline's storage root beside the artifacts.

    Prefect wants the result storage of a task saved as a block; the storage options
    (which may hold credentials) are a `SecretDict`, so the UI never shows them.

    Only the records of cached units (their paths are `Marker.record`s) go under the root,
    their manifests' URLs as paths relative to it, so a moved or copied root finds its
    records valid where it lands. What else Prefect persists through this block (the error
    of a failed attempt, under a random name) is the worker's own business: it goes to
    Prefect's default result storage, never to the top of the root.
    """

    _block_type_name = "vqvae2 cache records"
    _description = "Where the vqvae2 pipeline keeps Prefect's cache records: under its storage root."

    root: str = Field(description="The pipeline's storage root (any fsspec URL)")
    storage_options: SecretDict = Field(default_factory=lambda: SecretDict({}))

    def _options(self) -> dict[str, Any] | None:
        return self.storage_options.get_secret_value() or None

    # Prefect calls these with `_sync=True` (its blocks are sync/async dispatching).
    def read_path(self, path: str, _sync: bool = True) -> bytes:
        if not is_record(path):
            return get_default_result_storage().read_path(path, _sync=True)
        return _rebased(read_bytes(join(self.root, path), self._options()), self.root, reading=True)

    def write_path(self, path: str, content: bytes, _sync: bool = True) -> str:
        if not is_record(path):
            return get_default_result_storage().write_path(path, content, _sync=True)
        check_turn(join(self.root, path))
        write_bytes(join(self.root, path), _rebased(content, self.root, reading=False), self._options())
        return path

    def drop(self, path: str) -> None:
        url = join(self.root, path)
        if exists(url, self._options()):
            logger().info(f"dropping the stale cache record {redact(url)}")
            remove(url, self._options())


def is_record(path: str) -> bool:
    """Whether `path` is a cached unit's record (`Artifact.record`), kept under the root."""
    return f"/{RECORDS}/" in path


def _rebased(content: bytes, root: str, reading: bool) -> bytes:
    """A cache record with the URLs of the manifests it holds written relative to `root`
    (`reading=False`), or read back as URLs under `root` (`reading=True`).

    Prefect's JSON serializer keeps a pydantic result as `{"__class__": name, "data": ...}`
    inside the record's `result` text; only the pipeline's own manifest types are rebased,
    by their `RootURL` fields, and no other class is ever imported here."""
    record = json.loads(content)
    metadata = record.get("metadata") if isinstance(record, dict) else None
    if not isinstance(metadata, dict) or metadata.get("serializer", {}).get("type") != "json":
        return content
    if not isinstance(record.get("result"), str):
        return content
    context = located(root)

    def convert(model: type[Record], data: Any) -> Any:
        if reading:
            return model.model_validate(data, context=context).model_dump(mode="json")
        return model.model_validate(data).model_dump(mode="json", context=context)

    record["result"] = json.dumps(_each_manifest(json.loads(record["result"]), convert))
    return json.dumps(record).encode()


def _each_manifest(value: Any, convert: Callable[[type[Record], Any], Any]) -> Any:
    if isinstance(value, list):
        return [_each_manifest(v, convert) for v in value]
    if not isinstance(value, dict):
        return value
    model = record_type(value.get("__class__"))
    if model is not None and "data" in value:
        # Named where the class is now: a record written before a manifest type moved to
        # another module still deserializes.
        return {**value, "__class__": qualified_name(model), "data": convert(model, value["data"])}
    return {k: _each_manifest(v, convert) for k, v in value.items()}


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


class UnitFunction:
    """What a cached unit's task runs: `fn(**params)`, unless its marker (`locate(**params)`)
    says the work is done, then what the marker holds; its marker written after `fn`.

    Sent to a Dask worker by reference, never by value: pickle names it as the `fn` of the
    module-level task it belongs to (`tasks.stages.sample.sample_batch.fn`), which the worker
    imports. By value it would drag its module's globals along, and some of torch's do not
    pickle. A unit defined anywhere but at a module's top level cannot leave its process."""

    # Its own state in slots: Prefect copies a task function's `__dict__` (its name, module,
    # signature) onto the task, which travels by value.
    __slots__ = ("_fn", "_locate", "_pickled", "_signature", "__dict__")

    def __init__(self, fn: Callable[..., Any], locate: Callable[..., UnitMarker], pickled: bool) -> None:
        functools.update_wrapper(self, fn)
        self._fn, self._locate, self._pickled = fn, locate, pickled
        self._signature = inspect.signature(fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        arguments = self._signature.bind(*args, **kwargs).arguments
        marker = self._locate(**arguments)
        try:
            done = marker.read()
        except ManifestError as err:
            logger().warning(f"{err}: recomputing it")
            done = None
        if done is not None:
            logger().info(f"{redact(marker.url)} is complete: nothing to do")
            return done
        # A run that lost its turn makes nothing more (on a Dask worker, its runtime says which turn).
        runtime = arguments.get("runtime")
        turn = (getattr(runtime, "turn", None), getattr(runtime, "storage_options", None))
        check_turn(marker.url, *turn)
        result = self._fn(*args, **kwargs)
        check_turn(marker.url, *turn)
        marker.write(result)
        return result

    def cache_key(self, context: Any, parameters: dict[str, Any]) -> str | None:
        """The unit's Prefect cache key: the path of its record under the root. None (no
        record) where its marker cannot be located (a missing source, whose digest the
        ingest's key takes): the unit itself then meets the same error and fails with it.
        Raised here, Prefect would log it, with its traceback, as an ERROR of its own ("Error
        encountered when computing cache key") beside the unit's."""
        storage = context.result_store.result_storage if context and context.result_store else None
        if not self._pickled and not isinstance(storage, CacheRecords):
            return None  # called without `with_records`: the marker alone decides
        try:
            marker = self._locate(**parameters)
            if self._pickled:
                # Kept in the worker's own result storage, never under the root: whoever can
                # write a root must not get to unpickle objects into the flow. Named after the
                # marker's whole URL, since that storage serves every root.
                return "vqvae2-pickled/" + hashlib.sha256(marker.url.encode()).hexdigest()[:32]
            record = marker.record
        except Exception:  # noqa: BLE001 - the unit's own run raises it again, as its failure
            return None
        try:
            if not _is_done(marker):
                storage.drop(record)
        except Exception as err:  # noqa: BLE001 - the unit's own run meets the error, and reports it
            # The storage cannot be reached now (a network error of any client library):
            # the unit itself meets the error and is retried. Without a key Prefect would
            # keep no record of its result.
            logger().warning(f"could not check {redact(marker.url)} ({type(err).__name__}): the unit will tell")
        return record

    def __reduce__(self) -> str:
        return f"{self.__qualname__}.fn"


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
    """Decorate `fn(**params) -> result` into a cached Prefect task; `locate(**params)` is its
    marker. Bind the task to `fn`'s own name at a module's top level: that is how it is
    found on a Dask worker (`UnitFunction`).

    Results are kept as JSON under the root (`with_records`); a `pickled` one (a result
    JSON cannot hold) is kept in the worker's own Prefect result storage instead. A task run
    is named `task_run_name` (formatted with its parameters), else `name`: never Prefect's
    default `name-<hash>`, which says less than the task's name alone."""

    def decorate(fn: Callable[..., Any]) -> Task:
        unit = UnitFunction(fn, locate, pickled)
        return task(
            unit, name=name, task_run_name=task_run_name or name, cache_key_fn=unit.cache_key, persist_result=True,
            result_serializer="pickle" if pickled else "json", retries=retries, retry_delay_seconds=retry_delay_seconds,
            retry_jitter_factor=RETRY_JITTER, retry_condition_fn=retry_unless_permanent, **task_options,
        )

    return decorate
