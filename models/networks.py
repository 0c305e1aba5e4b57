"""Task networks on the shared encoder: a classification head and a U-Net decoder.

Both take the encoder as built by ``pretrain.backbones`` (from scratch or loaded from an export), so
that "pretrained vs scratch" differs only in the encoder's initial weights.

A classifier's head reads the feature map at ``head_stride``. At 32 it is the classic head: the
last stage, average-pooled. A ResNet's last stage is 4x4 at 128 px, so a lesion of 5-10 px (the
phantoms' smallest bleeds and nodules) is a fraction of one feature pixel and is averaged away.
At 16, 8 or 4 the head first runs the U-Net's expanding path down to that stride (the deepest
map upsampled and merged with the shallower stages), scores every location of that finer map,
one logit per output, and pools the scores with log-sum-exp (Wang et al., ChestX-ray8, 2017): a
soft maximum, so that one small positive region can carry the image, while a diffuse finding
(cardiomegaly) still counts everywhere.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.backbones import Encoder

HEAD_STRIDES = (32, 16, 8, 4)
# Log-sum-exp sharpness: 0 would be the mean, infinity the maximum.
LSE_SHARPNESS = 5.0


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


def _expanding_path(encoder: Encoder, steps: int, width: int) -> tuple[nn.ModuleList, int]:
    """``steps`` up-blocks from the last stage towards stride 4 (3 steps reach it), and the width
    of the map they end on."""
    channels = encoder.stage_channels
    widths = [width * 4, width * 2, width]
    blocks, incoming = [], channels[3]
    for step in range(steps):
        blocks.append(_UpBlock(incoming, channels[2 - step], widths[step]))
        incoming = widths[step]
    return nn.ModuleList(blocks), incoming


def _expand(blocks: nn.ModuleList, maps: list[torch.Tensor]) -> torch.Tensor:
    x = maps[3]
    for block, skip in zip(blocks, (maps[2], maps[1], maps[0]), strict=False):
        x = block(x, skip)
    return x


def lse_pool(scores: torch.Tensor, sharpness: float = LSE_SHARPNESS) -> torch.Tensor:
    """(N, K, H, W) -> (N, K): ``log(mean(exp(r * s))) / r`` over the locations."""
    flat = scores.flatten(2)
    return (torch.logsumexp(sharpness * flat, dim=2) - math.log(flat.shape[2])) / sharpness


class Classifier(nn.Module):
    """One logit per output, from the feature map at ``head_stride`` (module docstring)."""

    def __init__(self, encoder: Encoder, outputs: int, dropout: float = 0.2, head_stride: int = 32,
                 width: int = 64) -> None:
        super().__init__()
        if head_stride not in HEAD_STRIDES:
            raise ValueError(f"head_stride must be one of {HEAD_STRIDES}, got {head_stride}")
        self.encoder = encoder
        self.head_stride = head_stride
        if head_stride == 32:
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(encoder.feature_dim, outputs))
        else:
            self.up, channels = _expanding_path(encoder, HEAD_STRIDES.index(head_stride), width)
            self.head = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, outputs, 1))

    def location_scores(self, images: torch.Tensor) -> torch.Tensor:
        """(N, K, H, W) logits per location of the map at ``head_stride`` (a head finer than 32 only)."""
        if self.head_stride == 32:
            raise ValueError("a head at stride 32 pools before it scores: it has no location scores")
        return self.head(_expand(self.up, self.encoder.feature_maps(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.head_stride == 32:
            return self.head(self.encoder(images))
        return lse_pool(self.location_scores(images))


class UNet(nn.Module):
    """U-Net whose contracting path is the encoder (stages at strides 4-32), logits at input size."""

    def __init__(self, encoder: Encoder, out_channels: int = 1, width: int = 64) -> None:
        super().__init__()
        self.encoder = encoder
        self.up, channels = _expanding_path(encoder, 3, width)
        self.out = nn.Conv2d(channels, out_channels, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = _expand(self.up, self.encoder.feature_maps(images))
        return F.interpolate(self.out(x), size=images.shape[-2:], mode="bilinear", align_corners=False)


def task_network(kind: str, encoder: Encoder, outputs: int, head_stride: int = 32) -> nn.Module:
    """The network of a task of ``kind``: a U-Net for segmentation, else a classifier."""
    if kind == "segmentation":
        return UNet(encoder, out_channels=outputs)
    return Classifier(encoder, outputs, head_stride=head_stride)
