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
first line and what to do (`tasks.machinery.failure_report`), then ends Failed with its error.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import Flow, flow
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.names import generate_slug

from tasks.config import PipelineConfig, Runtime
from tasks.machinery.devices import on_this_machine
from tasks.machinery.exclusive import one_run_at_a_time
from tasks.machinery.failure_report import FailedStages, reported_failure
from tasks.runs import record_run
from tasks.source_watch import announce_new_data
from tasks.stage import Settings, Stage
from tasks.stages import FINAL, STAGES, FinishedRun, Outputs, check_before_run

from .parameters import taking_sections

TASK_RUNNER = ThreadPoolTaskRunner(max_workers=4)
PIPELINE_SUMMARY = "The whole VQ-VAE-2 pipeline: ingest, train, encode, priors, sample, evaluate."


def run_pipeline(config: PipelineConfig) -> Any:
    failed = FailedStages()
    with reported_failure(failed):
        config = on_this_machine(config)
        check_before_run(config, failed.within)  # not after hours of training, nor after waiting for a turn
        with one_run_at_a_time(config):  # a second run of this config waits, then reuses
            return _run_pipeline(config, failed)


def _run_pipeline(config: PipelineConfig, failed: FailedStages) -> Any:
    runtime = Runtime.of(config)

    def produce(stage: Stage, variant: Any, settings: Settings, inputs: dict[str, Any]) -> Any:
        return stage.run(settings, runtime, **inputs)

    outputs = Outputs(config, produce, within=failed.within)
    outputs.check()  # e.g. the dataset's classes, a class to sample it lacks: before any training
    for stage in STAGES:
        outputs.start(stage)
    result = outputs.get(FINAL)
    with failed.within(FINAL.name):
        if FINAL.publish:  # on every run: a Cached one shows its results
            FINAL.publish(result, runtime.storage_options)
        record_run(config, outputs, runtime)  # which config made which report: `vqvae2 ls`, `vqvae2 report --root`
    return result


@flow(name="vqvae2-pipeline-on-dask")
def _pipeline_on_dask(config: PipelineConfig) -> Any:
    return run_pipeline(config)


def _pipeline(config: PipelineConfig) -> Any:
    if config.runner.dask_address:
        from tasks.machinery.dask import ByReferenceDaskTaskRunner

        runner = ByReferenceDaskTaskRunner(address=config.runner.dask_address)
        return _pipeline_on_dask.with_options(task_runner=runner)(config)
    return run_pipeline(config)


def run_stage(config: PipelineConfig, stage: Stage) -> Any:
    """Run every variant of `stage` on the artifacts a finished run of `config` left (and the
    stages it `makes_along`), then publish what the UI shows of it."""
    with reported_failure(stage.name):
        finished = FinishedRun(config, make={stage.name, *stage.makes_along})  # ingest runs here
        finished.start(stage)  # every variant at once (the classifiers train side by side)
        results = finished.every(stage)
        if stage.publish:
            for result in results:
                stage.publish(result, finished.runtime.storage_options)
        if stage is FINAL:  # a new report: recorded as a pipeline run's is
            record_run(config, finished, finished.runtime)
        return results if stage.variants else results[0]


def _named_runs(what: str) -> Callable[[], str]:
    """Run names that say what ran (`sample-brave-otter`): every flow is `vqvae2` in the UI."""
    return lambda: f"{what}-{generate_slug(2)}"


# Every flow is named `vqvae2`, so its deployments read vqvae2/full-pipeline, vqvae2/sample, ...
vqvae2_pipeline: Flow = flow(
    taking_sections(_pipeline, "vqvae2_pipeline", PIPELINE_SUMMARY), name="vqvae2", task_runner=TASK_RUNNER,
    description=PIPELINE_SUMMARY, flow_run_name=_named_runs("pipeline"),
)


def _stage_flow(stage: Stage) -> Flow:
    def run_one_stage(config: PipelineConfig) -> Any:
        return run_stage(config, stage)

    fn = taking_sections(run_one_stage, stage.name.replace("-", "_"), stage.summary)
    return flow(fn, name="vqvae2", task_runner=TASK_RUNNER, description=stage.summary,
                flow_run_name=_named_runs(stage.name))


STAGE_FLOWS: dict[str, Flow] = {stage.name: _stage_flow(stage) for stage in STAGES}
# Each stage flow by name, as prefect.yaml's stage deployments name their entrypoints
# (flows.pipeline.sample_flow): a new stage's flow can be deployed the same way.
globals().update({f"{name.replace('-', '_')}_flow": stage_flow for name, stage_flow in STAGE_FLOWS.items()})

WATCH_SUMMARY = ("Emit `vqvae2.source.updated` when the source holds images no dataset under the root has yet "
                 "(a deployment trigger on it starts the pipeline).")
watch_flow: Flow = flow(taking_sections(announce_new_data, "watch", WATCH_SUMMARY), name="vqvae2",
                        description=WATCH_SUMMARY, flow_run_name=_named_runs("watch"))
