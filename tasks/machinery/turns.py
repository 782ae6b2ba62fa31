"""Runs take turns per artifact: whichever run needs an artifact first makes it; any other run
that needs it (of this config or another) waits, then finds it done (`Cached`) and reuses it;
and a run that lost its turn writes nothing more under the root.

A turn is a lease (`storage.lease`) kept under the storage root itself, in
`{root}/.vqvae2/turns/<stage folder>/<key>/`: the key of the artifact, or for the ingest,
whose key waits for the source's content digest, the key of what the source is and how it is
sharded (`Stage.turn`). So runs take turns whatever Prefect server each uses (or none), on
any machine that reaches the root. A run takes a stage's turn before the stage starts
(`Stage.start`) and gives it back once its output is there: at once for a stage the flow
runs through, when its future is done for a training. The holding run rewrites a heartbeat
every 15 s. A waiting run says so in its log, naming the holder's host, process and flow
run, and takes the turn over at once when the holder is gone: a process of this host that
no longer exists (killed, even with SIGKILL), a flow run this Prefect API shows finished,
or a holder already judged gone at another turn of this run; otherwise once the holder's
heartbeat has not changed for a minute, timed by the waiter's own clock. Runs take the turns
they need in the pipeline's order, each waiting for one turn at a time, so two runs never
wait for each other.

Every write under the root asks first (`check_turn`): a unit before its work and before its
marker, Prefect's cache records, a training process before each checkpoint and its model,
the run's record. In the run's process the lease answers; elsewhere (a unit on a Dask
worker, a training process) the lease records do, for the turn the stage's `Runtime`
carries (`TurnHeld`). Once a run's turn was taken over (it was frozen, or cut off, for longer
than the bound), the writer is stopped with `TurnLost`, and the run ends Failed with one
line saying which run took over. Nothing here depends on the Prefect API staying up: a run
whose server is restarted keeps its turns, and gives them back when it ends.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.runtime import flow_run
from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, get_current_settings, temporary_settings

from storage.fsutil import join, redact
from storage.lease import Holder, Lease, TurnLost, still_held

from ..config import Runtime, TurnHeld
from .reporting import logger

BEATS_PER_BOUND = 4  # a holder beats several times within a bound: a failed write or two is survived
WAIT_POLL_S = 2.0
API_TIMEOUT_S = 5.0  # asking the API whether a holder's flow run finished: never longer than this
TURN_ENV = "VQVAE2_TURN"  # a training process's turn (`TurnHeld`, as JSON)

_held: dict[str, Lease] = {}  # artifact URL -> the lease this process holds for it
_held_lock = threading.Lock()
_current: ContextVar[RunTurns | None] = ContextVar("vqvae2_turns", default=None)


def turn_url(root: str, folder: str) -> str:
    """Where runs take turns at the artifact `folder` (`autoencoder/<key>`) of `root`."""
    return join(root, ".vqvae2", "turns", folder)


class RunTurns:
    """The turns of one run: every lease it takes has its holder (one token for the run)."""

    def __init__(self) -> None:
        self.api = api_identity()
        self.holder = Holder(flow_run=str(flow_run.get_id() or ""), api=self.api)
        self.gone: set[str] = set()  # tokens of holders this run found gone: their other turns are taken at once
        self.leases: list[Lease] = []
        self.lost: Lease | None = None
        self._lock = threading.Lock()  # turns are given back from the threads of finished futures too

    def take(self, root: str, folder: str, artifact_url: str, storage_options: dict | None,
             bound_s: float) -> Lease:
        """Wait for the turn at `folder`, then hold it for the writes under `artifact_url`
        (`held(lease, runtime)` is the runtime that carries it to other processes); a holder
        whose heartbeat stands still `bound_s` is taken for gone (`storage.turn_bound_s`)."""
        lease = Lease(turn_url(root, folder), storage_options, holder=self.holder, bound_s=bound_s,
                      renew_s=bound_s / BEATS_PER_BOUND, poll_s=min(WAIT_POLL_S, bound_s / BEATS_PER_BOUND),
                      finished=self._finished, log=logger(), what=folder)
        lease.acquire()
        if lease.took_over is not None:
            self.gone.add(lease.took_over.token)
        with _held_lock:
            _held[artifact_url.rstrip("/")] = lease
        with self._lock:
            self.leases.append(lease)
        return lease

    def give_back(self, lease: Lease) -> None:
        with _held_lock:
            for url in [url for url, held in _held.items() if held is lease]:
                del _held[url]
        with self._lock:
            if lease not in self.leases:
                return
            self.leases.remove(lease)
        if not _still_held(lease) and self.lost is None:  # a stale turn is looked at first: a lost one is left alone
            self.lost = lease
        lease.release()

    def close(self) -> None:
        for lease in list(self.leases):
            self.give_back(lease)

    def check(self) -> None:
        """Raise `TurnLost` if any turn of this run was taken over (before the run's own writes)."""
        lost = self.lost_turn()
        if lost is not None:
            raise lost_at(lost)

    def lost_turn(self) -> Lease | None:
        """The turn of this run that was taken over, if one was (the held ones looked at now)."""
        for lease in list(self.leases):
            if not _still_held(lease) and self.lost is None:
                self.lost = lease
        return self.lost

    def _finished(self, holder: Holder) -> bool:
        return holder.token in self.gone or flow_run_finished(self.api, holder)


def _still_held(lease: Lease) -> bool:
    """`lease.confirm()`, where an unreadable storage counts as held: the run's own error, or
    the release, says what went wrong, not this look."""
    try:
        return lease.confirm()
    except Exception:  # noqa: BLE001 - any storage or network error of any client library
        return True


def held(lease: Lease, runtime: Runtime) -> Runtime:
    """`runtime` carrying the turn `lease` holds: what a unit in another process asks after."""
    with _held_lock:
        artifact = next(url for url, lease_of in _held.items() if lease_of is lease)
    turn = TurnHeld(lease=lease.url, number=lease.number, token=lease.holder.token, artifact=artifact, what=lease.what)
    return runtime.model_copy(update={"turn": turn})


def lost_at(lease: Lease) -> TurnLost:
    return TurnLost(f"another run took over this run's turn at {lease.what} ({lease.why_lost}): this run stops, and "
                    "writes nothing more under the root")


@contextmanager
def taking_turns() -> Iterator[RunTurns]:
    """The turns of the run in this block: `Stage.start` takes them; all are given back at its
    end. A run that lost a turn fails with `TurnLost`, saying which run took over, whatever
    error its stopped writers met first."""
    turns = RunTurns()
    token = _current.set(turns)
    try:
        yield turns
    except Exception as error:
        lost = turns.lost_turn()
        if lost is None:
            raise
        raise lost_at(lost) from error
    finally:
        _current.reset(token)
        turns.close()


def check_turns() -> None:
    """Raise `TurnLost` if the run this code runs in lost any of its turns."""
    turns = current_turns()
    if turns is not None:
        turns.check()


def current_turns() -> RunTurns | None:
    """The turns of the run this code runs in, if it takes turns."""
    return _current.get()


def check_turn(url: str, turn: TurnHeld | None = None, storage_options: dict | None = None) -> None:
    """Before writing at `url` under the root: raise `TurnLost` if the turn of the artifact it
    belongs to was taken over. The lease of this process answers; in another process, the
    lease records (read with `storage_options`), for the `turn` a unit's runtime carries (on
    a Dask worker) or the parent gave (a training process: `TURN_ENV`). Where no turn is known
    (a stage called outside a run's turns), nothing is checked."""
    url = url.rstrip("/")
    with _held_lock:
        lease = next((held for prefix, held in _held.items() if _under(url, prefix)), None)
    if lease is not None:
        if not lease.confirm():
            raise lost_at(lease)
        return
    if turn is None and os.environ.get(TURN_ENV):
        turn = TurnHeld.model_validate_json(os.environ[TURN_ENV])
    if turn is not None and _under(url, turn.artifact):
        why = still_held(turn.lease, turn.number, turn.token, storage_options)
        if why:
            raise TurnLost(f"another run took over this run's turn at {turn.what} ({why}): this process stops, and "
                           "writes nothing more under the root")


def _under(url: str, prefix: str) -> bool:
    return url == prefix or url.startswith(prefix.rstrip("/") + "/")


def turn_env(turn: TurnHeld | None) -> dict[str, str]:
    """What a training process needs to check `turn` (no credentials)."""
    return {TURN_ENV: turn.model_dump_json()} if turn is not None else {}


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

