"""The evaluation's sample-quality table: every set measured against one reference.

Prints seconds for the report's six rows (train floor, reconstructions, samples at four
acceptance rates) against 2,000 held-out images, as `fidelity_metrics` calls that each
extract the reference's features again, and as one `fidelity_table`, which extracts them
once; both in the same run, with their ratio, and checks the numbers agree.

Domain features of a `fashion-mnist`-preset classifier (untrained: the speed is the same).
With Inception features, where extraction dominates, the saving is larger.

    python benchmarks/bench_fidelity.py
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.nn.functional as F

import vqvae2
from storage.idx import read_idx
from tasks.fidelity import fidelity_metrics, fidelity_table, resolve_extractor

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = vqvae2.preset("fashion-mnist")
    pixels = torch.from_numpy(read_idx(os.path.join(FASHION_MNIST, "t10k-images-idx3-ubyte.gz"))[:, None]).float()
    images = F.interpolate(pixels / 255, size=config.image_size, mode="bilinear", antialias=True)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    reference = images[: args.reference]
    sizes = {"floor": 2000, "reconstructions": 2000, "rate 1": 500, "rate 0.5": 500, "rate 0.25": 500, "rate 0.1": 500}
    sets, start = {}, args.reference
    for name, size in sizes.items():
        sets[name], start = images[start:start + size], start + size

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = os.path.join(folder, "model.pt")
        torch.save(vqvae2.to_checkpoint(vqvae2.build_classifier(config)), checkpoint)
        extractor = resolve_extractor("domain", domain_checkpoint=checkpoint)
        begin = time.perf_counter()
        separate = {name: fidelity_metrics(s, reference, extractor) for name, s in sets.items()}
        middle = time.perf_counter()
        table = fidelity_table(sets, reference, extractor)
        end = time.perf_counter()

    assert table == separate, "the table's numbers differ from separate calls"
    print(f"{len(sets)} sets ({sum(sizes.values())} images) against {args.reference} reference images, "
          f"{args.threads} threads, domain features")
    print(f"  fidelity_metrics per set: {middle - begin:7.2f} s")
    print(f"  fidelity_table:           {end - middle:7.2f} s   ({(middle - begin) / (end - middle):.2f}x)")
    print("  numbers identical")


if __name__ == "__main__":
    main()
