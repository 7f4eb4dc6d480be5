"""Median triplet: Eq. (2) and the released head (ranks 2..10 averaged) against hand-computed values and a loop
transcription, the Sec. 3.3 probability against exact fractions, the Table 5 diagnostic, schedules and EMA, the views
(no blur at 32 px by default), the paper's defaults, --recipe paper and its schedules, gradient accumulation, and the
script end to end (smoke, resume, two processes, bad input)."""
import copy
import json
import math
import os
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2 as T

import common
import median_triplet as mt
from common import latest_checkpoint
from conftest import (TINY, check_backbone, cli_error, read_metrics, run, run_resumed, two_process_results,
                      two_process_run)
from sync_detector import HostTensors, SyncDetector

HEADS = ["--proj-hidden", "32", "--proj-dim", "16"]


# ---------------------------------------------------------------- helpers (independent transcriptions)
def _cos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def loop_triplet_loss(p, z, k=None, gamma=2.0, margin=100.0, pos_offset=0, k_range=None):
    """Plain-python transcription of Eq. (2): sort the m negative distances ascending, take the k-th (or, for
    k_range = (first, last), the mean of ranks first..last, the released head)."""
    p, z = p.tolist(), z.tolist()
    total = 0.0
    for i, pi in enumerate(p):
        pos = pos_offset + i
        d_pos = -_cos(pi, z[pos])
        negs = sorted(-_cos(pi, z[j]) for j in range(len(z)) if j != pos)
        if k_range is None:
            kk = len(negs) // 2 if k is None else k
            d_neg = negs[kk - 1]
        else:
            chosen = negs[k_range[0] - 1 : k_range[1]]
            d_neg = sum(chosen) / len(chosen)
        total += max(gamma * d_pos - d_neg + margin, 0.0)
    return total / len(p)


def exact_tail(m, k, p):
    """Sec. 3.3 in exact rational arithmetic."""
    return sum(math.comb(m, j) * p**j * (1 - p) ** (m - j) for j in range(k, m + 1))


# ---------------------------------------------------------------- triplet_loss
def test_hand_computed_tiny_case():
    # 2-D unit vectors: anchor p0 = (1, 0); z0 = (1, 0) (positive), z1 = (0, 1), z2 = (-1, 0), z3 = (0.6, 0.8).
    p = torch.tensor([[1.0, 0.0]])
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])
    # d_pos = -1; negative distances: z1 -> 0, z2 -> 1, z3 -> -0.6; sorted: [-0.6, 0, 1]; m = 3.
    # k = 1 (hardest) -> -0.6: loss = 2*(-1) - (-0.6) + 100 = 98.6
    assert mt.triplet_loss(p, z, k=1).item() == pytest.approx(98.6, abs=1e-5)
    # k = None -> m // 2 = 1 -> also the hardest here
    assert mt.triplet_loss(p, z).item() == pytest.approx(98.6, abs=1e-5)
    # k = 2 -> 0: loss = -2 - 0 + 100 = 98;  k = 3 -> 1: loss = -2 - 1 + 100 = 97
    assert mt.triplet_loss(p, z, k=2).item() == pytest.approx(98.0, abs=1e-5)
    assert mt.triplet_loss(p, z, k=3).item() == pytest.approx(97.0, abs=1e-5)
    # gamma = 1, margin = 0.5, k = 1: max(-1 + 0.6 + 0.5, 0) = 0.1; margin = 0.3 -> clipped to 0
    assert mt.triplet_loss(p, z, k=1, gamma=1.0, margin=0.5).item() == pytest.approx(0.1, abs=1e-5)
    assert mt.triplet_loss(p, z, k=1, gamma=1.0, margin=0.3).item() == 0.0
    # the selected negative rows, one per anchor
    for k, row in [(1, 3), (2, 1), (3, 2)]:
        assert mt.negative_index(p, z, k=k).tolist() == [[row]]
    assert mt.negative_index(p, z).tolist() == [[3]]  # the median, m // 2 = 1


def test_released_head_hand_computed():
    # the same 2-D case: sorted negative distances [-0.6 (z3), 0 (z1), 1 (z2)], d_pos = -1
    p = torch.tensor([[1.0, 0.0]])
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])
    # ranks 2..3 averaged: (0 + 1) / 2 = 0.5 -> 2*(-1) - 0.5 + 100 = 97.5
    assert mt.triplet_loss(p, z, k_range=(2, 3)).item() == pytest.approx(97.5, abs=1e-5)
    assert mt.negative_index(p, z, k=1, k_range=(2, 3)).tolist() == [[1, 2]]  # k ignored, as by the loss
    # ranks 1..3: (-0.6 + 0 + 1) / 3 -> -2 - 0.4 / 3 + 100; k is ignored when a range is given
    assert mt.triplet_loss(p, z, k=1, k_range=(1, 3)).item() == pytest.approx(98 - 0.4 / 3, abs=1e-5)
    # a one-rank range is the rank-k loss
    for k in (1, 2, 3):
        assert mt.triplet_loss(p, z, k_range=(k, k)).item() == pytest.approx(mt.triplet_loss(p, z, k=k).item())


