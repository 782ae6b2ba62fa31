"""The run lease (`storage/lease.py`) on a local disk, memory:// and the moto S3 server: one
holder at a time, a released or dead holder's turn taken at once, a silent holder's after
the bound and never before, one winner among racing waiters, and a holder that lost its
turn says so; and, against the session's Prefect API, a holder whose flow run finished is
known gone while an unreachable API never holds a waiter up. Bounds of a few seconds keep
each test short."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from storage import fsutil
from storage.lease import Generation, Holder, Lease

REPO = Path(__file__).resolve().parents[1]
BOUND_S, RENEW_S, POLL_S = 2.0, 0.2, 0.05


def _lease(url: str, options: dict | None, **kwargs) -> Lease:
    return Lease(f"{url}/.vqvae2/runs/test", options, **{"bound_s": BOUND_S, "renew_s": RENEW_S, "poll_s": POLL_S,
                                                         **kwargs})


def _acquire_in_thread(lease: Lease) -> threading.Event:
    held = threading.Event()

    def take() -> None:
        lease.acquire()
        held.set()

    threading.Thread(target=take, daemon=True).start()
    return held


def _leave_record(lease: Lease, holder: Holder) -> None:
    """What a holder that stopped leaves behind: its generation's record, never renewed."""
    assert fsutil.create_new(f"{lease.url}/gen-000000001.json", Generation(1, holder).to_bytes(), lease.storage_options)


def _left(lease: Lease) -> list[str]:
    """The files under the lease's folder (none once it is gone, as on S3)."""
    try:
        return sorted(fsutil.find(lease.url, lease.storage_options))
    except FileNotFoundError:
        return []


def _exited_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


def test_a_holder_excludes_a_second_until_it_releases(storage_root):
    url, options = storage_root
    bound = 2 * BOUND_S  # room to tell "at once" from "after the bound" on a busy machine
    first, second = _lease(url, options, bound_s=bound), _lease(url, options, bound_s=bound)
    first.acquire()
    held = _acquire_in_thread(second)
    assert not held.wait(bound * 1.5)  # a live holder is waited for, past the bound: its heartbeat goes on
    released = time.monotonic()
    first.release()
    assert held.wait(bound)
    assert time.monotonic() - released < bound / 2  # a released lease is taken at once: the bound is not waited
    second.release()
    assert _left(second) == []  # a finished run leaves nothing behind


def test_a_dead_holder_of_this_host_is_taken_over_at_once(storage_root):
    url, options = storage_root
    lease = _lease(url, options, bound_s=600.0)
    _leave_record(lease, Holder(pid=_exited_pid()))
    started = time.monotonic()
    lease.acquire()
    assert time.monotonic() - started < 5  # at once, where the bound is 600 s
    assert lease.number == 2
    lease.release()
    assert _left(lease) == []  # the dead holder's record went too


def test_a_silent_holder_on_another_host_is_taken_over_after_the_bound_never_before(storage_root, caplog):
    url, options = storage_root
    lease = _lease(url, options)
    _leave_record(lease, Holder(host="elsewhere", pid=1, hostname="node-7", flow_run="0b6e9f0a"))
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="storage.lease"):
        lease.acquire()
    waited = time.monotonic() - started
    assert BOUND_S <= waited < BOUND_S + 10  # never before the bound; after it, as soon as it looks
    messages = [r.getMessage() for r in caplog.records]
    assert any("waiting for it" in m and "process 1 on node-7, flow run 0b6e9f0a" in m
               and f"{BOUND_S:.0f} s" in m for m in messages), messages
    assert any("is gone (its heartbeat has not changed for 2 s): taking its place" in m for m in messages), messages
    lease.release()


def test_a_finished_flow_run_is_taken_over_at_once(storage_root):
    url, options = storage_root
    lease = _lease(url, options, bound_s=600.0, finished=lambda holder: holder.flow_run == "done")
    _leave_record(lease, Holder(host="elsewhere", flow_run="done"))
    started = time.monotonic()
    lease.acquire()
    assert time.monotonic() - started < 5  # at once, where the bound is 600 s
    lease.release()


