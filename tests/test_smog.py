"""SMoG: the three public functions (Eqs. 3-4) against hand-computed values and loop transcriptions, limits, where
gradient flows and where it must not; beta schedule, k-means, the periodic resets, the views; the script's own
train_step (order and roles, no host synchronisation, the fp16 skipped step); and the script end to end (smoke,
resume, two processes equal one and stay bit-identical, bad input, views on the device, no collapse on real
images)."""
import copy
import json
import math
import os
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torchvision.transforms import v2 as T

import common
import smog
from common import latest_checkpoint
from conftest import TINY, check_backbone, read_metrics, run, run_resumed, two_process_results, two_process_run
from sync_detector import HostTensors, SyncDetector

HEADS = ["--proj-hidden", "32", "--proj-dim", "16", "--num-groups", "8", "--reset-every", "3"]


def _unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


# ----------------------------------------------------------------------------- assign_groups


def test_assign_groups_hand_case():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.1], [5.0, 4.0]])
    groups = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # closest group by cosine, NOT the printed argmin (a typo of Eq. 4); [5, 4] is nearer [1, 0] than [0, 1]
    assert smog.assign_groups(z, groups).tolist() == [0, 1, 2, 0]


def test_assign_groups_is_scale_invariant_and_no_grad():
    torch.manual_seed(0)
    z = torch.randn(16, 8, requires_grad=True)
    groups = torch.randn(5, 8)
    a = smog.assign_groups(z, groups)
    assert a.dtype == torch.int64 and a.shape == (16,) and not a.requires_grad
    assert torch.equal(a, smog.assign_groups(3.0 * z.detach(), 0.5 * groups))


def test_assign_groups_matches_loop():
    torch.manual_seed(1)
    z, groups = torch.randn(12, 6), torch.randn(7, 6)
    a = smog.assign_groups(z, groups)
    for i in range(12):
        sims = [_dot(_unit(z[i].tolist()), _unit(groups[k].tolist())) for k in range(7)]
        assert a[i].item() == max(range(7), key=lambda k: sims[k])


# ----------------------------------------------------------------------------- update_groups


def test_update_groups_hand_case():
    groups = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([[0.6, 0.8], [0.0, 3.0]])  # unit rows after normalisation: [0.6, 0.8], [0, 1]
    assign = torch.tensor([0, 0])
    new = smog.update_groups(groups, z, assign, beta=0.5)
    # mean = [0.3, 0.9]; 0.5*[1, 0] + 0.5*[0.3, 0.9] = [0.65, 0.45]; / sqrt(0.625)
    n = math.sqrt(0.65**2 + 0.45**2)
    assert new[0].tolist() == pytest.approx([0.65 / n, 0.45 / n], abs=1e-6)
    assert torch.equal(new[1], groups[1])  # empty group unchanged


def test_update_groups_matches_loop():
    torch.manual_seed(2)
    K, B, D = 6, 20, 5
    groups = F.normalize(torch.randn(K, D), dim=1)
    z = torch.randn(B, D)
    assign = torch.randint(0, K - 1, (B,))  # group K-1 stays empty
    beta = 0.9
    new, counts = smog.update_groups(groups, z, assign, beta), smog.group_counts(assign, K)
    for k in range(K):
        rows = [_unit(z[i].tolist()) for i in range(B) if assign[i].item() == k]
        assert counts[k].item() == len(rows)
        if not rows:
            assert new[k].tolist() == pytest.approx(groups[k].tolist(), abs=0)
            continue
        mean = [sum(r[d] for r in rows) / len(rows) for d in range(D)]
        expect = _unit([beta * groups[k, d].item() + (1 - beta) * mean[d] for d in range(D)])
        assert new[k].tolist() == pytest.approx(expect, abs=1e-5)


def test_update_groups_limits_and_per_group_beta():
    torch.manual_seed(3)
    groups = F.normalize(torch.randn(4, 3), dim=1)
    z = torch.randn(10, 3)
    assign = smog.assign_groups(z, groups)
    # beta = 1 freezes the groups; beta = 0 adopts the normalised mean of the assigned features ("adopt latest")
    assert torch.allclose(smog.update_groups(groups, z, assign, 1.0), groups, atol=1e-6)
    latest = smog.update_groups(groups, z, assign, 0.0)
    for k in assign.unique().tolist():
        mean = F.normalize(z[assign == k], dim=1).mean(0)
        assert torch.allclose(latest[k], F.normalize(mean, dim=0), atol=1e-6)
    # a (K,) beta applies per group
    betas = torch.tensor([1.0, 0.0, 1.0, 0.0])
    mixed = smog.update_groups(groups, z, assign, betas)
    for k in range(4):
        ref = groups[k] if betas[k] == 1 or (assign == k).sum() == 0 else latest[k]
        assert torch.allclose(mixed[k], ref, atol=1e-6)


def test_update_groups_gradient_reaches_features_only():
    torch.manual_seed(4)
    groups = F.normalize(torch.randn(5, 4), dim=1).requires_grad_()
    z = torch.randn(12, 4, requires_grad=True)
    assign = smog.assign_groups(z, groups)
    new = smog.update_groups(groups, z, assign, 0.5)
    assert new.requires_grad
    new.pow(3).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert groups.grad is None  # the old groups are constants (state, not parameters)
    # a detached z gives groups without gradient
    assert not smog.update_groups(groups, z.detach(), assign, 0.5).requires_grad


def test_update_groups_float32_from_half():
    groups = F.normalize(torch.randn(3, 4), dim=1)
    z = torch.randn(6, 4).half()
    new = smog.update_groups(groups, z, smog.assign_groups(z, groups), 0.99)
    assert new.dtype == torch.float32


# ----------------------------------------------------------------------------- smog_loss


def test_smog_loss_hand_case():
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    groups = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 1.0]])
    target = torch.tensor([1, 0])
    tau = 0.5
    total = 0.0
    for pi, t in zip(p.tolist(), target.tolist()):
        s = [_dot(_unit(pi), _unit(g)) / tau for g in groups.tolist()]
        total += -(s[t] - math.log(sum(math.exp(x) for x in s)))
    assert smog.smog_loss(p, groups, target, tau).item() == pytest.approx(total / 2, abs=1e-6)


def test_smog_loss_matches_loop():
    torch.manual_seed(5)
    p, groups, target = torch.randn(9, 7), torch.randn(11, 7), torch.randint(0, 11, (9,))
    tau = 0.1
    total = 0.0
    for i in range(9):
        s = [_dot(_unit(p[i].tolist()), _unit(groups[k].tolist())) / tau for k in range(11)]
        m = max(s)
        total += -(s[target[i]] - m - math.log(sum(math.exp(x - m) for x in s)))
    assert smog.smog_loss(p, groups, target, tau).item() == pytest.approx(total / 9, rel=1e-5)


