"""Each training attempt in fresh processes: `train()` starts `python -m tasks.machinery.process`,
or, for data-parallel training, `torchrun` with one such process per rank (on several
machines: `serve_node` on each of the others).

Concurrent trainings then never share torch's global RNG (the pipeline runs several at
once, in threads), a retry after a CUDA failure gets a fresh CUDA context, and a crash
cannot take the flow down. Each process connects back to the task over a local socket
(`multiprocessing.connection`, with a one-time key), receives the pickled
`(make_job, args)`, builds and runs the job, and sends its reports (rank 0), then its
summary (rank 0) or its error (any rank); the task relays the reports to Prefect. Ranks on
other machines get the job from rank 0 through the process group.

A training process never outlives its task: the task sends nothing after the job, so
the socket becomes readable only when the task's process is gone (killed, even with
SIGKILL), and the training process then exits at once instead of writing checkpoints
beside a re-run's.
"""
from __future__ import annotations

import datetime
import os
import pickle
import queue
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

import torch
import torch.distributed as dist

from ..config import Runtime, TrainingRuntime, TurnHeld
from ..manifests import TrainingSummary
from .artifacts import Artifact
from .devices import claimed_gpus, one_multi_node_training
from .failures import is_permanent
from .trainer import Trainer, TrainingJob, UIReporter
from .turns import turn_env

CHANNEL, CHANNEL_KEY = "VQVAE2_TRAINING_CHANNEL", "VQVAE2_TRAINING_CHANNEL_KEY"
WORKER = ["-m", "tasks.machinery.process"]


class TrainingFailed(RuntimeError):
    """A training process failed; the message holds its traceback. `permanent`: whether its
    error would recur on a retry (`tasks.machinery.failures`); None when the process died."""

    def __init__(self, message: str, permanent: bool | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent


class ChannelReporter:
    """In rank 0's process: every report becomes a message to the task's process."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def log(self, message: str) -> None:
        self.conn.send(("log", message))

    def progress(self, done: int, total: int, note: str) -> None:
        self.conn.send(("progress", done, total, note))

    def table(self, key: str, rows: list[dict[str, Any]], description: str) -> None:
        self.conn.send(("table", key, rows, description))


class SilentReporter:
    """The other ranks report nothing: rank 0 speaks for the run."""

    def log(self, message: str) -> None: ...
    def progress(self, done: int, total: int, note: str) -> None: ...
    def table(self, key: str, rows: list[dict[str, Any]], description: str) -> None: ...


def train_model(make_job: Callable[..., TrainingJob], settings: Any, runtime: Runtime, data: Any, artifact: Artifact,
                name: str) -> dict[str, Any]:
    """What the three training stages share: train the model `make_job(settings, runtime, data,
    artifact)` describes, `settings.processes` data-parallel ranks, as `runtime.training` says
    (`train`), and give back the fields its manifest (a `TrainedManifest`) takes from that: the
    artifact's identity and the training's summary. `name` is how logs and progress name it."""
    summary = train(make_job, settings, runtime, data, artifact, title=f"{name}: training", options=runtime.training,
                    processes=settings.processes, turn=runtime.turn)
    return {**artifact.identity(), **summary.model_dump()}


def train(make_job: Callable[..., TrainingJob], *args: Any, title: str, options: TrainingRuntime,
          processes: int = 1, turn: TurnHeld | None = None) -> TrainingSummary:
    """Build the job with `make_job(*args)` and run it in fresh processes (`processes`
    data-parallel ranks through torchrun), unless `options.subprocess` is off, relaying the
    reports to the UI; returns the run's summary. `make_job` must be a module-level function.

    The processes are new interpreters, not forks: a fork of a process with Prefect's
    threads and open s3fs sessions is unsafe, and unlike a multiprocessing spawn it does
    not re-run the caller's main script. `options.threads()` caps each one's intra-op
    threads: trainings running side by side must not oversubscribe the cores. Where
    trainings share GPUs, the processes see only the GPU the training claimed. They check the
    run's `turn` (`tasks.machinery.turns`) before they write."""
    reporter = UIReporter(title)
    if not options.subprocess:
        if processes > 1:
            raise ValueError("training.processes > 1 needs training.subprocess: torchrun starts the processes")
        return Trainer(make_job(*args), reporter).run()
    if processes % options.nnodes:
        raise ValueError(f"{processes} training processes cannot be shared equally by {options.nnodes} nodes")
    local = processes // options.nnodes
    with one_multi_node_training(options), claimed_gpus(options, local) as gpus:
        env = {**os.environ, "OMP_NUM_THREADS": str(options.threads()), **turn_env(turn)}
        if gpus:
            # the claimed ones among the devices this worker was given, if it was given a subset
            given = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(given[i] if i < len(given) else str(i) for i in gpus)
            reporter.log(f"{title} on GPU {', '.join(map(str, gpus))} "
                         f"(CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']})")
        if options.nnodes > 1:
            command = torchrun(options.rdzv_endpoint, options.nnodes, 0, local)
        elif processes > 1:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={local}",
                       *WORKER]
        else:
            command = [sys.executable, *WORKER]
        return _run(command, local, pickle.dumps((make_job, args)), title, env, reporter)


