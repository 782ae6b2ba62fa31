"""Convolutional building blocks of the VQ-VAE-2 encoders and decoders.

Shapes follow the paper's Figure 2a / Appendix A: strided 4x4 convolutions down,
3x3 convolutions and ReLU residual blocks in between, 4x4 transposed convolutions up.
A stride of 2^k means k halvings (or doublings).
"""
from __future__ import annotations

import math

from torch import Tensor, nn


class ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))): the residual unit of the paper's encoders."""

    def __init__(self, channels: int, res_channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, res_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(res_channels, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


def _halvings(stride: int) -> int:
    return int(math.log2(stride))


class Encoder(nn.Module):
    """(B, in, H, W) -> (B, channels, H / stride, W / stride)."""

    def __init__(self, in_channels: int, channels: int, res_blocks: int, res_channels: int, stride: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        widths = [in_channels] + [channels // 2] + [channels] * max(_halvings(stride) - 1, 0)
        for i in range(_halvings(stride)):
            layers += [nn.Conv2d(widths[i], widths[i + 1], 4, stride=2, padding=1), nn.ReLU()]
        last = widths[_halvings(stride)] if stride > 1 else in_channels
        layers.append(nn.Conv2d(last, channels, 3, padding=1))
        layers += [ResBlock(channels, res_channels) for _ in range(res_blocks)]
        layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Upsample(nn.Module):
    """Transposed 4x4 convolutions, each doubling the resolution: in -> out channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, hidden: int | None = None) -> None:
        super().__init__()
        n = _halvings(stride)
        hidden = hidden or out_channels
        layers: list[nn.Module] = []
        for i in range(n):
            src = in_channels if i == 0 else hidden
            dst = out_channels if i == n - 1 else hidden
            layers.append(nn.ConvTranspose2d(src, dst, 4, stride=2, padding=1))
            if i < n - 1:
                layers.append(nn.ReLU())
        if n == 0:
            layers.append(nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """(B, in, h, w) -> (B, out, h * stride, w * stride)."""

    def __init__(
        self, in_channels: int, out_channels: int, channels: int, res_blocks: int, res_channels: int, stride: int
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1),
            *[ResBlock(channels, res_channels) for _ in range(res_blocks)],
            nn.ReLU(),
            Upsample(channels, out_channels, stride, hidden=channels // 2),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
