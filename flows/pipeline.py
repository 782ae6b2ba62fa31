"""The flows: `vqvae2` (the whole pipeline) and one flow per stage. Wiring only.

    source -> ingest (mapped per shard) -> train_autoencoder -> encode (mapped per shard)
           -> train_prior per level and train_classifier, concurrently
           -> sample (mapped per batch) -> evaluate -> report

Every task is cached on its content-addressed artifact, so a re-run with unchanged
inputs ends with every task `Cached`. A stage flow runs one stage on the artifacts
earlier stages left under the same storage root.
"""
from __future__ import annotations

from typing import Any

from prefect import flow, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.config import PipelineConfig
from tasks.encode import encode_shard, finalize_codes, prepare_codes, shard_units
from tasks.evaluate import classifier_roles, evaluate
from tasks.ingest import dataset_artifact, finalize, ingest_shard, plan_dataset
from tasks.lookup import FinishedRun, find_dataset
from tasks.reporting import track
from tasks.sample import batch_sizes, finalize_samples, sample_batch, samples_artifact
from tasks.train_autoencoder import train_autoencoder
from tasks.train_classifier import train_classifier
from tasks.train_prior import train_prior

Manifest = dict[str, Any]
TASK_RUNNER = ThreadPoolTaskRunner(max_workers=4)


def run(task: Any, *args: Any) -> Any:
    """Run a task and wait for its value (a task that finds its artifact returns a `Cached`
    state, which a direct call would hand back as a state rather than its manifest)."""
    return task.submit(*args).result()


# --- stages: plain functions that call tasks, shared by the full flow and the stage flows ---


def ingest_stage(config: PipelineConfig) -> Manifest:
    plan = run(plan_dataset, config)
    dataset = dataset_artifact(config, plan.source_digest)
    shards = track(ingest_shard.map(plan.tasks, dataset=unmapped(dataset)), "ingest: shards written")
    return run(finalize, plan, shards, config)


def encode_stage(config: PipelineConfig, dataset: Manifest, autoencoder: Manifest) -> Manifest:
    codes = run(prepare_codes, config, dataset, autoencoder)
    encoded = track(encode_shard.map(unmapped(config), unmapped(dataset), unmapped(autoencoder), unmapped(codes),
                                     shard_units(dataset)), "encode: shards encoded")
    return run(finalize_codes, config, dataset, autoencoder, encoded)


def priors_stage(config: PipelineConfig, codes: Manifest) -> list[Manifest]:
    futures = [train_prior.submit(config, codes, level) for level in range(config.model.levels)]
    return [future.result() for future in futures]


def sample_stage(config: PipelineConfig, autoencoder: Manifest, priors: list[Manifest],
                 judge: Manifest | None) -> Manifest:
    samples = samples_artifact(config, autoencoder, priors, judge)
    batches = track(sample_batch.map(unmapped(config), unmapped(autoencoder), unmapped(priors), unmapped(judge),
                                     unmapped(samples), range(len(batch_sizes(config)))), "sample: batches drawn")
    return run(finalize_samples, config, autoencoder, priors, judge, batches)


def run_pipeline(config: PipelineConfig) -> Manifest:
    dataset = ingest_stage(config)
    # The classifiers need only images: they train while the autoencoder does.
    classifiers = [train_classifier.submit(config, dataset, role) for role in classifier_roles(config)]
    autoencoder = run(train_autoencoder, config, dataset)
    codes = encode_stage(config, dataset, autoencoder)
    priors = priors_stage(config, codes)
    trained = [future.result() for future in classifiers]
    judge = next((c for c in trained if c["role"] == "judge"), None)
    samples = sample_stage(config, autoencoder, priors, judge)
    return run(evaluate, config, dataset, autoencoder, codes, priors, trained, samples)


# --- flows ---


@flow(name="vqvae2-pipeline-on-dask")
def _pipeline_on_dask(config: PipelineConfig) -> Manifest:
    return run_pipeline(config)


@flow(name="vqvae2", task_runner=TASK_RUNNER)
def vqvae2_pipeline(config: PipelineConfig = PipelineConfig()) -> Manifest:
    """The whole VQ-VAE-2 pipeline: ingest, train, encode, priors, sample, evaluate."""
    if config.runner.dask_address:
        from prefect_dask import DaskTaskRunner

        runner = DaskTaskRunner(address=config.runner.dask_address)
        return _pipeline_on_dask.with_options(task_runner=runner)(config)
    return run_pipeline(config)


@flow(name="vqvae2-ingest", task_runner=TASK_RUNNER)
def ingest_flow(config: PipelineConfig = PipelineConfig()) -> Manifest:
    """Shard the source into WebDataset tars (mapped per shard)."""
    return ingest_stage(config)


@flow(name="vqvae2-train-autoencoder", task_runner=TASK_RUNNER)
def train_autoencoder_flow(config: PipelineConfig = PipelineConfig()) -> Manifest:
    """Train the autoencoder on an ingested dataset."""
    return run(train_autoencoder, config, find_dataset(config))


@flow(name="vqvae2-encode", task_runner=TASK_RUNNER)
def encode_flow(config: PipelineConfig = PipelineConfig()) -> Manifest:
    """Encode the dataset with a trained autoencoder (mapped per shard)."""
    finished = FinishedRun(config)
    return encode_stage(config, finished.dataset, finished.autoencoder)


@flow(name="vqvae2-train-priors", task_runner=TASK_RUNNER)
def train_priors_flow(config: PipelineConfig = PipelineConfig()) -> list[Manifest]:
    """Train the prior of every level on the codes, concurrently."""
    return priors_stage(config, FinishedRun(config).codes)


@flow(name="vqvae2-train-classifier", task_runner=TASK_RUNNER)
def train_classifier_flow(config: PipelineConfig = PipelineConfig(), role: str = "judge") -> Manifest:
    """Train a classifier on the dataset's images (`judge` for rejection sampling)."""
    return run(train_classifier, config, find_dataset(config), role)


@flow(name="vqvae2-sample", task_runner=TASK_RUNNER)
def sample_flow(config: PipelineConfig = PipelineConfig()) -> Manifest:
    """Sample images from the trained priors (mapped per batch)."""
    finished = FinishedRun(config)
    return sample_stage(config, finished.autoencoder, finished.priors, finished.judge)


@flow(name="vqvae2-evaluate", task_runner=TASK_RUNNER)
def evaluate_flow(config: PipelineConfig = PipelineConfig()) -> Manifest:
    """Measure a finished run and write its report."""
    finished = FinishedRun(config)
    return run(evaluate, config, finished.dataset, finished.autoencoder, finished.codes, finished.priors,
               finished.classifiers, finished.samples)


STAGE_FLOWS = {
    "ingest": ingest_flow,
    "train-autoencoder": train_autoencoder_flow,
    "encode": encode_flow,
    "train-priors": train_priors_flow,
    "train-classifier": train_classifier_flow,
    "sample": sample_flow,
    "evaluate": evaluate_flow,
}
