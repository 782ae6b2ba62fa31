"""One resumable training run, shared by the autoencoder, the priors and the classifiers.

Every attempt (a Prefect retry, or a re-run after a crash) starts from the newest
checkpoint under `{artifact}/checkpoints/`: model, optimizer, scheduler, step, the RNG
states and the data position (epoch and batches consumed), so a resumed run takes
the same batches with the same randomness as an uninterrupted one. Checkpoints are
written every `checkpoint_every` steps and at least every `checkpoint_minutes`; a
checkpoint that does not load is passed over for the one before it.

A training that diverges (a non-finite loss or parameter) goes on once from its newest
checkpoint at `DIVERGED_LR_FACTOR` times the learning rate, saying so in the log and in
its summary; a second divergence fails it.

It reports to the UI as it goes: a progress bar, a metrics table per epoch, log lines;
at the end it writes `model.pt` (a `vqvae2.to_checkpoint` dict), `history.json` and a
loss-curve PNG next to the checkpoints.

`tasks.machinery.process.train` runs each attempt in a fresh process.
"""
from __future__ import annotations

import contextlib
import io
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import chain
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import vqvae2
from storage.checkpoints import checkpoint_url, load_latest, prune_checkpoints, save_checkpoint
from storage.fsutil import exists, redact, remove, write_bytes, write_json
from vqvae2.config import TrainConfig
from vqvae2.train import LossFn, Metrics

from ..config import TrainingRuntime
from ..manifests import TrainingSummary
from .artifacts import Artifact
from .devices import resolve_device
from .faults import fail_once_at
from .ranks import gather, mean_over_ranks, rank0_says, rank_and_world
from .reporting import Progress, format_metrics, logger, loss_curve_png, publish_part
from .tensorboard import Logged, TensorBoardRun, run_url
from .turns import check_turn
from .training_state import BatchSource, EpochStream, Recovery, RunningMeans, rng_state, set_rng_state

Evaluator = Callable[[nn.Module], dict[str, float]]
Pictures = Callable[[nn.Module], dict[str, np.ndarray]]  # name -> a uint8 picture, H x W (x 3)

# A loss spike that made the weights non-finite often passes at a lower rate; the same
# rate, RNG and batches would diverge at the same step again (why a retry cannot help).
DIVERGED_LR_FACTOR = 0.5