def test_released_head_ranks_2_to_10():
    # the released head: the 10 nearest negatives sorted ascending, the first dropped, the other 9 averaged; m = 15
    g = torch.Generator().manual_seed(5)
    p, z = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    dist = -(F.normalize(p, dim=1) @ F.normalize(z, dim=1).T)
    expected = []
    for i in range(16):
        negs = torch.cat([dist[i, :i], dist[i, i + 1 :]]).sort().values
        expected.append(2 * dist[i, i] - negs[1:10].mean() + 100)
    got = mt.triplet_loss(p, z, k_range=(2, 10))
    assert got.item() == pytest.approx(torch.stack(expected).mean().item(), abs=1e-5)
    assert got.item() == pytest.approx(loop_triplet_loss(p, z, k_range=(2, 10)), abs=1e-4)
    # gathered negatives: anchors are rows 4..7 of the batch
    got = mt.triplet_loss(p[:4], z, k_range=(2, 10), pos_offset=4, margin=1.2, gamma=1.0)
    want = loop_triplet_loss(p[:4], z, gamma=1.0, margin=1.2, pos_offset=4, k_range=(2, 10))
    assert got.item() == pytest.approx(want, abs=1e-4)


def test_hand_computed_square_batch_and_scale_invariance():
    # B = 3 anchors with positives on the diagonal; unnormalised inputs (normalisation is inside the loss).
    p = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    z = torch.tensor([[5.0, 0.0], [0.0, 0.5], [-1.0, -1.0]])
    s = 1 / math.sqrt(2)
    # anchor 0: d_pos = -1, negs {d(z1)=0, d(z2)=s}; m = 2, median k = 1 -> 0: 2*(-1) - 0 + 100 = 98
    # anchor 1: d_pos = -1, negs {0, s} -> 0: 98
    # anchor 2: d_pos = +1 (z2 is opposite), negs {-s, -s} -> -s: 2 + s + 100
    expected = (98 + 98 + 102 + s) / 3
    assert mt.triplet_loss(p, z).item() == pytest.approx(expected, abs=1e-5)
    assert mt.triplet_loss(7 * p, 0.1 * z).item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("k", [None, 1, 2, 5, 9, 15])
@pytest.mark.parametrize("gamma,margin", [(2.0, 100.0), (1.0, 0.3), (2.0, 1.2)])
def test_matches_loop(k, gamma, margin):
    g = torch.Generator().manual_seed(0)
    p, z = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    got = mt.triplet_loss(p, z, k=k, gamma=gamma, margin=margin).item()
    assert got == pytest.approx(loop_triplet_loss(p, z, k, gamma, margin), abs=1e-4)  # float32 at ~100


def test_matches_loop_with_gathered_negatives():
    # anchors are rows 5..9 of a global batch of 12 (process 1 of a hypothetical world with local batch 5)
    g = torch.Generator().manual_seed(1)
    p, z = torch.randn(5, 6, generator=g), torch.randn(12, 6, generator=g)
    for k in [None, 1, 4, 11]:
        got = mt.triplet_loss(p, z, k=k, pos_offset=5).item()
        assert got == pytest.approx(loop_triplet_loss(p, z, k, pos_offset=5), abs=1e-4)
    # the local loss is the slice of the global one: mean of per-process means = global mean
    pg = torch.randn(12, 6, generator=g)
    full = mt.triplet_loss(pg, z, k=3)
    parts = [mt.triplet_loss(pg[i : i + 4], z, k=3, pos_offset=i) for i in (0, 4, 8)]
    assert torch.stack(parts).mean().item() == pytest.approx(full.item(), abs=1e-5)


def test_k1_is_hardest_negative_and_median_default():
    g = torch.Generator().manual_seed(2)
    p, z = torch.randn(9, 4, generator=g), torch.randn(9, 4, generator=g)
    dist = -(F.normalize(p, dim=1) @ F.normalize(z, dim=1).T)
    d_pos = dist.diag()
    hardest = dist.masked_fill(torch.eye(9, dtype=torch.bool), float("inf")).min(dim=1).values
    expected = (2 * d_pos - hardest + 100).mean()
    assert mt.triplet_loss(p, z, k=1).item() == pytest.approx(expected.item(), abs=1e-5)
    # default k is m // 2 = 4 with m = 8
    assert mt.triplet_loss(p, z).item() == pytest.approx(mt.triplet_loss(p, z, k=4).item(), abs=1e-6)
    # a larger k selects an easier negative: loss is non-increasing in k (hinge inactive with C = 100)
    losses = [mt.triplet_loss(p, z, k=kk).item() for kk in range(1, 9)]
    assert all(a >= b - 1e-6 for a, b in zip(losses, losses[1:]))


def test_hinge_clips_when_margin_small():
    # collapsed-looking but perfectly separated embeddings: positive at distance -1, all negatives at +1
    p = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    # gamma*d_pos - d_neg = -2 - 1 = -3: clipped for any margin < 3, active (linear) above
    assert mt.triplet_loss(p, z, margin=0.3).item() == 0.0
    assert mt.triplet_loss(p, z, margin=2.9).item() == 0.0
    assert mt.triplet_loss(p, z, margin=100.0).item() == pytest.approx(97.0, abs=1e-5)
    # no gradient through clipped anchors
    pp = p.clone().requires_grad_(True)
    mt.triplet_loss(pp, z, margin=0.3).backward()
    assert torch.all(pp.grad == 0)


