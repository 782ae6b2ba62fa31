"""What the Prefect UI keeps of a run: artifact keys per config (two configs never replace
each other's "latest") and report images as bounded thumbnails linking to the full files."""
from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactCollectionFilter

from flows.parameters import sections_of
from flows.pipeline import STAGE_FLOWS
from tasks.config import config_key
from tasks.report_markdown import render_markdown
from tasks.stages.evaluate import Report
from tasks.machinery.reporting import config_ui_key, full_size_note, markdown_image, png_bytes, thumbnail_png
from pipeline_helpers import artifacts, smoke_config, state_names


def _png(width: int, height: int, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(0)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    return png_bytes(rng.integers(0, 256, shape, dtype=np.uint8))


def _size(png: bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return image.size


# --- thumbnails ----------------------------------------------------------------------------


def test_a_large_image_becomes_a_png_thumbnail_of_1024_on_the_long_side():
    assert _size(thumbnail_png(_png(4096, 2048))) == (1024, 512)
    assert _size(thumbnail_png(_png(1500, 3000, mode="L"))) == (512, 1024)


def test_a_small_image_is_embedded_as_it_is():
    small = _png(64, 64)
    assert thumbnail_png(small) == small
    assert thumbnail_png(_png(1024, 700)) == _png(1024, 700)


def test_an_inline_image_is_a_thumbnail_then_where_its_full_file_is(tmp_path):
    full = str(tmp_path / "report dir" / "samples.png")
    text = markdown_image(_png(4096, 2048), "samples", full)
    # The image, then where the full one is (Prefect's default UI shows an image inside a link
    # as raw text): a path on the worker's machine is text, as a link it is dead elsewhere.
    assert text.startswith("![samples](data:image/png;base64,") and text.endswith(f"\n\nsamples, full size: `{full}`")
    assert "file://" not in text and "](/" not in text
    assert full_size_note("s3://key:secret@bucket/x.png", "x") == "x, full size: `s3://bucket/x.png`"
    # A URL a browser follows stays a link, its spaces and parentheses escaped.
    assert full_size_note("https://cdn.example/runs (old)/x.png", "x") == \
        "[x: full size](https://cdn.example/runs%20%28old%29/x.png)"
    assert len(text) < 0.5 * 4096 * 2048  # the full grid's pixels are not in the artifact


def _report() -> Report:
    row = {"set": "samples, no rejection", "fid": 1.0, "kid_mean": 0.1, "precision": 0.5, "recall": 0.5}
    return Report.model_validate({
        "preset": "smoke", "overrides": {}, "model": {}, "seeds": {},
        "dataset": {"key": "d", "images": 10, "source": {"kind": "idx", "url": "/data"}},
        "samples": {"temperature": 1.0, "top_k": 0, "seed": 0, "candidates": 20, "kept_per_rate": 20},
        "fidelity": {"extractor": {"kind": "domain", "description": "Not comparable"}, "reference": "10 images",
                     "rows": [row]},
        "metrics": {"recon_mse": 0.01}, "training": [{"stage": "autoencoder", "steps": 10}],
        "artifacts": {"ingest": "/root/datasets/d"},
    })


def test_the_report_links_each_ui_thumbnail_to_its_full_image_and_report_md_shows_the_files():
    names = ("samples", "reconstructions", "rejection-tradeoff", "loss-autoencoder")
    images = {name: _png(2048, 2048) for name in names}
    links = {name: f"s3://bucket/root/reports/k/{name}.png" for name in names}
    ui = render_markdown(_report(), images, links=links)
    for name in names:
        assert f"![{name}](data:image/png;base64," in ui and f"{name}, full size: `s3://bucket/root/reports/k/{name}.png`" in ui
    assert ui.count("data:image/png;base64,") == len(names)
    on_disk = render_markdown(_report(), {name: f"{name}.png" for name in names})
    assert all(f"![{name}]({name}.png)" in on_disk for name in names) and "data:" not in on_disk


# --- keys per config, against a real Prefect API ---------------------------------------------


def test_outside_a_prefect_run_a_key_stays_plain():
    assert config_ui_key("vqvae2-report") == "vqvae2-report"


@task
def _key_in_a_task(key: str) -> str:
    return config_ui_key(key)


@flow
def _one_config(config: Any) -> list[str]:
    return [config_ui_key("vqvae2-report"), _key_in_a_task.submit("Dataset").result()]


@flow
def _config_sections(preset: str, storage: dict[str, Any], overrides: dict[str, Any]) -> str:
    return _key_in_a_task("dataset")


def test_the_key_is_the_configs_in_the_flow_and_its_tasks_whatever_the_parameters_look_like(prefect_api, tmp_path):
    config = smoke_config(str(tmp_path / "root"))
    short = config_key(config)
    assert _one_config(config) == [f"vqvae2-report-{short}", f"dataset-{short}"]
    assert _one_config(config.model_dump(mode="json")) == [f"vqvae2-report-{short}", f"dataset-{short}"]
    # a flow whose parameters are the config's sections (each its own form in the UI)
    assert _config_sections("smoke", {"root": str(tmp_path / "root")}, {}) == f"dataset-{short}"


def _dataset_keys(state: Any) -> list[str]:
    assert state.is_completed(), state.message
    return [a.key for a in artifacts(state.state_details.flow_run_id) if a.type == "table"]


def test_two_configs_keep_their_own_dataset_tables_and_a_rerun_its_key(prefect_api, tmp_path):
    from flows.pipeline import STAGE_FLOWS

    ingest = STAGE_FLOWS["ingest"]
    root = tmp_path / "root"
    first, other = smoke_config(str(root)), smoke_config(str(root), ingest={"holdout_fraction": 0.2})
    keys = _dataset_keys(ingest(**sections_of(first), return_state=True))
    other_keys = _dataset_keys(ingest(**sections_of(other), return_state=True))
    assert keys == [f"dataset-{config_key(first)}"]
    assert len(other_keys) == 1 and other_keys != keys and other_keys[0].startswith("dataset-")
    # The same config again (its datasets removed, so ingest runs rather than being cached),
    # with a field that decides no artifact changed: the same key, a new version of it.
    shutil.rmtree(Path(root) / "datasets")
    again = smoke_config(str(root), training={"log_every": 7})
    assert _dataset_keys(ingest(**sections_of(again), return_state=True)) == keys


# --- stage flows on a finished run: their own artifacts, under their config's key ----------------


def _latest(key: str) -> Any:
    with get_client(sync_client=True) as client:
        return client.read_latest_artifacts(artifact_filter=ArtifactCollectionFilter(key={"any_": [key]}))[0]


def test_two_configs_each_keep_their_report_and_a_stage_flow_shows_what_it_made(smoke_run):
    config, root, smoke = smoke_run
    report_key = smoke.result().key  # a report's UI artifact has its folder's key
    first_report = _latest(f"vqvae2-report-{report_key}")  # the smoke run's, or a re-run's of its config

    # Another config, one after the other: other acceptance rates, which the evaluate flow
    # samples first (the trainings are found, not redone), then reports under its own key.
    other = smoke_config(str(root), sample={"acceptance_rates": [1.0, 0.5]})
    evaluated = STAGE_FLOWS["evaluate"](**sections_of(other), return_state=True)
    assert evaluated.is_completed(), evaluated.message
    names = state_names(evaluated.state_details.flow_run_id)
    assert any(n.startswith("finalize-samples") for n in names) and not any(n.startswith("train") for n in names)
    assert [row["rate"] for row in evaluated.result().fidelity if row.get("rate")] == [1.0, 0.5]
    other_key = evaluated.result().key
    other_report = _latest(f"vqvae2-report-{other_key}")
    assert other_key != report_key and other_report.flow_run_id == evaluated.state_details.flow_run_id
    # Each card says which key its name carries: the report's cards the report key, the others the config key.
    for card in artifacts(evaluated.state_details.flow_run_id):
        if card.key:
            which = "report key" if card.key.endswith(other_key) else "config key"
            assert card.description.endswith(f"{which} {card.key.rsplit('-', 1)[1]})"), (card.key, card.description)
    assert _latest(f"vqvae2-report-{report_key}").id == first_report.id  # not overwritten

    # The sample flow: exactly the images asked for, its grid on the run's Artifacts tab.
    asked = smoke_config(str(root), sample={"num_samples": 7, "seed": 3})
    sampled = STAGE_FLOWS["sample"](**sections_of(asked), return_state=True)
    assert sampled.is_completed(), sampled.message
    assert sampled.result().num_samples == 7
    grid = [a for a in artifacts(sampled.state_details.flow_run_id)
            if a.key == f"vqvae2-samples-{config_key(asked)}"]
    assert len(grid) == 1 and "data:image/png;base64," in grid[0].data and "grid.png" in grid[0].data
