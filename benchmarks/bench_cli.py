"""How fast the CLI answers: `vqvae2 --help` against importing the config (torch, pydantic).

    python3 benchmarks/bench_cli.py [--runs 7] [--repo PATH]

Each figure is the best of `--runs` fresh processes (the first run of each also warms the
page cache, so the best is the steady state a user sees). `--help` must not wait for
torch, Prefect or pydantic: the parser imports none of them, so its time is the
interpreter's start and argparse, and its ratio to `python3 -c "import tasks.config"`
(measured in the same run, on the same machine) says how much of the heavy import it
avoids. `--repo` times another checkout (the code before a change, say), with PYTHONPATH
pointing at it.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What the `vqvae2` console script runs (pyproject.toml: vqvae2 = "flows.cli:main"), without
# depending on which checkout the installed script points at.
HELP = "import sys; from flows.cli import main; sys.argv[0] = 'vqvae2'; main()"


def best_seconds(command: list[str], env: dict[str, str], runs: int, cwd: Path) -> float:
    """The fastest of `runs` fresh processes of `command` in `cwd`, in seconds; a failing one is an error."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="fresh processes per figure; the best one counts")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout to time (default: this one)")
    args = parser.parse_args()

    repo = args.repo.resolve()
    # `python3 -c` puts the working directory first on sys.path, before PYTHONPATH: run in the checkout.
    env = {**os.environ, "PYTHONPATH": str(repo), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    bare = best_seconds([sys.executable, "-c", "pass"], env, args.runs, repo)
    cli = best_seconds([sys.executable, "-c", HELP, "--help"], env, args.runs, repo)
    config = best_seconds([sys.executable, "-c", "import tasks.config"], env, args.runs, repo)
    print(f"checkout: {repo} (best of {args.runs} fresh processes each)")
    print(f"  python3 -c pass                      {bare:6.3f} s")
    print(f"  vqvae2 --help                        {cli:6.3f} s")
    print(f"  python3 -c 'import tasks.config'     {config:6.3f} s")
    print(f"  --help / import tasks.config         {cli / config:6.3f}")


if __name__ == "__main__":
    main()
