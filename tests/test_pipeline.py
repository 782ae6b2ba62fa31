"""The pipeline end to end on real Fashion-MNIST images, against a real Prefect API."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from flows.parameters import sections_of
from flows.pipeline import STAGE_FLOWS, vqvae2_pipeline
from storage.checkpoints import load_checkpoint
from tasks.fidelity import InceptionWeightsMissing
from tasks.config import config_key
from tasks.stages import FinishedRun, evaluate, sample, train_prior
from tasks.stages.ingest import with_dataset_classes
from pipeline_helpers import artifacts, smoke_config, snapshot, state_names, task_runs

pytestmark = pytest.mark.slow
ingest_flow, train_autoencoder_flow = STAGE_FLOWS["ingest"], STAGE_FLOWS["train-autoencoder"]


def test_the_full_pipeline_writes_every_artifact_and_a_finite_report(smoke_run):
    config, root, state = smoke_run
    report = state.result()
    assert all(math.isfinite(v) for v in report.metrics.values())
    metrics = report.metrics
    assert metrics["codes_used_top"] > 1 and metrics["codes_used_bottom"] > 1
    assert 0 < metrics["recon_mse"] < 0.1
    # Every stage left a complete artifact under the root.
    for stage in ("datasets", "autoencoder", "codes", "priors", "classifiers", "samples", "reports"):
        complete = [d for d in (root / stage).iterdir() if (d / "manifest.json").exists()]
        assert complete, f"no complete {stage} artifact"
    report_dir = Path(report.url)
    for name in ("report.json", "report.md", "samples.png", "reconstructions.png", "loss-autoencoder.png",
                 "loss-prior-top.png", "loss-prior-bottom.png"):
        assert (report_dir / name).stat().st_size > 0, name
    written = json.loads((report_dir / "report.json").read_text())
    assert written["metrics"] == metrics and written["preset"] == "smoke"
    assert (report_dir / "report.md").read_text().count("![") >= 9
    # Sample quality in one stated feature space, with the reference points and the rejection curve.
    fidelity = written["fidelity"]
    assert fidelity["extractor"]["kind"] == "domain" and "Not comparable" in fidelity["extractor"]["description"]
    rows = {row["set"]: row for row in fidelity["rows"]}
    assert set(rows) == {"real train images (floor)", "reconstructions", "samples, no rejection",
                         "samples, acceptance rate 0.5", "samples, acceptance rate 0.25", "samples, acceptance rate 0.1"}
    for row in rows.values():
        assert row["fid"] >= 0 and 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
    assert rows["real train images (floor)"]["fid"] < rows["samples, no rejection"]["fid"]
    assert (report_dir / "rejection-tradeoff.png").stat().st_size > 0 and (report_dir / "rejection.png").exists()
    assert "## Sample quality" in (report_dir / "report.md").read_text()
    # Per class drawn, its samples' FID against its held-out images; 16 samples over 10 classes
    # are too few for any: every class is listed, with its counts, and marked.
    per_class = written["per_class"]
    assert [(row["class"], row["name"]) for row in per_class][:2] == [(0, "T-shirt/top"), (1, "Trouser")]
    assert len(per_class) == 10 and sum(row["samples"] for row in per_class) == 16
    assert all(row["fid"] is None and row["reference"] > 0 for row in per_class)
    assert "### Per class" in (report_dir / "report.md").read_text()
    assert "too few images (under 10)" in (report_dir / "report.md").read_text()
    runs = state_names(state.state_details.flow_run_id)
    assert set(runs.values()) == {"Completed"}
    # Each task run is named for what it does: no hash suffix, a prior by its level's name.
    assert {"plan-dataset", "finalize-dataset", "train-autoencoder", "train-prior-top", "train-prior-bottom",
            "train-classifier-judge", "train-classifier-features", "finalize-samples", "evaluate"} <= set(runs)


def test_rejection_keeps_the_same_number_per_rate_and_the_judges_favourites(smoke_run):
    config, _, state = smoke_run
    samples = FinishedRun(config).get(sample.STAGE)
    kept = {row.rate: row for row in samples.rates}
    assert sorted(kept) == [0.1, 0.25, 0.5, 1.0]
    # 16 requested over 10 classes: exactly 16 at every rate (2 for each of the first 6 classes,
    # 1 for the other 4), drawn from k / r candidates per class keeping k.
    assert {row.kept for row in kept.values()} == {16} and samples.num_samples == 16
    assert [kept[r].candidates for r in (1.0, 0.5, 0.25, 0.1)] == [16, 32, 64, 160]
    for rate in (0.5, 0.25, 0.1):
        assert kept[rate].judge_confidence_kept > kept[rate].judge_confidence_rejected


def test_the_ui_gets_progress_tables_and_a_report_with_images(smoke_run):
    config, root, state = smoke_run
    found = artifacts(state.state_details.flow_run_id)
    by_type: dict[str, list] = {}
    for artifact in found:
        by_type.setdefault(artifact.type, []).append(artifact)
    # One progress bar per training (5) and per mapped stage (ingest, encode, sample), each at 100%.
    assert len(by_type["progress"]) == 8
    assert all(float(a.data) == 100.0 for a in by_type["progress"])
    # Keys carry the config's short key (the one its runs take turns on): its own history in the UI;
    # the report's, the key of its folder under the root.
    short, report_key = config_key(config), state.result().key
    tables = {a.key: a for a in by_type["table"]}
    assert set(tables) == {f"trainings-{short}", f"dataset-{short}", f"vqvae2-fidelity-{report_key}"}
    # Every training's epochs in one table, updated in place: one card, whatever the epochs.
    trainings = json.loads(tables[f"trainings-{short}"].data)
    assert {row["part"] for row in trainings} == {"autoencoder", "prior-top", "prior-bottom", "classifier-judge",
                                                  "classifier-features"}
    assert all({"epoch", "step", "train_loss"} <= set(row) for row in trainings), trainings
    report = next(a for a in by_type["markdown"] if a.key == f"vqvae2-report-{report_key}")
    assert len(found) <= 12  # a tab a person can read
    assert report.data.count("data:image/png;base64,") >= 9  # grids, trade-off plot and loss curves, inline
    assert report.data.count(f", full size: `{root}/reports/") >= 9  # each with where its full image is
    assert "file://" not in report.data  # no link that is dead in a browser on another machine


def test_a_second_run_is_all_cached_and_rewrites_nothing(smoke_run, monkeypatch):
    import storage.ingest
    import tasks.stages.encode

    config, root, first = smoke_run
    before = snapshot(root)
    # A finished dataset and finished codes are trusted whole: no shard or chunk is read back.
    checks = []
    monkeypatch.setattr(storage.ingest, "sha256_file", lambda *a, **k: checks.append(a) or "")
    monkeypatch.setattr(tasks.stages.encode, "codes_damage", lambda *a, **k: checks.append(a))
    state = vqvae2_pipeline(**sections_of(config), return_state=True)
    assert checks == []
    assert state.is_completed()
    states = state_names(state.state_details.flow_run_id)
    assert states and set(states.values()) == {"Cached"}, states
    assert snapshot(root) == before
    assert state.result().metrics == first.result().metrics
    # Its own Artifacts tab still shows the results: the flow publishes the report on every run.
    report = [a for a in artifacts(state.state_details.flow_run_id) if a.key == f"vqvae2-report-{first.result().key}"]
    assert len(report) == 1 and report[0].data.count("data:image/png;base64,") >= 9


def test_a_finished_run_is_found_again_from_its_config(smoke_run):
    config, root, state = smoke_run
    finished = FinishedRun(config)
    assert finished.get(evaluate.STAGE).key == state.result().key
    assert [p.level for p in finished.every(train_prior.STAGE)] == [0, 1]


def test_a_training_that_fails_midway_is_retried_and_resumes_from_its_checkpoint(prefect_api, tmp_path):
    faulty = smoke_config(str(tmp_path / "faulty"),
                          training={"checkpoint_every": 10, "fail_once_at_step": {"autoencoder": 25}})
    ingest_flow(**sections_of(faulty))
    state = train_autoencoder_flow(**sections_of(faulty), return_state=True)
    assert state.is_completed()
    resumed = state.result()
    assert resumed.resumed_from_step == 20 and resumed.steps == 40
    (run,) = [r for name, r in task_runs(state.state_details.flow_run_id).items() if name.startswith("train-autoencoder")]
    assert run.run_count == 2  # the first attempt failed at step 25, the retry finished

    clean = smoke_config(str(tmp_path / "clean"), training={"checkpoint_every": 10})
    ingest_flow(**sections_of(clean))
    uninterrupted = train_autoencoder_flow(**sections_of(clean))
    assert uninterrupted.resumed_from_step == 0
    a = load_checkpoint(resumed.model)["state_dict"]
    b = load_checkpoint(uninterrupted.model)["state_dict"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), atol=1e-6), name


def test_a_grown_source_encodes_only_its_new_images_and_recomputes_downstream(prefect_api, tmp_path, monkeypatch,
                                                                              fashion_mnist_test_split):
    from PIL import Image

    import storage.ingest

    encoded = []
    encode = storage.ingest.prepare
    monkeypatch.setattr(storage.ingest, "prepare", lambda data, *args: encoded.append(1) or encode(data, *args))

    images, labels = fashion_mnist_test_split
    folder = tmp_path / "folder"

    def add_images(start: int, stop: int) -> None:
        for i in range(start, stop):
            target = folder / f"class{labels[i]}" / f"img{i:05d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(target)

    add_images(0, 300)
    config = smoke_config(str(tmp_path / "root"), source={"kind": "image-folder", "url": str(folder)},
                          ingest={"holdout_fraction": 0.2, "shard_size": 100})
    first = ingest_flow(**sections_of(config))
    assert len(encoded) == 300 and first.carried == 0 and first.base is None
    first_ae = train_autoencoder_flow(**sections_of(config))
    again = ingest_flow(**sections_of(config), return_state=True)
    assert again.result().key == first.key
    assert set(state_names(again.state_details.flow_run_id).values()) == {"Cached"}

    encoded.clear()
    add_images(300, 330)  # 10% more
    grown = ingest_flow(**sections_of(config))
    assert grown.key != first.key and grown.num_samples == 330
    assert len(encoded) == 30  # the old images' shards were copied, not decoded and encoded again
    assert grown.carried == 300 and grown.base == first.url
    first_shards = {s.name: s.num_samples for split in first.splits.values() for s in split.shards}
    grown_shards = {s.name: s.num_samples for split in grown.splits.values() for s in split.shards}
    assert {name: grown_shards[name] for name in first_shards} == first_shards
    for name in first_shards:  # byte for byte what the first ingest wrote
        assert (Path(grown.url) / name).read_bytes() == (Path(first.url) / name).read_bytes()
    state = train_autoencoder_flow(**sections_of(config), return_state=True)
    second_ae = state.result()
    assert second_ae.key != first_ae.key and second_ae.dataset == grown.key
    assert {s for n, s in state_names(state.state_details.flow_run_id).items() if n.startswith("train")} == {"Completed"}


def test_a_stage_without_its_inputs_names_the_stage_to_run(prefect_api, tmp_path):
    config = smoke_config(str(tmp_path / "empty"))
    state = train_autoencoder_flow(**sections_of(config), return_state=True)
    assert state.is_failed()
    with pytest.raises(FileNotFoundError, match="run the `ingest` stage"):
        state.result()


def test_a_dataset_of_other_classes_than_the_model_fails_after_ingest_before_any_training(
        prefect_api, tmp_path, fashion_mnist_test_split):
    from PIL import Image

    images, labels = fashion_mnist_test_split
    folder = tmp_path / "three-classes"
    for i in range(90):
        target = folder / f"class{labels[i] % 3}" / f"img{i:05d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(target)
    root = tmp_path / "root"
    source = {"kind": "image-folder", "url": str(folder)}
    config = smoke_config(str(root), source=source, overrides={"num_classes": 10})  # a number: fixed
    state = vqvae2_pipeline(**sections_of(config), return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match=r"the dataset has 3 classes \(class0, class1, class2\) but the model has "
                                         r"num_classes=10 .*set the override num_classes to 3 or auto"):
        state.result()
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["datasets"]  # no training began
    # What the message says to do passes the check, and so does leaving num_classes unset (the
    # default: the dataset's classes, as the smoke preset has another number).
    for overrides in ({"num_classes": 3}, {"num_classes": "auto"}, {}):
        fixed = smoke_config(str(root), source=source, overrides=overrides)
        assert with_dataset_classes(fixed, ingest_flow(**sections_of(fixed))).model.num_classes == 3


@pytest.mark.parametrize("overrides, evaluate, error, message", [
    ({"num_classes": 0}, {"features": "domain"}, ValueError,
     r"evaluate.features is 'domain', but the model is unconditional \(num_classes=0\)"),
    ({"num_classes": 0}, {"features": "inception"}, InceptionWeightsMissing,
     r"features='inception' needs .* Or use features='self-supervised' or 'auto'"),
    ({}, {"features": "inception"}, InceptionWeightsMissing,
     r"features='inception' needs torch-fidelity's Inception-v3 weights .* which are not on this machine"),
    ({}, {"inception_weights": "/nowhere/inception.pth"}, InceptionWeightsMissing,
     r"evaluate.inception_weights is '/nowhere/inception.pth', which does not exist"),
])
def test_a_run_that_could_not_be_evaluated_fails_before_anything_runs(prefect_api, tmp_path, overrides, evaluate,
                                                                        error, message):
    root = tmp_path / "root"
    config = smoke_config(str(root), overrides=overrides, evaluate=evaluate)  # no Inception weights in the tests
    state = vqvae2_pipeline(**sections_of(config), return_state=True)
    assert state.is_failed()
    with pytest.raises(error, match=message):
        state.result()
    assert not root.exists()  # nothing ingested, nothing trained


def test_ingest_removes_stale_incomplete_datasets_but_resumes_its_own(prefect_api, tmp_path):
    import os
    import time

    root = tmp_path / "root"
    config = smoke_config(str(root))
    first = ingest_flow(**sections_of(config))
    datasets = root / "datasets"
    (datasets / first.key / "manifest.json").unlink()  # this dataset's ingest "crashed" a week ago...
    abandoned = datasets / "0123456789abcdef"  # ...and so did one of a source that has changed since
    (abandoned / "train").mkdir(parents=True)
    (abandoned / "train" / "shard-000000.tar").write_bytes(b"half a shard")
    recent = datasets / "fedcba9876543210"  # a third is being written right now
    (recent / "train").mkdir(parents=True)
    (recent / "train" / "shard-000000.json").write_bytes(b"{}")
    week_ago = time.time() - 7 * 24 * 3600
    for path in [*abandoned.rglob("*"), *(datasets / first.key).rglob("*")]:
        os.utime(path, (week_ago, week_ago))
    again = ingest_flow(**sections_of(config))
    assert again.key == first.key and again.num_samples == first.num_samples
    assert not abandoned.exists() and recent.exists()
    shards = [t for t in (datasets / first.key).rglob("*.tar")]
    assert shards and all(t.stat().st_mtime < week_ago + 1 for t in shards)  # its own shards reused, not rewritten
