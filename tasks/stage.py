"""A stage is declared once, in its own module (`tasks/stages/<stage>.py`), with everything
about it: its name, the directory of its artifacts, a code version, the typed slice of the
pipeline config it reads, the outputs of other stages it takes, the type of its own output
(with the readers of that output as its methods: a stage never imports another, it reads
what it takes through the manifest it is handed), what it checks before a run, and what it
publishes.

    STAGE = Stage(name="encode", directory="codes", code_version="1", settings=EncodeSettings,
                  inputs={"dataset": Needs("ingest"), "autoencoder": Needs("train-autoencoder")},
                  output=CodesManifest, run=run)

The slice, its inputs' keys and the code version *are* the cache key: a stage's code
receives its slice (`Settings`), never the whole config, so it cannot read a field
the key misses, and a slice reads the config alone, never the machine, so one config has
the same keys everywhere. Besides its slice, a stage may read only the `Runtime` (where
artifacts live, how work runs), which by construction never changes an output.

A flow calls a stage with the config and the outputs it takes, by name:
`codes = ENCODE(config, runtime, dataset=dataset, autoencoder=autoencoder)`; `start`
returns at once where the stage's work runs as a future (the trainings), `result()` waits.
In a run that takes turns (`tasks.machinery.turns`), `start` first waits for the turn at
the stage's output, and looks whether that output is whole.
The pipeline flow (`flows.pipeline`) is those calls, written out; the list of declarations
(`tasks.stages.STAGES`) gives the stage flows, the CLI's stage list, a finished run's
artifacts and a config's keys.
"""
from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from prefect.futures import PrefectFuture
from pydantic import BaseModel, ConfigDict

from storage.artifacts import artifact_key
from storage.fsutil import join
from storage.integrity import FileRecord

from .config import PipelineConfig, Runtime
from .manifests import Manifest
from .machinery.artifacts import Artifact
from .machinery.cached import cached_unit
from .machinery.failure_report import failing_in
from .machinery.turns import current_turns, held

M = TypeVar("M", bound=Manifest)


class Settings(BaseModel):
    """A stage's slice of the pipeline config: everything that decides its output, nothing else."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def of(cls, config: PipelineConfig, variant: Any = None) -> Settings:
        raise NotImplementedError


@dataclass(frozen=True)
class Needs:
    """An input of a stage: the output of stage `stage`; of one `variant` of it, or, for a
    stage with variants and no `variant` given, the list of all of them."""

    stage: str
    variant: str | int | None = None
    optional: bool = False  # None when the config does not make that variant


SOURCE = Needs("source")  # the data source itself: it enters the key through its content digest


@dataclass(frozen=True)
class Stage(Generic[M]):
    name: str  # the CLI's and the stage flow's name: train-autoencoder
    directory: str  # its artifacts: {root}/{directory}/{key}/
    code_version: str  # bump when the stage computes something else from the same inputs
    settings: type[Settings]
    output: type[M]
    run: Callable[..., Any]  # run(settings, runtime, **inputs) inside a flow -> manifest, or a future of it
    inputs: Mapping[str, Needs] = field(default_factory=dict)
    variants: Callable[[PipelineConfig], list[Any]] | None = None  # e.g. one prior per level
    summary: str = ""
    # What the UI shows of its output, publish(manifest, storage_options): the flows call it on
    # every run that ends with this stage, so a Cached run shows its results too.
    publish: Callable[[Any, dict[str, Any]], None] | None = None
    # Earlier stages its stage flow runs rather than requires (re-evaluating at other
    # acceptance rates needs samples at those rates); every other input must exist.
    makes_along: tuple[str, ...] = ()
    # check(config, dataset): raises on a config this stage cannot run, naming what to
    # change; reads only what it is given, and writes nothing. Every run calls it twice:
    # with dataset None before anything starts (what the config alone shows), then with
    # the dataset's manifest once the ingest made it, before any training.
    check: Callable[[PipelineConfig, Any], None] | None = None
    # then(output, runtime): what a run that calls this stage does with its output once it has
    # it, made or Cached (a training's TensorBoard events, from the history its artifact keeps).
    then: Callable[[Any, Runtime], None] | None = None

    def __call__(self, config: PipelineConfig, runtime: Runtime, variant: Any = None, **inputs: Any) -> M:
        """This stage's output for `config` (one `variant` of a stage with variants), made
        from `inputs` inside a flow (or found: Cached), once it is there."""
        return self.start(config, runtime, variant, **inputs).result()

    def start(self, config: PipelineConfig, runtime: Runtime, variant: Any = None, **inputs: Any) -> Started[M]:
        """Start this stage: a training runs as a future beside what the flow does next."""
        instance = self.instance(variant)
        with failing_in(instance):
            settings = self.settings_for(config, variant)
            turns = current_turns()  # a run's turns: another run making this output is waited for
            turn = (turns.take(runtime.root, *self.turn(settings, inputs, runtime), runtime.storage.turn_bound_s)
                    if turns else None)
            runtime = held(turn, runtime) if turn is not None else runtime  # its units on other processes ask after it
            try:
                if SOURCE not in self.inputs.values():  # the ingest's key waits for its plan: the ingest looks then
                    # Cached only when whole: an artifact with a file gone is reopened, and made whole here.
                    self.artifact(settings, inputs, runtime).read_whole(self.output)
                output = self.run(settings, runtime, **inputs)
            except BaseException:
                if turn is not None:
                    turns.give_back(turn)
                raise
            if turn is not None:  # given back once the output is there
                if isinstance(output, PrefectFuture):
                    output.add_done_callback(lambda _: turns.give_back(turn))
                else:
                    turns.give_back(turn)
            return Started(instance, output, functools.partial(self.then, runtime=runtime) if self.then else None)

    def turn(self, settings: Settings, inputs: Mapping[str, Any], runtime: Runtime) -> tuple[str, str, dict]:
        """Where runs take turns at this stage's output, and what that turn guards: (the turn's
        folder, `autoencoder/<key>`; the URL of what it writes; the storage options). The
        ingest's key waits for the source's content digest: its turn is that of what the source
        is (`describe()`) and how it is sharded, and guards the whole datasets folder."""
        if SOURCE in self.inputs.values():
            folder = f"{self.directory}/source-{self.described_key(settings, inputs)}"
            return folder, join(runtime.root, self.directory), dict(runtime.storage_options)
        artifact = self.artifact(settings, inputs, runtime)
        return f"{self.directory}/{artifact.key}", artifact.url, artifact.storage_options

    def described_key(self, settings: Settings, inputs: Mapping[str, Any]) -> str:
        """A key of what a source is (its `describe()`, not its content) under `settings`: what
        the ingest's turn and its lineage (the dataset a grown source is ingested against) name."""
        return artifact_key("sources", settings, {name: inputs[name].describe() for name in self.inputs},
                            self.code_version)

    def variants_of(self, config: PipelineConfig) -> list[Any]:
        return self.variants(config) if self.variants else [None]

    def settings_for(self, config: PipelineConfig, variant: Any = None) -> Settings:
        return self.settings.of(config, variant)

    def instance(self, variant: Any = None) -> str:
        """How one variant is named in keys and messages: train-priors[0]."""
        return self.name if variant is None else f"{self.name}[{variant}]"

    def key(self, settings: Settings, input_keys: Mapping[str, str]) -> str:
        if set(input_keys) != set(self.inputs):
            raise ValueError(f"{self.name} takes inputs {sorted(self.inputs)}, got {sorted(input_keys)}")
        return artifact_key(self.directory, settings, dict(input_keys), self.code_version)

    def artifact(self, settings: Settings, inputs: Mapping[str, Any], runtime: Runtime) -> Artifact:
        keys = {name: key_of(inputs[name]) for name in self.inputs}
        return Artifact(runtime.root, self.directory, self.key(settings, keys), dict(runtime.storage_options))


