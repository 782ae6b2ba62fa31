"""Find the artifacts a config's earlier runs left under its storage root, without
running anything: for the stage flows (one stage on existing artifacts) and the CLI."""
from __future__ import annotations

from functools import cached_property
from typing import Any

from .artifact_task import require
from .config import PipelineConfig
from .encode import codes_artifact
from .evaluate import classifier_roles, report_artifact
from .ingest import dataset_artifact
from .sample import samples_artifact
from .train_autoencoder import autoencoder_artifact
from .train_classifier import classifier_artifact
from .train_prior import prior_artifact

Manifest = dict[str, Any]


def find_dataset(config: PipelineConfig) -> Manifest:
    return require(dataset_artifact(config, config.build_source().digest()), "ingest")


def find_autoencoder(config: PipelineConfig, dataset: Manifest) -> Manifest:
    return require(autoencoder_artifact(config, dataset), "train-autoencoder")


def find_codes(config: PipelineConfig, dataset: Manifest, autoencoder: Manifest) -> Manifest:
    return require(codes_artifact(config, dataset, autoencoder), "encode")


def find_priors(config: PipelineConfig, codes: Manifest) -> list[Manifest]:
    return [require(prior_artifact(config, codes, level), "train-priors") for level in range(config.model.levels)]


def find_classifier(config: PipelineConfig, dataset: Manifest, role: str) -> Manifest | None:
    if not config.model.num_classes:
        return None
    return require(classifier_artifact(config, dataset, role), "train-classifier")


def find_samples(config: PipelineConfig, autoencoder: Manifest, priors: list[Manifest],
                 judge: Manifest | None) -> Manifest:
    return require(samples_artifact(config, autoencoder, priors, judge), "sample")


class FinishedRun:
    """Every artifact of a finished run of `config`, found lazily in pipeline order, each once."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.dataset = find_dataset(config)
        self.autoencoder = find_autoencoder(config, self.dataset)

    @cached_property
    def codes(self) -> Manifest:
        return find_codes(self.config, self.dataset, self.autoencoder)

    @cached_property
    def priors(self) -> list[Manifest]:
        return find_priors(self.config, self.codes)

    @cached_property
    def judge(self) -> Manifest | None:
        return find_classifier(self.config, self.dataset, "judge")

    @cached_property
    def classifiers(self) -> list[Manifest]:
        """The judge, and the features classifier when the evaluation uses domain features."""
        return [find_classifier(self.config, self.dataset, role) for role in classifier_roles(self.config)]

    @cached_property
    def samples(self) -> Manifest:
        return find_samples(self.config, self.autoencoder, self.priors, self.judge)

    @cached_property
    def report(self) -> Manifest:
        artifact = report_artifact(self.config, self.dataset, self.autoencoder, self.codes, self.priors,
                                   self.classifiers, self.samples)
        return require(artifact, "evaluate")
