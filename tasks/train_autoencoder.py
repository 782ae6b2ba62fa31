"""Stage 2: train the hierarchical VQ-VAE on the dataset's train split."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

import vqvae2
from vqvae2.config import config_to_dict

from .artifact_task import Artifact, artifact_task
from .config import PipelineConfig
from .datasets import first_images, train_batches
from .training import TrainingJob, train

CODE_VERSION = "1"
VALIDATION_IMAGES = 256


def autoencoder_artifact(config: PipelineConfig, dataset: dict[str, Any]) -> Artifact:
    model = config.model
    section = {
        "autoencoder": config_to_dict(model.autoencoder),
        "train": config_to_dict(model.train_autoencoder),
        "image": [model.image_size, model.image_channels],
        "num_workers": config.training.num_workers,
    }
    return Artifact.of(config.storage.url, "autoencoder", section, {"dataset": dataset["key"]}, CODE_VERSION,
                       config.storage.storage_options)


def autoencoder_job(config: PipelineConfig, dataset: dict[str, Any], artifact: Artifact) -> TrainingJob:
    model_config, train_config = config.model, config.model.train_autoencoder
    vqvae2.seed_everything(train_config.seed)
    model = vqvae2.build_autoencoder(model_config)
    validation, _ = first_images(dataset, "test", VALIDATION_IMAGES, config.storage.storage_options)

    def evaluate(model: vqvae2.VQVAE2) -> dict[str, float]:
        device = next(model.parameters()).device
        with torch.no_grad():
            out = model(validation.to(device))
            mse = F.mse_loss(out.reconstruction.clamp(0, 1), validation.to(device)).item()
        names = vqvae2.level_names(model.levels)
        return {"mse": mse, **{f"usage_{n}": float(u) for n, u in zip(names, out.usage)}}

    batches, per_epoch = train_batches(dataset, train_config.batch_size, train_config.seed, config)
    return TrainingJob(
        name="autoencoder", model=model, loss_fn=vqvae2.autoencoder_loss, train=train_config, batches=batches,
        batches_per_epoch=per_epoch, artifact=artifact, options=config.training, evaluate=evaluate,
    )


@artifact_task(locate=autoencoder_artifact, name="train-autoencoder")
def train_autoencoder(config: PipelineConfig, dataset: dict[str, Any], artifact: Artifact) -> dict[str, Any]:
    summary = train(autoencoder_job, config, dataset, artifact, title="autoencoder: training",
                    options=config.training)
    return {"dataset": dataset["key"], "latent_shapes": [list(s) for s in config.model.latent_shapes()],
            "codebook_size": config.model.autoencoder.codebook_size, **summary}