@dataclass(frozen=True)
class Started(Generic[M]):
    """A stage's output, or a future of it; `result()` waits, an error naming the stage."""

    instance: str
    output: Any
    then: Callable[[Any], None] | None = None  # `Stage.then`, once, in the flow's thread (its log is the run's)
    _then_done: list[bool] = field(default_factory=list, compare=False, repr=False)

    def result(self) -> M:
        with failing_in(self.instance):
            output = self.output.result() if isinstance(self.output, PrefectFuture) else self.output
            if self.then is not None and not self._then_done:
                self._then_done.append(True)
                self.then(output)
            return output


def key_of(value: Any) -> str:
    """The key an input contributes to a stage key: a manifest's key, the keys of a list,
    "" for an absent optional input, a source's content digest."""
    if value is None:
        return ""
    if isinstance(value, Manifest):
        return value.key
    if isinstance(value, (list, tuple)):
        return ",".join(key_of(v) for v in value)
    if isinstance(value, str):
        return value
    if callable(getattr(value, "digest", None)):  # a storage.sources.Source
        return value.digest()
    raise TypeError(f"no key for an input of type {type(value).__name__}")


def stage_task(stage: Stage, *, task_run_name: str | None = None, name: str | None = None,
               known_files: Callable[[Mapping[str, Any]], Mapping[str, FileRecord]] | None = None, **options: Any):
    """The task that produces `stage`'s artifact: `fn(settings, runtime, **inputs, artifact) -> manifest`.

    Cached through `cached_unit` on the artifact's manifest; the manifest gets the time
    the stage took and the digest of the artifact's inventory (every file's size and
    SHA-256: `known_files(params)` gives those recorded as the files were written, the
    rest are read), and is written last. It first tidies the stage's folder
    (`Artifact.tidy_stage`): what failed runs left there is removed by the next run."""

    def decorate(fn: Callable[..., M]):
        signature = inspect.signature(fn)
        shown = signature.replace(parameters=[p for p in signature.parameters.values() if p.name != "artifact"])

        def locate(settings: Settings, runtime: Runtime, **inputs: Any):
            return stage.artifact(settings, inputs, runtime).marker(stage.output)

        @functools.wraps(fn)
        def produce(*args: Any, **kwargs: Any) -> M:
            params = shown.bind(*args, **kwargs).arguments
            artifact = stage.artifact(params["settings"], _inputs(params), params["runtime"])
            artifact.tidy_stage()
            started = time.monotonic()
            manifest = fn(*args, artifact=artifact, **kwargs)
            files = artifact.write_inventory(known_files(params) if known_files else None)
            return manifest.model_copy(update={"seconds": round(time.monotonic() - started, 3), "inventory": files})

        # Prefect binds parameters by signature: show it fn's, without the artifact.
        produce.__signature__ = shown
        del produce.__wrapped__
        return cached_unit(locate=lambda **params: locate(params["settings"], params["runtime"], **_inputs(params)),
                           name=name or stage.name, task_run_name=task_run_name, **options)(produce)

    def _inputs(params: Mapping[str, Any]) -> dict[str, Any]:
        return {name: params[name] for name in stage.inputs}

    return decorate
