"""vqvae2: the models and the math of VQ-VAE-2 (Razavi, van den Oord, Vinyals, NeurIPS 2019).

Pure PyTorch, no I/O: import it in a notebook, or let the pipeline's tasks call it.

    import vqvae2
    config = vqvae2.preset("fashion-mnist", {"train_autoencoder.steps": 100})
    model = vqvae2.build_autoencoder(config)
    codes = model.encode(images)            # integer grids, top first
    images = model.decode_codes(codes)
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Any

# Each name from the module that defines it, imported when first used: the configs and presets
# read without torch, so a program that only reads a config (the `vqvae2 ls` and `report`
# commands) starts in a fraction of a second, and the models load torch when they are used.
_EXPORTS: dict[str, tuple[str, ...]] = {
    "autoencoder": ("AutoencoderOutput", "VQVAE2"),
    "build": ("build_autoencoder", "build_classifier", "build_prior", "build_priors", "from_checkpoint",
              "to_checkpoint"),
    "classifier": ("ResNetClassifier",),
    "config": ("AutoencoderConfig", "ClassifierConfig", "ModelConfig", "PriorConfig", "TrainConfig",
               "apply_overrides", "config_from_dict", "config_to_dict"),
    "draw": ("SamplingOptions",),
    "fast_sampling": ("incremental_logits", "sample_level_fast"),
    "graph_sampling": ("StaticPrior", "sample_level_graphed", "static_logits"),
    "presets": ("PRESETS", "preset"),
    "prior": ("PixelCNNPrior", "bits_per_code"),
    "quantize": ("QuantizerOutput", "VectorQuantizer", "accumulate_codebook_updates"),
    "rejection": ("accept_mask", "candidates_needed", "keep_count"),
    "sampling": ("sample_codes", "sample_images", "sample_level_reference", "sample_logits"),
    "train": ("ROTATIONS", "SavedTensorBytes", "autoencoder_loss", "autoencoder_step", "autocast_dtype",
              "averaged_model", "bf16_is_native", "classifier_loss", "classifier_step",
              "enable_activation_checkpointing", "fit", "level_names", "lr_factor", "make_optimizer",
              "polyak_average", "prepare_model", "prior_loss", "prior_step", "raise_if_diverged", "rotated",
              "rotation_loss", "seed_everything", "train_step"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    """`vqvae2.X`: the name X from its module, or the submodule X, imported now."""
    if name in _MODULE_OF:
        value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
        globals()[name] = value  # once: later reads do not come here
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)  # a submodule, as when all were imported at once
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
