"""A lease kept under a storage root: one run at a time, whatever machine or Prefect server
(or none) each run uses, on any fsspec URL (a local disk, S3, memory://).

The lease of a folder (the pipeline's: `{root}/.vqvae2/runs/<name>/`) is a row of
generations, objects in that folder:

- `gen-<n>.json`, created exclusively (`fsutil.create_new`: a conditional write on S3, a
  hard link on a disk) and never rewritten, names its holder (host, process, flow run,
  Prefect API, a random token) and the token of the generation it took over. Whoever
  created the highest generation holds the lease.
- `gen-<n>.beat`, the holder's heartbeat, rewritten every `renew_s`.

A waiter takes its turn by creating generation n+1 once the holder of n is gone, then
confirms that n+1 is the highest and that n is still the generation it judged (a release
may have emptied the folder meanwhile); if not, it removes n+1 and looks again. Creating
n+1 is exclusive, so of several waiters exactly one wins, and no step needs a conditional
delete. A waiter judges the holder gone

- at once when it is a process of this host that no longer exists (SIGKILL included), or
  when the caller's `finished(holder)` says so (its flow run is shown finished);
- otherwise once its heartbeat has not changed for `bound_s`, timed by the waiter's own
  monotonic clock: no clock of another machine is trusted.

Releasing removes every generation up to the holder's: a finished run leaves the folder
empty, and a waiter takes its turn at once.

What is guaranteed:

- Waiting never hangs. A waiter waits only while the holder's heartbeat keeps changing
  (a run at work); once it stops, the waiter takes over within `bound_s` plus a poll, at
  once if the holder is known gone. A storage error (a missing bucket, refused
  credentials) fails it with the error's line.
- One holder at a time, as long as holders renew: a holder that cannot renew for
  `bound_s` (a frozen machine, a storage outage that long) may be taken over while it
  still runs. Once it wakes it finds so before it beats again, warns that it lost its turn,
  and `confirm()` says so to whatever would write next (a stale confirmation, older than a
  renewal, is checked against the records first): its writers stop, and what the taker
  makes stays as the taker made it. A process that holds no `Lease` object (a training
  process the holder started) asks `still_held(...)` of the records themselves.
- On S3 the exclusion relies on conditional writes (AWS S3 since 2024, recent MinIO);
  on memory:// it holds within one process, which is all memory:// is.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, dataclass, field

from . import fsutil
from .fsutil import HOST, StorageOptions, join, process_alive, redact

BOUND_S = 60.0  # a holder whose heartbeat is unchanged this long is gone
RENEW_S = 15.0  # the holder beats several times within a bound: a failed write or two is survived
POLL_S = 2.0  # how often a waiter looks
_NAME = re.compile(r"gen-(\d{9})\.(json|beat)")


@dataclass(frozen=True)
class Holder:
    """Who holds the lease: what a waiter needs to judge whether it is gone."""

    host: str = HOST  # compared: a process of this host can be asked whether it lives
    pid: int = field(default_factory=os.getpid)
    hostname: str = field(default_factory=socket.gethostname)  # shown
    flow_run: str = ""
    api: str = ""  # where `flow_run` is recorded: the holder's Prefect API
    token: str = field(default_factory=lambda: uuid.uuid4().hex)  # this turn (one process may run several)

    def __str__(self) -> str:
        return f"process {self.pid} on {self.hostname or self.host}, flow run {self.flow_run or 'unknown'}"


@dataclass(frozen=True)
class Generation:
    number: int
    holder: Holder
    after: str = ""  # the token of the generation this one took over; "" when it found none

    def to_bytes(self) -> bytes:
        return (json.dumps({"holder": asdict(self.holder), "after": self.after}, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, number: int, data: bytes) -> Generation:
        try:
            record = json.loads(data)
            return cls(number, Holder(**record["holder"]), record["after"])
        except (ValueError, TypeError, KeyError):  # damaged or foreign: an unknown holder, judged by its heartbeat
            return cls(number, Holder(host="unknown", pid=0, hostname="", token=hashlib.sha256(data).hexdigest()))


def _never(holder: Holder) -> bool:
    return False


class TurnLost(RuntimeError):
    """Another run took over this run's turn: it writes nothing more under the root."""

    permanent = True  # a retry would find the same: the turn is the other run's now
    advice = "nothing: the run that took over makes what this one would have; run again to reuse it once it ends"


def still_held(url: str, number: int, token: str, storage_options: StorageOptions = None) -> str:
    """Why generation `number` of the lease at `url`, taken with `token`, is no longer held
    ("" while it is): its record gone or another's, or a higher generation taken. For a
    process that holds no `Lease` object, only its holder's generation."""
    try:
        record = Generation.from_bytes(number, fsutil.read_bytes(join(url, f"gen-{number:09d}.json"),
                                                                 storage_options))
    except FileNotFoundError:
        return "its lease record is gone"
    if record.holder.token != token:
        return f"{record.holder} holds it"
    names = fsutil.find(url, storage_options)
    higher = [int(m.group(1)) for name in names if (m := _NAME.fullmatch(name)) and m.group(2) == "json"
              and int(m.group(1)) > number]
    return f"generation {max(higher)} holds it" if higher else ""


