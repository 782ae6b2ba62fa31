"""The presets, by name, with what each decides beyond the model (`vqvae2.PRESETS`, a model
config per name): its dataset, sample and evaluation sizes. Nothing is imported here, so
the CLI lists the presets without loading torch."""
from __future__ import annotations

from typing import Any

# Pipeline-level values that follow the preset unless set explicitly (`PipelineConfig.preset_default`).
PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    "smoke": {"max_samples_per_split": 2000, "num_samples": 16, "eval_images": 256, "sample_batch_size": 64},
    "fashion-mnist": {"max_samples_per_split": None, "num_samples": 500, "eval_images": 2000,
                      "sample_batch_size": 64},
    # A GPU's sampler is bound by kernel launches, not arithmetic: a wide batch costs what a narrow one does.
    "fashion-mnist-gpu": {"max_samples_per_split": None, "num_samples": 500, "eval_images": 2000,
                          "sample_batch_size": 1000},
    "imagenet-256": {"max_samples_per_split": None, "num_samples": 5000, "eval_images": 10000,
                     "sample_batch_size": 128},
    "ffhq-1024": {"max_samples_per_split": None, "num_samples": 1000, "eval_images": 1000, "sample_batch_size": 64},
}
PRESET_NAMES: tuple[str, ...] = tuple(PRESET_DEFAULTS)
