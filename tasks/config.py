"""The pipeline's one typed config: a model preset with overrides, the source, the
storage root, and a section per stage. Prefect renders it as the flow's form.

Fields left at None take the preset's value (see `PRESET_DEFAULTS`), so choosing
`smoke` in the form also chooses a smoke-sized dataset and sample count.
"""
from __future__ import annotations

import importlib.util
import os
from functools import cached_property
import hashlib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

import vqvae2
from storage.artifacts import canonical_json
from storage.fsutil import holds_userinfo, join
from storage.ingest import ShardingOptions
from storage.sources import (
    FASHION_MNIST_DIR,
    IdxSource,
    ImageFolderSource,
    ListSource,
    Source,
    TarSource,
    fashion_mnist_source,
    http_options,
)
from storage.sources.image_folder import LABEL_MODES
from storage.sources.list_file import FORMATS as LIST_FORMATS

from .credentials import block_options, refuse_secrets, refuse_userinfo
from .presets import PRESET_DEFAULTS, PRESET_NAMES

PresetName = Literal[PRESET_NAMES]  # type: ignore[valid-type]
if set(PRESET_NAMES) != set(vqvae2.PRESETS):
    raise ImportError(f"tasks.presets names {sorted(PRESET_NAMES)}, vqvae2.PRESETS {sorted(vqvae2.PRESETS)}: one each")


AUTO = "auto"


class RunOnly:
    """Marks a config field that decides no artifact: where and how fast work runs, how storage
    is reached. Such a field is in no key (`config_key`, the stage keys), and the rest of the
    config is: this mark is the one place that says which is which (`RUN_ONLY`)."""

    def __repr__(self) -> str:
        return "RunOnly()"


ONLY_HOW_IT_RUNS = RunOnly()
# Frozen, strict, and its errors never echo the input: a refused credential must not reach a log.
CONFIG = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class Section(BaseModel):
    model_config = CONFIG


