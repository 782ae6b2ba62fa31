"""tests/browser.py against a real `prefect server`: a finished flow run with a markdown
artifact, as headless Chromium renders its pages in Prefect's UI."""
from __future__ import annotations

import json
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
