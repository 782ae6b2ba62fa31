"""Two shims between the CLI and Prefect's own console and temporary server: tracebacks kept
off the terminal (the CLI's last line says what failed), and a wait before Prefect stops its
temporary server, until the server has recorded this process's task runs."""
from __future__ import annotations

import datetime
import logging
import os
import sys
import time


class WithoutTraceback(logging.Formatter):
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


def console_without_tracebacks(debug: bool) -> None:
    """Keep tracebacks off the terminal unless `--debug` (after Prefect, once imported, set up its logging)."""
    if debug:
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler.formatter, WithoutTraceback):
            handler.setFormatter(WithoutTraceback(handler.formatter or logging.Formatter()))


def let_ephemeral_server_settle(since: datetime.datetime, timeout: float = 60.0) -> None:
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
