"""What a mapped unit costs in orchestration alone: a flow of `--units` units that do nothing,
on Prefect's thread pool and on a Dask cluster of 2 worker processes (1 thread each),
against Prefect's ephemeral API and a real `prefect server`.

    python3 benchmarks/bench_mapping.py [--units 1000] [--kinds bare,cached] [--smoke]

Prints, per API, task runner and kind of unit (`bare`: a Prefect task; `cached`: one as
the pipeline's mapped units, with its marker and cache record under a local root;
`benchmarks/mapping_units.py`):
- seconds per unit: (time of `--units` units - time of 20) / (`--units` - 20), both after
  one warm-up flow, so the flow's own start is not counted; and as CPU time, the flow's
  process and the Prefect server's (every temporary one, in ephemeral mode): the parts a
  cluster cannot spread over more workers;
- the Prefect server's peak memory (RSS of its processes) over those flows, and for the
  real server the growth of its database;
- what that overhead comes to for ImageNet-1k at 256 px (1,332 ingest shards of 1,000
  images, as many encode units, and the imagenet-256 preset's sample batches).
`--smoke` also runs `vqvae2 run --preset smoke` on the thread pool and on 2 Dask process
workers against one server, and prints both wall times (docs/storage.md).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
BASELINE_UNITS = 20
IMAGENET_SHARDS = 1282  # 1,281,167 training images in shards of 1,000
IMAGENET_TEST_SHARDS = 50  # the 50,000 validation images, the held-out split


# --- in the measuring child -------------------------------------------------------------------


def measure(units: int, kinds: list[str], runners: list[str]) -> None:
    """Print one JSON line per (runner, kind): seconds of a warm flow of `units` and of 20 units."""
    from mapping_units import mapped
    from prefect.task_runners import ThreadPoolTaskRunner

    from tasks.machinery.dask import ByReferenceDaskTaskRunner

    for runner_name in runners:
        cluster = None
        if runner_name == "dask":
            from distributed import LocalCluster

            cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
            runner = ByReferenceDaskTaskRunner(address=cluster.scheduler_address)
        else:
            runner = ThreadPoolTaskRunner(max_workers=4)  # the pipeline's
        flow = mapped.with_options(task_runner=runner, log_prints=False)
        for kind in kinds:
            seconds, flow_cpu, server_cpu = {}, {}, {}
            for count in (BASELINE_UNITS, BASELINE_UNITS, units):  # the first: warm-up
                root = tempfile.mkdtemp(prefix="bench-mapping-root-")
                started, cpu, served = time.perf_counter(), time.process_time(), _server_cpu_seconds()
                assert flow(units=count, root=root, kind=kind) == count
                seconds[count] = time.perf_counter() - started
                flow_cpu[count], server_cpu[count] = time.process_time() - cpu, _server_cpu_seconds() - served
                shutil.rmtree(root, ignore_errors=True)
            print(json.dumps({"runner": runner_name, "kind": kind, "units": units, "seconds": seconds[units],
                              "baseline_seconds": seconds[BASELINE_UNITS], "flow_cpu": flow_cpu[units],
                              "baseline_flow_cpu": flow_cpu[BASELINE_UNITS], "server_cpu": server_cpu[units],
                              "baseline_server_cpu": server_cpu[BASELINE_UNITS]}), flush=True)
        if cluster is not None:
            cluster.close()


def _server_cpu_seconds() -> float:
    """CPU seconds the Prefect server processes have used: the real server's (its pid in
    BENCH_SERVER_PID), else the temporary servers under this process (ephemeral mode)."""
    root = int(os.environ.get("BENCH_SERVER_PID", os.getpid()))
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in [root, *_descendants(root)]:
        if _is_server(pid):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
            except (OSError, ValueError, IndexError):
                continue
    return total


# --- in the parent: servers, memory, the table -------------------------------------------------


def _descendants(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return children + [d for child in children for d in _descendants(child)]


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _is_server(pid: int) -> bool:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return "uvicorn" in command or "prefect server start" in command or "prefect.server" in command


class PeakMemory:
    """The peak summed RSS of the server processes under `pid` (itself included, if it is one)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stop.wait(0.5):
            pids = [p for p in [self.pid, *_descendants(self.pid)] if _is_server(p)]
            self.peak = max(self.peak, sum(_rss_mib(p) for p in pids))

    def done(self) -> float:
        self.stop.set()
        self.thread.join()
        return self.peak


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _serve(home: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    log = (home / "server.log").open("wb")
    server = subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while True:
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return server, api
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)


