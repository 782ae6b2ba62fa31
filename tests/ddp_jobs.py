"""Training jobs for the data-parallel tests: a tiny autoencoder on fixed synthetic global
batches, each rank training on its equal share of every one. Imported by the training
processes (torchrun's ranks), so it lives in a module of its own."""
from __future__ import annotations

import torch

import vqvae2
from tasks.config import TrainingRuntime
from tasks.machinery.artifacts import Artifact
from tasks.machinery.ranks import rank_and_world, rank_batch_size
from tasks.machinery.trainer import TrainingJob

GLOBAL_BATCH = 8
BATCHES_PER_EPOCH = 6


def tiny_autoencoder() -> vqvae2.VQVAE2:
    # No k-means init and no dead-code restarts: both draw random vectors from the local
    # batch, which differ between one process and several by design.
    config = vqvae2.AutoencoderConfig(channels=8, res_channels=4, res_blocks=1, strides=(2, 2), codebook_size=16,
                                      embed_dim=4, dead_code_steps=0, kmeans_init=False)
    return vqvae2.VQVAE2(config, in_channels=1)


def global_batch(epoch: int, index: int) -> torch.Tensor:
    return torch.rand(GLOBAL_BATCH, 1, 16, 16, generator=torch.Generator().manual_seed(1000 * epoch + index))


def autoencoder_job(root: str, steps: int, options: TrainingRuntime) -> TrainingJob:
    vqvae2.seed_everything(0)
    rank, world = rank_and_world()
    share = rank_batch_size(GLOBAL_BATCH)

    def batches(epoch: int, start: int):
        for index in range(start, BATCHES_PER_EPOCH):
            yield global_batch(epoch, index)[rank * share:(rank + 1) * share]

    def codebooks(model: vqvae2.VQVAE2) -> dict[str, float]:
        # Every rank keeps what it holds, for the test to compare.
        torch.save({name: b.clone() for name, b in model.named_buffers()}, f"{root}/buffers-rank{rank}-of-{world}.pt")
        return {}

    train = vqvae2.TrainConfig(steps=steps, batch_size=GLOBAL_BATCH, lr=3e-3)
    return TrainingJob(name="tiny-autoencoder", model=tiny_autoencoder(), loss_fn=vqvae2.autoencoder_loss, train=train,
                       batches=batches, batches_per_epoch=BATCHES_PER_EPOCH, artifact=Artifact(root, "tiny", "k"),
                       options=options, evaluate=codebooks)



def empty_job(root: str, steps: int, options: TrainingRuntime) -> TrainingJob:
    """A job whose data yields nothing: its training process fails, as a real one would."""
    return TrainingJob(name="empty", model=tiny_autoencoder(), loss_fn=vqvae2.autoencoder_loss,
                       train=vqvae2.TrainConfig(steps=steps, batch_size=GLOBAL_BATCH), batches=lambda epoch, start: [],
                       batches_per_epoch=0, artifact=Artifact(root, "empty", "k"), options=options)