def test_gradient_reaches_online_only():
    g = torch.Generator().manual_seed(3)
    p = torch.randn(6, 5, generator=g, requires_grad=True)
    z = torch.randn(6, 5, generator=g, requires_grad=True)  # even if the caller forgets no_grad
    loss = mt.triplet_loss(p, z)
    loss.backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert z.grad is None


def test_gradient_matches_analytic():
    # d/dp of -cos(p, z) for a unit-norm p is -(z_hat - cos * p_hat); check the rank-k selection is what gets grad
    g = torch.Generator().manual_seed(4)
    p = F.normalize(torch.randn(4, 3, generator=g), dim=1).requires_grad_(True)
    z = F.normalize(torch.randn(4, 3, generator=g), dim=1)
    loss, idx = mt.triplet_loss(p, z, k=2), mt.negative_index(p, z, k=2)[:, 0]
    assert not idx.requires_grad
    loss.backward()
    with torch.no_grad():
        grad = torch.zeros_like(p)
        for i in range(4):
            for j, w in [(i, 2.0), (idx[i].item(), -1.0)]:
                c = (p[i] * z[j]).sum()
                grad[i] += w * -(z[j] - c * p[i]) / 4
    assert torch.allclose(p.grad, grad, atol=1e-5)


def test_collapse_is_not_a_minimum():
    # all target projections identical (collapse): d_pos = d_neg = -1 -> 2*(-1) + 1 + 100 = 99;
    # orthogonal, aligned pairs: d_pos = -1, d_neg = 0 -> 98, lower: the rank-k negative term prevents collapse
    collapsed = torch.ones(4, 4)
    spread = torch.eye(4)
    assert mt.triplet_loss(collapsed, collapsed).item() == pytest.approx(99.0, abs=1e-5)
    assert mt.triplet_loss(spread, spread).item() == pytest.approx(98.0, abs=1e-5)


def test_float32_under_half_inputs():
    p, z = torch.randn(8, 4).half(), torch.randn(8, 4).half()
    out = mt.triplet_loss(p, z)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(loop_triplet_loss(p.float(), z.float()), abs=1e-4)