class _WithLoss(nn.Module):
    """A model and its loss as one module: DDP synchronises the gradients of what its
    forward computes, and the losses call other methods than `forward` (`prior.loss`)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: Any) -> tuple[torch.Tensor, Metrics]:
        return self.loss_fn(self.model, batch)


def _forward(module: nn.Module, batch: Any) -> tuple[torch.Tensor, Metrics]:
    return module(batch)


@dataclass
class TrainingJob:
    name: str  # "autoencoder", "prior-top", "classifier-judge": also the fault-injection name
    model: nn.Module
    loss_fn: LossFn
    train: TrainConfig
    batches: BatchSource
    batches_per_epoch: int
    artifact: Artifact
    options: TrainingRuntime
    evaluate: Evaluator | None = None  # held-out metrics at each epoch's end and at the last step
    pictures: Pictures | None = None  # shown per epoch in TensorBoard (training.tensorboard), drawn on rank 0 only


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
        # Every training's epochs in one card of the run, updated in place.
        publish_part("trainings", key, rows, "metrics per epoch of each training (part: the training)")


class Trainer:
    """Trains `job.model` to `job.train.steps`, resuming from the newest checkpoint.

    Everything a resumed run needs to continue exactly as an uninterrupted one is in
    `state_dict()`: model, optimizer, scheduler, step, data position, RNG states and
    the metrics so far (torchtitan's `Trainer` / `Stateful`)."""

    def __init__(self, job: TrainingJob, reporter: Reporter) -> None:
        self.job, self.reporter = job, reporter
        self.rank, self.world = rank_and_world()
        self.device = resolve_device(job.options.device)
        self.model = vqvae2.prepare_model(job.model, self.device, job.train.channels_last)
        in_bf16 = vqvae2.autocast_dtype(job.train.amp, self.device) == torch.bfloat16
        if in_bf16 and not vqvae2.bf16_is_native(self.device):
            field = f"train_{job.name.split('-')[0]}.amp"  # "prior-top" -> train_prior.amp
            reporter.log(f"{job.name}: warning: {field} is bf16, but this {self.device.type.upper()} has no bf16 "
                         f"arithmetic (on a CPU: AVX512-BF16 or AMX), so it is emulated and slower than fp32; "
                         f"--set {field}=off trains in fp32")
        self.optimizer, self.scheduler = vqvae2.make_optimizer(self.model, job.train)
        self.average = vqvae2.polyak_average(self.model, job.train.ema_decay)  # None without train.ema_decay
        # Under torchrun the steps go through DDP (it starts every rank from rank 0's weights
        # and averages the gradients); the quantizers all-reduce their own statistics.
        self.stepped, self.loss_fn = self.model, job.loss_fn
        if self.world > 1:
            device_ids = [self.device.index or 0] if self.device.type == "cuda" else None
            self.stepped, self.loss_fn = DistributedDataParallel(_WithLoss(self.model, job.loss_fn), device_ids), _forward
        self.checkpoints = job.artifact.path("checkpoints")
        self.step = 0
        self.history: list[dict[str, Any]] = []  # logged step metrics
        self.epochs: list[dict[str, Any]] = []  # metrics per (finished or final partial) epoch
        self.stream = EpochStream(job.batches, 0, 0, self._close_epoch)
        self.interval, self.epoch_window = RunningMeans(), RunningMeans()
        self.last_save = time.monotonic()
        self.recoveries: list[Recovery] = []
        self.damaged: list[str] = []  # checkpoints that did not load, removed before the next save
        self.initial: bytes | None = None  # a fresh run's step-0 state, until its first checkpoint
        self.tensorboard = None  # rank 0's event files, with training.tensorboard
        if job.options.tensorboard and self.rank == 0:
            self.tensorboard = TensorBoardRun(run_url(job.artifact.root, job.name, job.artifact.key),
                                              job.artifact.storage_options)

    def state_dict(self) -> dict[str, Any]:
        """The state to resume from; a collective under DDP (every rank's RNG state is in it)."""
        rngs = gather(rng_state(), self.world)
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": rngs[0], "rng_ranks": rngs, "step": self.step,
            "epoch": self.stream.epoch, "consumed": self.stream.consumed, "history": self.history,
            "epochs": self.epochs, "recoveries": [asdict(r) for r in self.recoveries],
            "interval": self.interval.state_dict(), "epoch_window": self.epoch_window.state_dict(),
            **({"average": self.average.state_dict()} if self.average is not None else {}),
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.average is not None:
            self.average.load_state_dict(state["average"])
        ranks = state.get("rng_ranks", [state["rng"]])
        set_rng_state(ranks[self.rank] if len(ranks) == self.world else state["rng"])
        self.step, self.stream.epoch, self.stream.consumed = state["step"], state["epoch"], state["consumed"]
        self.history, self.epochs = list(state["history"]), list(state["epochs"])
        self.recoveries = [Recovery(**r) for r in state.get("recoveries", [])]
        self.interval, self.epoch_window = RunningMeans(), RunningMeans()  # none of what came after the checkpoint
        for name in ("interval", "epoch_window"):
            if name in state:  # checkpoints written before they were kept start these afresh
                getattr(self, name).load_state_dict(state[name], self.device)

    def resume(self) -> int:
        """Load the newest checkpoint that loads, if any (else seed the run); returns the step resumed from."""
        found = self._newest_checkpoint()
        if found is None:
            vqvae2.seed_everything(self.job.train.seed + self.rank)  # ranks draw different dropout masks
            # The weights were initialised before this: only a copy can start the run again.
            buffer = io.BytesIO()
            torch.save(self.state_dict(), buffer)
            self.initial = buffer.getvalue()
            self._start_tensorboard()
            return 0
        _, url, state = found
        self.load_state_dict(state)
        self._start_tensorboard()
        self.reporter.log(f"{self.job.name}: resuming from step {self.step} (epoch {self.stream.epoch}, "
                          f"batch {self.stream.consumed}) of {url}")
        return self.step

    def _newest_checkpoint(self) -> tuple[int, str, dict[str, Any]] | None:
        storage = self.job.artifact.storage_options
        return load_latest(self.checkpoints, storage, map_location=self.device, on_damaged=self._damaged)

    def _damaged(self, url: str, error: ValueError) -> None:
        if url not in self.damaged:
            self.damaged.append(url)
            self.reporter.log(f"{self.job.name}: checkpoint {redact(url)} is damaged, trying the one before it ({error})")

    def save(self) -> None:
        """Checkpoint (rank 0 writes); every rank calls it at the same step.

        A model with a non-finite weight raises FloatingPointError instead, as a non-finite
        loss does: the newest checkpoint is then always one to go on from."""
        self._raise_if_not_finite()
        storage, state = self.job.artifact.storage_options, self.state_dict()
        if self.rank == 0:
            check_turn(self.job.artifact.url, storage_options=storage)  # a run that lost its turn writes nothing more
            # Only now: every rank has loaded its checkpoint. A damaged one newer than this step
            # would outlive the prune (it keeps the highest steps) and be tried on every resume.
            for url in self.damaged:
                if exists(url, storage):
                    remove(url, storage)
                    self.reporter.log(f"{self.job.name}: removed the damaged checkpoint {redact(url)}")
            save_checkpoint(checkpoint_url(self.checkpoints, self.step), state, storage)
            prune_checkpoints(self.checkpoints, keep=2, storage_options=storage)
            if self.tensorboard is not None:
                self.tensorboard.publish()
        self.damaged, self.initial = [], None
        self.last_save = time.monotonic()

    def _raise_if_not_finite(self) -> None:
        """A collective under DDP: every rank calls it in `save`, and all raise if any rank found one."""
        named = [(name, t) for name, t in chain(self.model.named_parameters(), self.model.named_buffers())
                 if t.is_floating_point()]
        finite = torch.stack([torch.isfinite(t).all() for _, t in named]).tolist() if named else []
        first = next((name for (name, _), ok in zip(named, finite) if not ok), None)
        found = [name for name in gather(first, self.world) if name is not None]
        if found:
            raise FloatingPointError(f"{found[0]} is not finite at step {self.step}: training diverged")

    def _check_loss(self, step: int, metrics: Metrics) -> None:
        """`vqvae2.raise_if_diverged`, decided by all ranks together (a collective at every
        `log_every`-th step): each rank sees the loss of its own share of the batch, and one
        non-finite share made the averaged gradients, so every rank's weights, non-finite."""
        self.step = step
        if step % self.job.options.log_every:
            return
        bad = [loss for loss in gather(metrics["loss"].item(), self.world) if not math.isfinite(loss)]
        if bad:
            raise FloatingPointError(f"the loss is {bad[0]} at step {step}: training diverged")

    def _recover(self, error: FloatingPointError) -> None:
        """Go on from the newest checkpoint (or step 0) at DIVERGED_LR_FACTOR times the learning
        rate, once per training; a second divergence raises `error`. Every rank calls it at
        the same step and loads the same checkpoint."""
        name, diverged_at = self.job.name, self.step
        if self.recoveries:
            first = self.recoveries[0]
            raise FloatingPointError(
                f"{name}: {error}, after it had diverged once at step {first.diverged_at} and gone on from step "
                f"{first.resumed_from} at {first.lr_factor:g} times the learning rate") from None
        found = self._newest_checkpoint()
        if found is not None:
            _, url, state = found
            source = f"checkpoint {url.rsplit('/', 1)[-1]}"
        elif self.initial is not None:
            state, source = torch.load(io.BytesIO(self.initial), map_location=self.device, weights_only=True), "the start"
        else:
            raise FloatingPointError(f"{name}: {error}, and no checkpoint loads to go on from") from None
        self.load_state_dict(state)
        before = self.scheduler.base_lrs[0]
        for group in self.optimizer.param_groups:
            group["lr"] *= DIVERGED_LR_FACTOR
            if "initial_lr" in group:
                group["initial_lr"] *= DIVERGED_LR_FACTOR
        # LambdaLR sets each step's rate from base_lrs, and saves them: the lower rate lasts.
        self.scheduler.base_lrs = [lr * DIVERGED_LR_FACTOR for lr in self.scheduler.base_lrs]
        self.recoveries.append(Recovery(diverged_at, self.step, DIVERGED_LR_FACTOR))
        self._start_tensorboard()
        self.reporter.log(
            f"{name}: {error}; resuming from step {self.step} ({source}) at {DIVERGED_LR_FACTOR:g} times the learning "
            f"rate, {before:.4g} -> {self.scheduler.base_lrs[0]:.4g} (once: a second divergence fails the training)")

    def _close_epoch(self, finished: int, partial: bool = False) -> None:
        train = mean_over_ranks(self.epoch_window.pop(), self.world)
        row = {"epoch": finished, "step": self.step, **{f"train_{k}": v for k, v in train.items()}}
        if self.job.evaluate is not None:
            row.update({f"val_{k}": v for k, v in self.job.evaluate(self.published()).items()})
        row["partial_epoch"] = partial
        self.epochs.append(row)
        if self.tensorboard is not None:
            self.tensorboard.log_epoch(row, self._pictures())
        name = self.job.name
        self.reporter.log(f"{name} epoch {finished}{' (partial)' if partial else ''}: {format_metrics(row)}")
        self.reporter.table(name, self.epochs, f"{name}: metrics per epoch")

    def _on_step(self, step: int, metrics: Metrics) -> None:
        job, opts, steps = self.job, self.job.options, self.job.train.steps
        self.step = step
        self.interval.add(metrics)
        self.epoch_window.add(metrics)
        logged = step % opts.log_every == 0 or step == steps
        if logged:
            means = mean_over_ranks(self.interval.pop(), self.world)
            self.history.append({"step": step, "epoch": self.stream.epoch, **means})
            if self.tensorboard is not None:
                self.tensorboard.log_step(self.history[-1])
            self.reporter.progress(step, steps, f"step {step}/{steps}, loss {means.get('loss', float('nan')):.4g}")
            self.reporter.log(f"{job.name} step {step}/{steps}: {format_metrics(means)}")
        # The clock is looked at when metrics are logged, and rank 0's reading decides for all ranks.
        overdue = logged and rank0_says(time.monotonic() - self.last_save > 60 * opts.checkpoint_minutes, self.world)
        if step % opts.checkpoint_every == 0 or overdue:
            self.save()

    def run(self) -> TrainingSummary:
        try:
            summary = self._attempt()
        except BaseException:
            # A failed attempt's rows too (the next attempt trims those it logs again); its own error is the news.
            if self.tensorboard is not None:
                with contextlib.suppress(OSError):
                    self.tensorboard.close()
            raise
        if self.tensorboard is not None:
            self.tensorboard.close()
        return summary

    def _attempt(self) -> TrainingSummary:
        resumed_from = self.resume()
        while True:
            try:
                self._train()
                break
            except FloatingPointError as err:
                self._recover(err)
        summary = self.summary(resumed_from)
        if self.rank == 0:
            self._write_results()
        return summary

    def _start_tensorboard(self) -> None:
        """A new event file, from the state just seeded or loaded (the run's files trimmed to its history)."""
        if self.tensorboard is not None:
            self.tensorboard.start(self.step, Logged.of(self.history, self.epochs))

    def _pictures(self) -> dict[str, np.ndarray]:
        """The job's pictures of the model as it is: in eval mode, without gradients, and from
        no RNG but their own (training takes the same random numbers with TensorBoard or without)."""
        if self.job.pictures is None:
            return {}
        with torch.no_grad():
            return self.job.pictures(self.published())

    def _train(self) -> None:
        job = self.job
        # The loss check runs first: a diverged model is never checkpointed.
        fault = fail_once_at(job.name, job.options.fail_once_at_step.get(job.name), job.artifact, self.rank, self.world)
        hooks = [self._check_loss, self._average, self._on_step, *fault]
        self.step = vqvae2.fit(self.stepped, self.optimizer, self.stream, self.loss_fn, job.train,
                               scheduler=self.scheduler, start_step=self.step, hooks=hooks)
        if self.epoch_window.count:
            self._close_epoch(self.stream.epoch, partial=self.stream.consumed < job.batches_per_epoch)
        self.save()

    def _write_results(self) -> None:
        job, storage = self.job, self.job.artifact.storage_options
        check_turn(job.artifact.url, storage_options=storage)
        write_bytes(job.artifact.path("loss_curve.png"), loss_curve_png(self.history, f"{job.name} training loss"), storage)
        write_json(job.artifact.path("history.json"), {"steps": self.history, "epochs": self.epochs}, storage)
        save_checkpoint(job.artifact.path("model.pt"), vqvae2.to_checkpoint(self.published().cpu().float()), storage)

    def published(self) -> nn.Module:
        """The weights evaluated and written to model.pt, in eval mode: their Polyak average with
        train.ema_decay, else the model's (the next training step puts it back in train mode)."""
        published = vqvae2.averaged_model(self.average, self.model)
        published.eval()
        return published

    def _average(self, step: int, metrics: Metrics) -> None:
        if self.average is not None:
            self.average.update_parameters(self.model)

    def summary(self, resumed_from: int) -> TrainingSummary:
        job = self.job
        final = {**(self.history[-1] if self.history else {}), **(self.epochs[-1] if self.epochs else {})}
        return TrainingSummary(
            steps=self.step, resumed_from_step=resumed_from, epochs=len(self.epochs),
            metrics={k: float(v) for k, v in final.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
            model=job.artifact.path("model.pt"), loss_curve=job.artifact.path("loss_curve.png"),
            history=job.artifact.path("history.json"), device=str(self.device), processes=self.world,
            recoveries=[asdict(r) for r in self.recoveries],
        )
