"""Which config made which report: a small record per finished run, under the storage root.

    {root}/runs/<report key>.json

A pipeline run (or the evaluate stage flow) writes it when it finishes; `vqvae2 ls` lists
them, and `vqvae2 report | sample | reconstruct --root R [--key K]` read the artifacts a
record names, so they need neither the config again nor its source; K is any key a person
meets (`find_run`). Reading records takes no stage code (torch, Prefect): `ls` and `report`
answer in well under a second.

A record holds the part of the config that decides the artifacts (what the run lease
digests, `config.deciding_fields`, less the storage section and the source's storage options
and credentials block: how storage is reached, never what it holds, and nothing a secret
could hide in), the number of classes the model took, the folder of each stage's
artifact, and the report's paths and metrics; every path is relative to the root. So a
record reads the same wherever its root moves (a renamed folder, a sync to S3), and every
run of one config writes the same bytes: a record is written only when it changes, and a
re-run that finds everything Cached rewrites nothing. When its run finished is the
record's modification time. A run is known by its report's key: the name of its folder
`{root}/reports/<key>/`, of its record, and of its UI artifact `vqvae2-report-<key>` (one
key wherever a user meets the run); a source that grew makes a new report, so a new record
beside the old one.
"""
from __future__ import annotations

import datetime
import json
import os
import re
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar

from storage.artifacts import MANIFEST
from storage.fsutil import exists, find, join, modified_time, read_bytes, redact, write_bytes

from .manifests import Manifest, Record, RootURL, located
from .machinery.artifacts import ManifestError, read_typed

if TYPE_CHECKING:
    from .config import PipelineConfig, Runtime
    from .stage import Stage

M = TypeVar("M", bound=Manifest)

DIRECTORY = "runs"  # {root}/runs/: beside the stages' folders, none of them
FORMAT = "vqvae2-run/1"
# Source fields a record leaves out (with the whole storage section): how the source is
# reached, which says nothing of what it holds and is where credentials would go.
UNRECORDED_SOURCE = {"storage_options", "credentials_block"}


class RunRecord(Record):
    """What a finished run leaves under the root: which config made which report."""

    format: str = FORMAT
    key: str  # the report's key: its folder's name under reports/
    preset: str
    source: str  # the source's URL, or its kind when it has none (fashion-mnist)
    num_classes: int  # the model's, as the run took them from the data
    config: dict[str, Any]  # the artifact-deciding fields of the config the run ran with (its classes taken)
    artifacts: dict[str, str]  # stage instance (train-priors[0]) -> its folder, relative to the root
    report: RootURL  # report.json
    markdown: RootURL  # report.md
    metrics: dict[str, float | int]

    @property
    def sample_fid(self) -> float | None:
        value = self.metrics.get("sample_fid")
        return float(value) if value is not None else None


def recorded_config(config: PipelineConfig) -> dict[str, Any]:
    """The part of `config` a record keeps, as JSON data: what decides its artifacts, no root,
    no storage options, no credentials block name."""
    from .config import RUN_ONLY_FIELDS

    source = RUN_ONLY_FIELDS.get("source", set())
    exclude = {**RUN_ONLY_FIELDS, "storage": True,
               "source": True if source is True else {*source, *UNRECORDED_SOURCE}}
    return config.model_dump(mode="json", exclude=exclude)


def record_url(root: str, key: str) -> str:
    return join(root, DIRECTORY, f"{key}.json")


