"""Faults a test injects into a training (`training.fail_once_at_step`), to exercise retries
and resuming: a step hook, added to the training loop only when asked for."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from storage.fsutil import exists, write_bytes

from .artifacts import Artifact

StepHook = Callable[[int, Any], None]  # (step, metrics), after the step


class InjectedFault(RuntimeError):
    """Raised by `training.fail_once_at_step`, to test retries and resuming."""


def fail_once_at(job_name: str, step: int | None, artifact: Artifact, rank: int, world: int) -> list[StepHook]:
    """The hook that fails training `job_name` once at `step` (none when `step` is None). Under
    DDP a rank other than 0 fails: the one that writes checkpoints lives on. Once is once
    per artifact: a marker file under it remembers, across the retried attempts."""
    if step is None or rank != world - 1:
        return []
    marker = artifact.path("fault-injected")

    def fail_once(at: int, metrics: Any) -> None:
        if at == step and not exists(marker, artifact.storage_options):
            write_bytes(marker, b"", artifact.storage_options)
            raise InjectedFault(f"{job_name}: fault injected at step {step} (training.fail_once_at_step)")

    return [fail_once]
