"""Two runs of one config at once: the second waits for the first, then finds every
artifact done (all tasks `Cached`), so the root ends with one set of artifacts, as after a
single run, and no training attempt prunes another's checkpoints.

They take turns through a lease kept under the storage root itself (`storage.lease`), in
`{root}/.vqvae2/runs/<run_limit>/`: `run_limit` names the root and the part of the config
that decides the artifacts (the same fields the stage keys read). So runs of one config
into one root take turns whatever Prefect server each uses (or none), on any machine that
reaches the root. The holding run rewrites a heartbeat there every 15 s. A waiting run says
so in its log (naming the holder's host, process and flow run), and takes the turn over
at once when its holder is gone: a process of this host that no longer exists (killed,
even with SIGKILL), or a flow run this Prefect API shows finished (a worker marks a killed
run Crashed); otherwise once the holder's heartbeat has not changed for a minute, timed by
the waiter's own clock. A finished run removes its lease, and the next run starts at once.
Nothing here depends on the Prefect API staying up: a run whose server is restarted keeps
its turn, and releases it when it ends.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.runtime import flow_run
from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, get_current_settings, temporary_settings

from storage.fsutil import join, redact
from storage.lease import Holder, Lease

from ..config import PipelineConfig, Runtime, config_key
from .reporting import logger

LEASE_S = 60.0  # a holder whose heartbeat has not changed this long is gone
RENEW_EVERY_S = 15.0
WAIT_POLL_S = 2.0
API_TIMEOUT_S = 5.0  # asking the API whether a holder's flow run finished: never longer than this

def run_limit(config: PipelineConfig) -> str:
    """The name under which runs of `config` into its storage root take turns."""
    return "vqvae2-run-" + config_key(config)


def lease_url(config: PipelineConfig) -> str:
    """The folder under the storage root where runs of `config` take turns."""
    return join(config.storage.url, ".vqvae2", "runs", run_limit(config))


@contextmanager
def one_run_at_a_time(config: PipelineConfig) -> Iterator[None]:
    api = api_identity()
    holder = Holder(flow_run=str(flow_run.get_id() or ""), api=api)
    lease = Lease(lease_url(config), Runtime.of(config).storage_options, holder=holder, bound_s=LEASE_S,
                  renew_s=RENEW_EVERY_S, poll_s=WAIT_POLL_S, finished=partial(flow_run_finished, api), log=logger())
    with lease:
        yield


def api_identity() -> str:
    """Which Prefect API records this process's flow runs: its URL, or for an ephemeral
    server the database it keeps (processes of one PREFECT_HOME share it)."""
    settings = get_current_settings()
    if settings.api.url:
        return redact(str(settings.api.url))
    database = settings.server.database.connection_url
    return "ephemeral:" + hashlib.sha256((database.get_secret_value() if database else "").encode()).hexdigest()[:16]


def flow_run_finished(api: str, holder: Holder) -> bool:
    """Whether `holder`'s flow run is shown finished by this API; an unreachable API leaves it
    to the holder's heartbeat, so this never holds a waiting run up for long."""
    if not holder.flow_run or holder.api != api:
        return False
    try:
        with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}), \
                get_client(sync_client=True, httpx_settings={"timeout": API_TIMEOUT_S}) as client:
            state = client.read_flow_run(UUID(holder.flow_run)).state
    except Exception:  # noqa: BLE001 - any failure to ask (a server restarting, a deleted run) is "not known"
        return False
    return state is not None and state.is_final()