def test_smog_loss_limits():
    # identical groups: uniform logits give log K
    K = 8
    groups = torch.ones(K, 3)
    p = torch.randn(4, 3)
    assert smog.smog_loss(p, groups, torch.zeros(4, dtype=torch.long)).item() == pytest.approx(math.log(K), abs=1e-5)
    # prediction on its (orthonormal) target group with a sharp tau: loss -> 0; on another one: large
    groups = torch.eye(4)
    assert smog.smog_loss(torch.eye(4), groups, torch.arange(4), tau=0.01).item() < 1e-6
    assert smog.smog_loss(torch.eye(4), groups, torch.arange(4).roll(1), tau=0.01).item() > 50


def test_smog_loss_float32_and_scale_invariant():
    torch.manual_seed(6)
    p, groups, target = torch.randn(5, 4), torch.randn(6, 4), torch.randint(0, 6, (5,))
    ref = smog.smog_loss(p, groups, target)
    out = smog.smog_loss(7 * p.half(), 0.3 * groups.half(), target)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(ref.item(), abs=2e-2)  # half inputs, float32 math


def test_gradient_flows_through_groups_to_online_features():
    """The "synchronous" point (Sec. 3.2, Fig. 3): the loss reaches the online features through the updated groups,
    in addition to the prediction path; detaching the groups (the authors' released code, --detach-groups) cuts
    that path."""
    torch.manual_seed(7)
    groups = F.normalize(torch.randn(6, 4), dim=1)
    z = torch.randn(10, 4, requires_grad=True)  # online instance features (projection output)
    p = torch.randn(10, 4)  # predictions held constant, so the only path to z goes through the groups
    target = torch.randint(0, 6, (10,))
    new = smog.update_groups(groups, z, smog.assign_groups(z, groups), 0.5)
    smog.smog_loss(p, new, target).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    z.grad = None
    loss = smog.smog_loss(p, new.detach(), target)
    assert not loss.requires_grad


# ----------------------------------------------------------------------------- beta schedule and spherical k-means


def test_beta_schedule_end_points():
    assert smog.beta_schedule(0, 100) == 1.0
    assert smog.beta_schedule(99, 100) == pytest.approx(0.99)
    assert smog.beta_schedule(49, 99) == pytest.approx(0.995)
    assert smog.beta_schedule(0, 100, end=0.9, kind="fixed") == 0.9
    assert smog.beta_schedule(99, 100, end=0.9, kind="fixed") == 0.9


def test_spherical_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4, 16, generator=g), dim=1)
    labels = torch.arange(200) % 4
    x = 5 * (centres[labels] + 0.05 * torch.randn(200, 16, generator=g))
    # several restarts: plain random init can merge two clusters; the best one must be exact
    best = max(
        (smog.spherical_kmeans(x, 4, iters=20, generator=torch.Generator().manual_seed(s)) for s in range(5)),
        key=lambda r: (F.normalize(x, dim=1) @ r[0].T).max(1).values.sum().item(),
    )
    cents, counts = best
    assert torch.allclose(cents.norm(dim=1), torch.ones(4), atol=1e-5)
    assert sorted(counts.tolist()) == [50, 50, 50, 50]
    assign = smog.assign_groups(x, cents)
    for c in range(4):  # every true cluster maps to one centroid
        assert assign[labels == c].unique().numel() == 1


def test_spherical_kmeans_deterministic_and_fewer_points_than_groups():
    x = torch.randn(7, 5)
    a, counts = smog.spherical_kmeans(x, 10, generator=torch.Generator().manual_seed(1))
    b, _ = smog.spherical_kmeans(x, 10, generator=torch.Generator().manual_seed(1))
    assert a.shape == (10, 5) and torch.equal(a, b)
    # no two centroids coincide (a copy of a row could never win an argmax): every point keeps its own centroid
    assert (a @ a.T - torch.eye(10)).max() < 1 - 1e-4
    assert counts.sum() == 7 and (counts <= 1).all()


def test_group_step_rules_hand_case():
    """Table 7d on one group with 2 earlier instances (n_k = 2 + 2): average weighs the batch mean by m_k/n_k = 1/2,
    average-paper by the printed 1/n_k = 1/4; random draws distinct rows when the batch has enough of them."""
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # both rows -> group 0, mean (0, 1)
    assign, seen = torch.tensor([0, 0]), torch.tensor([2.0, 0.0])
    counts = smog.group_counts(assign, 2)
    assert torch.equal(counts, torch.tensor([2.0, 0.0]))
    avg = smog.group_step(g, z, assign, counts, "average", 0.9, seen, 0)
    assert torch.allclose(avg[0], F.normalize(torch.tensor([0.5, 0.5]), dim=0)) and torch.equal(avg[1], g[1])
    paper = smog.group_step(g, z, assign, counts, "average-paper", 0.9, seen, 0)
    assert torch.allclose(paper[0], F.normalize(torch.tensor([0.75, 0.25]), dim=0))
    assert torch.allclose(smog.group_step(g, z, assign, counts, "latest", 0.9, seen, 0)[0], z[0])  # beta = 0
    assert torch.allclose(smog.group_step(g, z, assign, counts, "momentum", 0.5, seen, 0)[0],
                          F.normalize(torch.tensor([0.5, 0.5]), dim=0))
    for seed in range(20):
        rows, assign = torch.eye(6), torch.zeros(6, dtype=torch.long)
        drawn = smog.group_step(torch.zeros(4, 6), rows, assign, smog.group_counts(assign, 4), "random", 0.9,
                                torch.zeros(4), seed)
        assert drawn.argmax(1).unique().numel() == 4  # four distinct rows of the six


# ----------------------------------------------------------------------------- forward_loss, periodic resets