def test_bad_inputs():
    with pytest.raises(AssertionError, match="m = 3"):
        mt.triplet_loss(torch.randn(4, 3), torch.randn(4, 3), k=4)  # m = 3
    with pytest.raises(AssertionError, match="ranks 1 <= 0"):
        mt.triplet_loss(torch.randn(4, 3), torch.randn(4, 3), k=0)
    with pytest.raises(AssertionError, match="m = 0"):  # no negative
        mt.triplet_loss(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(AssertionError, match=r"need \(B, D\), \(N, D\)"):
        mt.triplet_loss(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(AssertionError, match="offset 3"):
        mt.triplet_loss(torch.randn(4, 3), torch.randn(6, 3), pos_offset=3)
    for bad in [(0, 2), (3, 2), (2, 4)]:  # m = 3
        with pytest.raises(AssertionError, match="ranks"):
            mt.triplet_loss(torch.randn(4, 3), torch.randn(4, 3), k_range=bad)


# ---------------------------------------------------------------- Sec. 3.3 Bernoulli model
@pytest.mark.parametrize("m,k", [(104, 52), (104, 5), (104, 1), (103, 51), (10, 3), (255, 127), (5, 5)])
def test_over_clustering_probability_exact(m, k):
    exact = float(exact_tail(m, k, Fraction(1, 1000)))
    assert mt.over_clustering_probability(m, k, 1 / 1000) == pytest.approx(exact, rel=1e-12)


def test_over_clustering_probability_paper_values_do_not_follow():
    # The paper prints 6.53e-121 (k = 52) and 3.03e-94 (k = 5) for m = 104, p = 1/1000; the formula gives:
    exact52 = exact_tail(104, 52, Fraction(1, 1000))
    exact5 = exact_tail(104, 5, Fraction(1, 1000))
    assert float(exact52) == pytest.approx(1.504288336693366e-126, rel=1e-12)
    assert float(exact5) == pytest.approx(8.468543616909583e-08, rel=1e-12)
    assert mt.over_clustering_probability(104, 52, 1e-3) < 6.53e-121 / 1e5
    assert mt.over_clustering_probability(104, 5, 1e-3) > 3.03e-94 * 1e80


def test_over_clustering_probability_limits():
    assert mt.over_clustering_probability(10, 0, 0.3) == 1.0
    assert mt.over_clustering_probability(10, 1, 0.0) == 0.0
    assert mt.over_clustering_probability(10, 10, 1.0) == 1.0
    assert mt.over_clustering_probability(10, 11, 0.5) == 0.0
    # k = 1: 1 - (1-p)^m ; k = m: p^m ; p = 1/2 symmetric
    assert mt.over_clustering_probability(20, 1, 0.1) == pytest.approx(1 - 0.9**20, rel=1e-12)
    assert mt.over_clustering_probability(7, 7, 0.3) == pytest.approx(0.3**7, rel=1e-12)
    assert mt.over_clustering_probability(9, 5, 0.5) == pytest.approx(0.5, rel=1e-12)
    # decreasing in k
    vals = [mt.over_clustering_probability(50, k, 0.05) for k in range(1, 51)]
    assert all(a > b for a, b in zip(vals, vals[1:]))
    with pytest.raises(AssertionError):
        mt.over_clustering_probability(10, 3, 1.5)


# ---------------------------------------------------------------- Table 5 diagnostic
def test_overclustering_events():
    labels = torch.tensor([0, 1, 0, 2])
    neg_idx = torch.tensor([[2], [3], [1], [0]])  # anchor 0 picks row 2 (same class 0), the rest differ
    omega, event_b = mt.overclustering_events(neg_idx, labels, labels)
    assert omega.tolist() == [True, False, False, False]
    assert event_b.dim() == 0 and bool(event_b)
    omega, event_b = mt.overclustering_events(torch.tensor([[1], [0]]), torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert omega.tolist() == [False, False] and not bool(event_b)
    # the released head's averaged negatives (B, R): an anchor counts when any of them has its label
    omega, _ = mt.overclustering_events(torch.tensor([[1, 2], [3, 0], [1, 3]]), labels[:3], labels)
    assert omega.tolist() == [True, False, False]
    # unlabelled images (-1, STL-10's extra split) are never a class: no Omega, no B from them
    unlabelled = torch.tensor([-1, -1, 3, 4])
    omega, event_b = mt.overclustering_events(torch.tensor([[1], [0], [0], [1]]), unlabelled, unlabelled)
    assert omega.tolist() == [False, False, False, False] and not bool(event_b)


# ---------------------------------------------------------------- schedules, EMA, heads, views
def test_target_momentum_schedule():
    assert mt.target_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert mt.target_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert mt.target_momentum(100, 100, 0.99) == pytest.approx(1.0)


def test_lr_schedule_end_points():
    assert mt.lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert mt.lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert mt.lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert mt.lr_at(100, 100, 10, 1.0) == pytest.approx(0.0, abs=1e-12)


def test_paper_recipe_is_section_4():
    """--recipe paper: Sec. 4's protocol; the schedules per optimiser update reach the paper's lr 4.8 at the end of
    the 10 warm-up epochs (0.2953... x 832 x 5 / 256 = 4.8) and 0 at the last update; the target momentum runs from
    0.99 to 1. 100 updates an epoch: 1000 warm-up updates, 20000 in all."""
    cfg = common.parse_config(mt.Config, ["--recipe", "paper"], mt.PAPER)
    assert (cfg.arch, cfg.optimizer, cfg.momentum, cfg.weight_decay, cfg.epochs) == ("resnet50", "lars", 0.9, 1e-6, 200)
    assert (cfg.batch_size, cfg.accumulate, cfg.warmup_epochs, cfg.blur) == (832, 5, 10, "on")  # 104 x 8 GPUs
    assert (cfg.rank_k, cfg.gamma, cfg.margin, cfg.ema_momentum) == (0, 2.0, 100.0, 0.99)  # the small recipe's
    small = common.parse_config(mt.Config, ["--recipe", "small"], mt.PAPER)
    assert (small.optimizer, small.lr, small.batch_size, small.accumulate, small.blur) == ("sgd", 0.06, 256, 1, "auto")
    first, peak, last = (mt.schedules(cfg, s, 100) for s in (0, 1000, 20000))
    assert first["lr"] == pytest.approx(4.8 / 1000) and peak["lr"] == pytest.approx(4.8)
    assert last["lr"] == pytest.approx(0.0, abs=1e-12)
    assert first["ema_momentum"] == pytest.approx(0.99) and last["ema_momentum"] == pytest.approx(1.0)
    # the cosine's half-way point after the warm-up: lr 2.4; the momentum at half the run: 0.995
    assert mt.schedules(cfg, 10500, 100)["lr"] == pytest.approx(2.4)
    assert mt.schedules(cfg, 10000, 100)["ema_momentum"] == pytest.approx(0.995)
    assert mt.view_specs(cfg, 224)[0].blur_p == mt.view_specs(cfg, 32)[0].blur_p == 1.0  # blur at every size


def test_accumulation_is_the_mean_of_per_batch_losses_and_one_ema_move(monkeypatch):
    """--accumulate 5 (Sec. 4's "gradient update interval is five steps"), through Run.accumulate as train() runs it:
    each batch's Eq. (2) uses that batch's own negatives (m = 5 here, not 29); the update applies the MEAN of the five
    batches' gradients once (SGD, first step: p - lr (g + wd p)); the target moves once, after the fifth batch. This
    is not one step on the 5x batch, whose gradient differs (its negatives come from all 30 images)."""
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=5)
    monkeypatch.setattr(mt, "build_backbone", lambda arch, stem: (nn.Sequential(  # a small stand-in for speed
        nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()), 8))
    cfg, online, optimizer, state, _, _ = _tiny_step_setup(accelerator, accumulate=5)
    online.eval()  # BN on running statistics: each batch's gradient does not depend on the other batches
    state.target.eval()
    g = torch.Generator().manual_seed(3)
    batches = [([torch.randn(6, 3, 16, 16, generator=g) for _ in range(2)], torch.arange(6)) for _ in range(5)]
    online0, target0 = copy.deepcopy(online), copy.deepcopy(dict(state.target.named_parameters()))

    def grads_of(views, labels):  # eval-mode BN: the forward changes nothing in online0
        loss, _ = mt.forward_loss(online0, state, views, labels, cfg, accelerator)
        return torch.autograd.grad(loss, list(online0.parameters()))
    per_batch = [grads_of(*b) for b in batches]  # against the target before the window (it moves only at its end)
    mean = [torch.stack(gs).mean(0) for gs in zip(*per_batch)]
    sched, run = {"lr": 0.1, "ema_momentum": 0.9}, SimpleNamespace(accelerator=accelerator)
    for step, (views, labels) in enumerate(batches):
        with common.Run.accumulate(run, step, online):
            mt.train_step(online, state, optimizer, views, labels, cfg, sched, step, accelerator)
        moved = any(not torch.equal(a, b) for a, b in zip(online.parameters(), online0.parameters()))
        target_moved = any(not torch.equal(p, target0[k]) for k, p in state.target.named_parameters())
        assert moved == target_moved == (step == 4), step
    for (name, p), p0, gm in zip(online.named_parameters(), online0.parameters(), mean):
        assert torch.allclose(p.grad, gm, atol=1e-6), name
        assert torch.allclose(p, p0 - 0.1 * (gm + cfg.weight_decay * p0), atol=1e-6), name
    new = dict(nn.Sequential(online.backbone, online.projector).named_parameters())
    for name, t in state.target.named_parameters():  # ONE move: 0.9 t0 + 0.1 online
        assert torch.allclose(t, 0.9 * target0[name] + 0.1 * new[name].detach(), atol=1e-6), name
    big = grads_of([torch.cat([b[0][v] for b in batches]) for v in range(2)], torch.arange(30))
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(big, mean))


@pytest.mark.parametrize("m", [0.0, 1.0, 0.9])
def test_ema_update(m):
    online, target = (nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)) for _ in range(2))
    online(torch.randn(5, 3))  # moves the online running statistics
    before = [p.clone() for p in target.parameters()]
    mt.ema_update(target, online, m)
    for t0, t1, o in zip(before, target.parameters(), online.parameters()):
        assert torch.allclose(t1, m * t0 + (1 - m) * o)
    for bt, bo in zip(target.buffers(), online.buffers()):
        assert torch.equal(bt, bo)


