"""The pipeline's one typed config: a model preset with overrides, the source, the
storage root, and a section per stage. Prefect renders it as the flow's form.

Fields left at None take the preset's value (see `PRESET_DEFAULTS`), so choosing
`smoke` in the form also chooses a smoke-sized dataset and sample count.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

import vqvae2
from storage.artifacts import canonical_json, without_unset_additions
from storage.fsutil import join
from storage.ingest import ShardingOptions
from storage.sources import Source

from ..credentials import block_options
from ..presets import PRESET_DEFAULTS, PRESET_NAMES
from .fields import AUTO, CONFIG, RUN_ONLY, RunOnly, SchemaBounds
from .source import SourceSection
from .stages import EncodeSection, EvaluateSection, RunnerSection, SampleSection
from .storage import StorageSection
from .training import TrainingRuntime, TrainingSection

PresetName = Literal[PRESET_NAMES]  # type: ignore[valid-type]
if set(PRESET_NAMES) != set(vqvae2.PRESETS):
    raise ImportError(f"tasks.presets names {sorted(PRESET_NAMES)}, vqvae2.PRESETS {sorted(vqvae2.PRESETS)}: one each")


# The ranges `storage.ingest.ShardingOptions` checks itself (storage imports no pydantic), for
# the schema; `tests/test_parameter_schema.py` holds both to the same bounds.
INGEST_BOUNDS = SchemaBounds(
    shard_size={"minimum": 1},
    max_bad_fraction={"minimum": 0, "exclusiveMaximum": 1},
    holdout_fraction={"minimum": 0, "exclusiveMaximum": 1},
    max_samples_per_split={"minimum": 1},  # beside `null`, which a minimum leaves alone
    min_size={"minimum": 0},
    quality={"minimum": 1, "maximum": 100},
)


class PipelineConfig(BaseModel):
    """Everything one run of the vqvae2 pipeline needs."""

    model_config = CONFIG

    preset: PresetName = Field("fashion-mnist", description="Model and training preset")
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Dotted-path overrides of the preset, e.g. {'autoencoder.channels': 64, 'train_prior.steps': 100}. "
        "The number of classes follows the data unless num_classes is a number here: the preset's when the dataset "
        "has that many, else the dataset's (0, unconditional priors, when it has no labels); {'num_classes': 'auto'} "
        "always takes the dataset's; {'num_classes': 0} forces unconditional priors",
    )
    source: SourceSection = Field(default_factory=SourceSection, description="Where the images come from; "
                                  "default: Fashion-MNIST")
    storage: StorageSection = Field(default_factory=StorageSection, description="The storage root every artifact "
                                    "and Prefect's cache records live under")
    ingest: Annotated[ShardingOptions, INGEST_BOUNDS] = Field(
        default_factory=ShardingOptions, description="How the source is cut into WebDataset shards; "
        "max_samples_per_split None: the preset's choice",
    )
    training: TrainingSection = Field(default_factory=TrainingSection, description="How the trainings run: device, "
                                      "processes, checkpoints, logging")
    encode: Annotated[EncodeSection, RUN_ONLY] = Field(
        default_factory=EncodeSection, description="Encoding the dataset into codes",
    )
    sample: SampleSection = Field(default_factory=SampleSection, description="Sampling from the priors, with "
                                  "classifier-based rejection")
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection, description="The report: feature space, "
                                      "reference images, grids")
    runner: Annotated[RunnerSection, RUN_ONLY] = Field(
        default_factory=RunnerSection, description="Where mapped tasks run",
    )

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        try:
            self.model  # noqa: B018 - a bad override fails here, naming the field, not mid-run
        except ValueError as err:
            raise ValueError(_named_as_set(self.preset, self._model_overrides(), str(err))) from None
        if self.storage.root.startswith("memory://") and self.training.subprocess:
            raise ValueError(
                "storage.root is memory://, which lives inside one process, but training runs in its own "
                "process: set training.subprocess to false, or use a local or s3:// root"
            )
        return self

    @cached_property
    def model(self) -> vqvae2.ModelConfig:
        """The preset with the overrides applied. Until the dataset is known (`with_classes`),
        a config whose num_classes is not a number has the preset's."""
        return vqvae2.preset(self.preset, self._model_overrides())

    def _model_overrides(self) -> dict[str, Any]:
        return {k: v for k, v in self.overrides.items() if not (k == "num_classes" and v == AUTO)}

    # The number of classes, three ways (`tasks.stages.ingest.with_dataset_classes` applies them):
    # - not set (the default): the preset's number when the dataset has that many classes, so
    #   Fashion-MNIST's configs keep their keys; otherwise the dataset's, as if set by hand;
    # - `auto`: always the dataset's, written into the config as if set by hand;
    # - a number: fixed; a dataset with other classes fails right after ingest (0: unconditional).

    @property
    def classes_from_data(self) -> bool:
        """`num_classes: auto`: the model takes the number of classes the dataset has, whatever
        the preset says; the keys wait for the dataset (`with_classes`)."""
        return self.overrides.get("num_classes") == AUTO

    @property
    def classes_fixed(self) -> bool:
        """`num_classes` set to a number: the dataset must have that many classes (or any, for 0)."""
        return "num_classes" in self.overrides and not self.classes_from_data

    def with_classes(self, num_classes: int) -> PipelineConfig:
        """This config with `num_classes` fixed: what an `auto` config becomes once the data is known,
        with the same keys as a config that set that number itself."""
        return PipelineConfig.model_validate(self.model_dump() | {"overrides": self.overrides | {"num_classes": num_classes}})

    def preset_default(self, name: str, value: Any) -> Any:
        return PRESET_DEFAULTS[self.preset][name] if value is None else value

    def build_source(self) -> Source:
        """The source, Fashion-MNIST downloaded under the storage root where the Debian package is missing."""
        return self.source.build(download_to=join(self.storage.url, "downloads", "fashion-mnist"))

    def check_source(self) -> None:
        """Fail now, naming the URL, if the source given in `source.url` is missing, its server does
        not answer, or its list names rows it may not: before a run starts Prefect and its tasks.
        (Fashion-MNIST's default files are found, or downloaded, by the ingest itself.)"""
        if self.source.url:
            self.build_source().check()

    @property
    def num_samples(self) -> int:
        return self.preset_default("num_samples", self.sample.num_samples)

    @property
    def sample_batch_size(self) -> int:
        return self.preset_default("sample_batch_size", self.sample.batch_size)

    @property
    def eval_images(self) -> int:
        return self.preset_default("eval_images", self.evaluate.eval_images)


