"""Mapped and concurrent tasks on a Dask cluster (`runner.dask_address`), sent by reference.

A task and its arguments reach a Dask worker pickled. Dask tries plain `pickle` first and
falls back to cloudpickle, which copies by value whatever plain pickle cannot name: a
function's whole module globals, sometimes objects that do not pickle at all. Everything
the pipeline sends is meant to pickle by reference (tasks are module-level objects, their
arguments typed configs and manifests), so this runner checks each submission with plain
`pickle` first and refuses what would not pickle in one line, naming the task and the
object, instead of Dask's "Could not serialize object of type LLGExpr".

The workers record their task runs through the flow's Prefect API, so a run on Dask needs
a Prefect server they reach (`PREFECT_API_URL`): in Prefect's ephemeral mode every worker
process would start a temporary server of its own, and leave it running if killed.
"""
from __future__ import annotations

import pickle
from typing import Any

from prefect.futures import PrefectFuture
from prefect.settings import get_current_settings
from prefect.utilities.collections import visit_collection
from prefect_dask import DaskTaskRunner


def check_dask_runner(dask_address: str | None) -> None:
    """Refuse a Dask run without a Prefect server, before anything starts."""
    if dask_address and not get_current_settings().api.url:
        raise ValueError(
            f"runner.dask_address is {dask_address}, but Prefect runs without a server here (no PREFECT_API_URL): "
            "each Dask worker process would start a temporary Prefect server of its own. Start one the workers "
            "reach (`prefect server start --host 0.0.0.0`) and set PREFECT_API_URL=http://HOST:4200/api for this "
            "run, or leave runner.dask_address unset to run on this machine's thread pool")


class NotSendable(TypeError):
    """A task, or one of its arguments, that cannot be sent to a Dask worker by reference."""


class ByReferenceDaskTaskRunner(DaskTaskRunner):
    """Prefect's DaskTaskRunner, refusing a submission that does not pickle by reference."""

    def submit(self, task: Any, parameters: dict[str, Any], wait_for: Any = None, dependencies: Any = None) -> Any:
        check_sendable(task, parameters)
        return super().submit(task, parameters, wait_for, dependencies)


def check_sendable(task: Any, parameters: dict[str, Any]) -> None:
    """Raise `NotSendable` naming the task and the first object plain `pickle` cannot send:
    the task itself, or an argument (a future of an earlier task is sent as its key)."""
    parameters = visit_collection(parameters, _future_as_key, return_data=True)
    for what, value in [("the task itself", task), *((f"its argument {name!r}", v) for name, v in parameters.items())]:
        try:
            pickle.dumps(value)
        except (pickle.PicklingError, TypeError, AttributeError) as err:
            raise NotSendable(f"task {task.name!r} cannot be sent to a Dask worker: {what} ({type(value).__name__}) "
                              f"does not pickle by reference: {err}") from None


def _future_as_key(value: Any) -> Any:
    return value.task_run_id if isinstance(value, PrefectFuture) else value
