"""Causal building blocks of the priors: a gated PixelCNN with vertical and horizontal
stacks (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN
Decoders") and causal multi-head self-attention (PixelSNAIL, Chen et al. 2018), as
used by VQ-VAE-2 (Razavi et al. 2019, Sec. 3.2).

Causality is by construction, with padding instead of masks (no blind spot):
- the vertical stack `v` at (r, c) depends only on codes in rows < r;
- the horizontal stack `h` at (r, c) depends only on codes before (r, c) in raster
  order: rows < r, or row r and columns < c.
Every layer keeps both invariants, so `h` feeds the logits of position (r, c). Only
`h` goes through attention; feeding attention into `v` would let `v` at (r, c+1) see
(r, c), which the next vertical convolution would leak to (r, c).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def shift_down(x: Tensor) -> Tensor:
    """Move every row one down (zeros enter at the top)."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


def shift_right(x: Tensor) -> Tensor:
    """Move every column one right (zeros enter at the left)."""
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


def gate(x: Tensor) -> Tensor:
    """tanh(a) * sigmoid(b), the gated activation of Gated PixelCNN."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


def conv_at(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """conv over maps x (B, C_in, H, W); or, for x (B, C_in * kh * kw), each row one flattened
    receptive field, conv at those single positions (B, C_out): the same weights as one matrix
    product, which on a CPU costs far less per call than a convolution of a 1x1 map. The
    cached sampler (vqvae2.fast_sampling) evaluates one position at a time this way."""
    if x.dim() == 4:
        return conv(x)
    return F.linear(x, conv.weight.flatten(1), conv.bias)


class DownConv(nn.Module):
    """Output (r, c) sees input rows r-kh+1..r and columns c-kw//2..c+kw//2."""

    def __init__(self, in_channels: int, out_channels: int, kh: int, kw: int) -> None:
        super().__init__()
        self.kh, self.kw = kh, kw
        self.conv = nn.Conv2d(in_channels, out_channels, (kh, kw))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (self.kw // 2, self.kw // 2, self.kh - 1, 0)))


class RightConv(nn.Module):
    """Output (r, c) sees input row r, columns c-kw+1..c."""

    def __init__(self, in_channels: int, out_channels: int, kw: int) -> None:
        super().__init__()
        self.kw = kw
        self.conv = nn.Conv2d(in_channels, out_channels, (1, kw))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (self.kw - 1, 0, 0, 0)))


