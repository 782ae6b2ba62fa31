"""The GPU check's dry run: `benchmarks/gpu_check.sh --dry-run` takes the same steps as on a
GPU machine (the pipeline on the `fashion-mnist-gpu` preset, the sampling, memory and
precision benchmarks) at tiny sizes on this CPU, so the script is known to work before a
GPU is at hand, and ends with one line per goal of issue 25."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["setup", "cuda_tests", "pipeline", "sampling", "memory", "precision"]
# Each goal, and the verdicts a dry run may give it: what a CPU cannot measure is not run;
# the estimate is judged on any machine, and must fit one device call.
GOALS = {
    "CUDA tests pass": r"not run \(dry run, no GPU: .+\)",
    "pipeline estimate on an H100 <= 480 s (one device call)": r"met \(\d+ s\)",
    "pipeline wall time <= 15 GPU-min": r"not run \(dry run: tiny models on a CPU took \d+ s\)",
    "sample FID (domain, no rejection) <= 4.5": r"not run \(dry run: tiny models, FID .+ is no measure\)",
    "sampler batch 16 <= 2.5 s": r"not run \(dry run: tiny widths on a CPU, batch 1 .+ s\)",
    "sampler batch 128 <= 4 s": r"not run \(dry run: tiny widths on a CPU, batch 2 .+ s\)",
    # Judged where gpu_bundle.sh made the bundle, else not run.
    "bundle (.whl/ and .gpudata/) <= 60 MiB": r"(met|not met) \([\d.]+ MiB, \d+ files\)|not run \(no .+\)",
    # Judged where the dependencies had to be installed, else not run.
    "install <= 60 s": r"(met|not met) \(\d+ wheels and the data, [\d.]+ s\)|not run \(.+\)",
}


def test_the_gpu_checks_dry_run_takes_every_step_and_judges_every_goal(tmp_path):
    out = tmp_path / "out"
    # Its own Prefect home: the script starts its own temporary server beside this session's.
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "PREFECT_API_URL")}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = (out / "summary.txt").read_text()
    steps = {m[1]: m[2] for m in re.finditer(r"^(\S+)\s+(ok|TIMED OUT|failed \(\d+\))\s+\d+ s$", summary, re.M)}
    assert steps == dict.fromkeys(STEPS, "ok"), summary
    assert "pipeline wall time:" in summary
    for model in ("autoencoder", "classifiers  judge", "classifiers  features", "priors       level 0",
                  "priors       level 1"):
        assert f"trained {model}" in summary, summary
    fid = float(next(line.split()[1] for line in summary.splitlines() if line.strip().startswith("sample_fid")))
    assert fid >= 0

    goals = dict(re.findall(r"^goal (.+?): (.+)$", summary, re.M))
    assert list(goals) == list(GOALS), summary
    for goal, verdict in GOALS.items():
        assert re.fullmatch(verdict, goals[goal]), (goal, goals[goal])

    log = (out / "gpu_check.log").read_text()
    assert "estimated pipeline time on an H100" in log and "priors level 1" in log
    assert "graphed" in log and "checkpointed" in log and "bf16+cl" in log
    assert (out / "report.md").read_text().startswith("#")
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