class _Split(nn.Module):
    """An 'online network' whose prediction does not depend on its projection: the projector's gradient can only
    arrive through the groups."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Flatten()
        self.projector = nn.Linear(12, 4)
        self.predictor = nn.Linear(12, 4)

    def forward(self, x):
        h = self.backbone(x)
        return self.projector(h), self.predictor(h)


class _OneProcess:
    """The bits of an Accelerator that forward_loss uses, for a single process."""

    num_processes, process_index = 1, 0

    @staticmethod
    def autocast():
        return torch.autocast("cpu", enabled=False)

    @staticmethod
    def gather(x):
        return x

    @staticmethod
    def reduce(x, op):
        return x


@pytest.mark.parametrize("detach, rule", [(False, "momentum"), (True, "momentum"), (False, "average"),
                                          (False, "latest"), (False, "random"), (True, "random")])
def test_gradient_through_groups_unless_detached(detach, rule):
    torch.manual_seed(9)
    cfg = smog.Config(num_groups=5, proj_dim=4, detach_groups=detach, group_update=rule, group_init="random")
    online = _Split()
    state = smog.MomentumState(online, 5, 4, cache_size=0, num_classes=3)
    x = torch.randn(10, 3, 2, 2)
    loss, new_groups, z_all, logs = smog.forward_loss(online, state, [x, x.flip(0)], torch.arange(10) % 3, cfg, 0.5,
                                                      0, _OneProcess())
    loss.backward()
    assert online.predictor.weight.grad.abs().sum() > 0
    if detach:
        assert online.projector.weight.grad is None
    else:
        assert online.projector.weight.grad.abs().sum() > 0
    assert not new_groups.requires_grad and z_all.shape == (10, 4)
    assert logs["class_counts"].sum() == 10 and logs["images"] == 10


def test_forward_loss_alternates_schemes_and_inits_groups_by_kmeans():
    torch.manual_seed(10)
    cfg = smog.Config(num_groups=4, proj_dim=4, group_init="kmeans")
    online = _Split()
    state = smog.MomentumState(online, 4, 4, cache_size=0, num_classes=3)
    x1, x2 = torch.randn(6, 3, 2, 2), torch.randn(6, 3, 2, 2)
    y = torch.zeros(6, dtype=torch.long)
    _, g0, z0, _ = smog.forward_loss(online, state, [x1, x2], y, cfg, 1.0, 0, _OneProcess())
    km, _ = smog.spherical_kmeans(z0, 4, cfg.kmeans_iters, generator=common.generator(cfg.seed, "kmeans", 0))
    # the initialisation is stored at once (it does not wait for the optimiser step, which fp16 may skip)
    assert torch.equal(state.groups, km)
    assert torch.allclose(g0, km, atol=1e-6)  # beta = 1 keeps the groups: the k-means of the first batch
    other = F.normalize(torch.randn(4, 4), dim=1)
    state.groups.copy_(other)
    _, g1, z1, _ = smog.forward_loss(online, state, [x1, x2], y, cfg, 1.0, 1, _OneProcess())
    with torch.no_grad():
        assert torch.allclose(z0, online.projector(x1.flatten(1)))  # step 0: online stream gets scheme 1
        assert torch.allclose(z1, online.projector(x2.flatten(1)))  # step 1: the schemes swap streams
    # k-means only at step 0: later steps start from the stored groups (beta = 1: unchanged up to renormalising)
    assert torch.allclose(g1, other, atol=1e-6) and torch.equal(state.groups, other)


def test_labels_of_unlabelled_images_are_not_counted():
    """STL-10's unlabelled images carry label -1: they are assigned to groups but enter no class count."""
    cfg = smog.Config(num_groups=5, proj_dim=4, group_init="random")
    online = _Split()
    state = smog.MomentumState(online, 5, 4, cache_size=0, num_classes=3)
    x, labels = torch.randn(6, 3, 2, 2), torch.tensor([0, 1, -1, 2, -1, 0])
    logs = smog.forward_loss(online, state, [x, x], labels, cfg, 0.5, 0, _OneProcess())[3]
    assert logs["class_counts"].sum() == 4 and logs["class_counts"].sum(0).tolist() == [2, 1, 1]


@pytest.mark.parametrize("kmeans_reset, encoder_reset", [(True, True), (False, True), (True, False)])
def test_periodic_reset_does_what_it_says(kmeans_reset, encoder_reset):
    torch.manual_seed(11)
    cfg = smog.Config(num_groups=3, proj_dim=4, kmeans_reset=kmeans_reset, encoder_reset=encoder_reset, seed=5)
    online = _Split()
    state = smog.MomentumState(online, 3, 4, cache_size=12, num_classes=3)
    with torch.no_grad():
        for p in state.target.parameters():
            p.add_(1.0)  # the momentum network has drifted away from the online one
    centres = torch.eye(4)[:3]
    state.cache.copy_(centres.repeat(4, 1) + 0.01 * torch.randn(12, 4))
    groups_before, target_before = state.groups.clone(), copy_state(state.target)
    online_view = nn.Sequential(online.backbone, online.projector)
    smog.periodic_reset(state, online_view, cfg, step=300)
    if kmeans_reset:
        expect, counts = smog.spherical_kmeans(state.cache, 3, cfg.kmeans_iters,
                                               generator=common.generator(5, "kmeans", 300))
        assert torch.equal(state.groups, expect) and torch.equal(state.seen, counts)
        assert sorted(state.groups.argmax(1).tolist()) == [0, 1, 2]  # one group per cluster of cached features
    else:
        assert torch.equal(state.groups, groups_before)
    online_sd = online_view.state_dict()
    for k, v in state.target.state_dict().items():
        assert torch.equal(v, online_sd[k] if encoder_reset else target_before[k]), k


def copy_state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_write_cache_ring_buffer():
    cache = torch.zeros(6, 1)
    for step in range(4):
        smog.write_cache(cache, torch.full((2, 1), float(step)), step, reset_every=3)
    assert cache.flatten().tolist() == [3, 3, 1, 1, 2, 2]  # the last 3 iterations; step 3 overwrote step 0


@pytest.mark.parametrize("m", [0.0, 1.0, 0.9])
def test_ema_update(m):
    online, target = (nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)) for _ in range(2))
    online(torch.randn(5, 3))  # moves the online network's running statistics
    before = [p.clone() for p in target.parameters()]
    smog.ema_update(target, online, m)
    for t0, t1, o in zip(before, target.parameters(), online.parameters()):
        assert torch.allclose(t1, m * t0 + (1 - m) * o)
    assert all(torch.equal(bt, bo) for bt, bo in zip(target.buffers(), online.buffers()))


