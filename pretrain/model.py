"""The SwAV network: encoder, projection head, L2-normalised prototypes, optional supervised head."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.backbones import Encoder, EncoderSpec


@dataclass
class SwAVOutput:
    """Per-crop embeddings and prototype scores, plus supervised logits of the global crops."""

    embeddings: list[torch.Tensor]
    scores: list[torch.Tensor]
    supervised: torch.Tensor | None


class SwAVHead(nn.Module):
    """Projection MLP (hidden-BN-ReLU-out) onto the unit sphere, and the prototypes scoring it.

    Separate from the encoder so that finetuning can put the same head on a task model's encoder
    (the hybrid regime: supervised loss plus the SwAV loss on the same batches).
    """

    def __init__(self, feature_dim: int, hidden_dim: int = 2048, out_dim: int = 128, prototypes: int = 3000) -> None:
        super().__init__()
        self.projection = nn.Sequential(
            nn.Linear(feature_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )
        self.prototypes = nn.Linear(out_dim, prototypes, bias=False)

    @torch.no_grad()
    def normalise_prototypes(self) -> None:
        """Project the prototypes back onto the unit sphere (done before every step, as SwAV does)."""
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1, p=2))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = F.normalize(self.projection(features), dim=1, p=2)
        return embeddings, self.prototypes(embeddings)


def encode_crops(encoder: nn.Module, crops: Sequence[torch.Tensor]) -> torch.Tensor:
    """Features of all crops, one encoder pass per run of same-sized crops (as SwAV's reference)."""
    sizes = torch.tensor([crop.shape[-1] for crop in crops])
    counts = torch.unique_consecutive(sizes, return_counts=True)[1]
    features = []
    start = 0
    for count in counts.tolist():
        features.append(encoder(torch.cat(list(crops[start:start + count]))))
        start += count
    return torch.cat(features)


class SwAVModel(nn.Module):
    """Encoder + SwAV head (+ optional supervised head), as SwAV's ``ResNet`` wrapper.

    Crops of one resolution go through the encoder together, which keeps batch norm statistics per
    resolution and the kernels large.
    """

    def __init__(
        self,
        spec: EncoderSpec,
        hidden_dim: int = 2048,
        out_dim: int = 128,
        prototypes: int = 3000,
        supervised_outputs: int = 0,
    ) -> None:
        super().__init__()
        self.encoder = Encoder(spec)
        dim = self.encoder.feature_dim
        self.head = SwAVHead(dim, hidden_dim, out_dim, prototypes)
        self.supervised = nn.Linear(dim, supervised_outputs) if supervised_outputs else None

    @property
    def prototypes(self) -> nn.Linear:
        return self.head.prototypes

    def normalise_prototypes(self) -> None:
        self.head.normalise_prototypes()

    def forward(self, crops: Sequence[torch.Tensor], global_crops: int = 2) -> SwAVOutput:
        feats = encode_crops(self.encoder, crops)
        embeddings, scores = self.head(feats)
        batch = crops[0].shape[0]
        supervised = None
        if self.supervised is not None:
            supervised = self.supervised(feats[: batch * global_crops])
        return SwAVOutput(list(embeddings.split(batch)), list(scores.split(batch)), supervised)