class SourceSection(Section):
    kind: Literal["auto", "fashion-mnist", "idx", "image-folder", "list", "tars"] = Field(
        AUTO, description="auto: fashion-mnist without a url, else list for a .csv/.tsv/.jsonl/.ndjson/.parquet "
        "file, tars for a .tar pattern, image-folder otherwise; fashion-mnist: the Debian package's files (or a "
        "checked download); "
        "idx: MNIST-style IDX files at `url`; image-folder: a folder of images, flat or one sub-folder per class, "
        "at `url`; list: a CSV/TSV, JSON Lines or Parquet file at `url`, a row per image; tars: existing "
        "WebDataset tars (img2dataset's too), `url` a brace/glob pattern",
    )
    url: str | None = Field(None, description="Where the source lives (any fsspec URL); fashion-mnist needs none")
    labels: str = Field(
        AUTO, description="Where labels come from. image-folder: folders (the first sub-folder is the class), none, "
        "or auto (folders when every image is in a sub-folder, none when all lie at the top); list: column:NAME, "
        "none, or auto (the column `label` when there is one); tars: cls (the .cls member), json:FIELD (a field of "
        "each sample's .json, as img2dataset writes), none, or auto (cls). Unlabelled data trains unconditional "
        "priors, unless the override num_classes fixes a number",
    )
    path_column: str | None = Field(None, description="list: the column of image paths or URLs (relative ones are "
                                    "relative to the list's folder); None: the first of path, url, file, image")
    split_column: str | None = Field(None, description="list: a column of train/test; None: `ingest.holdout_fraction` "
                                     "of the images, chosen by a stable hash, are held out")
    class_names: list[str] | None = Field(None, description="Class names of an idx, list or tars source. A tars "
                                          "source without them takes the labels seen as classes 0 to the largest, "
                                          "and fails if one of those has no image (label 9 in a 3-class set): "
                                          "class names declare the classes, empty ones included")
    allow_outside: bool = Field(
        False, description="list: also read rows that lie outside the list's own folder: absolute paths, file:// "
        "URLs, ../ escapes, URLs of other buckets or filesystems. Off (the default), a list names files in its "
        "folder and below (relative paths, or absolute ones inside it) and http(s) URLs on any host, and a list "
        "that is itself remote (s3://, http(s)://) never names a local file: a list is data, maybe someone "
        "else's, and must not pull any file the worker can read into the dataset",
    )
    timeout_s: Annotated[float, ONLY_HOW_IT_RUNS] = Field(
        30.0, gt=0, description="Seconds an http(s) server of the source (a list file and the images it names, tars, "
        "folders, the Fashion-MNIST mirror) may take to answer: to connect, and between two pieces of a reply; a "
        "large file that keeps coming is not cut off",
    )
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for the source's URL "
                                            "(no credentials: see credentials_block)")
    credentials_block: str | None = Field(None, description="Name of a Prefect Secret block whose value is the JSON "
                                          "text of the fsspec options with the source's credentials (key, secret, ...); "
                                          "without it, the worker's AWS_* environment variables or instance role")

    @property
    def resolved_kind(self) -> str:
        """The kind, `auto` decided from the URL."""
        if self.kind != AUTO:
            return self.kind
        if not self.url:
            return "fashion-mnist"
        path = self.url.split("?", 1)[0].rstrip("/").lower()
        if path.endswith(LIST_SUFFIXES):
            return "list"
        return "tars" if path.endswith(".tar") else "image-folder"

    @field_validator("url")
    @classmethod
    def _url(cls, url: str | None) -> str | None:
        if url is not None and not url.strip():
            raise ValueError("source.url is empty: give a folder, a list file or a .tar pattern (local, s3:// or "
                             "http(s)://), or leave it out for Fashion-MNIST")
        refuse_userinfo(url, "source.url", "source.credentials_block")
        return url

    @model_validator(mode="after")
    def _url_when_needed(self) -> SourceSection:
        kind = self.resolved_kind
        if kind != "fashion-mnist" and not self.url:
            raise ValueError(f"source.url is required for a source of kind {kind!r}")
        allowed = LABELS.get(kind, (AUTO,))
        if self.labels not in allowed and not any(p.endswith(":") and self.labels.startswith(p) for p in allowed):
            raise ValueError(f"source.labels is {self.labels!r}, but a source of kind {kind!r} takes one of "
                             f"{', '.join(p + 'NAME' if p.endswith(':') else p for p in allowed)}")
        for name in ("path_column", "split_column"):
            if getattr(self, name) is not None and kind != "list":
                raise ValueError(f"source.{name} applies to a list source, not to kind {kind!r}")
        if self.allow_outside and kind != "list":
            raise ValueError(f"source.allow_outside applies to a list source, not to kind {kind!r}")
        refuse_secrets(self.storage_options, "source.storage_options", "source.credentials_block")
        return self

    def build(self, download_to: str) -> Source:
        credentials = block_options(self.credentials_block, "source.credentials_block")
        options, kind = {**self.storage_options, **credentials} or None, self.resolved_kind
        if self.url and kind != "list":  # a list times its own fetches: its rows may be on other servers
            options = http_options(self.url, options, self.timeout_s)
        if kind == "fashion-mnist":
            if self.url:
                return IdxSource(self.url, storage_options=options)
            return fashion_mnist_source(download_to=download_to, storage_options=options, timeout_s=self.timeout_s)
        if kind == "idx":
            names = tuple(self.class_names) if self.class_names else IdxSource.__dataclass_fields__["class_names"].default
            return IdxSource(self.url, class_names=names, storage_options=options)
        names = tuple(self.class_names) if self.class_names else None
        if kind == "image-folder" and self.kind == AUTO and IdxSource.holds_idx_files(self.url, options):
            return IdxSource(self.url, storage_options=options)  # Fashion-MNIST's files elsewhere
        if kind == "image-folder":
            return ImageFolderSource(self.url, labels=self.labels, storage_options=options)
        if kind == "list":
            column = None if self.labels == "none" else self.labels.removeprefix("column:")
            return ListSource(self.url, path_column=self.path_column, label_column=column,
                              split_column=self.split_column, class_names=names, storage_options=options,
                              allow_outside=self.allow_outside, timeout_s=self.timeout_s)
        label = {AUTO: "cls", "none": None}.get(self.labels, self.labels)
        return TarSource(self.url, class_names=names, label=label, storage_options=options)


LIST_SUFFIXES = tuple(LIST_FORMATS)
# What `source.labels` may be per kind; a trailing ':' takes a name after it.
LABELS: dict[str, tuple[str, ...]] = {
    "image-folder": LABEL_MODES,
    "list": (AUTO, "none", "column:"),
    "tars": (AUTO, "cls", "none", "json:"),
}