def record_run(config: PipelineConfig, runtime: Runtime, report: Manifest, source_digest: str) -> RunRecord:
    """Record that `config` (resolved: the classes it took from the data) made `report` from
    a source of content digest `source_digest`; written only when it differs from the record
    already there. Each stage's folder is named from the config's keys, which a run's own
    report must match."""
    from .stages import FINAL, stage_keys

    keys = stage_keys(config, source_digest)
    if keys[FINAL.name] != report.key:
        raise AssertionError(f"the report {report.key} is not the one this config's keys name ({keys[FINAL.name]})")
    directories = {stage.name: stage.directory for stage in _stages()}
    artifacts = {instance: f"{directories[instance.partition('[')[0]]}/{key}" for instance, key in keys.items()}
    record = RunRecord(
        key=report.key, preset=config.preset, source=redact(config.source.url or config.source.resolved_kind),
        num_classes=config.model.num_classes, config=recorded_config(config), artifacts=artifacts,
        report=report.report, markdown=report.markdown, metrics=report.metrics,
    )
    url, options = record_url(runtime.root, record.key), runtime.storage_options
    data = (record.model_dump_json(indent=1, context=located(runtime.root)) + "\n").encode()
    if not (exists(url, options) and read_bytes(url, options) == data):  # unchanged: not even touched
        write_bytes(url, data, options)
    return record


def _stages() -> tuple[Stage, ...]:
    from .stages import STAGES

    return STAGES


@dataclass(frozen=True)
class FinishedRecord:
    """A record found under a root, with when its run finished (its modification time)."""

    record: RunRecord
    url: str
    finished: datetime.datetime | None


def check_root(root: str, storage_options: dict[str, Any] | None = None) -> None:
    """Fail in one line naming `root` (never a credential) when it is not there to read: a
    path or bucket that does not exist (FileNotFoundError), or storage that refuses to be
    read (ValueError: the root or its credentials are the user's to fix). A command on
    finished runs then never reads a missing root as an empty one, nor guesses a config."""
    where = redact(root)
    try:
        there = exists(root, storage_options)
    except PermissionError:  # the storage's own words (codes, request ids) add nothing the user can act on
        raise ValueError(f"{where}: the storage root cannot be read (access denied): check --root, and the "
                         "credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or "
                         "storage.credentials_block)") from None
    if not there:
        raise FileNotFoundError(f"{where}: the storage root does not exist: check --root; `vqvae2 run --root {where}` "
                                "makes one (writes never create a bucket)")


def finished_runs(root: str, storage_options: dict[str, Any] | None = None) -> list[FinishedRecord]:
    """Every run recorded under `root`, newest first; a record that does not read is an error
    naming its file."""
    try:
        files = find(join(root, DIRECTORY), storage_options)
    except FileNotFoundError:
        return []
    found = []
    for name, info in files.items():
        if "/" in name or not name.endswith(".json"):
            continue  # an unfinished write (a temporary name) or anything else left there
        url = join(root, DIRECTORY, name)
        record = read_typed(url, RunRecord, storage_options, root)
        if record is None:  # removed since the listing
            continue
        seconds = modified_time(info)
        when = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc) if seconds is not None else None
        found.append(FinishedRecord(record, url, when))
    oldest = datetime.datetime.min.replace(tzinfo=datetime.timezone.utc)
    return sorted(found, key=lambda f: (f.finished or oldest, f.record.key), reverse=True)


@dataclass(frozen=True)
class FoundRun:
    """The run a command works on, and how `--key` named it when not by its report key."""

    run: FinishedRecord
    note: str | None = None  # `--key 0b8e is the config key ...`: said before the command's own output

    @property
    def record(self) -> RunRecord:
        return self.run.record


