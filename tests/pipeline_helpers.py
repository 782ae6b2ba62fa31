"""Helpers for the pipeline tests: configs, and what the Prefect API recorded of a run."""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)

from tasks.config import PipelineConfig, pipeline_config


def smoke_config(root: str, **sections: Any) -> PipelineConfig:
    return pipeline_config("smoke", storage={"root": root, **sections.pop("storage", {})}, **sections)


def task_runs(flow_run_id: UUID, timeout: float = 60.0) -> dict[str, Any]:
    """{task run name: task run} of a flow run, once every state is final (the API records
    task states from events, a moment after the flow returns)."""
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            if runs and all(r.state is not None and r.state.is_final() for r in runs):
                return {r.name: r for r in runs}
            if time.monotonic() > deadline:
                raise AssertionError(f"task runs not final after {timeout}s: {[(r.name, r.state_name) for r in runs]}")
            time.sleep(0.5)


def state_names(flow_run_id: UUID) -> dict[str, str]:
    return {name: run.state.name for name, run in task_runs(flow_run_id).items()}


def artifacts(flow_run_id: UUID) -> list[Any]:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


def log_lines(flow_run_id: UUID, containing: str, at_least: int = 1, timeout: float = 30.0) -> list[str]:
    """The flow run's log messages that contain `containing`, once there are `at_least` of them
    (logs reach the API a moment after the run), or all there are after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            found = [log.message for log in logs if containing in log.message]
            if len(found) >= at_least or time.monotonic() > deadline:
                return found
            time.sleep(0.5)


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under a local root: (size, mtime in ns, SHA-256)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# What records how a run went, not what it made: the time a stage took, the step a
# training resumed from, whether a shard was found done by a later run, the Prefect block
# through which a cache record was written (one per storage root), and the digest of an
# artifact's inventory (which holds the byte digests of files compared here by what they
# mean: see `_content`).
# Everything else must be equal to the byte.
VOLATILE = {"seconds", "resumed_from_step", "reused", "storage_block_id", "inventory"}


def root_contents(root: Path) -> dict[str, str]:
    """{path under `root`: digest of what it holds}, equal for two roots that hold the same
    artifacts (`VOLATILE` fields aside): how a run after a fault is compared with an undisturbed one."""
    return {str(p.relative_to(root)): _content(p, root) for p in sorted(root.rglob("*")) if p.is_file()}


def _content(path: Path, root: Path) -> str:
    import torch

    if path.suffix == ".pt":  # torch.save lays out equal tensors in more than one way
        return _tensor_digest(torch.load(path, weights_only=True))
    data = path.read_bytes()
    if path.suffix in (".json", ".md"):
        text = data.decode().replace(str(root), "{root}")  # URLs written before paths were relative
        if path.name == "inventory.json":  # digests of the files compared here by what they mean, not their bytes
            text = json.dumps({k: v for k, v in json.loads(text).items() if not k.endswith((".pt", ".json", ".md"))},
                              sort_keys=True)
        elif path.suffix == ".json":
            text = json.dumps(_without_volatile(json.loads(text)), sort_keys=True)
        else:  # the report's table of trainings has a column of seconds
            text = re.sub(r"^(\| [\w-]+ \| \d+ \| )[\d.]+ \|", r"\1 |", text, flags=re.M)
        data = text.encode()
    return hashlib.sha256(data).hexdigest()


def _tensor_digest(value) -> str:
    import torch

    digest = hashlib.sha256()

    def feed(v) -> None:
        if isinstance(v, torch.Tensor):
            digest.update(f"{v.dtype}{tuple(v.shape)}".encode() + v.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(v, dict):
            for k in sorted(v, key=str):
                digest.update(repr(k).encode())
                feed(v[k])
        elif isinstance(v, (list, tuple)):
            for item in v:
                feed(item)
        else:
            digest.update(repr(v).encode())

    feed(value)
    return digest.hexdigest()


def _without_volatile(value):
    if isinstance(value, str) and value.startswith("{"):  # a cache record holds its result as JSON text
        with contextlib.suppress(ValueError):
            return _without_volatile(json.loads(value))
    if isinstance(value, dict):
        return {k: _without_volatile(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_without_volatile(v) for v in value]
    return value


def differences(ours: Path, theirs: Path, within: list[str] | None = None) -> dict[str, list[str]]:
    """What differs between two roots: files only one has, and files whose content differs;
    only the files and folders `within` names (paths relative to the roots), if given."""
    mine, other = root_contents(ours), root_contents(theirs)
    if within is not None:
        def inside(rel: str) -> bool:
            return any(rel == path or rel.startswith(f"{path}/") for path in within)

        mine, other = ({rel: v for rel, v in found.items() if inside(rel)} for found in (mine, other))
    return {"only here": sorted(set(mine) - set(other)), "missing": sorted(set(other) - set(mine)),
            "differ": sorted(rel for rel in mine.keys() & other.keys() if mine[rel] != other[rel])}
