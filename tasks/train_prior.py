"""Stage 4a: train one level's prior on the codes: the top prior p(z_top), or a lower
prior p(z_level | levels above), conditioned on the true codes above (teacher forcing).
The priors of different levels train concurrently."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.data import DataLoader

import vqvae2
from storage.codes import ChunkShuffleSampler, CodeDataset
from vqvae2.config import config_to_dict

from .artifact_task import Artifact, artifact_task
from .config import PipelineConfig
from .training import TrainingJob, private_generator, train

CODE_VERSION = "1"
VALIDATION_ROWS = 1024


def prior_artifact(config: PipelineConfig, codes: dict[str, Any], level: int) -> Artifact:
    model = config.model
    section = {
        "prior": config_to_dict(model.priors[level]),
        "train": config_to_dict(model.train_prior),
        "level": level,
        "num_classes": model.prior_num_classes(level),
    }
    return Artifact.of(config.storage.url, "priors", section, {"codes": codes["key"]}, CODE_VERSION,
                       config.storage.storage_options)


def level_batch(batch: Any, level: int, prior: vqvae2.PixelCNNPrior) -> tuple:
    """A CodeDataset batch (codes per level, labels) -> what `prior_loss` takes for `level`."""
    levels, labels = batch
    return levels[level], (list(levels[:level]) if prior.conditional else None), (labels if prior.num_classes else None)


def validation_batches(codes: dict[str, Any], storage_options: dict[str, Any], rows: int, batch_size: int):
    """The first `rows` rows of the test split, in order, as CodeDataset batches."""
    dataset = CodeDataset(codes["codes"], "test", storage_options=storage_options)
    indices = range(min(rows, len(dataset)))
    return DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size)


@torch.no_grad()
def held_out_bits_per_code(prior: vqvae2.PixelCNNPrior, level: int, batches: Iterable[Any]) -> float:
    """The prior's mean negative log-likelihood of held-out codes, in bits per code."""
    device = next(prior.parameters()).device
    total, count = 0.0, 0
    for batch in batches:
        target, cond, labels = vqvae2.train.move_batch(level_batch(batch, level, prior), device)
        total += prior.loss(target, cond, labels).item() * target.numel()
        count += target.numel()
    return vqvae2.bits_per_code(total / max(count, 1))


def _prior_loss(level: int):
    def loss(model: vqvae2.PixelCNNPrior, batch: Any):
        return vqvae2.prior_loss(model, level_batch(batch, level, model))

    return loss


def prior_job(config: PipelineConfig, codes: dict[str, Any], level: int, artifact: Artifact) -> TrainingJob:
    model_config, train_config = config.model, config.model.train_prior
    vqvae2.seed_everything(train_config.seed + level)
    prior = vqvae2.build_prior(model_config, level)
    options = config.storage.storage_options
    dataset = CodeDataset(codes["codes"], "train", storage_options=options)
    sampler = ChunkShuffleSampler(dataset, seed=train_config.seed + level)
    batch_size = train_config.batch_size

    def batches(epoch: int, start: int):
        sampler.set_epoch(epoch, start * batch_size)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=config.training.num_workers,
                          generator=private_generator(train_config.seed + level, epoch))

    held_out = validation_batches(codes, options, VALIDATION_ROWS, batch_size)

    def evaluate(model: vqvae2.PixelCNNPrior) -> dict[str, float]:
        return {"bits_per_code": held_out_bits_per_code(model, level, held_out)}

    return TrainingJob(
        name=f"prior-{vqvae2.level_names(model_config.levels)[level]}", model=prior, loss_fn=_prior_loss(level),
        train=train_config, batches=batches, batches_per_epoch=-(-len(sampler) // batch_size), artifact=artifact,
        options=config.training, evaluate=evaluate,
    )


@artifact_task(locate=prior_artifact, name="train-prior", task_run_name="train-prior-{level}")
def train_prior(config: PipelineConfig, codes: dict[str, Any], level: int, artifact: Artifact) -> dict[str, Any]:
    name = f"prior-{vqvae2.level_names(config.model.levels)[level]}"
    summary = train(prior_job, config, codes, level, artifact, title=f"{name}: training",
                    options=config.training)
    return {"codes": codes["key"], "level": level, "level_name": name, **summary}