def _named_as_set(preset: str, overrides: dict[str, Any], message: str) -> str:
    """A model check's message with the field named by the override that failed it. Several
    model sections share one type (the three trainings a `TrainConfig`, each level a
    `PriorConfig`), whose checks name the type (`train.lr must be > 0`), not the `--set` key
    the user wrote (`train_autoencoder.lr`): the section whose overrides alone fail with the
    same message is the one. Any other message is returned as it is."""
    named = re.match(r"(\w+)\.\w", message)
    if named is None:
        return message
    flat = dict(_dotted(overrides))
    for section in dict.fromkeys(key.rpartition(".")[0] for key in flat):  # train_prior, priors.1
        if not section or section == named.group(1):
            continue
        try:
            vqvae2.preset(preset, {key: value for key, value in flat.items() if key.startswith(f"{section}.")})
        except ValueError as alone:
            if str(alone) == message:
                return re.sub(rf"(?<![\w.]){named.group(1)}\.(?=\w)", f"{section}.", message)
    return message


def _dotted(overrides: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Overrides as dotted keys, whether given so (`train_prior.lr`) or nested (`{"train_prior":
    {"lr": ...}}`, a list of priors `{"priors": [{...}, {...}]}`: `priors.0.layers`)."""
    for key, value in overrides.items():
        if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            value = {str(index): item for index, item in enumerate(value)}
        if isinstance(value, dict) and value:
            yield from _dotted(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


class TurnHeld(BaseModel):
    """A run's turn at one artifact (`tasks.machinery.turns`), as a process that holds no lease
    asks after it: the lease's folder, its generation and token, what it guards."""

    model_config = ConfigDict(frozen=True)

    lease: str
    number: int
    token: str
    artifact: str  # the URL of the artifact (or stage folder) its writes go under
    what: str  # as messages name it: autoencoder/<key>


class Runtime(BaseModel):
    """What every stage may read besides its own config slice: where the artifacts live and
    how work runs. Nothing here changes a stage's output, so nothing here is in a cache key."""

    model_config = CONFIG

    storage: StorageSection
    training: TrainingRuntime
    encode: EncodeSection
    # The credentials block's options, read once by the flow. A task's parameters are never
    # stored by Prefect (only the flow's are), so they may travel with the Runtime.
    credentials: dict[str, Any] = Field(default_factory=dict, repr=False)
    # The run's turn at the stage it is handed to: a unit on a Dask worker asks after it.
    turn: TurnHeld | None = None

    @classmethod
    def of(cls, config: PipelineConfig, credentials: bool = True) -> Runtime:
        """The runtime of `config`; `credentials=False` leaves the credentials block unread
        (for what needs no storage access, such as computing keys)."""
        block = config.storage.credentials_block if credentials else None
        return cls(storage=config.storage, training=config.training.runtime(), encode=config.encode,
                   credentials=block_options(block, "storage.credentials_block"))

    @property
    def root(self) -> str:
        return self.storage.url

    @property
    def storage_options(self) -> dict[str, Any]:
        return {**self.storage.storage_options, **self.credentials}


def run_only_fields(model: type[BaseModel]) -> dict[str, Any]:
    """The fields of `model` marked `RUN_ONLY`, as pydantic's `exclude` takes them: a
    marked section is True, a section with marked fields the set of their names."""

    def marked(info: Any) -> bool:
        return any(isinstance(item, RunOnly) for item in info.metadata)

    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        section = info.annotation
        if marked(info):
            fields[name] = True
        elif isinstance(section, type) and issubclass(section, BaseModel):
            if inner := {field for field, given in section.model_fields.items() if marked(given)}:
                fields[name] = inner
    return fields


# Every field of the config that decides no artifact: what no key reads.
RUN_ONLY_FIELDS: dict[str, Any] = run_only_fields(PipelineConfig)


def deciding_fields(config: PipelineConfig) -> dict[str, Any]:
    """The part of `config` that decides its artifacts, as JSON data (settings added since
    keys were first made only where they are set: `storage.artifacts.IN_KEY_WHEN_SET`)."""
    return without_unset_additions(config, config.model_dump(mode="json", exclude=RUN_ONLY_FIELDS))


def config_key(config: PipelineConfig) -> str:
    """The config's key: 16 hex digits of its storage root and the fields that decide its
    artifacts. Runs of one config into one root share it (they take turns under it, and its
    UI artifacts carry it), whatever they run on or however fast."""
    identity = canonical_json({"root": config.storage.url, "config": deciding_fields(config)})
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def validate_config(data: Any) -> PipelineConfig:
    """`PipelineConfig.model_validate(data)`, its errors as one line naming each field by its
    `--set` key: `invalid configuration: ingest.max_bad_fraction must be ...`."""
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ValueError(f"invalid configuration: {config_errors(err)}") from None


def config_errors(error: ValidationError) -> str:
    """Each error of `error` as `key: message`, or the message alone where it names its key
    itself (the validators of this module do), joined by `; `. Never the input: the config
    hides it (`hide_input_in_errors`), since it may hold a refused credential."""
    lines = []
    for detail in error.errors(include_url=False, include_input=False):
        key = ".".join(str(part) for part in detail["loc"])
        message = detail["msg"].removeprefix("Value error, ")
        lines.append(message if not key or message.startswith(key) else f"{key}: {message}")
    return "; ".join(lines)


def pipeline_config(preset: PresetName = "fashion-mnist", **sections: Any) -> PipelineConfig:
    """A config for `preset`, other sections given as dicts: `pipeline_config("smoke", storage={"root": ...})`."""
    return PipelineConfig(preset=preset, **sections)
