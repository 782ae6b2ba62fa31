"""Stage 4b: train an image classifier on the real train split. The `judge` scores
samples for classifier-based rejection (Razavi et al. 2019, Sec. 4.1); other roles
(the FID feature network) are trained independently, with another seed."""
from __future__ import annotations

from typing import Any

import torch

import vqvae2
from vqvae2.config import config_to_dict

from .artifact_task import Artifact, artifact_task
from .config import PipelineConfig
from .datasets import first_images, train_batches
from .training import TrainingJob, train

CODE_VERSION = "1"
VALIDATION_IMAGES = 1000
ROLE_SEEDS = {"judge": 0, "features": 1000}


def classifier_artifact(config: PipelineConfig, dataset: dict[str, Any], role: str) -> Artifact:
    model = config.model
    section = {
        "classifier": config_to_dict(model.classifier),
        "train": config_to_dict(model.train_classifier),
        "role": role,
        "image": [model.image_size, model.image_channels, model.num_classes],
    }
    return Artifact.of(config.storage.url, "classifiers", section, {"dataset": dataset["key"]}, CODE_VERSION,
                       config.storage.storage_options)


def classifier_job(config: PipelineConfig, dataset: dict[str, Any], role: str, artifact: Artifact) -> TrainingJob:
    model_config = config.model
    train_config = vqvae2.apply_overrides(model_config.train_classifier,
                                          {"seed": model_config.train_classifier.seed + ROLE_SEEDS[role]})
    vqvae2.seed_everything(train_config.seed)
    model = vqvae2.build_classifier(model_config)
    images, labels = first_images(dataset, "test", VALIDATION_IMAGES, config.storage.storage_options)

    def evaluate(model: vqvae2.ResNetClassifier) -> dict[str, float]:
        device = next(model.parameters()).device
        with torch.no_grad():
            predictions = torch.cat([model(chunk.to(device)).argmax(1).cpu() for chunk in images.split(256)])
        return {"accuracy": (predictions == labels).float().mean().item()}

    batches, per_epoch = train_batches(dataset, train_config.batch_size, train_config.seed, config)
    return TrainingJob(
        name=f"classifier-{role}", model=model, loss_fn=vqvae2.classifier_loss, train=train_config, batches=batches,
        batches_per_epoch=per_epoch, artifact=artifact, options=config.training, evaluate=evaluate,
    )


@artifact_task(locate=classifier_artifact, name="train-classifier", task_run_name="train-classifier-{role}")
def train_classifier(config: PipelineConfig, dataset: dict[str, Any], role: str, artifact: Artifact) -> dict[str, Any]:
    if role not in ROLE_SEEDS:
        raise ValueError(f"classifier role must be one of {sorted(ROLE_SEEDS)}, got {role!r}")
    summary = train(classifier_job, config, dataset, role, artifact, title=f"classifier-{role}: training",
                    options=config.training)
    return {"dataset": dataset["key"], "role": role, **summary}
