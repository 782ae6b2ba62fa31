"""Fast, exact sampling from the priors: incremental (cached) autoregressive evaluation.

The reference sampler (`vqvae2.sampling.sample_level_reference`) runs the whole prior once
per position, H * W passes over the whole map. Here each step computes every layer only
where the new position needs it and reads the rest from caches filled by earlier steps, as
in "Fast Generation for Convolutional Autoregressive Models" (Ramachandran et al. 2017):

- vertical stack: v at row r depends only on rows < r (see `vqvae2.pixelcnn`), so at the
  start of row r the whole row of every layer's v is computed from a window of the layer's
  last kh input rows, together with v_to_h(v_pre), which the horizontal stack adds per column;
- horizontal stack: h at (r, c) depends on columns c-kw+1..c of row r of the layer's input h,
  so each layer keeps the current row of its input h, and a step computes one column;
- causal self-attention: a key/value cache per attention layer, LayerNorm and qkv at the new
  position only (`CausalSelfAttention.step`);
- conditioning (the levels above, the class label): `prior.conditioning_terms` once per call.

A step thus costs O(layers * C^2) instead of the reference's O(layers * C^2 * H * W). The
caches are zero-padded windows of the maps the full forward pads with zeros, and all the
math is the modules' own: their convolutions (over a row as convolutions, at one position as
one matrix product each, `pixelcnn.conv_at`: far cheaper per call on a CPU),
`GatedLayer.vertical` and `.horizontal`, `CausalSelfAttention.step` and `OutputHead`, so
there is one source of truth; `tests/test_fast_sampling.py` checks the logits against the
full forward at every position (they differ by rounding only, a few 1e-7 in fp32).
Both samplers draw once per position with `sample_logits`, in raster order, so with the same
generator they give the same codes. Device-agnostic, but on a GPU launch-bound: every kernel of
a step is launched from Python, and every draw waits for the device (`torch.multinomial` checks
the probabilities on the host). `vqvae2.graph_sampling` runs the same math as CUDA graphs.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .draw import SamplingOptions, evaluating, sample_logits
from .pixelcnn import conv_at
from .prior import PixelCNNPrior


def _push_row(window: Tensor, row: Tensor, pad: int) -> None:
    """Roll a window of rows (B, X, kh, pad + W + pad) up by one and write row (B, X, W) last."""
    window[:, :, :-1] = window[:, :, 1:].clone()
    window[:, :, -1, pad:window.shape[3] - pad] = row


def _at_row(term: Tensor | None, r: int, width: int) -> Tensor | None:
    """A conditioning term (B, X, H|1, W|1) on row r as a view (B, X, 1, W)."""
    if term is None:
        return None
    return (term[:, :, r:r + 1] if term.shape[2] > 1 else term).expand(-1, -1, 1, width)


class CachedPrior:
    """One prior evaluated position by position, in raster order, over a batch of n.

    For each row r: `start_row(r)`; then for each column c: `logits(c)` (n, K), the
    prediction for (r, c), and `feed(c, codes)` with the codes (n,) chosen there."""

    def __init__(
        self, prior: PixelCNNPrior, n: int, cond_codes: Sequence[Tensor] | None, labels: Tensor | None
    ) -> None:
        prior.check_inputs(n, cond_codes, labels)
        self.prior = prior
        height, width = prior.shape
        self.width = width
        config, weight = prior.config, prior.embed.weight
        ch, layers = config.channels, len(prior.layers)
        # Every DownConv spans kh rows and pad columns either side; every RightConv kw = kh columns.
        kh = self.kh = config.kernel_size // 2 + 1
        pad = self.pad = config.kernel_size // 2

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(*shape, device=weight.device, dtype=weight.dtype)

        # Per layer (cond_v, cond_h), each (n, 2C, H|1, W|1) or None: fixed for the whole sample.
        self.cond = [
            term.chunk(2, dim=1) if term is not None else (None, None)
            for term in prior.conditioning_terms(cond_codes, labels)
        ]
        self.pos_v, self.pos_h = prior.input.positions(height, width, weight)  # (1, C, H, W) each
        # Windows of the padded maps; the padding is never written, so it stays zero as in forward.
        self.codes_above = zeros(n, config.embed_dim, kh, pad + width + pad)  # embedded codes, rows r-kh..r-1
        self.codes_left = zeros(n, config.embed_dim, kh - 1 + width)  # row r; column j at j + kh - 1
        self.v_rows = [zeros(n, ch, kh, pad + width + pad) for _ in range(layers)]  # input v, rows r-kh+1..r
        self.h_rows = [zeros(n, ch, kh - 1 + width) for _ in range(layers)]  # input h, row r, as codes_left
        hs = ch // config.attention_heads
        self.kv = {  # attention layer -> (keys, values), each (n, nh, H * W, hs)
            int(i): (zeros(n, config.attention_heads, height * width, hs),
                     zeros(n, config.attention_heads, height * width, hs))
            for i in prior.attention
        }
        self.r = -1

    def start_row(self, r: int) -> None:
        """Compute row r of every layer's v (and v_to_h): it needs only the rows above."""
        prior, width, pad = self.prior, self.width, self.pad
        self.r = r
        if r == 0:  # shift_down puts zeros on row 0: v is the positional term alone
            v = self.pos_v[:, :, :1].expand(self.codes_above.shape[0], -1, -1, -1)
        else:
            v = prior.input.v_conv.conv(self.codes_above) + self.pos_v[:, :, r:r + 1]  # (n, C, 1, W)
        self.h_in = (v + self.pos_h[:, :, r:r + 1])[:, :, 0]  # (n, C, W), the input h before shift_right's term
        self.v_to_h = []
        for layer, rows, (cond_v, cond_h) in zip(prior.layers, self.v_rows, self.cond):
            _push_row(rows, v[:, :, 0], pad)
            v, v_to_h = layer.vertical(v, layer.v_conv.conv(rows), _at_row(cond_v, r, width))
            # cond_h is fixed, so it joins v_to_h once per row (the same sum, rounded in another order).
            cond_h = _at_row(cond_h, r, width)
            self.v_to_h.append((v_to_h if cond_h is None else v_to_h + cond_h)[:, :, 0])  # (n, 2C, W)

    def logits(self, c: int) -> Tensor:
        """Logits (n, K) for (r, c), computing each layer's h at (r, c) only."""
        prior, kh = self.prior, self.kh
        h = self.h_in[:, :, c]  # (n, C)
        if c > 0:  # shift_right puts zeros on column 0; else the codes in columns c-kh..c-1
            h = conv_at(prior.input.h_conv.conv, self.codes_left[:, :, c - 1:c - 1 + kh].flatten(1)) + h
        for i, (layer, row, v_to_h) in enumerate(zip(prior.layers, self.h_rows, self.v_to_h)):
            row[:, :, c + kh - 1] = h
            h = layer.horizontal(h, conv_at(layer.h_conv.conv, row[:, :, c:c + kh].flatten(1)), v_to_h[:, :, c], None)
            if i in self.kv:
                h = prior.attention[str(i)].step(h, *self.kv[i], self.r * self.width + c)
        return prior.head(h)

    def feed(self, c: int, codes: Tensor) -> None:
        """The codes (n,) at (r, c): the input of every later position."""
        self.codes_left[:, :, c + self.kh - 1] = self.prior.embed(codes)
        if c == self.width - 1:  # row r is complete: it joins the rows above the next one
            _push_row(self.codes_above, self.codes_left[:, :, self.kh - 1:], self.pad)


