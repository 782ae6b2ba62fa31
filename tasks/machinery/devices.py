"""Which device a stage computes on, and which GPU a training has to itself."""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from prefect import Task
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency

from ..config import AUTO, PipelineConfig, Runtime, TrainingRuntime
from .cached import with_records
from .reporting import in_prefect_run


def resolve_device(choice: str) -> torch.device:
    """`training.device` as a torch device: auto is CUDA when there is one."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("training.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def on_this_machine(config: PipelineConfig) -> PipelineConfig:
    """`config` with what it leaves to the machine decided: `training.processes: auto` becomes
    one training process per visible GPU (one without a GPU). Done once, where the run
    starts: the keys read the config that comes out, never the machine."""
    training = config.training
    if training.processes != AUTO:
        return config
    processes = max(1, torch.cuda.device_count())
    return PipelineConfig.model_validate(config.model_dump() | {"training": training.model_dump() | {"processes": processes}})


# --- sharing GPUs between concurrent trainings ------------------------------------------------
# The pipeline trains several models at once (the classifiers beside the autoencoder, the
# priors of every level together). On GPUs, Prefect's concurrency limits keep them from
# sharing one: the tag limit `gpu` lets at most one training per GPU run at a time (the
# others wait in `AwaitingConcurrencySlot`, visible in the UI), and inside a training,
# one limit per device (`vqvae2-gpu-<index>`, one slot each) says which GPU is its own.

GPU_TAG = "gpu"
CLAIM_LIMIT = "vqvae2-gpu-claim"
NODES_LIMIT = "vqvae2-nodes"


def gpu_limit_name(index: int) -> str:
    return f"vqvae2-gpu-{index}"


def gpu_count(training: TrainingRuntime) -> int:
    """The GPUs trainings share on a worker: `training.gpus`, else the visible CUDA devices."""
    if training.device == "cpu":
        return 0
    return training.gpus if training.gpus is not None else torch.cuda.device_count()


def ensure_gpu_limits(count: int) -> None:
    """Set the concurrency limits for `count` GPUs: `training.gpus` is the operator's word.
    (Prefect keeps a tag's limit as the global concurrency limit `tag:<tag>`.)"""
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(f"tag:{GPU_TAG}", limit=count)
        client.upsert_global_concurrency_limit_by_name(CLAIM_LIMIT, limit=1)
        for index in range(count):
            client.upsert_global_concurrency_limit_by_name(gpu_limit_name(index), limit=1)


def training_task(unit: Task, runtime: Runtime) -> Task:
    """How a flow calls a training task: cached under the root, and, where trainings share
    GPUs, waiting for a GPU of its own."""
    cached = with_records(unit, runtime.root, runtime.storage_options)
    count = gpu_count(runtime.training)
    if not count:
        return cached
    ensure_gpu_limits(count)
    return cached.with_options(tags={GPU_TAG})


@contextmanager
def claimed_gpus(training: TrainingRuntime, count: int = 1, poll_seconds: float = 1.0) -> Iterator[list[int]]:
    """Inside a training task: the indices of `count` GPUs (one per data-parallel rank) no
    other training holds, held until the block ends ([] without GPUs or outside a Prefect
    run). They are claimed all at once, so two trainings never wait on each other's half."""
    gpus = gpu_count(training)
    if not gpus or not in_prefect_run():
        yield []
        return
    if count > gpus:
        raise ValueError(f"a training on {count} processes needs {count} GPUs, but training.gpus is {gpus}")
    with ExitStack() as held:
        while (indices := _claim(held, gpus, count)) is None:
            time.sleep(poll_seconds)
        yield indices


@contextmanager
def one_multi_node_training(training: TrainingRuntime) -> Iterator[None]:
    """Inside a training task on several machines: the other machines serve one training at
    a time (`vqvae2 node`, at one rendezvous endpoint), so such trainings take turns (the
    limit NODES_LIMIT); a training on one machine goes straight on."""
    if training.nnodes == 1 or not in_prefect_run():
        yield
        return
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(NODES_LIMIT, limit=1)
    with concurrency(NODES_LIMIT, occupy=1, strict=True):
        yield


def _claim(held: ExitStack, gpus: int, count: int) -> list[int] | None:
    # One training at a time looks for free GPUs and takes them (the limit CLAIM_LIMIT), so
    # what it found free is still free when it takes it. Waiting is sleeping between looks,
    # not acquiring with a timeout: Prefect logs every such timeout as an ERROR.
    with concurrency(CLAIM_LIMIT, occupy=1, strict=True):
        indices = _free_gpus(gpus, count)
        if indices is not None:
            held.enter_context(concurrency([gpu_limit_name(i) for i in indices], occupy=1, strict=True))
        return indices


def _free_gpus(gpus: int, count: int) -> list[int] | None:
    """The first `count` consecutive GPUs whose limits have no slot taken, if any."""
    with get_client(sync_client=True) as client:
        busy = [client.read_global_concurrency_limit_by_name(gpu_limit_name(i)).active_slots > 0
                for i in range(gpus)]
    for first in range(gpus - count + 1):
        if not any(busy[first:first + count]):
            return list(range(first, first + count))
    return None
