"""Typed configs for every model of VQ-VAE-2, validated at construction.

Each dataclass holds what a user chooses (widths, depths, codebook); what follows
from the data (image channels, number of classes, latent grid sizes) is derived by
`ModelConfig` and handed to the model constructors, so a preset cannot contradict
itself. Values that come from the paper ("Generating Diverse High-Fidelity Images
with VQ-VAE-2", Razavi et al. 2019) cite its Appendix A.
"""
from __future__ import annotations

import math
import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any


# storage.artifacts.IN_KEY_WHEN_SET, spelled out: vqvae2 imports nothing of storage.
_IN_KEY_WHEN_SET = {"in_key": "when set"}
LR_SCHEDULES = ("constant", "cosine")
COND_RESOLUTIONS = ("level", "above")


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class AutoencoderConfig:
    channels: int = 128  # hidden units of encoders/decoders (paper: 128)
    res_channels: int = 64  # width inside residual blocks (paper: 64)
    res_blocks: int = 2  # residual blocks per encoder/decoder (paper: 2)
    # Downsampling per level, from the image up: strides[0] takes the image to the
    # bottom latent grid, strides[1] the bottom features to the next level, ...
    strides: tuple[int, ...] = (4, 2)
    codebook_size: int = 512  # K, shared by all levels (paper: 512)
    embed_dim: int = 64  # D, code vector size (paper: 64)
    beta: float = 0.25  # commitment cost (paper: 0.25)
    decay: float = 0.99  # EMA decay of the codebook (paper: 0.99)
    eps: float = 1e-5  # Laplace smoothing of the EMA cluster sizes
    dead_code_steps: int = 100  # re-seed codes unused for this many training steps; 0 disables
    kmeans_init: bool = False  # initialise each codebook by k-means on the first batch

    def __post_init__(self) -> None:
        self.strides = tuple(int(s) for s in self.strides)
        _require(len(self.strides) >= 2, "autoencoder.strides needs one stride per level and at least 2 levels")
        for s in self.strides:
            _require(_is_power_of_two(s), f"autoencoder.strides must be powers of two, got {self.strides}")
        _require(self.channels >= 2 and self.channels % 2 == 0, "autoencoder.channels must be an even number >= 2")
        _require(self.res_channels >= 1, "autoencoder.res_channels must be >= 1")
        _require(self.res_blocks >= 0, "autoencoder.res_blocks must be >= 0")
        _require(self.codebook_size >= 2, "autoencoder.codebook_size must be >= 2")
        _require(self.codebook_size <= 32767, "autoencoder.codebook_size must fit int16 code arrays (<= 32767)")
        _require(self.embed_dim >= 1, "autoencoder.embed_dim must be >= 1")
        _require(self.beta >= 0, "autoencoder.beta must be >= 0")
        _require(0.0 < self.decay < 1.0, "autoencoder.decay must be in (0, 1)")
        _require(self.eps > 0, "autoencoder.eps must be > 0")
        _require(self.dead_code_steps >= 0, "autoencoder.dead_code_steps must be >= 0 (0 disables restarts)")

    @property
    def levels(self) -> int:
        return len(self.strides)

    def latent_shapes(self, image_size: int) -> list[tuple[int, int]]:
        """Code grid (h, w) of every level, top first, for square images."""
        shapes, size = [], image_size
        for s in self.strides:
            _require(size % s == 0, f"image size {image_size} is not divisible by the strides {self.strides}")
            size //= s
            shapes.append((size, size))
        return shapes[::-1]


