"""Optimisers (LARS, SGD, AdamW) and the warm-up + cosine learning-rate schedule.

The schedule is a pure function of the step, so a resumed run needs only the step to continue on
the same curve. LARS follows SwAV's use of apex ``LARC`` (clip mode): each parameter's step is
scaled by ``eta * ||w|| / ||g||`` (at most 1 relative to the global rate); biases and norm layers
are neither adapted nor decayed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from pretrain.config import OptimConfig


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (clipped), for large-batch SSL."""

    def __init__(
        self, params: Iterable[dict[str, object]], lr: float, momentum: float = 0.9,
        weight_decay: float = 0.0, eta: float = 0.001,
    ) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                                  "eta": eta, "lars": True})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One update for all parameters of a group at once (foreach ops: few kernels on a GPU)."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = list(torch._foreach_add(grads, params, alpha=group["weight_decay"]))
            if group["lars"]:
                w_norms = torch.stack(torch._foreach_norm(params))
                g_norms = torch.stack(torch._foreach_norm(grads))
                trust = torch.clamp(group["eta"] * w_norms / g_norms / group["lr"], max=1.0)
                scale = torch.where((w_norms > 0) & (g_norms > 0), trust, torch.ones_like(trust))
                grads = list(torch._foreach_mul(grads, list(scale.unbind())))
            buffers = []
            for param, grad in zip(params, grads, strict=True):
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffers.append(state["momentum_buffer"])
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, grads)
            torch._foreach_add_(params, buffers, alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module) -> list[dict[str, object]]:
    """Weights (decayed, adapted) apart from biases and normalisation parameters (neither)."""
    decay: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (plain if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay}, {"params": plain, "weight_decay": 0.0, "lars": False}]


def build_optimizer(model: nn.Module, config: OptimConfig, peak_lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model)
    if config.name == "lars":
        return LARS(groups, lr=peak_lr, momentum=config.momentum, weight_decay=config.weight_decay,
                    eta=config.lars_eta)
    for group in groups:
        group.pop("lars", None)
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=peak_lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=peak_lr, weight_decay=config.weight_decay)


def learning_rate(step: int, total_steps: int, peak: float, config: OptimConfig) -> float:
    """Linear warm-up from ``start_warmup_lr`` to ``peak``, then cosine decay to ``final_lr``."""
    if step < config.warmup_steps:
        return config.start_warmup_lr + (peak - config.start_warmup_lr) * step / config.warmup_steps
    span = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.final_lr + 0.5 * (peak - config.final_lr) * (1 + math.cos(math.pi * progress))