def _environment(home: Path) -> dict[str, str]:
    return {**os.environ, "PREFECT_HOME": str(home), "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING",
            # Ephemeral mode: each Dask worker starts a temporary server too, on a busy machine
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
            "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)])}


def run_api(api_kind: str, args: argparse.Namespace) -> list[dict]:
    home = Path(tempfile.mkdtemp(prefix=f"bench-mapping-{api_kind}-"))
    env = _environment(home)
    env.pop("PREFECT_API_URL", None)
    server = None
    if api_kind == "server":
        server, env["PREFECT_API_URL"] = _serve(home, env)
        env["BENCH_SERVER_PID"] = str(server.pid)
    child = subprocess.Popen([sys.executable, __file__, "--child", "--units", str(args.units), "--kinds", args.kinds,
                              "--runners", args.runners], env=env, stdout=subprocess.PIPE, text=True, cwd=REPO)
    memory = PeakMemory(server.pid if server else child.pid)
    rows = [json.loads(line) for line in child.stdout if line.startswith("{")]
    if child.wait() != 0:
        raise RuntimeError(f"the {api_kind} measurement failed (exit {child.returncode})")
    peak = memory.done()
    database = home / "prefect.db"
    for row in rows:
        row.update(api=api_kind, server_peak_mib=peak,
                   database_mib=database.stat().st_size / 2**20 if server and database.exists() else None)
    if server:
        server.terminate()
        server.wait(timeout=60)
    shutil.rmtree(home, ignore_errors=True)
    return rows


def imagenet_units() -> dict[str, int]:
    """The mapped units of one imagenet-256 run: ingest and encode shards (train and test),
    sample batches (the candidates rejection at the lowest acceptance rate needs)."""
    from tasks.config import pipeline_config
    from tasks.stages.sample import SampleSettings

    config = pipeline_config("imagenet-256").with_classes(1000)
    settings = SampleSettings.of(config)
    candidates = settings.plan(_named_classes(1000)).candidates
    shards = IMAGENET_SHARDS + IMAGENET_TEST_SHARDS
    return {"ingest": shards, "encode": shards, "sample": -(-candidates // settings.batch_size)}


def _named_classes(count: int):
    from tasks.stages.ingest import DatasetManifest

    return DatasetManifest.model_construct(class_names=[str(i) for i in range(count)])


def smoke_side_by_side() -> None:
    """`vqvae2 run --preset smoke` on the thread pool, then on 2 Dask process workers, on one server."""
    home = Path(tempfile.mkdtemp(prefix="bench-mapping-smoke-"))
    env = _environment(home)
    server, env["PREFECT_API_URL"] = _serve(home, env)
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = (home / "dask.log").open("wb")
    scheduler = subprocess.Popen(["dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                                 env=env, cwd=REPO, stdout=logs, stderr=subprocess.STDOUT)
    time.sleep(3)
    workers = subprocess.Popen(["dask", "worker", address, "--nworkers", "2", "--nthreads", "1", "--no-dashboard"],
                               env=env, cwd=REPO, stdout=logs, stderr=subprocess.STDOUT)
    time.sleep(8)
    try:
        for runner, extra in (("thread pool", []), ("2 Dask process workers", ["--set", f"runner.dask_address={address}"])):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "flows.cli", "run", "--preset", "smoke", "--root",
                            str(home / runner.replace(" ", "-")), *extra], env=env, cwd=REPO, check=True,
                           stdout=subprocess.DEVNULL)
            print(f"smoke pipeline on the {runner}: {time.perf_counter() - started:.1f} s", flush=True)
    finally:
        for process in (workers, scheduler, server):
            process.terminate()
            process.wait(timeout=60)
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", type=int, default=1000, help="units in the measured flow")
    parser.add_argument("--kinds", default="bare,cached", help="kinds of unit: bare, cached")
    parser.add_argument("--runners", default="threads,dask", help="task runners: threads, dask")
    parser.add_argument("--apis", default="ephemeral,server", help="Prefect APIs: ephemeral, server")
    parser.add_argument("--smoke", action="store_true", help="also time the smoke pipeline on threads and on Dask")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(args.units, args.kinds.split(","), args.runners.split(","))
        return

    rows = [row for api in args.apis.split(",") for row in run_api(api, args)]
    print(f"| API | task runner | unit | s per unit | flow CPU ms per unit | server CPU ms per unit | "
          f"s for {args.units} units | server peak RSS (MiB) | server database (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        def per_unit(name: str) -> float:
            return (row[name] - row[f"baseline_{name}"]) / (row["units"] - BASELINE_UNITS)

        row["per_unit"] = per_unit("seconds")
        database = f"{row['database_mib']:.0f}" if row["database_mib"] is not None else "-"
        print(f"| {row['api']} | {row['runner']} | {row['kind']} | {row['per_unit']:.4f} | "
              f"{1000 * per_unit('flow_cpu'):.1f} | {1000 * per_unit('server_cpu'):.1f} | {row['seconds']:.1f} | "
              f"{row['server_peak_mib']:.0f} | {database} |")
    units = imagenet_units()
    total = sum(units.values())
    print(f"\nImageNet-1k at 256 px: {units['ingest']} ingest + {units['encode']} encode units + "
          f"{units['sample']} sample batches = {total} mapped units; their orchestration alone:")
    for row in rows:
        if row["kind"] == "cached":
            print(f"  {row['api']} API, {row['runner']}: {total * row['per_unit'] / 60:.1f} min")
    if args.smoke:
        smoke_side_by_side()


if __name__ == "__main__":
    main()