def find_run(root: str, storage_options: dict[str, Any] | None = None, key: str | None = None) -> FoundRun | None:
    """The newest run recorded under `root`, or the one `key` names: a report key (what
    `vqvae2 ls` lists), else a config key (the UI's `trainings-<config key>` tables), else an
    artifact key (a stage's folder, as the logs and turns name it), or a unique start of one;
    a UI artifact's whole key (`vqvae2-report-<key>`, `trainings-<key>`) will do. None when no
    run is recorded and no key is asked for; a key no run has is an error listing what is there."""
    runs = finished_runs(root, storage_options)
    if key is None:
        return FoundRun(runs[0]) if runs else None
    # A key as the UI or a log shows it, pasted whole: `trainings-<key>`, `autoencoder/<key>`.
    where, wanted = redact(root), re.split(r"[-/]", key.strip().lower())[-1]
    if not wanted:
        raise ValueError(f"--key {key!r}: no key in it; `vqvae2 ls --root {where}` lists the report keys")
    reports = [run for run in runs if run.record.key.startswith(wanted)]
    if len(reports) == 1:
        return FoundRun(reports[0])
    if reports:
        raise ValueError(f"--key {key}: {len(reports)} runs under {where} have report keys starting so "
                         f"({', '.join(run.record.key for run in reports)}): give more of the key")
    return _by_config_key(key, wanted, runs, root) or _by_artifact_key(key, wanted, runs, root) or _unknown(key, runs, root)


def _by_config_key(key: str, wanted: str, runs: list[FinishedRecord], root: str) -> FoundRun | None:
    matched: dict[str, list[FinishedRecord]] = {}
    for run in runs:
        for config in config_keys(run.record, root):
            if config.startswith(wanted):
                matched.setdefault(config, []).append(run)
    if not matched:
        return None
    if len(matched) > 1:
        raise ValueError(f"--key {key}: {len(matched)} config keys under {redact(root)} start so "
                         f"({', '.join(sorted(matched))}): give more of the key")
    ((config, made),) = matched.items()
    newest = made[0]  # the runs are newest first: a source that grew made a report a time
    reports = f"; the newest of its {len(made)} reports" if len(made) > 1 else ""
    return FoundRun(newest, f"--key {key} is the config key {config} (the UI's trainings-{config} tables){reports}; "
                            f"its report key is {newest.record.key}")


def _by_artifact_key(key: str, wanted: str, runs: list[FinishedRecord], root: str) -> FoundRun | None:
    matched: dict[str, set[str]] = {}  # folder -> the stage instances that name it
    users: dict[str, list[FinishedRecord]] = {}  # folder -> the runs that used it
    for run in runs:
        for instance, folder in run.record.artifacts.items():
            if folder.rstrip("/").rpartition("/")[2].startswith(wanted):
                matched.setdefault(folder, set()).add(instance)
                users.setdefault(folder, []).append(run)
    if not matched:
        return None
    if len(matched) > 1:
        raise ValueError(f"--key {key}: {len(matched)} artifacts under {redact(root)} have keys starting so "
                         f"({', '.join(sorted(matched))}): give more of the key")
    ((folder, instances),) = matched.items()
    what = f"--key {key} is the artifact key of {' and '.join(sorted(instances))} ({folder})"
    made = list({run.record.key: run for run in users[folder]}.values())
    if len(made) > 1:  # a dataset, say, that several configs share: which report is meant is not said
        raise ValueError(f"{what}, which {len(made)} recorded runs use (report keys "
                         f"{', '.join(run.record.key for run in made)}): give one of them with --key")
    return FoundRun(made[0], f"{what}; its run's report key is {made[0].record.key}")


def _unknown(key: str, runs: list[FinishedRecord], root: str) -> FoundRun:
    where = redact(root)
    shown = [f"{run.record.key} (config key {', '.join(config_keys(run.record, root)[:1]) or '?'})" for run in runs[:10]]
    known = ", ".join(shown) + (f" and {len(runs) - 10} more" if len(runs) > 10 else "") if runs else "none"
    raise FileNotFoundError(f"--key {key}: no finished run under {where} has that report, config or artifact key "
                            f"(recorded, report key first: {known}); `vqvae2 ls --root {where}` lists them")


