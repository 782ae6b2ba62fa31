"""A storage root can move: manifests, unit markers and Prefect's cache records hold paths
relative to the root, so a root renamed, copied or synced to S3 works where it lands,
every task `Cached`, and reads nothing of the place it came from."""
from __future__ import annotations

import json
import shutil

import pytest

from flows.parameters import sections_of
from storage.fsutil import filesystem, read_bytes
from tasks.manifests import located
from tasks.stages.sample import SampleBatch
from tasks.stages.train_prior import PriorManifest
from tasks.machinery.artifacts import Artifact
from tasks.machinery.cached import CacheRecords
from tasks.stages import FinishedRun, encode, sample, train_autoencoder
from pipeline_helpers import smoke_config, snapshot, state_names


def _rerun(root: str, **sections):
    """Run the smoke pipeline on `root`; (its report, {task: state}) without the ingest plan,
    which Prefect keeps in the worker's storage per root URL, never under the root."""
    from flows.pipeline import vqvae2_pipeline

    state = vqvae2_pipeline(**sections_of(smoke_config(root, **sections)), return_state=True)
    assert state.is_completed(), state.message
    states = state_names(state.state_details.flow_run_id)
    return state.result(), {name: s for name, s in states.items() if not name.startswith("plan-dataset")}


def _all_cached(states: dict[str, str]) -> None:
    assert len(states) > 20 and set(states.values()) == {"Cached"}, states


@pytest.mark.slow
def test_a_root_copied_then_moved_is_all_cached_where_it_lands_and_reads_only_itself(smoke_run, tmp_path, capsys):
    """The smoke root copied, the copy moved; the original hidden meanwhile, so that a read of
    it (or of the copy's first place) would fail."""
    from flows.cli import main

    _, smoke_root, first = smoke_run
    copied, moved = tmp_path / "copied", tmp_path / "moved"
    shutil.copytree(smoke_root, copied)
    copied.rename(moved)
    before = snapshot(moved)
    hidden = smoke_root.with_name(smoke_root.name + "-hidden")
    smoke_root.rename(hidden)
    try:
        report, states = _rerun(str(moved))
        finished = FinishedRun(smoke_config(str(moved)))
        main(["report", "--preset", "smoke", "--root", str(moved)])
    finally:
        hidden.rename(smoke_root)
    _all_cached(states)
    assert snapshot(moved) == before  # nothing rewritten
    assert report.markdown == f"{moved}/reports/{report.key}/report.md" and report.metrics == first.result().metrics
    assert f"{moved}/reports/{report.key}/report.md" in capsys.readouterr().out
    assert finished.get(train_autoencoder.STAGE).model.startswith(f"{moved}/autoencoder/") and finished.get(encode.STAGE).codes.startswith(str(moved))
    assert all(url.startswith(f"{moved}/samples/") for url in finished.get(sample.STAGE).batches)
    assert not [p for p in moved.rglob("*") if p.is_file() and p.suffix in (".json", ".md")
                and str(smoke_root).encode() in p.read_bytes()]


@pytest.mark.slow
def test_a_local_root_synced_to_s3_is_all_cached_there(smoke_run, s3_bucket):
    _, smoke_root, first = smoke_run
    url = f"{s3_bucket.url}/synced"
    fs, path = filesystem(url, s3_bucket.storage_options)
    fs.put(str(smoke_root), path, recursive=True)  # what `aws s3 sync ROOT s3://bucket/synced` leaves
    report, states = _rerun(url, storage={"storage_options": {"endpoint_url": s3_bucket.endpoint}})
    _all_cached(states)
    assert report.report == f"{url}/reports/{report.key}/report.json"
    assert json.loads(read_bytes(report.report, s3_bucket.storage_options))["metrics"] == first.result().metrics


# --- the relative form itself ------------------------------------------------------------------


PRIOR = {"steps": 40, "resumed_from_step": 0, "epochs": 1, "metrics": {}, "device": "cpu", "codes": "k", "level": 0,
         "level_name": "prior-top", "stage": "priors", "key": "0123456789abcdef"}


