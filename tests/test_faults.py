"""The fault suite (`pytest -m faults`): a smoke pipeline killed with SIGKILL in every stage,
then run again, ends exactly where an undisturbed run ends.

The run is a `vqvae2 run` process of its own, as a user starts it. Each time a stage is
seen at work (its first shard, checkpoint or unit marker appears under the root) the
whole process group is frozen, the stage is checked to be unfinished, and the flow's
process alone is SIGKILLed: its training processes must notice and exit by themselves.
The next run resumes. At the end every file under the root is compared with an
undisturbed run's: the same paths (nothing stray, no temporary left), the same bytes,
except the fields that record how the run went rather than what it made
(`pipeline_helpers.VOLATILE`).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from flows.parameters import sections_of
from disks import small_disk
from pipeline_helpers import differences

pytestmark = [pytest.mark.faults, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
# Checkpoints every 5 steps: the kill lands mid-training. It is a runtime setting: the keys
# are the same as without it, and the reference run uses it too.
SETTINGS = ["--preset", "smoke", "--set", "training.checkpoint_every=5"]


@dataclass(frozen=True)
class Kill:
    stage: str
    at_work: str  # a glob under the root: the stage has started writing
    finished: str  # a glob: the stage is complete


KILLS = [
    Kill("ingest", "datasets/*/*/shard-*.tar", "datasets/*/manifest.json"),
    Kill("trainings: autoencoder, classifiers", "autoencoder/*/checkpoints/step-*.pt", "autoencoder/*/manifest.json"),
    Kill("encode", "codes/*/units/*.json", "codes/*/manifest.json"),
    Kill("trainings: top and bottom priors", "priors/*/checkpoints/step-*.pt", "priors/*/manifest.json"),
    Kill("sampling", "samples/*/units/*.json", "samples/*/manifest.json"),
]
MILESTONES = [kill.finished for kill in KILLS] + ["reports/*/manifest.json"]

def _api_url() -> str:
    from prefect.settings import get_current_settings

    return str(get_current_settings().api.url)


def _start(root: Path, log: Path, *settings: str) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_API_URL": _api_url(), "PYTHONPATH": str(REPO)}
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", *SETTINGS, *settings, "--root", str(root)],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _session(sid: int) -> list[int]:
    """Live processes of session `sid` (zombies excluded: nothing runs in them)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            state, _ppid, _pgrp, session = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[:4]
            if int(session) == sid and state != "Z":
                found.append(int(entry))
    return found


class Milestones:
    """When each stage's manifest first appeared under a root, in seconds of the runs' own time."""

    def __init__(self, root: Path) -> None:
        self.root, self.seen, self.paused, self.started = root, {}, 0.0, time.monotonic()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def now(self) -> float:
        return time.monotonic() - self.started - self.paused

    def _watch(self) -> None:
        while not self.stop.wait(0.05):
            for glob in MILESTONES:
                if glob not in self.seen and any(self.root.glob(glob)):
                    self.seen[glob] = self.now()


