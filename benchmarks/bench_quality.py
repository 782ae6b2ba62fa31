"""Better samples per CPU-minute: the priors of the `fashion-mnist` preset trained under named
variants on one cached root, side by side.

    python3 benchmarks/bench_quality.py [--root DIR] [--variants before,ema,...] [--steps N] [--seed S]

The dataset, autoencoder, codes and classifiers are the preset's, made once under --root
(`vqvae2 stage` for each, Cached afterwards), so every variant trains its priors on the same
codes and is measured in the same features. Each variant then runs the train-priors stage
(its wall time: both priors, side by side as the pipeline trains them, from the stage flow's
start to its end, Prefect's start-up left out) and the rest of the pipeline, whose report
gives the held-out bits per code of each level and the sample FID (domain features, no
rejection, the preset's 500 samples against 2,000 held-out images).

A variant is the prior training the preset had before these variants (`before`) with some
settings changed; `preset` is today's, and `preset+...` today's with some settings changed.
Same seeds, same data order: the variants differ only in their overrides. At the preset's
seed (0, unless --seed) a variant's priors are exactly those a run of the preset with its
overrides trains, so its FID is that run's; priors such a run (or this script) made before
are Cached, and show the time this script recorded for them, if any.

FIDs of 500 samples move by a few tenths between seeds: compare differences larger than that.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


UPSTREAM = ("ingest", "train-classifiers", "train-autoencoder", "encode")


@dataclass(frozen=True)
class Times:
    """A multiple of the variant's own train_prior.steps: what a smaller batch or the top
    prior's own steps are spelled in, so `--steps` scales every variant alike."""

    factor: int


# The preset's prior training before this benchmark chose today's: each variant changes it.
BEFORE = {"priors.0.dropout": 0.1, "priors.1.dropout": 0.1, "priors.0.steps": None, "train_prior.lr": 1e-3,
          "train_prior.ema_decay": 0.0, "train_prior.lr_schedule": "constant", "train_prior.batch_size": 64,
          "train_prior.steps": Times(1)}
BEFORE_STEPS = 1000
EMA = {"train_prior.ema_decay": 0.995}
COSINE = {"train_prior.lr_schedule": "cosine"}
NO_DROPOUT = {"priors.0.dropout": 0.0, "priors.1.dropout": 0.0}
# The top prior costs less than half the bottom's time per step (an 8x8 grid against 16x16), so
# side by side it is done first and leaves a core idle: twice its steps take about the same time.
TOP_2X = {"priors.0.steps": Times(2)}
LR_2X = {"train_prior.lr": 2e-3}
LR_4X = {"train_prior.lr": 4e-3}
# A step costs the same per image at 16, 32 or 64 (the convolutions' work is per position), so a
# smaller batch makes more steps of the same images in the same time.
BATCH_HALF = {"train_prior.batch_size": 32, "train_prior.steps": Times(2)}
BATCH_QUARTER = {"train_prior.batch_size": 16, "train_prior.steps": Times(4)}
FIRST_CHOICE = {**BEFORE, **EMA, **NO_DROPOUT, **TOP_2X, **LR_2X}  # what this benchmark chose first
VARIANTS: dict[str, dict[str, object]] = {
    "before": BEFORE,
    "ema": {**BEFORE, **EMA},
    "cosine": {**BEFORE, **COSINE},
    "no-dropout": {**BEFORE, **NO_DROPOUT},
    "top-2x": {**BEFORE, **TOP_2X},
    "lr-2x": {**BEFORE, **LR_2X},
    "ema+cosine+no-dropout+top-2x": {**BEFORE, **EMA, **COSINE, **NO_DROPOUT, **TOP_2X},
    "ema+no-dropout+top-2x+lr-2x": FIRST_CHOICE,
    "ema+no-dropout+top-2x+lr-4x": {**FIRST_CHOICE, **LR_4X},
    "ema+no-dropout+top-2x+lr-2x+batch-half": {**FIRST_CHOICE, **BATCH_HALF},
    "ema+no-dropout+top-2x+lr-4x+batch-half": {**FIRST_CHOICE, **LR_4X, **BATCH_HALF},
    "ema+no-dropout+top-2x+lr-4x+batch-quarter": {**FIRST_CHOICE, **LR_4X, **BATCH_QUARTER},
    "preset": {},  # today's, as vqvae2.presets has it
    # Today's preset with its priors in fp32, as before bf16 autocast: on the same autoencoder and codes.
    "preset+fp32-priors": {"train_prior.amp": "off"},
}
CLOCK = re.compile(r"^(\d\d):(\d\d):(\d\d\.\d+) \|")


def vqvae2(*args: str, env: dict[str, str]) -> str:
    """One CLI command; its output (stdout and stderr), or exit with it where it failed."""
    done = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, env=env)
    output = done.stdout + done.stderr
    if done.returncode:
        sys.exit(f"vqvae2 {' '.join(args)} failed ({done.returncode}):\n{output[-3000:]}")
    return output