def test_epoch_diagnostics():
    tally = smog.epoch_tally(3, 2, "cpu")
    assert set(tally) == {"class_counts", "same_group", "images"}
    empty = smog.epoch_diagnostics(tally, _OneProcess())
    assert empty == {"groups_used": 0, "group_label_entropy": 0.0, "same_group": 0.0}
    tally["class_counts"] += torch.tensor([[4.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    tally["same_group"] += 3
    tally["images"] += 4
    # the one place that reads the epoch's values back to the host: exactly these three reads
    with SyncDetector() as syncs:
        d = smog.epoch_diagnostics(tally, _OneProcess())
    assert syncs.ops == ["_local_scalar_dense"] * 3
    assert d["groups_used"] == 2 and d["same_group"] == pytest.approx(75.0)
    assert d["group_label_entropy"] == pytest.approx((0.0 + math.log(2)) / 2)


def test_defaults_are_the_papers():
    """Sec. 3.4: alpha 0.999, 3k groups, beta 1.0 -> 0.99, tau 0.1, resets every 300 iterations, k-means init."""
    cfg = smog.Config()
    assert (cfg.ema_momentum, cfg.num_groups, cfg.beta_end, cfg.tau, cfg.reset_every) == (0.999, 3000, 0.99, 0.1, 300)
    assert cfg.group_init == "kmeans" and cfg.group_update == "momentum" and not cfg.detach_groups
    assert (cfg.proj_hidden, cfg.proj_dim, cfg.blur) == (2048, 128, "auto")


def _blurs(pipeline):
    """(probability, GaussianBlur) of each randomly applied blur in a view pipeline."""
    return [(a.p, t) for a in pipeline.transforms if isinstance(a, T.RandomApply)
            for t in a.transforms if isinstance(t, T.GaussianBlur)]


def test_views_are_byols_with_blur_off_at_32_px_unless_asked():
    """Deviation 3: BYOL's two schemes; at 32 px the default specs have blur_p 0 (no blur in the pipeline);
    --blur on restores BYOL's (p 1.0 / 0.1, sigma 0.1-2, kernel about 10 % of the side); above 64 px it is on by
    default. Solarisation p 0 / 0.2 either way."""
    ms = ((0.5,) * 3, (0.25,) * 3)
    for size, blur in ((32, "auto"), (32, "on"), (32, "off"), (64, "auto"), (96, "auto"), (96, "off")):
        specs = smog.view_specs(smog.Config(blur=blur), size)
        on = blur == "on" or (blur == "auto" and size > 64)
        assert [s.blur_p for s in specs] == ([1.0, 0.1] if on else [0.0, 0.0]), (size, blur)
        assert [s.solarize_p for s in specs] == [0.0, 0.2]
        for s in specs:  # the rest is the same in both schemes
            assert (s.crop_scale, s.flip_p, s.jitter, s.jitter_p, s.gray_p) == ((0.08, 1.0), 0.5, (0.4, 0.4, 0.2, 0.1),
                                                                                  0.8, 0.2)
        pipelines = [common.torchvision_view(s, size, ms) for s in specs]
        blurs = [b for v in pipelines for b in _blurs(v)]
        if on:
            assert [p for p, _ in blurs] == [1.0, 0.1], (size, blur)
            assert all(list(b.kernel_size) == [2 * (size // 20) + 1] * 2 and list(b.sigma) == [0.1, 2.0]
                       for _, b in blurs)
        else:
            assert blurs == [], (size, blur)
        sol = [[t.p for t in v.transforms if isinstance(t, T.RandomSolarize)] for v in pipelines]
        assert sol == [[], [0.2]]
        img = T.functional.to_pil_image(torch.randint(0, 256, (3, size, size), dtype=torch.uint8))
        for v in pipelines:
            out = v(img)
            assert out.shape == (3, size, size) and out.dtype == torch.float32
    assert smog.view_specs(smog.Config(crop_min_scale=0.2), 32)[0].crop_scale == (0.2, 1.0)


def test_multi_crop_views_follow_sec_3_4():
    """Sec. 3.4: two large views, crop [0.2, 1] under the paper recipe, and 4 small ones of side 96 at 224 px with
    crop [0.05, 0.2], the schemes alternating (blur 1.0 / 0.1, solarisation 0 / 0.2); at 32 px the small side is
    round(32 * 96 / 224) = 14; a view's blur kernel follows its own side (96 // 20 = 4 -> 9)."""
    cfg = common.parse_config(smog.Config, ["--recipe", "paper"], smog.PAPER)
    specs = smog.view_specs(cfg, 224)
    assert [s.output_size(224) for s in specs] == [224, 224, 96, 96, 96, 96]
    assert [s.crop_scale for s in specs] == [(0.2, 1.0)] * 2 + [(0.05, 0.2)] * 4
    assert [s.blur_p for s in specs] == [1.0, 0.1] * 3 and [s.solarize_p for s in specs] == [0.0, 0.2] * 3
    assert specs[2].kernel_size(224) == 9 and specs[0].kernel_size(224) == 23
    assert [s.output_size(32) for s in smog.view_specs(cfg, 32)] == [32, 32, 14, 14, 14, 14]
    assert len(smog.view_specs(smog.Config(), 224)) == 2  # --recipe small: two views


def test_paper_recipe_and_its_schedules():
    """PAPER (Sec. 3.4, Table 1): LARS, lr 0.3 x 4096 / 256 = 4.8, 10 warm-up epochs then cosine, 400 epochs, wd 1e-6,
    ResNet-50, multi-crop; schedules at the first step, the end of warm-up and the last step (10 updates per epoch:
    100 warm-up updates, 4000 in all); --accumulate 4 at batch 1024 is the same effective batch."""
    cfg = common.parse_config(smog.Config, ["--recipe", "paper"], smog.PAPER)
    assert (cfg.optimizer, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.epochs, cfg.warmup_epochs, cfg.arch) == (
        "lars", 4096, 0.3, 1e-6, 400, 10, "resnet50")
    assert cfg.multi_crop and cfg.crop_min_scale == 0.2 and cfg.blur == "on"
    assert (cfg.ema_momentum, cfg.num_groups, cfg.beta_end, cfg.tau, cfg.reset_every) == (0.999, 3000, 0.99, 0.1, 300)
    for c in (cfg, common.parse_config(smog.Config, ["--recipe", "paper", "--batch-size", "1024", "--accumulate",
                                                     "4"], smog.PAPER)):
        first, warm, last = (smog.schedules(c, u, 10) for u in (0, 99, 3999))
        assert first["lr"] == pytest.approx(4.8 / 100) and warm["lr"] == pytest.approx(4.8)
        assert last["lr"] == pytest.approx(4.8 * 0.5 * (1 + math.cos(math.pi * 3899 / 3900)))
        assert (first["beta"], last["beta"]) == (1.0, pytest.approx(0.99))
        assert first["ema_momentum"] == last["ema_momentum"] == 0.999


class _Identity(nn.Module):
    """An online network whose projection and prediction are its flattened input: hand-computable losses."""

    def __init__(self):
        super().__init__()
        self.backbone, self.projector = nn.Flatten(), nn.Identity()

    def forward(self, x):
        z = self.projector(self.backbone(x))
        return z, z


def test_multi_crop_loss_is_the_mean_over_online_views():
    """Interpretation 11 by hand: groups g0 = (1, 0), g1 = (0, 1), tau 1, beta 1 (groups kept). x^b = (1, 0) gives
    c^b = g0; the online large view (1, 0) has logits (1, 0): -log(e / (e + 1)) = log(1 + 1/e); each of the 4 small
    views (0, 1) has logits (0, 1): log(1 + e). Eq. (3) averaged over the 5 online views."""
    cfg = smog.Config(num_groups=2, proj_dim=2, group_init="random", tau=1.0, multi_crop=True)
    online = _Identity()
    state = smog.MomentumState(online, 2, 2, cache_size=0, num_classes=3)
    state.groups.copy_(torch.eye(2))
    big, small = torch.tensor([[1.0, 0.0]] * 2).view(2, 2, 1, 1), torch.tensor([[0.0, 1.0]] * 2).view(2, 2, 1, 1)
    loss, _, z_all, _ = smog.forward_loss(online, state, [big, big, *[small] * 4], torch.zeros(2, dtype=torch.long),
                                          cfg, 1.0, 0, _OneProcess())
    e = math.e
    assert loss.item() == pytest.approx((math.log(1 + 1 / e) + 4 * math.log(1 + e)) / 5, abs=1e-6)
    assert z_all.shape == (2, 2)  # only the large online view is grouped and cached


def test_accumulate_counts_updates_and_groups_move_with_the_window():
    """--accumulate 2, --reset-every 2: the reset comes at the first batch of update 2 (batch 4), not at batch 2;
    after each window the groups are Eq. (4) with both batches' projections (one update with 2 x 4 rows), and the
    cache of 2 updates x 2 batches x 4 rows holds every batch."""
    cfg = smog.Config(**{**TINY_CFG, "reset_every": 2, "batch_size": 4, "accumulate": 2}, group_init="random")
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    set_seed(0)
    online, optimizer, state = tiny_setup(cfg, accelerator)
    online.eval(), state.target.eval()
    assert state.cache.shape == (16, 16)
    resets, real = [], smog.periodic_reset
    smog.periodic_reset = lambda state, view, cfg, step: resets.append(step)
    try:
        for step, (x1, x2, labels) in enumerate(tiny_batches(6, size=4)):
            if step % 2 == 0:
                groups_before, zs = state.groups.clone(), []
            with torch.no_grad():
                zs.append(online(x1 if step % 2 == 0 else x2)[0])
            accelerator.step = step
            with accelerator.accumulate(online):
                smog.train_step(online, state, optimizer, [x1, x2], labels, cfg, SCHED, step, accelerator)
            if step % 2 == 1:
                z = torch.cat(zs)
                expect = smog.update_groups(groups_before, z, smog.assign_groups(z, groups_before), SCHED["beta"])
                assert torch.allclose(state.groups, expect, atol=1e-5), step
                start = (step - 1) % 4 * 4  # the window's first batch owns its ring slot
                assert torch.allclose(state.cache[start:start + 8], z, atol=1e-5), step
    finally:
        smog.periodic_reset = real
    assert resets == [4]


def test_heads_follow_sec_3_4():
    online = smog.Online(smog.Config(proj_hidden=8, proj_dim=4), cifar_stem=True)
    assert isinstance(online.projector[-1], nn.BatchNorm1d)  # projection head output has BN
    assert isinstance(online.predictor[-1], nn.Linear)
    assert online.backbone.conv1.stride == (1, 1) and isinstance(online.backbone.maxpool, nn.Identity)
    z, p = online(torch.randn(2, 3, 32, 32))
    assert z.shape == p.shape == (2, 4)
    state = smog.MomentumState(online, 5, 4, cache_size=7, num_classes=10)
    assert all(not q.requires_grad for q in state.target.parameters())
    assert state.groups.shape == (5, 4) and state.cache.shape == (7, 4)
    assert torch.allclose(state.groups.norm(dim=1), torch.ones(5))


# ----------------------------------------------------------------------------- the script's own step

def _tiny_backbone(arch, cifar_stem):
    """Stands in for smog.build_backbone: one convolution with BN (fast on CPU, BN statistics included)."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten()), 16


def tiny_setup(cfg, accelerator):
    """smog.setup (prepared f_theta and optimiser, momentum state) with the tiny backbone."""
    real, smog.build_backbone = smog.build_backbone, _tiny_backbone
    try:
        return smog.setup(cfg, types.SimpleNamespace(cifar_stem=False, num_classes=10), accelerator)
    finally:
        smog.build_backbone = real


def tiny_batches(n, size=8, seed=1, small=0):
    """n fixed global batches: (view 1, view 2, labels[, `small` 4x4 views]) of `size` 8x8 images."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 8, 8, generator=g), torch.randn(size, 3, 8, 8, generator=g),
             torch.randint(0, 10, (size,), generator=g), *[torch.randn(size, 3, 4, 4, generator=g) for _ in range(small)])
            for _ in range(n)]


TINY_CFG = dict(proj_hidden=32, proj_dim=16, num_groups=6, reset_every=3, batch_size=8, seed=3)
SCHED = {"lr": 0.1, "beta": 0.9, "ema_momentum": 0.9}


def ddp_case(accelerator, *args):
    """Five smog.train_steps per rule (momentum, random) on fixed global batches of 8, this process taking its rows
    (tests/ddp_step.py, 1 or 2 processes): the k-means initialisation at step 0 and a periodic reset at step 3
    (--reset-every 3). The k-means result is perturbed on every process but 0 (1e-6 on the centroids, +1 on the
    counts), as float atomics on a GPU can make it differ in the last bits: the state stays bit-identical only because
    kmeans_groups broadcasts process 0's result. BatchNorm in eval mode: per-process batch statistics differ by design
    on CPU, where SyncBatchNorm is not used. args ("multicrop",): the momentum rule with --multi-crop (4 small 4x4
    views). -> {rule: {"kmeans_runs", "steps": per step the global loss, the
    gradients (SMoG does not clip: the raw ones are those the optimiser uses), and the groups, group sizes, cache and
    f^_eta after the step}}."""
    rank, world = accelerator.process_index, accelerator.num_processes
    exact, runs = smog.spherical_kmeans, []

    def perturbed_kmeans(*args, **kwargs):
        runs.append(1)
        centroids, counts = exact(*args, **kwargs)
        return centroids + 1e-6 * rank, counts + rank
    smog.spherical_kmeans = perturbed_kmeans  # for good: the process exists to run this case
    result = {}
    multi_crop = "multicrop" in args
    for rule in ("momentum",) if multi_crop else ("momentum", "random"):
        cfg = smog.Config(**TINY_CFG, group_update=rule, multi_crop=multi_crop)
        set_seed(0)
        online, optimizer, state = tiny_setup(cfg, accelerator)
        raw = accelerator.unwrap_model(online)
        online.eval(), state.target.eval()
        local = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)
        runs.clear()
        steps = []
        for step, (x1, x2, labels, *small) in enumerate(tiny_batches(5, small=4 if multi_crop else 0)):
            views = [x[local] for x in (x1, x2, *small)]
            logs = smog.train_step(online, state, optimizer, views, labels[local], cfg, SCHED, step, accelerator)
            steps.append({"loss": accelerator.reduce(logs["loss"], "mean"),
                          "grads": {n: p.grad.clone() for n, p in raw.named_parameters() if p.grad is not None},
                          "groups": state.groups.clone(), "seen": state.seen.clone(), "cache": state.cache.clone(),
                          "target": {k: v.clone() for k, v in state.target.state_dict().items()},
                          "same_group": accelerator.reduce(logs["same_group"], "sum"),
                          "images": accelerator.reduce(logs["images"], "sum")})
        result[rule] = {"steps": steps, "kmeans_runs": len(runs)}
    return result


def test_train_step_order_and_roles(monkeypatch):
    """smog.train_step, as train() calls it, at step 0 (view 1 to f_theta, view 2 to f^_eta), in the paper's order
    assign -> update -> contrast (Sec. 3.2: "the updated g_k is adopted to conduct contrasting"):
    - both views are assigned with the groups as they were BEFORE this batch, c^b from f^_eta's projection of x^b;
    - Eq. (4) updates the groups with the ONLINE projections f_theta(x^a) (not f^_eta's, not the other view's);
    - Eq. (3) is computed against the groups AFTER this batch's update, which the state then holds;
    - f^_eta <- alpha f^_eta + (1 - alpha) f_theta, after the SGD step (not the reverse)."""
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True)
    cfg = smog.Config(proj_hidden=32, proj_dim=16, num_groups=8, group_init="random", reset_every=0, kmeans_reset=False)
    torch.manual_seed(0)
    online = smog.Online(cfg, cifar_stem=False)
    state = smog.MomentumState(online, cfg.num_groups, cfg.proj_dim, cache_size=0, num_classes=10)
    online.eval(), state.target.eval()  # BN on running statistics, so that the expectations below are exact
    with torch.no_grad():
        for p in state.target.parameters():
            p.add_(0.05 * torch.randn_like(p))  # f^_eta differs from f_theta
    optimizer = torch.optim.SGD(online.parameters(), lr=0.1)
    x1, x2, labels = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32), torch.arange(8)
    groups_before, target_before = state.groups.clone(), copy.deepcopy(state.target)
    beta = 0.5
    with torch.no_grad():
        z_a, p_a = online(x1)  # online stream: view 1 at step 0
        z_b = target_before(x2)  # momentum stream: view 2
        c_b, c_a = smog.assign_groups(z_b, groups_before), smog.assign_groups(z_a, groups_before)
        expected_groups = smog.update_groups(groups_before, z_a, c_a, beta)
        expected_loss = smog.smog_loss(p_a, expected_groups, c_b, cfg.tau)
        # the test tells the alternatives apart: other features in Eq. (4), the loss against the groups before
        z_other = online(x2)[0]
        for wrong in (z_b, z_other):
            assert not torch.allclose(smog.update_groups(groups_before, wrong, smog.assign_groups(wrong, groups_before),
                                                         beta), expected_groups, atol=1e-3)
        assert abs(smog.smog_loss(p_a, groups_before, c_b, cfg.tau) - expected_loss) > 1e-3
    seen, assigned = {}, []
    real_loss, real_assign = smog.smog_loss, smog.assign_groups

    def loss_spy(p, groups, target, tau):
        seen.update(groups=groups.detach().clone(), target=target.clone())
        return real_loss(p, groups, target, tau)

    def assign_spy(z, groups):
        assigned.append((z.detach().clone(), groups.detach().clone()))
        return real_assign(z, groups)
    monkeypatch.setattr(smog, "smog_loss", loss_spy)
    monkeypatch.setattr(smog, "assign_groups", assign_spy)
    sched = {"lr": 0.1, "beta": beta, "ema_momentum": 0.5}
    logs = smog.train_step(online, state, optimizer, [x1, x2], labels, cfg, sched, 0, accelerator)
    assert list(logs)[0] == "loss" and logs["loss"].item() == pytest.approx(expected_loss.item(), abs=1e-5)
    assert torch.equal(seen["target"], c_b)  # c^b: f^_eta(x^b) assigned to the groups before the batch
    assert len(assigned) == 2 and all(torch.equal(g, groups_before) for _, g in assigned)  # assign before update
    assert {i for i, z in enumerate((z_b, z_a)) if any(torch.allclose(z, w, atol=1e-5) for w, _ in assigned)} == {0, 1}
    assert torch.allclose(seen["groups"], expected_groups, atol=1e-6)  # contrasted with the updated groups
    assert torch.allclose(state.groups, expected_groups, atol=1e-6)  # and those are stored
    online_now = dict(nn.Sequential(online.backbone, online.projector).named_parameters())
    for name, p in state.target.named_parameters():
        before = dict(target_before.named_parameters())[name]
        assert torch.allclose(p, 0.5 * before + 0.5 * online_now[name].detach(), atol=1e-6), name
    assert not any(n.startswith("2.") for n, _ in state.target.named_parameters())  # no prediction head in f^_eta