def test_target_is_a_frozen_copy_of_backbone_and_projector():
    online = mt.Online(mt.Config(proj_hidden=8, proj_dim=4), cifar_stem=True)
    state = mt.MomentumState(online)
    assert all(not p.requires_grad for p in state.target.parameters())
    src = nn.Sequential(online.backbone, online.projector).state_dict()
    assert all(torch.equal(v, src[k]) for k, v in state.target.state_dict().items())
    assert online.backbone.conv1.stride == (1, 1) and isinstance(online.backbone.maxpool, nn.Identity)
    assert online(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def _specs(blur, size):
    """(blur p, solarisation p) of view 1 and view 2."""
    return [(v.blur_p, v.solarize_p) for v in mt.view_specs(mt.Config(blur=blur), size)]


def test_views_are_byols_without_blur_at_32px_by_default():
    v1, v2 = mt.view_specs(mt.Config(), 32)
    for v in (v1, v2):  # BYOL's shared part (Interpretation 5)
        assert (v.crop_scale, v.crop_ratio, v.flip_p) == ((0.08, 1.0), (3 / 4, 4 / 3), 0.5)
        assert (v.jitter, v.jitter_p, v.gray_p, v.blur_sigma, v.kernel_size(32)) == ((0.4, 0.4, 0.2, 0.1), 0.8, 0.2,
                                                                                    (0.1, 2.0), 3)
    byol, none = [(1.0, 0.0), (0.1, 0.2)], [(0.0, 0.0), (0.0, 0.2)]  # solarisation 0 / 0.2 at every size
    assert _specs("auto", 32) == _specs("auto", 64) == _specs("off", 96) == none
    assert _specs("on", 32) == _specs("auto", 96) == byol
    assert mt.view_specs(mt.Config(crop_min_scale=0.2), 32)[1].crop_scale == (0.2, 1.0)
    # the workers path: torchvision pipelines, the blur left out when its p is 0, solarisation only in view 2
    img = T.functional.to_pil_image(torch.rand(3, 32, 32))
    for blur, has_blur in (("auto", False), ("on", True)):
        specs = mt.view_specs(mt.Config(blur=blur), 32)
        pipes = [common.torchvision_view(s, 32, ((0.0,) * 3, (1.0,) * 3)) for s in specs]
        assert all(t(img).shape == (3, 32, 32) for t in pipes)
        ops = [[type(op.transforms[0] if isinstance(op, T.RandomApply) else op).__name__ for op in t.transforms]
               for t in pipes]
        assert all(("GaussianBlur" in o) == has_blur for o in ops)
        assert ["RandomSolarize" in o for o in ops] == [False, True]


def test_defaults_are_the_papers():
    cfg = mt.Config()
    assert (cfg.rank_k, cfg.negatives, cfg.gamma, cfg.margin, cfg.epochs) == (0, "rank", 2.0, 100.0, 200)
    assert (cfg.range_first, cfg.range_last, cfg.blur) == (2, 10, "auto")  # ranks: used only with --negatives range
    help_text = " ".join(run(["median_triplet.py", "--help"]).stdout.split())
    assert "0 = the median m // 2, the paper's default (Sec. 3.2) (default: 0)" in help_text


# ---------------------------------------------------------------- the script's own step
def test_train_step_order_and_roles(monkeypatch):
    """median_triplet.train_step, as train() calls it: direction 1 pairs online(view 1) with target(view 2), direction
    2 online(view 2) with target(view 1), positives AND negatives from the target branch as it was before the step;
    the logged terms are a loop transcription of Eq. (2) on those pairs; SGD applies the SCHEDULED lr (not the one
    the optimiser was built with) to every parameter; the target then moves toward the updated online network
    (target <- m target + (1 - m) online, not the reverse)."""
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True)
    cfg = mt.Config(proj_hidden=32, proj_dim=16, rank_k=2, margin=3.0)  # C = 3: never clips, losses near 1
    torch.manual_seed(0)
    online = mt.Online(cfg, cifar_stem=False)
    optimizer = torch.optim.SGD(online.parameters(), lr=0.5)  # the schedule below says 0.1
    state = mt.MomentumState(online)
    with torch.no_grad():  # a target unlike the online network, as after some training
        for p in state.target.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x1, x2, labels = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32), torch.arange(6)
    online_before, target_before = copy.deepcopy(online), copy.deepcopy(state.target)
    with torch.no_grad():  # train-mode BN, as in the step: batch statistics of each view
        p1, p2, z1, z2 = online_before(x1), online_before(x2), target_before(x1), target_before(x2)
    calls, real = [], mt.triplet_loss

    def spy(p, z, *a, **k):
        calls.append((p.detach().clone(), z.detach().clone()))
        return real(p, z, *a, **k)
    monkeypatch.setattr(mt, "triplet_loss", spy)
    m = 0.75
    logs = mt.train_step(online, state, optimizer, [x1, x2], labels, cfg, {"lr": 0.1, "ema_momentum": m}, 0,
                         accelerator)
    (pa, za), (pb, zb) = calls
    assert torch.allclose(pa, p1, atol=1e-5) and torch.allclose(za, z2, atol=1e-5)  # online(view 1), target(view 2)
    assert torch.allclose(pb, p2, atol=1e-5) and torch.allclose(zb, z1, atol=1e-5)  # online(view 2), target(view 1)
    l12, l21 = loop_triplet_loss(p1, z2, k=2, margin=3.0), loop_triplet_loss(p2, z1, k=2, margin=3.0)
    assert logs["loss_12"].item() == pytest.approx(l12, abs=1e-5)
    assert logs["loss_21"].item() == pytest.approx(l21, abs=1e-5)
    assert logs["loss"].item() == pytest.approx(l12 + l21, abs=1e-5)
    assert optimizer.param_groups[0]["lr"] == 0.1
    for (name, p), p0 in zip(online.named_parameters(), online_before.parameters()):  # plain SGD: p - lr * grad
        assert p.grad is not None and torch.allclose(p, p0 - 0.1 * p.grad, atol=1e-6), name
    assert any(not torch.equal(a, b) for a, b in zip(online.parameters(), online_before.parameters()))  # SGD moved it
    moved = dict(nn.Sequential(online.backbone, online.projector).named_parameters())
    before = dict(target_before.named_parameters())
    for name, p in state.target.named_parameters():
        assert torch.allclose(p, m * before[name] + (1 - m) * moved[name].detach(), atol=1e-6), name


def _tiny_step_setup(accelerator, **flags):
    """The script's own setup() with tiny heads -> (online, optimizer, state, views, labels); labels 0 1 0 2 3 4:
    event B holds."""
    torch.manual_seed(0)
    cfg = mt.Config(proj_hidden=32, proj_dim=16, **flags)
    online, optimizer, state = mt.setup(cfg, SimpleNamespace(cifar_stem=False), accelerator)
    return cfg, online, optimizer, state, [torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)], \
        torch.tensor([0, 1, 0, 2, 3, 4])


SCHED = {"lr": 0.1, "ema_momentum": 0.99}


@pytest.mark.parametrize("flags", [{}, {"rank_k": 1}, {"negatives": "range", "range_first": 2, "range_last": 4}],
                         ids=["median", "rank-k-1", "range"])
def test_train_step_has_no_host_sync(flags):
    """No op in the step that makes the host wait for the device on CUDA (tests/sync_detector.py), on any step:
    steps 0 and 2 are those a --log-every of 2 used to measure the effective rank (an SVD) on. Table 5's counts
    come back as named device tensors, the gathered target projections for the epoch-end effective rank."""
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True)
    cfg, online, optimizer, state, views, labels = _tiny_step_setup(accelerator, log_every=2, **flags)
    with SyncDetector() as syncs, HostTensors() as host:
        logs = [mt.train_step(online, state, optimizer, views, labels, cfg, SCHED, s, accelerator) for s in range(3)]
    assert syncs.ops == [] and host.calls == [], (syncs.ops, host.calls)
    assert all(v.dim() == 0 and v.dtype == torch.long for v in logs[0]["table5"].values())
    table5 = {k: v.item() for k, v in logs[0]["table5"].items()}
    assert table5.keys() == {"same_label", "labelled", "omega", "event_b", "batches"}
    assert (table5["labelled"], table5["event_b"], table5["batches"]) == (12, 1, 1)
    assert table5["omega"] == int(table5["same_label"] > 0) and 0 <= table5["same_label"] <= 12
    assert logs[0]["target_z1"].shape == (6, 16) and not logs[0]["target_z1"].requires_grad
    assert {k: v.dim() for k, v in logs[0].items() if k not in ("table5", "target_z1")} == {
        "loss": 0, "loss_12": 0, "loss_21": 0}


