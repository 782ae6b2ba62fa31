"""Stage 4b: train image classifiers on the real train split. The `judge` scores samples
for classifier-based rejection (Razavi et al. 2019, Sec. 4.1); unless the evaluation uses Inception, a
second one, `features`, trained independently with another seed, is the feature network
of FID/KID/precision/recall, so the metric never grades with the judge's eyes.

An unconditional model (unlabelled data) has no judge, and its `features` network learns
without labels, by predicting which quarter turn each image was given
(`vqvae2.rotation_loss`): the `self-supervised` feature space."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from prefect.futures import PrefectFuture

import vqvae2

from ..config import PipelineConfig, Runtime
from ..fidelity import feature_space
from ..manifests import TrainedManifest
from ..machinery.artifacts import Artifact
from ..machinery.devices import training_task
from ..machinery.process import train_model
from ..machinery.ranks import rank_batch_size
from ..machinery.tensorboard import events_of_finished
from ..machinery.trainer import TrainingJob
from ..stage import Needs, Settings, Stage, stage_task

if TYPE_CHECKING:  # what it takes, for annotations only: a stage never imports another
    from .ingest import DatasetManifest

VALIDATION_IMAGES = 1000
ROLE_SEEDS = {"judge": 0, "features": 1000}


class ClassifierManifest(TrainedManifest):
    dataset: str
    role: str  # judge (rejection sampling) or features (the FID feature network)
    target: str = "labels"  # what it learned to predict: labels, or rotations (self-supervised)

    @property
    def display_name(self) -> str:
        return f"classifier-{self.role}"


def classifier_roles(config: PipelineConfig) -> list[str]:
    """The judge (rejection sampling, labels only) and, without Inception, the FID feature network."""
    judge = ["judge"] if config.model.num_classes else []
    return judge + (["features"] if feature_space(config) != "inception" else [])


class ClassifierSettings(Settings):
    role: str
    target: str  # labels, or rotations (self-supervised: no labels needed)
    classifier: vqvae2.ClassifierConfig
    train: vqvae2.TrainConfig  # its seed offset by the role's
    image_channels: int
    num_classes: int
    num_workers: int  # the shard readers interleave: the batch order depends on it
    processes: int  # data-parallel ranks: each reads its share of every epoch

    @classmethod
    def of(cls, config: PipelineConfig, variant: Any = None) -> ClassifierSettings:
        if variant not in ROLE_SEEDS:
            raise ValueError(f"classifier role must be one of {sorted(ROLE_SEEDS)}, got {variant!r}")
        model = config.model
        seed = model.train_classifier.seed + ROLE_SEEDS[variant]
        target = "rotations" if variant == "features" and feature_space(config) == "self-supervised" else "labels"
        return cls(role=variant, target=target, classifier=model.classifier,
                   train=vqvae2.apply_overrides(model.train_classifier, {"seed": seed}),
                   image_channels=model.image_channels,
                   num_classes=vqvae2.ROTATIONS if target == "rotations" else model.num_classes,
                   num_workers=config.training.num_workers, processes=config.training.world_size())

    def model(self) -> vqvae2.ResNetClassifier:
        return vqvae2.ResNetClassifier(self.classifier, self.image_channels, self.num_classes)


def run(settings: ClassifierSettings, runtime: Runtime, dataset: DatasetManifest) -> PrefectFuture:
    # A future: the classifiers train while the autoencoder does.
    return training_task(train_classifier, runtime).submit(settings, runtime, dataset)


def check(config: PipelineConfig, dataset: DatasetManifest | None) -> None:
    """Images to train on and held-out ones to validate on, once the dataset is known."""
    if dataset is not None:
        dataset.require_images("training the classifiers", train=1, test=1)


STAGE = Stage(
    name="train-classifiers", directory="classifiers", code_version="1", settings=ClassifierSettings,
    output=ClassifierManifest, inputs={"dataset": Needs("ingest")}, run=run, variants=classifier_roles,
    summary="Train the judge for rejection sampling (and, unless the evaluation uses Inception, the FID feature network).",
    check=check, then=events_of_finished,
)


def classifier_job(settings: ClassifierSettings, runtime: Runtime, dataset: DatasetManifest,
                   artifact: Artifact) -> TrainingJob:
    vqvae2.seed_everything(settings.train.seed)
    model = settings.model()
    images, labels = dataset.first_images("test", VALIDATION_IMAGES, runtime.storage_options)
    loss_fn = vqvae2.classifier_loss
    if settings.target == "rotations":
        images, labels = vqvae2.rotated(images)
        loss_fn = vqvae2.rotation_loss

    def evaluate(model: vqvae2.ResNetClassifier) -> dict[str, float]:
        device = next(model.parameters()).device
        with torch.no_grad():
            predictions = torch.cat([model(chunk.to(device)).argmax(1).cpu() for chunk in images.split(256)])
        return {"accuracy": (predictions == labels).float().mean().item()}

    batches, per_epoch = dataset.train_batches(rank_batch_size(settings.train.batch_size), settings.train.seed,
                                       settings.num_workers, runtime)
    return TrainingJob(
        name=f"classifier-{settings.role}", model=model, loss_fn=loss_fn, train=settings.train,
        batches=batches, batches_per_epoch=per_epoch, artifact=artifact, options=runtime.training, evaluate=evaluate,
    )


@stage_task(STAGE, name="train-classifier", task_run_name="train-classifier-{settings.role}")
def train_classifier(settings: ClassifierSettings, runtime: Runtime, dataset: DatasetManifest,
                     artifact: Artifact) -> ClassifierManifest:
    trained = train_model(classifier_job, settings, runtime, dataset, artifact, f"classifier-{settings.role}")
    return ClassifierManifest(**trained, dataset=dataset.key, role=settings.role, target=settings.target)
