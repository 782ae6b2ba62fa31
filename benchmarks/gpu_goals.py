"""The goals of the GPU check, each judged from what `benchmarks/gpu_check.sh` left in its
work folder: one line per goal, met, not met or not run, with the figure it was judged on.

    python3 benchmarks/gpu_goals.py WORK [--dry-run] [--chosen STEPS] [--pipeline-limit S]

What the work folder holds, each written by one step of gpu_check.sh: `steps` (each step's
outcome), `cuda_tests` (pytest's output), `estimate.json` (benchmarks/gpu_estimate.py),
`pipeline.json` (wall seconds, sample FID and its feature space), `sampling`
(benchmarks/bench_sampling.py's table) and `install` (the wheels' install time).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
from pathlib import Path

BUNDLE_MIB = 60  # the device tool carries 64 MiB, the checkout included
INSTALL_S = 60
ESTIMATE_S = 8 * 60  # the pipeline, so that installing and it fit one 10-minute device call
WALL_S = 15 * 60
FID = 4.5
SAMPLER_S = {16: 2.5, 128: 4.0}  # seconds a batch at the imagenet-256 paper widths, fp32 or bf16

STEP_OUTCOME = re.compile(r"^(\S+)\s+(ok|TIMED OUT|failed \(\d+\))", re.M)
# bench_sampling.py's table: batch, reference, cached (or OOM), graphed, graphed bf16, ...
SAMPLER_ROW = re.compile(r"^\s*(\d+)\s+[\d.]+\s+(?:[\d.]+|OOM)\s+([\d.]+)\s+([\d.]+)\s", re.M)


def judged(value: float, bound: float, figure: str) -> str:
    return f"{'met' if value <= bound else 'not met'} ({figure})"


class Work:
    """What one check left: its files and its steps' outcomes."""

    def __init__(self, folder: Path, dry: bool, chosen: str, pipeline_limit: int | None) -> None:
        self.folder, self.dry, self.chosen, self.pipeline_limit = folder, dry, chosen, pipeline_limit
        self.outcomes = dict(STEP_OUTCOME.findall(self.read("steps") or ""))

    def read(self, name: str) -> str | None:
        path = self.folder / name
        return path.read_text() if path.exists() else None

    def json(self, name: str):
        text = self.read(name)
        return json.loads(text) if text else None

    def unfinished(self, step: str) -> str | None:
        """Why a goal of `step` has no figure; None when the step ran to its end."""
        if step not in self.outcomes:
            return "not run (step not chosen)" if self.chosen else "not run (setup failed)"
        outcome = self.outcomes[step]
        if outcome == "ok":
            return None
        if outcome == "TIMED OUT" and step == "pipeline" and self.pipeline_limit:
            return f"not met (stopped at the step's limit, {self.pipeline_limit} s)"
        return f"not met (the step {outcome.lower()})"


def cuda_tests(work: Work) -> str:
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?)", work.read("cuda_tests") or "")}
    tally = ", ".join(f"{n} {kind}" for kind, n in counts.items()) or "none collected"
    why = work.unfinished("cuda_tests")
    if work.dry:
        return why if "cuda_tests" not in work.outcomes else f"not run (dry run, no GPU: {tally})"
    if why and not counts:
        return why
    bad = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    return f"{'met' if counts.get('passed') and not bad and not why else 'not met'} ({tally})"


def pipeline_estimate(work: Work) -> str:
    estimate = work.json("estimate.json")
    if estimate is None:
        return work.unfinished("pipeline") or "not run (no estimate)"
    return judged(estimate["total"], ESTIMATE_S, f"{estimate['total']:.0f} s")


def pipeline_wall(work: Work) -> str:
    figures, why = work.json("pipeline.json"), work.unfinished("pipeline")
    if why or not figures:
        return why or "not run (no figures)"
    if work.dry:
        return f"not run (dry run: tiny models on a CPU took {figures['wall_s']} s)"
    return judged(figures["wall_s"], WALL_S, f"{figures['wall_s']} s")


