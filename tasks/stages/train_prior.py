"""Stage 4a: train one level's prior on the codes: the top prior p(z_top), or a lower
prior p(z_level | levels above), conditioned on the true codes above (teacher forcing).
The priors of different levels train concurrently."""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from prefect.futures import PrefectFuture
from prefect.runtime import task_run
from torch.utils.data import DataLoader, default_collate

import vqvae2
from storage.codes import ChunkShuffleSampler, CodeDataset

from ..config import PipelineConfig, Runtime
from ..manifests import TrainedManifest
from ..machinery.artifacts import Artifact
from ..machinery.devices import training_task
from ..machinery.models import load_model
from ..machinery.process import train_model
from ..machinery.tensorboard import code_maps, events_of_finished
from ..machinery.ranks import rank_batch_size
from ..machinery.trainer import TrainingJob
from ..machinery.training_state import private_generator
from ..stage import Needs, Settings, Stage, stage_task

if TYPE_CHECKING:  # what it takes, for annotations only: a stage never imports another
    from .encode import CodesManifest

VALIDATION_ROWS = 1024
PICTURES = 8  # held-out code grids shown with the prior's samples at each epoch's end (training.tensorboard)


class PriorManifest(TrainedManifest):
    codes: str
    level: int
    level_name: str  # prior-top, prior-bottom, ...

    @property
    def display_name(self) -> str:
        return self.level_name

    def bits_per_code(self, codes: CodesManifest, storage_options: dict[str, Any] | None, rows: int,
                      device: torch.device) -> float:
        """This prior's held-out NLL on the first `rows` test rows of `codes`, in bits per code."""
        prior = load_model(self, storage_options, device)
        return held_out_bits_per_code(prior, self.level, codes.validation_batches(storage_options, rows, 128))


class PriorSettings(Settings):
    level: int  # 0 = top
    prior: vqvae2.PriorConfig
    train: vqvae2.TrainConfig
    num_classes: int  # 0: not class-conditional
    processes: int  # data-parallel ranks: each reads its share of every epoch

    @classmethod
    def of(cls, config: PipelineConfig, variant: Any = None) -> PriorSettings:
        model, level = config.model, int(variant)
        return cls(level=level, prior=model.priors[level], train=model.prior_training(level),
                   num_classes=model.prior_num_classes(level), processes=config.training.world_size())

    def model(self, codes: CodesManifest) -> vqvae2.PixelCNNPrior:
        shapes = [tuple(shape) for shape in codes.level_shapes]
        return vqvae2.PixelCNNPrior(self.prior, num_codes=codes.codebook_size, shape=shapes[self.level],
                                    cond_shapes=shapes[: self.level], num_classes=self.num_classes)

    def name(self, levels: int) -> str:
        return f"prior-{vqvae2.level_names(levels)[self.level]}"


def run(settings: PriorSettings, runtime: Runtime, codes: CodesManifest) -> PrefectFuture:
    # A future: the priors of all levels train at once.
    return training_task(train_prior, runtime).submit(settings, runtime, codes)


STAGE = Stage(
    name="train-priors", directory="priors", code_version="1", settings=PriorSettings, output=PriorManifest,
    inputs={"codes": Needs("encode")}, run=run, variants=lambda config: list(range(config.model.levels)),
    summary="Train the prior of every level on the codes, concurrently.", then=events_of_finished,
)


def _loss(level: int):
    def loss(model: vqvae2.PixelCNNPrior, batch: Any):
        return vqvae2.prior_loss(model, level_batch(batch, level, model))

    return loss


def prior_job(settings: PriorSettings, runtime: Runtime, codes: CodesManifest, artifact: Artifact) -> TrainingJob:
    level, train_config, options = settings.level, settings.train, runtime.storage_options
    vqvae2.seed_everything(train_config.seed + level)
    prior = settings.model(codes)
    dataset = CodeDataset(codes.codes, "train", storage_options=options)
    sampler = ChunkShuffleSampler(dataset, seed=train_config.seed + level)
    batch_size = rank_batch_size(train_config.batch_size)

    def batches(epoch: int, start: int):
        # The sampler fixes the order: reading workers do not change it, so they are no part of the key.
        sampler.set_epoch(epoch, start * batch_size)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                          generator=private_generator(train_config.seed + level, epoch))

    held_out = codes.validation_batches(options, VALIDATION_ROWS, batch_size)

    def evaluate(model: vqvae2.PixelCNNPrior) -> dict[str, float]:
        return {"bits_per_code": held_out_bits_per_code(model, level, held_out)}

    shown = _first_rows(codes, options, PICTURES) if runtime.training.tensorboard else None

    def pictures(model: vqvae2.PixelCNNPrior) -> dict[str, np.ndarray]:
        device = next(model.parameters()).device
        target, cond, labels = vqvae2.train.move_batch(level_batch(shown, level, model), device)
        # A generator of its own: training takes the same random numbers with TensorBoard or without.
        generator = torch.Generator(device=device).manual_seed(train_config.seed)
        sampled = vqvae2.sample_level_fast(model, len(target), cond, labels, generator=generator)
        # A row of held-out code grids; below, the prior's samples given the same levels above (and labels).
        return {"samples": code_maps(torch.cat([target, sampled]), codes.codebook_size, columns=len(target))}

    return TrainingJob(
        name=settings.name(len(codes.level_shapes)), model=prior, loss_fn=_loss(level), train=train_config,
        batches=batches, batches_per_epoch=-(-len(sampler) // batch_size), artifact=artifact,
        options=runtime.training, evaluate=evaluate, pictures=pictures if shown is not None else None,
    )


def _first_rows(codes: CodesManifest, storage_options: dict[str, Any] | None, n: int) -> Any | None:
    """The first `n` rows of the test split as one CodeDataset batch; None if it has none. Read
    by index, not through a DataLoader, whose iterators draw their seeds from the global RNG."""
    dataset = CodeDataset(codes.codes, "test", storage_options=storage_options)
    rows = [dataset[i] for i in range(min(n, len(dataset)))]
    return default_collate(rows) if rows else None


def _run_name() -> str:
    """train-prior-top, train-prior-bottom: the level's name needs the codes' number of levels."""
    parameters = task_run.parameters
    return f"train-{parameters['settings'].name(len(parameters['codes'].level_shapes))}"


@stage_task(STAGE, name="train-prior", task_run_name=_run_name)
def train_prior(settings: PriorSettings, runtime: Runtime, codes: CodesManifest, artifact: Artifact) -> PriorManifest:
    name = settings.name(len(codes.level_shapes))
    return PriorManifest(**train_model(prior_job, settings, runtime, codes, artifact, name), codes=codes.key,
                         level=settings.level, level_name=name)


def level_batch(batch: Any, level: int, prior: vqvae2.PixelCNNPrior) -> tuple:
    """A CodeDataset batch (codes per level, labels) -> what `prior_loss` takes for `level`."""
    levels, labels = batch
    return levels[level], (list(levels[:level]) if prior.conditional else None), (labels if prior.num_classes else None)


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
