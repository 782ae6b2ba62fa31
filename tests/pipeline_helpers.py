"""Helpers for the pipeline tests: configs, and what the Prefect API recorded of a run."""
from __future__ import annotations

import hashlib
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
