"""Task networks on the shared encoder: a classification head and a U-Net decoder.

Both take the encoder as built by ``pretrain.backbones`` (from scratch or loaded from an export), so
that "pretrained vs scratch" differs only in the encoder's initial weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.backbones import Encoder


class Classifier(nn.Module):
    """Pooled encoder features -> dropout -> one logit per output."""

    def __init__(self, encoder: Encoder, outputs: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(encoder.feature_dim, outputs))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images))


class _UpBlock(nn.Module):
    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels + skip_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([x, skip], dim=1))


class UNet(nn.Module):
    """U-Net whose contracting path is the encoder (stages at strides 4-32), logits at input size."""

    def __init__(self, encoder: Encoder, out_channels: int = 1, width: int = 64) -> None:
        super().__init__()
        self.encoder = encoder
        channels = encoder.stage_channels
        widths = [width * 4, width * 2, width]
        self.up = nn.ModuleList([
            _UpBlock(channels[3], channels[2], widths[0]),
            _UpBlock(widths[0], channels[1], widths[1]),
            _UpBlock(widths[1], channels[0], widths[2]),
        ])
        self.out = nn.Conv2d(widths[2], out_channels, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.encoder.feature_maps(images)
        x = maps[3]
        for block, skip in zip(self.up, (maps[2], maps[1], maps[0]), strict=True):
            x = block(x, skip)
        return F.interpolate(self.out(x), size=images.shape[-2:], mode="bilinear", align_corners=False)