def config_keys(record: RunRecord, root: str) -> list[str]:
    """The config keys (`tasks.config.config_key`) of the configs that make `record`'s run
    under `root`, as the UI's tables of their runs carry them, the recorded config's first;
    where the run took the dataset's classes, the config as it was given too (num_classes
    unset or auto: `with_dataset_classes`). They are computed, not recorded, so a record reads
    the same wherever its root moves; a root spelled otherwise when the run started (a
    relative path) had other keys, which the absolute path of a local root may still match."""
    from .config import config_key, validate_config

    roots = [root] + ([absolute] if "://" not in root and (absolute := os.path.abspath(root)) != root else [])
    overrides = record.config.get("overrides", {})
    given = [overrides]
    if "num_classes" in overrides:
        unset = {name: value for name, value in overrides.items() if name != "num_classes"}
        given += [{**unset, "num_classes": "auto"}, unset]
    keys: list[str] = []
    for where in roots:
        for chosen in given:
            try:
                config = validate_config({**record.config, "overrides": chosen, "storage": {"root": where}})
            except ValueError:  # a variant this release does not read: no key to match
                continue
            if (made := config_key(config)) not in keys:
                keys.append(made)
    return keys


class RecordedRun:
    """The artifacts of a recorded run, read from the folders its record names (the source is
    not read, nor are keys computed): what the CLI's commands use on a finished run, as they
    would a `FinishedRun`. `config` is the recorded config as the command completed it (root,
    storage, run-only settings), with the classes the run took."""

    def __init__(self, record: RunRecord, config: PipelineConfig) -> None:
        self.record = record
        taken = record.num_classes
        self.config = config if config.model.num_classes == taken else config.with_classes(taken)

    @cached_property
    def runtime(self) -> Runtime:
        from .config import Runtime

        return Runtime.of(self.config)

    def get(self, stage: Stage[M], variant: Any = None) -> M:
        """The output of `stage` (of one variant of a stage with variants) the record names."""
        from .machinery.artifacts import Artifact

        instance = stage.instance(variant)
        folder = self.record.artifacts.get(instance)
        if folder is None:
            raise ManifestError(f"{redact(record_url(self.runtime.root, self.record.key))}: field `artifacts`: "
                                f"no {instance}")
        directory, _, key = folder.rstrip("/").rpartition("/")
        artifact = Artifact(self.runtime.root, directory, key, dict(self.runtime.storage_options))
        return artifact.require(stage.output, stage.name)

    def report_data(self) -> dict[str, Any]:
        """The run's `report.json` as it is, read without the stages' code (torch, Prefect), so
        that `vqvae2 report` answers at once; its artifact must be complete (its manifest there),
        as `get` requires, and the fields the CLI prints present, else an error naming the file."""
        url, options = self.record.report, self.runtime.storage_options
        folder = url.rpartition("/")[0]
        if not exists(join(folder, MANIFEST), options):
            raise FileNotFoundError(f"{redact(folder)}: the report is not complete (no {MANIFEST}): run the `evaluate` "
                                    "stage (or the whole pipeline) with the run's config again")
        if not exists(url, options):
            raise FileNotFoundError(f"{redact(url)}: the report is gone; `vqvae2 verify --repair` and run the evaluate "
                                    "stage again")
        try:
            data = json.loads(read_bytes(url, options))
        except ValueError as err:
            raise ManifestError(f"{redact(url)}: not valid JSON ({err})") from None
        for field, kind in (("preset", str), ("dataset", dict), ("metrics", dict), ("training", list)):
            if not isinstance(data.get(field) if isinstance(data, dict) else None, kind):
                raise ManifestError(f"{redact(url)}: field `{field}`: missing, or not a {kind.__name__}")
        return data

    def every(self, stage: Stage[M]) -> list[M]:
        """The outputs of every variant of `stage` the record names, in its order (the run's)."""
        if stage.variants is None:
            return [self.get(stage)]
        prefix = f"{stage.name}["
        named = [name[len(prefix):-1] for name in self.record.artifacts if name.startswith(prefix)]
        return [self.get(stage, int(variant) if variant.isdigit() else variant) for variant in named]