@dataclass
class PriorConfig:
    """A gated PixelCNN (van den Oord et al. 2016) over one level's code grid, with
    PixelSNAIL-style causal self-attention when attention_layers > 0."""

    channels: int = 128  # hidden units of the gated stacks (paper, ImageNet: 512)
    layers: int = 10  # gated residual layers (paper: 20)
    kernel_size: int = 5  # width of the causal convolutions (paper: 5)
    attention_layers: int = 0  # causal multi-head self-attention blocks spread over the depth (paper top: 4)
    attention_heads: int = 4  # (paper: 8)
    dropout: float = 0.1  # (paper: 0.1)
    embed_dim: int = 64  # embedding of the input codes
    cond_channels: int = 128  # conditioning stack width (lower levels only)
    cond_res_blocks: int = 4  # residual blocks of the conditioning stack (paper, ImageNet bottom: 20)
    class_conditional: bool = True  # use the dataset's labels when it has them
    # Where the conditioning stack works: "level", on the codes above repeated up to this level's
    # grid (the paper's); "above", on the grid of the level just above, then up to this level's
    # by a learned (transposed) convolution: a quarter of the work per block at a 2x ratio, so
    # four times the blocks in the same time, each seeing twice as far in codes of this level.
    # In a key only where set (storage.artifacts.IN_KEY_WHEN_SET).
    cond_resolution: str = field(default="level", metadata=_IN_KEY_WHEN_SET)
    # This level's training, where it differs from train_prior's: a prior cheaper per step than
    # the others (a smaller grid) can learn more in the time they take; the levels learn best at
    # different batch sizes and rates (docs/evaluation.md). In a key only where set
    # (storage.artifacts.IN_KEY_WHEN_SET).
    steps: int | None = field(default=None, metadata=_IN_KEY_WHEN_SET)
    batch_size: int | None = field(default=None, metadata=_IN_KEY_WHEN_SET)
    lr: float | None = field(default=None, metadata=_IN_KEY_WHEN_SET)

    def __post_init__(self) -> None:
        _require(self.channels >= 1, "prior.channels must be >= 1")
        _require(self.layers >= 1, "prior.layers must be >= 1")
        _require(self.kernel_size >= 3 and self.kernel_size % 2 == 1, "prior.kernel_size must be odd and >= 3")
        _require(0 <= self.attention_layers <= self.layers, "prior.attention_layers must be between 0 and prior.layers")
        _require(self.attention_heads >= 1, "prior.attention_heads must be >= 1")
        if self.attention_layers:
            _require(
                self.channels % self.attention_heads == 0,
                f"prior.channels ({self.channels}) must be divisible by prior.attention_heads ({self.attention_heads})",
            )
        _require(0.0 <= self.dropout < 1.0, "prior.dropout must be in [0, 1)")
        _require(self.embed_dim >= 1 and self.cond_channels >= 1, "prior.embed_dim and prior.cond_channels must be >= 1")
        _require(self.cond_res_blocks >= 0, "prior.cond_res_blocks must be >= 0")
        _require(self.cond_resolution in COND_RESOLUTIONS, "prior.cond_resolution must be one of "
                 f"{', '.join(map(repr, COND_RESOLUTIONS))}, got {self.cond_resolution!r}")
        _require(self.steps is None or self.steps >= 1, "prior.steps must be >= 1, or unset (null): train_prior.steps")
        _require(self.batch_size is None or self.batch_size >= 1,
                 "prior.batch_size must be >= 1, or unset (null): train_prior.batch_size")
        _require(self.lr is None or self.lr > 0, "prior.lr must be > 0, or unset (null): train_prior.lr")


