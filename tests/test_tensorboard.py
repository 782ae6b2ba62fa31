"""TensorBoard event files of the trainings (`training.tensorboard`, tasks.machinery.tensorboard).

What a user relies on: `tensorboard --logdir {root}/tensorboard` shows each training's
history.json, step for step and value for value, with a picture per epoch; a resumed or
recovered training shows each step once; the root may be S3; the flag changes no key and
nothing a training computes, and without it nothing is written and nothing imported. A
training found done (Cached, or trained with the flag off) gets the same scalars in the same
folder from its history.json, once, and where it keeps none one line says so."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vqvae2
from ddp_jobs import BATCHES_PER_EPOCH, GLOBAL_BATCH, global_batch, tiny_autoencoder
from storage.fsutil import find, join, read_bytes, read_json
from tasks.config import TrainingRuntime
from tasks.machinery.artifacts import Artifact
from tasks.machinery.reporting import image_grid
from tasks.machinery.tensorboard import EPOCH, IMAGES, STEP, event_files, events_of_finished, run_url, write_history
from tasks.machinery.faults import InjectedFault
from tasks.machinery.trainer import Trainer, TrainingJob

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing import event_file_loader  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.compat.proto.event_pb2 import Event  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PICTURE_COLUMNS = 4


class Quiet:
    def log(self, message: str) -> None: ...
    def progress(self, done: int, total: int, note: str) -> None: ...
    def table(self, key: str, rows: list, description: str) -> None: ...


class NanAt:
    """The autoencoder's loss, made NaN at the given call (counting from 1): a loss spike."""

    def __init__(self, call: int) -> None:
        self.call, self.count = call, 0

    def __call__(self, model, batch):
        self.count += 1
        loss, metrics = vqvae2.autoencoder_loss(model, batch)
        if self.count == self.call:
            loss = loss * float("nan")
        return loss, {**metrics, "loss": loss}


def _batches(epoch: int, start: int):
    for index in range(start, BATCHES_PER_EPOCH):
        yield global_batch(epoch, index)


def _reconstructions(model: vqvae2.VQVAE2) -> dict[str, np.ndarray]:
    shown = global_batch(99, 0)[:PICTURE_COLUMNS]
    return {"reconstructions": image_grid(torch.cat([shown, model(shown).reconstruction.clamp(0, 1)]),
                                          columns=PICTURE_COLUMNS)}


def _run(root: str, steps: int = 9, storage_options: dict | None = None, loss_fn=vqvae2.autoencoder_loss, **options):
    """A tiny autoencoder trained in this process (6 batches an epoch, a checkpoint every 3 steps)."""
    vqvae2.seed_everything(0)
    run = TrainingRuntime(device="cpu", subprocess=False, **{"log_every": 1, "checkpoint_every": 3, "tensorboard": True,
                                                         **options})
    job = TrainingJob(name="tiny", model=tiny_autoencoder(), loss_fn=loss_fn,
                      artifact=Artifact(root, "tiny", "k", storage_options or {}),
                      train=vqvae2.TrainConfig(steps=steps, batch_size=GLOBAL_BATCH, lr=3e-3, warmup_steps=2),
                      batches=_batches, batches_per_epoch=BATCHES_PER_EPOCH, options=run, pictures=_reconstructions)
    return Trainer(job, Quiet()).run()


def _events(url: str, storage_options: dict | None = None) -> list:
    """Every event of a run folder with a summary, in the order TensorBoard reads them, read
    with TensorBoard's raw loader (nothing purged or converted: what is in the files)."""
    found = []
    with tempfile.TemporaryDirectory() as local:
        for index, file_url in enumerate(event_files(url, storage_options)):
            path = Path(local) / f"events.out.tfevents.{index}"  # the loader reads local paths
            path.write_bytes(read_bytes(file_url, storage_options))
            events = (Event.FromString(record) for record in event_file_loader.RawEventFileLoader(str(path)).Load())
            found += [e for e in events if e.HasField("summary")]
    return found


