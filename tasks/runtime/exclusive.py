"""Two runs of one config at once: the second waits for the first, then finds every
artifact done (all tasks `Cached`), so the root ends with one set of artifacts, as after a
single run, and no training attempt prunes another's checkpoints.

They take turns through a Prefect global concurrency limit of one slot named after the
storage root and the part of the config that decides the artifacts (the same fields the
stage keys read). The slot is a lease the holding run renews while it lives; the holder
(lease, flow run, host and process) is a Prefect variable of the same name. A waiting run
says so in its log, and takes the slot over at once when its holder is gone: a process
of this host that no longer exists (killed, even with SIGKILL), or a flow run Prefect
shows as finished (a worker marks a killed run Crashed). Otherwise the lease runs out a
minute after the holder's last renewal.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import VariableCreate, VariableUpdate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
from prefect.runtime import flow_run

from storage.artifacts import canonical_json
from storage.fsutil import HOST, process_alive

from ..config import PipelineConfig
from .reporting import logger

LEASE_S = 60.0  # the shortest lease Prefect grants
RENEW_EVERY_S = 15.0
WAIT_POLL_S = 2.0
LOCKED = 423  # Prefect's answer while the slot is taken

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
        lease = _acquire(client, name, config.storage.url)
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(lease, stop), daemon=True, name=f"{name}-lease")
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        with get_client(sync_client=True) as client:
            _release(client, name, lease)


def _acquire(client: Any, name: str, root: str) -> UUID:
    me = flow_run.get_id()
    holder = ConcurrencyLeaseHolder(type="flow_run", id=me) if me else None
    waiting = False
    while True:
        try:
            granted = client.increment_concurrency_slots_with_lease([name], 1, "concurrency", LEASE_S, holder=holder)
        except PrefectHTTPStatusError as err:
            if err.response.status_code != LOCKED:
                raise
        else:
            lease = UUID(granted.json()["lease_id"])
            _set_holder(client, name, {"lease": str(lease), "flow_run": str(me or ""), "host": HOST, "pid": os.getpid()})
            return lease
        if _take_over_from_gone_holder(client, name):
            continue
        if not waiting:
            logger().info(f"another run of this config into {root} is under way: waiting for it "
                          f"(concurrency limit {name}), then its artifacts are reused")
            waiting = True
        time.sleep(WAIT_POLL_S)


def _take_over_from_gone_holder(client: Any, name: str) -> bool:
    holder = _holder(client, name)
    if holder is None or not _gone(client, holder):
        return False
    logger().warning(f"the run holding {name} (flow run {holder['flow_run'] or '?'}, process {holder['pid']}) is "
                     "gone: taking its place; its unfinished work resumes here")
    with suppress(PrefectHTTPStatusError):  # another waiting run was quicker
        client.release_concurrency_slots_with_lease(UUID(holder["lease"]))
    with suppress(ObjectNotFound):
        client.delete_variable_by_name(name)
    return True


def _gone(client: Any, holder: dict[str, Any]) -> bool:
    if holder.get("host") == HOST:
        return not process_alive(int(holder["pid"]))
    if not holder.get("flow_run"):
        return False
    try:
        state = client.read_flow_run(UUID(holder["flow_run"])).state
    except ObjectNotFound:
        return True
    return state is not None and state.is_final()


def _holder(client: Any, name: str) -> dict[str, Any] | None:
    variable = client.read_variable_by_name(name)
    return variable.value if variable is not None and isinstance(variable.value, dict) else None


def _set_holder(client: Any, name: str, holder: dict[str, Any]) -> None:
    if client.read_variable_by_name(name) is None:
        with suppress(PrefectHTTPStatusError):  # created meanwhile by a run that lost the slot to us: update it
            client.create_variable(VariableCreate(name=name, value=holder))
            return
    client.update_variable(VariableUpdate(name=name, value=holder))


def _renew(lease: UUID, stop: threading.Event) -> None:
    with get_client(sync_client=True) as client:
        while not stop.wait(RENEW_EVERY_S):
            try:
                client.renew_concurrency_lease(lease, LEASE_S)
            except Exception as err:  # noqa: BLE001 - an outage of the API ends the protection, never the run
                logger().warning(f"could not renew this run's turn ({err}); another run of this config may start")


def _release(client: Any, name: str, lease: UUID) -> None:
    holder = _holder(client, name)
    if holder is not None and holder.get("lease") == str(lease):
        with suppress(ObjectNotFound):
            client.delete_variable_by_name(name)
    with suppress(PrefectHTTPStatusError):  # already taken over: nothing of ours to release
        client.release_concurrency_slots_with_lease(lease)
