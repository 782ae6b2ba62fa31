"""The stages of the pipeline, in the order a run starts them, and what is derived from
their declarations: the keys of a config's artifacts (`stage_keys`), and `Outputs`, the
outputs of one config's stages, found (`FinishedRun`) or produced (the flows).

The order lets work overlap: the classifiers need only images, so they start (as
futures) before the autoencoder trains; the priors of all levels start together.
"""
from __future__ import annotations

from collections.abc import Callable, Collection
from functools import cached_property
from typing import Any

from prefect.futures import PrefectFuture

from ..config import PipelineConfig, Runtime
from ..manifests import (
    ClassifierManifest,
    CodesManifest,
    PriorManifest,
    SamplesManifest,
)
from ..runs import RunArtifacts
from ..stage import SOURCE, Needs, Settings, Stage
from . import encode, evaluate, ingest, sample, train_autoencoder, train_classifier, train_prior

STAGES: tuple[Stage, ...] = tuple(module.STAGE for module in (
    ingest, train_classifier, train_autoencoder, encode, train_prior, sample, evaluate,
))
BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}

# (stage, variant, its settings, its inputs) -> its output, or a future of it
Producer = Callable[[Stage, Any, Settings, dict[str, Any]], Any]


class Outputs:
    """The outputs of one config's stages, by stage and variant, each obtained once through
    `produce` (find it, or run it) after the outputs it takes."""

    def __init__(self, config: PipelineConfig, produce: Producer, source: Any = None) -> None:
        self.config, self._produce = config, produce
        self._source = source
        self._outputs: dict[tuple[str, Any], Any] = {}

    def adopt_classes(self) -> None:
        """Fix the config's classes from the dataset (`num_classes: auto`), or check they agree
        with it: once the dataset exists, before any stage that depends on the classes starts."""
        dataset = self.get("ingest")
        self.config = ingest.adopt_classes(dataset, self.config)
        self._outputs = {("ingest", None): self._outputs["ingest", None]}  # the rest were started for the old config

    @cached_property
    def runtime(self) -> Runtime:
        """Where the artifacts are, with the credentials to read them (read when first needed)."""
        return Runtime.of(self.config)

    @cached_property
    def source(self) -> Any:
        """The data source (its content digest is the dataset's key input)."""
        return self._source if self._source is not None else self.config.build_source()

    def start(self, stage: Stage) -> None:
        """Produce every variant of `stage`, not waiting for those that return futures."""
        for variant in stage.variants_of(self.config):
            self._start(stage, variant)

    def get(self, stage: Stage | str, variant: Any = None) -> Any:
        """One stage output (a variant's, for a stage with variants), waiting for it if needed."""
        stage = BY_NAME[stage] if isinstance(stage, str) else stage
        if stage.variants is not None and variant is None:
            return [self.get(stage, v) for v in stage.variants_of(self.config)]
        return resolved(self._start(stage, variant))

    def inputs(self, stage: Stage) -> dict[str, Any]:
        return {name: self._input(needs) for name, needs in stage.inputs.items()}

    def _start(self, stage: Stage, variant: Any) -> Any:
        if (stage.name, variant) not in self._outputs:
            settings = stage.settings_for(self.config, variant)
            self._outputs[stage.name, variant] = self._produce(stage, variant, settings, self.inputs(stage))
        return self._outputs[stage.name, variant]

    def _input(self, needs: Needs) -> Any:
        if needs == SOURCE:
            return self.source
        producer = BY_NAME[needs.stage]
        if needs.variant is not None and needs.variant not in producer.variants_of(self.config):
            if needs.optional:
                return None
            raise ValueError(f"this config makes no {producer.instance(needs.variant)}")
        return self.get(producer, needs.variant)


def resolved(output: Any) -> Any:
    """A stage output, waiting for it if it is a future."""
    return output.result() if isinstance(output, PrefectFuture) else output


def stage_keys(config: PipelineConfig, source_digest: str) -> dict[str, str]:
    """The artifact key of every stage (and variant) a run of `config` makes from a source
    with content digest `source_digest`, computed from the declarations alone."""
    if config.classes_from_data:
        raise ValueError("num_classes is auto: the keys depend on the dataset's classes; pass config.with_classes(n)")
    keys: dict[str, str] = {}
    runtime = Runtime.of(config, credentials=False)  # a key names an artifact; finding it is another matter

    def key_only(stage: Stage, variant: Any, settings: Settings, inputs: dict[str, Any]) -> str:
        # An input's key is all a stage key takes from it: the key stands in for the manifest.
        keys[stage.instance(variant)] = stage.artifact(settings, inputs, runtime).key
        return keys[stage.instance(variant)]

    outputs = Outputs(config, key_only, source=source_digest)
    for stage in STAGES:
        outputs.start(stage)
    return keys


class FinishedRun(Outputs, RunArtifacts):
    """Every artifact of a finished run of `config`, found (never computed) in pipeline
    order, each once; a missing one is an error naming the stage to run. The stages named
    in `make` are run instead (inside a flow: a stage flow runs its own stage this way,
    Cached when its artifact exists)."""

    def __init__(self, config: PipelineConfig, make: Collection[str] = ()) -> None:
        self._make = frozenset(make)
        super().__init__(config, self._find)
        self.adopt_classes()

    def _find(self, stage: Stage, variant: Any, settings: Settings, inputs: dict[str, Any]) -> Any:
        if stage.name in self._make:
            return stage.run(settings, self.runtime, **inputs)
        return stage.artifact(settings, inputs, self.runtime).require(stage.output, stage.name)

    @property
    def codes(self) -> CodesManifest:
        return self.get("encode")

    @property
    def priors(self) -> list[PriorManifest]:
        return self.get("train-priors")

    @property
    def classifiers(self) -> list[ClassifierManifest]:
        return self.get("train-classifiers")

    @property
    def judge(self) -> ClassifierManifest | None:
        return self.inputs(BY_NAME["sample"])["judge"]

    @property
    def samples(self) -> SamplesManifest:
        return self.get("sample")