def _scalars(events: list) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for event in events:
        for value in event.summary.value:
            if value.HasField("simple_value"):
                series.setdefault(value.tag, []).append((event.step, value.simple_value))
    return series


def _expected(history: dict) -> dict[str, list[tuple[int, float]]]:
    """history.json as TensorBoard scalars: `train/<metric>` per logged step, `epoch/<metric>` per epoch."""
    series: dict[str, list[tuple[int, float]]] = {}
    for prefix, rows in ((STEP, history["steps"]), (EPOCH, history["epochs"])):
        for row in rows:
            for name, value in row.items():
                if name not in ("step", "epoch") and not isinstance(value, bool):
                    series.setdefault(prefix + name, []).append((row["step"], value))
    return series


def _assert_scalars_are_the_history(events: list, history: dict) -> None:
    found, expected = _scalars(events), _expected(history)
    assert found.keys() == expected.keys()
    for tag, points in expected.items():
        assert [step for step, _ in found[tag]] == [step for step, _ in points], tag
        # TensorBoard keeps float32 scalars.
        assert [v for _, v in found[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag


def test_the_event_files_hold_the_history_and_a_picture_per_epoch(tmp_path):
    summary = _run(str(tmp_path / "on"))
    history = read_json(summary.history)
    url = run_url(str(tmp_path / "on"), "tiny", "k")
    assert url == f"{tmp_path}/on/tensorboard/tiny-k"
    _assert_scalars_are_the_history(_events(url), history)
    assert history["epochs"][-1]["partial_epoch"]  # 9 steps: one whole epoch, then a partial one

    # TensorBoard's own loader, as `tensorboard --logdir` reads the folder.
    accumulator = EventAccumulator(url, size_guidance={"images": 0, "scalars": 0}).Reload()
    assert [s.step for s in accumulator.Scalars("train/loss")] == [row["step"] for row in history["steps"]]
    assert [s.value for s in accumulator.Scalars("epoch/train_loss")] == pytest.approx(
        [row["train_loss"] for row in history["epochs"]], rel=1e-6)
    images = accumulator.Images(f"{IMAGES}reconstructions")
    assert [i.step for i in images] == [row["step"] for row in history["epochs"]] == [6, 9]
    picture = Image.open(io.BytesIO(images[-1].encoded_image_string))
    assert picture.size == (images[-1].width, images[-1].height) == (4 * 17 + 1, 2 * 17 + 1)  # 16 px + 1 of padding

    # The flag changes how the run runs, not what it computes; off, nothing is written.
    off = _run(str(tmp_path / "off"), tensorboard=False)
    on_weights, off_weights = (torch.load(s.model, weights_only=True)["state_dict"] for s in (summary, off))
    assert all(torch.equal(on_weights[name], off_weights[name]) for name in on_weights)
    assert read_json(off.history) == history
    assert not (tmp_path / "off" / "tensorboard").exists()


def test_a_resumed_training_logs_each_step_once(tmp_path):
    root = str(tmp_path / "resumed")
    with pytest.raises(InjectedFault):  # after step 8: its last checkpoint is step 6's
        _run(root, fail_once_at_step={"tiny": 8})
    url = run_url(root, "tiny", "k")
    # The failed attempt published what it logged: steps 7 and 8 and the epoch that closed
    # at step 6 after its checkpoint, which the retry logs again.
    before = _scalars(_events(url))
    assert before["train/loss"][-1][0] == 8 and before["epoch/train_loss"] == [(6, pytest.approx(
        before["epoch/train_loss"][0][1]))]
    summary = _run(root)  # the retry
    assert summary.resumed_from_step == 6
    history = read_json(summary.history)
    events = _events(url)
    _assert_scalars_are_the_history(events, history)
    tagged_steps = [(v.tag, e.step) for e in events for v in e.summary.value]
    assert len(tagged_steps) == len(set(tagged_steps))
    # Two files, named after the step each attempt went on from: TensorBoard reads them in training order.
    names = [f.rsplit("/", 1)[-1] for f in event_files(url)]
    assert [name.split(".")[3] for name in names] == ["000000000000", "000000000006"]
    # ... and the same history as an uninterrupted training.
    uninterrupted = read_json(_run(str(tmp_path / "uninterrupted")).history)
    assert _expected(history) == pytest.approx(_expected(uninterrupted))


def test_a_recovered_divergence_logs_each_step_once(tmp_path):
    # The NaN of step 5 sends the training back to step 3's checkpoint: step 4 is logged again.
    summary = _run(str(tmp_path), loss_fn=NanAt(5), steps=6)
    assert summary.recoveries
    events = _events(run_url(str(tmp_path), "tiny", "k"))
    _assert_scalars_are_the_history(events, read_json(summary.history))
    assert [step for step, _ in _scalars(events)["train/loss"]] == [1, 2, 3, 4, 5, 6]


def test_the_events_reach_an_s3_root_whole(s3_bucket):
    root, options = f"{s3_bucket.url}/root", s3_bucket.storage_options
    summary = _run(root, steps=4, storage_options=options)
    url = run_url(root, "tiny", "k")
    assert list(find(url, options)) == [f.rsplit("/", 1)[-1] for f in event_files(url, options)]  # nothing else
    history = json.loads(read_bytes(summary.history, options))
    _assert_scalars_are_the_history(_events(url, options), history)
    assert url.startswith("s3://") and summary.history == join(root, "tiny", "k", "history.json")


def test_a_finished_training_gets_the_scalars_a_live_one_writes_once_after_the_fact(tmp_path):
    live = _run(str(tmp_path / "live"))
    off = _run(str(tmp_path / "off"), tensorboard=False)
    history = read_json(off.history)
    assert history == read_json(live.history) and not (tmp_path / "off" / "tensorboard").exists()
    url, live_url = (run_url(str(tmp_path / name), "tiny", "k") for name in ("off", "live"))

    said = write_history(url, off.history)
    assert said == (f"TensorBoard events of its 9 logged steps and 2 epochs written to {url} from its history.json "
                    "(scalars only: the pictures are drawn as it trains)")
    # The folder a live training writes, its scalars value for value: all but the pictures.
    assert url.removeprefix(str(tmp_path / "off")) == live_url.removeprefix(str(tmp_path / "live"))
    events = _events(url)
    _assert_scalars_are_the_history(events, history)
    assert _scalars(events) == _scalars(_events(live_url))
    accumulator = EventAccumulator(url, size_guidance={"scalars": 0}).Reload()
    assert [(s.step, s.value) for s in accumulator.Scalars("epoch/train_loss")] == [
        (row["step"], pytest.approx(row["train_loss"], rel=1e-6)) for row in history["epochs"]]
    assert accumulator.Tags()["images"] == []

    # Once: a second run with the flag finds them there, as it finds a live training's.
    files = {f: read_bytes(f) for f in event_files(url)}
    assert [f.rsplit("/", 1)[-1] for f in files] == ["events.out.tfevents.000000000001.history"]
    assert write_history(url, off.history) == f"TensorBoard events of its 9 logged steps and 2 epochs at {url}"
    assert {f: read_bytes(f) for f in event_files(url)} == files
    live_files = {f: read_bytes(f) for f in event_files(live_url)}
    assert write_history(live_url, live.history).endswith(f" at {live_url}")
    assert {f: read_bytes(f) for f in event_files(live_url)} == live_files


def test_what_a_failed_live_attempt_left_is_completed_with_each_step_once(tmp_path):
    root = str(tmp_path)
    with pytest.raises(InjectedFault):  # after step 8, with the flag: its events reach step 8
        _run(root, fail_once_at_step={"tiny": 8})
    summary = _run(root, tensorboard=False)  # the retry, without: steps 7 to 9 are in history.json only
    assert summary.resumed_from_step == 6
    url, history = run_url(root, "tiny", "k"), read_json(summary.history)
    assert write_history(url, summary.history) == (
        f"TensorBoard events of 1 logged step and 1 epoch of its 9 logged steps and 2 epochs (the rest were there) "
        f"written to {url} from its history.json (scalars only: the pictures are drawn as it trains)")
    events = _events(url)
    _assert_scalars_are_the_history(events, history)  # in training order, as TensorBoard reads the files
    tagged_steps = [(v.tag, e.step) for e in events for v in e.summary.value]
    assert len(tagged_steps) == len(set(tagged_steps))
    # Named after its first row's step: it sorts after the live attempt's file, which went on from step 0.
    names = [f.rsplit("/", 1)[-1] for f in event_files(url)]
    assert len(names) == 2 and names[0].startswith("events.out.tfevents.000000000000.")
    assert names[1] == "events.out.tfevents.000000000009.history"


@pytest.mark.parametrize("history", [None, b"[]"], ids=["none", "not a history"])
def test_a_training_without_a_history_gets_one_line_saying_why_and_no_events(history, tmp_path, caplog):
    from tasks.config import Runtime, pipeline_config
    from tasks.stages.train_autoencoder import AutoencoderManifest

    root = str(tmp_path / "root")
    artifact = Artifact(root, "autoencoder", "0123456789abcdef")
    if history is not None:
        (tmp_path / "root" / "autoencoder" / artifact.key).mkdir(parents=True)
        Path(artifact.path("history.json")).write_bytes(history)
    manifest = AutoencoderManifest(
        **artifact.identity(), steps=40, resumed_from_step=0, epochs=1, metrics={}, model=artifact.path("model.pt"),
        loss_curve=artifact.path("loss_curve.png"), history=artifact.path("history.json"), device="cpu", dataset="d",
        latent_shapes=[(4, 4), (8, 8)], codebook_size=16)
    url = run_url(root, "autoencoder", artifact.key)
    for flag in (False, True):
        runtime = Runtime.of(pipeline_config("smoke", storage={"root": root}, training={"tensorboard": flag}))
        with caplog.at_level("INFO", logger="vqvae2"):
            events_of_finished(manifest, runtime)
    why = ("its artifact keeps no history.json to write them from (made by an older version of vqvae2)"
           if history is None else
           f"{artifact.path('history.json')} is not a training's history (TypeError: list indices must be integers "
           "or slices, not str)")
    said = [r.getMessage() for r in caplog.records if r.name == "vqvae2"]
    assert said == [f"autoencoder: no TensorBoard events written to {url}: {why}"]  # with the flag only
    assert not (tmp_path / "root" / "tensorboard").exists()


def test_the_flag_is_no_part_of_any_key():
    from tasks.config import config_key, pipeline_config
    from tasks.stages import stage_keys

    off, on = (pipeline_config("smoke", storage={"root": "/r"}, training={"tensorboard": flag}) for flag in (False, True))
    assert config_key(on) == config_key(off)
    digest = "sha256:" + "0" * 64
    assert stage_keys(on, digest) == stage_keys(off, digest)


def test_tensorboard_is_imported_only_when_on(tmp_path):
    # A fresh interpreter: this one may have imported it already.
    script = f"""
import sys
sys.path.insert(0, {str(REPO / 'tests')!r})
import flows.cli
from ddp_jobs import autoencoder_job
from tasks.config import TrainingRuntime
from tasks.machinery.process import SilentReporter
from tasks.machinery.trainer import Trainer
options = TrainingRuntime(device="cpu", subprocess=False, log_every=1, tensorboard=False)
Trainer(autoencoder_job({str(tmp_path)!r}, 2, options), SilentReporter()).run()
assert "tensorboard" not in sys.modules, "tensorboard imported with training.tensorboard off"
"""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_the_stages_show_reconstructions_and_prior_samples(smoke_run, tmp_path):
    """The stages' own jobs, two steps each, on the smoke run's data and codes."""
    from pipeline_helpers import smoke_config
    from tasks.config import Runtime
    from tasks.stages import FinishedRun, encode, ingest
    from tasks.stages.train_autoencoder import AutoencoderSettings, autoencoder_job
    from tasks.stages.train_prior import PICTURES, PriorSettings, prior_job

    config, root, _ = smoke_run
    finished = FinishedRun(config)

    def train(settings, make_job, manifest, flag: bool, name: str):
        runtime = Runtime.of(smoke_config(str(root), training={"tensorboard": flag, "device": "cpu"}))
        job = make_job(settings, runtime, manifest, Artifact(str(tmp_path / name), "stage", "k"))
        job.evaluate = None  # held-out metrics: most of the time, and not what this test is about
        return job, Trainer(job, Quiet()).run()

    settings = AutoencoderSettings.of(config)
    settings = settings.model_copy(update={"train": vqvae2.apply_overrides(settings.train, {"steps": 2})})
    job, summary = train(settings, autoencoder_job, finished.get(ingest.STAGE), True, "autoencoder")
    images = EventAccumulator(run_url(str(tmp_path / "autoencoder"), "autoencoder", "k")).Reload().Images(
        f"{IMAGES}reconstructions")
    size = config.model.image_size
    assert [(i.step, i.width, i.height) for i in images] == [(2, 8 * (size + 1) + 1, 2 * (size + 1) + 1)]

    level = config.model.levels - 1  # conditioned on the level above
    prior = PriorSettings.of(config, level)
    prior = prior.model_copy(update={"train": vqvae2.apply_overrides(prior.train, {"steps": 2})})
    job, on = train(prior, prior_job, finished.get(encode.STAGE), True, "prior-on")
    url = run_url(str(tmp_path / "prior-on"), job.name, "k")
    images = EventAccumulator(url).Reload().Images(f"{IMAGES}samples")
    height, width = finished.get(encode.STAGE).level_shapes[level]
    assert [(i.step, i.width, i.height) for i in images] == [(2, PICTURES * (width + 1) + 1, 2 * (height + 1) + 1)]
    # Sampling draws from a generator of its own: the same training without TensorBoard.
    _, off = train(prior, prior_job, finished.get(encode.STAGE), False, "prior-off")
    on_weights, off_weights = (torch.load(s.model, weights_only=True)["state_dict"] for s in (on, off))
    assert all(torch.equal(on_weights[name], off_weights[name]) for name in on_weights)


@pytest.mark.slow
def test_cached_trainings_get_their_events_from_their_history_once(smoke_run, tmp_path):
    """`--set training.tensorboard=true` on a root whose trainings are done: the stage flow is
    all Cached and each training's folder gets its history's scalars, once, said in one line."""
    import shutil

    from flows.parameters import sections_of
    from flows.pipeline import STAGE_FLOWS
    from pipeline_helpers import log_lines, smoke_config, snapshot, state_names

    _, smoke_root, _ = smoke_run
    root = tmp_path / "root"
    shutil.copytree(smoke_root, root)
    assert not (root / "tensorboard").exists()  # the smoke run trained without the flag
    config = smoke_config(str(root), training={"tensorboard": True})
    said, written = [], []
    for _ in range(2):
        state = STAGE_FLOWS["train-priors"](**sections_of(config), return_state=True)
        assert state.is_completed(), state.message
        states = state_names(state.state_details.flow_run_id)
        assert states and set(states.values()) == {"Cached"}, states
        said.append(sorted(log_lines(state.state_details.flow_run_id, "TensorBoard events", at_least=2)))
        written.append(snapshot(root / "tensorboard"))
    priors = state.result()
    urls = [run_url(str(root), prior.level_name, prior.key) for prior in priors]
    for prior, url in zip(priors, urls):
        _assert_scalars_are_the_history(_events(url), read_json(prior.history))

    def rows(history: dict) -> str:
        steps, epochs = len(history["steps"]), len(history["epochs"])
        return f"{steps} logged step{'s' * (steps != 1)} and {epochs} epoch{'s' * (epochs != 1)}"

    counts = [f"{p.level_name}: TensorBoard events of its {rows(read_json(p.history))}" for p in priors]
    assert said[0] == sorted(f"{c} written to {u} from its history.json (scalars only: the pictures are drawn as it "
                             "trains)" for c, u in zip(counts, urls))
    assert said[1] == sorted(f"{c} at {u}" for c, u in zip(counts, urls))  # the second time: nothing written
    assert written[1] == written[0]
