"""`vqvae2`: the pipeline from a terminal, with Prefect in ephemeral mode (no server needed).

    vqvae2 run --preset smoke --root ./runs           # the whole pipeline; prints its run's name and the report
    vqvae2 run --source ./my-images --root ./runs     # your own images (classes, or none, from the data)
    vqvae2 ls --root ./runs                           # the finished runs under a root, newest first
    vqvae2 report --root ./runs [--key K]             # the newest run's report (or the run of key K)
    vqvae2 sample --root ./runs --class Sneaker -n 16  # writes sample-sneaker-16.png; --out names the file
    vqvae2 reconstruct --root ./runs --images a.png b.jpg --out recon.png
    vqvae2 stage train-priors --preset smoke --root ./runs
    vqvae2 verify --root ./runs --repair               # find damaged files, drop them: the next run remakes them

`report`, `sample` and `reconstruct` work on the runs recorded under --root: the newest, or
the one --key names by its report key (as `ls` lists it), a config key (as the UI's tables
carry it) or an artifact key, saying which kind it was; with --preset, --config or --source
they find the run of that config instead. A root that does not exist or cannot be read is
refused, naming it; one without a recorded run says so (a config nobody gave is never assumed).
Without --out, `sample` and `reconstruct` write here, naming the file after what they drew.
`--set KEY=VALUE` (repeatable) sets a pipeline field (`sample.num_samples=32`,
`storage.storage_options.endpoint_url=...`) or, for any other key, overrides the
model preset (`train_prior.steps=100`, `num_classes=0`). With a `PREFECT_API_URL` set, runs
are recorded on that server instead.

The config and its source are checked before anything runs: a bad field, a missing source
or a web server that does not answer fail in seconds, naming the field or the URL. Every
failure ends in one line on stderr, its cause and what to do; exit code 2 for bad input
(the config, the source, a missing file), 1 for anything else. `--debug` adds the traceback.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import traceback

from tasks.presets import PRESET_NAMES

from .command_config import checked_config
from .prefect_console import console_without_tracebacks, let_ephemeral_server_settle
from .run_commands import cmd_ls, cmd_reconstruct, cmd_report, cmd_sample, cmd_verify, print_metrics

# Nothing heavy is imported at the top: `vqvae2 --help`, and a bad option, answer at once;
# each command imports what it needs (torch, pydantic, Prefect) when it runs.

# Errors in what the user gave (the config, the source, a file named): exit code 2, as argparse's own.
BAD_INPUT: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse names the option in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def cmd_run(args: argparse.Namespace) -> None:
    config = checked_config(args)
    from flows.parameters import sections_of
    from flows.pipeline import run_name, vqvae2_pipeline
    from storage.fsutil import redact

    console_without_tracebacks(args.debug)
    # The flow run's own name (pipeline-brave-otter), chosen here so that it can be said first:
    # what to look for in Prefect's UI while the run goes on.
    name = run_name("pipeline")
    print(f"run {name}: preset {config.preset}, root {redact(config.storage.url)}")
    try:
        report = vqvae2_pipeline.with_options(flow_run_name=name)(**sections_of(config))
    except BaseException:
        print(f"run {name} did not finish", file=sys.stderr)
        raise
    print(f"\nrun {name} finished; report {report.key}: {report.markdown}\n        {report.report}")
    print_metrics(report.metrics)
    _print_report_link(report.key)


def _print_report_link(report_key: str) -> None:
    """The report's page in Prefect's UI, when the run was recorded on a server (not ephemeral)."""
    from tasks.machinery.reporting import latest_artifact_ui_url
    from tasks.stages.evaluate import report_ui_key

    if link := latest_artifact_ui_url(report_ui_key(report_key)):
        print(f"the report in Prefect's UI: {link}")


def cmd_stage(args: argparse.Namespace) -> None:
    config = checked_config(args)
    from pydantic_core import to_jsonable_python

    from flows.parameters import sections_of
    from flows.pipeline import STAGE_FLOWS, run_name

    console_without_tracebacks(args.debug)
    result = STAGE_FLOWS[args.name].with_options(flow_run_name=run_name(args.name))(**sections_of(config))
    print(json.dumps(to_jsonable_python(result), indent=2))


def cmd_node(args: argparse.Namespace) -> None:
    from tasks.machinery.process import serve_node

    raise SystemExit(serve_node(args.rdzv_endpoint, args.nnodes, args.node_rank, args.nproc_per_node, args.once))


class _StageNames:
    """The stage names, read from the stage declarations only when the `stage` command checks
    or lists them (`flows.stage_names`: without importing the stages, which takes seconds)."""

    def __iter__(self):
        from .stage_names import stage_names

        return iter(stage_names())

    def __contains__(self, name: object) -> bool:
        return name in list(self)


def parser() -> argparse.ArgumentParser:
    """The command line; building it imports nothing heavy (tests/test_cli.py checks it)."""
    # Options every command takes; a new command adds `parents=[...]` of what it needs.
    debugging = argparse.ArgumentParser(add_help=False)
    debugging.add_argument("--debug", action="store_true", help="on failure, print the traceback too")
    rooted = argparse.ArgumentParser(add_help=False, parents=[debugging])
    rooted.add_argument("--root", help="storage root: a local path or s3://bucket/prefix (default: ~/vqvae2-runs)")
    rooted.add_argument("--config", help="a JSON file with a whole pipeline config")
    rooted.add_argument("--set", action="append", metavar="KEY=VALUE", help="set a config field, e.g. "
                        "sample.num_samples=64, or override the model preset, e.g. num_classes=0 (repeatable)")
    common = argparse.ArgumentParser(add_help=False, parents=[rooted])
    common.add_argument("--preset", choices=PRESET_NAMES, metavar="NAME",
                        help=f"model and training preset: {', '.join(PRESET_NAMES)} (default: fashion-mnist)")
    common.add_argument("--source", metavar="URL", help="your images: a folder (flat, or a sub-folder per class), a "
                        "CSV/JSONL/Parquet list, or a .tar pattern; local, s3:// or http(s):// (source.url; "
                        "default: Fashion-MNIST)")
    finished = argparse.ArgumentParser(add_help=False, parents=[common])
    finished.add_argument("--key", metavar="KEY", help="the finished run under --root with this key, or a unique "
                          "start of it: its report key, as `vqvae2 ls` lists them, a config key, as the UI's tables "
                          "name them (trainings-KEY), or a stage's artifact key (default: the newest; with --preset, "
                          "--config or --source and no --key: the run of that config)")

    top = argparse.ArgumentParser(prog="vqvae2", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("run", parents=[common], help="run the whole pipeline").set_defaults(fn=cmd_run)
    stage = commands.add_parser("stage", parents=[common], help="run one stage on existing artifacts")
    stage.add_argument("name", choices=_StageNames(), metavar="NAME", help="the stage: %(choices)s")
    stage.set_defaults(fn=cmd_stage)

    listing = commands.add_parser("ls", parents=[rooted], help="list the finished runs under --root, newest first")
    listing.add_argument("--json", action="store_true", help="print them as JSON")
    listing.set_defaults(fn=cmd_ls)

    report = commands.add_parser("report", parents=[finished], help="print a finished run's report")
    report.add_argument("--json", action="store_true", help="the whole report.json")
    report.set_defaults(fn=cmd_report)

    sample = commands.add_parser("sample", parents=[finished], help="sample images from a finished run's priors")
    sample.add_argument("--class", dest="class_", metavar="CLASS", help="class name or index (default: the "
                        "classes in turn, as evenly as -n allows; the output says how many of each)")
    sample.add_argument("-n", type=_positive_int, default=16, help="number of images (default 16)")
    sample.add_argument("--out", help="PNG grid to write, a path or URL (default: named after what it draws, in "
                        "the current folder: sample-sneaker-16.png, sample-every-class-16.png)")
    sample.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the priors "
                        "(default 1.0; lower: safer, less varied images)")
    sample.add_argument("--top-k", type=_positive_int, help="draw each code from the k likeliest only (default: all)")
    sample.add_argument("--seed", type=int, default=0, help="random seed (default 0): the same seed, the same images")
    sample.add_argument("--batch-size", type=_positive_int, default=64, help="images drawn at a time (default 64)")
    sample.add_argument("--scale", type=_positive_int, default=4, help="enlarge the grid by this factor (default 4)")
    sample.set_defaults(fn=cmd_sample)

    recon = commands.add_parser("reconstruct", parents=[finished], help="reconstruct images with a finished run's "
                                "autoencoder")
    recon.add_argument("--images", nargs="*", metavar="FILE", help="image files (default: held-out test images)")
    recon.add_argument("--count", type=_positive_int, default=16, help="held-out images to use without --images "
                       "(default 16)")
    recon.add_argument("--out", help="PNG of originals and reconstructions side by side, a path or URL (default: "
                       "reconstructions-N.png in the current folder, N the number of images)")
    recon.add_argument("--scale", type=_positive_int, default=4, help="enlarge the picture by this factor (default 4)")
    recon.set_defaults(fn=cmd_reconstruct)

    verify = commands.add_parser("verify", parents=[common], help="check every finished artifact under --root "
                                 "against the sizes and SHA-256 digests recorded when it was made")
    verify.add_argument("--repair", action="store_true", help="drop the damaged files (and the completion marks "
                        "of their artifacts), so that the next run makes exactly them again")
    verify.set_defaults(fn=cmd_verify)

    node = commands.add_parser("node", parents=[debugging], help="on another machine: join the multi-node "
                               "trainings of a worker (training.nnodes > 1), one after another")
    node.add_argument("--rdzv-endpoint", required=True, metavar="HOST:PORT", help="the worker's training.rdzv_endpoint")
    node.add_argument("--nnodes", type=_positive_int, required=True, help="training.nnodes")
    node.add_argument("--node-rank", type=_positive_int, required=True, help="this machine's number, 1 to nnodes - 1")
    node.add_argument("--nproc-per-node", type=_positive_int, default=1, help="training.processes (default 1)")
    node.add_argument("--once", action="store_true", help="join one training, then exit with its code")
    node.set_defaults(fn=cmd_node)
    return top


def main(argv: list[str] | None = None) -> None:
    # Without a server, Prefect starts an ephemeral one; give it time on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    args = parser().parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        args.fn(args)
    except KeyboardInterrupt:
        print("vqvae2: interrupted; run the same command again to resume", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as error:  # every failure ends here: one line, the traceback only with --debug
        raise SystemExit(_failed(error, args.debug)) from None
    finally:
        let_ephemeral_server_settle(started)


def _failed(error: Exception, debug: bool) -> int:
    """Print what failed and what to do in one line (after the traceback with `--debug`);
    return the exit code: 2 for bad input, 1 otherwise."""
    from tasks.machinery.failures import advice, first_line  # light: no Prefect, no torch

    if debug:
        traceback.print_exception(error)
    bad_input = isinstance(error, BAD_INPUT)
    # The whole fix-it of a long message (a terminal wraps it), and a field to set named as on
    # this command line: `--set ingest.max_bad_fraction=0.05`.
    line = first_line(error, limit=2000, form="cli")
    cause = line if bad_input else f"{type(error).__name__}: {line}"
    more = "" if debug or bad_input else " (--debug shows the traceback)"
    print(f"vqvae2: {cause}; what to do: {advice(error, form='cli')}{more}", file=sys.stderr)
    return 2 if bad_input else 1


if __name__ == "__main__":
    main()
