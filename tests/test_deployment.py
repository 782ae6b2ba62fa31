"""prefect.yaml as a user deploys it: a real `prefect server`, a process work pool and worker,
`prefect deploy --all`, `prefect deployment run vqvae2/full-pipeline`."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on 127.0.0.1 with its own PREFECT_HOME; yields the env to talk to it."""
    home = tmp_path_factory.mktemp("prefect-server")
    api = f"http://127.0.0.1:{_free_port()}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage"),
        "PREFECT_API_URL": api,
        "PREFECT_UI_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    port = api.rsplit(":", 1)[1].split("/")[0]
    log = open(home / "server.log", "w")
    server = subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port", port],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while True:
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(1)
    yield env
    server.terminate()
    server.wait(timeout=30)
    log.close()


def _prefect(env: dict, *args: str, cwd: Path = REPO, timeout: float = 300) -> str:
    done = subprocess.run(["prefect", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _latest_run(api: str, deployment: str) -> dict:
    runs = httpx.post(f"{api}/flow_runs/filter", json={
        "deployments": {"name": {"any_": [deployment]}}, "sort": "EXPECTED_START_TIME_DESC",
        "flow_runs": {"state": {"type": {"any_": ["COMPLETED", "FAILED", "CRASHED"]}}}, "limit": 1,
    }).json()
    return runs[0]


def _task_states(api: str, flow_run_id: str) -> dict[str, str]:
    deadline = time.monotonic() + 60
    while True:
        runs = httpx.post(f"{api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run_id]}}}).json()
        if runs and all(r["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED") for r in runs):
            return {r["name"]: r["state"]["name"] for r in runs}
        assert time.monotonic() < deadline, "task runs never reached a final state"
        time.sleep(0.5)


def test_deploy_from_prefect_yaml_and_run_the_full_pipeline_then_the_nightly_rerun(prefect_server, tmp_path):
    env, api = prefect_server, prefect_server["PREFECT_API_URL"]
    _prefect(env, "work-pool", "create", "vqvae2", "--type", "process")
    _prefect(env, "--no-prompt", "deploy", "--all")
    deployment = httpx.get(f"{api}/deployments/name/vqvae2/full-pipeline").json()
    assert deployment["pull_steps"] and str(REPO) not in json.dumps(deployment["pull_steps"])
    nightly = httpx.get(f"{api}/deployments/name/vqvae2/nightly").json()
    assert nightly["schedules"] and nightly["schedules"][0]["schedule"]["cron"] == "0 2 * * *"

    # The worker runs anywhere: the deployment names no path of the machine that deployed.
    elsewhere = tmp_path / "worker"
    elsewhere.mkdir()
    worker_log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen(["prefect", "worker", "start", "--pool", "vqvae2", "--limit", "1"],
                              env=env, cwd=elsewhere, stdout=worker_log, stderr=subprocess.STDOUT)
    try:
        root = tmp_path / "root"
        params = json.dumps({"config": {"preset": "smoke", "storage": {"root": str(root)}}})
        _prefect(env, "deployment", "run", "vqvae2/full-pipeline", "--params", params, "--watch",
                 "--watch-timeout", "900", timeout=960)
        first = _latest_run(api, "full-pipeline")
        assert first["state"]["type"] == "COMPLETED", first["state"]
        assert set(_task_states(api, first["id"]).values()) == {"Completed"}
        assert list(root.glob("reports/*/report.md"))

        # The nightly deployment on unchanged inputs: every task Cached, in well under a minute.
        _prefect(env, "deployment", "run", "vqvae2/nightly", "--params", params, "--watch",
                 "--watch-timeout", "600", timeout=660)
        rerun = _latest_run(api, "nightly")
        assert rerun["state"]["type"] == "COMPLETED", rerun["state"]
        assert set(_task_states(api, rerun["id"]).values()) == {"Cached"}
        assert rerun["total_run_time"] < 60
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        worker_log.close()