def _run_raster(
    prior: PixelCNNPrior,
    n: int,
    cond_codes: Sequence[Tensor] | None,
    labels: Tensor | None,
    choose: Callable[[Tensor, int, int], Tensor],
) -> None:
    """Walk the raster order; choose(logits (n, K), r, c) returns the codes (n,) at (r, c)."""
    with evaluating(prior):
        cache = CachedPrior(prior, n, cond_codes, labels)
        for r in range(prior.shape[0]):
            cache.start_row(r)
            for c in range(prior.shape[1]):
                cache.feed(c, choose(cache.logits(c), r, c))


@torch.no_grad()
def sample_level_fast(
    prior: PixelCNNPrior,
    n: int,
    cond_codes: Sequence[Tensor] | None = None,
    labels: Tensor | None = None,
    options: SamplingOptions = SamplingOptions(),
    generator: torch.Generator | None = None,
) -> Tensor:
    """n code grids (n, H, W) from one prior, one cached step per position: a `LevelSampler`
    with the same draws as `sample_level_reference`."""
    codes = torch.zeros(n, *prior.shape, dtype=torch.long, device=prior.embed.weight.device)

    def draw(logits: Tensor, r: int, c: int) -> Tensor:
        codes[:, r, c] = sample_logits(logits, options, generator)
        return codes[:, r, c]

    _run_raster(prior, n, cond_codes, labels, draw)
    return codes


@torch.no_grad()
def incremental_logits(
    prior: PixelCNNPrior, codes: Tensor, cond_codes: Sequence[Tensor] | None = None, labels: Tensor | None = None
) -> Tensor:
    """Teacher forcing through the cached path: codes (B, H, W) -> logits (B, K, H, W),
    the same as `prior(codes, cond_codes, labels)` in eval mode (up to rounding)."""
    weight = prior.embed.weight
    logits = torch.empty(codes.shape[0], prior.num_codes, *prior.shape, device=weight.device, dtype=weight.dtype)

    def given(step_logits: Tensor, r: int, c: int) -> Tensor:
        logits[:, :, r, c] = step_logits
        return codes[:, r, c]

    _run_raster(prior, codes.shape[0], cond_codes, labels, given)
    return logits
