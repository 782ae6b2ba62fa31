"""One prior level trained alone on a finished run's codes, under the training settings given
here, and its held-out bits per code beside those of the run's own prior of that level.

    python3 benchmarks/bench_prior_alone.py --root DIR [--preset fashion-mnist] [--set KEY=VALUE ...]
        [--level 1] [--batch 32] [--steps 2000] [--lr 2e-3] [--ema 0.995 ...] [--prior KEY=VALUE ...]
        [--every 500] [--threads 1] [--save FILE]

Quicker to vary than `bench_quality.py`, which trains every level through the pipeline and
finishes it: one level, its codes in memory, one thread (as the pipeline gives each of the
two priors it trains side by side), the training steps of `vqvae2` (`train_step` in the
run's precision, AdamW with the warm-up and schedule, the Polyak average). The other
settings are the run's: the preset with the overrides --set gives, as `vqvae2 run --set`
took them; --prior changes the trained level's `PriorConfig` alone (e.g.
`cond_resolution=above`), not the run's. Its data order is its own (a seeded permutation per
epoch), so its figures compare with each other: the run's prior is printed on the same rows
as a yardstick, not as one of them. The rows are the held-out images after the report's
first `evaluate.eval_images` (the report's reference), so the choice is never made on the
images the report measures. --save writes the prior it trained
(the average, where there is one) as a checkpoint `vqvae2.from_checkpoint` reads.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time

import torch

import vqvae2
from storage.codes import CodeDataset
from tasks.machinery.models import load_model
from tasks.setting_forms import parse_value
from tasks.stages import ENCODE, TRAIN_PRIORS

from finished_run import add_run_arguments, finished_run


def split_codes(url: str, split: str, rows: range, options: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every level's codes (top first) and the labels of `rows` of `split`, whole chunks at a time."""
    data = CodeDataset(url, split, storage_options=options)
    rows = range(rows.start, min(rows.stop, len(data)))
    chunks = [data.chunk(i) for i in range(rows.start // data.chunk_rows, -(-rows.stop // data.chunk_rows))]
    first = rows.start - rows.start // data.chunk_rows * data.chunk_rows
    levels = [torch.cat([chunk[0][level] for chunk in chunks])[first:first + len(rows)]
              for level in range(len(data.level_shapes))]
    return levels, torch.cat([chunk[1] for chunk in chunks])[first:first + len(rows)]


def batch_of(levels: list[torch.Tensor], labels: torch.Tensor, level: int, rows: torch.Tensor | slice) -> tuple:
    """A prior's batch, as `vqvae2.prior_loss` takes it: (its codes, the codes above or None, labels)."""
    above = [codes[rows] for codes in levels[:level]] or None
    return levels[level][rows], above, labels[rows]


@torch.no_grad()
def held_out_bits(prior: vqvae2.PixelCNNPrior, levels: list[torch.Tensor], labels: torch.Tensor, level: int) -> float:
    prior.eval()
    total = sum(prior.loss(*batch_of(levels, labels, level, slice(i, i + 250))).item() * len(labels[i:i + 250])
                for i in range(0, len(labels), 250))
    return total / len(labels) / math.log(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--level", type=int, default=1, help="0: the top prior")
    parser.add_argument("--batch", type=int, default=None, help="default: the run's")
    parser.add_argument("--steps", type=int, default=None, help="default: the run's steps of that level")
    parser.add_argument("--lr", type=float, default=None, help="default: the run's")
    parser.add_argument("--ema", type=float, action="append", default=[],
                        help="the average's decay; default: the run's. Given more than once, one training keeps an "
                        "average of each decay (the first is the training's; each one's bits are printed)")
    parser.add_argument("--prior", action="append", default=[], metavar="KEY=VALUE",
                        help="a field of the trained level's PriorConfig, its value as --set takes it")
    parser.add_argument("--every", type=int, default=0, help="also the held-out bits every N steps (a learning curve)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save", default=None, help="write the trained (averaged) prior here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = finished_run(args)
    options, reference = run.runtime.storage_options, run.config.eval_images
    settings = TRAIN_PRIORS.settings_for(run.config, args.level)
    asked = {"batch_size": args.batch, "steps": args.steps, "lr": args.lr, "ema_decay": (args.ema or [None])[0]}
    train = dataclasses.replace(settings.train, **{k: v for k, v in asked.items() if v is not None})
    prior_fields = {key: parse_value(value) for key, value in (item.split("=", 1) for item in args.prior)}
    settings = settings.model_copy(update={"prior": dataclasses.replace(settings.prior, **prior_fields)})
    codes = run.get(ENCODE)
    levels, labels = split_codes(codes.codes, "train", range(codes.rows["train"]), options)
    held_levels, held_labels = split_codes(codes.codes, "test", range(reference, 2 * reference), options)

    torch.manual_seed(train.seed)
    prior = settings.model(codes)
    optimizer, scheduler = vqvae2.make_optimizer(prior, train)
    average = vqvae2.polyak_average(prior, train.ema_decay)
    others = {decay: vqvae2.polyak_average(prior, decay) for decay in args.ema[1:]}  # they do not change the training
    started, position, permutation, curve = time.monotonic(), len(labels), None, {}
    for step in range(train.steps):
        if args.every and step and step % args.every == 0:  # the clock stops while it measures
            measuring = time.monotonic()
            curve[step] = round(held_out_bits(vqvae2.averaged_model(average, prior), held_levels, held_labels,
                                              args.level), 4)
            prior.train()
            started += time.monotonic() - measuring
        if position + train.batch_size > len(labels):  # a new epoch, in an order seeded by the step it starts at
            order = torch.Generator().manual_seed(train.seed + step)
            permutation, position = torch.randperm(len(labels), generator=order), 0
        rows = permutation[position:position + train.batch_size]
        position += train.batch_size
        vqvae2.train_step(prior, optimizer, batch_of(levels, labels, args.level, rows), vqvae2.prior_loss,
                          amp=train.amp, grad_clip=train.grad_clip, scheduler=scheduler)
        for kept in (average, *others.values()):
            if kept is not None:
                kept.update_parameters(prior)
    seconds = time.monotonic() - started
    trained = vqvae2.averaged_model(average, prior)
    own = load_model(run.get(TRAIN_PRIORS, args.level), options)
    print(json.dumps({
        "level": args.level, "batch_size": train.batch_size, "steps": train.steps, "lr": train.lr,
        "ema_decay": train.ema_decay, "prior": prior_fields, "threads": args.threads, "train_s": round(seconds),
        "held_out_bits_at_step": curve,
        "held_out_bits_by_ema": {decay: round(held_out_bits(vqvae2.averaged_model(kept, prior), held_levels, held_labels,
                                                            args.level), 4) for decay, kept in others.items()},
        "held_out_bits": round(held_out_bits(trained, held_levels, held_labels, args.level), 4),
        "the_run_s_prior_held_out_bits": round(held_out_bits(own, held_levels, held_labels, args.level), 4),
        "held_out_rows": [reference, reference + len(held_labels)],
    }))
    if args.save:
        torch.save(vqvae2.to_checkpoint(trained), args.save)


if __name__ == "__main__":
    main()
