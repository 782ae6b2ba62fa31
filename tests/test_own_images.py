"""Users' own images through to a report: an img2dataset tar set on S3 with labels in its
json, read with credentials that appear nowhere, and a CSV of paths with label names (a
flat folder of mixed formats with no labels: tests/test_cli.py, as the command runs it).
Real files written by Pillow, a real S3 API, a real Prefect API, smoke-sized models."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from uuid import uuid4

import pytest
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

from flows.parameters import sections_of
from flows.pipeline import vqvae2_pipeline
from storage.fsutil import exists, filesystem, read_bytes, read_json, write_bytes
from tasks.stages import FinishedRun, ingest
from image_files import img2dataset_tar, write_folder
from pipeline_helpers import artifacts, smoke_config

pytestmark = pytest.mark.slow


def _report(state) -> tuple[dict, str]:
    assert state.is_completed(), state.message
    manifest = state.result()
    return read_json(manifest.report), manifest.markdown


def test_img2dataset_shards_on_s3_run_to_a_report_and_its_secrets_appear_nowhere(
        prefect_api, s3_bucket, monkeypatch, fashion_mnist_test_split):
    """Labels in the shards' json. Credentials in a Secret block and in the environment: the
    run uses them, and no log, artifact, flow parameter, block shown by the UI or file under
    the root holds them."""
    images, labels = fashion_mnist_test_split
    shards = f"{s3_bucket.url}/laion-like"
    for t in range(4):
        part = slice(100 * t, 100 * (t + 1))
        write_bytes(f"{shards}/{t:05d}.tar", img2dataset_tar(images[part], labels[part] % 3, 100 * t))
        write_bytes(f"{shards}/{t:05d}_stats.json", json.dumps({"count": 100, "successes": 100}).encode())
    block_secret, env_secret = f"block-secret-{uuid4().hex}", f"env-secret-{uuid4().hex}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", env_secret)  # moto takes any credentials
    block = f"vqvae2-s3-{uuid4().hex[:8]}"
    Secret(value=json.dumps({"key": "block-key", "secret": block_secret, "endpoint_url": s3_bucket.endpoint})).save(block)
    config = smoke_config(f"{s3_bucket.url}/root", overrides={"num_classes": "auto"},
                          source={"url": f"{shards}/{{00000..00003}}.tar", "labels": "json:label"},
                          storage={"credentials_block": block})
    state = vqvae2_pipeline(**sections_of(config), return_state=True)
    report, markdown = _report(state)

    manifest = state.result()
    assert manifest.url.startswith(f"{s3_bucket.url}/root/reports/") and exists(manifest.url + "/samples.png")
    assert report["metrics"] == manifest.metrics
    dataset = FinishedRun(config).get(ingest.STAGE)
    assert dataset.source["kind"] == "tar" and dataset.class_names == ["0", "1", "2"]
    assert dataset.num_samples == 400 and dataset.splits["test"].num_samples == 100  # one whole tar held out
    assert sum(dataset.splits["train"].class_counts) == 300
    assert report["fidelity"]["extractor"]["kind"] == "domain"
    assert report["samples"]["rejection"].startswith("classifier-based")
    assert "Feature space: **domain**" in read_bytes(markdown).decode()

    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        shown = [json.dumps(client.read_flow_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[run_id])))[0].parameters)]
        shown += [log.message for log in client.read_logs(log_filter=LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[run_id])))]
        shown += [json.dumps(a.data) + str(a.description) for a in artifacts(run_id)]
        shown += [json.dumps(d.data) for d in client.read_block_documents(include_secrets=False)]
    fs, root = filesystem(f"{s3_bucket.url}/root", s3_bucket.storage_options)
    stored = [fs.cat_file(path) for path in fs.find(root)]
    assert len(shown) > 20 and len(stored) > 50
    for secret in (block_secret, env_secret):
        assert not [text for text in shown if secret in text]
        assert not [data for data in stored if secret.encode() in data]


def test_a_csv_of_paths_with_label_names_runs_to_a_report(prefect_api, tmp_path, fashion_mnist_test_split):
    images, labels = fashion_mnist_test_split
    names = ["Trouser", "Bag", "Sneaker"]
    folder = tmp_path / "photos"
    paths = write_folder(folder, images[:360])
    with open(folder / "images.csv", "w", newline="") as file:
        rows = csv.writer(file)
        rows.writerow(["path", "label"])
        for i, path in enumerate(paths):
            rows.writerow([path.relative_to(folder).as_posix(), names[labels[i] % 3]])
        rows.writerow(["missing.png", "Bag"])  # listed, but never copied
    config = smoke_config(str(tmp_path / "root"), source={"url": str(folder / "images.csv"), "labels": "column:label"},
                          overrides={"num_classes": "auto"})
    report, markdown = _report(vqvae2_pipeline(**sections_of(config), return_state=True))

    finished = FinishedRun(config)
    dataset = finished.get(ingest.STAGE)
    assert finished.config.model.num_classes == 3
    assert dataset.source["kind"] == "list" and dataset.class_names == sorted(names)
    assert dataset.num_samples == 360 and dataset.num_skipped == 1
    counts = [sum(split.class_counts[c] for split in dataset.splits.values()) for c in range(3)]
    expected = [sum(1 for i in range(360) if names[labels[i] % 3] == name) for name in sorted(names)]
    assert counts == expected
    assert report["fidelity"]["extractor"]["kind"] == "domain"
    assert "Feature space: **domain**" in Path(markdown).read_text()
