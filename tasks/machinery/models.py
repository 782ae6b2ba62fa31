"""Load the models a finished stage saved (`model.pt`, a `vqvae2.to_checkpoint` dict)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

import vqvae2
from storage.checkpoints import load_checkpoint
from storage.fsutil import redact
from storage.integrity import DamagedArtifact, repair_advice

from ..manifests import TrainingSummary


def load_model(manifest: TrainingSummary, storage_options: dict[str, Any] | None = None,
               device: torch.device | str = "cpu") -> nn.Module:
    """The trained model of a training stage's manifest, in eval mode on `device`."""
    try:
        checkpoint = load_checkpoint(manifest.model, storage_options)
    except FileNotFoundError:
        # Its manifest says the training finished: the file went since, and whoever reads it
        # (`vqvae2 sample`, a later stage) is told what mends it.
        root = manifest.url.rsplit("/", 2)[0]
        raise DamagedArtifact(f"{redact(manifest.model)}: missing from a finished training; "
                              f"{repair_advice(root)}") from None
    return vqvae2.from_checkpoint(checkpoint).to(device).eval()


@torch.no_grad()
def reconstruct(model: vqvae2.VQVAE2, images: torch.Tensor) -> torch.Tensor:
    """The autoencoder's reconstructions of `images` (floats in [0, 1]), in chunks."""
    return torch.cat([model(chunk).reconstruction.clamp(0, 1) for chunk in images.split(256)])
