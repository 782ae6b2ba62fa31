"""The stages of the pipeline, in the order a run starts them, and what follows from their
declarations: their checks (`check_stages`), the keys of a config's artifacts
(`stage_keys`), and the artifacts of a finished run (`FinishedRun`).

The pipeline flow (`flows.pipeline`) calls the stages by these names. The order lets work
overlap: the classifiers need only images, so they start (as futures) before the
autoencoder trains; the priors of all levels start together. The last stage's output is
the run's result: its report (`FINAL`). A new stage is its module, its line here, and its
call in the flow.
"""
from __future__ import annotations

from collections.abc import Collection
from functools import cached_property
from typing import Any, TypeVar

from ..config import PipelineConfig, Runtime
from ..machinery.devices import on_this_machine
from ..machinery.failure_report import failing_in
from ..manifests import Manifest
from ..stage import SOURCE, Needs, Stage, Started
from . import encode, evaluate, ingest, sample, train_autoencoder, train_classifier, train_prior
from .ingest import DatasetManifest, with_dataset_classes

INGEST = ingest.STAGE
TRAIN_CLASSIFIERS = train_classifier.STAGE
TRAIN_AUTOENCODER = train_autoencoder.STAGE
ENCODE = encode.STAGE
TRAIN_PRIORS = train_prior.STAGE
SAMPLE = sample.STAGE
EVALUATE = evaluate.STAGE
STAGES: tuple[Stage, ...] = (INGEST, TRAIN_CLASSIFIERS, TRAIN_AUTOENCODER, ENCODE, TRAIN_PRIORS, SAMPLE, EVALUATE)
BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}
FINAL: Stage = STAGES[-1]  # what a pipeline run ends with and returns

M = TypeVar("M", bound=Manifest)

__all__ = ["BY_NAME", "ENCODE", "EVALUATE", "FINAL", "INGEST", "SAMPLE", "STAGES", "TRAIN_AUTOENCODER",
           "TRAIN_CLASSIFIERS", "TRAIN_PRIORS", "FinishedRun", "check_stages", "stage_keys", "with_dataset_classes"]


def check_stages(config: PipelineConfig, dataset: DatasetManifest | None = None,
                 stages: Collection[Stage] = STAGES) -> None:
    """The checks of `stages` on `config`: before anything runs (`dataset` None: what the
    config alone shows), then with the dataset, before any training. They only read."""
    for stage in stages:
        if stage.check is not None:
            with failing_in(stage.name):
                stage.check(config, dataset)


def stage_keys(config: PipelineConfig, source_digest: str) -> dict[str, str]:
    """The artifact key of every stage (and variant) a run of `config` makes from a source
    with content digest `source_digest`, from the declarations alone: an input's key is all
    a stage's key takes from it."""
    if config.classes_from_data:
        raise ValueError("num_classes is auto: the keys depend on the dataset's classes; pass config.with_classes(n)")
    keys: dict[str, str] = {}

    def key_of(needs: Needs) -> str:
        if needs == SOURCE:
            return source_digest
        producer = BY_NAME[needs.stage]
        if needs.variant is None:
            return ",".join(keys[producer.instance(v)] for v in producer.variants_of(config))
        return keys.get(producer.instance(needs.variant), "")  # an optional variant this config does not make

    for stage in STAGES:
        for variant in stage.variants_of(config):
            inputs = {name: key_of(needs) for name, needs in stage.inputs.items()}
            keys[stage.instance(variant)] = stage.key(stage.settings_for(config, variant), inputs)
    return keys


class FinishedRun:
    """Every artifact of a finished run of `config`, found (never computed) from the config's
    keys, each once, in pipeline order; a missing one is an error naming the stage to run.
    The stages named in `make` are run instead (inside a flow: a stage flow runs its own
    stage this way, Cached when its artifact exists), after their checks. The config takes
    the dataset's classes, as the run did."""

    def __init__(self, config: PipelineConfig, make: Collection[str] = ()) -> None:
        self.make = frozenset(make)
        self.config = on_this_machine(config)
        self._outputs: dict[str, Any] = {}
        dataset = self.get(INGEST)
        self.config = with_dataset_classes(self.config, dataset)
        check_stages(self.config, dataset, [stage for stage in STAGES if stage.name in self.make])

    @cached_property
    def runtime(self) -> Runtime:
        """Where the artifacts are, with the credentials to read them (read when first needed)."""
        return Runtime.of(self.config)

    def get(self, stage: Stage[M], variant: Any = None) -> M:
        """The output of `stage` (of one variant of a stage with variants)."""
        if stage.variants is not None and variant is None:
            raise TypeError(f"{stage.name} has variants: ask for one, or for every(stage)")
        return self._started(stage, variant).result()

    def every(self, stage: Stage[M]) -> list[M]:
        """The outputs of every variant of `stage` (made side by side), or its one output."""
        started = [self._started(stage, variant) for variant in stage.variants_of(self.config)]
        return [output.result() for output in started]

    def inputs(self, stage: Stage) -> dict[str, Any]:
        """What `stage` takes, by the names of its declaration."""
        return {name: self._input(needs) for name, needs in stage.inputs.items()}

    def _started(self, stage: Stage, variant: Any) -> Started:
        instance = stage.instance(variant)
        if instance not in self._outputs:
            inputs = self.inputs(stage)
            if stage.name in self.make:
                self._outputs[instance] = stage.start(self.config, self.runtime, variant, **inputs)
            else:
                artifact = stage.artifact(stage.settings_for(self.config, variant), inputs, self.runtime)
                self._outputs[instance] = Started(instance, artifact.require(stage.output, stage.name))
        return self._outputs[instance]

    def _input(self, needs: Needs) -> Any:
        if needs == SOURCE:
            return self.config.build_source()
        producer = BY_NAME[needs.stage]
        if needs.variant is None:
            return self.every(producer) if producer.variants is not None else self.get(producer)
        if needs.variant not in producer.variants_of(self.config):
            if needs.optional:
                return None
            raise ValueError(f"this config makes no {producer.instance(needs.variant)}")
        return self.get(producer, needs.variant)