class _Silence:
    """How long a heartbeat has been unchanged, by this process's monotonic clock."""

    def __init__(self) -> None:
        self.last: object = None
        self.since = 0.0

    def of(self, beat: object) -> float:
        now = time.monotonic()
        if beat != self.last:
            self.last, self.since = beat, now
        return now - self.since


class Lease:
    """The lease of the folder `url`: `with Lease(url, options): ...` runs the block holding it."""

    def __init__(self, url: str, storage_options: StorageOptions = None, *, holder: Holder | None = None,
                 bound_s: float = BOUND_S, renew_s: float = RENEW_S, poll_s: float = POLL_S,
                 finished: Callable[[Holder], bool] = _never,
                 log: logging.Logger | logging.LoggerAdapter | None = None, what: str | None = None) -> None:
        if not 0 < renew_s < bound_s:
            raise ValueError(f"renew_s ({renew_s}) must be above 0 and below bound_s ({bound_s}): a live holder "
                             "must beat within every bound")
        self.url, self.storage_options = str(url).rstrip("/"), storage_options
        self.holder = holder or Holder()
        self.bound_s, self.renew_s, self.poll_s = bound_s, renew_s, poll_s
        self.finished = finished
        self.log = log or logging.getLogger(__name__)
        self.what = what or redact(self.url)  # how messages name what it guards: "autoencoder/1a2b3c4d5e6f7a8b"
        self.held: Generation | None = None  # the generation this lease holds
        self.took_over: Holder | None = None  # the holder this lease's turn was taken from, judged gone
        self.why_lost = ""
        self._confirmed = 0.0  # when the records last showed this lease held (monotonic)
        self._confirming = threading.Lock()
        self.lost = threading.Event()  # set once the holder finds another run holding its turn
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @property
    def number(self) -> int:
        """The generation held; 0 while none."""
        return self.held.number if self.held else 0

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # --- waiting and taking --------------------------------------------------------------

    def acquire(self) -> None:
        """Wait for the turn, then hold the lease (and keep its heartbeat) until `release`."""
        assert not self.number, "the lease is held already"
        silence, announced = _Silence(), ""
        while True:
            current = self._highest()
            gone = self._gone(current, silence) if current else "none"
            if gone and self._take(current):
                if current:
                    self.took_over = current.holder
                    self.log.warning(f"the run making {self.what} ({current.holder}) is gone ({gone}): taking its "
                                     "place; its unfinished work resumes here")
                self._keep_beating()
                return
            if not gone and current.holder.token != announced:
                announced = current.holder.token
                self.log.info(f"another run is making {self.what} ({current.holder}): waiting for it; should its "
                              f"heartbeat stop for {self.bound_s:.0f} s, this run takes its place")
            time.sleep(self.poll_s * random.uniform(0.5, 1.0))  # at random: racing waiters fall out of step

    def _gone(self, current: Generation, silence: _Silence) -> str:
        """Why the holder of `current` is gone, or "" while it may be at work."""
        holder = current.holder
        if holder.host == HOST and not process_alive(holder.pid):
            return f"its process {holder.pid} has ended"
        if self.finished(holder):
            return f"its flow run {holder.flow_run} has finished"
        silent = silence.of((current.number, holder.token, self._beat(current.number)))
        if silent >= self.bound_s:
            return f"its heartbeat has not changed for {silent:.0f} s"
        return ""

    def _take(self, current: Generation | None) -> bool:
        """Create the generation after `current`; True if this lease holds it."""
        number = current.number + 1 if current else 1
        mine = Generation(number, self.holder, after=current.holder.token if current else "")
        fsutil.create_new(self._url(number), mine.to_bytes(), self.storage_options)
        # The record read back decides, not the create's answer: an S3 write retried after a
        # lost answer reports as existing a record that is ours.
        if self._read(number) != mine:
            return False  # another waiter was quicker
        if self._generations()[-1:] != [number] or (current and self._read(current.number) != current):
            self._remove(number)  # a release emptied the folder meanwhile, or a higher one exists: look again
            return False
        self.held = mine
        fsutil.sweep_temporaries(self.url, self.storage_options)  # a killed holder's unfinished heartbeat
        return True

    # --- holding -------------------------------------------------------------------------

    def confirm(self) -> bool:
        """Whether this lease is still held, for a writer about to write: the renewer's verdict,
        or, when the records were last seen showing it held longer ago than a renewal (a process
        just woken from a freeze), the records' own, read now."""
        if self.lost.is_set():
            return False
        if time.monotonic() - self._confirmed <= self.renew_s:
            return True
        with self._confirming:
            if not self.lost.is_set() and time.monotonic() - self._confirmed > self.renew_s:
                lost, _ = self._superseded(higher_seen=True)
                self._judged(lost)
        return not self.lost.is_set()

    def _judged(self, lost: str) -> None:
        """Record what the records showed: held (now), or lost and why (once)."""
        if not lost:
            self._confirmed = time.monotonic()
        elif not self.lost.is_set():
            self.why_lost = lost
            self.log.warning(f"this run lost its turn at {self.what} ({lost}): it writes nothing more there")
            self.lost.set()

    def _keep_beating(self) -> None:
        self._stop.clear()
        self.lost.clear()
        self._confirmed = time.monotonic()
        self._renewer = threading.Thread(target=self._beat_until_released, daemon=True, name=f"lease-{self.number}")
        self._renewer.start()

    def _beat_until_released(self) -> None:
        beats, failing, higher_seen = 0, False, False
        while True:
            beats += 1
            try:
                # Looked at before beating: a holder woken from a freeze writes nothing where
                # another run has taken its place.
                with self._confirming:
                    lost, higher_seen = self._superseded(higher_seen)
                    if not lost:
                        beat = f"{self.holder.token} {beats}\n".encode()
                        fsutil.write_bytes(self._url(self.number, "beat"), beat, self.storage_options)
                    self._judged(lost)
            except Exception as err:  # noqa: BLE001 - a failed renewal must not end the run: say so, try again
                if not failing:
                    self.log.warning(f"could not renew this run's turn at {self.what} ({redact(str(err))}); should "
                                     f"this last {self.bound_s:.0f} s, another run may take it over")
                failing = True
            else:
                failing = False
                if lost:
                    return
            if self._stop.wait(self.renew_s):
                return

    def _superseded(self, higher_seen: bool) -> tuple[str, bool]:
        """Why this holder has lost its turn ("" if it has not), and whether a higher generation exists."""
        if self._read(self.number) != self.held:
            return "its lease record is gone", False
        higher = [n for n in self._generations() if n > self.number]
        if not higher:
            return "", False
        taker = self._read(self.number + 1)
        if taker is not None and taker.after == self.holder.token:
            return f"{taker.holder} took it over", True
        # A higher generation of a waiter that backs off vanishes at once; one seen twice stays.
        return (f"generation {max(higher)} holds it" if higher_seen else ""), True

    def release(self) -> None:
        """End the turn: stop the heartbeat, and remove the generations up to ours."""
        if not self.number:
            return
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self.lost.is_set():  # its records are the taker's business now
            self.held = None
            return
        try:
            self._remove_up_to(self.number)
        except OSError as err:  # the run's work is done: its silent lease expires after the bound
            self.log.warning(f"could not give back this run's turn at {self.what} ({redact(str(err))}); the "
                             f"next run takes it over once this process has ended, or {self.bound_s:.0f} s after "
                             "its last heartbeat")
        self.held = None

    def _remove_up_to(self, number: int) -> None:
        files = self._listing()
        records = {n for name, n in files.items() if name.endswith(".json")}
        # Oldest first, each heartbeat before its record: a waiter that judged an older
        # generation finds it changed when it confirms. A heartbeat without a record is a late
        # beat of a run that had lost its turn.
        for name in sorted(files, key=lambda name: (files[name], name.endswith(".json"))):
            if files[name] <= number or files[name] not in records:
                with suppress(FileNotFoundError):
                    fsutil.remove(join(self.url, name), self.storage_options)

    # --- the objects ---------------------------------------------------------------------

    def _url(self, number: int, kind: str = "json") -> str:
        return join(self.url, f"gen-{number:09d}.{kind}")

    def _listing(self) -> dict[str, int]:
        """{file name: generation} of the folder's records and heartbeats."""
        try:
            names = fsutil.find(self.url, self.storage_options)
        except FileNotFoundError:  # no run yet (a missing bucket fails at the first record written)
            return {}
        return {name: int(m.group(1)) for name in names if (m := _NAME.fullmatch(name))}

    def _generations(self) -> list[int]:
        return sorted(n for name, n in self._listing().items() if name.endswith(".json"))

    def _highest(self) -> Generation | None:
        while numbers := self._generations():
            record = self._read(numbers[-1])
            if record is not None:
                return record
            # Removed between the listing and the read (a release): look again.
        return None

    def _read(self, number: int) -> Generation | None:
        try:
            return Generation.from_bytes(number, fsutil.read_bytes(self._url(number), self.storage_options))
        except FileNotFoundError:
            return None

    def _beat(self, number: int) -> bytes:
        try:
            return fsutil.read_bytes(self._url(number, "beat"), self.storage_options)
        except FileNotFoundError:
            return b""

    def _remove(self, number: int) -> None:
        for kind in ("beat", "json"):
            with suppress(FileNotFoundError):
                fsutil.remove(self._url(number, kind), self.storage_options)
