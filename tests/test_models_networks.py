"""The classifier head that reads a finer feature map: log-sum-exp pooling against its formula, the
map's resolution at each stride, and a refused stride."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.networks import Classifier, lse_pool
from pretrain.backbones import Encoder, EncoderSpec


def test_lse_pool_is_the_soft_maximum_of_its_formula() -> None:
    scores = torch.randn(3, 2, 5, 7, generator=torch.Generator().manual_seed(0)) * 3
    flat = scores.numpy().reshape(3, 2, -1).astype(np.float64)
    expected = np.log(np.mean(np.exp(5.0 * flat), axis=2)) / 5.0
    assert np.allclose(lse_pool(scores, 5.0).numpy(), expected, atol=1e-5)
    assert torch.all(lse_pool(scores) <= scores.flatten(2).max(dim=2).values + 1e-6)
    assert torch.all(lse_pool(scores) >= scores.flatten(2).mean(dim=2) - 1e-6)
    # One hot location out of 256 keeps most of its score; the mean would dilute it to nothing.
    one = torch.full((1, 1, 16, 16), -4.0)
    one[0, 0, 3, 9] = 4.0
    assert lse_pool(one).item() == pytest.approx(4.0 - math.log(256) / 5.0, abs=0.02)


@pytest.mark.parametrize("stride", [16, 8, 4])
def test_a_finer_head_scores_every_location_of_its_map(stride: int) -> None:
    torch.manual_seed(0)
    network = Classifier(Encoder(EncoderSpec(in_channels=3)), outputs=6, head_stride=stride).eval()
    images = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        scores = network.location_scores(images)
        assert scores.shape == (2, 6, 128 // stride, 128 // stride)
        assert torch.allclose(network(images), lse_pool(scores), atol=1e-6)


def test_the_pooled_head_and_an_unknown_stride() -> None:
    network = Classifier(Encoder(EncoderSpec(in_channels=1)), outputs=2)
    assert network(torch.rand(1, 1, 64, 64)).shape == (1, 2)
    with pytest.raises(ValueError, match="no location scores"):
        network.location_scores(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="head_stride must be one of"):
        Classifier(Encoder(EncoderSpec(in_channels=1)), outputs=2, head_stride=2)