def test_epoch_diagnostics_sync_once_at_the_epoch_end():
    """The epoch end is where the host waits: exactly the SVD of the effective rank and the single read-back of the
    counts (.tolist()) are seen there; the figures are Table 5's ratios."""
    table5 = {"same_label": torch.tensor(3), "labelled": torch.tensor(24), "omega": torch.tensor(1),
              "event_b": torch.tensor(2), "batches": torch.tensor(4)}
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])  # two equal singular values: rank 2
    with SyncDetector() as syncs:
        out = mt.epoch_diagnostics(table5, z)
    assert syncs.ops == ["_linalg_svd", "tolist"]
    assert out == pytest.approx({"omega_given_a": 0.25, "omega_given_b": 0.5, "rank_k_same_label": 0.125,
                                 "z_erank": 2.0})


@pytest.mark.parametrize("skipped", [True, False])
def test_skipped_optimizer_step_leaves_the_target(skipped):
    """fp16: when GradScaler skips the optimiser step (inf gradients) the EMA target must not move; a stand-in
    Accelerator reports the skip (Accelerate computes it on the host inside optimizer.step under fp16)."""
    from accelerate import Accelerator
    stand_in = type("SkipReporting", (Accelerator,), {"optimizer_step_was_skipped": property(lambda self: skipped)})
    accelerator = stand_in(cpu=True)
    cfg, online, optimizer, state, views, labels = _tiny_step_setup(accelerator)
    before = copy.deepcopy(dict(state.target.named_parameters()))  # BN statistics move in the target's forward
    mt.train_step(online, state, optimizer, views, labels, cfg, {"lr": 0.1, "ema_momentum": 0.5}, 0, accelerator)
    after = dict(state.target.named_parameters())
    if skipped:
        assert all(torch.equal(before[k], after[k]) for k in before)
    else:
        assert any(not torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------- two processes equal one
def ddp_case(accelerator, negatives):
    """One train_step (setup() and train_step(), as train() runs them) on a fixed global batch of 8, this process
    taking its rows; --negatives rank: the median, range: ranks 2..5. BatchNorm in eval mode (running statistics):
    per-process batch statistics differ by design on CPU, where SyncBatchNorm is not used. The script does not clip
    gradients, so the raw gradients are those SGD applies."""
    from accelerate.utils import set_seed
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(0)
    cfg = mt.Config(proj_hidden=32, proj_dim=16, negatives=negatives, range_first=2, range_last=5)
    online, optimizer, state = mt.setup(cfg, SimpleNamespace(cifar_stem=False), accelerator)
    online.eval()
    state.target.eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a target unlike the online network, the same on every process
        for p in state.target.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    x1, x2 = torch.randn(8, 3, 32, 32, generator=g), torch.randn(8, 3, 32, 32, generator=g)
    labels = torch.tensor([0, 1, 0, 2, 3, 1, 4, 5])  # two pairs of one class: event B holds
    rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
    logs = mt.train_step(online, state, optimizer, [x1[rows], x2[rows]], labels[rows], cfg,
                         {"lr": 0.1, "ema_momentum": 0.9}, 0, accelerator)
    raw = accelerator.unwrap_model(online)
    return {**{k: accelerator.reduce(logs[k], "mean") for k in ("loss", "loss_12", "loss_21")},
            "grads": {n: p.grad.clone() for n, p in raw.named_parameters() if p.grad is not None},
            "online": copy.deepcopy(raw.state_dict()), "target": copy.deepcopy(state.target.state_dict()),
            "table5": logs["table5"], "target_z1": logs["target_z1"]}


# the median (every k takes the same code path; loop tests cover every k) and the released head (ranks 2..5 of m = 7)
@pytest.mark.parametrize("negatives", ["rank", "range"])
def test_two_processes_equal_one(tmp_path, negatives):
    """Loss, gradients, the online network after SGD, the EMA target, the gathered target projections and Table 5's
    counts: rank 0 and rank 1 both equal the single process on the same global batch."""
    a, ranks = two_process_results("median_triplet", tmp_path, negatives)
    params = [k for k in a["online"] if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert sorted(a["grads"]) == sorted(params)  # every online parameter, nothing of the target
    for r in ranks:
        for key in ("loss", "loss_12", "loss_21"):
            assert torch.allclose(a[key], r[key], atol=1e-5), key
        for k in a["grads"]:
            assert torch.allclose(a["grads"][k], r["grads"][k], atol=1e-6), k
        for part in ("online", "target"):
            assert all(torch.allclose(a[part][k], r[part][k], atol=1e-6) for k in a[part]), part
        assert torch.allclose(a["target_z1"], r["target_z1"], atol=1e-6)
        assert all(torch.equal(a["table5"][k], r["table5"][k]) for k in a["table5"])
    for k in a["grads"]:  # DDP's all-reduce: the same gradients on both ranks, bit for bit
        assert torch.equal(ranks[0]["grads"][k], ranks[1]["grads"][k]), k
    assert [a["table5"][k].item() for k in ("labelled", "event_b", "batches")] == [16, 1, 1]


# ---------------------------------------------------------------- the script end to end
def test_smoke_writes_metrics_checkpoint_backbone_and_table5(tmp_path):
    out = str(tmp_path / "run")
    run(["median_triplet.py", *TINY, *HEADS, "--epochs", "2", "--output-dir", out])
    metrics = read_metrics(out)
    steps = [m for m in metrics if "loss" in m]
    assert len(steps) == 8 and all(math.isfinite(m["loss"]) for m in steps)
    assert {"loss", "loss_12", "loss_21", "lr", "ema_momentum", "images_per_s"} <= set(steps[0])
    assert 0.99 <= steps[0]["ema_momentum"] < steps[-1]["ema_momentum"] <= 1.0  # cosine ramp to 1
    knn = [m for m in metrics if "knn_top1" in m]
    assert [m["epoch"] for m in knn] == [0, 1, 2] and 0 <= knn[-1]["knn_top1"] <= 100
    table5 = [m for m in metrics if "omega_given_a" in m]
    assert [(m["epoch"], m["step"]) for m in table5] == [(1, 4), (2, 8)]  # every epoch
    for m in table5:  # fake labels are i % 10, so a batch of 8 may or may not hold B
        assert 0 <= m["omega_given_a"] <= m["omega_given_b"] <= 1 and 0 <= m["rank_k_same_label"] <= 1
        assert 1 - 1e-4 <= m["z_erank"] <= 7 + 1e-3  # 8 rows have at most 7 centred directions
    assert set(metrics[-1]) == {"wall_time_s", "peak_memory_mb"}
    assert latest_checkpoint(out).endswith("checkpoint-8") and os.path.exists(os.path.join(out, "config.json"))
    check_backbone(out, "median_triplet")


def test_views_on_device_run(tmp_path):
    """--views-on device (batched views on the training device; the CPU here), with BYOL's blur and solarisation."""
    out = str(tmp_path / "run")
    run(["median_triplet.py", *TINY, *HEADS, "--epochs", "1", "--eval-every", "0", "--views-on", "device",
         "--blur", "on", "--output-dir", out])
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["views_on"] == "device"
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
    assert all(math.isfinite(m["loss"]) for m in metrics if "loss" in m)
    assert any("rank_k_same_label" in m for m in metrics) and os.path.exists(os.path.join(out, "backbone.pt"))


def test_resume_equals_uninterrupted(tmp_path):
    args = ["median_triplet.py", *TINY, *HEADS, "--epochs", "2", "--eval-every", "0", "--rank-k", "3"]
    ta, tb = run_resumed(args, tmp_path)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)  # the EMA target


def test_two_process_training_run(tmp_path_factory):
    """The real loop on 2 CPU processes (conftest.TWO_PROCESS_RUNS): runs, logs, checkpoints."""
    out = two_process_run("median_triplet", tmp_path_factory)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["provenance"]["num_processes"] == 2  # really distributed, 4 images per process
    metrics = read_metrics(out)
    assert any("knn_top1" in m for m in metrics) and any("omega_given_b" in m for m in metrics)
    assert os.path.exists(os.path.join(out, "backbone.pt"))


# ---------------------------------------------------------------- bad input
BAD = [
    (["--batch-size", "1"], "--batch-size 1: the triplet loss needs at least 2 images per batch"),
    (["--rank-k", "8"], "--rank-k 8 must lie in [1, batch_size - 1 = 7]"),
    (["--rank-k", "-1"], "--rank-k -1 must lie in [1, batch_size - 1 = 7]"),
    (["--negatives", "range"], "--range-last 10 must satisfy 1 <= first <= last <= batch_size - 1 = 7"),
    (["--range-first", "0"], "--range-first 0 and --range-last 10 must satisfy 1 <= first <= last"),
    (["--range-first", "6", "--range-last", "5"], "--range-first 6 and --range-last 5 must satisfy"),
    (["--proj-hidden", "0"], "--proj-hidden must be at least 1"),
    (["--proj-dim", "0"], "--proj-dim must be at least 1"),
    (["--ema-momentum", "1.5"], "--ema-momentum must lie in [0, 1]"),
    (["--ema-momentum", "-0.1"], "--ema-momentum must lie in [0, 1]"),
    (["--gamma", "0"], "--gamma must be positive"),
    (["--margin", "-1"], "--margin must be 0 or more"),
    (["--crop-min-scale", "0"], "--crop-min-scale must lie in (0, 1]"),
    (["--crop-min-scale", "1.5"], "--crop-min-scale must lie in (0, 1]"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_flag_is_one_error_line(args, message, capsys):
    """Each method flag's domain: exit code 2, one `error:` line naming the flag, no traceback (the command line run
    in this process, as `python median_triplet.py ...` would run it)."""
    code, lines = cli_error("median_triplet.py", [*TINY, *HEADS, "--epochs", "1", *args], capsys)
    assert code == 2 and [line for line in lines if line.startswith("error:")] == [lines[-1]]
    assert message in lines[-1] and not any("Traceback" in line for line in lines), lines[-3:]
