"""How the GPU check judges its goals (benchmarks/gpu_goals.py) from what a run on a GPU
leaves, which no CPU run can make: here written by hand, as gpu_check.sh's steps write it.
And the estimate that decides whether the GPU preset's pipeline fits one device call."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import vqvae2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_estimate  # noqa: E402
import gpu_goals  # noqa: E402

SAMPLING = """seconds per batch of imagenet-256 code grids (32x32 + 64x64), paper widths (...) on cuda
batch  reference s  cached s  graphed s  graphed bf16 s  graphed vs cached  vs reference  graphed codes = cached codes
   16       1543.2     31.07      11.90            2.31               2.6x           130x  yes
  128      12001.0       OOM       9.80            4.60                  -          1225x  -
"""


def a_gpu_run(folder: Path, *, pipeline: str = "ok", fid: float = 4.1, extractor: str = "domain") -> Path:
    """The work folder of a whole check on a GPU, every step having run."""
    folder.mkdir()
    (folder / "steps").write_text(
        "setup                      ok              21 s\n"
        "cuda_tests                 ok              35 s\n"
        f"pipeline                   {pipeline:<15} 402 s\n"
        "sampling                   ok              58 s\n")
    (folder / "cuda_tests").write_text("5 passed, 698 deselected in 30.12s\n")
    (folder / "estimate.json").write_text(json.dumps({"total": 467.2, "stages": {}}))
    if pipeline == "ok":
        (folder / "pipeline.json").write_text(json.dumps({"wall_s": 402, "fid": fid, "extractor": extractor}))
    (folder / "sampling").write_text(SAMPLING)
    (folder / "install").write_text("installed 99 wheels in 23.4 s\n")
    return folder


def verdicts(work: Path, **options) -> dict[str, str]:
    options = {"dry": False, "chosen": "", "pipeline_limit": 470} | options
    return dict(gpu_goals.goals(gpu_goals.Work(work, **options), work))


def test_a_gpu_run_is_judged_goal_by_goal_on_its_figures(tmp_path):
    assert verdicts(a_gpu_run(tmp_path / "work")) == {
        "CUDA tests pass": "met (5 passed)",
        "pipeline estimate on an H100 <= 480 s (one device call)": "met (467 s)",
        "pipeline wall time <= 15 GPU-min": "met (402 s)",
        "sample FID (domain, no rejection) <= 4.5": "met (4.1)",
        # The faster of fp32 and bf16, graph-captured.
        "sampler batch 16 <= 2.5 s": "met (fp32 11.9 s, bf16 2.31 s)",
        "sampler batch 128 <= 4 s": "not met (fp32 9.8 s, bf16 4.6 s)",
        "bundle (.whl/ and .gpudata/) <= 60 MiB": "not run (no .whl/ or .gpudata/ here: bash "
                                                  "benchmarks/gpu_bundle.sh makes them)",
        "install <= 60 s": "met (99 wheels and the data, 23.4 s)",
    }


def test_a_missed_goal_says_by_how_much_and_an_unmeasured_one_says_why(tmp_path):
    missed = verdicts(a_gpu_run(tmp_path / "fid", fid=5.27))
    assert missed["sample FID (domain, no rejection) <= 4.5"] == "not met (5.27)"

    inception = verdicts(a_gpu_run(tmp_path / "inception", extractor="inception"))
    assert inception["sample FID (domain, no rejection) <= 4.5"] == "not run (measured in inception features: FID 4.1)"

    stopped = verdicts(a_gpu_run(tmp_path / "stopped", pipeline="TIMED OUT"))
    assert stopped["pipeline wall time <= 15 GPU-min"] == "not met (stopped at the step's limit, 470 s)"
    assert stopped["sample FID (domain, no rejection) <= 4.5"] == "not met (stopped at the step's limit, 470 s)"

    failing = a_gpu_run(tmp_path / "failing")
    (failing / "cuda_tests").write_text("1 failed, 4 passed, 698 deselected in 31.0s\n")
    assert verdicts(failing)["CUDA tests pass"] == "not met (1 failed, 4 passed)"

    one_step = tmp_path / "one-step"
    one_step.mkdir()
    (one_step / "steps").write_text("setup ok 2 s\ncuda_tests ok 30 s\n")
    (one_step / "cuda_tests").write_text("5 passed in 12.0s\n")
    chosen = verdicts(one_step, chosen=",cuda_tests,")
    assert chosen["CUDA tests pass"] == "met (5 passed)"
    assert chosen["pipeline wall time <= 15 GPU-min"] == "not run (step not chosen)"
    assert chosen["sampler batch 128 <= 4 s"] == "not run (step not chosen)"
    assert chosen["install <= 60 s"] == "not run (the dependencies were importable: nothing installed)"


def test_the_bundle_is_judged_by_the_files_the_gpu_machine_reads(tmp_path):
    (tmp_path / ".whl").mkdir()
    (tmp_path / ".gpudata").mkdir()
    (tmp_path / ".whl" / "a-1.0-py3-none-any.whl").write_bytes(b"w" * 2**20)
    (tmp_path / ".gpudata" / "train-images-idx3-ubyte.xz").write_bytes(b"x" * 2**20)
    (tmp_path / ".gpudata" / "notes.txt").write_bytes(b"n" * 100 * 2**20)  # not sent: not counted
    assert gpu_goals.bundle(tmp_path) == "met (2.0 MiB, 2 files)"
    (tmp_path / ".whl" / "b-1.0-py3-none-any.whl").write_bytes(b"w" * 59 * 2**20)
    assert gpu_goals.bundle(tmp_path) == "not met (61.0 MiB, 3 files)"


def test_the_estimate_charges_each_training_its_own_steps_at_its_measured_rate():
    """The estimate follows the config: 1,000 more steps of a training cost exactly their
    batches at that model's measured samples/s (slowed as inside the pipeline), and a first
    epoch of images costs at least its decoding."""
    config = vqvae2.preset("fashion-mnist-gpu")
    before = gpu_estimate.estimate(config)
    grown = vqvae2.apply_overrides(config, {"train_prior.steps": config.train_prior.steps + 1000,
                                            "train_classifier.batch_size": 64})
    after = gpu_estimate.estimate(grown)
    slower = gpu_estimate.PIPELINE_SLOWER
    for level in (0, 1):
        added = after[f"priors level {level}"][0] - before[f"priors level {level}"][0]
        rate = gpu_estimate.SAMPLES_PER_S[f"prior-{level}"]
        assert added == pytest.approx(1000 * 128 / rate * slower, rel=1e-9)
        assert after[f"priors level {level}"][1] == config.train_prior.steps + 1000
    assert after["autoencoder"] == before["autoencoder"]  # what did not change costs the same
    # Half the batch: half the images of each step, so the same steps decode half as many.
    images = config.train_classifier.steps * 64
    decoding = min(images, 60_000) / gpu_estimate.DECODE_PER_S
    assert after["classifiers judge"][0] >= gpu_estimate.OVERHEAD_S["classifier"] + decoding
    one_epoch = vqvae2.TrainConfig(steps=60_000 // 128, batch_size=128)
    assert gpu_estimate.training_seconds("classifier", one_epoch, 0, images=True) == pytest.approx(60_000 / 4000, rel=0.01)


def test_the_estimate_prints_its_stages_and_writes_its_total(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_estimate.py"), "--json", str(tmp_path / "e.json")],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    written = json.loads((tmp_path / "e.json").read_text())
    assert f"trainings taking turns): {written['total']:.0f} s" in done.stdout
    assert list(written["stages"])[0] == "prefect start and bookkeeping" and "priors level 1" in done.stdout
