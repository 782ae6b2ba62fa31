"""Which failures a retry can cure.

A retry re-runs the same code on the same inputs: it helps only when the world changed in
between (a network blip, an S3 5xx or timeout, a killed worker or training process). Bad
input (an invalid config, too many unreadable images, a truncated shard, a missing source
or weights file, refused credentials, a full or read-only storage) and a training that
diverged again after its one recovery at a lower learning rate (`tasks.runtime.trainer`)
fail the same way every time: those end the task at once, their message in its state,
instead of after two waits.
Anything else is retried, with backoff and jitter (`tasks.runtime.cached`).
"""
from __future__ import annotations

from typing import Any

from storage.fsutil import StorageFull

# Bad input and deterministic failures. ValueError covers pydantic's ValidationError,
# TooManyBadImages, ShardError and ManifestError; FileNotFoundError the missing
# Inception weights; FloatingPointError a diverged training or non-finite metrics.
PERMANENT: tuple[type[BaseException], ...] = (
    ValueError, TypeError, LookupError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
    FloatingPointError, NotImplementedError, StorageFull,
)


def is_permanent(error: BaseException) -> bool:
    """Whether `error` would recur on a retry (`TrainingFailed` says so for its process's error)."""
    flagged = getattr(error, "permanent", None)
    return flagged if isinstance(flagged, bool) else isinstance(error, PERMANENT)


def retry_unless_permanent(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's `retry_condition_fn`: retry a failed attempt unless its error is permanent."""
    error = state.data if isinstance(state.data, BaseException) else None
    if error is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as err:  # noqa: BLE001 - the state's own error, whatever it is
            error = err
    return error is None or not is_permanent(error)
