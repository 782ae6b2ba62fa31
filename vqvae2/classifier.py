"""A small ResNet (He et al. 2016) image classifier.

VQ-VAE-2 needs one to judge samples for classifier-based rejection sampling (Sec. 4.1);
the pipeline trains a second, independent one whose penultimate features serve as
the offline FID feature space when Inception weights are not available.
"""
from __future__ import annotations

from torch import Tensor, nn

from .config import ClassifierConfig


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        return (self.net(x) + self.shortcut(x)).relu()


class ResNetClassifier(nn.Module):
    def __init__(self, config: ClassifierConfig, in_channels: int, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, the dataset has {num_classes}")
        self.config, self.in_channels, self.num_classes = config, in_channels, num_classes
        widths = config.widths
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        blocks: list[nn.Module] = []
        prev = widths[0]
        for stage, width in enumerate(widths):
            for b in range(config.blocks_per_stage):
                blocks.append(BasicBlock(prev, width, stride=2 if stage > 0 and b == 0 else 1))
                prev = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(config.dropout)
        self.fc = nn.Linear(prev, num_classes)

    @property
    def feature_dim(self) -> int:
        return self.fc.in_features

    def features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) in [0, 1] -> penultimate features (B, feature_dim)."""
        return self.pool(self.blocks(self.stem(x * 2 - 1))).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) in [0, 1] -> class logits (B, num_classes)."""
        return self.fc(self.dropout(self.features(x)))
