"""Median triplet: Eq. (2) against hand-computed values and a loop transcription, the Sec. 3.3 probability against
exact fractions, the Table 5 diagnostic, schedules and EMA, and the script end to end (smoke, resume, two processes,
bad input, learning on real images)."""
import math
import os
from fractions import Fraction

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import median_triplet as mt
from conftest import TINY, check_backbone, read_metrics, run, run_resumed

HEADS = ["--proj-hidden", "32", "--proj-dim", "16"]


# ---------------------------------------------------------------- helpers (independent transcriptions)
def _cos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def loop_triplet_loss(p, z, k=None, gamma=2.0, margin=100.0, pos_offset=0):
    """Plain-python transcription of Eq. (2): sort the m negative distances ascending, take the k-th."""
    p, z = p.tolist(), z.tolist()
    total = 0.0
    for i, pi in enumerate(p):
        pos = pos_offset + i
        d_pos = -_cos(pi, z[pos])
        negs = sorted(-_cos(pi, z[j]) for j in range(len(z)) if j != pos)
        kk = len(negs) // 2 if k is None else k
        total += max(gamma * d_pos - negs[kk - 1] + margin, 0.0)
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
    # the selected negative indices
    for k, row in [(1, 3), (2, 1), (3, 2)]:
        _, idx = mt.triplet_loss(p, z, k=k, return_index=True)
        assert idx.tolist() == [row]


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
    loss, idx = mt.triplet_loss(p, z, k=2, return_index=True)
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
    with pytest.raises(ValueError, match="rank k"):
        mt.triplet_loss(torch.randn(4, 3), torch.randn(4, 3), k=4)  # m = 3
    with pytest.raises(ValueError, match="rank k"):
        mt.triplet_loss(torch.randn(4, 3), torch.randn(4, 3), k=0)
    with pytest.raises(ValueError, match="at least one negative"):
        mt.triplet_loss(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="expects"):
        mt.triplet_loss(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="do not fit"):
        mt.triplet_loss(torch.randn(4, 3), torch.randn(6, 3), pos_offset=3)


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
    with pytest.raises(ValueError):
        mt.over_clustering_probability(10, 3, 1.5)


# ---------------------------------------------------------------- Table 5 diagnostic
def test_overclustering_events():
    labels = torch.tensor([0, 1, 0, 2])
    neg_idx = torch.tensor([2, 3, 1, 0])  # anchor 0 picks row 2 (same class 0), the rest differ
    omega, event_b = mt.overclustering_events(neg_idx, labels, labels)
    assert omega.tolist() == [True, False, False, False]
    assert bool(event_b)
    omega, event_b = mt.overclustering_events(torch.tensor([1, 0]), torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert omega.tolist() == [False, False] and not bool(event_b)


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


@pytest.mark.parametrize("m", [0.0, 1.0, 0.9])
def test_ema_update(m):
    online, target = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)), nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
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


def test_views_solarise_only_when_asked():
    img = torchvision.transforms.v2.functional.to_pil_image(torch.rand(3, 32, 32))
    mean_std = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    view = mt.byol_view(32, mean_std, blur_p=1.0, solarize_p=0.0)
    assert view(img).shape == (3, 32, 32)
    names = [type(t).__name__ for t in mt.byol_view(32, mean_std, 0.1, 0.2).transforms]
    assert {"RandomResizedCrop", "RandomHorizontalFlip", "RandomGrayscale", "RandomSolarize"} <= set(names)


# ---------------------------------------------------------------- the script end to end
def test_smoke_writes_metrics_checkpoint_backbone_and_table5(tmp_path):
    out = str(tmp_path / "run")
    run(["median_triplet.py", *TINY, *HEADS, "--epochs", "2", "--output-dir", out])
    metrics = read_metrics(out)
    steps = [m for m in metrics if "loss" in m]
    assert len(steps) == 8 and all(math.isfinite(m["loss"]) for m in steps)
    assert {"loss_12", "loss_21", "lr", "ema_momentum", "images_per_s"} <= set(steps[0])
    assert 0.99 <= steps[0]["ema_momentum"] < steps[-1]["ema_momentum"] <= 1.0  # cosine ramp to 1
    knn = [m for m in metrics if "knn_top1" in m]
    assert [m["epoch"] for m in knn] == [0, 1, 2] and 0 <= knn[-1]["knn_top1"] <= 100
    for m in knn[1:]:  # Table 5 logged with kNN; fake labels are i % 10, so a batch of 8 may or may not hold B
        assert 0 <= m["omega_given_a"] <= 1 and 0 <= m["rank_k_same_label"] <= 1
        assert m["omega_given_a"] <= m["omega_given_b"] <= 1
        assert 1 - 1e-4 <= m["z_erank"] <= 7 + 1e-3  # 8 rows have at most 7 centred directions
    assert os.path.isdir(os.path.join(out, "checkpoint-2")) and os.path.exists(os.path.join(out, "config.json"))
    check_backbone(out, "median_triplet")


