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

from collections.abc import Callable
from typing import Any

from prefect import Flow, flow
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.names import generate_slug

from tasks.config import PipelineConfig, Runtime
from tasks.manifests import ReportManifest
from tasks.runtime.exclusive import one_run_at_a_time
from tasks.runs import record_run
from tasks.runtime.failure_report import FailedStages, reported_failure
from tasks.source_watch import announce_new_data
from tasks.stage import Settings, Stage
from tasks.stages import BY_NAME, STAGES, FinishedRun, Outputs, Producer
from tasks.stages.sample import check_classes
from tasks.stages.train_classifier import check_features_available

from .parameters import taking_sections

TASK_RUNNER = ThreadPoolTaskRunner(max_workers=4)
PIPELINE_SUMMARY = "The whole VQ-VAE-2 pipeline: ingest, train, encode, priors, sample, evaluate."


def run_pipeline(config: PipelineConfig) -> ReportManifest:
    failed = FailedStages()
    with reported_failure(failed):
        if not config.classes_from_data:
            with failed.within("evaluate"):
                check_features_available(config)  # not after hours of training, nor after waiting for a turn
        with one_run_at_a_time(config):  # a second run of this config waits, then reuses
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
    runtime = Runtime.of(config)

    def produce(stage: Stage, variant: Any, settings: Settings, inputs: dict[str, Any]) -> Any:
        with failed.within(stage.instance(variant)):
            return stage.run(settings, runtime, **inputs)

    outputs = _NamedOutputs(config, produce, failed)
    with failed.within("ingest"):
        outputs.adopt_classes()  # every later stage waits for the dataset anyway
    with failed.within("evaluate"):
        check_features_available(outputs.config)
    with failed.within("sample"):
        check_classes(outputs.config, outputs.get("ingest"))  # a class the data lacks: before any training
    for stage in STAGES:
        outputs.start(stage)
    report = outputs.get("evaluate")
    with failed.within("evaluate"):
        BY_NAME["evaluate"].publish(report, runtime.storage_options)  # on every run: a Cached one shows its results
        record_run(config, outputs, runtime)  # which config made which report: `vqvae2 ls`, `vqvae2 report --root`
    return report


@flow(name="vqvae2-pipeline-on-dask")
def _pipeline_on_dask(config: PipelineConfig) -> ReportManifest:
    return run_pipeline(config)


def _pipeline(config: PipelineConfig) -> ReportManifest:
    if config.runner.dask_address:
        from prefect_dask import DaskTaskRunner

        runner = DaskTaskRunner(address=config.runner.dask_address)
        return _pipeline_on_dask.with_options(task_runner=runner)(config)
    return run_pipeline(config)


def run_stage(config: PipelineConfig, stage: Stage) -> Any:
    """Run every variant of `stage` on the artifacts a finished run of `config` left (and the
    stages it `makes_along`), then publish what the UI shows of it."""
    with reported_failure(stage.name):
        finished = FinishedRun(config, make={stage.name, *stage.makes_along})  # ingest runs here
        finished.start(stage)  # every variant at once (the classifiers train side by side)
        results = finished.get(stage)
        if stage.publish:
            for result in results if stage.variants else [results]:
                stage.publish(result, finished.runtime.storage_options)
        if stage is BY_NAME["evaluate"]:  # a new report: recorded as a pipeline run's is
            record_run(config, finished, finished.runtime)
        return results


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
# The entrypoints of the stage deployments in prefect.yaml.
ingest_flow, sample_flow, evaluate_flow = STAGE_FLOWS["ingest"], STAGE_FLOWS["sample"], STAGE_FLOWS["evaluate"]

WATCH_SUMMARY = ("Emit `vqvae2.source.updated` when the source holds images no dataset under the root has yet "
                 "(a deployment trigger on it starts the pipeline).")
watch_flow: Flow = flow(taking_sections(announce_new_data, "watch", WATCH_SUMMARY), name="vqvae2",
                        description=WATCH_SUMMARY, flow_run_name=_named_runs("watch"))
