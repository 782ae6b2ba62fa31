"""A training's TensorBoard event files (`training.tensorboard`), under
`{root}/tensorboard/<training>-<artifact key>/`: `tensorboard --logdir {root}/tensorboard`
shows one run per training (`autoencoder-<key>`, `prior-top-<key>`, `classifier-judge-<key>`).

What is written is the training's history.json as it grows: a scalar `train/<metric>` per
logged step (its `steps` rows), a scalar `epoch/<metric>` per epoch (its `epochs` rows:
`train_*` means over the epoch, `val_*` held-out metrics), and the job's pictures of each
epoch as `images/<name>` (reconstructions, samples of a prior). Rank 0 writes.

The root may be S3 or memory://, and TensorBoard's writers write local files only. So an
attempt keeps its event file in memory, in TensorBoard's record format (its `RecordWriter`
and protos), and publishes the whole file with `storage.fsutil.write_bytes` (atomic: a reader
never sees half a file): at log points at most every `PUBLISH_EVERY_S`, at checkpoints, at
epoch ends and when the attempt ends. TensorBoard's Python loader (`--load_fast=false`, and
any s3:// logdir) follows the rewritten file as it grows; its fast loader (the default for a
local logdir) keeps reading the copy it opened first, so it shows a running training's later
steps only once restarted.

Resuming. An attempt (or a recovery from a divergence) goes on from a checkpoint, and the
root's files may hold rows that the checkpoint's history does not: those of the steps after
it, which will be logged again. So before writing, `start` trims the run's files to what that
history holds (step scalars up to its last logged step, epoch scalars and pictures up to its
last epoch, which may close after the checkpoint of its last step), then begins a new file,
named after the step it goes on from, so files sort in training order. Every reader
(TensorBoard's loaders, `EventAccumulator`, a plain `event_file_loader`) then finds each step
once. `purge_step` (a SessionLog.START event) would not do: only `EventAccumulator` honours
it, and it cuts every tag at one step, where the epoch rows end at a step of their own.

After the fact. A training made with the flag off, which a later run finds Cached, wrote no
events; its history.json, kept in its artifact, holds every row they show but the pictures
(those need the model as it was at each epoch). So every run that reaches a training's output
with the flag on (`events_of_finished`, the trainings' `Stage.then`) makes the same run folder
hold each scalar row of that history once: the rows no event file there holds yet (all of
them, or those a killed attempt never published) go into one file,
`events.out.tfevents.<step of its first row>.history`: named after a step, as a live attempt's
file is, so that it sorts among them in training order, and without a random part, so that two
runs completing one folder at once write the same file, not the same rows twice. A folder
that holds them all, as a live training leaves it, is left as it is. One line says what was
written where, or why nothing was.

`tensorboard` is imported only here, and only when a run is started or a finished one's
events are written: without the flag no training process pays for it.
"""
from __future__ import annotations

import struct
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from numbers import Real
from typing import Any

import numpy as np
import torch

from storage.fsutil import (TMP_MARKER, exists, find, join, read_bytes, read_json, redact, remove, sweep_temporaries,
                            write_bytes)

from ..config import Runtime
from ..manifests import TrainedManifest
from .reporting import image_grid, logger, png_bytes

FOLDER = "tensorboard"  # under the storage root; not an artifact (`vqvae2 verify` looks at stage folders only)
STEP, EPOCH, IMAGES = "train/", "epoch/", "images/"  # tag prefixes: a logged step's metrics, an epoch's, its pictures
EVENTS = "tfevents"  # what TensorBoard looks for in a file name
PUBLISH_EVERY_S = 10.0  # at log points, each publish rewrites the whole file: not more often than this
COORDINATES = ("step", "epoch")  # where a history row sits, not what it measured

# A record of an event file: uint64 length, uint32 its masked CRC-32C, the data, uint32 the data's.
_LENGTH = struct.Struct("<QI")
_FOOTER = 4


def run_url(root: str, training: str, key: str) -> str:
    """The folder of one training's event files: `{root}/tensorboard/<training>-<artifact key>`."""
    return join(root, FOLDER, f"{training}-{key}")


@dataclass(frozen=True)
class Logged:
    """How far a training's history goes: the step of its last logged row and the step at
    which its last epoch closed (-1: none)."""

    step: int
    epoch: int

    @classmethod
    def of(cls, history: list[dict[str, Any]], epochs: list[dict[str, Any]]) -> Logged:
        return cls(history[-1]["step"] if history else -1, epochs[-1]["step"] if epochs else -1)

    def holds(self, tag: str, step: int) -> bool:
        return step <= (self.step if tag.startswith(STEP) else self.epoch)