class StorageSection(Section):
    root: str = Field("~/vqvae2-runs", description="Storage root, any fsspec URL: a local path, s3://bucket/prefix, "
                      "memory:// (tests). S3 credentials come from the worker's AWS_* environment variables or "
                      "instance role, or from credentials_block")
    storage_options: Annotated[dict[str, Any], ONLY_HOW_IT_RUNS] = Field(
        default_factory=dict, description="fsspec options for the root, e.g. {'endpoint_url': 'http://minio:9000'} "
        "(no credentials: see credentials_block)",
    )
    credentials_block: Annotated[str | None, ONLY_HOW_IT_RUNS] = Field(
        None, description="Name of a Prefect Secret block whose value is the JSON text of the fsspec options with "
        "the root's credentials (key, secret, ...)",
    )

    @field_validator("root")
    @classmethod
    def _not_empty(cls, root: str) -> str:
        if not root.strip():
            raise ValueError("storage.root must not be empty")
        refuse_userinfo(root, "storage.root", "storage.credentials_block")
        return root

    @model_validator(mode="after")
    def _no_credentials(self) -> StorageSection:
        refuse_secrets(self.storage_options, "storage.storage_options", "storage.credentials_block")
        return self

    @property
    def url(self) -> str:
        """The root as used: `~` expanded on the machine that runs the flow, not the one that deployed it."""
        return os.path.expanduser(self.root) if self.root.startswith("~") else self.root


class TrainingRuntime(Section):
    """How trainings run: where, in which process, how often they report and checkpoint; what
    every stage may read (`Runtime.training`). None of it is in a key but `nnodes`, which the
    launcher needs and which the stages' keys hold through their process count."""

    device: Annotated[Literal["auto", "cpu", "cuda"], ONLY_HOW_IT_RUNS] = Field(
        "auto", description="auto: CUDA when available",
    )
    checkpoint_every: Annotated[int, ONLY_HOW_IT_RUNS] = Field(
        500, ge=1, description="Save a checkpoint every N steps ...",
    )
    checkpoint_minutes: Annotated[float, ONLY_HOW_IT_RUNS] = Field(
        10.0, gt=0, description="... and at least every M minutes",
    )
    log_every: Annotated[int, ONLY_HOW_IT_RUNS] = Field(
        50, ge=1, description="Log metrics and update progress every N steps",
    )
    subprocess: Annotated[bool, ONLY_HOW_IT_RUNS] = Field(
        True, description="Run each training attempt in a fresh process (isolated RNG and CUDA context); off runs it "
        "in the task's thread, for debugging",
    )
    cpu_threads: Annotated[int | None, ONLY_HOW_IT_RUNS] = Field(
        None, ge=1, description="CPU threads of each training process; None: half the cores, since the pipeline "
        "trains two models at a time",
    )
    decoded_cache_mb: Annotated[int, ONLY_HOW_IT_RUNS] = Field(
        2048, ge=0, description="Keep a training's decoded train images in memory across epochs when they fit in "
        "this many MiB (in each training process, with num_workers 0): after the first epoch no shard is read or "
        "decoded again, and the batches are the same; 0: off",
    )
    gpus: Annotated[int | None, ONLY_HOW_IT_RUNS] = Field(
        None, ge=0, description="GPUs of a worker that trainings share: at most one training per GPU at a time, each "
        "on its own (Prefect concurrency limits `gpu` and `vqvae2-gpu-<i>`); None: the visible CUDA devices; 0: no "
        "limit",
    )
    tensorboard: Annotated[bool, ONLY_HOW_IT_RUNS] = Field(
        False, description="Also write each training's metrics, and a picture per epoch (reconstructions, prior "
        "samples), as TensorBoard event files under {root}/tensorboard/<training>-<key>/: `tensorboard --logdir "
        "{root}/tensorboard`",
    )

    nnodes: int = Field(1, ge=1, description="Machines each data-parallel training spans, `training.processes` "
                        "on each: this worker is node 0, and every other machine runs `vqvae2 node --rdzv-endpoint "
                        "HOST:PORT --nnodes N --node-rank K --nproc-per-node P`; all must reach the storage root")
    rdzv_endpoint: Annotated[str | None, ONLY_HOW_IT_RUNS] = Field(
        None, description="host:port of this worker, where the training processes of several machines meet "
        "(torchrun's static rendezvous); needed when nnodes > 1",
    )

    # Testing only: kept out of the JSON schema, so the UI's run form never offers it.
    fail_once_at_step: Annotated[SkipJsonSchema[dict[str, int]], ONLY_HOW_IT_RUNS] = Field(
        default_factory=dict, description="Testing only: make a training stage ('autoencoder', 'prior-top', "
        "'classifier', ...) fail once at this step, to exercise retries and resuming",
    )

    def threads(self) -> int:
        return self.cpu_threads or max(1, (os.cpu_count() or 2) // 2)

    @model_validator(mode="after")
    def _rendezvous(self) -> TrainingRuntime:
        if self.rdzv_endpoint is not None:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"training.rdzv_endpoint must be host:port, got {self.rdzv_endpoint!r}")
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError(f"training.nnodes is {self.nnodes}: set training.rdzv_endpoint to this worker's "
                             "host:port, where the other machines' training processes join it")
        return self

    @field_validator("tensorboard")
    @classmethod
    def _tensorboard_installed(cls, on: bool) -> bool:
        # Checked with the config, before anything runs: not when the first training starts.
        if on and importlib.util.find_spec("tensorboard") is None:
            raise ValueError("training.tensorboard is true, but tensorboard is not installed on this machine: "
                             "pip install 'vqvae2[tensorboard]' (or tensorboard), or leave training.tensorboard off")
        return on