@dataclass
class ClassifierConfig:
    """A small ResNet: the judge for rejection sampling and, trained separately, FID features."""

    widths: tuple[int, ...] = (32, 64, 128)  # channels per stage; each stage after the first halves the resolution
    blocks_per_stage: int = 2
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        _require(len(self.widths) >= 1 and all(w >= 1 for w in self.widths), "classifier.widths must be positive")
        _require(self.blocks_per_stage >= 1, "classifier.blocks_per_stage must be >= 1")
        _require(0.0 <= self.dropout < 1.0, "classifier.dropout must be in [0, 1)")


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    warmup_steps: int = 0  # linear learning-rate warm-up
    amp: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU) | "bf16" | "off"
    channels_last: bool = False
    seed: int = 0
    # Gradient accumulation: each batch of batch_size (one optimizer step) runs as
    # micro-batches of this size whose gradients add up; None: the whole batch at once.
    micro_batch_size: int | None = None
    # Recompute the priors' gated layers, attention blocks and conditioning res-blocks and
    # the autoencoder's encoders and decoders in backward instead of keeping their
    # activations: less memory, about one more forward of compute (vqvae2.enable_activation_checkpointing).
    activation_checkpointing: bool = False
    # Both added after keys were first made: in a key only where set (storage.artifacts.IN_KEY_WHEN_SET).
    # The rate after warm-up: "constant", or "cosine" down to 0 at the last step (Loshchilov &
    # Hutter 2017, "SGDR"), which ends training in smaller, less noisy steps: for a model near
    # convergence. The fashion-mnist priors, far from it, learnt less with it (docs/evaluation.md).
    lr_schedule: str = field(default="constant", metadata=_IN_KEY_WHEN_SET)
    # A Polyak (exponential moving) average of the weights, with this decay per step, is what
    # is evaluated and published (model.pt) and sampled from; 0 publishes the last weights.
    ema_decay: float = field(default=0.0, metadata=_IN_KEY_WHEN_SET)

    def __post_init__(self) -> None:
        _require(self.steps >= 1, "train.steps must be >= 1")
        _require(self.batch_size >= 1, "train.batch_size must be >= 1")
        _require(self.lr > 0, "train.lr must be > 0")
        _require(self.weight_decay >= 0, "train.weight_decay must be >= 0")
        _require(self.grad_clip >= 0, "train.grad_clip must be >= 0 (0 disables clipping)")
        _require(self.warmup_steps >= 0, "train.warmup_steps must be >= 0")
        _require(self.amp in ("auto", "bf16", "off"), f"train.amp must be 'auto', 'bf16' or 'off', got {self.amp!r}")
        _require(self.lr_schedule in LR_SCHEDULES,
                 f"train.lr_schedule must be one of {', '.join(map(repr, LR_SCHEDULES))}, got {self.lr_schedule!r}")
        _require(0.0 <= self.ema_decay < 1.0, f"train.ema_decay must be in [0, 1) (0: no average), got {self.ema_decay}")
        if self.micro_batch_size is not None:
            _require(
                1 <= self.micro_batch_size <= self.batch_size,
                f"train.micro_batch_size must be between 1 and train.batch_size ({self.batch_size}), got "
                f"{self.micro_batch_size}: it cuts each batch of train.batch_size into micro-batches that add up to "
                "one optimizer step; raise train.batch_size for a larger step, or leave micro_batch_size unset (null) "
                "to run the whole batch at once",
            )


@dataclass
class ModelConfig:
    """Everything needed to build and train the models of one VQ-VAE-2 setup."""

    name: str = "custom"
    image_size: int = 32
    image_channels: int = 1
    num_classes: int = 10  # 0 for unlabelled data
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    priors: tuple[PriorConfig, ...] = field(  # one per level, top first
        default_factory=lambda: (PriorConfig(attention_layers=2), PriorConfig())
    )
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    train_autoencoder: TrainConfig = field(default_factory=TrainConfig)
    train_prior: TrainConfig = field(default_factory=TrainConfig)
    train_classifier: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        self.priors = tuple(self.priors)
        _require(self.image_size >= 1, "image_size must be >= 1")
        _require(self.image_channels in (1, 3), "image_channels must be 1 (gray) or 3 (RGB)")
        _require(self.num_classes >= 0, "num_classes must be >= 0")
        _require(
            len(self.priors) == self.autoencoder.levels,
            f"priors has {len(self.priors)} entries but the autoencoder has {self.autoencoder.levels} levels: "
            "give one prior per level, top first",
        )
        total = math.prod(self.autoencoder.strides)
        _require(
            self.image_size % total == 0,
            f"image_size {self.image_size} must be divisible by the product of autoencoder.strides ({total})",
        )
        for level, prior in enumerate(self.priors):
            if prior.batch_size is not None and self.train_prior.micro_batch_size is not None:
                _require(prior.batch_size >= self.train_prior.micro_batch_size,
                         f"priors.{level}.batch_size ({prior.batch_size}) must be at least train_prior.micro_batch_size "
                         f"({self.train_prior.micro_batch_size}), which cuts each of its batches")

    @property
    def levels(self) -> int:
        return self.autoencoder.levels

    def latent_shapes(self) -> list[tuple[int, int]]:
        """Code grid (h, w) of every level, top first."""
        return self.autoencoder.latent_shapes(self.image_size)

    def prior_training(self, level: int) -> TrainConfig:
        """How the prior of `level` trains: train_prior, with the level's own steps, batch size and
        rate where it has them."""
        prior = self.priors[level]
        own = {name: value for name, value in (("steps", prior.steps), ("batch_size", prior.batch_size),
                                                ("lr", prior.lr)) if value is not None}
        return replace(self.train_prior, **own) if own else self.train_prior

    def prior_num_classes(self, level: int) -> int:
        return self.num_classes if self.priors[level].class_conditional else 0


