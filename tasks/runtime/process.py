"""Each training attempt in fresh processes: `train()` starts `python -m tasks.runtime.process`,
or, for data-parallel training, `torchrun` with one such process per rank.

Concurrent trainings then never share torch's global RNG (the pipeline runs several at
once, in threads), a retry after a CUDA failure gets a fresh CUDA context, and a crash
cannot take the flow down. Each process connects back to the task over a local socket
(`multiprocessing.connection`, with a one-time key), receives the pickled
`(make_job, args)`, builds and runs the job, and sends its reports (rank 0), then its
summary (rank 0) or its error (any rank); the task relays the reports to Prefect.
"""
from __future__ import annotations

import os
import pickle
import queue
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

import torch
import torch.distributed as dist

from ..config import TrainingRun
from ..manifests import TrainingSummary
from .devices import claimed_gpus
from .trainer import Trainer, TrainingJob, UIReporter

CHANNEL, CHANNEL_KEY = "VQVAE2_TRAINING_CHANNEL", "VQVAE2_TRAINING_CHANNEL_KEY"


class TrainingFailed(RuntimeError):
    """A training process failed; the message holds its traceback."""


class ChannelReporter:
    """In rank 0's process: every report becomes a message to the task's process."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def log(self, message: str) -> None:
        self.conn.send(("log", message))

    def progress(self, done: int, total: int, note: str) -> None:
        self.conn.send(("progress", done, total, note))

    def table(self, key: str, rows: list[dict[str, Any]], description: str) -> None:
        self.conn.send(("table", key, rows, description))


class SilentReporter:
    """The other ranks report nothing: rank 0 speaks for the run."""

    def log(self, message: str) -> None: ...
    def progress(self, done: int, total: int, note: str) -> None: ...
    def table(self, key: str, rows: list[dict[str, Any]], description: str) -> None: ...


def train(make_job: Callable[..., TrainingJob], *args: Any, title: str, options: TrainingRun,
          processes: int = 1) -> TrainingSummary:
    """Build the job with `make_job(*args)` and run it in fresh processes (`processes`
    data-parallel ranks through torchrun), unless `options.subprocess` is off, relaying the
    reports to the UI; returns the run's summary. `make_job` must be a module-level function.

    The processes are new interpreters, not forks: a fork of a process with Prefect's
    threads and open s3fs sessions is unsafe, and unlike a multiprocessing spawn it does
    not re-run the caller's main script. `options.threads()` caps each one's intra-op
    threads: trainings running side by side must not oversubscribe the cores. Where
    trainings share GPUs, the processes see only the GPU the training claimed."""
    reporter = UIReporter(title)
    if not options.subprocess:
        if processes > 1:
            raise ValueError("training.processes > 1 needs training.subprocess: torchrun starts the processes")
        return Trainer(make_job(*args), reporter).run()
    with claimed_gpus(options, processes) as gpus:
        env = {**os.environ, "OMP_NUM_THREADS": str(options.threads())}
        if gpus:
            # the claimed ones among the devices this worker was given, if it was given a subset
            given = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(given[i] if i < len(given) else str(i) for i in gpus)
            reporter.log(f"{title} on GPU {', '.join(map(str, gpus))} "
                         f"(CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']})")
        worker = ["-m", "tasks.runtime.process"]
        command = [sys.executable, *worker] if processes == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *worker]
        return _run(command, processes, pickle.dumps((make_job, args)), title, env, reporter)


def _run(command: list[str], ranks: int, job: bytes, title: str, env: dict[str, str],
         reporter: UIReporter) -> TrainingSummary:
    key = os.urandom(16)
    messages: queue.Queue = queue.Queue()
    with Listener(("127.0.0.1", 0), authkey=key) as listener:
        host, port = listener.address
        env = {**env, CHANNEL: f"{host}:{port}", CHANNEL_KEY: key.hex()}
        child = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)
        readers: list[threading.Thread] = []
        threading.Thread(target=_serve, args=(listener, ranks, job, messages, readers), daemon=True).start()
        try:
            while True:
                try:
                    kind, *payload = messages.get(timeout=0.5)
                except queue.Empty:
                    if child.poll() is None:
                        continue
                    for reader in list(readers):  # what the processes sent before they ended
                        reader.join(timeout=5)
                    if messages.empty():
                        raise TrainingFailed(f"{title}: the training process died (exit code {child.returncode})")
                    continue
                if kind == "done":
                    return payload[0]
                if kind == "error":
                    rank, name, trace = payload
                    raise TrainingFailed(f"{title}: {name} in the training process of rank {rank}:\n{trace}")
                getattr(reporter, kind)(*payload)
        finally:
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()


def _serve(listener: Listener, ranks: int, job: bytes, messages: queue.Queue, readers: list) -> None:
    """Hand each connecting rank the job, then relay what it sends."""
    for _ in range(ranks):
        try:
            conn = listener.accept()
        except OSError:  # the listener closed: the run is over
            return
        conn.send_bytes(job)
        reader = threading.Thread(target=_relay, args=(conn, messages), daemon=True)
        readers.append(reader)
        reader.start()


def _relay(conn: Connection, messages: queue.Queue) -> None:
    with conn:
        while True:
            try:
                messages.put(conn.recv())
            except (EOFError, OSError):
                return


@contextmanager
def process_group() -> Iterator[int]:
    """Under torchrun: join the ranks (gloo for CPU tensors, NCCL for CUDA ones); yields the rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        yield 0
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield dist.get_rank()
        # Leave together: a rank tearing its group down while rank 0 still writes the
        # results can abort in gloo's threads.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> None:
    host, port = os.environ[CHANNEL].rsplit(":", 1)
    rank = int(os.environ.get("RANK", "0"))
    with Client((host, int(port)), authkey=bytes.fromhex(os.environ[CHANNEL_KEY])) as conn:
        try:
            make_job, args = pickle.loads(conn.recv_bytes())  # our own task process: trusted
            with process_group() as rank:
                reporter = ChannelReporter(conn) if rank == 0 else SilentReporter()
                summary = Trainer(make_job(*args), reporter).run()
            if rank == 0:
                conn.send(("done", summary))
        except BaseException as err:  # noqa: BLE001 - every failure must reach the task, which raises it
            conn.send(("error", rank, type(err).__name__, "".join(traceback.format_exception(err))))
            raise SystemExit(1) from None


if __name__ == "__main__":
    main()
