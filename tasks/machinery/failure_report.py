"""A failed run's last word in the UI: a short Markdown artifact (`vqvae2-failure`) saying
in which stage it failed, why (the first line of the error, and its type) and what to do.

    # vqvae2 run failed in stage `ingest`
    ...ShardError: /data/tars/00001.tar: the shard is truncated ...
    What to do: fix the cause named above and run again: finished stages are reused.

A field to set is named as a deployment's run parameters (`{"ingest": {"max_bad_fraction":
0.05}}`), the form a run started from the UI or `prefect deployment run --params` takes;
the CLI names it `--set ingest.max_bad_fraction=0.05` (`tasks.setting_forms`).

No traceback (Prefect's logs have it) and nothing of the config: errors that name a
storage URL already have its credentials removed, and `storage.fsutil.redact` removes a
``user:password@`` left anywhere in the line here too. Notifications are Prefect
automations on the run's Failed state (docs/reliability.md), not code.
"""
from __future__ import annotations

import contextlib
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
        "The full traceback is in the run's logs.",
        "",
    ])


def publish_failure(error: BaseException, stage: str | None) -> None:
    """Publish the failure artifact; a failure to publish it is logged, never raised over `error`."""
    try:
        publish_markdown(KEY, failure_markdown(error, stage), description="Why this vqvae2 run failed, and what to do")
    except Exception as err:  # noqa: BLE001 - the run's own error matters more than its report
        logger().warning(f"could not publish the failure report: {type(err).__name__}: {first_line(err)}")


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
    """Publish the failure artifact of an error leaving this block, then re-raise it unchanged:
    the run still ends Failed with its own error. It names the stage a `failing_in` block
    noted, else `stage`."""
    try:
        yield
    except Exception as error:
        publish_failure(error, failed_stage(error) or stage)
        raise
