"""What the scripts that measure a finished run share: naming the run on the command line
(`--root`, `--preset`, `--set` as `vqvae2 run` took them) and finding its artifacts."""
from __future__ import annotations

import argparse

from flows.command_config import build_config
from tasks.stages import FinishedRun


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="the storage root the run wrote to")
    parser.add_argument("--preset", default="fashion-mnist")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="the run's overrides, as `vqvae2 run --set` took them")


def finished_run(args: argparse.Namespace) -> FinishedRun:
    """The artifacts of the run the arguments name; a missing one is an error naming its stage."""
    # The config exactly as `vqvae2 run --preset P --root R --set ...` makes it.
    run = argparse.Namespace(preset=args.preset, root=args.root, set=args.set, config=None, source=None)
    return FinishedRun(build_config(run))
