"""How fast each `vqvae2` command answers, on a finished smoke run.

    python3 benchmarks/bench_cli.py [--root PATH] [--runs 5] [--repo PATH]

Prints one line a command: the best of `--runs` fresh processes, in seconds (the first
process also warms the page cache, so the best is what a person sees at a terminal), with
`python3 -c pass` and `import tasks.config` as yardsticks measured in the same run on the
same machine. A command that fails prints its exit code instead of a time. The goal (issue
34): about 1 s plus the command's own work: `--help` of every command, `ls` and `report`
read a few JSON files; `sample` draws 16 images and `verify` hashes every file, so theirs
is mostly that work (timed fewer times).

`--root` is a storage root with a finished run; without one under it, a smoke run is made
there first (about a minute, with a temporary Prefect server in its own PREFECT_HOME).
`--repo` times another checkout (the code before a change: `git archive HEAD | tar -x -C
/tmp/before`), with PYTHONPATH pointing at it and the same root.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What the `vqvae2` console script runs (pyproject.toml: vqvae2 = "flows.cli:main"), without
# depending on which checkout the installed script points at.
CLI = "import sys; from flows.cli import main; sys.argv[0] = 'vqvae2'; main()"
COMMANDS = ("run", "stage", "ls", "report", "sample", "reconstruct", "verify", "node")


def best(command: list[str], env: dict[str, str], runs: int, cwd: Path) -> float | str:
    """The fastest of `runs` fresh processes of `command` in `cwd`, in seconds; `exit N` if one fails."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
        if done.returncode:
            return f"exit {done.returncode}"
    return min(times)


def finished_root(root: Path, env: dict[str, str]) -> dict:
    """The newest run recorded under `root` (`vqvae2 ls --json`, of this checkout), made first if there is none."""
    def listed() -> list[dict]:
        done = subprocess.run([sys.executable, "-c", CLI, "ls", "--root", str(root), "--json"], env=env, cwd=REPO,
                              capture_output=True, text=True)
        return json.loads(done.stdout) if done.returncode == 0 else []

    runs = listed()
    if not runs:
        print(f"no finished run under {root}: making a smoke run there (about a minute)", flush=True)
        subprocess.run([sys.executable, "-c", CLI, "run", "--preset", "smoke", "--root", str(root)], env=env,
                       cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        runs = listed()
    return runs[0]


def config_key_of(root: Path, env: dict[str, str]) -> str:
    """The config key of the smoke config under `root`: the one the UI's tables of its runs carry."""
    code = ("import sys; from tasks.config import config_key, pipeline_config; "
            "print(config_key(pipeline_config('smoke', storage={'root': sys.argv[1]})))")
    return subprocess.run([sys.executable, "-c", code, str(root)], env=env, cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "vqvae2-bench-cli-root",
                        help="a storage root with a finished run (made there if it has none)")
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per figure; the best one counts")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout to time (default: this one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-cli-") as scratch:
        timed_commands(args.repo.resolve(), args.root.resolve(), args.runs, Path(scratch))


def timed_commands(repo: Path, root: Path, runs: int, scratch: Path) -> None:
    home, out = scratch / "prefect-home", scratch  # a PREFECT_HOME of its own: any server it starts is its own
    # `python3 -c` puts the working directory first on sys.path, before PYTHONPATH: run in the checkout.
    base = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    base.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    run = finished_root(root, {**base, "PYTHONPATH": str(REPO)})
    key = config_key_of(root, {**base, "PYTHONPATH": str(REPO)})
    env = {**base, "PYTHONPATH": str(repo)}

    timed: list[tuple[str, list[str], int]] = [("python3 -c pass", ["-c", "pass"], runs),
                                               ("import tasks.config", ["-c", "import tasks.config"], runs),
                                               ("vqvae2 --help", ["-c", CLI, "--help"], runs)]
    timed += [(f"vqvae2 {name} --help", ["-c", CLI, name, "--help"], runs) for name in COMMANDS]
    timed += [
        ("vqvae2 ls", ["-c", CLI, "ls", "--root", str(root)], runs),
        ("vqvae2 report", ["-c", CLI, "report", "--root", str(root)], runs),
        ("vqvae2 report --key <report key>", ["-c", CLI, "report", "--root", str(root), "--key", run["key"]], runs),
        ("vqvae2 report --key <config key>", ["-c", CLI, "report", "--root", str(root), "--key", key], runs),
        ("vqvae2 sample -n 16 (draws them)", ["-c", CLI, "sample", "--root", str(root), "-n", "16", "--out",
                                              str(out / "sample.png")], min(runs, 2)),
        ("vqvae2 verify (hashes every file)", ["-c", CLI, "verify", "--root", str(root)], min(runs, 2)),
    ]
    print(f"checkout: {repo}; root: {root} (report key {run['key']}, config key {key}); best of {runs} fresh "
          f"processes (sample and verify: of {min(runs, 2)})", flush=True)
    for label, argv, times in timed:
        figure = best([sys.executable, *argv], env, times, repo)
        print(f"  {label:38s} {figure:7.2f} s" if isinstance(figure, float) else f"  {label:38s} {figure}",
              flush=True)


if __name__ == "__main__":
    main()
