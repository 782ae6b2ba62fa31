"""The stages of the pipeline, in the order a run starts them, and what is derived from
their declarations: the keys of a config's artifacts (`stage_keys`), and `Outputs`, the
outputs of one config's stages, found (`FinishedRun`) or produced (the flows).

The order lets work overlap: the classifiers need only images, so they start (as
futures) before the autoencoder trains; the priors of all levels start together. The last
stage's output is the run's result: its report (`FINAL`).
"""
from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Collection, Iterator
from functools import cached_property
from typing import Any, ContextManager, TypeVar

from prefect.futures import PrefectFuture

from ..config import PipelineConfig, Runtime
from ..manifests import Manifest
from ..machinery.dask import check_dask_runner
from ..machinery.devices import on_this_machine
from ..stage import SOURCE, Needs, Settings, Stage
# The stage modules (`tasks/stages/<name>.py`, each declaring its `STAGE`), in the order a
# run starts them: a new stage is its module and one line here.
STAGE_MODULES = (
    "ingest",
    "train_classifier",
    "train_autoencoder",
    "encode",
    "train_prior",
    "sample",
    "evaluate",
)
STAGES: tuple[Stage, ...] = tuple(importlib.import_module(f"{__name__}.{name}").STAGE for name in STAGE_MODULES)
BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}
FINAL: Stage = STAGES[-1]  # what a pipeline run ends with and returns

M = TypeVar("M", bound=Manifest)
# (stage, variant, its settings, its inputs) -> its output, or a future of it
Producer = Callable[[Stage, Any, Settings, dict[str, Any]], Any]
# A stage instance's name (train-priors[0]) -> the context its work and waits run in
Within = Callable[[str], ContextManager[Any]]


def _anywhere(instance: str) -> ContextManager[None]:
    return contextlib.nullcontext()


def check_before_run(config: PipelineConfig, within: Within = _anywhere) -> None:
    """Every stage's check on what `config` alone shows: before a run waits for its turn or
    starts anything."""
    check_dask_runner(config.runner.dask_address)
    for stage in STAGES:
        if stage.check is not None:
            with within(stage.name):
                stage.check(config, None)


class Outputs:
    """The outputs of one config's stages, by stage and variant, each obtained once through
    `produce` (find it, or run it) after the outputs it takes. `within(instance)` wraps the
    production and the wait of each (the flows name the failing stage with it); `makes`
    names the stages `produce` runs rather than finds (None: all of them)."""

    def __init__(self, config: PipelineConfig, produce: Producer, source: Any = None, within: Within = _anywhere,
                 makes: Collection[str] | None = None) -> None:
        self.config, self._produce, self._within = config, produce, within
        self._source = source
        self._makes = None if makes is None else frozenset(makes)
        self._outputs: dict[tuple[str, Any], Any] = {}

    @cached_property
    def runtime(self) -> Runtime:
        """Where the artifacts are, with the credentials to read them (read when first needed)."""
        return Runtime.of(self.config)

    @cached_property
    def source(self) -> Any:
        """The data source (its content digest is the dataset's key input)."""
        return self._source if self._source is not None else self.config.build_source()

    def makes(self, stage: Stage) -> bool:
        return self._makes is None or stage.name in self._makes

    def check(self) -> None:
        """Every stage's check, in stage order, on the config and the outputs it reads. A check
        that completes the config (the dataset's classes) replaces it: outputs already had
        whose settings or inputs differ under the new config are dropped, to be had again."""
        for stage in STAGES:
            if stage.check is None:
                continue
            with self._within(stage.name):
                config = stage.check(self.config, self)
            if config is not None and config != self.config:
                self._replace_config(config)

    def start(self, stage: Stage) -> None:
        """Produce every variant of `stage`, not waiting for those that return futures."""
        for variant in stage.variants_of(self.config):
            self._start(stage, variant)

    def get(self, stage: Stage[M], variant: Any = None) -> M:
        """The output of `stage` (of one variant of a stage with variants), waiting for it if needed."""
        if stage.variants is not None and variant is None:
            raise TypeError(f"{stage.name} has variants: ask for one, or for every(stage)")
        return self._get(stage, variant)

    def every(self, stage: Stage[M]) -> list[M]:
        """The outputs of every variant of `stage` (the one output of a stage without variants)."""
        return [self._get(stage, variant) for variant in stage.variants_of(self.config)]

    def inputs(self, stage: Stage) -> dict[str, Any]:
        return {name: self._input(needs) for name, needs in stage.inputs.items()}

    def input(self, stage: Stage, name: str) -> Any:
        """One input of `stage` (its `name` in the stage's inputs), found or made alone: how a
        stage's check reads another stage's output without importing that stage."""
        return self._input(stage.inputs[name])

    def _get(self, stage: Stage, variant: Any) -> Any:
        started = self._start(stage, variant)
        with self._within(stage.instance(variant)):  # a failed future raises here
            return resolved(started)

    def _start(self, stage: Stage, variant: Any) -> Any:
        if (stage.name, variant) not in self._outputs:
            settings = stage.settings_for(self.config, variant)
            inputs = self.inputs(stage)
            with self._within(stage.instance(variant)):
                self._outputs[stage.name, variant] = self._produce(stage, variant, settings, inputs)
        return self._outputs[stage.name, variant]

    def _input(self, needs: Needs) -> Any:
        if needs == SOURCE:
            return self.source
        producer = BY_NAME[needs.stage]
        if needs.variant is None:
            return self.every(producer) if producer.variants is not None else self.get(producer)
        if needs.variant not in producer.variants_of(self.config):
            if needs.optional:
                return None
            raise ValueError(f"this config makes no {producer.instance(needs.variant)}")
        return self.get(producer, needs.variant)

    def _replace_config(self, config: PipelineConfig) -> None:
        old, self.config = self.config, config
        kept: dict[tuple[str, Any], Any] = {}
        for stage in STAGES:  # in order: a stage's inputs are decided before it
            for variant in stage.variants_of(config):
                if (stage.name, variant) in self._outputs and all(key in kept for key in _needed(stage, config)) \
                        and stage.settings_for(old, variant) == stage.settings_for(config, variant):
                    kept[stage.name, variant] = self._outputs[stage.name, variant]
        self._outputs = kept


def _needed(stage: Stage, config: PipelineConfig) -> Iterator[tuple[str, Any]]:
    """The (stage, variant) outputs `stage` takes under `config`."""
    for needs in stage.inputs.values():
        if needs == SOURCE:
            continue
        producer = BY_NAME[needs.stage]
        variants = producer.variants_of(config) if needs.variant is None else [needs.variant]
        yield from ((producer.name, v) for v in variants if v in producer.variants_of(config))


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


class FinishedRun(Outputs):
    """Every artifact of a finished run of `config`, found (never computed) in pipeline
    order, each once; a missing one is an error naming the stage to run. The stages named
    in `make` are run instead (inside a flow: a stage flow runs its own stage this way,
    Cached when its artifact exists). The stages' checks complete the config as the run did
    (the dataset's classes), and refuse what the stages in `make` cannot run."""

    def __init__(self, config: PipelineConfig, make: Collection[str] = ()) -> None:
        super().__init__(on_this_machine(config), self._find, makes=make)
        self.check()

    def _find(self, stage: Stage, variant: Any, settings: Settings, inputs: dict[str, Any]) -> Any:
        if self.makes(stage):
            return stage.run(settings, self.runtime, **inputs)
        return stage.artifact(settings, inputs, self.runtime).require(stage.output, stage.name)
