"""`vqvae2`: the pipeline from a terminal, with Prefect in ephemeral mode (no server needed).

    vqvae2 run --preset smoke --root ./runs           # the whole pipeline; prints its run's name and the report
    vqvae2 run --source ./my-images --root ./runs     # your own images (classes, or none, from the data)
    vqvae2 ls --root ./runs                           # the finished runs under a root, newest first
    vqvae2 report --root ./runs [--key K]             # the newest run's report (or config key K's)
    vqvae2 sample --root ./runs --class Sneaker -n 16 --out sneakers.png   # without --class: every class
    vqvae2 reconstruct --root ./runs --images a.png b.jpg --out recon.png
    vqvae2 stage train-priors --preset smoke --root ./runs
    vqvae2 verify --root ./runs --repair               # find damaged files, drop them: the next run remakes them

`report`, `sample` and `reconstruct` work on the runs recorded under --root (the newest, or
--key's); with --preset, --config or --source they find the run of that config instead.
`--set KEY=VALUE` (repeatable) sets a pipeline field (`sample.num_samples=32`,
`storage.storage_options={"endpoint_url": "..."}`) or, for any other key, overrides the
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
import logging
import os
import sys
import time
import traceback
from typing import Any

from tasks.presets import PRESET_NAMES

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


def build_config(args: argparse.Namespace, base: dict[str, Any] | None = None):
    """The pipeline config of the options (over `base`, a recorded run's config); a bad one
    fails naming the option or the field (`--set` key)."""
    from tasks.config import validate_config
    from tasks.setting_forms import SECTIONS, parse_value

    data: dict[str, Any] = json.loads(json.dumps(base or {}))  # a copy: the sections below are changed in place
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as file:
                data = json.load(file)
        except OSError as err:
            raise ValueError(f"--config {args.config}: {err.strerror or err}") from None
        except ValueError as err:  # malformed JSON (json.JSONDecodeError) or not UTF-8
            raise ValueError(f"--config {args.config}: not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"--config {args.config}: expected a JSON object, got {type(data).__name__}")
    if getattr(args, "preset", None):
        data["preset"] = args.preset
    if args.root is not None:  # an empty one is refused by the config, not ignored
        data.setdefault("storage", {})["root"] = args.root
    if getattr(args, "source", None) is not None:
        data.setdefault("source", {})["url"] = args.source
    for item in args.set or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        section, _, field = key.partition(".")
        if section in SECTIONS and field:
            data.setdefault(section, {})[field] = parse_value(raw)
        else:
            data.setdefault("overrides", {})[key] = parse_value(raw)
    return validate_config(data)


def checked_config(args: argparse.Namespace):
    """The config, with its source checked (`PipelineConfig.check_source`): a missing one, a
    server that does not answer, or a Dask runner without a Prefect server fails here in
    seconds, before Prefect starts."""
    from tasks.machinery.dask import check_dask_runner

    config = build_config(args)
    check_dask_runner(config.runner.dask_address)
    config.check_source()
    return config


def _write(path: str, png: bytes) -> None:
    from storage.fsutil import write_bytes

    write_bytes(path, png)
    print(f"wrote {path}")


def cmd_run(args: argparse.Namespace) -> None:
    config = checked_config(args)
    from flows.parameters import sections_of
    from flows.pipeline import vqvae2_pipeline
    from storage.fsutil import redact

    _console_without_tracebacks(args.debug)
    # The flow run's own name (pipeline-brave-otter), chosen here so that it can be said first:
    # what to look for in Prefect's UI while the run goes on.
    name = vqvae2_pipeline.flow_run_name()
    print(f"run {name}: preset {config.preset}, root {redact(config.storage.url)}")
    try:
        report = vqvae2_pipeline.with_options(flow_run_name=name)(**sections_of(config))
    except BaseException:
        print(f"run {name} did not finish", file=sys.stderr)
        raise
    print(f"\nrun {name} finished; report {report.key}: {report.markdown}\n        {report.report}")
    _print_metrics(report.metrics)
    _print_report_link(report.key)


def _print_report_link(report_key: str) -> None:
    """The report's page in Prefect's UI, when the run was recorded on a server (not ephemeral)."""
    from tasks.machinery.reporting import latest_artifact_ui_url
    from tasks.stages.evaluate import report_ui_key

    if link := latest_artifact_ui_url(report_ui_key(report_key)):
        print(f"the report in Prefect's UI: {link}")


def _print_metrics(metrics: dict[str, Any]) -> None:
    from tasks.machinery.rounding import rounded

    for name, value in metrics.items():
        print(f"  {name:32s} {rounded(value)}")


def cmd_stage(args: argparse.Namespace) -> None:
    config = checked_config(args)
    from pydantic_core import to_jsonable_python

    from flows.parameters import sections_of
    from flows.pipeline import STAGE_FLOWS

    _console_without_tracebacks(args.debug)
    result = STAGE_FLOWS[args.name](**sections_of(config))
    print(json.dumps(to_jsonable_python(result), indent=2))


def finished_run(args: argparse.Namespace):
    """The finished run a command works on. Without --preset, --config or --source: a run
    recorded under --root (the newest, or the one --key names), its artifacts read from the
    folders its record names; the other options complete its config (storage, device), and a
    --set that changes what it made means the run of that config instead. Otherwise, or
    when nothing is recorded there, the run of the config the options give, found from its keys."""
    from tasks.config import Runtime, validate_config
    from tasks.runs import RecordedRun, find_run, recorded_config, record_url
    from tasks.stages import FinishedRun

    if args.key is None and (args.preset or args.config or args.source):
        return FinishedRun(checked_config(args))
    runtime = Runtime.of(build_config(args))  # where the records are, and how to read them
    found = find_run(runtime.root, runtime.storage_options, args.key)
    if found is None:
        return FinishedRun(checked_config(args))
    try:
        recorded = validate_config({**found.record.config, "storage": {"root": runtime.storage.root}})
    except ValueError as err:
        raise ValueError(f"{record_url(runtime.root, found.record.key)}: the recorded config does not read ({err}); "
                         "give the run's config with --preset and --set, or --config") from None
    config = build_config(args, base=found.record.config)
    if recorded_config(config) != recorded_config(recorded):
        config.check_source()
        return FinishedRun(config)
    return RecordedRun(found.record, config)


def _class_index(value: str, class_names: list[str]) -> int:
    if value.isdigit() and int(value) < len(class_names):
        return int(value)
    lowered = [name.lower() for name in class_names]
    if value.lower() in lowered:
        return lowered.index(value.lower())
    raise ValueError(f"unknown class {value!r}; the dataset has: {', '.join(class_names)}")


def _sample_labels(n: int, class_index: int | None, num_classes: int) -> list[int] | None:
    """The class of each of `n` images: all `class_index`, or (None) every class in order,
    evenly, the first ones one more (as the sample stage spreads them); None: unconditional."""
    if not num_classes:
        return None
    if class_index is not None:
        return [class_index] * n
    base, extra = divmod(n, num_classes)
    return [c for c in range(num_classes) for _ in range(base + (c < extra))]


def cmd_sample(args: argparse.Namespace) -> None:
    finished = finished_run(args)  # before the imports below, which take seconds
    import torch
    from tqdm import tqdm

    import vqvae2
    from tasks.machinery.devices import resolve_device
    from tasks.machinery.models import load_model
    from tasks.machinery.reporting import image_grid, png_bytes
    from tasks.stages import ingest, train_autoencoder, train_prior

    config, names = finished.config, finished.get(ingest.STAGE).class_names
    options, device = finished.runtime.storage_options, resolve_device(config.training.device)
    if args.class_ is not None and not config.model.num_classes:
        raise ValueError(f"--class {args.class_}: the priors are unconditional (num_classes=0): leave --class out")
    chosen = _class_index(args.class_, names) if args.class_ is not None else None
    labels = _sample_labels(args.n, chosen, config.model.num_classes)
    autoencoder = load_model(finished.get(train_autoencoder.STAGE), options, device)
    priors = [load_model(p, options, device) for p in finished.every(train_prior.STAGE)]
    images = []
    with tqdm(total=args.n, desc="sampling", unit="image") as bar:
        for first in range(0, args.n, args.batch_size):
            size = min(args.batch_size, args.n - first)
            batch_labels = torch.tensor(labels[first:first + size], device=device) if labels is not None else None
            batch, _ = vqvae2.sample_images(autoencoder, priors, size, labels=batch_labels,
                                            temperature=args.temperature, top_k=args.top_k, seed=args.seed + first)
            images.append(batch.cpu())
            bar.update(size)
    if labels is not None and chosen is None:
        print(f"{args.n} images of every class ({len(names)}), in class order: {', '.join(names)}")
    _write(args.out, png_bytes(image_grid(torch.cat(images)), scale=args.scale))


def cmd_reconstruct(args: argparse.Namespace) -> None:
    finished = finished_run(args)
    import numpy as np
    import torch

    from storage.fsutil import read_bytes
    from storage.imaging import decode_image, prepare
    from tasks.machinery.models import load_model, reconstruct
    from tasks.machinery.reporting import pairs_grid, png_bytes
    from tasks.stages import ingest, train_autoencoder

    config = finished.config
    model = load_model(finished.get(train_autoencoder.STAGE), finished.runtime.storage_options)
    if args.images:
        mode = "L" if config.model.image_channels == 1 else "RGB"
        arrays = [decode_image(prepare(read_bytes(path), config.model.image_size, mode)[0]) for path in args.images]
        images = torch.from_numpy(np.stack([a.reshape(a.shape[0], a.shape[1], -1) for a in arrays])).permute(0, 3, 1, 2)
        images = images.float() / 255
    else:
        images, _ = finished.get(ingest.STAGE).first_images("test", args.count, finished.runtime.storage_options)
    recon = reconstruct(model, images)
    mse = torch.nn.functional.mse_loss(recon, images).item()
    print(f"{len(images)} images, reconstruction MSE {mse:.4g}")
    _write(args.out, png_bytes(pairs_grid(images, recon, 2 * len(images)), scale=args.scale))


def cmd_report(args: argparse.Namespace) -> None:
    finished = finished_run(args)
    from tasks.stages import evaluate

    manifest = finished.get(evaluate.STAGE)
    report = evaluate.read_report(manifest, finished.runtime.storage_options)
    if args.json:
        print(json.dumps(report.model_dump(mode="json"), indent=2))
        return
    recorded = getattr(finished, "record", None)
    key = f" {recorded.key}" if recorded is not None else ""
    print(f"report of the {report.preset} run{key} on dataset {report.dataset.key}: {manifest.markdown}")
    _print_metrics(report.metrics)
    for row in report.training:
        print(f"  trained {row['stage']:20s} {row['steps']} steps")


def cmd_ls(args: argparse.Namespace) -> None:
    from storage.fsutil import redact
    from tasks.config import Runtime
    from tasks.runs import finished_runs

    runtime = Runtime.of(build_config(args))
    runs = finished_runs(runtime.root, runtime.storage_options)
    rows = [{"key": run.record.key, "preset": run.record.preset, "source": run.record.source,
             "finished": run.finished.isoformat(timespec="seconds") if run.finished else None,
             "sample_fid": run.record.sample_fid, "report": redact(run.record.markdown),
             "report_json": redact(run.record.report), "num_classes": run.record.num_classes}
            for run in runs]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print(f"no finished runs under {redact(runtime.root)}")
        return
    header = ("KEY", "PRESET", "SOURCE", "FINISHED", "SAMPLE FID", "REPORT")
    cells = [header] + [(r["key"], r["preset"], r["source"], _local_time(run.finished), _number(r["sample_fid"]),
                         r["report"]) for r, run in zip(rows, runs)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header) - 1)]
    for row in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])


def _local_time(when: datetime.datetime | None) -> str:
    return when.astimezone().strftime("%Y-%m-%d %H:%M") if when else "-"


def _number(value: float | None) -> str:
    from tasks.machinery.rounding import rounded

    return rounded(value) if value is not None else "-"


def cmd_verify(args: argparse.Namespace) -> None:
    from storage.fsutil import redact
    from tasks.config import Runtime
    from tasks.verify import repair, verify_root

    runtime = Runtime.of(build_config(args))
    root = redact(runtime.root)
    checked = verify_root(runtime.root, runtime.storage_options)
    print(f"checked {len(checked)} finished artifacts ({sum(c.files for c in checked)} files) under {root}")
    unrecorded = [c.artifact for c in checked if not c.recorded]
    if unrecorded:
        print(f"  not checked: {len(unrecorded)} made before vqvae2 recorded their files' digests: "
              + ", ".join(f"{a.directory}/{a.key}" for a in unrecorded))
    damaged = [(c.artifact, d) for c in checked for d in c.damaged]
    for artifact, problem in damaged:
        print(f"  damaged: {redact(artifact.path(problem.path))}: {problem.what}")
    if not damaged:
        print("nothing is damaged")
        return
    if not args.repair:
        files = "1 damaged file" if len(damaged) == 1 else f"{len(damaged)} damaged files"
        print(f"{files}: `vqvae2 verify --root {root} --repair` drops them, and the next run of the config that made "
              "them makes them again")
        raise SystemExit(1)
    removed = repair(checked)
    artifacts = sorted({f"{a.directory}/{a.key}" for a, _ in damaged})
    print(f"repaired: dropped {len(removed)} files of {', '.join(artifacts)}; the next run of the config that made "
          "them makes them again (the rest is reused)")


def cmd_node(args: argparse.Namespace) -> None:
    from tasks.machinery.process import serve_node

    raise SystemExit(serve_node(args.rdzv_endpoint, args.nnodes, args.node_rank, args.nproc_per_node, args.once))


class _StageNames:
    """The stage names, from the stage declarations, read only when the `stage` command checks
    or lists them: importing the stages (Prefect, torch) takes seconds, which a bad option
    of any other command should not wait for."""

    def _names(self) -> list[str]:
        from flows.pipeline import STAGE_FLOWS

        return list(STAGE_FLOWS)

    def __iter__(self):
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()


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
    finished.add_argument("--key", metavar="KEY", help="the finished run under --root with this config key (or a "
                          "unique start of it), as `vqvae2 ls` lists them (default: the newest; with --preset, "
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
    sample.add_argument("--class", dest="class_", metavar="CLASS", help="class name or index (default: every "
                        "class in turn, evenly)")
    sample.add_argument("-n", type=_positive_int, default=16, help="number of images (default 16)")
    sample.add_argument("--out", required=True, help="PNG grid to write (path or URL)")
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
    recon.add_argument("--out", required=True, help="PNG of originals and reconstructions side by side")
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
        _let_ephemeral_server_settle(started)


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


class _WithoutTraceback(logging.Formatter):
    """A console formatter that leaves out a record's traceback: Prefect logs a failed task's
    with it, and the CLI's last line already says what failed. The run's logs on the Prefect
    server keep it (their handler formats the same record in full)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _console_without_tracebacks(debug: bool) -> None:
    """Keep tracebacks off the terminal unless `--debug` (after Prefect, once imported, set up its logging)."""
    if debug:
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler.formatter, _WithoutTraceback):
            handler.setFormatter(_WithoutTraceback(handler.formatter or logging.Formatter()))