def torchrun(endpoint: str, nnodes: int, node_rank: int, local: int) -> list[str]:
    """The command that starts node `node_rank`'s `local` training processes of a run on
    `nnodes` machines, meeting at `endpoint` (host:port of node 0). A static rendezvous:
    node 0, the worker that runs the task, holds ranks 0 to local - 1, so rank 0, which
    reports and checkpoints, is always on it."""
    host, _, port = endpoint.rpartition(":")
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node-rank={node_rank}",
            f"--master-addr={host}", f"--master-port={port}", f"--nproc-per-node={local}", *WORKER]


def serve_node(endpoint: str, nnodes: int, node_rank: int, local: int, once: bool = False) -> int:
    """On a machine other than node 0: join each multi-node training as node `node_rank`,
    one after another (the trainings of a multi-node run take turns), until interrupted;
    with `once`, join one and return its exit code. The job comes from rank 0."""
    if not 0 < node_rank < nnodes:
        raise ValueError(f"node rank must be between 1 and {nnodes - 1} (node 0 is the Prefect worker), got {node_rank}")
    while True:
        print(f"node {node_rank} of {nnodes}: waiting for a training at {endpoint}", flush=True)
        code = subprocess.call(torchrun(endpoint, nnodes, node_rank, local), stdin=subprocess.DEVNULL)
        if once:
            return code
        print(f"node {node_rank} of {nnodes}: training ended (exit code {code})", flush=True)


def _run(command: list[str], ranks: int, job: bytes, title: str, env: dict[str, str],
         reporter: UIReporter) -> TrainingSummary:
    key = os.urandom(16)
    messages: queue.Queue = queue.Queue()
    with Listener(("127.0.0.1", 0), authkey=key) as listener:
        host, port = listener.address
        env = {**env, CHANNEL: f"{host}:{port}", CHANNEL_KEY: key.hex()}
        child = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)
        readers: list[threading.Thread] = []
        threading.Thread(target=_serve, args=(listener, ranks, job, messages, readers), daemon=True).start()
        try:
            while True:
                try:
                    kind, *payload = messages.get(timeout=0.5)
                except queue.Empty:
                    if child.poll() is None:
                        continue
                    for reader in list(readers):  # what the processes sent before they ended
                        reader.join(timeout=5)
                    if messages.empty():
                        raise TrainingFailed(f"{title}: the training process died (exit code {child.returncode})")
                    continue
                if kind == "done":
                    return payload[0]
                if kind == "error":
                    rank, name, trace, permanent = payload
                    raise TrainingFailed(f"{title}: {name} in the training process of rank {rank}:\n{trace}",
                                         permanent)
                getattr(reporter, kind)(*payload)
        finally:
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()