def test_resume_equals_uninterrupted(tmp_path):
    args = ["median_triplet.py", *TINY, *HEADS, "--epochs", "2", "--eval-every", "0", "--rank-k", "3"]
    ta, tb = run_resumed(args, tmp_path)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)  # the EMA target


DDP_CHECK = """
import sys
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
import median_triplet as mt

out_dir = sys.argv[1]
accelerator = Accelerator(cpu=True)
rank, world = accelerator.process_index, accelerator.num_processes
cfg = mt.Config(proj_hidden=32, proj_dim=16, rank_k=int(sys.argv[2]))
set_seed(0)
online = mt.Online(cfg, cifar_stem=False)
g = torch.Generator().manual_seed(1)
B = 8
x1, x2 = torch.randn(B, 3, 32, 32, generator=g), torch.randn(B, 3, 32, 32, generator=g)
labels = torch.tensor([0, 1, 0, 2, 3, 1, 4, 5])  # two pairs of one class: event B holds
optimizer = torch.optim.SGD(online.parameters(), lr=0.1, momentum=0.9)
online, optimizer = accelerator.prepare(online, optimizer)
raw = accelerator.unwrap_model(online)
state = mt.MomentumState(raw)
online.eval()  # BatchNorm on running statistics: per-process batch statistics differ by design on CPU
state.target.eval()
local = slice(rank * B // world, (rank + 1) * B // world)
loss, logs = mt.forward_loss(online, state, [x1[local], x2[local]], labels[local], cfg, accelerator)
accelerator.backward(loss)
grads = {n: p.grad.clone() for n, p in raw.named_parameters() if p.grad is not None}
optimizer.step()
mt.ema_update(state.target, torch.nn.Sequential(raw.backbone, raw.projector), 0.9)
torch.save({"loss": accelerator.reduce(loss.detach(), "mean"), "grads": grads, "table5": logs["table5"],
            "target": state.target.state_dict()}, f"{out_dir}/rank{rank}.pt")
"""


@pytest.mark.parametrize("rank_k", [0])  # the median; k = 1 takes the same code path (loop tests cover every k)
def test_two_processes_equal_one(tmp_path, rank_k):
    script = tmp_path / "ddp_check_median_triplet.py"
    script.write_text(DDP_CHECK)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    run([str(script), str(one), str(rank_k)])
    run([str(script), str(two), str(rank_k)], nproc=2)
    a, r0, r1 = (torch.load(p) for p in (one / "rank0.pt", two / "rank0.pt", two / "rank1.pt"))
    assert torch.allclose(a["loss"], r0["loss"], atol=1e-5)
    assert len(a["grads"]) > 0 and not any(k.startswith("target") for k in a["grads"])
    for k in a["grads"]:
        assert torch.allclose(a["grads"][k], r0["grads"][k], atol=1e-6), k
        assert torch.allclose(r0["grads"][k], r1["grads"][k], atol=0), k
    for r in (r0, r1):  # the gathered negatives make the Table 5 counts and the target identical everywhere
        assert torch.equal(a["table5"], r["table5"])
        assert all(torch.allclose(a["target"][k], r["target"][k], atol=1e-6) for k in a["target"])
    assert a["table5"][1].item() == 16 and a["table5"][3].item() == 1 and a["table5"][4].item() == 1


def test_two_process_training_run(tmp_path):
    """The real loop under torchrun: runs, logs, checkpoints."""
    out = str(tmp_path / "ddp")
    run(["median_triplet.py", *TINY, *HEADS, "--epochs", "1", "--output-dir", out], nproc=2)
    assert any("knn_top1" in m and "omega_given_b" in m for m in read_metrics(out))
    assert os.path.exists(os.path.join(out, "backbone.pt"))


@pytest.mark.parametrize("args, message", [
    (["--rank-k", "8"], "--rank-k 8 must lie in [1, batch_size - 1 = 7]"),
    (["--batch-size", "1"], "at least 2 images per batch"),
    (["--crop-min-scale", "0"], "--crop-min-scale must lie in (0, 1]"),
])
def test_bad_input_gives_one_clear_message(args, message):
    p = run(["median_triplet.py", *TINY, *HEADS, "--epochs", "1", *args], check=False)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr
