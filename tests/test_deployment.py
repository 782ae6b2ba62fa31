"""prefect.yaml as a user deploys it: a real `prefect server`, a process work pool and worker,
`prefect deploy --all`, `prefect deployment run vqvae2/full-pipeline`, a stage deployment with
one section overridden, the watch and its trigger, and the UI as headless Chromium shows it."""
from __future__ import annotations

import base64
import http.server
import io
import json
import re
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from PIL import Image

from flows.parameters import config_of
from storage.fsutil import read_bytes
from tasks.config import config_key
from tasks.machinery.reporting import display_scale, image_grid
from tasks.stages import FinishedRun, sample
from browser import render, render_page

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


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


def _deployment_config(tmp_path: Path, root: Path, folder: Path) -> Path:
    """The repository's prefect.yaml as a user adapts it: the shared config set to a smoke run
    of their folder into their root; the watch's 10-minute schedule left out, so that only
    the test starts it. Returns the folder to deploy from."""
    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    watch = next(d for d in project["deployments"] if d["name"] == "watch")
    assert watch["schedules"] == [{"interval": 600, "active": False}]  # shipped off: enabled by the user
    del watch["schedules"]
    config = {"preset": "smoke", "source": {"url": str(folder)}, "storage": {"root": str(root)}}
    for deployment in project["deployments"]:
        assert deployment["parameters"] == project["definitions"]["parameters"]  # one config for all
        deployment["parameters"] = config
    here = tmp_path / "project"
    here.mkdir()
    (here / "prefect.yaml").write_text(yaml.safe_dump(project, sort_keys=False))
    return here


def _class_folders(folder: Path, images, labels, first: int, count: int) -> None:
    for i in range(first, first + count):
        path = folder / f"class{labels[i]}" / f"img{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(path)


def _run(env: dict, api: str, deployment: str, params: dict | None = None, timeout: int = 900) -> dict:
    args = ["--params", json.dumps(params)] if params else []
    out = _prefect(env, "deployment", "run", f"vqvae2/{deployment}", *args, "--watch", "--watch-interval", "1",
                   "--watch-timeout", str(timeout), timeout=timeout + 60)
    run = _latest_run(api, deployment)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    # One name from submission to the end: the one `prefect deployment run` printed.
    assert f"Created flow run {run['name']!r}" in " ".join(out.split()), out[:2000]
    assert {"vqvae2", "preset:smoke"} <= set(run["tags"]), run["tags"]
    return run


def _artifacts(api: str, flow_run_id: str, keyed_only: bool = True) -> dict[str, dict]:
    """{key: artifact} of a flow run; `keyed_only=False`: its progress bars too, by id."""
    found = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}).json()
    return {a["key"] or a["id"]: a for a in found if a["key"] or not keyed_only}


def _logs(api: str, flow_run_id: str) -> list[dict]:
    """The log records of a flow run and its tasks, oldest first."""
    return httpx.post(f"{api}/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}},
                                                  "sort": "TIMESTAMP_ASC"}).json()


def _created_artifacts(api: str) -> dict[str, dict | None]:
    """Every artifact whose creation the server's events record, by id: as the server has it
    now, or None where it is gone."""
    page = httpx.post(f"{api}/events/filter", json={"filter": {"event": {"name": ["prefect.artifact.created"]}},
                                                   "limit": 50}).json()  # 50: the most a page holds
    ids = []
    while True:
        ids += [e["resource"]["prefect.resource.id"].removeprefix("prefect.artifact.") for e in page["events"]]
        if not page["next_page"]:
            break
        page = httpx.get(page["next_page"]).json()
    return {i: (found.json() if (found := httpx.get(f"{api}/artifacts/{i}")).status_code == 200 else None)
            for i in ids}


def _runs_of(api: str, deployment: str) -> list[dict]:
    return httpx.post(f"{api}/flow_runs/filter", json={"deployments": {"name": {"any_": [deployment]}}}).json()