def _kill_during(run: subprocess.Popen, root: Path, kill: Kill, clock: Milestones, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while not any(root.glob(kill.at_work)):
        assert run.poll() is None, f"the run ended (exit code {run.returncode}) before {kill.stage} was seen at work"
        assert time.monotonic() < deadline, f"{kill.stage} never started"
        time.sleep(0.01)
    os.killpg(run.pid, signal.SIGSTOP)  # freeze everything: the stage is caught mid-way
    killed_at = clock.now()
    unfinished = not any(root.glob(kill.finished))
    os.kill(run.pid, signal.SIGKILL)  # the flow's process only, as the OOM killer or a lost node would
    run.wait()
    paused = time.monotonic()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(run.pid, signal.SIGCONT)  # its children, now orphans, must see it and exit
    leftover, waited = _session(run.pid), time.monotonic() + 20
    while leftover and time.monotonic() < waited:
        time.sleep(0.1)
        leftover = _session(run.pid)
    clock.paused += time.monotonic() - paused
    # Unfinished writes of the killed processes: the next run must remove them.
    left = sum(p.stat().st_size for p in root.rglob("*") if ".tmp-" in p.name and p.is_file())
    return {"stage": kill.stage, "killed_at_s": round(killed_at, 1), "unfinished": unfinished, "orphans": leftover,
            "left_by_kill": left}


def test_a_run_killed_in_every_stage_ends_as_an_undisturbed_run(prefect_api, tmp_path):
    """Besides the kills mid-stage, the whole process group is SIGKILLed right after the
    ingest finished (nothing released its turn). Every re-run starts at once and takes the
    dead run's turns without waiting (`tasks.machinery.turns`)."""
    from tasks.config.storage import StorageSection

    bound_s = StorageSection().turn_bound_s  # the default: nothing here waits for it

    reference_root, root = tmp_path / "reference" / "root", tmp_path / "faults" / "root"
    reference_clock, clock = Milestones(reference_root), Milestones(root)
    reference = _start(reference_root, tmp_path / "reference.log")  # side by side: the same load on both
    rows, logs, took_turn = [], [], []

    def next_run() -> subprocess.Popen:
        logs.append(tmp_path / f"faults-{len(logs)}.log")
        run = _start(root, logs[-1])
        if len(logs) > 1:  # the run before was killed
            took_turn.append(_seconds_until_logged(logs[-1], "taking its place", run))
        return run

    for kill in KILLS:
        rows.append(_kill_during(next_run(), root, kill, clock))
        if kill is KILLS[0]:
            run = next_run()
            _seconds_until_logged(logs[-1], r"Task run 'finalize-dataset' - Finished in state", run)
            _kill_group(run)
    last = next_run()
    assert last.wait(timeout=900) == 0, logs[-1].read_text()[-5000:]
    assert reference.wait(timeout=900) == 0, (tmp_path / "reference.log").read_text()[-5000:]
    reference_clock.stop.set()
    clock.stop.set()
    time.sleep(0.1)

    for row in rows:  # each kill caught its stage at work, and left no process behind
        assert row["unfinished"], f"{row['stage']} had finished before the kill: the kill tested nothing"
        assert row["orphans"] == [], f"processes outlived the run killed during {row['stage']}: {row['orphans']}"
    texts = [path.read_text() for path in logs]
    assert not [text for text in texts if "another run is making" in text]  # none waited
    assert len(took_turn) == len(KILLS) + 1 and max(took_turn) < bound_s, took_turn
    log_lines = "\n".join(texts).splitlines()
    assert any("resuming from step" in line for line in log_lines)  # the trainings resumed, not restarted

    found = differences(root, reference_root)
    assert found == {"only here": [], "missing": [], "differ": []}, "not as an undisturbed run leaves it"

    # What each kill cost: the delay it added to when its stage finished, over the reference.
    # (What the killed writes left is gone by the end: the root equals the reference.)
    delays = [clock.seen[m] - reference_clock.seen[m] for m in MILESTONES[:-1]]
    table = ["| fault | stage | outcome | time lost (s) | bytes of unfinished writes after the kill |",
             "|---|---|---|---|---|"]
    for i, row in enumerate(rows):
        lost = delays[i] - (delays[i - 1] if i else 0.0)
        table.append(f"| SIGKILL of the flow process at {row['killed_at_s']} s | {row['stage']} | resumed | "
                     f"{lost:.1f} | {row['left_by_kill']} |")
    print("\n" + "\n".join(table))
    print(f"each re-run took the killed run's turn {max(took_turn):.1f} s after starting at most")


# --- a full or read-only disk, an S3 endpoint that goes away ---------------------------------


def _ingest(root: str, **sections):
    from flows.pipeline import STAGE_FLOWS
    from pipeline_helpers import smoke_config

    return STAGE_FLOWS["ingest"](**sections_of(smoke_config(root, **sections)), return_state=True)


def _temporaries(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if ".tmp-" in p.name]


def test_a_full_disk_fails_the_ingest_at_once_and_leaves_nothing_half_written(prefect_api, tmp_path):
    from pipeline_helpers import task_runs
    from storage.shards import iter_samples

    with small_disk(tmp_path / "disk", "2m") as disk:  # the smoke dataset's shards take about 6 MB
        root = disk / "root"
        started = time.monotonic()
        state = _ingest(str(root))
        failed_after = time.monotonic() - started
        assert state.is_failed()
        assert f"{root}/datasets/" in state.message and "no space left on the storage" in state.message
        assert "free space there or choose another storage root" in state.message
        failed = [run for name, run in task_runs(state.state_details.flow_run_id).items()
                  if run.state.is_failed()]
        assert failed and all(run.run_count == 1 for run in failed)  # no retry waits on a full disk
        assert _temporaries(root) == []
        assert not list(root.glob("datasets/*/manifest.json"))
        for shard in root.glob("datasets/*/*/*.tar"):  # what is there is whole
            assert sum(1 for _ in iter_samples(str(shard))) > 0, shard

        # Room is made: the next run reuses the whole shards and finishes.
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        state = _ingest(str(root))
        assert state.is_completed(), state.message
        print(f"\nfull disk: the ingest failed after {failed_after:.1f} s; nothing half-written")


def test_a_read_only_root_is_a_clear_error(prefect_api, tmp_path):
    with small_disk(tmp_path / "disk", "1m", "ro") as disk:
        state = _ingest(str(disk / "root"))
        assert state.is_failed()
        assert "the storage is read-only" in state.message and "choose a writable storage root" in state.message
        assert "AWS" not in state.message
        assert list(disk.iterdir()) == []


OUTAGE_S = 8  # longer than s3fs's own retries: the task's retry (after 5 s) must cure it


def moto_backend_keys(bucket: str):
    """The keys of `bucket` as moto holds them: readable while its server is stopped."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    return lambda: sorted(s3_backends[DEFAULT_ACCOUNT_ID]["global"].buckets[bucket].keys.keys())


def test_an_s3_endpoint_that_goes_away_mid_ingest_is_survived(prefect_api, tmp_path, monkeypatch):
    """The S3 server is stopped while shards are being written and restarted a few seconds
    later: the failed writes are retried, and no partial object is ever visible."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    from pipeline_helpers import task_runs

    from local_servers import free_port

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "fault-key", "AWS_SECRET_ACCESS_KEY": "fault-secret", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": endpoint}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="faults")

    def keys() -> list[str]:
        return sorted(o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="faults")
                      for o in page.get("Contents", []))

    # The server stops as the first shard is being uploaded: the other shards' writes fail.
    first_shard, serve = threading.Event(), server._server.app

    def watched(environ, start_response):
        if environ["REQUEST_METHOD"] == "PUT" and environ["PATH_INFO"].endswith(".tar"):
            first_shard.set()
        return serve(environ, start_response)

    server._server.app = watched
    outage: dict[str, object] = {}
    restarted = None
    store = moto_backend_keys("faults")

    def keys_while_down() -> list[str]:
        return store()

    puts_after: list[str] = []

    def counted(environ, start_response):
        if environ["REQUEST_METHOD"] == "PUT" and environ["PATH_INFO"].endswith(".tar"):
            puts_after.append(environ["PATH_INFO"])
        return restarted(environ, start_response)

    def cut_the_line() -> None:
        nonlocal restarted
        if first_shard.wait(300):
            server.stop()
            outage["manifest_before"] = any(k.endswith("/manifest.json") for k in keys_while_down())
            time.sleep(OUTAGE_S)
            server.start()
            restarted = server._server.app
            server._server.app = counted

    # 40 shards: the outage falls mid-ingest. The endpoint is an option, not only the
    # environment's: s3fs caches its filesystems by their options, and later tests must not
    # get one that points at this server.
    sections = {"ingest": {"shard_size": 100}, "storage": {"storage_options": {"endpoint_url": endpoint}}}
    cutter = threading.Thread(target=cut_the_line, daemon=True)
    cutter.start()
    state = _ingest("s3://faults/root", **sections)
    cutter.join()
    try:
        assert state.is_completed(), state.message
        assert outage, "the server was never stopped"
        # The outage fell mid-ingest: the dataset was unfinished when the server stopped, and
        # shards were uploaded after it came back (retried by s3fs, botocore or the task).
        assert not outage["manifest_before"] and puts_after, "the outage did not interrupt the ingest"
        runs = task_runs(state.state_details.flow_run_id)
        assert all(run.state.is_completed() for run in runs.values()), {n: r.state_name for n, r in runs.items()}
        # A retry, where the outage outlasted s3fs's and botocore's own, is a shard's: never a stage's.
        retried = sorted(name for name, run in runs.items() if run.run_count > 1)
        assert all(name.startswith("ingest-") for name in retried), retried
        # Equal to an undisturbed ingest of the same config on a local disk, shard by shard.
        reference = tmp_path / "reference"
        assert _ingest(str(reference), ingest=sections["ingest"]).is_completed()
        local = {str(p.relative_to(reference)): hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in reference.rglob("*") if p.is_file()}
        remote = {k.removeprefix("root/"): hashlib.sha256(s3.get_object(Bucket="faults", Key=k)["Body"].read())
                  .hexdigest() for k in keys()}
        assert sorted(set(remote) - set(local)) == []  # no partial, temporary or stray object
        # Prefect's cache record of a unit whose result it could not write during the
        # outage is missing (Prefect logs it and goes on); the next run writes it.
        lost_records = sorted(set(local) - set(remote))
        assert all("/.prefect/" in key for key in lost_records), lost_records
        shards = [k for k in local if k.endswith(".tar")]
        assert len(shards) == 40 and all(remote[k] == local[k] for k in shards)
        print(f"\nS3 outage of {OUTAGE_S} s during the first shard's upload: retried {retried}; "
              f"cache records to write again: {len(lost_records)}")
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()


