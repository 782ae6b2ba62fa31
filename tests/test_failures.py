"""Failures a retry cannot cure end a task in one attempt, with their message in its state;
others are retried; a failed mapped unit's own error is the run's error. Against a real
Prefect API."""
from __future__ import annotations

import pytest
from prefect import flow

from flows.parameters import sections_of
from flows.pipeline import STAGE_FLOWS
from storage.fsutil import storage_errors
from storage.ingest import TooManyBadImages
from storage.shards import ShardError
from tasks.stages.encode import EncodedShard
from tasks.machinery.artifacts import Artifact
from tasks.machinery.cached import cached_unit
from tasks.machinery.failures import is_permanent
from tasks.machinery.process import TrainingFailed
from image_files import truncated_tars
from pipeline_helpers import smoke_config, task_runs


def _failing_unit(errors: list[BaseException], calls: list[int]):
    """A cached unit that raises the next of `errors` on each attempt, then succeeds."""

    def locate(root: str):
        return Artifact(root, "units", "k").unit_marker("unit", EncodedShard)

    @cached_unit(locate=locate, name="failing-unit", retry_delay_seconds=0)
    def unit(root: str) -> EncodedShard:
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return EncodedShard(split="train", index=0, rows=1, offset=0)

    return unit


@pytest.mark.parametrize("error", [ValueError("source.url is required"), TooManyBadImages("3 of 10 images"),
                                   FileNotFoundError("no Inception weights"), FloatingPointError("training diverged")])
def test_an_error_a_retry_cannot_cure_ends_the_task_in_one_attempt(prefect_api, tmp_path, error):
    calls: list[int] = []
    unit = _failing_unit([error, error, error], calls)

    @flow
    def once() -> tuple[str, str]:
        state = unit(str(tmp_path / "root"), return_state=True)
        return state.name, state.message  # the state itself would fail the flow

    name, message = once()
    assert name == "Failed" and calls == [1]  # retries=2, yet one attempt
    assert str(error) in message and type(error).__name__ in message


def test_a_transient_error_is_retried(prefect_api, tmp_path):
    calls: list[int] = []
    unit = _failing_unit([ConnectionResetError("connection reset by peer"), TimeoutError("read timed out")], calls)

    @flow
    def retried():
        return unit(str(tmp_path / "root"))

    state = retried(return_state=True)
    assert state.is_completed() and calls == [1, 1, 1]
    assert [run.run_count for run in task_runs(state.state_details.flow_run_id).values()] == [3]


def test_botocore_credential_and_endpoint_errors_are_permanent_its_connection_errors_not():
    from botocore import exceptions as boto

    permanent = [boto.NoCredentialsError(), boto.PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY"),
                 boto.ParamValidationError(report='Invalid bucket name "a:b@c"'), boto.NoRegionError(),
                 boto.EndpointResolutionError(msg="Custom endpoint `ftp://x` was not a valid URI")]
    transient = [boto.EndpointConnectionError(endpoint_url="http://127.0.0.1:9"),  # an endpoint briefly down
                 boto.ConnectTimeoutError(endpoint_url="http://127.0.0.1:9"), boto.ReadTimeoutError(endpoint_url="x"),
                 boto.ConnectionClosedError(endpoint_url="x"), boto.CredentialRetrievalError(provider="imds", error_msg="x")]
    assert [type(e).__name__ for e in permanent if not is_permanent(e)] == []
    assert [type(e).__name__ for e in transient if is_permanent(e)] == []


def test_an_invalid_bucket_name_from_s3fs_ends_the_task_in_one_attempt(prefect_api, tmp_path, s3_bucket):
    """A real botocore error: s3fs hands ParamValidationError up as it is."""
    from storage.fsutil import exists

    calls: list[int] = []

    def locate(root: str):
        return Artifact(root, "units", "k").unit_marker("unit", EncodedShard)

    @cached_unit(locate=locate, name="bad-bucket-unit", retry_delay_seconds=0)
    def unit(root: str) -> EncodedShard:
        calls.append(1)
        exists("s3://not_a_valid:bucket/x", s3_bucket.storage_options)
        return EncodedShard(split="train", index=0, rows=1, offset=0)

    @flow
    def once() -> str:
        return unit(str(tmp_path / "root"), return_state=True).name

    assert once() == "Failed" and calls == [1]


