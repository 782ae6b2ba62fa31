"""The stage contract: typed manifests that fail naming the file and the field, one cached-unit
decorator whose "already done" is Prefect's own `Cached`, with its records under the
storage root (so another machine, or a fresh PREFECT_HOME, sees the same cache:
tests/test_stage_declarations.py runs the pipeline so)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from flows.parameters import sections_of
from storage.fsutil import exists, join, read_json, write_bytes, write_json
from tasks.stages import sample, train_prior
from tasks.stages.encode import EncodedShard
from tasks.stages.sample import SamplesManifest
from tasks.stages.train_prior import PriorManifest
from tasks.machinery.artifacts import Artifact, ManifestError
from tasks.machinery.cached import cached_unit, with_records
from tasks.stages import FinishedRun
from pipeline_helpers import log_lines, smoke_config, state_names

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


# --- typed manifests -------------------------------------------------------------------------


@pytest.fixture
def artifact(tmp_path) -> Artifact:
    return Artifact(str(tmp_path / "root"), "priors", "0123456789abcdef")


GOOD_PRIOR = {"steps": 40, "resumed_from_step": 0, "epochs": 1, "metrics": {"loss": 1.5}, "model": "m.pt",
              "loss_curve": "l.png", "history": "h.json", "device": "cpu", "codes": "k", "level": 0,
              "level_name": "prior-top"}


def test_a_manifest_reads_back_typed_with_its_identity(artifact):
    write_json(artifact.path("manifest.json"), GOOD_PRIOR)
    manifest = artifact.read(PriorManifest)
    assert isinstance(manifest, PriorManifest) and manifest.level == 0 and manifest.metrics == {"loss": 1.5}
    assert (manifest.directory, manifest.key, manifest.url) == ("priors", artifact.key, artifact.url)


def test_a_missing_manifest_is_an_incomplete_artifact(artifact):
    assert artifact.read(PriorManifest) is None
    with pytest.raises(FileNotFoundError, match="run the `train-priors` stage"):
        artifact.require(PriorManifest, "train-priors")


@pytest.mark.parametrize("content, problem", [
    (b'{"steps": 40,', "not valid JSON"),
    (json.dumps({k: v for k, v in GOOD_PRIOR.items() if k != "level"}).encode(), "field `level`: Field required"),
    (json.dumps({**GOOD_PRIOR, "steps": "many"}).encode(), "field `steps`: Input should be a valid integer"),
    (json.dumps({**GOOD_PRIOR, "metrics": {"loss": "low"}}).encode(), "field `metrics.loss`: Input should be a valid number"),
    (b"[1, 2]", "expected a JSON object"),
])
def test_a_damaged_manifest_names_the_artifact_and_the_field(artifact, content, problem):
    write_bytes(artifact.path("manifest.json"), content)
    with pytest.raises(ManifestError) as error:
        artifact.read(PriorManifest)
    assert str(error.value).startswith(artifact.path("manifest.json") + ": ") and problem in str(error.value)


# --- the cached-unit decorator, against a real Prefect API ------------------------------------


def _counting_unit(calls: list[int]):
    def locate(index: int, root: str):
        return Artifact(root, "units", "k").unit_marker(f"unit-{index}", EncodedShard)

    @cached_unit(locate=locate, name="count-unit", retries=0)
    def unit(index: int, root: str) -> EncodedShard:
        calls.append(index)
        return EncodedShard(split="train", index=index, rows=10 * index, offset=0)

    return unit


def test_a_unit_is_cached_by_prefect_itself_and_recomputes_when_its_output_is_gone(prefect_api, tmp_path):
    from prefect import flow

    calls: list[int] = []
    unit, root = _counting_unit(calls), str(tmp_path / "root")

    @flow
    def twice() -> list:
        bound = with_records(unit, root, None)
        return [bound(3, root, return_state=True) for _ in range(2)]

    first, second = twice()
    assert (first.name, second.name) == ("Completed", "Cached") and calls == [3]
    assert second.result() == EncodedShard(split="train", index=3, rows=30, offset=0)
    marker = Artifact(root, "units", "k").unit_marker("unit-3", EncodedShard)
    assert exists(join(root, marker.record))  # Prefect's record, beside the artifact

    # The output is deleted: the stale record goes with it, and the unit runs again.
    os.remove(marker.url)
    again, cached = twice()
    assert (again.name, cached.name) == ("Completed", "Cached") and calls == [3, 3]

    # A damaged marker is not "done": recomputed, and overwritten with a good one.
    write_bytes(marker.url, b'{"split": "train"}')
    repaired, _ = twice()
    assert repaired.name == "Completed" and calls == [3, 3, 3]
    assert read_json(marker.url)["rows"] == 30


def test_a_finished_unit_without_a_record_does_no_work(prefect_api, tmp_path):
    from prefect import flow

    calls: list[int] = []
    unit, root = _counting_unit(calls), str(tmp_path / "root")
    marker = Artifact(root, "units", "k").unit_marker("unit-5", EncodedShard)
    write_json(marker.url, {"split": "test", "index": 5, "rows": 7, "offset": 3})  # e.g. a root from before records

    @flow
    def once():
        return with_records(unit, root, None)(5, root, return_state=True)

    state = once()
    assert state.is_completed() and calls == [] and state.result().rows == 7
    assert once().name == "Cached"


# --- the whole pipeline ----------------------------------------------------------------------

pipeline = pytest.mark.slow

@pipeline
def test_a_damaged_manifest_is_named_and_its_stage_recomputes(smoke_run, tmp_path):
    _, smoke_root, _ = smoke_run
    root = tmp_path / "root"
    shutil.copytree(smoke_root, root)
    config = smoke_config(str(root))
    finished = FinishedRun(config)
    prior = Path(finished.get(train_prior.STAGE, 1).url) / "manifest.json"
    samples = Path(finished.get(sample.STAGE).url) / "manifest.json"
    samples.write_text(samples.read_text()[:-20])
    with pytest.raises(ManifestError, match=rf"^{samples}: not valid JSON"):
        _ = FinishedRun(config).get(sample.STAGE)
    prior.write_text(json.dumps({k: v for k, v in json.loads(prior.read_text()).items() if k != "steps"}))
    with pytest.raises(ManifestError, match=rf"^{prior}: field `steps`: Field required"):
        _ = FinishedRun(config).every(train_prior.STAGE)

    from flows.pipeline import vqvae2_pipeline

    state = vqvae2_pipeline(**sections_of(config), return_state=True)
    assert state.is_completed(), state.message
    states = state_names(state.state_details.flow_run_id)
    # (An ingest plan is a pickle its worker keeps per root, never under the root: this
    # root, a copy, has it planned again.)
    recomputed = {name for name, s in states.items() if s != "Cached" and name != "plan-dataset"}
    assert recomputed == {"train-prior-bottom", "finalize-samples"}, states
    warned = log_lines(state.state_details.flow_run_id, "recomputing it", at_least=2)
    assert any(f"{prior}: field `steps`: Field required" in line for line in warned), warned
    assert any(f"{samples}: not valid JSON" in line for line in warned), warned
    repaired = FinishedRun(config)
    assert repaired.get(train_prior.STAGE, 1).steps == 40 and isinstance(repaired.get(sample.STAGE), SamplesManifest)
    assert state.result().metrics == smoke_run[2].result().metrics  # the report's inputs kept their keys


# --- checks only check --------------------------------------------------------------------------


def test_every_check_reads_and_writes_nothing_under_a_root(smoke_run):
    """Each stage's check, before the run (config alone) and with the dataset, on a finished
    root: it raises or passes; the root's files are as they were, byte for byte and by time."""
    from pipeline_helpers import snapshot
    from tasks.stages import INGEST, STAGES, check_stages, with_dataset_classes

    config, root, _ = smoke_run
    before = snapshot(root)
    finished = FinishedRun(config)
    dataset = finished.get(INGEST)
    checked = [stage.name for stage in STAGES if stage.check is not None]
    assert checked == ["train-classifiers", "train-autoencoder", "sample", "evaluate"]
    check_stages(config)
    check_stages(with_dataset_classes(config, dataset), dataset)
    refused = smoke_config(str(root), sample={"classes": ["Giraffe"]})
    with pytest.raises(ValueError, match="Giraffe"):
        check_stages(refused, dataset)
    assert snapshot(root) == before


def test_a_run_records_the_config_it_ran_with(smoke_run):
    """Resolved once: the record's config is the run's, its classes the dataset's."""
    from tasks.runs import finished_runs, recorded_config
    from tasks.stages import INGEST, with_dataset_classes

    config, root, state = smoke_run
    (record,) = [run.record for run in finished_runs(str(root)) if run.record.key == state.result().key]
    ran_with = with_dataset_classes(config, FinishedRun(config).get(INGEST))
    assert record.config == recorded_config(ran_with) and record.num_classes == ran_with.model.num_classes == 10
