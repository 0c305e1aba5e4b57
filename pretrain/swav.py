"""SwAV: Sinkhorn-Knopp codes and the swapped-prediction loss, as pure functions plus small modules.

Follows ``distributed_sinkhorn`` and the loss of facebookresearch/swav ``main_swav.py``: the
equipartition constraint holds over the *global* batch, so the sums are all-reduced across DDP
ranks at every iteration (two ranks on halves of a batch assign exactly as one rank on all of it).
Before ``exp(scores / epsilon)`` the *global* maximum (all-reduce MAX) is subtracted: a constant
cancels in the normalisations, so the plan is unchanged, but ``exp`` can no longer overflow. A
per-sample or per-rank maximum would rescale columns or ranks unequally and change the assignments.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    if _world() > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Soft cluster assignments (codes) for ``scores`` (batch x prototypes), each row summing to 1.

    The returned plan times ``1 / batch`` has uniform column marginals ``1 / prototypes`` over the
    global batch and row marginals ``1 / batch`` (exactly after the final column step).
    Computed in float32 whatever the autocast dtype. A prototype or sample whose every score lies
    more than ~87 * epsilon below the global maximum underflows to zero mass instead of NaN.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be batch x prototypes, got shape {tuple(scores.shape)}")
    if epsilon <= 0 or iterations < 1:
        raise ValueError(f"epsilon must be > 0 and iterations >= 1, got {epsilon}, {iterations}")
    scores = scores.float()
    peak = _all_reduce(scores.max().clone(), dist.ReduceOp.MAX)
    plan = torch.exp((scores - peak) / epsilon).t()  # prototypes x batch, as in the reference
    tiny = torch.finfo(plan.dtype).tiny
    batch = plan.shape[1] * _world()
    prototypes = plan.shape[0]
    plan /= _all_reduce(plan.sum()).clamp_min(tiny)
    for _ in range(iterations):
        plan /= _all_reduce(plan.sum(dim=1, keepdim=True)).clamp_min(tiny)
        plan /= prototypes
        plan /= plan.sum(dim=0, keepdim=True).clamp_min(tiny)
        plan /= batch
    plan *= batch
    return plan.t()


def swapped_prediction_loss(
    scores: Sequence[torch.Tensor], codes: Sequence[torch.Tensor], assign_crops: Sequence[int], temperature: float
) -> torch.Tensor:
    """Predict the code of each assignment crop from every other crop's scores (SwAV eq. 1 and 3).

    ``scores[v]`` are crop v's prototype scores (batch x prototypes); ``codes[i]`` the Sinkhorn codes
    of crop ``assign_crops[i]``.
    """
    if len(codes) != len(assign_crops) or len(scores) < 2:
        raise ValueError("need one code per assignment crop and at least two crops")
    log_probs = [F.log_softmax(view_scores.float() / temperature, dim=1) for view_scores in scores]
    total = scores[0].new_zeros(())
    for code, crop in zip(codes, assign_crops, strict=True):
        subloss = scores[0].new_zeros(())
        for view, log_p in enumerate(log_probs):
            if view != crop:
                subloss = subloss - torch.mean(torch.sum(code * log_p, dim=1))
        total = total + subloss / (len(scores) - 1)
    return total / len(assign_crops)


class SwAVLoss(nn.Module):
    """Codes by Sinkhorn (optionally over queued embeddings too) and the swapped-prediction loss."""

    def __init__(
        self,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        assign_crops: Sequence[int] = (0, 1),
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.epsilon = epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.assign_crops = tuple(assign_crops)

    def codes(self, scores: Sequence[torch.Tensor], queue_scores: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Sinkhorn codes for the assignment crops; queued scores join the transport problem only."""
        out = []
        for i, crop in enumerate(self.assign_crops):
            current = scores[crop].detach()
            if queue_scores is not None:
                current = torch.cat([queue_scores[i].detach().to(current.dtype), current])
            out.append(sinkhorn(current, self.epsilon, self.sinkhorn_iterations)[-scores[crop].shape[0]:])
        return out

    def forward(
        self, scores: Sequence[torch.Tensor], queue_scores: Sequence[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        codes = self.codes(scores, queue_scores)
        return swapped_prediction_loss(scores, codes, self.assign_crops, self.temperature), codes


class EmbeddingQueue(nn.Module):
    """SwAV's per-rank queue of past embeddings of the assignment crops (a buffer, so it checkpoints).

    With small batches there are fewer samples than prototypes and the equipartition is too strict;
    queued embeddings, scored against the current prototypes, widen the Sinkhorn problem.
    """

    embeddings: torch.Tensor
    filled: torch.Tensor

    def __init__(self, crops: int, length: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("embeddings", torch.zeros(crops, length, dim))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @property
    def ready(self) -> bool:
        return int(self.filled) >= self.embeddings.shape[1]

    def scores(self, prototypes: torch.Tensor) -> list[torch.Tensor]:
        return [queue @ prototypes.t() for queue in self.embeddings]

    @torch.no_grad()
    def push(self, embeddings: Sequence[torch.Tensor]) -> None:
        """Shift the queue and put the newest embeddings in front (as the reference does)."""
        batch = embeddings[0].shape[0]
        self.embeddings[:, batch:] = self.embeddings[:, :-batch].clone()
        for i, emb in enumerate(embeddings):
            self.embeddings[i, :batch] = emb.detach().to(self.embeddings.dtype)
        self.filled.fill_(min(int(self.filled) + batch, self.embeddings.shape[1]))


def cluster_usage(codes: Sequence[torch.Tensor], prototypes: int) -> tuple[float, float]:
    """Entropy (nats) and perplexity of hard cluster usage over the global batch.

    A perplexity of a few prototypes while the batch is large is the collapse SwAV can fall into.
    """
    counts = torch.zeros(prototypes, device=codes[0].device)
    for code in codes:
        counts += torch.bincount(code.argmax(dim=1), minlength=prototypes).to(counts.dtype)
    counts = _all_reduce(counts)
    p = counts / counts.sum().clamp_min(1)
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    return entropy, float(torch.exp(torch.tensor(entropy)))
