"""Stage 2: train the hierarchical VQ-VAE on the dataset's train split."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from prefect.futures import PrefectFuture

import vqvae2

from ..config import PipelineConfig, Runtime
from ..manifests import TrainedManifest
from ..machinery.artifacts import Artifact
from ..machinery.devices import training_task
from ..machinery.process import train_model
from ..machinery.reporting import image_grid
from ..machinery.tensorboard import events_of_finished
from ..machinery.ranks import rank_batch_size
from ..machinery.trainer import TrainingJob
from ..stage import Needs, Settings, Stage, stage_task

if TYPE_CHECKING:  # what it takes, for annotations only: a stage never imports another
    from .ingest import DatasetManifest

VALIDATION_IMAGES = 256
PICTURES = 8  # held-out images shown with their reconstructions at each epoch's end (training.tensorboard)


class AutoencoderManifest(TrainedManifest):
    dataset: str
    latent_shapes: list[tuple[int, int]]  # code grid of every level, top first
    codebook_size: int

    @property
    def display_name(self) -> str:
        return "autoencoder"


class AutoencoderSettings(Settings):
    autoencoder: vqvae2.AutoencoderConfig
    train: vqvae2.TrainConfig
    image_size: int
    image_channels: int
    num_workers: int  # the shard readers interleave: the batch order depends on it
    processes: int  # data-parallel ranks: each reads its share of every epoch

    @classmethod
    def of(cls, config: PipelineConfig, variant: Any = None) -> AutoencoderSettings:
        model = config.model
        return cls(autoencoder=model.autoencoder, train=model.train_autoencoder, image_size=model.image_size,
                   image_channels=model.image_channels, num_workers=config.training.num_workers,
                   processes=config.training.world_size())

    def model(self) -> vqvae2.VQVAE2:
        return vqvae2.VQVAE2(self.autoencoder, in_channels=self.image_channels)


def run(settings: AutoencoderSettings, runtime: Runtime, dataset: DatasetManifest) -> PrefectFuture:
    # A future: the classifiers train beside it.
    return training_task(train_autoencoder, runtime).submit(settings, runtime, dataset)


def check(config: PipelineConfig, dataset: DatasetManifest | None) -> None:
    """Images to train on and held-out ones to validate on, once the dataset is known."""
    if dataset is not None:
        dataset.require_images("training the autoencoder", train=1, test=1)


STAGE = Stage(
    name="train-autoencoder", directory="autoencoder", code_version="1", settings=AutoencoderSettings,
    output=AutoencoderManifest, inputs={"dataset": Needs("ingest")}, run=run,
    summary="Train the autoencoder on an ingested dataset.", check=check, then=events_of_finished,
)


def autoencoder_job(settings: AutoencoderSettings, runtime: Runtime, dataset: DatasetManifest,
                    artifact: Artifact) -> TrainingJob:
    vqvae2.seed_everything(settings.train.seed)
    model = settings.model()
    validation, _ = dataset.first_images("test", VALIDATION_IMAGES, runtime.storage_options)

    def evaluate(model: vqvae2.VQVAE2) -> dict[str, float]:
        device = next(model.parameters()).device
        with torch.no_grad():
            out = model(validation.to(device))
            mse = F.mse_loss(out.reconstruction.clamp(0, 1), validation.to(device)).item()
        names = vqvae2.level_names(model.levels)
        return {"mse": mse, **{f"usage_{n}": float(u) for n, u in zip(names, out.usage)}}

    def pictures(model: vqvae2.VQVAE2) -> dict[str, np.ndarray]:
        shown = validation[:PICTURES]
        if not len(shown):
            return {}
        reconstructions = model(shown.to(next(model.parameters()).device)).reconstruction.clamp(0, 1).cpu()
        # A row of held-out images, their reconstructions below.
        return {"reconstructions": image_grid(torch.cat([shown, reconstructions]), columns=len(shown))}

    batches, per_epoch = dataset.train_batches(rank_batch_size(settings.train.batch_size), settings.train.seed,
                                       settings.num_workers, runtime)
    return TrainingJob(
        name="autoencoder", model=model, loss_fn=vqvae2.autoencoder_loss, train=settings.train, batches=batches,
        batches_per_epoch=per_epoch, artifact=artifact, options=runtime.training, evaluate=evaluate,
        pictures=pictures,
    )


@stage_task(STAGE)
def train_autoencoder(settings: AutoencoderSettings, runtime: Runtime, dataset: DatasetManifest,
                      artifact: Artifact) -> AutoencoderManifest:
    return AutoencoderManifest(**train_model(autoencoder_job, settings, runtime, dataset, artifact, "autoencoder"),
                               dataset=dataset.key,
                               latent_shapes=settings.autoencoder.latent_shapes(settings.image_size),
                               codebook_size=settings.autoencoder.codebook_size)