def test_a_training_process_says_whether_its_error_would_recur():
    assert is_permanent(TrainingFailed("rank 0: ValueError", permanent=True))
    assert not is_permanent(TrainingFailed("rank 0: RuntimeError", permanent=False))
    assert not is_permanent(TrainingFailed("the training process died (exit code -9)"))  # killed: try again


def test_a_failed_shard_is_the_runs_error_at_once(prefect_api, tmp_path):
    """Before: the finalize task stayed Pending and the run ended 'UnfinishedRun: Run is in PENDING state'."""
    config = smoke_config(str(tmp_path / "root"), source={"url": truncated_tars(tmp_path / "tars")},
                          overrides={"num_classes": 0})
    state = STAGE_FLOWS["ingest"](**sections_of(config), return_state=True)
    assert state.is_failed()
    with pytest.raises(ShardError, match=r"00001\.tar: .*truncated"):
        state.result()
    runs = task_runs(state.state_details.flow_run_id)
    assert [run.run_count for name, run in runs.items() if name.startswith("ingest-")] == [1, 1, 1]
    assert "finalize-dataset" not in runs or runs["finalize-dataset"].state.name != "Pending"


@pytest.mark.parametrize("url, hint", [
    ("/data/runs/a.txt", "check the permissions of the path and its folders for the user this process runs as"),
    ("s3://bucket/a.txt", "check the credentials (AWS_ACCESS_KEY_ID"),
])
def test_a_permission_error_hints_at_what_the_storage_needs(url, hint):
    with pytest.raises(PermissionError) as error, storage_errors(url):
        raise PermissionError("Forbidden")
    assert str(error.value).startswith(f"{url}: access denied (Forbidden); {hint}")
    assert ("AWS" in str(error.value)) == url.startswith("s3://")


@pytest.mark.slow  # two smoke pipelines
def test_two_configs_at_once_make_what_they_share_once(prefect_api, tmp_path):
    """Configs that differ only in their samples, started together on one root, take turns
    per artifact: each shared artifact is made by one run (its task Completed once across
    both) and reused by the other (Cached); each run gets its own samples and report. (The
    same config twice: `tests/test_faults.py`.)"""
    from concurrent.futures import ThreadPoolExecutor

    from flows.pipeline import vqvae2_pipeline
    from pipeline_helpers import state_names

    root = tmp_path / "root"
    configs = [smoke_config(str(root), sample={"num_samples": n}) for n in (40, 48)]
    with ThreadPoolExecutor(2) as pool:  # the nightly run and a manual one, started together
        states = list(pool.map(lambda config: vqvae2_pipeline(**sections_of(config), return_state=True), configs))
    assert all(state.is_completed() for state in states), [state.message for state in states]
    for stage in ("datasets", "autoencoder", "codes", "priors", "classifiers", "samples", "reports"):
        dirs = [d for d in (root / stage).iterdir() if d.is_dir()]
        expected = {"priors": 2, "classifiers": 2, "samples": 2, "reports": 2}.get(stage, 1)
        assert len(dirs) == expected and all((d / "manifest.json").exists() for d in dirs), stage
    runs = [state_names(state.state_details.flow_run_id) for state in states]
    shared = {"finalize-dataset": 1, "train-classifier": 2, "train-autoencoder": 1, "finalize-codes": 1,
              "train-prior": 2}
    for task, artifacts in shared.items():
        completed = [name for states_of_run in runs for name, state in states_of_run.items()
                     if name.startswith(task) and state == "Completed"]
        cached = [name for states_of_run in runs for name, state in states_of_run.items()
                  if name.startswith(task) and state == "Cached"]
        assert (len(completed), len(cached)) == (artifacts, artifacts), (task, runs)
    assert [p for p in root.glob(".vqvae2/**/*") if p.is_file()] == []  # every turn given back