def _let_ephemeral_server_settle(since: datetime.datetime, timeout: float = 60.0) -> None:
    """Wait until the temporary server has recorded every task run of this process.

    Prefect stops its ephemeral server as the process exits. On a busy machine the server
    records task-run events seconds behind the runs; stopping it then cancels those
    writes, the local history misses states and the server prints tracebacks after a
    successful run.

    It finds the temporary server through a private name of Prefect (tested on 3.9,
    `prefect.server.api.server.SubprocessASGIServer._instances`); if that name changes it
    warns in one line and does not wait.
    """
    if os.environ.get("PREFECT_API_URL") or "prefect" not in sys.modules:
        return  # a real server records runs itself; without Prefect loaded no temporary one started
    import importlib.util

    name = "prefect.server.api.server"
    try:
        module = sys.modules.get(name)
        if module is None:  # not imported: no temporary server was started, unless Prefect moved it
            if importlib.util.find_spec(name) is None:
                raise ImportError(f"no module {name}")
            return
        instances = module.SubprocessASGIServer._instances
        if not isinstance(instances, dict):
            raise TypeError(f"SubprocessASGIServer._instances is a {type(instances).__name__}, not a dict")
        running = any(server.running for server in instances.values())
    except (ImportError, AttributeError, TypeError) as err:
        version = getattr(sys.modules["prefect"], "__version__", "unknown")
        print(f"vqvae2: cannot tell whether Prefect's temporary server is still recording (Prefect {version}); "
              f"not waiting for it, the local run history may miss the last task states ({err})", file=sys.stderr)
        return
    if not running:
        return  # no temporary server was started
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterStartTime,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=10)
    unfinished = TaskRunFilter(
        state=TaskRunFilterState(
            type=TaskRunFilterStateType(any_=[StateType.PENDING, StateType.RUNNING, StateType.SCHEDULED])
        )
    )
    ours = FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since))
    deadline = time.monotonic() + timeout
    try:
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                if not client.read_task_runs(task_run_filter=unfinished, flow_run_filter=ours, limit=1):
                    return
                time.sleep(0.5)
    except Exception as err:  # the run's own outcome matters more than its history
        print(f"vqvae2: could not wait for the temporary Prefect server: {err}", file=sys.stderr)


if __name__ == "__main__":
    main()
