"""Which prior limits the samples: for a finished run, the FID of its samples beside that of
samples whose top level is real (a held-out image's codes) and whose lower levels are drawn.

    python3 benchmarks/bench_levels.py --root DIR [--preset fashion-mnist] [--set KEY=VALUE ...] [-n 2000]

Three rows, each of n images against the report's reference (the first `evaluate.eval_images`
held-out test images), in the report's feature space:
- reconstructions of n other held-out images: the floor at n images;
- samples, every level drawn;
- samples drawn below the real top codes of those same n held-out images.
Every set is drawn for the held-out images' classes, so the rows differ only in what is drawn.
Where real top codes lower the FID little, the top prior is not what holds the samples back:
a lower prior is, and that is where more training time goes. n larger than the report's 500
samples (the default 2,000) makes the rows' differences steadier than the report's.
"""
from __future__ import annotations

import argparse

import torch

import vqvae2
from storage.codes import CodeDataset
from tasks.fidelity import ImageKind, fidelity_metrics, resolve_extractor
from tasks.machinery.models import load_model
from tasks.stages import ENCODE, INGEST, TRAIN_AUTOENCODER, TRAIN_CLASSIFIERS, TRAIN_PRIORS
from tasks.stages.evaluate import as_uint8

from finished_run import add_run_arguments, finished_run


def held_out_codes(url: str, start: int, count: int, options: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The code grids (top first) and labels of held-out rows [start, start + count)."""
    test = CodeDataset(url, "test", storage_options=options)
    if start + count > len(test):
        raise SystemExit(f"-n {count}: the run holds {len(test)} held-out images, and the first {start} are "
                         f"the reference; ask for at most {len(test) - start}")
    rows = [test[i] for i in range(start, start + count)]
    levels = [torch.stack([row[0][level] for row in rows]) for level in range(len(rows[0][0]))]
    return levels, torch.tensor([row[1] for row in rows])


@torch.no_grad()
def drawn_below(priors: list[vqvae2.PixelCNNPrior], given: list[torch.Tensor], labels: torch.Tensor,
                seed: int) -> list[torch.Tensor]:
    """`given`'s levels (top first) and every level below them drawn, each given those above."""
    generator = torch.Generator().manual_seed(seed)
    codes = list(given)
    for prior in priors[len(given):]:
        codes.append(vqvae2.sample_level_fast(prior, len(labels), codes, labels if prior.num_classes else None,
                                              vqvae2.SamplingOptions(), generator))
    return codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("-n", type=int, default=2000, help="images per row")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run = finished_run(args)
    options = run.runtime.storage_options
    evaluate = run.config.evaluate
    reference_count = run.config.eval_images
    dataset, codes = run.get(INGEST), run.get(ENCODE)
    autoencoder = load_model(run.get(TRAIN_AUTOENCODER), options)
    priors = [load_model(prior, options) for prior in run.every(TRAIN_PRIORS)]
    features = next(c for c in run.every(TRAIN_CLASSIFIERS) if c.role == "features")
    extractor = resolve_extractor(evaluate.features, inception_weights=evaluate.inception_weights,
                                  domain_checkpoint=features.model, storage_options=options,
                                  self_supervised=features.target == "rotations", images=ImageKind.of(run.config.model))
    reference, _ = dataset.first_images("test", reference_count, options)
    real, labels = held_out_codes(codes.codes, reference_count, args.n, options)

    def images(levels: list[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return as_uint8(autoencoder.decode_codes(levels))

    rows = {
        f"reconstructions of {args.n} other held-out images (the floor)": images(real),
        "samples, every level drawn": images(drawn_below(priors, [], labels, args.seed)),
        "samples drawn below real top codes": images(drawn_below(priors, real[:1], labels, args.seed)),
    }
    print(f"{extractor.summary()}; reference: the first {reference_count} held-out images")
    print("| set | FID |\n|---|---|")
    for name, generated in rows.items():
        fid = fidelity_metrics(generated, as_uint8(reference), extractor, isc=False, prc=False, device="cpu")["fid"]
        print(f"| {name} | {fid:.2f} |", flush=True)


if __name__ == "__main__":
    main()
