"""One resumable training run, shared by the autoencoder, the priors and the classifiers.

Every attempt (a Prefect retry, or a re-run after a crash) starts from the newest
checkpoint under `{artifact}/checkpoints/`: model, optimizer, scheduler, step, the RNG
states and the data position (epoch and batches consumed), so a resumed run takes
the same batches with the same randomness as an uninterrupted one. Checkpoints are
written every `checkpoint_every` steps and at least every `checkpoint_minutes`.

It reports to the UI as it goes: a progress bar, a metrics table per epoch, log lines;
at the end it writes `model.pt` (a `vqvae2.to_checkpoint` dict), `history.json` and a
loss-curve PNG next to the checkpoints.

`train()` runs each attempt in a fresh process by default: concurrent trainings then
never share torch's global RNG (the pipeline runs several at once, in threads), a
retry after a CUDA failure gets a fresh CUDA context, and a crash cannot take the
flow down. The process reports back through a queue; the task relays to Prefect.
"""
from __future__ import annotations

import os
import pickle
import random
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

import numpy as np
import torch
from torch import nn

import vqvae2
from storage.checkpoints import checkpoint_url, latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from storage.fsutil import exists, write_bytes, write_json
from vqvae2.config import TrainConfig
from vqvae2.train import LossFn, Metrics

from .artifact_task import Artifact
from .config import TrainingSection
from .reporting import Progress, format_metrics, logger, loss_curve_png, publish_table

# (epoch, batches of it already consumed) -> the rest of that epoch's batches
BatchSource = Callable[[int, int], Iterable[Any]]
Evaluator = Callable[[nn.Module], dict[str, float]]


class InjectedFault(RuntimeError):
    """Raised by `TrainingSection.fail_once_at_step`, to test retries and resuming."""


def private_generator(seed: int, epoch: int) -> torch.Generator:
    """For a DataLoader: without one, each new iterator draws its seed from torch's global
    RNG, so a run resumed mid-epoch would shift the model's random stream (dropout,
    dead-code restarts) against an uninterrupted run."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("training.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


@dataclass
class TrainingJob:
    name: str  # "autoencoder", "prior-top", "classifier-judge": also the fault-injection name
    model: nn.Module
    loss_fn: LossFn
    train: TrainConfig
    batches: BatchSource
    batches_per_epoch: int
    artifact: Artifact
    options: TrainingSection
    evaluate: Evaluator | None = None  # held-out metrics at each epoch's end and at the last step
    extra_checkpoint: dict[str, Any] = field(default_factory=dict)


class _EpochStream:
    """Batches across epochs, tracking how many of the current epoch were handed out."""

    def __init__(self, batches: BatchSource, epoch: int, consumed: int, on_epoch_end: Callable[[int], None]):
        self.batches, self.epoch, self.consumed, self.on_epoch_end = batches, epoch, consumed, on_epoch_end

    def __iter__(self) -> Iterator[Any]:
        while True:
            yielded = False
            for batch in self.batches(self.epoch, self.consumed):
                self.consumed += 1  # before the step runs: a checkpoint after it counts this batch
                yielded = True
                yield batch
            if not yielded and self.consumed == 0:
                raise ValueError("the training data yields no batches")
            self.on_epoch_end(self.epoch)
            self.epoch, self.consumed = self.epoch + 1, 0


def _rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class _Averages:
    """Running sums of step metrics (tensors, so no device sync per step)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, metrics: Metrics) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0) + v.float()
        self.count += 1

    def pop(self) -> dict[str, float]:
        means = {k: (v / self.count).item() for k, v in self.sums.items()} if self.count else {}
        self.sums, self.count = {}, 0
        return means


class Reporter(Protocol):
    def log(self, message: str) -> None: ...
    def progress(self, done: int, total: int, note: str) -> None: ...
    def table(self, key: str, rows: list[dict[str, Any]], description: str) -> None: ...


class UIReporter:
    """Straight to the Prefect UI (or the `vqvae2` logger outside a run)."""

    def __init__(self, title: str) -> None:
        self.title, self.bar = title, None

    def log(self, message: str) -> None:
        logger().info(message)

    def progress(self, done: int, total: int, note: str) -> None:
        self.bar = self.bar or Progress(self.title, total)
        self.bar.update(done, note)

    def table(self, key: str, rows: list[dict[str, Any]], description: str) -> None:
        publish_table(key, rows, description)