# --- dicts <-> configs -------------------------------------------------------------
# Configs travel as plain dicts (JSON, Prefect parameters, checkpoints); building them
# back in one go means cross-field checks see the final values, not an intermediate mix.


def config_to_dict(config) -> dict[str, Any]:
    """A JSON-able dict of a config (tuples become lists)."""
    return _jsonable(asdict(config))


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def config_from_dict(cls: type, data: Mapping[str, Any], path: str = ""):
    """Build a config dataclass from a (possibly partial) dict; unknown keys are errors."""
    return _build(cls, data, path)


def apply_overrides(config, overrides: Mapping[str, Any] | None):
    """A copy of `config` with fields replaced, addressed by dotted paths.

    `{"autoencoder.channels": 64, "priors.0.layers": 4}` and the nested form
    `{"autoencoder": {"channels": 64}}` are equivalent. The result is validated once,
    with every override in place.
    """
    data = config_to_dict(config)
    for dotted, value in _flatten(overrides or {}):
        _assign(data, dotted.split("."), _jsonable(value), dotted)
    return config_from_dict(type(config), data)


def _flatten(overrides: Mapping[str, Any], prefix: str = ""):
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from _flatten(value, f"{dotted}.")
        else:
            yield dotted, value


def _assign(node, parts: list[str], value, dotted: str) -> None:
    head, rest = parts[0], parts[1:]
    if isinstance(node, list):
        if not head.isdigit() or int(head) >= len(node):
            raise ValueError(f"config override {dotted!r}: index {head!r} is not one of 0..{len(node) - 1}")
        key: int | str = int(head)
    elif isinstance(node, dict):
        if head not in node:
            raise ValueError(f"config override {dotted!r}: unknown field {head!r}; known: {', '.join(sorted(node))}")
        key = head
    else:
        raise ValueError(f"config override {dotted!r}: {head!r} is below a plain value")
    if rest:
        _assign(node[key], rest, value, dotted)
    else:
        node[key] = value


def _build(tp, value, path: str):
    name = path or "config"
    origin = typing.get_origin(tp)
    if is_dataclass(tp):
        if is_dataclass(value):
            value = asdict(value)
        if not isinstance(value, Mapping):
            raise ValueError(f"{name} must be a mapping of fields, got {value!r}")
        hints = typing.get_type_hints(tp)
        known = {f.name for f in fields(tp) if f.init}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"{name}: unknown field(s) {sorted(unknown)}; known: {', '.join(sorted(known))}")
        kwargs = {k: _build(hints[k], v, f"{path}.{k}" if path else k) for k, v in value.items()}
        return tp(**kwargs)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            raise ValueError(f"{name} must have {len(item_types)} items, got {len(value)}")
        return tuple(_build(t, v, f"{path}.{i}") for i, (t, v) in enumerate(zip(item_types, value)))
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
        return _build(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not value.lstrip("-").isdigit()):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return value
    raise TypeError(f"{name}: unsupported config type {tp!r}")