def _records(data: bytes, url: str) -> Iterator[tuple[bytes, bytes]]:
    """(whole record, its data) of each record of an event file's bytes."""
    at = 0
    while at < len(data):
        if at + _LENGTH.size > len(data):
            raise ValueError(f"{redact(url)}: not a TensorBoard event file (truncated at byte {at}); remove it")
        length, _ = _LENGTH.unpack_from(data, at)
        end = at + _LENGTH.size + length + _FOOTER
        if end > len(data):
            raise ValueError(f"{redact(url)}: not a TensorBoard event file (truncated at byte {at}); remove it")
        yield data[at:end], data[at + _LENGTH.size:end - _FOOTER]
        at = end


def event_files(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The event files of a run folder, in the order TensorBoard reads them (by name)."""
    if not exists(url, storage_options):
        return []
    # Not a writer's temporary (its name has "tfevents" too): half a file until it is renamed.
    return [join(url, name) for name in sorted(find(url, storage_options))
            if EVENTS in name and "/" not in name and TMP_MARKER not in name]


def trim(url: str, logged: Logged, storage_options: dict[str, Any] | None = None) -> None:
    """Keep in the run folder's event files only the rows `logged` holds: each file is
    rewritten (atomically) without the others, or removed when no row is left."""
    from tensorboard.compat.proto.event_pb2 import Event

    if exists(url, storage_options):
        # A killed writer's temporaries (local roots) have "tfevents" in their names too.
        sweep_temporaries(url, storage_options)
    for file_url in event_files(url, storage_options):
        kept, rows, dropped = [], 0, False
        for record, data in _records(read_bytes(file_url, storage_options), file_url):
            event = Event.FromString(data)
            if not event.HasField("summary"):
                kept.append(record)  # the file's version header
            elif all(logged.holds(value.tag, event.step) for value in event.summary.value):
                kept.append(record)
                rows += 1
            else:
                dropped = True
        if not rows:
            remove(file_url, storage_options)
        elif dropped:
            write_bytes(file_url, b"".join(kept), storage_options)


class TensorBoardRun:
    """One training's event files: each attempt `start`s a file, logs rows into it, and
    publishes it under the root; `close` publishes what is left."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url, self.storage_options = url, storage_options
        self.name: str | None = None  # the current attempt's file
        self.buffer = bytearray()
        self.unpublished = False
        self.published_at = -float("inf")

    def start(self, step: int, logged: Logged) -> None:
        """Begin a new event file for training that goes on from `step` with the history
        `logged`; the run's files are trimmed to that history first (see the module's doc)."""
        self.publish()
        trim(self.url, logged, self.storage_options)
        # The step first, so that the files sort in training order; then a random part:
        # attempts that go on from one step each write their own (the earlier ones trimmed away).
        self._begin(f"events.out.{EVENTS}.{step:012d}.{uuid.uuid4().hex[:12]}")

    def _begin(self, name: str) -> None:
        self.name, self.buffer, self.unpublished = name, bytearray(), False
        self._write(file_version="brain.Event:2")

    def log_step(self, row: Mapping[str, Any]) -> None:
        """A history row of a logged step: its metrics as `train/<name>`."""
        self._scalars(STEP, row)
        if time.monotonic() - self.published_at >= PUBLISH_EVERY_S:
            self.publish()

    def log_epoch(self, row: Mapping[str, Any], pictures: Mapping[str, np.ndarray]) -> None:
        """An epoch's row (`epoch/<name>`) and its pictures (`images/<name>`, uint8 H x W (x 3))."""
        self._scalars(EPOCH, row)
        for name, picture in pictures.items():
            self._picture(f"{IMAGES}{name}", int(row["step"]), picture)
        self.publish()

    def publish(self) -> None:
        """Write the current file under the root, if anything was logged since the last time."""
        if self.name is not None and self.unpublished:
            write_bytes(join(self.url, self.name), bytes(self.buffer), self.storage_options)
            self.unpublished = False
        self.published_at = time.monotonic()

    def close(self) -> None:
        self.publish()  # nothing else is held: the file lives in memory

    def _scalars(self, prefix: str, row: Mapping[str, Any]) -> None:
        for tag, step, value in scalars(prefix, row):
            self._scalar(tag, step, value)

    def _scalar(self, tag: str, step: int, value: float) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._write(step=step, summary=Summary(value=[Summary.Value(tag=tag, simple_value=value)]))

    def _picture(self, tag: str, step: int, picture: np.ndarray) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        height, width = picture.shape[:2]
        image = Summary.Image(height=height, width=width, colorspace=1 if picture.ndim == 2 else picture.shape[2],
                              encoded_image_string=png_bytes(picture))
        self._write(step=step, summary=Summary(value=[Summary.Value(tag=tag, image=image)]))

    def _write(self, **event: Any) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.summary.writer.record_writer import RecordWriter

        RecordWriter(_Appender(self.buffer)).write(Event(wall_time=time.time(), **event).SerializeToString())
        self.unpublished = self.unpublished or "summary" in event


def scalars(prefix: str, row: Mapping[str, Any]) -> Iterator[tuple[str, int, float]]:
    """(tag, step, value) of each metric of a history row: not where it sits, nor a flag."""
    step = int(row["step"])
    for name, value in row.items():
        if name not in COORDINATES and not isinstance(value, bool) and isinstance(value, Real):
            yield prefix + name, step, value


class _Appender:
    """What `RecordWriter` writes to: the end of a bytearray."""

    def __init__(self, buffer: bytearray) -> None:
        self.buffer = buffer

    def write(self, data: bytes) -> None:
        self.buffer += data


# --- after the fact ------------------------------------------------------------------------

HISTORY_FILE = "history"  # the last part of the name of an event file written after the fact


def events_of_finished(manifest: TrainedManifest, runtime: Runtime) -> None:
    """The trainings' `Stage.then`: with `training.tensorboard`, a finished training's event
    files from the history kept in its artifact (`write_history`), in one line of the run's log.
    A view of results that are there: a storage error or a damaged event file is said, not raised."""
    if not runtime.training.tensorboard:
        return
    name = manifest.display_name
    url = run_url(runtime.root, name, manifest.key)
    try:
        said = write_history(url, manifest.history, runtime.storage_options)
    except (OSError, ValueError) as err:
        logger().warning(f"{name}: no TensorBoard events written to {redact(url)}: {err}")
        return
    logger().info(f"{name}: {said}")


def write_history(url: str, history_url: str, storage_options: dict[str, Any] | None = None) -> str:
    """Make the run folder `url` hold each scalar row of the finished training's history.json
    at `history_url` once (see the module's doc); returns what was done, as a line to log."""
    if not exists(history_url, storage_options):
        return (f"no TensorBoard events written to {redact(url)}: its artifact keeps no history.json to write them "
                "from (made by an older version of vqvae2)")
    try:
        history = read_json(history_url, storage_options)
        rows = sorted([(int(row["step"]), 0, STEP, row) for row in history["steps"]]
                      + [(int(row["step"]), 1, EPOCH, row) for row in history["epochs"]], key=lambda r: r[:2])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        return (f"no TensorBoard events written to {redact(url)}: {redact(history_url)} is not a training's history "
                f"({type(err).__name__}: {err})")
    held = logged_rows(url, storage_options)
    lacking = []  # (prefix, step, the row's scalars no event file holds) of each row not held whole
    for step, _, prefix, row in rows:
        found = [scalar for scalar in scalars(prefix, row) if scalar[:2] not in held]
        if found:
            lacking.append((prefix, step, found))
    whole = _counted(len(history["steps"]), len(history["epochs"]))
    if not lacking:
        return f"TensorBoard events of its {whole} at {redact(url)}"
    run = TensorBoardRun(url, storage_options)
    run._begin(f"events.out.{EVENTS}.{lacking[0][1]:012d}.{HISTORY_FILE}")
    for _, _, found in lacking:
        for tag, step, value in found:
            run._scalar(tag, step, value)
    run.close()
    kinds = [prefix for prefix, _, _ in lacking]
    written = _counted(kinds.count(STEP), kinds.count(EPOCH))
    what = f"its {whole}" if written == whole else f"{written} of its {whole} (the rest were there)"
    return (f"TensorBoard events of {what} written to {redact(url)} from its history.json (scalars only: the "
            "pictures are drawn as it trains)")


def _counted(steps: int, epochs: int) -> str:
    return f"{steps} logged step{'s' * (steps != 1)} and {epochs} epoch{'s' * (epochs != 1)}"


def logged_rows(url: str, storage_options: dict[str, Any] | None = None) -> set[tuple[str, int]]:
    """(tag, step) of every row the run folder's event files hold."""
    from tensorboard.compat.proto.event_pb2 import Event

    held = set()
    for file_url in event_files(url, storage_options):
        for _, data in _records(read_bytes(file_url, storage_options), file_url):
            event = Event.FromString(data)
            held.update((value.tag, event.step) for value in event.summary.value)
    return held


# --- pictures ------------------------------------------------------------------------------


def code_maps(codes: torch.Tensor, num_codes: int, columns: int) -> np.ndarray:
    """Code grids (N, H, W) as one picture, each code in a colour of its own (the same in
    every picture of every epoch: neighbouring indices mean nothing alike, so neither do
    their colours)."""
    palette = torch.rand(num_codes, 3, generator=torch.Generator().manual_seed(0))  # not the global RNG
    images = palette[codes.long().cpu()].permute(0, 3, 1, 2)  # (N, 3, H, W)
    return image_grid(images, columns=columns)