def test_racing_waiters_take_a_stale_lease_one_at_a_time(storage_root):
    url, options = storage_root
    # A bound well above a loaded machine's stall between a take and its first beat (S3 round
    # trips to a moto server sharing two busy cores): 2 s let a second waiter take over a live one.
    bound_s = 3 * BOUND_S
    leases = [_lease(url, options, poll_s=0.1, bound_s=bound_s) for _ in range(4)]
    _leave_record(leases[0], Holder(host="elsewhere"))
    turns: list[tuple[float, float, int]] = []
    started = time.monotonic()

    def take_a_turn(lease: Lease) -> None:
        lease.acquire()
        begun = time.monotonic()
        time.sleep(0.3)
        turns.append((begun, time.monotonic(), lease.number))
        lease.release()

    threads = [threading.Thread(target=take_a_turn, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(turns) == 4
    turns.sort()
    assert turns[0][0] - started >= bound_s  # the stale holder had its bound
    assert turns[0][2] == 2  # exactly one waiter took the stale generation over
    for (_, ended, _), (begun, _, _) in zip(turns, turns[1:]):
        assert begun >= ended, f"two holders at once: {turns}"
    assert _left(leases[0]) == []


def test_a_holder_taken_over_notices_that_it_lost_its_turn(storage_root, caplog):
    url, options = storage_root
    lease = _lease(url, options)
    lease.acquire()
    taker = Generation(lease.number + 1, Holder(host="elsewhere", pid=7, hostname="node-7"), after=lease.holder.token)
    with caplog.at_level(logging.WARNING, logger="storage.lease"):
        assert fsutil.create_new(f"{lease.url}/gen-{taker.number:09d}.json", taker.to_bytes(), options)
        assert lease.lost.wait(5)
    assert any("this run lost its turn" in r.getMessage() and "process 7 on node-7" in r.getMessage()
               for r in caplog.records)
    assert not lease.confirm()  # what a writer asks
    lease.release()
    # A lost holder writes nothing more, not even to tidy: the taker gives back both generations.
    assert [name for name in _left(lease) if name.endswith(".json")] == ["gen-000000001.json", "gen-000000002.json"]


def test_a_process_without_the_lease_asks_the_records_after_the_turn_it_was_handed(storage_root, monkeypatch):
    """A unit on a Dask worker (the turn in its runtime) or a training process (in its
    environment) reads the lease records before writing under the turn's artifact."""
    from storage.lease import TurnLost
    from tasks.config import TurnHeld
    from tasks.machinery.turns import TURN_ENV, check_turn

    url, options = storage_root
    lease = _lease(url, options)
    lease.acquire()
    artifact = f"{url}/autoencoder/k"
    turn = TurnHeld(lease=lease.url, number=lease.number, token=lease.holder.token, artifact=artifact,
                    what="autoencoder/k")
    check_turn(f"{artifact}/checkpoints/step-5.pt", turn, options)  # held: nothing to say
    taker = Generation(lease.number + 1, Holder(host="elsewhere", pid=7, hostname="node-7"), after=lease.holder.token)
    assert fsutil.create_new(f"{lease.url}/gen-{taker.number:09d}.json", taker.to_bytes(), options)
    check_turn(f"{url}/codes/other/chunk", turn, options)  # another artifact: not this turn's
    with pytest.raises(TurnLost, match=r"turn at autoencoder/k \(generation 2 holds it\)"):
        check_turn(f"{artifact}/model.pt", turn, options)
    monkeypatch.setenv(TURN_ENV, turn.model_dump_json())  # what a training process is given
    with pytest.raises(TurnLost):
        check_turn(f"{artifact}/model.pt", storage_options=options)
    lease.release()


# --- other processes: killed, or frozen and then woken ---------------------------------------

HOLD = """
import json, sys, time
from storage.lease import Lease
lease = Lease(sys.argv[1], json.loads(sys.argv[2]), bound_s=float(sys.argv[3]), renew_s=0.2, poll_s=0.05)
lease.acquire()
print("held", flush=True)
while not lease.lost.wait(0.1):
    pass
print("lost", flush=True)
"""


def _holding_process(lease: Lease) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD, lease.url, json.dumps(lease.storage_options),
                                str(lease.bound_s)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert process.stdout.readline().strip() == "held"
    return process


@pytest.fixture(params=["local", "s3"])  # memory:// is not shared between processes
def shared_root(request, tmp_path) -> tuple[str, dict | None]:
    if request.param == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        return f"{bucket.url}/root", bucket.storage_options
    return str(tmp_path / "root"), None


def test_a_holder_killed_with_sigkill_is_taken_over_at_once(shared_root):
    url, options = shared_root
    lease = _lease(url, options, bound_s=600.0)
    holder = _holding_process(lease)
    holder.kill()
    holder.wait()
    started = time.monotonic()
    lease.acquire()
    assert time.monotonic() - started < 5  # at once, where the bound is 600 s
    lease.release()


def test_a_frozen_holder_is_taken_over_after_the_bound_and_notices_when_it_wakes(shared_root):
    url, options = shared_root
    lease = _lease(url, options)
    holder = _holding_process(lease)
    try:
        held = _acquire_in_thread(lease)
        assert not held.wait(BOUND_S * 1.5)  # a live holder: its heartbeat goes on
        os.kill(holder.pid, signal.SIGSTOP)  # alive, but no longer renewing
        frozen = time.monotonic()
        assert held.wait(BOUND_S + 3)
        assert time.monotonic() - frozen >= BOUND_S - RENEW_S - POLL_S  # its last beat seen may precede the stop
        os.kill(holder.pid, signal.SIGCONT)
        said = holder.communicate(timeout=10)[0]
        assert "this run lost its turn" in said and said.rstrip().endswith("lost"), said
    finally:
        holder.kill()
        holder.wait()
    lease.release()


# --- the Prefect side (tasks/machinery/turns.py): is the holder's flow run finished? -------


def test_a_holder_whose_flow_run_finished_is_known_gone_and_an_unreachable_api_never_holds_up(prefect_api):
    from prefect import flow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.machinery.turns import API_TIMEOUT_S, api_identity, flow_run_finished

    @flow
    def finishes() -> None:
        pass

    finished_run = str(finishes(return_state=True).state_details.flow_run_id)
    api = api_identity()
    assert flow_run_finished(api, Holder(flow_run=finished_run, api=api))
    assert not flow_run_finished(api, Holder(flow_run="6d0b7c3e-0000-4000-8000-000000000000", api=api))  # unknown
    assert not flow_run_finished(api, Holder(flow_run=finished_run, api="http://elsewhere/api"))  # another API's run
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):  # nothing answers there
        down = api_identity()
        started = time.monotonic()
        assert not flow_run_finished(down, Holder(flow_run=finished_run, api=down))
        assert time.monotonic() - started < API_TIMEOUT_S + 1  # no retries: the heartbeat decides
