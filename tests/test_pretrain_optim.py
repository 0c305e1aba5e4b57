"""LARS against SGD and a hand computation; the warm-up + cosine schedule at its ends."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.config import OptimConfig
from pretrain.optim import LARS, build_optimizer, learning_rate, param_groups


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def _steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int = 4) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss = model(torch.randn(16, 6, generator=g)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_lars_without_adaptation_is_sgd_with_momentum() -> None:
    ours, ref = _model(), _model()
    _steps(ours, LARS([{"params": list(ours.parameters()), "lars": False}], lr=0.1, momentum=0.9, weight_decay=1e-3))
    _steps(ref, torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3))
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_lars_scales_each_layer_by_its_trust_ratio() -> None:
    weight = torch.nn.Parameter(torch.full((2, 2), 3.0))
    weight.grad = torch.full((2, 2), 0.5)
    LARS([{"params": [weight]}], lr=1.0, momentum=0.9, eta=0.01).step()
    trust = 0.01 * 6.0 / 1.0  # eta * ||w|| / ||g|| (clipped at 1, relative to lr 1)
    torch.testing.assert_close(weight.detach(), torch.full((2, 2), 3.0 - trust * 0.5))


def test_biases_and_norms_are_neither_decayed_nor_adapted() -> None:
    groups = param_groups(_model())
    assert all(p.ndim > 1 for p in groups[0]["params"])  # type: ignore[attr-defined]
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["lars"] is False
    for name in ("sgd", "adamw", "lars"):
        assert build_optimizer(_model(), OptimConfig(name=name), 0.1).param_groups[1]["weight_decay"] == 0.0


def test_schedule_warms_up_then_decays_to_the_final_rate() -> None:
    config = OptimConfig(warmup_steps=10, start_warmup_lr=0.0, final_lr=0.001)
    assert learning_rate(0, 100, 1.0, config) == 0.0
    assert learning_rate(5, 100, 1.0, config) == pytest.approx(0.5)
    assert learning_rate(10, 100, 1.0, config) == pytest.approx(1.0)
    assert learning_rate(55, 100, 1.0, config) == pytest.approx(0.001 + 0.5 * 0.999 * (1 + math.cos(math.pi / 2)))
    assert learning_rate(100, 100, 1.0, config) == pytest.approx(0.001)