def sample_fid(work: Work) -> str:
    figures, why = work.json("pipeline.json"), work.unfinished("pipeline")
    if why or not figures or figures.get("fid") is None:
        return why or "not run (no report)"
    if work.dry:
        return f"not run (dry run: tiny models, FID {figures['fid']:.3g} is no measure)"
    if figures.get("extractor") != "domain":
        return f"not run (measured in {figures.get('extractor')} features: FID {figures['fid']:.3g})"
    return judged(figures["fid"], FID, f"{figures['fid']:.3g}")


def sampler(work: Work) -> list[str]:
    """One verdict per batch of SAMPLER_S: the faster of fp32 and bf16, graph-captured. A dry
    run's tiny batches stand in for them, in order."""
    rows = {int(batch): (float(fp32), float(bf16)) for batch, fp32, bf16 in SAMPLER_ROW.findall(work.read("sampling") or "")}
    why = work.unfinished("sampling")
    verdicts = []
    for i, (batch, bound) in enumerate(SAMPLER_S.items()):
        if work.dry:
            stand_in = sorted(rows)[i] if i < len(rows) else None
            verdicts.append(f"not run (dry run: tiny widths on a CPU, batch {stand_in} {min(rows[stand_in]):.3g} s)"
                            if stand_in is not None else why or "not run (dry run)")
        elif batch in rows:
            fp32, bf16 = rows[batch]
            verdicts.append(judged(min(fp32, bf16), bound, f"fp32 {fp32:.3g} s, bf16 {bf16:.3g} s"))
        else:
            verdicts.append(why or "not met (no time printed)")
    return verdicts


def bundle(checkout: Path) -> str:
    files = glob.glob(str(checkout / ".whl/*.whl")) + glob.glob(str(checkout / ".gpudata/*.xz"))
    if not files:
        return "not run (no .whl/ or .gpudata/ here: bash benchmarks/gpu_bundle.sh makes them)"
    mib = sum(os.path.getsize(f) for f in files) / 2**20
    return judged(mib, BUNDLE_MIB, f"{mib:.1f} MiB, {len(files)} files")


def install(work: Work) -> str:
    found = re.search(r"installed (\d+) wheels in ([\d.]+) s", work.read("install") or "")
    if not found:
        return "not run (the dependencies were importable: nothing installed)"
    return judged(float(found[2]), INSTALL_S, f"{found[1]} wheels and the data, {found[2]} s")


def goals(work: Work, checkout: Path) -> list[tuple[str, str]]:
    batch16, batch128 = sampler(work)
    return [
        ("CUDA tests pass", cuda_tests(work)),
        (f"pipeline estimate on an H100 <= {ESTIMATE_S} s (one device call)", pipeline_estimate(work)),
        (f"pipeline wall time <= {WALL_S // 60} GPU-min", pipeline_wall(work)),
        (f"sample FID (domain, no rejection) <= {FID}", sample_fid(work)),
        (f"sampler batch 16 <= {SAMPLER_S[16]:g} s", batch16),
        (f"sampler batch 128 <= {SAMPLER_S[128]:g} s", batch128),
        (f"bundle (.whl/ and .gpudata/) <= {BUNDLE_MIB} MiB", bundle(checkout)),
        (f"install <= {INSTALL_S} s", install(work)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path, help="gpu_check.sh's work folder")
    parser.add_argument("--dry-run", action="store_true", help="the check ran at tiny sizes on a CPU")
    parser.add_argument("--chosen", default="", help="the steps chosen with --steps (empty: all)")
    parser.add_argument("--pipeline-limit", type=int, default=None, help="the pipeline step's time limit (s)")
    args = parser.parse_args()
    work = Work(args.work, args.dry_run, args.chosen, args.pipeline_limit)
    for goal, verdict in goals(work, Path(__file__).resolve().parents[1]):
        print(f"goal {goal}: {verdict}")


if __name__ == "__main__":
    main()