class TrainingSection(TrainingRuntime):
    """The `training` section: how trainings run, how many processes train each model, and
    how many read its shards."""

    processes: int | Literal["auto"] = Field(
        1, description="Data-parallel training processes per model and machine (torchrun: NCCL on GPUs, gloo on "
        "CPU), sharing each batch; auto: one per visible GPU. Part of the cache keys: the ranks split the data",
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes for reading shards (the shard "
                             "readers interleave, so this changes the batch order and is part of the cache keys)")

    @field_validator("processes")
    @classmethod
    def _processes(cls, processes: int | str) -> int | str:
        if processes != "auto" and processes < 1:
            raise ValueError(f"training.processes must be >= 1 or 'auto', got {processes}")
        return processes

    def runtime(self) -> TrainingRuntime:
        """The part every stage may read; the rest reaches only the stages whose key holds it."""
        return TrainingRuntime(**self.model_dump(include=set(TrainingRuntime.model_fields)))

    def world_size(self) -> int:
        """The training processes per model on all nodes. `auto` must have been resolved on the
        machine that trains (`tasks.machinery.devices.on_this_machine`): a key never reads the machine."""
        if self.processes == AUTO:
            raise ValueError("training.processes is auto: the number of training processes, part of the keys, is "
                             "this machine's GPUs; resolve it where the run trains (devices.on_this_machine)")
        return self.processes * self.nnodes


class EncodeSection(Section):
    batch_size: int = Field(256, ge=1, description="Images encoded at a time: speed only, the codes are the same")


class SampleSection(Section):
    num_samples: int | None = Field(None, ge=1, description="Images kept at each acceptance rate, spread evenly over "
                                    "the classes; None: the preset's choice")
    acceptance_rates: list[float] = Field(
        default_factory=lambda: [1.0, 0.5, 0.25, 0.1],
        description="Classifier-based rejection (paper, Sec. 4.1): at rate r, keep the r share of candidates the "
        "judge is most confident show their class; 1.0 (no rejection) is always included",
    )
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, ge=1)
    dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="Precision of the priors while sampling (the draw is always fp32): bf16 is 2.6x faster "
        "at the imagenet-256 paper widths on an H100 but draws other codes; fp32 stays the default until bf16's "
        "sample FID is shown equal")
    batch_size: int | None = Field(None, ge=1, description="Candidates drawn at a time (each batch with its own "
                                   "seed, so part of what is drawn); None: the preset's choice")
    seed: int = 0
    classes: list[str | int] | None = Field(
        None, description="Which classes to draw, by name (the dataset's class names, e.g. \"Sneaker\") or index "
        "(0 is the first class); None: every class, evenly. num_samples is spread over the classes given, in their "
        "order; each class at most once")

    @field_validator("acceptance_rates")
    @classmethod
    def _rates(cls, rates: list[float]) -> list[float]:
        bad = [r for r in rates if not 0 < r <= 1]
        if bad:
            raise ValueError(f"sample.acceptance_rates must lie in (0, 1], got {bad}")
        return sorted(set(rates) | {1.0}, reverse=True)

    @field_validator("classes", mode="before")
    @classmethod
    def _one_class(cls, value: Any) -> Any:
        """One class may be given alone (`--set sample.classes=Sneaker`)."""
        return [value] if isinstance(value, (str, int)) and not isinstance(value, bool) else value

    @field_validator("classes")
    @classmethod
    def _classes(cls, classes: list[str | int] | None) -> list[str | int] | None:
        """What needs no dataset to check (names are resolved against the dataset's by the sample stage)."""
        if classes is None:
            return None
        if not classes:
            raise ValueError("sample.classes is empty: name at least one class, or leave it unset (None) for "
                             "every class")
        bad = [c for c in classes if (isinstance(c, int) and c < 0) or (isinstance(c, str) and not c.strip())]
        if bad:
            raise ValueError(f"sample.classes: {bad} are not classes: give class names or indices (0 is the first)")
        repeated = list(dict.fromkeys(c for i, c in enumerate(classes) if c in classes[:i]))
        if repeated:
            raise ValueError(f"sample.classes names {repeated} more than once: name each class once")
        return classes


