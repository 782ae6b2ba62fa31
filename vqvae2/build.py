"""Build the models of a `ModelConfig`, and rebuild any of them from a checkpoint dict.

A checkpoint dict holds only plain data and tensors (the model's typed config as a
dict, its constructor arguments, its state dict), so it loads with
`torch.load(weights_only=True)`. Writing it to a file is the caller's business.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from .autoencoder import VQVAE2
from .classifier import ResNetClassifier
from .config import AutoencoderConfig, ClassifierConfig, ModelConfig, PriorConfig, config_from_dict, config_to_dict
from .prior import PixelCNNPrior


def build_autoencoder(config: ModelConfig) -> VQVAE2:
    return VQVAE2(config.autoencoder, in_channels=config.image_channels)


def build_prior(config: ModelConfig, level: int) -> PixelCNNPrior:
    """The prior of `level` (0 = top), conditioned on every level above it."""
    if not 0 <= level < config.levels:
        raise ValueError(f"level must be in 0..{config.levels - 1} (0 = top), got {level}")
    shapes = config.latent_shapes()
    return PixelCNNPrior(
        config.priors[level],
        num_codes=config.autoencoder.codebook_size,
        shape=shapes[level],
        cond_shapes=shapes[:level],
        num_classes=config.prior_num_classes(level),
    )


def build_priors(config: ModelConfig) -> list[PixelCNNPrior]:
    return [build_prior(config, level) for level in range(config.levels)]


def build_classifier(config: ModelConfig, classifier: ClassifierConfig | None = None) -> ResNetClassifier:
    """A classifier for the config's images; `classifier` overrides its architecture
    (the FID feature network is a different one from the rejection-sampling judge)."""
    return ResNetClassifier(classifier or config.classifier, config.image_channels, config.num_classes)


_KINDS: dict[str, tuple[type[nn.Module], type]] = {
    "autoencoder": (VQVAE2, AutoencoderConfig),
    "prior": (PixelCNNPrior, PriorConfig),
    "classifier": (ResNetClassifier, ClassifierConfig),
}


def _constructor_args(model: nn.Module) -> dict[str, Any]:
    if isinstance(model, VQVAE2):
        return {"in_channels": model.in_channels}
    if isinstance(model, PixelCNNPrior):
        return {
            "num_codes": model.num_codes,
            "shape": list(model.shape),
            "cond_shapes": [list(s) for s in model.cond_shapes],
            "num_classes": model.num_classes,
        }
    if isinstance(model, ResNetClassifier):
        return {"in_channels": model.in_channels, "num_classes": model.num_classes}
    raise TypeError(f"not a vqvae2 model: {type(model).__name__}")


def to_checkpoint(model: nn.Module) -> dict[str, Any]:
    """{'kind', 'config', 'args', 'state_dict'}: enough to rebuild the model anywhere."""
    kind = next(k for k, (cls, _) in _KINDS.items() if isinstance(model, cls))
    return {
        "kind": kind,
        "config": config_to_dict(model.config),
        "args": _constructor_args(model),
        "state_dict": model.state_dict(),
    }


def from_checkpoint(checkpoint: dict[str, Any]) -> nn.Module:
    """Rebuild a model saved by `to_checkpoint` (on the CPU, in train mode)."""
    kind = checkpoint.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"checkpoint kind {kind!r} is not one of {sorted(_KINDS)}")
    cls, config_cls = _KINDS[kind]
    args = dict(checkpoint["args"])
    if kind == "prior":
        args["shape"] = tuple(args["shape"])
        args["cond_shapes"] = [tuple(s) for s in args["cond_shapes"]]
    model = cls(config_from_dict(config_cls, checkpoint["config"]), **args)
    model.load_state_dict(checkpoint["state_dict"])
    return model
