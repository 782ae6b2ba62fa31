"""vqvae2: the models and the math of VQ-VAE-2 (Razavi, van den Oord, Vinyals, NeurIPS 2019).

Pure PyTorch, no I/O: import it in a notebook, or let the pipeline's tasks call it.

    import vqvae2
    config = vqvae2.preset("fashion-mnist", {"train_autoencoder.steps": 100})
    model = vqvae2.build_autoencoder(config)
    codes = model.encode(images)            # integer grids, top first
    images = model.decode_codes(codes)
"""
from .autoencoder import AutoencoderOutput, VQVAE2
from .build import build_autoencoder, build_classifier, build_prior, build_priors, from_checkpoint, to_checkpoint
from .classifier import ResNetClassifier
from .draw import SamplingOptions
from .config import (
    AutoencoderConfig,
    ClassifierConfig,
    ModelConfig,
    PriorConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
)
from .fast_sampling import incremental_logits, sample_level_fast
from .graph_sampling import StaticPrior, sample_level_graphed, static_logits
from .presets import PRESETS, preset
from .prior import PixelCNNPrior, bits_per_code
from .quantize import QuantizerOutput, VectorQuantizer, accumulate_codebook_updates
from .rejection import accept_mask, candidates_needed, keep_count
from .sampling import sample_codes, sample_images, sample_level_reference, sample_logits
from .train import (
    ROTATIONS,
    SavedTensorBytes,
    autoencoder_loss,
    autoencoder_step,
    classifier_loss,
    classifier_step,
    enable_activation_checkpointing,
    fit,
    level_names,
    make_optimizer,
    prepare_model,
    prior_loss,
    prior_step,
    rotated,
    rotation_loss,
    raise_if_diverged,
    seed_everything,
    train_step,
)

__all__ = [
    "AutoencoderConfig", "AutoencoderOutput", "ClassifierConfig", "ModelConfig", "PRESETS", "PixelCNNPrior",
    "SamplingOptions",
    "PriorConfig", "QuantizerOutput", "ResNetClassifier", "TrainConfig", "VQVAE2", "VectorQuantizer",
    "apply_overrides", "autoencoder_loss", "autoencoder_step", "bits_per_code", "build_autoencoder",
    "ROTATIONS", "build_classifier", "build_prior", "build_priors", "classifier_loss", "rotated", "rotation_loss", "classifier_step", "config_from_dict",
    "config_to_dict", "fit", "from_checkpoint", "incremental_logits", "level_names", "make_optimizer",
    "prepare_model", "preset", "prior_loss", "prior_step", "raise_if_diverged", "sample_codes", "sample_images",
    "sample_level_fast", "sample_level_reference", "sample_logits", "seed_everything", "to_checkpoint", "train_step",
    "accept_mask", "candidates_needed", "keep_count",
    "SavedTensorBytes", "accumulate_codebook_updates", "enable_activation_checkpointing",
    "StaticPrior", "sample_level_graphed", "static_logits",
]
