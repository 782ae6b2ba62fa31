"""Data-parallel training through torchrun, on CPU with gloo: two processes sharing each
global batch train like one process on the whole batch, hold identical codebooks, and a
run whose rank was killed resumes exactly."""
from __future__ import annotations

import json
import os

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flows.parameters import sections_of
from storage.checkpoints import load_checkpoint
from tasks.config import TrainingRuntime
from tasks.machinery.process import TrainingFailed, train
from tasks.stages import train_autoencoder
from ddp_jobs import autoencoder_job
from local_servers import free_port

TESTS = Path(__file__).resolve().parent
OPTIONS = TrainingRuntime(device="cpu", log_every=1, checkpoint_every=4, cpu_threads=1)


@pytest.fixture(autouse=True)
def importable_jobs(monkeypatch):
    """The training processes import the job maker from this folder."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))


def _train(root: Path, processes: int, steps: int = 10, options: TrainingRuntime = OPTIONS):
    root.mkdir(parents=True, exist_ok=True)
    return train(autoencoder_job, str(root), steps, options, title="tiny", options=options, processes=processes)


def _losses(root: Path) -> list[float]:
    history = json.loads((root / "tiny" / "k" / "history.json").read_text())
    return [row["loss"] for row in history["steps"]]


@pytest.mark.slow  # trains in torchrun processes
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


@pytest.mark.slow  # trains in torchrun processes
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


@pytest.mark.slow  # trains in torchrun processes
def test_two_machines_train_like_one_process(tmp_path):
    # Two nodes of one process each, both on this machine: node 0 is the task's, node 1 is
    # what `vqvae2 node` runs on another machine. The job reaches node 1 through rank 0.
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = OPTIONS.model_copy(update={"nnodes": 2, "rdzv_endpoint": endpoint})
    other = subprocess.Popen([sys.executable, "-m", "flows.cli", "node", "--rdzv-endpoint", endpoint, "--nnodes", "2",
                              "--node-rank", "1", "--once"], cwd=TESTS.parent, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        two = _train(tmp_path / "nodes", 2, options=nodes)
        assert other.wait(timeout=120) == 0, other.stdout.read()
    finally:
        other.kill()
    one = _train(tmp_path / "one", 1)
    assert (two.steps, two.processes, one.steps, one.processes) == (10, 2, 10, 1)
    assert _losses(tmp_path / "nodes") == pytest.approx(_losses(tmp_path / "one"), rel=1e-4, abs=1e-6)
    rank0 = torch.load(tmp_path / "nodes" / "buffers-rank0-of-2.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "nodes" / "buffers-rank1-of-2.pt", weights_only=True)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name


def test_a_run_on_several_machines_needs_a_rendezvous_endpoint():
    with pytest.raises(ValueError, match="set training.rdzv_endpoint"):
        TrainingRuntime(nnodes=2)
    with pytest.raises(ValueError, match="must be host:port"):
        TrainingRuntime(nnodes=2, rdzv_endpoint="node0")


@pytest.mark.slow  # trains in torchrun processes
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
    trained = STAGE_FLOWS["train-autoencoder"](**sections_of(config))
    assert trained.processes == 2 and trained.steps == 40
    one_process = FinishedRun(single).get(train_autoencoder.STAGE)
    assert one_process.processes == 1 and trained.key != one_process.key  # the ranks split the data: another artifact
    assert 0 < trained.metrics["val_mse"] < 0.1
