"""A failed run ends with a short Markdown artifact: the stage, the first line of the error,
what to do; the run still ends Failed with its own error. Against a real Prefect API."""
from __future__ import annotations

import pytest

from flows.parameters import sections_of
from flows.pipeline import STAGE_FLOWS, vqvae2_pipeline
from storage.shards import ShardError
from tasks.runtime.cached import RETRIES
from tasks.runtime.failure_report import KEY, FailedStages, failure_markdown
from image_files import truncated_tars
from pipeline_helpers import artifacts, smoke_config


def _failure_report(flow_run_id) -> str:
    reports = [a for a in artifacts(flow_run_id) if (a.key or "").startswith(KEY) and a.type == "markdown"]
    assert len(reports) == 1, [(a.key, a.type) for a in artifacts(flow_run_id)]
    return reports[0].data


@pytest.mark.parametrize("run", [vqvae2_pipeline, STAGE_FLOWS["ingest"]], ids=["pipeline", "ingest-flow"])
def test_a_failed_stage_leaves_a_report_naming_it_why_and_what_to_do(prefect_api, tmp_path, run):
    config = smoke_config(str(tmp_path / "root"), source={"url": truncated_tars(tmp_path / "tars")},
                          overrides={"num_classes": 0})
    state = run(**sections_of(config), return_state=True)
    assert state.is_failed()
    with pytest.raises(ShardError, match=r"00001\.tar: .*truncated"):  # the run's own error, unchanged
        state.result()
    report = _failure_report(state.state_details.flow_run_id)
    assert report.startswith("# vqvae2 run failed in stage `ingest`\n")
    assert "ShardError" in report and "00001.tar: " in report and "truncated" in report
    assert "fix the cause named above and run again: finished stages are reused" in report
    assert "Traceback" not in report and "retried" not in report


def test_a_transient_error_is_reported_with_its_retries_and_without_credentials():
    error = ConnectionError("s3://AKIAEXAMPLE:hunter2@runs/vqvae2/codes/x.zarr: connection reset by peer\n"
                            "  details on a second line")
    report = failure_markdown(error, "encode")
    assert report.startswith("# vqvae2 run failed in stage `encode`\n")
    assert "`ConnectionError`" in report and "s3://runs/vqvae2/codes/x.zarr: connection reset by peer" in report
    assert f"the stage was retried {RETRIES} times" in report and "it resumes where it stopped" in report
    assert "hunter2" not in report and "AKIAEXAMPLE" not in report and "second line" not in report
    assert "finished stages are reused" not in report


def test_an_error_is_named_after_the_innermost_stage_it_left():
    """A stage awaiting another's output re-raises that one's error: it names the other."""
    stages = FailedStages()
    error = ValueError("bad shard")
    with pytest.raises(ValueError), stages.within("sample"), stages.within("train-priors[0]"):
        raise error
    assert stages.stage_of(error) == "train-priors[0]"
    assert stages.stage_of(ValueError("bad shard")) is None  # by identity: an equal error is another
