"""Sinkhorn-Knopp and the swapped-prediction loss against SwAV's reference algorithm.

The reference functions below restate facebookresearch/swav ``main_swav.py`` (``distributed_sinkhorn``
on one rank, and the loss loop of ``train``) without the max subtraction our version adds.
"""

from __future__ import annotations

import math
import multiprocessing
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pretrain.swav import EmbeddingQueue, SwAVLoss, cluster_usage, sinkhorn, swapped_prediction_loss


def reference_sinkhorn(out: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    q = torch.exp(out / epsilon).t()
    b, k = q.shape[1], q.shape[0]
    q /= torch.sum(q)
    for _ in range(iterations):
        q /= torch.sum(q, dim=1, keepdim=True)
        q /= k
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


def reference_loss(output: torch.Tensor, batch: int, crops: int, assign: list[int], temperature: float,
                   epsilon: float, iterations: int) -> torch.Tensor:
    loss = torch.zeros(())
    for crop_id in assign:
        with torch.no_grad():
            q = reference_sinkhorn(output[batch * crop_id: batch * (crop_id + 1)].detach(), epsilon, iterations)
        subloss = torch.zeros(())
        for v in [v for v in range(crops) if v != crop_id]:
            x = output[batch * v: batch * (v + 1)] / temperature
            subloss = subloss - torch.mean(torch.sum(q * torch.log_softmax(x, dim=1), dim=1))
        loss = loss + subloss / (crops - 1)
    return loss / len(assign)


def cosine_scores(batch: int, prototypes: int, seed: int, dim: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=1)
    protos = torch.nn.functional.normalize(torch.randn(prototypes, dim, generator=g), dim=1)
    return emb @ protos.t()


@pytest.mark.parametrize("batch,prototypes,seed", [(64, 30, 0), (32, 300, 1), (256, 10, 2)])
def test_sinkhorn_agrees_with_the_reference(batch: int, prototypes: int, seed: int) -> None:
    scores = cosine_scores(batch, prototypes, seed).double()
    ours = sinkhorn(scores, epsilon=0.05, iterations=3)
    ref = reference_sinkhorn(scores.clone(), 0.05, 3)
    # ours runs in float32; the reference here in float64
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-6)


def test_sinkhorn_marginals_match_rows_and_columns() -> None:
    batch, prototypes = 120, 40
    codes = sinkhorn(cosine_scores(batch, prototypes, 3) * 3, epsilon=0.05, iterations=200)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(batch), rtol=0, atol=1e-5)
    torch.testing.assert_close(codes.sum(dim=0), torch.full((prototypes,), batch / prototypes), rtol=2e-3, atol=0)
    assert (codes >= 0).all()


def test_sinkhorn_stays_finite_and_exact_for_large_logits() -> None:
    # exp(8 / 0.05) overflows float32: the reference in float32 breaks, ours (float32) still equals
    # the reference computed in float64, because subtracting the global maximum changes nothing.
    scores = cosine_scores(64, 30, 4) * 8.0
    assert not torch.isfinite(reference_sinkhorn(scores.clone(), 0.05, 3)).all(), "the reference overflows here"
    codes = sinkhorn(scores, epsilon=0.05, iterations=3)
    torch.testing.assert_close(codes.double(), reference_sinkhorn(scores.double(), 0.05, 3), rtol=1e-4, atol=5e-5)
    # a shift of every score by a constant does not change the plan
    torch.testing.assert_close(sinkhorn(scores + 50.0, 0.05, 3), codes, rtol=1e-3, atol=5e-5)


def test_sinkhorn_never_returns_nan_even_when_exp_underflows() -> None:
    # un-normalised features: most entries underflow to zero mass, none become NaN or inf
    codes = sinkhorn(cosine_scores(64, 30, 5) * 1000.0, epsilon=0.05, iterations=3)
    assert torch.isfinite(codes).all() and (codes >= 0).all()
    assert codes.sum() > 0


def test_sinkhorn_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="batch x prototypes"):
        sinkhorn(torch.zeros(3))
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn(torch.zeros(2, 2), epsilon=0)


