"""The config a command works on, from its options: `--preset`, `--config`, `--root`,
`--source` and `--set KEY=VALUE`, or the run recorded under `--root` that `--key` names.
Each is checked before anything runs, naming the option or field at fault."""
from __future__ import annotations

import argparse
import json
import sys
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
            _set_field(data, key, parse_value(raw))
        else:
            data.setdefault("overrides", {})[key] = parse_value(raw)
    return validate_config(data)


def _set_field(data: dict[str, Any], key: str, value: Any) -> None:
    """Set a section's field, or an entry of a dict field by its dotted key
    (`storage.storage_options.endpoint_url=...`): the config then checks it as a whole
    (a credential there is refused naming it), instead of taking the dotted name for an
    unknown field."""
    *parents, leaf = key.split(".")
    node = data
    for name in parents:
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {key}: {name} is not an object of settings, so nothing can be set inside it")
    node[leaf] = value


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
    --set that changes what it made means the run of that config instead. With one of them,
    the run of the config the options give, found from its keys. A root that is not there,
    or holds no recorded run when no config is given, fails naming it: the default config,
    which nobody gave, is never guessed."""
    from storage.fsutil import redact
    from tasks.config import Runtime, validate_config
    from tasks.runs import RecordedRun, check_root, find_run, recorded_config, record_url

    if args.key is None and (args.preset or args.config or args.source):
        config = checked_config(args)  # the config's own faults first: they name the field
        check_root(config.storage.url, Runtime.of(config).storage_options)
        return _finished_run_of(config)
    runtime = Runtime.of(build_config(args))  # where the records are, and how to read them
    check_root(runtime.root, runtime.storage_options)
    found = find_run(runtime.root, runtime.storage_options, args.key)
    if found is not None and found.note:
        print(found.note, file=sys.stderr)  # which kind of key --key was: stdout stays the command's (--json)
    if found is None:
        where = redact(runtime.root)
        raise FileNotFoundError(f"no finished run is recorded under {where}: run `vqvae2 run --root {where}` first, "
                                "or name the run's config with --preset, --config or --source")
    try:
        recorded = validate_config({**found.record.config, "storage": {"root": runtime.storage.root}})
    except ValueError as err:
        raise ValueError(f"{record_url(runtime.root, found.record.key)}: the recorded config does not read ({err}); "
                         "give the run's config with --preset and --set, or --config") from None
    config = build_config(args, base=found.record.config)
    if recorded_config(config) != recorded_config(recorded):
        config.check_source()
        return _finished_run_of(config)
    # Its artifacts read from the folders the record names: no stage code (torch, Prefect) is
    # imported until a command needs a model.
    return RecordedRun(found.record, config)


def _finished_run_of(config):
    """The run of `config`, its artifacts found from its keys (the stages' code: seconds to import)."""
    from tasks.stages import FinishedRun

    return FinishedRun(config)
