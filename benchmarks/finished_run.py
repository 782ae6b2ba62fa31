"""What the scripts that measure a finished run share: naming the run on the command line
(`--root`, `--preset`, `--set` as `vqvae2 run` took them) and finding its artifacts."""
from __future__ import annotations

import argparse
import json

from tasks.config import pipeline_config
from tasks.stages import FinishedRun


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="the storage root the run wrote to")
    parser.add_argument("--preset", default="fashion-mnist")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="the run's overrides, as `vqvae2 run --set` took them (values in JSON)")


def finished_run(args: argparse.Namespace) -> FinishedRun:
    """The artifacts of the run the arguments name; a missing one is an error naming its stage."""
    overrides = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.set)}
    return FinishedRun(pipeline_config(args.preset, storage={"root": args.root}, overrides=overrides))