def test_train_step_resets_at_the_period():
    """At a step that is a multiple of --reset-every (not 0) train_step relocates the groups by k-means of the cache
    and resets f^_eta to f_theta BEFORE the loss; the cache then receives the step's projections."""
    from accelerate import Accelerator
    cfg = smog.Config(proj_hidden=32, proj_dim=16, num_groups=4, group_init="random", reset_every=2, seed=1)
    torch.manual_seed(0)
    online = smog.Online(cfg, cifar_stem=False)
    state = smog.MomentumState(online, cfg.num_groups, cfg.proj_dim, cache_size=2 * 4, num_classes=10)
    online.eval(), state.target.eval()
    with torch.no_grad():
        for p in state.target.parameters():
            p.add_(1.0)
    state.cache.copy_(torch.randn(8, 16))
    kmeans, _ = smog.spherical_kmeans(state.cache, 4, cfg.kmeans_iters,
                                      generator=common.generator(1, "kmeans", 2))
    view = nn.Sequential(online.backbone, online.projector)
    online_before = copy.deepcopy(view)
    x, sched = torch.randn(4, 3, 32, 32), {"lr": 0.1, "beta": 1.0, "ema_momentum": 1.0}
    with torch.no_grad():
        z = online(x)[0]
    smog.train_step(online, state, torch.optim.SGD(online.parameters(), lr=0.0), [x, x], torch.arange(4), cfg, sched,
                    2, Accelerator(cpu=True))
    assert torch.allclose(state.groups, kmeans, atol=1e-6)  # beta = 1: the k-means groups, unchanged by the batch
    assert all(torch.equal(a, b) for a, b in zip(state.target.parameters(), online_before.parameters()))
    assert torch.allclose(state.cache[:4], z, atol=1e-6)  # step 2 owns rows 0-3 of the ring buffer


