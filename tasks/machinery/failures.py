"""Which failures a retry can cure.

A retry re-runs the same code on the same inputs: it helps only when the world changed in
between (a network blip, an S3 5xx or timeout, a killed worker or training process). Bad
input (an invalid config, too many unreadable images, a truncated shard, a missing source
or weights file, refused credentials, a full or read-only storage) and a training that
diverged again after its one recovery at a lower learning rate (`tasks.machinery.trainer`)
fail the same way every time: those end the task at once, their message in its state,
instead of after two waits.
Anything else is retried, with backoff and jitter (`tasks.machinery.cached`).

botocore's own errors are mostly of the first kind (no or partial credentials, an invalid
bucket name or endpoint, an unknown region): those are permanent too, while its connection,
timeout and transfer errors (an endpoint that is down for a moment) are retried.

What to do about a failure, one line each for the run's failure report
(`tasks.machinery.failure_report`) and the CLI, is here as well: both say the same, each in
the form of where it is read (`tasks.setting_forms`): a field to set is `--set KEY=VALUE` on
the command line and a deployment's run parameters (`{"ingest": {...}}`) in the UI.
"""
from __future__ import annotations

import re
import sys
from typing import Any

from storage.fsutil import StorageFull, redact

from ..setting_forms import Form, Setting, in_form

# Bad input and deterministic failures. ValueError covers pydantic's ValidationError,
# TooManyBadImages, ShardError and ManifestError; FileNotFoundError the missing
# Inception weights; FloatingPointError a diverged training or non-finite metrics.
PERMANENT: tuple[type[BaseException], ...] = (
    ValueError, TypeError, LookupError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
    FloatingPointError, NotImplementedError, StorageFull,
)


# botocore errors a retry can cure, by class name (the rest of BotoCoreError is permanent):
# the endpoint unreachable, slow or cut off mid-transfer, credentials or tokens that a
# metadata service failed to hand out in time, a waiter that gave up.
BOTOCORE_TRANSIENT = frozenset({
    "ConnectionError", "HTTPClientError", "IncompleteReadError", "ChecksumError", "FlexibleChecksumError",
    "CredentialRetrievalError", "MetadataRetrievalError", "TokenRetrievalError", "CapacityNotAvailableError",
    "WaiterError",
})  # fmt: skip


def is_permanent(error: BaseException) -> bool:
    """Whether `error` would recur on a retry (`TrainingFailed` says so for its process's error)."""
    flagged = getattr(error, "permanent", None)
    if isinstance(flagged, bool):
        return flagged
    return isinstance(error, PERMANENT) or _botocore_permanent(error)


def _botocore_permanent(error: BaseException) -> bool:
    try:
        from botocore.exceptions import BotoCoreError  # with s3fs; absent, no error is botocore's
    except ImportError:
        return False
    if not isinstance(error, BotoCoreError):
        return False
    return not any(cls.__name__ in BOTOCORE_TRANSIENT for cls in type(error).__mro__ if issubclass(cls, BotoCoreError))


MAX_LINE = 400  # characters of an error's line in a report or the CLI's output


def first_line(error: BaseException, limit: int = MAX_LINE, form: Form = "cli") -> str:
    """The error's first non-empty line, without credentials, cut to `limit` characters, a
    field it says to set named in `form`. A message that carries a traceback (a training
    process's error) adds its last line: the why."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return "(no message)"
    line = lines[0]
    if "Traceback (most recent call last):" in lines[1:] and lines[-1] != line:
        line = f"{line} {lines[-1]}"
    line = in_form(redact(line), form)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def advice(error: BaseException, retries: int = 0, form: Form = "cli") -> str:
    """What to do about `error`, which was retried `retries` times, a field to set named in `form`."""
    own = getattr(error, "advice", None)  # an error that knows (`storage.lease.TurnLost`)
    if isinstance(own, str):
        return own
    if is_permanent(error):  # bad input, config, credentials, a full disk, a diverged training
        fixes = settings_that_fix(error)
        if fixes:
            options = " or ".join(setting.shown(form) for setting in fixes)
            given = "with" if form == "cli" else "with the parameters"
            return f"fix the cause named above, or run again {given} {options}: finished stages are reused."
        return "fix the cause named above and run again: finished stages are reused."
    retried = f"the stage was retried {retries} times; " if retries else ""
    return f"{retried}check the storage and the network and run again: it resumes where it stopped."


class SettingError(ValueError):
    """Bad input that setting a config field cures: `fixes` are the settings that would (the
    advice shows them in the form of where it is read). Pickles as a ValueError does: its
    arguments are the message and the fixes."""

    def __init__(self, message: str, *fixes: Setting) -> None:
        super().__init__(message, *fixes)
        self.fixes = fixes

    def __str__(self) -> str:
        return str(self.args[0])


def settings_that_fix(error: BaseException) -> tuple[Setting, ...]:
    """The config settings that would cure `error`, if it says: a `SettingError`'s, or the
    bad-image share that would have let an ingest with too many unreadable images pass."""
    if isinstance(error, SettingError):
        return error.fixes
    ingest = sys.modules.get("storage.ingest")  # loaded wherever its error was raised: no import here
    if ingest is not None and isinstance(error, ingest.TooManyBadImages):
        return _bad_share(str(error))
    return ()


def _bad_share(message: str) -> tuple[Setting, ...]:
    """`ingest.max_bad_fraction` just above the share of unusable images a TooManyBadImages
    counts ("N of T images could not be used"), in hundredths; none when it would be 1 or more."""
    counts = _BAD_COUNTS.search(message)
    if counts is None:
        return ()
    bad, total = int(counts.group(1)), int(counts.group(2))
    hundredths = 100 * bad // total + 1  # strictly above: the check is `bad <= fraction * total`
    return (Setting("ingest.max_bad_fraction", hundredths / 100),) if total and hundredths < 100 else ()


_BAD_COUNTS = re.compile(r"(\d+) of (\d+) images could not be used")


def retry_unless_permanent(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's `retry_condition_fn`: retry a failed attempt unless its error is permanent."""
    error = state.data if isinstance(state.data, BaseException) else None
    if error is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as err:  # noqa: BLE001 - the state's own error, whatever it is
            error = err
    return error is None or not is_permanent(error)