class InputLayer(nn.Module):
    """Embedded codes (B, D, H, W) -> the first (v, h): v strictly above, h strictly before."""

    def __init__(self, in_channels: int, channels: int, kernel_size: int) -> None:
        super().__init__()
        k = kernel_size
        self.v_conv = DownConv(in_channels, channels, k // 2 + 1, k)
        self.h_conv = RightConv(in_channels, channels, k // 2 + 1)
        # Where a position lies is not data, so it may be seen unshifted.
        self.position = nn.Conv2d(2, 2 * channels, 1)

    def positions(self, height: int, width: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """The positional terms (pos_v, pos_h), each (1, C, H, W), on like's device and dtype."""
        rows = torch.linspace(-1, 1, height, device=like.device, dtype=like.dtype)
        cols = torch.linspace(-1, 1, width, device=like.device, dtype=like.dtype)
        coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij")).unsqueeze(0)
        pos_v, pos_h = self.position(coords).chunk(2, dim=1)
        return pos_v, pos_h

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pos_v, pos_h = self.positions(x.shape[2], x.shape[3], x)
        v = shift_down(self.v_conv(x)) + pos_v
        h = shift_right(self.h_conv(x)) + v + pos_h
        return v, h


class GatedLayer(nn.Module):
    """One gated residual layer of both stacks, with optional spatial and class conditioning."""

    def __init__(
        self, channels: int, kernel_size: int, cond_channels: int = 0, class_channels: int = 0, dropout: float = 0.0
    ) -> None:
        super().__init__()
        c, k = channels, kernel_size
        self.v_conv = DownConv(c, 2 * c, k // 2 + 1, k)
        self.h_conv = RightConv(c, 2 * c, k // 2 + 1)
        self.v_to_h = nn.Conv2d(2 * c, 2 * c, 1)
        self.v_out = nn.Conv2d(c, c, 1)
        self.h_out = nn.Conv2d(c, c, 1)
        self.cond = nn.Conv2d(cond_channels, 4 * c, 1) if cond_channels else None
        self.class_bias = nn.Linear(class_channels, 4 * c) if class_channels else None
        self.dropout = nn.Dropout(dropout)

    def conditioning(self, cond: Tensor | None, class_emb: Tensor | None) -> Tensor | None:
        """The additive conditioning term (B, 4C, H|1, W|1): fixed for a whole sample."""
        term = None
        if self.cond is not None:
            term = self.cond(cond)
        if self.class_bias is not None:
            bias = self.class_bias(class_emb)[:, :, None, None]
            term = bias if term is None else term + bias
        return term

    def forward(
        self, v: Tensor, h: Tensor, cond: Tensor | None = None, class_emb: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """v, h (B, C, H, W); cond (B, cond_channels, H, W) and class_emb (B, class_channels), each
        when configured. The conditioning term is made here, not passed in: one (B, 4C, H, W) map
        alive at a time, and inside the block that activation checkpointing recomputes."""
        cond_term = self.conditioning(cond, class_emb)
        cond_v, cond_h = cond_term.chunk(2, dim=1) if cond_term is not None else (None, None)
        v, v_to_h = self.vertical(v, self.v_conv(v), cond_v)
        return v, self.horizontal(h, self.h_conv(h), v_to_h, cond_h)

    # The two halves of forward, also called by the cached sampler (vqvae2.fast_sampling):
    # vertical on one row (B, ., 1, W), horizontal on one position (B, .) at a time.
    def vertical(self, v: Tensor, v_pre: Tensor, cond_v: Tensor | None) -> tuple[Tensor, Tensor]:
        """v and v_pre = v_conv(v) at the same positions -> (the new v, v_to_h(v_pre)) there."""
        v_to_h = self.v_to_h(v_pre)
        if cond_v is not None:
            v_pre = v_pre + cond_v
        return v + self.dropout(self.v_out(gate(v_pre))), v_to_h

    def horizontal(self, h: Tensor, h_conv: Tensor, v_to_h: Tensor, cond_h: Tensor | None) -> Tensor:
        """h, h_conv(h) and v_to_h at the same positions (maps, or (B, .) at one position)
        -> the new h there."""
        h_pre = h_conv + v_to_h
        if cond_h is not None:
            h_pre = h_pre + cond_h
        return h + self.dropout(conv_at(self.h_out, gate(h_pre)))


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention over the raster order; position t attends to s <= t.

    Attending to t itself is safe because h at t depends only on codes before t."""

    def __init__(self, channels: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.out_dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor) -> Tensor:
        q, k, v = self.heads_qkv(h.flatten(2).transpose(1, 2))  # tokens (B, T, C), T = H * W in raster order
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.add_to(h, y)

    def step(self, h: Tensor, keys: Tensor, values: Tensor, t: int) -> Tensor:
        """forward at the single position t (eval mode), h (B, C), for cached sampling.

        keys and values (B, nh, T, hs) hold the positions < t from earlier steps; the step
        writes position t into them and attends to s <= t only, so no mask is needed."""
        q, k, v = self.heads_qkv(h[:, None])  # each (B, nh, 1, hs)
        keys[:, :, t:t + 1], values[:, :, t:t + 1] = k, v
        return self.add_to(h, F.scaled_dot_product_attention(q, keys[:, :, :t + 1], values[:, :, :t + 1]))

    def heads_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Tokens x (B, T, C) -> q, k, v, each (B, nh, T, hs)."""
        b, _, c = x.shape
        q, k, v = self.qkv(self.norm(x)).split(c, dim=2)
        return tuple(t.view(b, -1, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))

    def add_to(self, h: Tensor, y: Tensor) -> Tensor:
        """h (B, C, H, W), or (B, C) at one position, plus the projected attention output y (B, nh, T, hs)."""
        b, _, t, _ = y.shape
        y = self.out_dropout(self.proj(y.transpose(1, 2).reshape(b, t, -1)))  # (B, T, C)
        return h + y.transpose(1, 2).reshape(h.shape)


class OutputHead(nn.Module):
    """h (B, C, H, W) -> logits over the codebook (B, K, H, W); or h (B, C) -> (B, K) at one position."""

    def __init__(self, channels: int, num_codes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.ELU(), nn.Conv2d(channels, channels, 1), nn.ELU(), nn.Conv2d(channels, num_codes, 1)
        )

    def forward(self, h: Tensor) -> Tensor:
        for module in self.net:
            h = conv_at(module, h) if isinstance(module, nn.Conv2d) else module(h)
        return h