# main flags: every group rule, detached groups, without either reset, random initial groups
SYNC_FLAGS = [{}, {"group_update": "average"}, {"group_update": "average-paper", "encoder_reset": False},
              {"group_update": "random"}, {"group_update": "latest", "detach_groups": True},
              {"group_init": "random", "kmeans_reset": False}]


def _syncs_per_step(flags, steps=7):
    """The ops that would synchronise a CUDA device, per train_step, over `steps` steps of the tiny network
    (--reset-every 3: k-means initialisation at step 0, resets at steps 3 and 6)."""
    cfg = smog.Config(**TINY_CFG, **flags)
    accelerator = Accelerator(cpu=True)
    set_seed(0)
    online, optimizer, state = tiny_setup(cfg, accelerator)
    ops = []
    for step, (x1, x2, labels) in enumerate(tiny_batches(steps)):
        with SyncDetector() as syncs, HostTensors() as host:
            smog.train_step(online, state, optimizer, [x1, x2], labels, cfg, SCHED, step, accelerator)
        ops.append(syncs.ops + [f"host:{c}" for c in host.calls])
    return ops


@pytest.mark.parametrize("flags", SYNC_FLAGS, ids=str)
def test_train_step_has_no_host_sync(flags):
    """Ordinary steps read nothing back to the host and copy no Python value to the device (train_step has no
    logging branch: logging is run.after_step's)."""
    ops = _syncs_per_step(flags)
    assert [ops[s] for s in (1, 2, 4, 5)] == [[]] * 4, ops


