"""2D encoders (ResNet-18/50, DenseNet-121 from MONAI) with one interface for pretraining and finetuning.

The encoder is what pretraining produces and what every task model reuses, so it exposes both the
pooled feature vector (classification heads, SwAV's projection head) and the per-stage feature maps
(the skip connections of a U-Net decoder for segmentation).

MONAI's ResNet leaves its first convolution unstrided by default, which keeps the first stage at
full resolution and costs 5-7x the compute of the torchvision/paper ResNet; ``conv1_t_stride=2``
restores the standard stem.
"""

from __future__ import annotations

from typing import Literal

import torch
from monai.networks.nets import DenseNet121, ResNet
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

Architecture = Literal["resnet18", "resnet50", "densenet121"]


class EncoderSpec(BaseModel):
    """What an encoder is: the fields a finetuning run checks before loading pretrained weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: Architecture = "resnet18"
    in_channels: int = Field(1, ge=1, le=16)


class Encoder(nn.Module):
    """A backbone as ``stages`` (feature maps at strides 4, 8, 16, 32) plus global average pooling."""

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        self.spec = spec
        self.stem, self.stages, self.stage_channels = _build(spec)
        self.pool = nn.AdaptiveAvgPool2d(1)

    @property
    def feature_dim(self) -> int:
        return self.stage_channels[-1]

    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The output of every stage, shallowest first (for decoders with skip connections)."""
        maps = []
        out = self.stem(images)
        for stage in self.stages:
            out = stage(out)
            maps.append(out)
        return maps

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.feature_maps(images)[-1]), 1)


def _build(spec: EncoderSpec) -> tuple[nn.Module, nn.ModuleList, list[int]]:
    if spec.arch in ("resnet18", "resnet50"):
        block, layers = ("basic", [2, 2, 2, 2]) if spec.arch == "resnet18" else ("bottleneck", [3, 4, 6, 3])
        net = ResNet(
            block, layers, [64, 128, 256, 512], spatial_dims=2, n_input_channels=spec.in_channels,
            conv1_t_stride=2, feed_forward=False,
        )
        stem = nn.Sequential(net.conv1, net.bn1, net.act, net.maxpool)
        expansion = 1 if block == "basic" else 4
        return stem, nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4]), [
            c * expansion for c in (64, 128, 256, 512)
        ]
    dense = DenseNet121(spatial_dims=2, in_channels=spec.in_channels, out_channels=1)
    f: dict[str, nn.Module] = dict(dense.features.named_children())
    stem = nn.Sequential(f["conv0"], f["norm0"], f["relu0"], f["pool0"])
    stages = nn.ModuleList([
        nn.Sequential(f["denseblock1"]),
        nn.Sequential(f["transition1"], f["denseblock2"]),
        nn.Sequential(f["transition2"], f["denseblock3"]),
        nn.Sequential(f["transition3"], f["denseblock4"], f["norm5"], nn.ReLU(inplace=True)),
    ])
    return stem, stages, [256, 512, 1024, 1024]
