"""The flows: `vqvae2` (the whole pipeline) and one flow per stage, all derived from the
stage declarations (`tasks.stages.STAGES`). Wiring only.

    source -> ingest (mapped per shard) -> train_autoencoder -> encode (mapped per shard)
           -> train_prior per level and train_classifier, concurrently
           -> sample (mapped per batch) -> evaluate -> report

Every task is cached on its content-addressed artifact, with Prefect's cache records
under the storage root, so a re-run with unchanged inputs ends with every task `Cached`,
from any machine. A stage flow runs one stage on the artifacts earlier stages left
under the same storage root.

A run that fails publishes a `vqvae2-failure` artifact naming the stage, the error's
first line and what to do (`tasks.runtime.failure_report`), then ends Failed with its error.
"""
from __future__ import annotations

from typing import Any

from prefect import Flow, flow
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.config import PipelineConfig, Runtime
from tasks.manifests import ReportManifest
from tasks.runtime.exclusive import one_run_at_a_time
from tasks.runtime.failure_report import FailedStages, reported_failure
from tasks.stage import Settings, Stage
from tasks.stages import BY_NAME, STAGES, FinishedRun, Outputs, Producer, resolved
from tasks.stages.evaluate import STAGE as EVALUATE
from tasks.stages.evaluate import publish_report
from tasks.stages.train_classifier import check_features_available

TASK_RUNNER = ThreadPoolTaskRunner(max_workers=4)


def run_pipeline(config: PipelineConfig) -> ReportManifest:
    failed = FailedStages()
    with reported_failure(failed), one_run_at_a_time(config):  # a second run of this config waits, then reuses
        return _run_pipeline(config, failed)


class _NamedOutputs(Outputs):
    """`Outputs` noting which stage an error comes from: the one whose output was awaited
    (a failed future raises where it is awaited, maybe while another stage gathers its inputs)."""

    def __init__(self, config: PipelineConfig, produce: Producer, failed: FailedStages) -> None:
        super().__init__(config, produce)
        self.failed = failed

    def get(self, stage: Stage | str, variant: Any = None) -> Any:
        with self.failed.within((BY_NAME[stage] if isinstance(stage, str) else stage).instance(variant)):
            return super().get(stage, variant)


def _run_pipeline(config: PipelineConfig, failed: FailedStages) -> ReportManifest:
    if not config.classes_from_data:
        with failed.within("evaluate"):
            check_features_available(config)  # not after hours of training
    runtime = Runtime.of(config)

    def produce(stage: Stage, variant: Any, settings: Settings, inputs: dict[str, Any]) -> Any:
        with failed.within(stage.instance(variant)):
            return stage.run(settings, runtime, **inputs)

    outputs = _NamedOutputs(config, produce, failed)
    with failed.within("ingest"):
        outputs.adopt_classes()  # every later stage waits for the dataset anyway
    with failed.within("evaluate"):
        check_features_available(outputs.config)
    for stage in STAGES:
        outputs.start(stage)
    report = outputs.get("evaluate")
    with failed.within("evaluate"):
        publish_report(report, runtime.storage_options)  # on every run: a Cached one shows its results too
    return report


@flow(name="vqvae2-pipeline-on-dask")
def _pipeline_on_dask(config: PipelineConfig) -> ReportManifest:
    return run_pipeline(config)


@flow(name="vqvae2", task_runner=TASK_RUNNER)
def vqvae2_pipeline(config: PipelineConfig = PipelineConfig()) -> ReportManifest:
    """The whole VQ-VAE-2 pipeline: ingest, train, encode, priors, sample, evaluate."""
    if config.runner.dask_address:
        from prefect_dask import DaskTaskRunner

        runner = DaskTaskRunner(address=config.runner.dask_address)
        return _pipeline_on_dask.with_options(task_runner=runner)(config)
    return run_pipeline(config)


def run_stage(config: PipelineConfig, stage: Stage) -> Any:
    """Run every variant of `stage` on the artifacts a finished run of `config` left."""
    with reported_failure(stage.name):
        return _run_stage(config, stage)


def _run_stage(config: PipelineConfig, stage: Stage) -> Any:
    if stage.name == "ingest":
        return stage.run(stage.settings_for(config), Runtime.of(config), source=config.build_source())
    finished = FinishedRun(config)  # the dataset's classes adopted
    config, inputs = finished.config, finished.inputs(stage)
    started = [stage.run(stage.settings_for(config, variant), finished.runtime, **inputs)
               for variant in stage.variants_of(config)]
    results = [resolved(output) for output in started]
    if stage is EVALUATE:
        publish_report(results[0], finished.runtime.storage_options)
    return results if stage.variants else results[0]


def _stage_flow(stage: Stage) -> Flow:
    def run_one_stage(config: PipelineConfig = PipelineConfig()) -> Any:
        return run_stage(config, stage)

    run_one_stage.__doc__ = stage.summary
    return flow(run_one_stage, name=f"vqvae2-{stage.name}", task_runner=TASK_RUNNER, description=stage.summary)


STAGE_FLOWS: dict[str, Flow] = {stage.name: _stage_flow(stage) for stage in STAGES}
