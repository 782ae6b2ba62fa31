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

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, _, height, width = x.shape
        rows = torch.linspace(-1, 1, height, device=x.device, dtype=x.dtype)
        cols = torch.linspace(-1, 1, width, device=x.device, dtype=x.dtype)
        coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij")).unsqueeze(0)
        pos_v, pos_h = self.position(coords).chunk(2, dim=1)
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

    def forward(self, v: Tensor, h: Tensor, cond_term: Tensor | None = None) -> tuple[Tensor, Tensor]:
        v_pre = self.v_conv(v)
        h_pre = self.h_conv(h) + self.v_to_h(v_pre)
        if cond_term is not None:
            cond_v, cond_h = cond_term.chunk(2, dim=1)
            v_pre, h_pre = v_pre + cond_v, h_pre + cond_h
        v = v + self.dropout(self.v_out(gate(v_pre)))
        h = h + self.dropout(self.h_out(gate(h_pre)))
        return v, h


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
        b, c, height, width = h.shape
        x = h.flatten(2).transpose(1, 2)  # (B, T, C), T = H * W in raster order
        q, k, v = self.qkv(self.norm(x)).split(c, dim=2)
        q, k, v = (t.view(b, -1, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = self.out_dropout(self.proj(y.transpose(1, 2).reshape(b, -1, c)))
        return h + y.transpose(1, 2).reshape(b, c, height, width)


class OutputHead(nn.Module):
    """h (B, C, H, W) -> logits over the codebook (B, K, H, W)."""

    def __init__(self, channels: int, num_codes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.ELU(), nn.Conv2d(channels, channels, 1), nn.ELU(), nn.Conv2d(channels, num_codes, 1)
        )

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)
