"""Each training attempt in a fresh process: `train()` starts `python -m tasks.runtime.process FD`.

Concurrent trainings then never share torch's global RNG (the pipeline runs several at
once, in threads), a retry after a CUDA failure gets a fresh CUDA context, and a crash
cannot take the flow down. The process reads `(make_job, args)` (pickled) from stdin,
runs the job, and sends its reports, then its summary or its error, as messages on file
descriptor FD; the task relays the reports to Prefect.
"""
from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import traceback
from collections.abc import Callable
from typing import Any, BinaryIO

from ..config import TrainingRun
from ..manifests import TrainingSummary
from .trainer import Trainer, TrainingJob, UIReporter


class TrainingFailed(RuntimeError):
    """The training process failed; the message holds its traceback."""


def send(stream: BinaryIO, message: tuple) -> None:
    data = pickle.dumps(message)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def receive(stream: BinaryIO) -> tuple | None:
    """The next message, or None once the sender is gone."""
    header = stream.read(8)
    if len(header) < 8:
        return None
    (size,) = struct.unpack("<Q", header)
    return pickle.loads(stream.read(size))  # our own child process: trusted


class PipeReporter:
    """In the training process: every report becomes a message to the task's process."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream

    def log(self, message: str) -> None:
        send(self.stream, ("log", message))

    def progress(self, done: int, total: int, note: str) -> None:
        send(self.stream, ("progress", done, total, note))

    def table(self, key: str, rows: list[dict[str, Any]], description: str) -> None:
        send(self.stream, ("table", key, rows, description))


def train(make_job: Callable[..., TrainingJob], *args: Any, title: str, options: TrainingRun) -> TrainingSummary:
    """Build the job with `make_job(*args)` and run it, in a fresh process unless
    `options.subprocess` is off, relaying its reports to the UI; returns the run's summary.
    `make_job` must be a module-level function.

    The process is a new interpreter, not a fork: a fork
    of a process with Prefect's threads and open s3fs sessions is unsafe, and unlike a
    multiprocessing spawn it does not re-run the caller's main script. `options.threads()` caps
    its intra-op threads: trainings running side by side must not oversubscribe the cores."""
    reporter = UIReporter(title)
    if not options.subprocess:
        return Trainer(make_job(*args), reporter).run()
    read_fd, write_fd = os.pipe()
    env = {**os.environ, "OMP_NUM_THREADS": str(options.threads())}
    child = subprocess.Popen([sys.executable, "-m", "tasks.runtime.process", str(write_fd)],
                             stdin=subprocess.PIPE, pass_fds=(write_fd,), env=env)
    os.close(write_fd)
    try:
        with os.fdopen(read_fd, "rb") as messages:
            child.stdin.write(pickle.dumps((make_job, args)))
            child.stdin.close()
            while (message := receive(messages)) is not None:
                kind, *payload = message
                if kind == "done":
                    return payload[0]
                if kind == "error":
                    name, trace = payload
                    raise TrainingFailed(f"{title}: {name} in the training process:\n{trace}")
                getattr(reporter, kind)(*payload)
        raise TrainingFailed(f"{title}: the training process died (exit code {child.wait()})")
    finally:
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()


def main() -> None:
    with os.fdopen(int(sys.argv[1]), "wb") as stream:
        try:
            make_job, args = pickle.loads(sys.stdin.buffer.read())
            send(stream, ("done", Trainer(make_job(*args), PipeReporter(stream)).run()))
        except BaseException as err:  # noqa: BLE001 - every failure must reach the task, which raises it
            send(stream, ("error", type(err).__name__, "".join(traceback.format_exception(err))))
            raise SystemExit(1) from None


if __name__ == "__main__":
    main()