def _serve(listener: Listener, ranks: int, job: bytes, messages: queue.Queue, readers: list) -> None:
    """Hand each connecting rank the job, then relay what it sends."""
    for _ in range(ranks):
        try:
            conn = listener.accept()
        except OSError:  # the listener closed: the run is over
            return
        conn.send_bytes(job)
        reader = threading.Thread(target=_relay, args=(conn, messages), daemon=True)
        readers.append(reader)
        reader.start()


def _relay(conn: Connection, messages: queue.Queue) -> None:
    with conn:
        while True:
            try:
                messages.put(conn.recv())
            except (EOFError, OSError):
                return


@contextmanager
def process_group() -> Iterator[int]:
    """Under torchrun: join the ranks (gloo for CPU tensors, NCCL for CUDA ones); yields the rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        yield 0
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield dist.get_rank()
        # Leave together: a rank tearing its group down while rank 0 still writes the
        # results can abort in gloo's threads.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _last_to_leave_is_node_0()


def _last_to_leave_is_node_0() -> None:
    """On several machines, node 0's torchrun holds the store every rank's group talks
    through, and exits with node 0's ranks: a rank elsewhere still tearing its group down
    then loses the store and aborts. So the other machines' ranks say when they are done,
    and rank 0 leaves only then (or after a minute: the training itself is over)."""
    world, local, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ["RANK"])
    if not _on_several_machines() or 0 < rank < local:
        return
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(seconds=60))
    try:
        if rank == 0:
            store.wait([f"vqvae2/left/{r}" for r in range(local, world)])
        else:
            store.set(f"vqvae2/left/{rank}", "1")
    except (RuntimeError, dist.DistStoreError):  # a rank that is gone already: nothing to wait for
        pass
    finally:
        del store


def _on_several_machines() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def _job_on_every_node(job: tuple | None) -> tuple:
    """The ranks on other machines than node 0 have no channel: rank 0 sends them the job."""
    if not _on_several_machines():
        return job
    holder = [job]
    dist.broadcast_object_list(holder, src=0, device=torch.device("cpu"))
    return holder[0]


def main() -> None:
    rank = int(os.environ.get("RANK", "0"))
    if CHANNEL not in os.environ:  # a rank on another machine (`vqvae2 node`): its errors go to its console
        with process_group():
            make_job, args = _job_on_every_node(None)
            Trainer(make_job(*args), SilentReporter()).run()
        return
    host, port = os.environ[CHANNEL].rsplit(":", 1)
    with Client((host, int(port)), authkey=bytes.fromhex(os.environ[CHANNEL_KEY])) as conn:
        try:
            job = pickle.loads(conn.recv_bytes())  # our own task process: trusted
            threading.Thread(target=_exit_when_orphaned, args=(conn,), daemon=True).start()
            with process_group() as rank:
                make_job, args = _job_on_every_node(job)
                reporter = ChannelReporter(conn) if rank == 0 else SilentReporter()
                summary = Trainer(make_job(*args), reporter).run()
            if rank == 0:
                conn.send(("done", summary))
        except BaseException as err:  # noqa: BLE001 - every failure must reach the task, which raises it
            conn.send(("error", rank, type(err).__name__, "".join(traceback.format_exception(err)), is_permanent(err)))
            raise SystemExit(1) from None


def _exit_when_orphaned(conn: Connection) -> None:
    try:
        while not conn.poll(ORPHAN_CHECK_S):  # the task's process never writes again: only its end is read
            pass
    except OSError:  # this process closed the channel itself, on its way out: not orphaned
        return
    os._exit(ORPHANED)


ORPHAN_CHECK_S = 0.5
ORPHANED = 75  # the task's process is gone: nobody reads this process's result


if __name__ == "__main__":
    main()