def test_loss_agrees_with_the_reference_loop() -> None:
    batch, crops, prototypes = 16, 5, 20
    g = torch.Generator().manual_seed(7)
    emb = torch.nn.functional.normalize(torch.randn(batch * crops, 8, generator=g), dim=1)
    protos = torch.nn.functional.normalize(torch.randn(prototypes, 8, generator=g), dim=1)
    output = (emb @ protos.t()).requires_grad_(True)
    ref = reference_loss(output, batch, crops, [0, 1], 0.1, 0.05, 3)
    ref_grad, = torch.autograd.grad(ref, output)
    loss, codes = SwAVLoss(temperature=0.1, epsilon=0.05, sinkhorn_iterations=3)(list(output.split(batch)))
    ours_grad, = torch.autograd.grad(loss, output)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-4, atol=1e-7)
    assert len(codes) == 2


def test_loss_of_perfect_predictions_is_the_code_entropy() -> None:
    scores = [torch.eye(4) * 100.0, torch.eye(4) * 100.0]
    codes = [torch.eye(4), torch.eye(4)]
    assert float(swapped_prediction_loss(scores, codes, [0, 1], 0.1)) == pytest.approx(0.0, abs=1e-6)
    uniform = [torch.zeros(4, 4), torch.zeros(4, 4)]
    assert float(swapped_prediction_loss(uniform, codes, [0, 1], 0.1)) == pytest.approx(math.log(4), rel=1e-6)


def test_queue_widens_the_transport_problem_and_shifts_like_the_reference() -> None:
    queue = EmbeddingQueue(crops=2, length=8, dim=4)
    assert not queue.ready
    first = [torch.ones(4, 4), 2 * torch.ones(4, 4)]
    second = [3 * torch.ones(4, 4), 4 * torch.ones(4, 4)]
    queue.push(first)
    queue.push(second)
    assert queue.ready
    assert torch.equal(queue.embeddings[0, :4], second[0]) and torch.equal(queue.embeddings[0, 4:], first[0])
    assert torch.equal(queue.embeddings[1, :4], second[1]) and torch.equal(queue.embeddings[1, 4:], first[1])
    loss = SwAVLoss()
    scores = [cosine_scores(4, 6, 8), cosine_scores(4, 6, 9)]
    queued = [cosine_scores(8, 6, 10), cosine_scores(8, 6, 11)]
    with_queue = loss.codes(scores, queued)
    expected = reference_sinkhorn(torch.cat([queued[0], scores[0]]), 0.05, 3)[-4:]
    torch.testing.assert_close(with_queue[0], expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(with_queue[0], loss.codes(scores)[0])


def test_cluster_usage_sees_collapse() -> None:
    spread = [torch.eye(8)]
    collapsed = [torch.zeros(8, 8).index_fill_(1, torch.tensor([0]), 1.0)]
    assert cluster_usage(spread, 8)[1] == pytest.approx(8.0, rel=1e-5)
    assert cluster_usage(collapsed, 8)[1] == pytest.approx(1.0, rel=1e-5)


def _rank_main(rank: int, world: int, init_file: str, scores_path: str, out_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    scores = torch.load(scores_path)
    half = scores.shape[0] // world
    codes = sinkhorn(scores[rank * half:(rank + 1) * half], epsilon=0.05, iterations=3)
    torch.save(codes, f"{out_path}.{rank}")
    dist.destroy_process_group()


def test_two_gloo_ranks_on_halves_assign_as_one_rank_on_the_whole(tmp_path: Path) -> None:
    # large logits too: the global maximum must be shared, a per-rank one would change the plan
    scores = cosine_scores(64, 30, 12) * 40.0
    scores[:32] += 3.0  # rank 0's half has the larger maximum
    torch.save(scores, tmp_path / "scores.pt")
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_rank_main, args=(r, 2, str(tmp_path / "init"), str(tmp_path / "scores.pt"),
                                             str(tmp_path / "codes")))
        for r in range(2)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    together = torch.cat([torch.load(tmp_path / f"codes.{r}") for r in range(2)])
    whole = sinkhorn(scores, epsilon=0.05, iterations=3)
    torch.testing.assert_close(together, whole, rtol=1e-5, atol=1e-7)
    # and a rank that normalised on its own would differ
    alone = torch.cat([sinkhorn(scores[:32]), sinkhorn(scores[32:])])
    assert not torch.allclose(alone, whole, atol=1e-3)