def test_deployments_from_prefect_yaml_pipeline_stage_runs_and_the_new_data_trigger(
        prefect_server, tmp_path, fashion_mnist_test_split):
    env, api = prefect_server, prefect_server["PREFECT_API_URL"]
    images, labels = fashion_mnist_test_split
    folder, root = tmp_path / "my-images", tmp_path / "root"
    _class_folders(folder, images, labels, 0, 400)
    project = _deployment_config(tmp_path, root, folder)
    _prefect(env, "work-pool", "create", "vqvae2", "--type", "process")
    _prefect(env, "--no-prompt", "deploy", "--all", cwd=project)
    deployments = {d["name"]: d for d in httpx.post(f"{api}/deployments/filter", json={}).json()}
    assert set(deployments) == {"full-pipeline", "nightly", "sample", "evaluate", "ingest", "watch", "new-data"}
    assert all("vqvae2" in d["tags"] for d in deployments.values())
    assert deployments["sample"]["tags"] == ["vqvae2", "stage:sample"]
    # The worker runs anywhere: the deployments name no path of the machine that deployed.
    assert deployments["full-pipeline"]["pull_steps"] and str(project) not in json.dumps(
        [d["pull_steps"] for d in deployments.values()])
    nightly = deployments["nightly"]["schedules"][0]
    assert nightly["schedule"]["cron"] == "0 2 * * *" and nightly["active"] is False
    # Each section is a parameter with its own form.
    form = deployments["sample"]["parameter_openapi_schema"]["properties"]
    assert list(form) == ["preset", "overrides", "source", "storage", "ingest", "training", "encode", "sample",
                          "evaluate", "runner"]

    elsewhere = tmp_path / "worker"
    elsewhere.mkdir()
    worker_log = open(tmp_path / "worker.log", "w")
    # Polling for work every second, not every ten: the runs here are short, and waiting is most of the test.
    worker = subprocess.Popen(["prefect", "worker", "start", "--pool", "vqvae2", "--limit", "1"],
                              env={**env, "PREFECT_WORKER_QUERY_SECONDS": "1"}, cwd=elsewhere, stdout=worker_log, stderr=subprocess.STDOUT)
    try:
        first = _run(env, api, "full-pipeline")
        tasks = _task_states(api, first["id"])
        assert set(tasks.values()) == {"Completed"} and "pipeline" in first["tags"]
        assert {"evaluate", "train-prior-top", "train-prior-bottom"} <= set(tasks), tasks  # named for what they do
        assert list(root.glob("reports/*/report.md"))
        made = _artifacts(api, first["id"], keyed_only=False)
        assert len(made) <= 12, [(a["type"], a["key"], a["description"]) for a in made.values()]  # a tab one can read
        report_key = next(k for k in made if k.startswith("vqvae2-report-"))
        assert report_key == f"vqvae2-report-{next(root.glob('reports/*')).name}"  # the key of its folder
        # The run's state and the last line its flow logged lead to the report's card in the UI.
        report_page = f"{api.removesuffix('/api')}/artifacts/artifact/{made[report_key]['id']}"
        flow_lines = [log["message"] for log in _logs(api, first["id"]) if log["name"] == "prefect.flow_runs"]
        assert report_page in flow_lines[-1] and report_page in first["state"]["message"], flow_lines[-3:]
        written = next(log["timestamp"] for log in _logs(api, first["id"]) if log["message"].startswith("report: "))
        after_report = (datetime.fromisoformat(first["end_time"]) - datetime.fromisoformat(written)).total_seconds()
        print(f"\nfrom the report written to the pipeline run's end: {after_report:.2f} s")

        # The nightly deployment on unchanged inputs: every task Cached, in well under a minute.
        rerun = _run(env, api, "nightly", timeout=600)
        assert set(_task_states(api, rerun["id"]).values()) == {"Cached"}
        assert rerun["total_run_time"] < 60

        # One section overridden; the deployment's source and storage kept.
        sampled = _run(env, api, "sample", {"sample": {"num_samples": 16}})
        assert "stage:sample" in sampled["tags"]
        assert sampled["parameters"]["source"]["url"] == str(folder)
        assert sampled["parameters"]["storage"]["root"] == str(root)
        assert sampled["parameters"]["sample"]["num_samples"] == 16
        config = config_of({k: v for k, v in sampled["parameters"].items()})
        samples = FinishedRun(config).get(sample.STAGE)  # found under the deployment's root, of its dataset
        assert samples.num_samples == 16 and len(list(root.glob("datasets/*/manifest.json"))) == 1
        size = config.model.image_size
        cells = image_grid(torch.zeros(16, 1, size, size)).shape[::-1]  # 4 x 4
        assert Image.open(io.BytesIO(read_bytes(samples.grid))).size == tuple(display_scale(size) * d for d in cells)
        grid_artifact = _artifacts(api, sampled["id"])[f"vqvae2-samples-{config_key(config)}"]
        assert grid_artifact["type"] == "markdown" and "data:image/png;base64," in grid_artifact["data"]

        pages = _screenshots(api, tmp_path / "screenshots", first, sampled, report_key,
                             grid_artifact["key"], [k for k, a in made.items() if a["key"] and k != report_key])
        assert all(p.stat().st_size > 10_000 for p in pages)
        # Prefect's default (V1) UI shows the report's images as images, not as their markdown.
        _, dom = render_page(report_page, tmp_path / "screenshots" / "report-v1.png", wait_for=["Held-out images"])
        grids = re.findall(r'<img src="(data:image/png;base64,[^"]+)" alt="samples"', dom)
        assert grids and Image.open(io.BytesIO(base64.b64decode(grids[0].split(",", 1)[1]))).size[0] > 100
        assert "![samples](data:" not in dom

        # New data: the watch sees nothing to do, then the grown folder, and its event starts new-data.
        _run(env, api, "watch", timeout=300)
        assert not _runs_of(api, "new-data")
        _class_folders(folder, images, labels, 400, 40)
        _run(env, api, "watch", timeout=300)
        triggered = _wait_for_run(api, "new-data")
        assert triggered["created_by"]["type"] == "AUTOMATION", triggered["created_by"]
        assert triggered["parameters"]["source"]["url"] == str(folder)
        # Cancelled at once (what it would run is the pipeline tested above): the worker's one
        # slot goes to the next watch, which announces nothing new for content announced before.
        httpx.post(f"{api}/flow_runs/{triggered['id']}/set_state",
                   json={"state": {"type": "CANCELLING"}, "force": True}).raise_for_status()
        _run(env, api, "watch", timeout=300)
        assert len(_runs_of(api, "new-data")) == 1
        # No card was made only to be deleted: every one the server's events announce is still there.
        created = _created_artifacts(api)
        assert made.keys() <= {a["key"] or a["id"] for a in created.values() if a}
        assert [artifact_id for artifact_id, found in created.items() if found is None] == []
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:  # still stopping its last run's process, on a busy machine
            worker.kill()
            worker.wait()
        worker_log.close()