# --- the run lock: killed holders, a Prefect server that restarts, runs with their own Prefect homes ---


def _start_in(root: Path, log: Path, home: Path, api: str | None = None) -> subprocess.Popen:
    """`vqvae2 run` with its own PREFECT_HOME: on the Prefect server at `api`, or without one
    (Prefect's ephemeral mode, its database in `home`)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_LOCAL_STORAGE_PATH=str(home / "storage"), PYTHONPATH=str(REPO),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", **({"PREFECT_API_URL": api} if api else {}))
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", *SETTINGS, "--root", str(root)], cwd=REPO,
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_new(root: Path, glob: str, run: subprocess.Popen, timeout: float = 600) -> None:
    """Until a file matching `glob` appears that was not there when this was called."""
    before, deadline = set(root.glob(glob)), time.monotonic() + timeout
    while not set(root.glob(glob)) - before:
        assert run.poll() is None, f"the run ended (exit code {run.returncode}) before {glob} appeared"
        assert time.monotonic() < deadline, f"{glob} never appeared"
        time.sleep(0.05)


def _seconds_until_logged(log: Path, pattern: str, run: subprocess.Popen, timeout: float = 600) -> float:
    started = time.monotonic()
    while not re.search(pattern, log.read_text()):
        assert run.poll() is None, f"the run ended (exit code {run.returncode}) before logging {pattern!r}"
        assert time.monotonic() - started < timeout, f"never logged {pattern!r}: {log.read_text()[-3000:]}"
        time.sleep(0.05)
    return time.monotonic() - started


def _kill_group(run: subprocess.Popen) -> None:
    os.killpg(run.pid, signal.SIGKILL)  # the flow's process and its trainings: nothing releases the turn
    run.wait()


def _task_states(log: str) -> dict[str, str]:
    return dict(re.findall(r"Task run '([\w-]+)' - Finished in state (\w+)", log))


@pytest.fixture(scope="module")
def taken_in_turns(tmp_path_factory) -> tuple[Path, list[str]]:
    """Two smoke runs of one config into one root started together, each with its own
    PREFECT_HOME and ephemeral Prefect server: (the root, their logs). Nothing disturbs them:
    the root is also the reference that killed runs must end equal to."""
    base = tmp_path_factory.mktemp("taken-in-turns")
    root = base / "root"
    runs = [_start_in(root, base / f"run-{i}.log", base / f"prefect-home-{i}") for i in range(2)]
    codes = [run.wait(timeout=900) for run in runs]
    logs = [(base / f"run-{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    return root, logs


def test_two_runs_with_their_own_prefect_homes_take_turns_on_one_root(taken_in_turns):
    root, logs = taken_in_turns
    waited = [log for log in logs if "another run is making" in log]
    assert len(waited) == 1, "both runs went ahead at once" if not waited else "both runs waited"
    second, first = waited[0], logs[1 - logs.index(waited[0])]
    assert "Completed" in _task_states(first).values()  # the first computed
    # The second reused all of it: every task Cached, but the ingest plan, which each Prefect
    # home keeps in its own result storage (never under the root), so it is made again.
    states = _task_states(second)
    assert states and {s for name, s in states.items() if not name.startswith("plan-dataset")} == {"Cached"}, states
    for stage in ("datasets", "autoencoder", "codes", "priors", "classifiers", "samples", "reports"):
        dirs = [d for d in (root / stage).iterdir() if d.is_dir()]
        assert len(dirs) == {"priors": 2, "classifiers": 2}.get(stage, 1), stage  # one set of artifacts
    assert [p for p in root.glob(".vqvae2/**/*") if p.is_file()] == []  # the turns were given back


def test_a_run_that_lost_its_turn_writes_nothing_more_and_says_so(prefect_api, tmp_path):
    """Frozen mid-training for longer than the bound, a run is taken over by another of its
    config, which finishes; woken, the frozen run (its flow and its training processes)
    writes nothing more under the root, and ends Failed with one line saying who took over."""
    from pipeline_helpers import snapshot

    root = tmp_path / "root"
    bound = ("--set", "storage.turn_bound_s=12")  # the taker waits this long, not a minute
    frozen = _start(root, tmp_path / "frozen.log", *bound)
    try:
        _wait_for_new(root, "autoencoder/*/checkpoints/step-*.pt", frozen)
        os.killpg(frozen.pid, signal.SIGSTOP)  # its heartbeats stop, its trainings stand still
        taker = _start(root, tmp_path / "taker.log", *bound)
        assert taker.wait(timeout=900) == 0, (tmp_path / "taker.log").read_text()[-5000:]
        assert "taking its place" in (tmp_path / "taker.log").read_text()
        before = snapshot(root)
        os.killpg(frozen.pid, signal.SIGCONT)
        assert frozen.wait(timeout=300) == 1, (tmp_path / "frozen.log").read_text()[-5000:]
        said = [line for line in (tmp_path / "frozen.log").read_text().splitlines() if line.startswith("vqvae2: ")]
        assert len(said) == 1 and said[0].startswith("vqvae2: TurnLost: another run took over this run's turn at "), said
        assert "what to do: nothing: the run that took over makes what this one would have" in said[0]
        assert snapshot(root) == before  # not a byte, not a time
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(frozen.pid, signal.SIGCONT)
            os.killpg(frozen.pid, signal.SIGKILL)


def _serve_prefect(home: Path, port: int) -> subprocess.Popen:
    from local_servers import serve_prefect

    return serve_prefect(home, port)[0]


def _stop(server: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)
    server.wait()


def test_a_run_outlives_a_restart_of_its_prefect_server_and_the_next_run_takes_its_turn(tmp_path, taken_in_turns):
    from local_servers import free_port

    port = free_port()
    home, root = tmp_path / "prefect-home", tmp_path / "root"
    home.mkdir()
    api = f"http://127.0.0.1:{port}/api"
    server = _serve_prefect(home, port)
    try:
        run = _start_in(root, tmp_path / "run.log", home, api)
        _wait_for_new(root, "autoencoder/*/checkpoints/step-*.pt", run)
        _stop(server)  # mid-training
        assert run.poll() is None
        time.sleep(15)
        server = _serve_prefect(home, port)  # the same port and database
        assert run.wait(timeout=900) == 0, (tmp_path / "run.log").read_text()[-5000:]
        rerun = _start_in(root, tmp_path / "rerun.log", home, api)
        assert rerun.wait(timeout=600) == 0, (tmp_path / "rerun.log").read_text()[-5000:]
        assert "another run is making" not in (tmp_path / "rerun.log").read_text()
        assert differences(root, taken_in_turns[0]) == {"only here": [], "missing": [], "differ": []}
    finally:
        _stop(server)
