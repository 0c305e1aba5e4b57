"""Encoders: every architecture, strided stems, feature maps for decoders; the collapse watch."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.backbones import Encoder, EncoderSpec
from pretrain.model import SwAVModel
from pretrain.monitor import CollapseWatch


@pytest.mark.parametrize("arch,dims", [
    ("resnet18", [64, 128, 256, 512]), ("resnet50", [256, 512, 1024, 2048]), ("densenet121", [256, 512, 1024, 1024]),
])
def test_each_architecture_gives_four_stages_at_strides_4_to_32(arch: str, dims: list[int]) -> None:
    encoder = Encoder(EncoderSpec(arch=arch, in_channels=3)).eval()
    with torch.no_grad():
        maps = encoder.feature_maps(torch.zeros(1, 3, 64, 64))
        pooled = encoder(torch.zeros(2, 3, 64, 64))
    assert [m.shape[1] for m in maps] == dims
    # stride 4 after the stem: MONAI's unstrided first convolution would leave 32 x 32 here
    assert [m.shape[-1] for m in maps] == [16, 8, 4, 2]
    assert pooled.shape == (2, encoder.feature_dim) and encoder.feature_dim == dims[-1]


def test_swav_model_groups_crops_by_size_and_normalises_prototypes() -> None:
    model = SwAVModel(EncoderSpec(), hidden_dim=32, out_dim=8, prototypes=10, supervised_outputs=2)
    with torch.no_grad():
        model.prototypes.weight.mul_(5)
    model.normalise_prototypes()
    torch.testing.assert_close(model.prototypes.weight.norm(dim=1), torch.ones(10))
    crops = [torch.randn(4, 1, 48, 48)] * 2 + [torch.randn(4, 1, 24, 24)] * 3
    out = model(crops, global_crops=2)
    assert len(out.scores) == 5 and all(s.shape == (4, 10) for s in out.scores)
    torch.testing.assert_close(torch.cat(out.embeddings).norm(dim=1), torch.ones(20))
    assert out.supervised is not None and out.supervised.shape == (8, 2)


def test_collapse_watch_warns_once_per_symptom_after_patience() -> None:
    watch = CollapseWatch(prototypes=100, start_step=10, patience=3)
    stuck = math.log(100)
    assert watch.check(5, stuck, 1.0) == []  # before the start step: frozen prototypes, noisy
    assert watch.check(10, stuck, 50.0) == [] and watch.check(11, stuck, 50.0) == []
    messages = watch.check(12, stuck, 50.0)
    assert any("ln K" in m for m in messages) and not any("prototypes take" in m for m in messages)
    assert watch.check(13, stuck, 50.0) == []  # once
    for step in range(14, 16):
        assert watch.check(step, 2.0, 1.5) == []
    assert any("prototypes take" in m for m in watch.check(16, 2.0, 1.5))
    healthy = CollapseWatch(prototypes=100, start_step=0, patience=2)
    assert all(healthy.check(step, 2.5, 40.0) == [] for step in range(20))