@pytest.mark.parametrize("flags", SYNC_FLAGS, ids=str)
def test_kmeans_and_reset_steps_syncs(flags):
    """The k-means initialisation (step 0) and the periodic resets (steps 3, 6) are the steps allowed to
    synchronise; exactly these ops are seen there (none: the k-means draws on the data's device and its result is
    broadcast, not read back), so a new one shows up here."""
    ops = _syncs_per_step(flags)
    assert [ops[s] for s in (0, 3, 6)] == [[]] * 3, ops


class _SkippingAccelerator(Accelerator):
    """Reports every optimiser step as skipped, as Accelerate does after the fp16 loss scaler found non-finite
    gradients (the optimiser here still steps: only the report is faked)."""
    optimizer_step_was_skipped = True


def _momentum_state(state):
    return {k: v.clone() for k, v in state.state_dict().items()}  # f^_eta, groups, cache, group sizes


@pytest.mark.parametrize("skipped", [True, False])
def test_skipped_fp16_step_leaves_momentum_state(skipped):
    """A step the fp16 scaler skipped leaves f^_eta, the groups, the cache and the group sizes where they were; a
    normal step moves every one of them. The k-means initialisation of step 0 is kept either way."""
    cfg = smog.Config(**TINY_CFG, group_update="average")  # the group sizes matter to this rule
    accelerator = (_SkippingAccelerator if skipped else Accelerator)(cpu=True)
    set_seed(0)
    online, optimizer, state = tiny_setup(cfg, accelerator)
    raw = accelerator.unwrap_model(online)
    online.eval(), state.target.eval()  # BN on running statistics: the projections below are the step's
    (x1, x2, labels), (y1, y2, labels1) = tiny_batches(2)
    with torch.no_grad():
        z0 = raw.projector(raw.backbone(x1))
    kmeans = smog.kmeans_groups(z0, cfg, 0)[0]
    keys = [k for k, _ in state.target.named_parameters(prefix="target")] + ["groups", "cache", "seen"]
    for step, batch in enumerate(([x1, x2], [y1, y2])):
        before, params = _momentum_state(state), [p.clone() for p in raw.parameters()]
        smog.train_step(online, state, optimizer, batch, (labels, labels1)[step], cfg, SCHED, step, accelerator)
        after = _momentum_state(state)
        assert not any(torch.equal(a, b) for a, b in zip(params, raw.parameters()))  # the optimiser did step
        moved = {k for k in keys if not torch.equal(before[k], after[k])}
        if not skipped:
            assert moved == set(keys), (step, set(keys) - moved)
        elif step == 0:  # the initialisation, not updated by the batch
            assert moved == {"groups"} and torch.allclose(after["groups"], kmeans, atol=1e-6)
        else:
            assert all(torch.equal(before[k], after[k]) for k in before), step


# ----------------------------------------------------------------------------- the script end to end


def test_smoke_writes_metrics_checkpoint_backbone_and_eval_reads_it(tmp_path):
    out = str(tmp_path / "run")
    run(["smog.py", *TINY, *HEADS, "--epochs", "2", "--output-dir", out])
    metrics = read_metrics(out)
    steps = [m for m in metrics if "loss" in m]
    assert len(steps) == 8 and all(math.isfinite(m["loss"]) for m in steps)
    assert list(steps[0])[:3] == ["step", "epoch", "loss"]
    assert {"beta", "lr", "ema_momentum", "groups_used_step", "z_std", "images_per_s"} <= set(steps[0])
    assert steps[0]["beta"] == 1.0 and steps[-1]["beta"] == pytest.approx(0.99)
    knn = [m for m in metrics if "knn_top1" in m]
    assert [m["epoch"] for m in knn] == [0, 1, 2] and 0 <= knn[-1]["knn_top1"] <= 100
    assert 1 <= knn[-1]["groups_used"] <= 8 and knn[-1]["group_label_entropy"] >= 0 and "same_group" in knn[-1]
    assert metrics[-1]["wall_time_s"] > 0 and metrics[-1]["peak_memory_mb"] > 0
    assert latest_checkpoint(out).endswith("checkpoint-8") and os.path.exists(os.path.join(out, "config.json"))
    check_backbone(out, "smog", eval_linear=True)


def test_views_on_device_runs(tmp_path):
    out = str(tmp_path / "device")
    run(["smog.py", *TINY, *HEADS, "--epochs", "1", "--eval-every", "0", "--views-on", "device",
         "--output-dir", out])
    steps = [m for m in read_metrics(out) if "loss" in m]
    assert len(steps) == 4 and all(math.isfinite(m["loss"]) for m in steps)


def test_ablation_flags_run(tmp_path):
    out = str(tmp_path / "ablation")
    run(["smog.py", *TINY, *HEADS, "--epochs", "1", "--eval-every", "0", "--group-update", "average",
         "--beta-schedule", "fixed", "--beta-end", "0.9", "--no-encoder-reset", "--detach-groups",
         "--group-init", "random", "--output-dir", out])
    steps = [m for m in read_metrics(out) if "loss" in m]
    assert all(m["beta"] == 0.9 for m in steps) and all(math.isfinite(m["loss"]) for m in steps)


