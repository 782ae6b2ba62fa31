"""The hierarchical VQ-VAE of VQ-VAE-2 (Razavi et al. 2019, Sec. 3.1, Figure 2a).

Levels are numbered from the top in everything a caller sees (`encode` returns code
grids top first); inside this module index 0 is the bottom, because the encoders run
from the image up. With L levels:

    h[0] = E_0(x)               bottom features, image / strides[0]
    h[i] = E_i(h[i-1])          each level encodes the one below (the paper's top
                                encoder works on the bottom encoder's features)
    q[L-1] = VQ(h[L-1])         quantize the top first, then go down:
    q[i] = VQ(h[i] ++ D_i(c[i+1]))   each lower quantizer sees its features joined with
                                the decoded latents of all levels above it
    c[i] = q[i] ++ U_i(c[i+1])  the context: this level's codes plus everything above,
                                upsampled to this level's resolution
    x_hat = Dec(c[0])           the decoder consumes all levels

Images are float tensors in [0, 1], (B, C, H, W); internally the network works on
[-1, 1] and its reconstruction loss is the MSE there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import AutoencoderConfig
from .layers import Decoder, Encoder, Upsample
from .quantize import QuantizerOutput, VectorQuantizer


@dataclass
class AutoencoderOutput:
    reconstruction: Tensor  # (B, C, H, W) in image space ([0, 1], unclamped)
    loss: Tensor  # reconstruction + commitment, the quantity to minimise
    recon_loss: Tensor  # MSE on [-1, 1] images
    commitment_loss: Tensor  # sum over levels
    codes: list[Tensor]  # (B, h, w) int64 per level, top first
    usage: list[Tensor]  # distinct codes hit per level, top first
    perplexity: list[Tensor]  # per level, top first


class VQVAE2(nn.Module):
    def __init__(self, config: AutoencoderConfig, in_channels: int) -> None:
        super().__init__()
        self.config, self.in_channels = config, in_channels
        c, e, levels = config.channels, config.embed_dim, config.levels
        block = dict(res_blocks=config.res_blocks, res_channels=config.res_channels)
        self.encoders = nn.ModuleList(
            Encoder(in_channels if i == 0 else c, c, stride=s, **block) for i, s in enumerate(config.strides)
        )
        # Context above level i has (levels - 1 - i) * e channels.
        self.pre_quant = nn.ModuleList(
            nn.Conv2d(c + (e if i < levels - 1 else 0), e, 1) for i in range(levels)
        )
        self.quantizers = nn.ModuleList(
            VectorQuantizer(
                config.codebook_size, e, beta=config.beta, decay=config.decay, eps=config.eps,
                dead_code_steps=config.dead_code_steps, kmeans_init=config.kmeans_init,
            )
            for _ in range(levels)
        )
        self.cond_decoders = nn.ModuleList(
            Decoder((levels - 1 - i) * e, e, c, stride=config.strides[i + 1], **block) for i in range(levels - 1)
        )
        self.upsamplers = nn.ModuleList(
            Upsample((levels - 1 - i) * e, (levels - 1 - i) * e, config.strides[i + 1]) for i in range(levels - 1)
        )
        self.decoder = Decoder(levels * e, in_channels, c, stride=config.strides[0], **block)

    @property
    def levels(self) -> int:
        return self.config.levels

    def _extend_context(self, level: int, quantized: Tensor, context: Tensor | None) -> Tensor:
        if context is None:
            return quantized
        return torch.cat([quantized, self.upsamplers[level](context)], dim=1)

    def _quantize(self, x: Tensor, update: bool | None) -> tuple[list[QuantizerOutput], Tensor]:
        """Per-level quantizer outputs (internal order, bottom first) and the decoder context."""
        features, h = [], x * 2 - 1
        for encoder in self.encoders:
            h = encoder(h)
            features.append(h)
        outputs: list[QuantizerOutput | None] = [None] * self.levels
        context = None
        for i in reversed(range(self.levels)):
            z = features[i] if context is None else torch.cat([features[i], self.cond_decoders[i](context)], 1)
            outputs[i] = self.quantizers[i](self.pre_quant[i](z), update=update)
            context = self._extend_context(i, outputs[i].quantized, context)
        return outputs, context

    def _decode_context(self, context: Tensor) -> Tensor:
        return (self.decoder(context) + 1) / 2

    def forward(self, x: Tensor) -> AutoencoderOutput:
        outputs, context = self._quantize(x, update=None)
        reconstruction = self._decode_context(context)
        recon_loss = F.mse_loss(reconstruction.float() * 2 - 1, x.float() * 2 - 1)
        commitment = torch.stack([o.loss for o in outputs]).sum()
        top_first = outputs[::-1]
        return AutoencoderOutput(
            reconstruction=reconstruction,
            loss=recon_loss + commitment,
            recon_loss=recon_loss,
            commitment_loss=commitment,
            codes=[o.codes for o in top_first],
            usage=[o.usage for o in top_first],
            perplexity=[o.perplexity for o in top_first],
        )

    @torch.no_grad()
    def encode(self, x: Tensor) -> list[Tensor]:
        """Images (B, C, H, W) in [0, 1] -> integer code grids (B, h, w), top first.

        Never moves the codebooks, whatever the module's mode."""
        outputs, _ = self._quantize(x, update=False)
        return [o.codes for o in outputs[::-1]]

    def decode_codes(self, codes: list[Tensor]) -> Tensor:
        """Inverse of `encode`: code grids, top first -> images (B, C, H, W) in [0, 1] (unclamped)."""
        if len(codes) != self.levels:
            raise ValueError(f"decode_codes needs {self.levels} code grids (top first), got {len(codes)}")
        context = None
        for i, level_codes in zip(reversed(range(self.levels)), codes):
            context = self._extend_context(i, self.quantizers[i].lookup(level_codes), context)
        return self._decode_context(context)
