"""The pipeline on a real Dask cluster, as docs/storage.md tells a user to run it: a
`dask scheduler` and `dask worker --nworkers 2 --nthreads 1` on 127.0.0.1 with the project
importable there, then `vqvae2 run --set runner.dask_address=...`. The mapped units run in
the workers' processes, and the root ends as a thread-pool run's. What a worker receives
(every task, and the arguments a run hands them) pickles by reference, with plain pickle."""
from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
from prefect import Task, task

from local_servers import answers, free_port, running, wait_until
from pipeline_helpers import differences, smoke_config
from tasks.config import Runtime
from tasks.machinery.cached import cached_unit, with_records
from tasks.machinery.dask import NotSendable, check_sendable
from tasks.stages import STAGES

REPO = Path(__file__).resolve().parents[1]
# Each task run's log line names the process it ran in.
TASK_RUN_FMT = "%(asctime)s.%(msecs)03d | %(levelname)-7s | pid %(process)d | Task run %(task_run_name)r - %(message)s"
MAPPED_UNIT = re.compile(r"pid (\d+) \| Task run '((?:ingest|encode)-(?:train|test)-\d+|sample-batch-\d+)' - "
                         r"Finished in state Completed")


def _stage_tasks() -> list[Task]:
    modules = {sys.modules[stage.run.__module__] for stage in STAGES}
    return sorted((value for module in modules for value in vars(module).values() if isinstance(value, Task)),
                  key=lambda unit: unit.name)


@pytest.mark.parametrize("unit", _stage_tasks(), ids=lambda unit: unit.name)
def test_every_task_of_every_stage_pickles_by_reference(unit, prefect_api):
    for sent in (unit, with_records(unit, "/runs", None)):  # as a flow calls it
        received = pickle.loads(pickle.dumps(sent))
        assert received.fn is unit.fn and received.name == unit.name


def test_the_arguments_every_stage_takes_from_its_config_pickle(tmp_path):
    config = smoke_config(str(tmp_path / "root"))
    assert pickle.loads(pickle.dumps(Runtime.of(config))) == Runtime.of(config)
    assert pickle.loads(pickle.dumps(config.build_source())).digest() == config.build_source().digest()
    for stage in STAGES:
        for variant in stage.variants_of(config.with_classes(10)):
            settings = stage.settings_for(config.with_classes(10), variant)
            assert pickle.loads(pickle.dumps(settings)) == settings


def _nowhere(text: str):
    raise AssertionError("never run here")


@cached_unit(locate=_nowhere, name="count-lines")
def count_lines(text: str) -> int:
    return text.count("\n")


def test_a_task_that_cannot_be_sent_is_refused_naming_it_and_the_object():
    check_sendable(count_lines, {"text": "a\nb"})  # module-level, plain arguments: sent

    @task(name="local-count")
    def local_count(text: str) -> int:
        return text.count("\n")

    for unit, parameters, named in [(local_count, {"text": "a"}, "the task itself"),
                                    (count_lines, {"text": lambda: "a"}, "its argument 'text'")]:
        with pytest.raises(NotSendable) as refused:
            check_sendable(unit, parameters)
        message = str(refused.value)
        assert message.startswith(f"task {unit.name!r} cannot be sent to a Dask worker: {named}"), message
        assert "\n" not in message and ("local_count" in message or "lambda" in message), message


def test_a_dask_run_without_a_prefect_server_is_refused_before_anything_starts(tmp_path):
    """In ephemeral mode every worker process would start a temporary Prefect server of its own."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--preset", "smoke", "--root",
                           str(tmp_path / "root"), "--set", "runner.dask_address=tcp://127.0.0.1:8786"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "runner.dask_address is tcp://127.0.0.1:8786, but Prefect runs without a server" in done.stderr
    assert "PREFECT_API_URL" in done.stderr and not (tmp_path / "root").exists()


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """(scheduler address, the workers' pids, their log): a scheduler and two single-threaded
    worker processes, started from the project's folder as docs/storage.md says."""
    from distributed import Client

    folder = tmp_path_factory.mktemp("dask")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(folder / "prefect-home"),
           "PREFECT_LOGGING_FORMATTERS_STANDARD_TASK_RUN_FMT": TASK_RUN_FMT}
    scheduler_log, workers_log = folder / "scheduler.log", folder / "workers.log"
    with running(["dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                 scheduler_log, env, cwd=REPO) as scheduler:
        wait_until(lambda: answers("127.0.0.1", port), scheduler, scheduler_log, "dask scheduler")
        with running(["dask", "worker", address, "--nworkers", "2", "--nthreads", "1", "--no-dashboard"],
                     workers_log, env, cwd=REPO) as workers, Client(address, timeout=60) as client:
            wait_until(lambda: len(client.scheduler_info()["workers"]) == 2, workers, workers_log, "dask workers")
            pids = set(client.run(os.getpid).values())
            yield address, pids, workers_log


@pytest.mark.slow
def test_the_inputs_each_stage_takes_from_a_finished_run_pickle(smoke_run):
    from tasks.stages import FinishedRun

    config, _, _ = smoke_run
    finished = FinishedRun(config)
    for stage in STAGES:
        inputs = finished.inputs(stage)
        assert pickle.loads(pickle.dumps(inputs)).keys() == inputs.keys(), stage.name


@pytest.mark.slow
def test_the_smoke_pipeline_runs_its_mapped_units_on_dask_workers_and_ends_as_a_thread_pool_run(
        smoke_run, dask_cluster, tmp_path):
    from prefect.settings import get_current_settings

    reference_config, reference_root, _ = smoke_run
    address, worker_pids, workers_log = dask_cluster
    root, log = tmp_path / "root", tmp_path / "run.log"
    env = {**os.environ, "PREFECT_API_URL": str(get_current_settings().api.url), "PYTHONPATH": str(REPO),
           "PREFECT_LOGGING_FORMATTERS_STANDARD_TASK_RUN_FMT": TASK_RUN_FMT}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--preset", "smoke", "--root", str(root),
                           "--set", f"runner.dask_address={address}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    log.write_text(done.stdout + done.stderr)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]

    flow_pids = {int(pid) for pid, _ in MAPPED_UNIT.findall(done.stdout + done.stderr)}
    ran = {name: int(pid) for pid, name in MAPPED_UNIT.findall(workers_log.read_text())}
    assert not flow_pids, "mapped units ran in the flow's own process"
    # Every shard ingested and encoded and every batch sampled in a worker, the two workers sharing them
    shards = [f"{p.parent.name}-{int(p.stem.split('-')[1])}" for p in root.glob("datasets/*/*/shard-*.tar")]
    batches = [f"sample-batch-{int(p.stem.split('-')[1])}" for p in root.glob("samples/*/batches/batch-*.npz")]
    assert len(shards) == 4 and len(batches) == 3
    assert sorted(ran) == sorted([f"ingest-{s}" for s in shards] + [f"encode-{s}" for s in shards] + batches)
    assert set(ran.values()) == worker_pids, (ran, worker_pids)

    assert differences(root, reference_root, within=_artifacts(root)) == {"only here": [], "missing": [],
                                                                          "differ": []}


def _artifacts(root: Path) -> list[str]:
    """The artifacts (`datasets/<key>`, ...) and records (`runs/<key>.json`) a run left under `root`."""
    return sorted(rel for rel in (str(p.relative_to(root)) for p in root.glob("*/*")) if not rel.startswith("."))