@pytest.mark.parametrize("root", ["/data/runs", "runs", "s3://bucket/runs", "priors"])
def test_urls_under_the_root_are_stored_relative_to_it_and_read_back_under_another(root):
    here = f"{root}/priors/0123456789abcdef"
    prior = PriorManifest(**PRIOR, url=here, model=f"{here}/model.pt", loss_curve=f"{here}/loss.png",
                          history="s3://elsewhere/history.json")
    stored = prior.model_dump(mode="json", context=located(root))
    assert stored["url"] == "priors/0123456789abcdef" and stored["model"] == "priors/0123456789abcdef/model.pt"
    assert stored["history"] == "s3://elsewhere/history.json"  # not under the root: kept whole
    moved = PriorManifest.model_validate(stored, context=located("/mnt/moved"))
    assert moved.model == "/mnt/moved/priors/0123456789abcdef/model.pt" and moved.history == prior.history


@pytest.mark.parametrize("root", ["/data/runs", "runs", "./runs"])
def test_urls_written_before_paths_were_relative_still_read(root):
    legacy = f"{root}/samples/0123456789abcdef/batches/batch-00000.npz"
    batch = SampleBatch.model_validate({"index": 0, "url": legacy, "images": 4}, context=located(root))
    assert batch.url == legacy


def test_a_cache_record_holds_its_manifest_relative_to_the_root(tmp_path):
    """Prefect's JSON record of a unit's result, as Prefect writes it: rebased on the way in
    and out of the root, so another root reads it as its own."""
    from prefect.serializers import JSONSerializer

    old, new = tmp_path / "old", tmp_path / "new"
    artifact = Artifact(str(old), "samples", "0123456789abcdef")
    batch = SampleBatch(index=3, url=artifact.path("batches", "batch-00003.npz"), images=8)
    record = {"metadata": {"storage_key": artifact.record("batch-00003"), "serializer": {"type": "json"}},
              "result": JSONSerializer().dumps(batch).decode()}
    CacheRecords(root=str(old)).write_path(artifact.record("batch-00003"), json.dumps(record).encode())
    at_rest = (old / artifact.record("batch-00003")).read_text()
    assert str(old) not in at_rest and "samples/0123456789abcdef/batches/batch-00003.npz" in at_rest

    old.rename(new)
    read = json.loads(CacheRecords(root=str(new)).read_path(artifact.record("batch-00003")))
    assert JSONSerializer().loads(read["result"].encode()).url == f"{new}/samples/0123456789abcdef/batches/batch-00003.npz"


def test_what_is_not_a_cache_record_stays_out_of_the_root(tmp_path):
    """A failed attempt's error, which Prefect persists under a random name: kept by the
    worker (Prefect's default result storage), never at the top of the root."""
    records = CacheRecords(root=str(tmp_path / "root"))
    records.write_path("0f1e2d3c4b5a69788796a5b4c3d2e1f0", b"an error")
    assert not (tmp_path / "root").exists()
    assert records.read_path("0f1e2d3c4b5a69788796a5b4c3d2e1f0") == b"an error"


@pytest.mark.slow
def test_a_failed_run_leaves_nothing_at_the_top_of_the_root(prefect_api, tmp_path, fashion_mnist_test_split):
    """Too many unreadable images fail the ingest for good: Prefect persists the error, and
    the root holds only the datasets folder, no stray result file beside it."""
    from flows.pipeline import STAGE_FLOWS
    from image_files import write_folder

    images, _ = fashion_mnist_test_split
    write_folder(tmp_path / "images", images[:20])  # and one broken file: 1 of 21 unreadable
    root = tmp_path / "root"
    config = smoke_config(str(root), source={"url": str(tmp_path / "images")}, ingest={"max_bad_fraction": 0.0},
                          overrides={"num_classes": 0})
    state = STAGE_FLOWS["ingest"](**sections_of(config), return_state=True)
    assert state.is_failed() and "could not be used" in state.message
    assert sorted(p.name for p in root.iterdir()) == [".vqvae2", "datasets"]
    assert [p for p in (root / ".vqvae2").rglob("*") if p.is_file()] == []  # the ingest's turn, given back
