"""The `training` section: where and how trainings run, and how many processes train each model."""
from __future__ import annotations

import importlib.util
import os
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from .fields import AUTO, RUN_ONLY, Section

HOST_PORT = r"^.+:[0-9]+$"  # what `_rendezvous` takes (`fields.SchemaBounds` says why both)


class TrainingRuntime(Section):
    """How trainings run: where, in which process, how often they report and checkpoint; what
    every stage may read (`Runtime.training`). None of it is in a key but `nnodes`, which the
    launcher needs and which the stages' keys hold through their process count."""

    device: Annotated[Literal["auto", "cpu", "cuda"], RUN_ONLY] = Field(
        "auto", description="auto: CUDA when available",
    )
    checkpoint_every: Annotated[int, RUN_ONLY] = Field(
        500, ge=1, description="Save a checkpoint every N steps ...",
    )
    checkpoint_minutes: Annotated[float, RUN_ONLY] = Field(
        10.0, gt=0, description="... and at least every M minutes",
    )
    log_every: Annotated[int, RUN_ONLY] = Field(
        50, ge=1, description="Log metrics and update progress every N steps",
    )
    subprocess: Annotated[bool, RUN_ONLY] = Field(
        True, description="Run each training attempt in a fresh process (isolated RNG and CUDA context); off runs it "
        "in the task's thread, for debugging",
    )
    cpu_threads: Annotated[int | None, RUN_ONLY] = Field(
        None, ge=1, description="CPU threads of each training process; None: half the cores, since the pipeline "
        "trains two models at a time",
    )
    decoded_cache_mb: Annotated[int, RUN_ONLY] = Field(
        2048, ge=0, description="Keep a training's decoded train images in memory across epochs when they fit in "
        "this many MiB (in each training process, with num_workers 0): after the first epoch no shard is read or "
        "decoded again, and the batches are the same; 0: off",
    )
    gpus: Annotated[int | None, RUN_ONLY] = Field(
        None, ge=0, description="GPUs of a worker that trainings share: at most one training per GPU at a time, each "
        "on its own (Prefect concurrency limits `gpu` and `vqvae2-gpu-<i>`); None: the visible CUDA devices; 0: no "
        "limit",
    )
    tensorboard: Annotated[bool, RUN_ONLY] = Field(
        False, description="Also write each training's metrics, and a picture per epoch (reconstructions, prior "
        "samples), as TensorBoard event files under {root}/tensorboard/<training>-<key>/: `tensorboard --logdir "
        "{root}/tensorboard`; a Cached training's scalars from the history.json its artifact keeps",
    )

    nnodes: int = Field(1, ge=1, description="Machines each data-parallel training spans, `training.processes` "
                        "on each: this worker is node 0, and every other machine runs `vqvae2 node --rdzv-endpoint "
                        "HOST:PORT --nnodes N --node-rank K --nproc-per-node P`; all must reach the storage root")
    rdzv_endpoint: Annotated[str | None, RUN_ONLY] = Field(
        None, json_schema_extra={"pattern": HOST_PORT}, description="host:port of this worker, where the training "
        "processes of several machines meet (torchrun's static rendezvous); needed when nnodes > 1",
    )

    # Testing only: kept out of the JSON schema, so the UI's run form never offers it.
    fail_once_at_step: Annotated[SkipJsonSchema[dict[str, int]], RUN_ONLY] = Field(
        default_factory=dict, description="Testing only: make a training stage ('autoencoder', 'prior-top', "
        "'classifier', ...) fail once at this step, to exercise retries and resuming",
    )

    def threads(self) -> int:
        return self.cpu_threads or max(1, (os.cpu_count() or 2) // 2)

    @model_validator(mode="after")
    def _rendezvous(self) -> TrainingRuntime:
        if self.rdzv_endpoint is not None:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"training.rdzv_endpoint must be host:port, got {self.rdzv_endpoint!r}")
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError(f"training.nnodes is {self.nnodes}: set training.rdzv_endpoint to this worker's "
                             "host:port, where the other machines' training processes join it")
        return self

    @field_validator("tensorboard")
    @classmethod
    def _tensorboard_installed(cls, on: bool) -> bool:
        # Checked with the config, before anything runs: not when the first training starts.
        if on and importlib.util.find_spec("tensorboard") is None:
            raise ValueError("training.tensorboard is true, but tensorboard is not installed on this machine: "
                             "pip install 'vqvae2[tensorboard]' (or tensorboard), or leave training.tensorboard off")
        return on


class TrainingSection(TrainingRuntime):
    """The `training` section: how trainings run, how many processes train each model, and
    how many read its shards."""

    processes: int | Literal["auto"] = Field(
        1, json_schema_extra={"minimum": 1}, description="Data-parallel training processes per model and machine "
        "(torchrun: NCCL on GPUs, gloo on CPU), sharing each batch; auto: one per visible GPU. Part of the cache "
        "keys: the ranks split the data",
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes for reading shards (the shard "
                             "readers interleave, so this changes the batch order and is part of the cache keys)")

    @field_validator("processes")
    @classmethod
    def _processes(cls, processes: int | str) -> int | str:
        if processes != "auto" and processes < 1:
            raise ValueError(f"training.processes must be >= 1 or 'auto', got {processes}")
        return processes

    def runtime(self) -> TrainingRuntime:
        """The part every stage may read; the rest reaches only the stages whose key holds it."""
        return TrainingRuntime(**self.model_dump(include=set(TrainingRuntime.model_fields)))

    def world_size(self) -> int:
        """The training processes per model on all nodes. `auto` must have been resolved on the
        machine that trains (`tasks.machinery.devices.on_this_machine`): a key never reads the machine."""
        if self.processes == AUTO:
            raise ValueError("training.processes is auto: the number of training processes, part of the keys, is "
                             "this machine's GPUs; resolve it where the run trains (devices.on_this_machine)")
        return self.processes * self.nnodes

