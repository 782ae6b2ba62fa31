"""A failed run's last word in the UI: a short Markdown artifact (`vqvae2-failure`) saying
in which stage it failed, why (the first line of the error, and its type) and what to do.

    # vqvae2 run failed in stage `ingest`
    ...ShardError: /data/tars/00001.tar: the shard is truncated ...
    What to do: fix the cause named above and run again: finished stages are reused.

A field to set is named as a deployment's run parameters (`{"ingest": {"max_bad_fraction":
0.05}}`), the form a run started from the UI or `prefect deployment run --params` takes;
the CLI names it `--set ingest.max_bad_fraction=0.05` (`tasks.setting_forms`).

No traceback (the run's logs have it, at level DEBUG) and nothing of the config: errors
that name a storage URL already have its credentials removed, and `storage.fsutil.redact`
removes a ``user:password@`` left anywhere in the line here too. Notifications are Prefect
automations on the run's Failed state (docs/reliability.md), not code.

The run's logs say it once: one ERROR record, `vqvae2 run failed in stage ingest: <why>;
what to do: <advice>`. Prefect's own records of the same failure (the flow's "Encountered
exception during execution", a worker's "Engine execution exited with unexpected
exception", a task's "Task run failed with exception", each with its traceback, and a
task's "Finished in state Failed") are kept, one level down (`OneErrorRecord`).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from ..setting_forms import Form
from .cached import RETRIES
from .failures import first_line
from .failures import advice as advice_after
from .reporting import logger, publish_markdown

KEY = "vqvae2-failure"


FORM: Form = "parameters"  # how the UI's reader sets a field: a run's parameters, section by section


def advice(error: BaseException) -> str:
    """What to do about an error that ended a stage, after its retries (`tasks.machinery.failures.advice`)."""
    return advice_after(error, RETRIES, form=FORM)


def failure_markdown(error: BaseException, stage: str | None) -> str:
    where = f"in stage `{stage}`" if stage else "before its stages started"
    line = first_line(error, form=FORM).replace("```", "'''")
    return "\n".join([
        f"# vqvae2 run failed {where}",
        "",
        f"**Why** (`{type(error).__name__}`):",
        "",
        "```text",
        line,
        "```",
        "",
        f"**What to do:** {advice(error)}",
        "",
        "The full traceback is in the run's logs, at level DEBUG.",
        "",
    ])


def failure_line(error: BaseException, stage: str | None) -> str:
    """The card in one line: the run's one ERROR record of its failure."""
    where = f"in stage {stage}" if stage else "before its stages started"
    return f"vqvae2 run failed {where}: {type(error).__name__}: {first_line(error, form=FORM)}; " \
           f"what to do: {advice(error)}"


def publish_failure(error: BaseException, stage: str | None) -> None:
    """Publish the failure artifact and log the failure's one ERROR record; a failure to
    publish is logged, never raised over `error`."""
    try:
        publish_markdown(KEY, failure_markdown(error, stage), description="Why this vqvae2 run failed, and what to do")
    except Exception as err:  # noqa: BLE001 - the run's own error matters more than its report
        logger().warning(f"could not publish the failure report: {type(err).__name__}: {first_line(err)}")
    logger().error(failure_line(error, stage))


STAGE_NOTE = "in vqvae2 stage: "  # the note `failing_in` adds to an error; a traceback shows it too


@contextlib.contextmanager
def failing_in(stage: str) -> Iterator[None]:
    """Errors leaving this block come from `stage` (noted on the error, PEP 678), unless an
    inner block named theirs: a stage waiting on another's output re-raises that one's error."""
    try:
        yield
    except Exception as error:
        if failed_stage(error) is None:
            error.add_note(f"{STAGE_NOTE}{stage}")
        raise


def failed_stage(error: BaseException) -> str | None:
    """The stage `error` came from, if a `failing_in` block named it."""
    notes = getattr(error, "__notes__", ())
    return next((note.removeprefix(STAGE_NOTE) for note in notes if note.startswith(STAGE_NOTE)), None)


@contextlib.contextmanager
def reported_failure(stage: str | None = None) -> Iterator[None]:
    """Publish the failure artifact of an error leaving this block, and log its ERROR record,
    then re-raise it unchanged: the run still ends Failed with its own error. It names the
    stage a `failing_in` block noted, else `stage`. An error an inner block reported already
    is not reported again."""
    try:
        yield
    except Exception as error:
        if not was_reported(error):
            with contextlib.suppress(AttributeError):  # an attribute, not a note: tracebacks need not show it
                error._vqvae2_reported = True  # type: ignore[attr-defined]
            publish_failure(error, failed_stage(error) or stage)
        raise


def was_reported(error: BaseException) -> bool:
    return getattr(error, "_vqvae2_reported", False) is True


FLOW_NAME = "vqvae2"  # every flow's name in Prefect (`flows.pipeline`)
TASK_RUNS, FLOW_RUNS = "prefect.task_runs", "prefect.flow_runs"  # the loggers of Prefect's engines


class OneErrorRecord(logging.Filter):
    """Prefect's own ERROR records of a failure vqvae2 reports itself, one level down, so that
    a failed run shows one ERROR record: `publish_failure`'s, with the why and what to do.

    - A flow's record with the traceback of a reported error (the flow engine's, and a
      worker's "Engine execution exited with unexpected exception"): DEBUG, where the
      traceback stays for whoever looks for it.
    - A task's record of an exception in a vqvae2 run: DEBUG with its traceback, INFO for its
      "Finished in state Failed(...)", as Prefect logs a flow's. A task's failure is its
      flow's to report: the flow reports it or lives with it.

    What vqvae2 does not report stays an ERROR: a crash (an interrupt, a killed process: no
    `Exception`), a timeout, a failure of Prefect's own around the flow."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.ERROR:
            return True
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, Exception) and (was_reported(error) or _task_of_ours(record)):
            _demote(record, logging.DEBUG)
        elif error is None and _task_of_ours(record) and str(record.msg).startswith("Finished in state Failed("):
            _demote(record, logging.INFO)
        return True


def _task_of_ours(record: logging.LogRecord) -> bool:
    """A task run's record in a run of a vqvae2 flow (`vqvae2`, `vqvae2-pipeline-on-dask`)."""
    flow = str(getattr(record, "flow_name", ""))
    return record.name == TASK_RUNS and (flow == FLOW_NAME or flow.startswith(f"{FLOW_NAME}-"))


def _demote(record: logging.LogRecord, level: int) -> None:
    record.levelno, record.levelname = level, logging.getLevelName(level)


def _install() -> None:
    """On the engines' loggers themselves: a filter there sees their records before any
    handler (the API's, the console's) does. Once per process, whoever imports this first:
    a flow's process, a worker's engine, a Dask worker running a unit."""
    for name in (TASK_RUNS, FLOW_RUNS):
        engine = logging.getLogger(name)
        if not any(isinstance(f, OneErrorRecord) for f in engine.filters):
            engine.addFilter(OneErrorRecord())


_install()
