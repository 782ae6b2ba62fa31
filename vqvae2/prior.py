"""Autoregressive priors over code grids (Razavi et al. 2019, Sec. 3.2 and Appendix A).

One class covers every level: the top prior p(z_top) is a gated PixelCNN with
PixelSNAIL-style causal self-attention; a lower prior p(z_i | z_above) adds a
conditioning stack over the code grids of all levels above it (no attention by
default, for memory); either may be class-conditional through a label embedding.
Logits for position (r, c) depend only on codes before it in raster order.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import PriorConfig
from .layers import ResBlock
from .pixelcnn import CausalSelfAttention, GatedLayer, InputLayer, OutputHead


class ConditioningStack(nn.Module):
    """Code grids of the levels above -> features (B, channels, H, W) at this level's grid.

    Each grid is embedded and repeated up to the grid the stack works at, and the joined
    maps go through residual blocks (the paper's "conditioning stack"). It works at this
    level's grid, or (`upsample` > 1) at the grid of the level just above, `upsample` times
    coarser, whose blocks cost a fraction of the work and see as many times as far; a
    transposed convolution then gives each of this level's positions its own features."""

    def __init__(self, num_codes: int, levels_above: int, channels: int, res_blocks: int, upsample: int = 1) -> None:
        super().__init__()
        self.embeds = nn.ModuleList(nn.Embedding(num_codes, channels) for _ in range(levels_above))
        self.upsample = upsample
        self.net = nn.Sequential(
            nn.Conv2d(levels_above * channels, channels, 3, padding=1),
            *[ResBlock(channels, channels) for _ in range(res_blocks)],
            nn.ReLU(),
            *([nn.ConvTranspose2d(channels, channels, upsample, stride=upsample), nn.ReLU()] if upsample > 1 else []),
        )

    def forward(self, cond_codes: Sequence[Tensor], shape: tuple[int, int]) -> Tensor:
        at = (shape[0] // self.upsample, shape[1] // self.upsample)
        maps = [
            F.interpolate(embed(codes).permute(0, 3, 1, 2), size=at, mode="nearest")
            for embed, codes in zip(self.embeds, cond_codes)
        ]
        return self.net(torch.cat(maps, dim=1))


class PixelCNNPrior(nn.Module):
    def __init__(
        self,
        config: PriorConfig,
        num_codes: int,
        shape: tuple[int, int],
        cond_shapes: Sequence[tuple[int, int]] = (),
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        self.config, self.num_codes = config, num_codes
        self.shape = tuple(shape)
        self.cond_shapes = tuple(tuple(s) for s in cond_shapes)
        self.num_classes = num_classes
        c = config.channels
        self.embed = nn.Embedding(num_codes, config.embed_dim)
        self.input = InputLayer(config.embed_dim, c, config.kernel_size)
        self.cond_stack = (
            ConditioningStack(num_codes, len(self.cond_shapes), config.cond_channels, config.cond_res_blocks,
                              upsample=self.cond_upsampling() if config.cond_resolution == "above" else 1)
            if self.cond_shapes else None
        )
        self.class_embed = nn.Embedding(num_classes, c) if num_classes else None
        self.layers = nn.ModuleList(
            GatedLayer(
                c, config.kernel_size,
                cond_channels=config.cond_channels if self.cond_shapes else 0,
                class_channels=c if num_classes else 0,
                dropout=config.dropout,
            )
            for _ in range(config.layers)
        )
        # Attention blocks spread evenly over the depth: after layer i when attention_at[i].
        every = config.layers // config.attention_layers if config.attention_layers else 0
        self.attention_at = [bool(every) and (i + 1) % every == 0 and (i + 1) // every <= config.attention_layers
                             for i in range(config.layers)]
        self.attention = nn.ModuleDict(
            {str(i): CausalSelfAttention(c, config.attention_heads, config.dropout)
             for i, at in enumerate(self.attention_at) if at}
        )
        self.head = OutputHead(c, num_codes)

    def cond_upsampling(self) -> int:
        """How many times finer this level's grid is than the one just above (cond_resolution "above")."""
        (h, w), (above_h, above_w) = self.shape, self.cond_shapes[-1]
        if h % above_h or w % above_w or h // above_h != w // above_w:
            raise ValueError(f"prior.cond_resolution 'above' needs this level's grid {h}x{w} to be a whole multiple "
                             f"of the grid above, {above_h}x{above_w}, the same along both sides")
        return h // above_h

    @property
    def conditional(self) -> bool:
        return self.cond_stack is not None

    def check_inputs(self, batch: int, cond_codes: Sequence[Tensor] | None, labels: Tensor | None) -> None:
        if self.conditional:
            if cond_codes is None or len(cond_codes) != len(self.cond_shapes):
                raise ValueError(
                    f"this prior is conditioned on {len(self.cond_shapes)} level(s) above: pass cond_codes "
                    f"with grids of shapes {list(self.cond_shapes)} (top first)"
                )
        elif cond_codes:
            raise ValueError("this prior is unconditional (top level): cond_codes must be None")
        if self.num_classes:
            if labels is None:
                raise ValueError(f"this prior is class-conditional over {self.num_classes} classes: pass labels")
            if labels.shape != (batch,):
                raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
        elif labels is not None:
            raise ValueError("this prior is not class-conditional: labels must be None")

    def conditioning_inputs(
        self, cond_codes: Sequence[Tensor] | None, labels: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        """(the conditioning stack's features (B, cond_channels, H, W), the class embedding (B, C)),
        each None when this prior has none: what every layer's conditioning is made from."""
        cond = self.cond_stack(cond_codes, self.shape) if self.cond_stack is not None else None
        class_emb = self.class_embed(labels) if self.class_embed is not None else None
        return cond, class_emb

    def conditioning_terms(
        self, cond_codes: Sequence[Tensor] | None, labels: Tensor | None
    ) -> list[Tensor | None]:
        """Per-layer additive conditioning, computed once per sample (not per position), for
        the cached sampler; the full forward makes each inside its layer instead."""
        cond, class_emb = self.conditioning_inputs(cond_codes, labels)
        return [layer.conditioning(cond, class_emb) for layer in self.layers]

    def logits_from_embedding(
        self, x: Tensor, cond_codes: Sequence[Tensor] | None = None, labels: Tensor | None = None
    ) -> Tensor:
        """Embedded codes (B, D, H, W) -> logits (B, K, H, W); exposed so tests can
        differentiate the logits with respect to the input."""
        self.check_inputs(x.shape[0], cond_codes, labels)
        cond, class_emb = self.conditioning_inputs(cond_codes, labels)
        v, h = self.input(x)
        for i, layer in enumerate(self.layers):
            v, h = layer(v, h, cond, class_emb)
            if self.attention_at[i]:
                h = self.attention[str(i)](h)
        return self.head(h)

    def embed_codes(self, codes: Tensor) -> Tensor:
        """Codes (B, H, W) -> (B, D, H, W)."""
        return self.embed(codes).permute(0, 3, 1, 2)

    def forward(
        self, codes: Tensor, cond_codes: Sequence[Tensor] | None = None, labels: Tensor | None = None
    ) -> Tensor:
        """Codes (B, H, W) -> logits (B, K, H, W): position (r, c) predicts codes[:, r, c]."""
        return self.logits_from_embedding(self.embed_codes(codes), cond_codes, labels)

    def loss(
        self, codes: Tensor, cond_codes: Sequence[Tensor] | None = None, labels: Tensor | None = None
    ) -> Tensor:
        """Mean negative log-likelihood per code, in nats."""
        return F.cross_entropy(self(codes, cond_codes, labels).float(), codes)


def bits_per_code(nll_nats: Tensor | float) -> Tensor | float:
    return nll_nats / math.log(2)
