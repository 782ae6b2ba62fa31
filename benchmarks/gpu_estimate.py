"""How long the whole pipeline of a GPU preset takes on one H100, stage by stage, from the
preset's own training steps and what was measured on an H100 (docs/gpus.md). It is what
decides whether `benchmarks/gpu_check.sh --steps pipeline` fits one call of a lent GPU
machine (at most 10 minutes, installing included), so it runs anywhere, without a GPU:

    python3 benchmarks/gpu_estimate.py                    # fashion-mnist-gpu
    python3 benchmarks/gpu_estimate.py --json estimate.json

On a GPU, gpu_check.sh prints it before the pipeline runs and sets each training's measured
seconds beside its estimate.
"""
from __future__ import annotations

import argparse
import json

import vqvae2

# Samples/s of a training step in the preset's precision, one H100 80 GB, torch 2.11
# (benchmarks/bench_precision.py): the autoencoder bf16 + channels_last, the classifiers
# bf16, the priors fp32.
SAMPLES_PER_S = {"autoencoder": 12157, "classifier": 18794, "prior-0": 4791, "prior-1": 4225}
# Inside the pipeline the top prior took 32 ms a step at batch 128 (4,000 samples/s), 1.2x
# slower than its benchmark; every training is taken to be as much slower.
PIPELINE_SLOWER = 4791 / (128 / 0.032)
# A training decodes the PNG shards of its first epoch at about 4,000 images/s in its own
# process; from the second epoch on, the decoded-image cache feeds it.
DECODE_PER_S = 4000
TRAIN_IMAGES = 60_000
# Seconds of a training beyond its steps: the process, CUDA, evaluating, checkpointing. From
# the H100 run (which decoded throughout: classifiers 82 s and 92 s for 256,000 images, the
# autoencoder 137 s for 384,000), less those images at 4,000/s. The priors' were not
# measured: taken as the classifiers'.
OVERHEAD_S = {"classifier": 23, "autoencoder": 41, "prior": 23}
# Whole stages. Ingest and encode as measured on the H100. Prefect: a fully cached re-run on a
# 2-core CPU takes about 35 s, most of it starting Prefect's temporary server. Sampling (5
# graph-captured batches of 1,000 candidates) and evaluating (4 sets of 500 images and 2,000
# references through the features classifier) were never timed on a GPU: 30 s each, well
# above their arithmetic.
WHOLE_STAGE_S = {"prefect start and bookkeeping": 35, "ingest": 10, "encode": 26, "sample": 30, "evaluate": 30}


def training_seconds(kind: str, train: vqvae2.TrainConfig, overhead: float, images: bool) -> float:
    """A training of `train.steps` steps: while the first epoch is decoded, the slower of
    decoding and stepping sets the pace."""
    step = train.batch_size / SAMPLES_PER_S[kind] * PIPELINE_SLOWER
    if not images:  # a prior reads codes, already arrays
        return overhead + train.steps * step
    first = min(train.steps, TRAIN_IMAGES // train.batch_size)
    return overhead + max(first * train.batch_size / DECODE_PER_S, first * step) + (train.steps - first) * step


def estimate(config: vqvae2.ModelConfig) -> dict[str, tuple[float, int | None]]:
    """Seconds and training steps of each stage, in the order the pipeline takes them on one
    GPU (the trainings take turns)."""
    classifier, autoencoder = config.train_classifier, config.train_autoencoder
    stages: dict[str, tuple[float, int | None]] = {
        "prefect start and bookkeeping": (WHOLE_STAGE_S["prefect start and bookkeeping"], None),
        "ingest": (WHOLE_STAGE_S["ingest"], None),
    }
    for role in ("judge", "features"):
        stages[f"classifiers {role}"] = (
            training_seconds("classifier", classifier, OVERHEAD_S["classifier"], images=True), classifier.steps)
    stages["autoencoder"] = (
        training_seconds("autoencoder", autoencoder, OVERHEAD_S["autoencoder"], images=True), autoencoder.steps)
    stages["encode"] = (WHOLE_STAGE_S["encode"], None)
    for level in range(len(config.priors)):
        prior = config.prior_training(level)
        stages[f"priors level {level}"] = (
            training_seconds(f"prior-{level}", prior, OVERHEAD_S["prior"], images=False), prior.steps)
    stages["sample"] = (WHOLE_STAGE_S["sample"], None)
    stages["evaluate"] = (WHOLE_STAGE_S["evaluate"], None)
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fashion-mnist-gpu", choices=["fashion-mnist-gpu"],
                        help="the preset whose stages were measured on an H100")
    parser.add_argument("--json", help="also write {total, stages: {name: seconds}} here")
    args = parser.parse_args()
    stages = estimate(vqvae2.preset(args.preset))
    total = sum(seconds for seconds, _ in stages.values())
    print(f"estimated pipeline time on an H100 ({args.preset} as preset, trainings taking turns): {total:.0f} s")
    for name, (seconds, steps) in stages.items():
        print(f"  {name:<30} {seconds:6.0f} s" + (f", {steps} steps" if steps else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"total": total, "stages": {name: seconds for name, (seconds, _) in stages.items()}}, f)


if __name__ == "__main__":
    main()
