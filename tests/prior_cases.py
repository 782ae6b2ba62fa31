"""Priors and inputs shared by the prior and sampler tests (test_prior, test_fast_sampling,
test_graph_sampling): every sampler is checked on the same priors."""
from __future__ import annotations

import torch

import vqvae2
from vqvae2.config import PriorConfig
from vqvae2.prior import PixelCNNPrior

ATOL = 1e-5  # fp32; the observed difference is a few 1e-7

# Several priors of every kind: attention or not, conditioned on 0, 1 or 2 levels above,
# with and without class labels, kernel 3 and 5.
THREE_LEVELS = {
    "autoencoder.strides": [2, 2, 2],
    "image_size": 32,
    "priors": [
        {"channels": 16, "layers": 3, "kernel_size": 3, "attention_layers": 1, "attention_heads": 2, "embed_dim": 8},
        {"channels": 16, "layers": 2, "kernel_size": 3, "attention_layers": 1, "attention_heads": 2, "embed_dim": 8,
         "cond_channels": 8, "cond_res_blocks": 1},
        {"channels": 16, "layers": 3, "kernel_size": 5, "embed_dim": 8, "cond_channels": 8, "cond_res_blocks": 1},
    ],
}
CASES = {
    "top-attention": ("smoke", {"num_classes": 0}, 0),
    "top-class-conditional": ("smoke", {}, 0),
    "bottom-given-top": ("smoke", {"num_classes": 0}, 1),
    "bottom-given-top-class-conditional": ("smoke", {"priors.1.kernel_size": 5}, 1),
    "middle-of-three": ("smoke", THREE_LEVELS, 1),
    "bottom-of-three-given-two": ("smoke", THREE_LEVELS, 2),
    "bottom-conditioned-at-the-grid-above": ("smoke", {"priors.1.cond_resolution": "above"}, 1),
    "bottom-of-three-conditioned-at-the-grid-above": (
        "smoke", {**THREE_LEVELS, "priors": [*THREE_LEVELS["priors"][:2],
                                             {**THREE_LEVELS["priors"][2], "cond_resolution": "above"}]}, 2),
}

# smoke's 4x4 + 8x8, and three levels 2x2 + 4x4 + 8x8 (THREE_LEVELS on 16x16 images, for speed)
HIERARCHIES = {"two-levels": {}, "three-levels": {**THREE_LEVELS, "image_size": 16}}


def prior_and_inputs(case: str, seed: int = 0):
    """The prior of CASES[case] in eval mode, with a batch of 2: (prior, codes, cond, labels)."""
    name, overrides, level = CASES[case]
    config = vqvae2.preset(name, {"priors.0.dropout": 0.1, **overrides} if "priors" not in overrides else overrides)
    torch.manual_seed(seed)
    prior = vqvae2.build_prior(config, level).eval()
    shapes, k = config.latent_shapes(), config.autoencoder.codebook_size
    codes = torch.randint(k, (2, *shapes[level]))
    cond = [torch.randint(k, (2, *s)) for s in shapes[:level]] or None
    labels = torch.tensor([3, 7]) if prior.num_classes else None
    return prior, codes, cond, labels


def small_prior(shape: tuple[int, int], kernel_size: int) -> PixelCNNPrior:
    """Every feature at once (attention, a level above, labels) on any grid."""
    config = PriorConfig(channels=8, layers=3, kernel_size=kernel_size, attention_layers=1, attention_heads=2,
                         dropout=0.1, embed_dim=4, cond_channels=4, cond_res_blocks=1)
    return PixelCNNPrior(config, num_codes=16, shape=shape, cond_shapes=[(2, 3)], num_classes=3).eval()
