"""Data-parallel training through torchrun, on CPU with gloo: two processes sharing each
global batch train like one process on the whole batch, hold identical codebooks, and a
run whose rank was killed resumes exactly."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from storage.checkpoints import load_checkpoint
from tasks.config import TrainingRun
from tasks.runtime.process import TrainingFailed, train
from ddp_jobs import autoencoder_job

TESTS = Path(__file__).resolve().parent
OPTIONS = TrainingRun(device="cpu", log_every=1, checkpoint_every=4, cpu_threads=1)


@pytest.fixture(autouse=True)
def importable_jobs(monkeypatch):
    """The training processes import the job maker from this folder."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))


def _train(root: Path, processes: int, steps: int = 10, options: TrainingRun = OPTIONS):
    root.mkdir(parents=True, exist_ok=True)
    return train(autoencoder_job, str(root), steps, options, title="tiny", options=options, processes=processes)


def _losses(root: Path) -> list[float]:
    history = json.loads((root / "tiny" / "k" / "history.json").read_text())
    return [row["loss"] for row in history["steps"]]


def test_two_processes_train_like_one_on_the_same_global_batches(tmp_path):
    one, two = _train(tmp_path / "one", 1), _train(tmp_path / "two", 2)
    assert (one.steps, two.steps, one.processes, two.processes) == (10, 10, 1, 2)
    # Gradients averaged over two halves equal the whole batch's, up to float summation order.
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-4, abs=1e-6)
    a, b = load_checkpoint(one.model)["state_dict"], load_checkpoint(two.model)["state_dict"]
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-5, msg=name)
    # Every rank holds the same codebooks (the quantizers all-reduce their statistics).
    rank0 = torch.load(tmp_path / "two" / "buffers-rank0-of-2.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "two" / "buffers-rank1-of-2.pt", weights_only=True)
    assert any("embed" in name for name in rank0)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name


def test_a_run_whose_rank_was_killed_resumes_exactly(tmp_path):
    faulty = OPTIONS.model_copy(update={"fail_once_at_step": {"tiny-autoencoder": 6}})
    with pytest.raises(TrainingFailed, match=r"(?s)rank 1:.*fault injected at step 6"):
        _train(tmp_path / "faulty", 2, options=faulty)
    resumed = _train(tmp_path / "faulty", 2, options=faulty)  # what Prefect's retry does
    assert resumed.resumed_from_step == 4 and resumed.steps == 10
    clean = _train(tmp_path / "clean", 2)
    a, b = load_checkpoint(resumed.model)["state_dict"], load_checkpoint(clean.model)["state_dict"]
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert _losses(tmp_path / "faulty") == _losses(tmp_path / "clean")


def test_a_global_batch_the_ranks_cannot_share_is_refused(tmp_path):
    with pytest.raises(TrainingFailed, match="batch_size 8 cannot be shared equally by 3 training processes"):
        _train(tmp_path / "three", 3)


@pytest.mark.slow
def test_the_pipeline_trains_the_autoencoder_on_two_ranks(smoke_run):
    from flows.pipeline import STAGE_FLOWS
    from pipeline_helpers import smoke_config
    from tasks.stages import FinishedRun

    single, root, _ = smoke_run
    config = smoke_config(str(root), training={"processes": 2})
    trained = STAGE_FLOWS["train-autoencoder"](config)
    assert trained.processes == 2 and trained.steps == 40
    one_process = FinishedRun(single).autoencoder
    assert one_process.processes == 1 and trained.key != one_process.key  # the ranks split the data: another artifact
    assert 0 < trained.metrics["val_mse"] < 0.1
