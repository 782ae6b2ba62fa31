"""The config a command works on, from its options: `--preset`, `--config`, `--root`,
`--source` and `--set KEY=VALUE`, or the run recorded under `--root` that `--key` names.
Each is checked before anything runs, naming the option or field at fault."""
from __future__ import annotations

import argparse
import json
from typing import Any


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