def test_a_schedule_turned_on_in_prefect_yaml_stays_on_through_every_deploy(prefect_server, tmp_path):
    """README's one way to turn `nightly` on: `active: true` in prefect.yaml, then deploy."""
    env, api = prefect_server, prefect_server["PREFECT_API_URL"]
    project = _deployment_config(tmp_path, tmp_path / "root", tmp_path / "images")
    text = (project / "prefect.yaml").read_text()
    (project / "prefect.yaml").write_text(text.replace("active: false", "active: true", 1))  # nightly's, the first
    _prefect(env, "work-pool", "create", "vqvae2", "--type", "process", "--overwrite")
    for _ in range(2):
        _prefect(env, "--no-prompt", "deploy", "--name", "nightly", cwd=project)
        nightly = httpx.get(f"{api}/deployments/name/vqvae2/nightly").json()
        assert [(s["schedule"]["cron"], s["active"]) for s in nightly["schedules"]] == [("0 2 * * *", True)]


def _wait_for_run(api: str, deployment: str, timeout: float = 120) -> dict:
    """The first run of `deployment` once it is running (the trigger acts within seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        runs = _runs_of(api, deployment)
        if runs and runs[0]["state"]["type"] in ("RUNNING", "COMPLETED"):
            return runs[0]
        assert time.monotonic() < deadline, f"no run of {deployment} started: {runs}"
        time.sleep(1)


def _screenshots(api: str, folder: Path, pipeline_run: dict, sample_run: dict, report_key: str,
                 grid_key: str, other_keys: list[str]) -> list[Path]:
    """What an operator sees in Prefect's UI, rendered by headless Chromium (kept under `folder`):
    the pipeline run's Artifacts tab shows the report's card and the others."""
    ui = api.removesuffix("/api")
    folder.mkdir()
    pages = [
        (f"{ui}/runs/flow-run/{pipeline_run['id']}", "pipeline-run.png", ["Completed", pipeline_run["name"]]),
        # The tab opens from the URL in the UI under /v2 only (the other resets it to Logs).
        (f"{ui}/v2/runs/flow-run/{pipeline_run['id']}?tab=Artifacts", "pipeline-artifacts.png",
         ["Completed", report_key, *other_keys]),
        (f"{ui}/v2/runs/flow-run/{sample_run['id']}?tab=Artifacts", "sample-run.png", ["Completed", grid_key]),
    ]
    for url, name, expected in pages:
        render(url, folder / name, wait_for=expected)
    return [folder / name for _, name, _ in pages]


class _Hook(http.server.BaseHTTPRequestHandler):
    """A webhook on 127.0.0.1 that keeps what is posted to it (`server.posted`)."""

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.server.posted.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_the_shipped_failure_automation_notifies_of_a_failed_run(prefect_server, tmp_path):
    """flows/automations/vqvae2-failed.yaml as docs/reliability.md says to use it: a notification
    block's id set, created with `prefect automation create --from-file`; a run that fails
    reaches the block's webhook with its state and its one-line failure."""
    from local_servers import free_port

    env, api = prefect_server, prefect_server["PREFECT_API_URL"]
    hook = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Hook)
    hook.posted = []
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        block = subprocess.run([sys.executable, "-c", (
            "from prefect.blocks.notifications import CustomWebhookNotificationBlock as Hook\n"
            f"hook = Hook(name='test', url='http://127.0.0.1:{hook.server_port}/', allow_private_urls=True,\n"
            "            json_data={'subject': '{{subject}}', 'body': '{{body}}'})\n"
            "print(hook.save('vqvae2-test-hook'))")], env=env, capture_output=True, text=True, timeout=120)
        assert block.returncode == 0, block.stderr[-2000:]
        shipped = (REPO / "flows" / "automations" / "vqvae2-failed.yaml").read_text()
        assert "00000000-0000-0000-0000-000000000000" in shipped  # the one value a user sets
        (tmp_path / "vqvae2-failed.yaml").write_text(
            shipped.replace("00000000-0000-0000-0000-000000000000", block.stdout.split()[-1]))
        _prefect(env, "automation", "create", "--from-file", str(tmp_path / "vqvae2-failed.yaml"))

        missing = tmp_path / "no-such-folder"
        failed = subprocess.run([sys.executable, "-c", (
            "from flows.pipeline import ingest_flow\n"
            f"state = ingest_flow(preset='smoke', source={{'url': {str(missing)!r}}}, "
            f"storage={{'root': {str(tmp_path / 'root')!r}}}, return_state=True)\n"
            "print(state.type.value)")], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert failed.stdout.split()[-1:] == ["FAILED"], failed.stdout[-2000:] + failed.stderr[-2000:]
        deadline = time.monotonic() + 90
        while not hook.posted:
            assert time.monotonic() < deadline, "no notification within 90 s of the failed run"
            time.sleep(1)
        (note,) = hook.posted
        assert note["subject"].startswith("vqvae2: ") and note["subject"].endswith(" Failed"), note
        assert str(missing) in note["body"] and f"{api.removesuffix('/api')}/runs/flow-run/" in note["body"], note
    finally:
        hook.shutdown()
