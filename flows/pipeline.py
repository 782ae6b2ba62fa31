"""The flows: `vqvae2_pipeline`, the whole pipeline, written out stage by stage, and one flow
per stage (`sample_flow`, ...), each named `vqvae2` in Prefect (its deployments read
vqvae2/full-pipeline, vqvae2/sample, ...).

    source -> ingest (mapped per shard) -> the dataset's classes
           -> train_autoencoder, beside it train_classifier (judge, then features)
           -> encode (mapped per shard) -> train_prior per level, concurrently
           -> sample (mapped per batch) -> evaluate -> report

Every task is cached on its content-addressed artifact, with Prefect's cache records
under the storage root, so a re-run with unchanged inputs ends with every task `Cached`,
from any machine. A stage flow runs one stage on the artifacts earlier stages left
under the same storage root. A run that fails publishes a `vqvae2-failure` artifact naming
the stage, the error's first line and what to do (`tasks.machinery.failure_report`), then
ends Failed with its error.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prefect import Flow, flow
from prefect.states import State
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.names import generate_slug

from tasks.config import PipelineConfig, Runtime
from tasks.machinery.dask import ByReferenceDaskTaskRunner, check_dask_runner
from tasks.machinery.devices import on_this_machine
from tasks.machinery.turns import check_turns, taking_turns
from tasks.machinery.failure_report import failing_in, reported_failure
from tasks.machinery.run_tags import tag_run
from tasks.runs import record_run
from tasks.source_watch import announce_new_data
from tasks.stage import Stage, Started
from tasks.stages import (
    ENCODE,
    EVALUATE,
    INGEST,
    SAMPLE,
    TRAIN_AUTOENCODER,
    TRAIN_CLASSIFIERS,
    TRAIN_PRIORS,
    STAGES,
    FinishedRun,
    check_stages,
    with_dataset_classes,
)
from tasks.stages.evaluate import ReportManifest, publish_report, report_state

from .parameters import taking_sections

TASK_RUNNER = ThreadPoolTaskRunner(max_workers=4)


def run_name(what: str) -> str:
    """A name that says what ran (`sample-brave-otter`), for a run this process makes (`vqvae2
    run`, `vqvae2 stage`): given as the run is made, it is the run's one name. A flow names no
    runs itself: Prefect would rename a deployment's run as it starts, after the name given
    at submission was printed. What a run is, its tags say (`tag_run`)."""
    return f"{what}-{generate_slug(2)}"


def pipeline(config: PipelineConfig) -> State:
    """The whole VQ-VAE-2 pipeline: ingest, train, encode, priors, sample, evaluate."""
    # A failure is reported (card, one ERROR line) around every flow: `taking_sections`.
    tag_run("pipeline", config.preset)
    config = on_this_machine(config)  # the devices: resolved once, where the run starts
    check_dask_runner(config.runner.dask_address)
    check_stages(config)  # not after hours of training, nor after waiting for a turn
    with taking_turns():  # a run needing what another makes waits, then reuses
        if config.runner.dask_address:
            report = pipeline_on_dask.with_options(
                task_runner=ByReferenceDaskTaskRunner(address=config.runner.dask_address))(config)
        else:
            report = run_stages(config)
    return report_state(report)  # Completed, naming the report and its card


def run_stages(config: PipelineConfig) -> ReportManifest:
    runtime = Runtime.of(config)
    dataset = INGEST(config, runtime, source=config.build_source())
    config = with_dataset_classes(config, dataset)  # the config the run records
    check_stages(config, dataset)  # e.g. a class to sample that the data lacks: before any training
    autoencoder = TRAIN_AUTOENCODER.start(config, runtime, dataset=dataset)
    classifiers = one_after_another(TRAIN_CLASSIFIERS.start, TRAIN_CLASSIFIERS.variants_of(config),  # beside it
                                    config, runtime, dataset=dataset)
    autoencoder = autoencoder.result()
    codes = ENCODE(config, runtime, dataset=dataset, autoencoder=autoencoder)
    priors = [TRAIN_PRIORS.start(config, runtime, level, codes=codes) for level in TRAIN_PRIORS.variants_of(config)]
    priors = [prior.result() for prior in priors]
    judge = classifiers["judge"].result() if "judge" in classifiers else None
    samples = SAMPLE(config, runtime, dataset=dataset, autoencoder=autoencoder, priors=priors, judge=judge)
    report = EVALUATE(config, runtime, dataset=dataset, autoencoder=autoencoder, codes=codes, priors=priors,
                      classifiers=[classifier.result() for classifier in classifiers.values()], samples=samples)
    with failing_in(EVALUATE.name):
        check_turns()  # a run that lost a turn publishes and records nothing
        publish_report(report, runtime.storage_options)  # on every run: a Cached one shows its results too
        record_run(config, runtime, report, dataset.source_digest)  # `vqvae2 ls`, `vqvae2 report --root`
    return report


def one_after_another(start: Callable[..., Started], variants: Iterable[Any], config: PipelineConfig,
                      runtime: Runtime, **inputs: Any) -> dict[Any, Started]:
    """Every one of `variants` started, each once the one before it has finished (the last one
    is not waited for). Beside the autoencoder, the classifiers train so: two trainings at a
    time, as each one's share of the cores (`training.cpu_threads`) assumes, and a failed one
    ends the run before the next starts."""
    started: dict[Any, Started] = {}
    for variant in variants:
        for before in started.values():
            before.result()
        started[variant] = start(config, runtime, variant, **inputs)
    return started


vqvae2_pipeline: Flow = flow(taking_sections(pipeline), name="vqvae2", task_runner=TASK_RUNNER,
                             description=pipeline.__doc__, validate_parameters=False)
# The same stages, their mapped and concurrent tasks on a Dask cluster (`runner.dask_address`).
pipeline_on_dask: Flow = flow(run_stages, name="vqvae2-pipeline-on-dask")


def run_stage(config: PipelineConfig, stage: Stage) -> Any:
    """Run every variant of `stage` on the artifacts a finished run of `config` left (and the
    stages it `makes_along`), then publish what the UI shows of it."""
    with reported_failure(stage.name), taking_turns() as turns:
        tag_run(f"stage:{stage.name}", config.preset)
        finished = FinishedRun(config, make={stage.name, *stage.makes_along})  # ingest runs here
        results = finished.every(stage)  # every variant at once (the classifiers train side by side)
        turns.check()  # a run that lost a turn publishes and records nothing
        if stage.publish:
            for result in results:
                stage.publish(result, finished.runtime.storage_options)
        if stage is EVALUATE:  # a new report: recorded as a pipeline run's is
            record_run(finished.config, finished.runtime, results[0], finished.get(INGEST).source_digest)
            return report_state(results[0])
        return results if stage.variants else results[0]


def stage_flow(stage: Stage) -> Flow:
    """The flow that runs `stage` alone (`run_stage`), named `vqvae2` like every flow."""

    def run_one_stage(config: PipelineConfig) -> Any:
        return run_stage(config, stage)

    run_one_stage.__name__ = run_one_stage.__qualname__ = f"{stage.name.replace('-', '_')}_flow"
    run_one_stage.__doc__ = stage.summary
    return flow(taking_sections(run_one_stage), name="vqvae2", task_runner=TASK_RUNNER, description=stage.summary,
                validate_parameters=False)


# One flow per stage (the CLI's `vqvae2 stage NAME`), and by name those prefect.yaml's stage
# deployments name as their entrypoints (flows.pipeline.sample_flow).
STAGE_FLOWS: dict[str, Flow] = {stage.name: stage_flow(stage) for stage in STAGES}
ingest_flow = STAGE_FLOWS[INGEST.name]
train_classifiers_flow = STAGE_FLOWS[TRAIN_CLASSIFIERS.name]
train_autoencoder_flow = STAGE_FLOWS[TRAIN_AUTOENCODER.name]
encode_flow = STAGE_FLOWS[ENCODE.name]
train_priors_flow = STAGE_FLOWS[TRAIN_PRIORS.name]
sample_flow = STAGE_FLOWS[SAMPLE.name]
evaluate_flow = STAGE_FLOWS[EVALUATE.name]


def watch(config: PipelineConfig) -> bool:
    tag_run("watch", config.preset)
    return announce_new_data(config)


watch.__doc__ = announce_new_data.__doc__
watch_flow: Flow = flow(taking_sections(watch), name="vqvae2", validate_parameters=False,
                        description="Emit `vqvae2.source.updated` when the source holds images no dataset under the "
                        "root has yet (a deployment trigger on it starts the pipeline).")
