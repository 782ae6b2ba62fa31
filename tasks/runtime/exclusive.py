"""Two runs of one config at once: the second waits for the first, then finds every
artifact done (all tasks `Cached`), so the root ends with one set of artifacts, as after a
single run, and no training attempt prunes another's checkpoints.

They take turns through a Prefect global concurrency limit of one slot named after the
storage root and the part of the config that decides the artifacts (the same fields the
stage keys read). The waiting run shows as such in its log; the slot is a lease Prefect
renews while the run lives, so a run that was killed frees it within the lease (5 min).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency

from storage.artifacts import canonical_json

from ..config import PipelineConfig
from .reporting import logger

# Fields no artifact depends on: where and how fast work runs, and how storage is reached.
RUN_ONLY = {"runner": True, "encode": True, "storage": {"storage_options", "credentials_block"},
            "training": {"device", "checkpoint_every", "checkpoint_minutes", "log_every", "subprocess",
                         "cpu_threads", "decoded_cache_mb", "gpus", "rdzv_endpoint", "fail_once_at_step"}}


def run_limit(config: PipelineConfig) -> str:
    """The concurrency limit that runs of `config` into its storage root take turns on."""
    identity = canonical_json({"root": config.storage.url, "config": config.model_dump(mode="json", exclude=RUN_ONLY)})
    return "vqvae2-run-" + hashlib.sha256(identity.encode()).hexdigest()[:16]


@contextmanager
def one_run_at_a_time(config: PipelineConfig) -> Iterator[None]:
    name = run_limit(config)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit=1)
        busy = client.read_global_concurrency_limit_by_name(name).active_slots > 0
    if busy:
        logger().info(f"another run of this config into {config.storage.url} is under way: waiting for it "
                      f"(concurrency limit {name}), then its artifacts are reused")
    with concurrency(name, occupy=1, strict=True):
        yield