def settings(overrides: dict[str, object]) -> list[str]:
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


def seconds_of(line: str) -> float:
    hours, minutes, seconds = CLOCK.match(line).groups()
    return 3600 * int(hours) + 60 * int(minutes) + float(seconds)


def flow_seconds(log: str) -> float:
    """From the stage flow's first line to its last, in the log's clock."""
    lines = [line for line in log.splitlines() if CLOCK.match(line) and "Flow run '" in line]
    elapsed = seconds_of(lines[-1]) - seconds_of(lines[0])
    return elapsed + 86400 if elapsed < 0 else elapsed


def measure(preset: str, overrides: dict[str, object], root: str, env: dict[str, str], before: dict | None) -> dict:
    """One variant's row; `before`, its row from an earlier run of this script, if any."""
    common = ["--preset", preset, "--root", root, *settings(overrides)]
    log = vqvae2("stage", "train-priors", *common, env=env)
    cached = "train-prior-top' - Finished in state Cached" in log
    wall = (before or {}).get("priors_s") if cached else flow_seconds(log)
    output = vqvae2("run", *common, env=env)
    key = re.search(r"report ([0-9a-f]{16}):", output).group(1)
    metrics = json.loads(Path(root, "runs", f"{key}.json").read_text())["metrics"]
    return {"priors_s": wall, "cached": cached, "report": key, **{k: metrics.get(k) for k in (
        "nll_bits_per_code_top", "nll_bits_per_code_bottom", "sample_fid", "recon_mse")}}


def resolved(variant: dict[str, object], steps: int, seed: int) -> dict[str, object]:
    """A variant's overrides with its multiples worked out: its train_prior.steps a multiple of
    `steps` (BEFORE's, or --steps), the top prior's own steps a multiple of those."""
    own = steps * variant["train_prior.steps"].factor if "train_prior.steps" in variant else None
    settings = {k: v if not isinstance(v, Times) else own if k == "train_prior.steps" else own * v.factor
                for k, v in variant.items()}
    return {**({"train_prior.seed": seed} if seed else {}), **settings}


def table(rows: dict[str, dict], overrides: dict[str, dict], before: dict[str, object]) -> str:
    head = "| variant | priors' wall time | bits/code top | bits/code bottom | sample FID | recon MSE | overrides |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        wall = ("cached, not timed here" if row["priors_s"] is None
                else f"{row['priors_s'] / 60:.1f} min" + (" (recorded)" * row["cached"]))
        if name == "preset" or name.startswith("preset+"):  # overrides of today's preset, not of `before`
            given = ", ".join(f"{k}={v}" for k, v in overrides[name].items()) or "(today's preset)"
        else:
            changed = {k: v for k, v in overrides[name].items() if k not in before or before[k] != v}
            given = ", ".join(f"{k}={v}" for k, v in changed.items()) or "(the preset before these variants)"
        lines.append(f"| {name} | {wall} | {row['nll_bits_per_code_top']:.3f} | {row['nll_bits_per_code_bottom']:.3f} "
                     f"| {row['sample_fid']:.2f} | {row['recon_mse']:.5f} | {given} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=os.path.expanduser("~/vqvae2-bench-quality"))
    parser.add_argument("--preset", default="fashion-mnist",
                        help="smoke, with --steps 40: the script's own dry run, in minutes")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"the steps of `before` (default {BEFORE_STEPS}, as the fashion-mnist preset had), which "
                        "the other variants scale")
    parser.add_argument("--seed", type=int, default=0, help="the priors' seed (train_prior.seed)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"any of {', '.join(VARIANTS)}")
    args = parser.parse_args()
    chosen = args.variants.split(",")
    unknown = [name for name in chosen if name not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    started = time.monotonic()
    for stage in UPSTREAM:
        vqvae2("stage", stage, "--preset", args.preset, "--root", args.root, env=env)
    print(f"the {args.preset} preset's dataset, classifiers, autoencoder and codes under {args.root}: "
          f"made or found in {time.monotonic() - started:.0f} s", flush=True)

    record = Path(args.root, "bench_quality.json")
    recorded = json.loads(record.read_text()) if record.exists() else {}
    overrides = {name: resolved(VARIANTS[name], args.steps or BEFORE_STEPS, args.seed) for name in chosen}
    before = resolved(BEFORE, args.steps or BEFORE_STEPS, args.seed)
    rows: dict[str, dict] = {}
    for name in chosen:
        spelled = json.dumps(overrides[name], sort_keys=True)
        rows[name] = measure(args.preset, overrides[name], args.root, env, recorded.get(spelled))
        if not rows[name]["cached"]:
            recorded[spelled] = rows[name]
            record.write_text(json.dumps(recorded, indent=1))
        print(f"{name}: {json.dumps(rows[name])}", flush=True)
    print()
    print(table(rows, overrides, before))


if __name__ == "__main__":
    main()