class EvaluateSection(Section):
    eval_images: int | None = Field(None, ge=4, description="Real images per reference set (held-out test images, "
                                    "and train images for the floor); None: the preset's choice")
    features: Literal["auto", "inception", "domain", "self-supervised"] = Field(
        "auto", description="Feature space of FID/KID/precision/recall: inception (torch-fidelity's Inception-v3, "
        "from local weights only), domain (a classifier the pipeline trains on the real images' labels), "
        "self-supervised (a network the pipeline trains on the real images without labels, predicting rotations), "
        "or auto (inception when inception_weights names its file, else domain, or self-supervised for an "
        "unconditional model: the same choice on every machine)",
    )
    inception_weights: str | None = Field(None, description="Path of the Inception-v3 weights file, if not in "
                                          "torch-fidelity's cache under TORCH_HOME")
    grid_size: int = Field(64, ge=1, le=1024, description="Images in the report's sample and reconstruction grids")

    @field_validator("inception_weights")
    @classmethod
    def _no_credentials(cls, url: str | None) -> str | None:
        refuse_userinfo(url, "evaluate.inception_weights", "storage.credentials_block")
        return url


class RunnerSection(Section):
    dask_address: str | None = Field(None, description="Run mapped and concurrent tasks on this Dask scheduler "
                                     "(tcp://host:8786); None: a thread pool in the flow's process")

    @field_validator("dask_address")
    @classmethod
    def _no_credentials(cls, url: str | None) -> str | None:
        if url is not None and holds_userinfo(url):
            raise ValueError("runner.dask_address holds a user name or password (not repeated here): the config is "
                             "a flow parameter, which Prefect stores and shows in its UI; secure the scheduler with "
                             "Dask's TLS settings on the worker instead")
        return url


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
    ingest: ShardingOptions = Field(default_factory=ShardingOptions, description="How the source is cut into "
                                    "WebDataset shards; max_samples_per_split None: the preset's choice")
    training: TrainingSection = Field(default_factory=TrainingSection, description="How the trainings run: device, "
                                      "processes, checkpoints, logging")
    encode: Annotated[EncodeSection, ONLY_HOW_IT_RUNS] = Field(
        default_factory=EncodeSection, description="Encoding the dataset into codes",
    )
    sample: SampleSection = Field(default_factory=SampleSection, description="Sampling from the priors, with "
                                  "classifier-based rejection")
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection, description="The report: feature space, "
                                      "reference images, grids")
    runner: Annotated[RunnerSection, ONLY_HOW_IT_RUNS] = Field(
        default_factory=RunnerSection, description="Where mapped tasks run",
    )

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        self.model  # noqa: B018 - a bad override fails here, naming the field, not mid-run
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
        overrides = {k: v for k, v in self.overrides.items() if not (k == "num_classes" and v == AUTO)}
        return vqvae2.preset(self.preset, overrides)

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
    """The fields of `model` marked `ONLY_HOW_IT_RUNS`, as pydantic's `exclude` takes them: a
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
RUN_ONLY: dict[str, Any] = run_only_fields(PipelineConfig)


def deciding_fields(config: PipelineConfig) -> dict[str, Any]:
    """The part of `config` that decides its artifacts, as JSON data."""
    return config.model_dump(mode="json", exclude=RUN_ONLY)


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


__all__ = ["FASHION_MNIST_DIR", "PRESET_DEFAULTS", "RUN_ONLY", "PipelineConfig", "PresetName", "Runtime",
           "config_errors", "config_key", "deciding_fields", "pipeline_config", "validate_config"]
