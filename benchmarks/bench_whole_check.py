"""What "Cached only when whole" adds to a cached re-run: before a stage's tasks may be
`Cached`, its artifact is checked against its inventory (every file there at its recorded
size: one listing and one inventory read per artifact, nothing hashed; `Artifact.read_whole`).

    python3 benchmarks/bench_whole_check.py [--preset smoke] [--root DIR] [--set KEY=VALUE ...] [--runs 3]

Makes a root of `--preset` in `--root` (a temporary folder unless given; a root already
finished there is reused), then re-runs the same config `--runs` times, every task `Cached`,
on a temporary Prefect server, and prints per re-run its wall seconds, the seconds spent in
the whole checks, their share, and how many artifacts and files they checked. `--set` makes
a quicker root of the same shape: `--preset fashion-mnist --set train_autoencoder.steps=1
--set train_classifier.steps=1 --set train_prior.steps=1` writes the preset's shards, code
chunks, sample batches and report, the files a check lists, without its hours of training.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--root", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    from prefect.testing.utilities import prefect_test_harness

    from flows.parameters import sections_of
    from flows.pipeline import vqvae2_pipeline
    from tasks.config import pipeline_config
    from tasks.machinery.artifacts import Artifact

    root = args.root or tempfile.mkdtemp(prefix="bench-whole-")
    overrides = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.set)}
    config = pipeline_config(args.preset, storage={"root": root}, overrides=overrides)
    checked = {"seconds": 0.0, "artifacts": 0, "files": 0}
    read_whole = Artifact.read_whole

    def timed(self: Artifact, model):  # the check as the pipeline calls it, timed
        started = time.perf_counter()
        try:
            return read_whole(self, model)
        finally:
            checked["seconds"] += time.perf_counter() - started
            checked["artifacts"] += 1
            manifest = self.read(model)
            checked["files"] += len(self.read_inventory(manifest.inventory)) if manifest and manifest.inventory else 0

    with prefect_test_harness(server_startup_timeout=180):
        started = time.perf_counter()
        first = vqvae2_pipeline(**sections_of(config), return_state=True)
        assert first.is_completed(), first.message
        print(f"root {root} ({args.preset}{', ' + ', '.join(args.set) if args.set else ''}): made or found in "
              f"{time.perf_counter() - started:.1f} s")
        Artifact.read_whole = timed
        for run in range(1, args.runs + 1):
            checked.update(seconds=0.0, artifacts=0, files=0)
            started = time.perf_counter()
            state = vqvae2_pipeline(**sections_of(config), return_state=True)
            wall = time.perf_counter() - started
            assert state.is_completed(), state.message
            print(f"cached re-run {run}: {wall:.2f} s, of which whole checks {checked['seconds'] * 1000:.0f} ms "
                  f"({checked['seconds'] / wall:.1%}): {checked['artifacts']} artifacts, {checked['files']} files")


if __name__ == "__main__":
    main()