def test_paper_group_count_on_tiny_data(tmp_path):
    """The default 3000 groups with far fewer images: 8 per batch for the first k-means, a cache of 3 x 8 = 24 rows
    at the reset of step 3; the groups beyond the data start as random unit vectors and the run stays finite."""
    out = str(tmp_path / "groups")
    run(["smog.py", *TINY, "--proj-hidden", "32", "--proj-dim", "16", "--reset-every", "3", "--epochs", "1",
         "--output-dir", out])
    metrics = read_metrics(out)
    assert all(math.isfinite(m["loss"]) for m in metrics if "loss" in m)
    knn = [m for m in metrics if "knn_top1" in m][-1]
    assert 1 <= knn["groups_used"] <= 32  # at most one group per image of the epoch
    state = torch.load(os.path.join(latest_checkpoint(out), "custom_checkpoint_0.pkl"), weights_only=False)
    assert state["groups"].shape == (3000, 16) and state["cache"].shape == (24, 16)
    assert torch.allclose(state["groups"].norm(dim=1), torch.ones(3000), atol=1e-5)


def test_resume_equals_uninterrupted(tmp_path):
    """--reset-every 3 with 4 steps per epoch: the reset at step 6 uses cached features from epoch 1."""
    args = ["smog.py", *TINY, *HEADS, "--epochs", "2", "--eval-every", "0"]
    sa, sb = run_resumed(args, tmp_path)
    for k in ("groups", "cache", "seen"):
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("case", [(), ("multicrop",)])
def test_two_processes_equal_one_and_stay_bit_identical(tmp_path, case):
    """ddp_case on 1 and 2 processes: at every step of both rules (and with --multi-crop), the loss, the gradients,
    and the groups, group sizes, cache and f^_eta after the step of each rank equal those of 1 process (float
    rounding), and both ranks hold the same bits, even with the k-means perturbed on rank 1."""
    one, ranks = two_process_results("smog", tmp_path, *case)
    tol = dict(atol=1e-5, rtol=1e-4)
    for rule in one:
        assert one[rule]["kmeans_runs"] == 2  # initialisation and reset
        assert all(r[rule]["kmeans_runs"] == 2 for r in ranks)
        for step, sa in enumerate(one[rule]["steps"]):
            s0, s1 = (r[rule]["steps"][step] for r in ranks)
            for r, sr in enumerate((s0, s1)):
                where = (rule, step, r)
                assert torch.allclose(sa["loss"], sr["loss"], **tol), where
                assert torch.equal(sa["same_group"], sr["same_group"]) and sr["images"] == sa["images"] == 8, where
                assert sa["grads"].keys() == sr["grads"].keys() and len(sa["grads"]) > 0
                for k in sa["grads"]:
                    assert torch.allclose(sa["grads"][k], sr["grads"][k], **tol), (where, k)
                for k in ("groups", "seen", "cache"):
                    assert torch.allclose(sa[k], sr[k], **tol), (where, k)
                for k in sa["target"]:
                    assert torch.allclose(sa["target"][k].float(), sr["target"][k].float(), **tol), (where, k)
            for k in s0["grads"]:
                assert torch.equal(s0["grads"][k], s1["grads"][k]), (rule, step, k)
            for k in ("groups", "seen", "cache"):
                assert torch.equal(s0[k], s1[k]), (rule, step, k)  # bit-identical on every rank
            for k in s0["target"]:
                assert torch.equal(s0["target"][k], s1["target"][k]), (rule, step, k)
        # the gradient through the groups reaches the projector (a detached update would leave only the predictor)
        assert any(k.startswith("projector") and v.abs().sum() > 0 for k, v in one[rule]["steps"][0]["grads"].items())


def test_two_process_training_run(tmp_path_factory):
    """The real loop on 2 CPU processes (conftest.TWO_PROCESS_RUNS), k-means resets included: runs, logs,
    checkpoints."""
    out = two_process_run("smog", tmp_path_factory)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["provenance"]["num_processes"] == 2  # really distributed, 4 images per process
    assert any("knn_top1" in m for m in read_metrics(out)) and os.path.exists(os.path.join(out, "backbone.pt"))


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("args, message", [
    (["--num-groups", "0"], "--num-groups must be at least 1"),
    (["--proj-dim", "0"], "--proj-dim must be at least 1"),
    (["--proj-hidden", "0"], "--proj-hidden must be at least 1"),
    (["--tau", "0"], "--tau must be positive"),
    (["--ema-momentum", "1.5"], "--ema-momentum must lie in [0, 1]"),
    (["--beta-end", "-0.1"], "--beta-end must lie in [0, 1]"),
    (["--reset-every", "-1"], "--reset-every must be 0 or more"),
    (["--kmeans-iters", "-2"], "--kmeans-iters must be 0 or more"),
    (["--crop-min-scale", "0"], "--crop-min-scale must lie in (0, 1]"),
    (["--crop-min-scale", "1.5"], "--crop-min-scale must lie in (0, 1]"),
])
def test_bad_flag_is_one_error_line(args, message):
    p = run(["smog.py", *TINY, *HEADS, "--epochs", "1", *args], check=False, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]] and message in lines[-1], lines[-3:]


# ----------------------------------------------------------------------------- real images

# CPU-size flags only (data, batch, loader, logging, a one-epoch schedule); every SMoG setting is the default
FAST = ["--dataset", "imagefolder", "--stem", "imagenet", "--batch-size", "128", "--num-workers", "0",
        "--log-every", "5", "--warmup-epochs", "1"]


@pytest.mark.learning
def test_no_collapse_on_real_images(cifar_subset, tmp_path):
    """CI's collapse check at SMoG's defaults (3000 groups, alpha 0.999, no blur at 32 px): one epoch of 15 steps
    (before the first reset at iteration 300), kNN only at the end.

    Floors: at least 16 groups receive features over the epoch, the per-dimension std of the L2-normalised
    projections stays above 0.02 (0 = collapsed to one point; 1/sqrt(128) = 0.088 is isotropic), and kNN top-1
    stays above 15 % (chance, a collapsed encoder, is 10 %; tests/test_learning.py). The learning test is the slow
    one in tests/test_learning.py.
    """
    out = str(tmp_path / "collapse")
    run(["smog.py", *FAST, "--data-dir", cifar_subset, "--epochs", "1", "--eval-every", "0", "--output-dir", out])
    metrics = read_metrics(out)
    last = [m for m in metrics if "knn_top1" in m][-1]
    spread = [m["z_std"] for m in metrics if "z_std" in m]
    print(f"SMoG 1 epoch: groups used {last['groups_used']}, z_std {spread[-1]:.4f}, kNN {last['knn_top1']:.1f}%")
    assert last["groups_used"] >= 16 and min(spread) > 0.02
    assert last["knn_top1"] > 15.0
