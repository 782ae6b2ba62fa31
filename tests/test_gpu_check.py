"""The GPU check's dry run: `benchmarks/gpu_check.sh --dry-run` takes the same steps as on a
GPU machine (the pipeline on the `fashion-mnist-gpu` preset, the sampling, memory and
precision benchmarks) at tiny sizes on this CPU, so the script is known to work before a
GPU is at hand."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_checks_dry_run_takes_every_step_and_reports_the_pipelines_figures(tmp_path):
    out = tmp_path / "out"
    # Its own Prefect home: the script starts its own temporary server beside this session's.
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "PREFECT_API_URL")}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = (out / "summary.txt").read_text()
    steps = {line.split()[0]: line.split()[1] for line in summary.splitlines()[1:7]}
    assert steps == dict.fromkeys(["setup", "cuda_tests", "pipeline", "sampling", "memory", "precision"], "ok"), summary
    assert "pipeline wall time:" in summary
    for model in ("autoencoder", "classifiers  judge", "classifiers  features", "priors       level 0",
                  "priors       level 1"):
        assert f"trained {model}" in summary, summary
    fid = float(next(line.split()[1] for line in summary.splitlines() if line.strip().startswith("sample_fid")))
    assert fid >= 0
    log = (out / "gpu_check.log").read_text()
    assert "graphed" in log and "checkpointed" in log and "bf16+cl" in log
    assert (out / "report.md").read_text().startswith("#")
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