def run_training(job: TrainingJob, reporter: Reporter) -> dict[str, Any]:
    """Train `job.model` to `job.train.steps`, resuming if a checkpoint exists; returns a summary."""
    art, opts, train = job.artifact, job.options, job.train
    storage = art.storage_options
    device = resolve_device(opts.device)
    model = vqvae2.prepare_model(job.model, device, train.channels_last)
    optimizer, scheduler = vqvae2.make_optimizer(model, train)
    checkpoints = art.path("checkpoints")

    step, epoch, consumed, history, epochs = 0, 0, 0, [], []
    latest = latest_checkpoint(checkpoints, storage)
    if latest is not None:
        state = load_checkpoint(latest, storage, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        step, epoch, consumed = state["step"], state["epoch"], state["consumed"]
        history, epochs = list(state["history"]), list(state["epochs"])
        reporter.log(f"{job.name}: resuming from step {step} (epoch {epoch}, batch {consumed}) of {latest}")
    else:
        vqvae2.seed_everything(train.seed)
    resumed_from = step

    interval, epoch_window = _Averages(), _Averages()
    last_save = time.monotonic()
    last_step = step
    stream: _EpochStream

    def save(at_step: int) -> None:
        nonlocal last_save
        state = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": _rng_state(), "step": at_step, "epoch": stream.epoch, "consumed": stream.consumed,
            "history": history, "epochs": epochs, **job.extra_checkpoint,
        }  # fmt: skip
        save_checkpoint(checkpoint_url(checkpoints, at_step), state, storage)
        prune_checkpoints(checkpoints, keep=2, storage_options=storage)
        last_save = time.monotonic()

    def close_epoch(finished: int, at_step: int, partial: bool = False) -> None:
        row = {"epoch": finished, "step": at_step, **{f"train_{k}": v for k, v in epoch_window.pop().items()}}
        if job.evaluate is not None:
            model.eval()
            row.update({f"val_{k}": v for k, v in job.evaluate(model).items()})
        row["partial_epoch"] = partial
        epochs.append(row)
        reporter.log(f"{job.name} epoch {finished}{' (partial)' if partial else ''}: {format_metrics(row)}")
        reporter.table(f"{job.name}-epochs", epochs, f"{job.name}: metrics per epoch")

    def on_step(at_step: int, metrics: Metrics) -> None:
        nonlocal last_step
        last_step = at_step
        interval.add(metrics)
        epoch_window.add(metrics)
        if at_step % opts.log_every == 0 or at_step == train.steps:
            means = interval.pop()
            history.append({"step": at_step, "epoch": stream.epoch, **means})
            reporter.progress(at_step, train.steps, f"step {at_step}/{train.steps}, loss {means.get('loss', float('nan')):.4g}")
            reporter.log(f"{job.name} step {at_step}/{train.steps}: {format_metrics(means)}")
            if not np.isfinite(means.get("loss", 0.0)):
                raise FloatingPointError(f"{job.name}: the loss is {means['loss']} at step {at_step}; training diverged")
        if at_step % opts.checkpoint_every == 0 or time.monotonic() - last_save > 60 * opts.checkpoint_minutes:
            save(at_step)
        if opts.fail_once_at_step.get(job.name) == at_step and not exists(art.path("fault-injected"), storage):
            write_bytes(art.path("fault-injected"), b"", storage)
            raise InjectedFault(f"{job.name}: fault injected at step {at_step} (training.fail_once_at_step)")

    stream = _EpochStream(job.batches, epoch, consumed, lambda finished: close_epoch(finished, last_step))
    final = vqvae2.fit(model, optimizer, stream, job.loss_fn, train, scheduler=scheduler, start_step=step,
                       hooks=[on_step])
    if epoch_window.count:
        close_epoch(stream.epoch, final, partial=stream.consumed < job.batches_per_epoch)
    save(final)

    model.eval()
    write_bytes(art.path("loss_curve.png"), loss_curve_png(history, f"{job.name} training loss"), storage)
    write_json(art.path("history.json"), {"steps": history, "epochs": epochs}, storage)
    save_checkpoint(art.path("model.pt"), vqvae2.to_checkpoint(model.cpu().float()), storage)
    final_metrics = {**(history[-1] if history else {}), **(epochs[-1] if epochs else {})}
    return {
        "steps": final,
        "resumed_from_step": resumed_from,
        "epochs": len(epochs),
        "metrics": {k: v for k, v in final_metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
        "model": art.path("model.pt"),
        "loss_curve": art.path("loss_curve.png"),
        "history": art.path("history.json"),
        "device": str(device),
    }


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


def train(make_job: Callable[..., TrainingJob], *args: Any, title: str, options: TrainingSection) -> dict[str, Any]:
    """Build the job with `make_job(*args)` and run it, in a fresh process unless
    `options.subprocess` is off, relaying its reports to the UI; returns the run's summary.
    `make_job` must be a module-level function.

    The process is a new interpreter (`python -m tasks.train_worker`), not a fork: a fork
    of a process with Prefect's threads and open s3fs sessions is unsafe, and unlike a
    multiprocessing spawn it does not re-run the caller's main script. `options.threads()` caps
    its intra-op threads: trainings running side by side must not oversubscribe the cores."""
    reporter = UIReporter(title)
    if not options.subprocess:
        return run_training(make_job(*args), reporter)
    read_fd, write_fd = os.pipe()
    env = {**os.environ, "OMP_NUM_THREADS": str(options.threads())}
    child = subprocess.Popen([sys.executable, "-m", "tasks.train_worker", str(write_fd)],
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
