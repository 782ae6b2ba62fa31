"""Exit code 2 for bad input, always: nothing aborts the process as it exits (a thread of a
native library still running then made a refusal exit 134 in 2 of 15 tries on a busy machine)."""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

TRIES = 20


@pytest.mark.slow  # 20 processes
def test_a_refused_parquet_list_exits_2_every_time(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"name": ["a.png", "b.png"], "label": [0, 1]}), tmp_path / "list.parquet")
    argv = [sys.executable, "-m", "flows.cli", "run", "--preset", "smoke", "--root", str(tmp_path / "root"),
            "--source", str(tmp_path / "list.parquet")]
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}

    def refuse(_: int) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)

    with ThreadPoolExecutor(4) as pool:  # four at once: a busy machine, where it aborted
        done = list(pool.map(refuse, range(TRIES)))
    codes = [run.returncode for run in done]
    assert codes == [2] * TRIES, [(run.returncode, run.stderr[-300:]) for run in done if run.returncode != 2]
    assert all(run.stderr.startswith(f"vqvae2: {tmp_path / 'list.parquet'}: no path column") for run in done)
    assert not (tmp_path / "root").exists()
