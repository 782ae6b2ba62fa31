"""Trainings that share GPUs take turns: Prefect's concurrency limits give each training a
GPU of its own. The GPU count comes from the config, so this runs on a CPU; what it
checks is Prefect's limits, on a real Prefect API."""
from __future__ import annotations

import logging
import re

import pytest

from flows.parameters import sections_of
from flows.pipeline import STAGE_FLOWS
from pipeline_helpers import log_lines, smoke_config, task_runs

pytestmark = pytest.mark.slow


class ErrorRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("gpus, overlap", [(1, False), (2, True)])
def test_concurrent_trainings_each_wait_for_a_gpu_of_their_own(smoke_run, gpus, overlap):
    _, root, _ = smoke_run
    # Classifiers the smoke run has not trained yet: the judge and the features network,
    # which the flow submits together.
    config = smoke_config(str(root), training={"gpus": gpus}, overrides={"train_classifier.steps": 30 + gpus})
    errors = ErrorRecords()
    slots = logging.getLogger("prefect._internal.concurrency")  # Prefect's slot service logs here
    slots.addHandler(errors)
    try:
        state = STAGE_FLOWS["train-classifiers"](**sections_of(config), return_state=True)
    finally:
        slots.removeHandler(errors)
    assert state.is_completed(), state.message
    runs = sorted((run for name, run in task_runs(state.state_details.flow_run_id).items()
                   if name.startswith("train-classifier-")), key=lambda run: run.start_time)
    assert [run.state.name for run in runs] == ["Completed", "Completed"]
    first, second = runs
    assert (second.start_time < first.end_time) == overlap, [(r.name, r.start_time, r.end_time) for r in runs]
    claimed = log_lines(state.state_details.flow_run_id, "on GPU", at_least=2)
    # Waiting is quiet: no ERROR from Prefect's slot service (it logs each acquisition timeout).
    assert errors.messages == []
    assert sorted(int(re.search(r"on GPU (\d+)", line).group(1)) for line in claimed) == ([0, 0] if gpus == 1 else [0, 1])
