"""tests/browser.py against a real `prefect server`: a finished flow run with a markdown
artifact, as headless Chromium renders its pages in Prefect's UI."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid

import httpx
import pytest
from PIL import Image

from browser import chromium, render

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(chromium() is None, reason="no chromium on PATH (bash .ci/install installs it)")]

_FLOW = """
import json, sys
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

@flow(name="browser-check")
def browser_check(key: str):
    create_markdown_artifact(key=key, markdown="# Browser check\\n\\nRendered by **Chromium**.",
                             description="Report for the browser test")
    return {"id": flow_run.id, "name": flow_run.name}

print(json.dumps(browser_check(sys.argv[1])))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on 127.0.0.1 with its own PREFECT_HOME; yields the env to talk to it."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage"),
        "PREFECT_API_URL": api,
        "PREFECT_UI_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    with open(home / "server.log", "w") as log:
        server = subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while True:
                try:
                    if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
            yield env
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


def test_flow_run_page_and_its_artifacts_tab_render_with_the_state_and_the_artifact(prefect_server, tmp_path):
    env, api = prefect_server, prefect_server["PREFECT_API_URL"]
    ui = api.removesuffix("/api")
    key = f"vqvae2-report-{uuid.uuid4().hex[:8]}"
    done = subprocess.run([sys.executable, "-c", _FLOW, key], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads(done.stdout.strip().splitlines()[-1])
    artifact = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"key": {"any_": [key]}}}).json()[0]

    pages = {
        # V1 (Vue): the run's header, state badge and logs.
        "run.png": (f"{ui}/runs/flow-run/{run['id']}", ["Completed", run["name"], "browser-check"]),
        # V2 (React): V1 resets ?tab=Artifacts to Logs on a fresh load (see browser.py).
        "run-artifacts.png": (f"{ui}/v2/runs/flow-run/{run['id']}?tab=Artifacts", ["Completed", key]),
        "artifact.png": (f"{ui}/artifacts/artifact/{artifact['id']}", [key, "Browser check", "Rendered by"]),
    }
    for name, (url, expected) in pages.items():
        started = time.monotonic()
        text = render(url, tmp_path / name, wait_for=expected)
        assert all(s in text for s in expected)
        image = Image.open(tmp_path / name)
        assert image.format == "PNG" and image.size == (1600, 1200)
        assert (tmp_path / name).stat().st_size > 10_000
        # A page, not a blank or a lone spinner: many colours (text anti-aliasing, badges, cards).
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 100, name
        print(f"{name}: {time.monotonic() - started:.1f}s {url}")
