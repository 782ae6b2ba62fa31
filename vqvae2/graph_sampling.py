"""Sampling without host work per step: the cached sampler's math on static buffers, captured
once as CUDA graphs and replayed (issue 15).

`vqvae2.fast_sampling` computes one position per step, but each step is hundreds of small
kernels launched one by one from Python: on a GPU the launches, not the weights, set the pace.
Here the same per-position work runs as two fixed steps over preallocated buffers, with no
Python branching on data and no device-to-host sync, so each can be captured once as a
`torch.cuda.CUDAGraph` and replayed with one launch:

- `start_row`: every layer's vertical stack on the new row, and its conditioning on that row
  (made per row: the cached sampler's per-layer maps of the whole grid, 4C channels each, need
  tens of GB at the paper's widths and a batch of 128);
- `step`: every layer's horizontal stack and attention at one position, the head, the draw,
  and the new code written where later positions read it.

Where the step is lives in a device tensor `t` (the raster index) that the step advances
itself, so one graph serves every column and every row: columns are picked by `index_select`
and written by `index_copy_`; row 0 and column 0, where the full forward pads with zeros,
multiply the causal convolution by (r > 0) or (c > 0) instead of branching; attention reads
the whole key/value cache under the mask s <= t instead of a prefix that grows. The draw is
the exponential race `torch.multinomial` itself uses for one sample (`vqvae2.draw.race_draw`),
its noise drawn from the caller's generator inside the graph (registered with the graph, so
each replay advances the generator's philox offset as an uncaptured step would). So, with the
same generator, this sampler draws the same codes as `sample_level_fast` and the reference.

On a CPU (or with capture=False) the very same two steps run eagerly: the tests hold the
eager steps' logits to the full forward's at every position, and, on CUDA, the replayed
graphs' logits to the eager steps'. Intermediate tensors inside a step are still allocated;
under capture they come from the graph's private memory pool, at the same addresses on every
replay. Optional bf16 weights and activations (`dtype`): the logits are cast to fp32 for the draw.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .draw import SamplingOptions, evaluating, race_draw
from .fast_sampling import _push_row
from .pixelcnn import CausalSelfAttention, conv_at
from .prior import PixelCNNPrior


def _attend(attention: CausalSelfAttention, h: Tensor, keys: Tensor, values: Tensor, t: Tensor,
            visible: Tensor) -> Tensor:
    """`CausalSelfAttention.step` with the position t (1,) on the device: k and v join the
    cache (B, nh, T, hs) at t, and q attends to the whole cache under visible (1, 1, 1, T), s <= t."""
    q, k, v = attention.heads_qkv(h[:, None])  # each (B, nh, 1, hs)
    keys.index_copy_(2, t, k)
    values.index_copy_(2, t, v)
    return attention.add_to(h, F.scaled_dot_product_attention(q, keys, values, attn_mask=visible))


class StaticPrior:
    """One prior's sampling state over a batch of n, in buffers allocated once, advanced by two
    steps whose shapes and kernels never change: for each row, `start_row()`, then `step()` once
    per column. Either samples (`codes`, drawn by `options` from `generator`) or, given
    codes (n, H, W), follows them and records the logits of every position (`logits`), the
    teacher forcing the tests compare with the full forward."""

    def __init__(
        self,
        prior: PixelCNNPrior,
        n: int,
        cond_codes: Sequence[Tensor] | None,
        labels: Tensor | None,
        *,
        options: SamplingOptions = SamplingOptions(),
        generator: torch.Generator | None = None,
        given: Tensor | None = None,
    ) -> None:
        prior.check_inputs(n, cond_codes, labels)
        self.prior, self.options, self.generator = prior, options, generator
        height, width = prior.shape
        self.width = width
        config, weight = prior.config, prior.embed.weight
        device, dtype, ch = weight.device, weight.dtype, config.channels
        kh = self.kh = config.kernel_size // 2 + 1  # rows of every DownConv, columns of every RightConv
        pad = self.pad = config.kernel_size // 2

        def zeros(*shape: int, dtype: torch.dtype = dtype) -> Tensor:
            return torch.zeros(*shape, device=device, dtype=dtype)

        # Fixed for the whole sample: the conditioning stack's features (n, cond_ch, H, W) and the
        # class embedding (n, C); each layer's term is made from them one row at a time.
        self.cond, self.class_emb = prior.conditioning_inputs(cond_codes, labels)
        self.pos_v, self.pos_h = prior.input.positions(height, width, weight)  # (1, C, H, W) each
        self.arange_kh = torch.arange(kh, device=device)
        self.raster = torch.arange(height * width, device=device)
        self.t = zeros(1, dtype=torch.long)  # the position the next step computes, r * W + c

        # Windows of the maps the full forward pads with zeros; the padding is never written.
        self.codes_above = zeros(n, config.embed_dim, kh, pad + width + pad)  # embedded codes, rows r-kh..r-1
        self.codes_left = zeros(n, config.embed_dim, kh + width)  # row r; column j at j + kh
        self.v_rows = [zeros(n, ch, kh, pad + width + pad) for _ in prior.layers]  # input v, rows r-kh+1..r
        self.h_rows = [zeros(n, ch, kh - 1 + width) for _ in prior.layers]  # input h, row r; column j at j + kh - 1
        hs = ch // config.attention_heads
        self.kv = {int(i): (zeros(n, config.attention_heads, height * width, hs),
                            zeros(n, config.attention_heads, height * width, hs)) for i in prior.attention}
        # What start_row hands to the steps of its row.
        self.h_in = zeros(n, ch, width)  # the input h before shift_right's term
        self.v_to_h = [zeros(n, 2 * ch, width) for _ in prior.layers]  # v_to_h(v_pre) + cond_h
        # Outputs: the codes in raster order, and with given codes, the logits of every position.
        self.codes = zeros(n, height * width, dtype=torch.long)
        self.given = None if given is None else given.reshape(n, height * width).to(device)
        self.logits = None if given is None else zeros(n, prior.num_codes, height * width, dtype=torch.float32)
        self.noise = zeros(n, prior.num_codes, dtype=torch.float32)

    def reset(self) -> None:
        """Back to the first position, all windows and caches zero, in place (the graphs keep
        the buffers' addresses)."""
        buffers = [self.t, self.codes_above, self.codes_left, self.h_in, self.codes, *self.v_rows, *self.h_rows,
                   *self.v_to_h, *(b for kv in self.kv.values() for b in kv)]
        for buffer in buffers + ([self.logits] if self.logits is not None else []):
            buffer.zero_()

    def start_row(self) -> None:
        """Row r = t // W of every layer's v, v_to_h and conditioning: it needs only the rows above."""
        prior, pad = self.prior, self.pad
        r = torch.div(self.t, self.width, rounding_mode="floor")  # (1,)
        # Row r-1 is complete; at r = 0 this pushes the zeros codes_left starts with.
        _push_row(self.codes_above, self.codes_left[:, :, self.kh:], pad)
        below_top = (r > 0).to(self.pos_v.dtype)  # shift_down puts zeros on row 0
        v = prior.input.v_conv.conv(self.codes_above) * below_top + self.pos_v.index_select(2, r)  # (n, C, 1, W)
        self.h_in.copy_((v + self.pos_h.index_select(2, r))[:, :, 0])
        cond = self.cond.index_select(2, r) if self.cond is not None else None  # (n, cond_ch, 1, W)
        for layer, rows, v_to_h in zip(prior.layers, self.v_rows, self.v_to_h):
            _push_row(rows, v[:, :, 0], pad)
            term = layer.conditioning(cond, self.class_emb)  # (n, 4C, 1, W|1) or None
            cond_v, cond_h = term.chunk(2, dim=1) if term is not None else (None, None)
            v, pre = layer.vertical(v, layer.v_conv.conv(rows), cond_v)
            v_to_h.copy_((pre if cond_h is None else pre + cond_h)[:, :, 0])  # cond_h joins once per row

    def step(self) -> None:
        """Position t: every layer's h there, the logits, the code (drawn or given), then t + 1."""
        prior, kh, t = self.prior, self.kh, self.t
        c = torch.remainder(t, self.width)  # (1,)
        window = c + self.arange_kh  # columns c-kh..c-1 of codes_left, c-kh+1..c of h_rows
        right_of_first = (c > 0).to(self.h_in.dtype)  # shift_right puts zeros on column 0
        h = self.h_in.index_select(2, c)[:, :, 0]  # (n, C)
        left = self.codes_left.index_select(2, window).flatten(1)  # (n, D * kh)
        h = conv_at(prior.input.h_conv.conv, left) * right_of_first + h
        visible = (self.raster <= t).view(1, 1, 1, -1) if self.kv else None
        for i, (layer, row, v_to_h) in enumerate(zip(prior.layers, self.h_rows, self.v_to_h)):
            row.index_copy_(2, c + (kh - 1), h[:, :, None])
            h_conv = conv_at(layer.h_conv.conv, row.index_select(2, window).flatten(1))
            h = layer.horizontal(h, h_conv, v_to_h.index_select(2, c)[:, :, 0], None)
            if i in self.kv:
                h = _attend(prior.attention[str(i)], h, *self.kv[i], t, visible)
        logits = prior.head(h).float()  # (n, K): the draw is in fp32 whatever the weights
        if self.given is None:
            codes = race_draw(self.options.probs(logits), self.noise, self.generator)
        else:
            codes = self.given.index_select(1, t)[:, 0]
            self.logits.index_copy_(2, t, logits[:, :, None])
        self.codes.index_copy_(1, t, codes[:, None])
        self.codes_left.index_copy_(2, c + kh, prior.embed(codes)[:, :, None])
        t.add_(1)


def _captured(static: StaticPrior) -> tuple[Callable[[], None], Callable[[], None]]:
    """static's two steps as CUDA graph replays; static is reset, the generator where it was."""
    device = static.t.device
    generator = static.generator
    rng = generator.get_state() if generator is not None else torch.cuda.get_rng_state(device)
    # Lazy initialisation (cuBLAS handles, kernel choices, the attention backend) must not
    # happen under capture: run both steps first, on a side stream, as the CUDA-graph docs ask.
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            static.start_row()
            static.step()
    torch.cuda.current_stream(device).wait_stream(side)
    row, position = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    if generator is not None:  # the device's default generator is registered with every graph
        position.register_generator_state(generator)
    with torch.cuda.graph(row):
        static.start_row()
    with torch.cuda.graph(position, pool=row.pool()):
        static.step()
    static.reset()  # the warm-up moved t and filled the windows
    if generator is not None:
        generator.set_state(rng)
    else:
        torch.cuda.set_rng_state(rng, device)
    return row.replay, position.replay


def _run(static: StaticPrior, capture: bool) -> None:
    start_row, step = _captured(static) if capture else (static.start_row, static.step)
    height, width = static.prior.shape
    for _ in range(height):
        start_row()
        for _ in range(width):
            step()


def _at_dtype(prior: PixelCNNPrior, dtype: torch.dtype | None) -> PixelCNNPrior:
    """prior itself, or a copy in dtype: the caller's model is never converted."""
    if dtype is None or dtype == prior.embed.weight.dtype:
        return prior
    return copy.deepcopy(prior).to(dtype)


def _capture_default(prior: PixelCNNPrior, capture: bool | None) -> bool:
    on_cuda = prior.embed.weight.device.type == "cuda"
    if capture and not on_cuda:
        raise ValueError("capture=True needs the prior on a CUDA device; leave capture=None to run eagerly elsewhere")
    return on_cuda if capture is None else capture


@torch.no_grad()
def sample_level_graphed(
    prior: PixelCNNPrior,
    n: int,
    cond_codes: Sequence[Tensor] | None = None,
    labels: Tensor | None = None,
    options: SamplingOptions = SamplingOptions(),
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype | None = None,
    capture: bool | None = None,
) -> Tensor:
    """n code grids (n, H, W) from one prior: a `LevelSampler` with the same draws as
    `sample_level_fast`, its per-position work replayed from CUDA graphs on a CUDA device
    (capture=None; False runs the same steps eagerly, as on a CPU). dtype=torch.bfloat16
    samples with a bf16 copy of the prior (fp32 logits for the draw); None keeps the prior's."""
    capture = _capture_default(prior, capture)
    model = _at_dtype(prior, dtype)
    with evaluating(model):
        static = StaticPrior(model, n, cond_codes, labels, options=options, generator=generator)
        _run(static, capture)
    return static.codes.view(n, *prior.shape).clone()


@torch.no_grad()
def static_logits(
    prior: PixelCNNPrior,
    codes: Tensor,
    cond_codes: Sequence[Tensor] | None = None,
    labels: Tensor | None = None,
    *,
    dtype: torch.dtype | None = None,
    capture: bool | None = None,
) -> Tensor:
    """Teacher forcing through the static steps: codes (B, H, W) -> logits (B, K, H, W) in fp32,
    the same as `prior(codes, cond_codes, labels)` in eval mode (up to rounding)."""
    capture = _capture_default(prior, capture)
    model = _at_dtype(prior, dtype)
    n = codes.shape[0]
    with evaluating(model):
        static = StaticPrior(model, n, cond_codes, labels, given=codes)
        _run(static, capture)
    return static.logits.view(n, prior.num_codes, *prior.shape).clone()
