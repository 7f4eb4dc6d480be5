"""ReCo: losses (Eqs. 1-3, 5, 6) against hand-computed values and loop transcriptions, CutMix / mixup, Table III
diagnostics, shuffle BN, momentum/queue updates, the order and roles of train_step, no host sync in train_step, the
fp16 skipped-step gate, and the script end to end (smoke, views on the device, resume, two processes equal one
(`ddp_case`, run by tests/ddp_step.py), bad input)."""
import contextlib
import copy
import json
import math
import os
import random
import re
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator

import reco
from common import SplitBatchNorm, latest_checkpoint
from conftest import (TINY, check_backbone, cli_error, read_metrics, run, run_resumed, two_process_results,
                      two_process_run)
from sync_detector import HostTensors, SyncDetector

HEADS = ["--proj-dim", "16", "--queue-size", "16", "--bn-splits", "2"]
NO_DATA = types.SimpleNamespace(cifar_stem=False)  # what setup() reads of the data when --queue-size is set


def _unit(*rows):
    """Rows as python lists -> L2-normalised python lists (for hand formulas)."""
    out = []
    for r in rows:
        n = math.sqrt(sum(x * x for x in r))
        out.append([x / n for x in r])
    return out


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------------ Eq. (1) InfoNCE


def test_infonce_hand_computed():
    q = [[3.0, 4.0], [1.0, 0.0]]
    k = [[1.0, 0.0], [0.0, 2.0]]
    Q = [[0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]]
    tau = 0.5
    qn, kn, Qn = _unit(*q), _unit(*k), _unit(*Q)
    expected = 0.0
    for i in range(2):
        pos = math.exp(_dot(qn[i], kn[i]) / tau)
        neg = sum(math.exp(_dot(qn[i], Qn[j]) / tau) for j in range(3))
        expected += -math.log(pos / (pos + neg)) / 2
    got = reco.infonce_loss(torch.tensor(q), torch.tensor(k), torch.tensor(Q), tau)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def _infonce_loop(q, k, queue, tau):
    q, k, queue = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(queue, dim=1)
    total = 0.0
    for i in range(q.shape[0]):
        pos = math.exp(float(q[i] @ k[i]) / tau)
        neg = 0.0
        for j in range(queue.shape[0]):
            neg += math.exp(float(q[i] @ queue[j]) / tau)
        total += -math.log(pos / (pos + neg))
    return total / q.shape[0]


def test_infonce_matches_loop():
    g = torch.Generator().manual_seed(0)
    q, k, queue = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(13, 8, generator=g)
    got = reco.infonce_loss(q, k, queue, 0.2).item()
    assert got == pytest.approx(_infonce_loop(q.double(), k.double(), queue.double(), 0.2), rel=1e-5)


def test_infonce_uniform_limit_is_log_k_plus_one():
    # every logit equal (q orthogonal to keys and queue) -> loss = log(1 + K)
    q = torch.tensor([[1.0, 0.0, 0.0]]).repeat(4, 1)
    k = torch.tensor([[0.0, 1.0, 0.0]]).repeat(4, 1)
    queue = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [0.0, -1.0, 0.0]])
    assert reco.infonce_loss(q, k, queue, 0.2).item() == pytest.approx(math.log(4), rel=1e-6)


def test_infonce_gradient_only_into_query():
    q = torch.randn(4, 6, requires_grad=True)
    k = torch.randn(4, 6, requires_grad=True)
    queue = torch.randn(10, 6, requires_grad=True)
    reco.infonce_loss(q, k, queue).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None and queue.grad is None


def test_infonce_float32_under_half_inputs():
    q, k, queue = torch.randn(4, 6).half(), torch.randn(4, 6).half(), torch.randn(10, 6).half()
    out = reco.infonce_loss(q, k, queue, 0.04)
    assert out.dtype == torch.float32 and torch.isfinite(out)


# ------------------------------------------------------------------------------------------------ Eq. (3) global


def test_global_relation_hand_computed():
    v = [[1.0, 1.0]]
    vw = [[1.0, 0.0]]
    Q = [[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]]
    t_o, t_t = 0.1, 0.04
    (vn,), (wn,), Qn = _unit(*v), _unit(*vw), _unit(*Q)
    so = [math.exp(_dot(vn, Qn[j]) / t_o) for j in range(3)]
    so = [x / sum(so) for x in so]
    st = [math.exp(_dot(wn, Qn[j]) / t_t) for j in range(3)]
    st = [x / sum(st) for x in st]
    expected = sum(st[j] * (math.log(st[j]) - math.log(so[j])) for j in range(3))
    got = reco.global_relation_loss(torch.tensor(v), torch.tensor(vw), torch.tensor(Q), t_o, t_t)
    assert got.item() == pytest.approx(expected, rel=1e-4)


def _global_loop(v, vw, queue, t_o, t_t):
    v, vw, queue = F.normalize(v, dim=1), F.normalize(vw, dim=1), F.normalize(queue, dim=1)
    total = 0.0
    for i in range(v.shape[0]):
        so = [math.exp(float(v[i] @ queue[j]) / t_o) for j in range(queue.shape[0])]
        st = [math.exp(float(vw[i] @ queue[j]) / t_t) for j in range(queue.shape[0])]
        zo, zt = sum(so), sum(st)
        total += sum((b / zt) * (math.log(b / zt) - math.log(a / zo)) for a, b in zip(so, st))
    return total / v.shape[0]


def test_global_relation_matches_loop():
    g = torch.Generator().manual_seed(1)
    v, vw, queue = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g), torch.randn(11, 8, generator=g)
    got = reco.global_relation_loss(v, vw, queue, 0.1, 0.04).item()
    assert got == pytest.approx(_global_loop(v.double(), vw.double(), queue.double(), 0.1, 0.04), rel=1e-4)


def test_global_relation_kl_zero_when_distributions_equal():
    g = torch.Generator().manual_seed(2)
    v, queue = torch.randn(5, 8, generator=g), torch.randn(9, 8, generator=g)
    # same feature, same temperature -> S^t = S^o -> KL = 0 (the cross-entropy would be the entropy, not 0)
    assert reco.global_relation_loss(v, v.clone(), queue, 0.1, 0.1).item() == pytest.approx(0.0, abs=1e-6)
    # different temperatures: KL > 0
    assert reco.global_relation_loss(v, v.clone(), queue, 0.1, 0.04).item() > 1e-4


def test_global_relation_gradient_only_into_online():
    v = torch.randn(4, 6, requires_grad=True)
    vw = torch.randn(4, 6, requires_grad=True)
    queue = torch.randn(10, 6, requires_grad=True)
    reco.global_relation_loss(v, vw, queue).backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert vw.grad is None and queue.grad is None


def test_global_relation_sharp_temperature_half_inputs_finite():
    v, vw, queue = (torch.randn(4, 6) * 50).half(), (torch.randn(4, 6) * 50).half(), torch.randn(10, 6).half()
    out = reco.global_relation_loss(v, vw, queue, 0.1, 0.01)
    assert out.dtype == torch.float32 and torch.isfinite(out) and out.item() >= -1e-6


# ------------------------------------------------------------------------------------------------ Eqs. (4)-(6) local


def test_interpolated_target_mixes_the_right_features():
    v = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    v_partner = torch.tensor([[0.0, 5.0], [1.0, 0.0]])
    r = 0.25
    got = reco.interpolated_target(v, v_partner, r)
    # row 0: 0.25*(1,0) + 0.75*(0,1) normalised; row 1: 0.25*(0,1) + 0.75*(1,0)
    e0 = _unit([0.25, 0.75])[0]
    e1 = _unit([0.75, 0.25])[0]
    assert torch.allclose(got, torch.tensor([e0, e1]), atol=1e-6)
    # per-sample ratio (B,)
    got2 = reco.interpolated_target(v, v_partner, torch.tensor([1.0, 0.0]))
    assert torch.allclose(got2, torch.tensor([[1.0, 0.0], [1.0, 0.0]]), atol=1e-6)


def test_interpolated_target_detached():
    v = torch.randn(3, 4, requires_grad=True)
    assert not reco.interpolated_target(v, torch.randn(3, 4), 0.5).requires_grad


def test_local_interpolation_hand_computed_and_loop():
    v_mix = [[1.0, 2.0], [0.0, 1.0]]
    v_t = [[1.0, 0.0], [1.0, 1.0]]
    Q = [[0.0, 1.0], [1.0, -1.0]]
    tau = 0.2
    mn, tn, Qn = _unit(*v_mix), _unit(*v_t), _unit(*Q)
    expected = 0.0
    for i in range(2):
        pos = math.exp(_dot(mn[i], tn[i]) / tau)
        expected += -math.log(pos / (pos + sum(math.exp(_dot(mn[i], Qn[j]) / tau) for j in range(2)))) / 2
    got = reco.local_interpolation_loss(torch.tensor(v_mix), torch.tensor(v_t), torch.tensor(Q), tau)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    g = torch.Generator().manual_seed(3)
    a, b, queue = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g), torch.randn(7, 8, generator=g)
    assert reco.local_interpolation_loss(a, b, queue).item() == pytest.approx(
        _infonce_loop(a.double(), b.double(), queue.double(), 0.2), rel=1e-5
    )


def test_local_interpolation_gradient_never_reaches_target_or_queue():
    v_mix = torch.randn(4, 6, requires_grad=True)
    v_src = torch.randn(4, 6, requires_grad=True)  # the online feature the target is built from
    v_target = F.normalize(v_src * 2, dim=1)  # a target still attached to the graph
    queue = torch.randn(10, 6, requires_grad=True)
    reco.local_interpolation_loss(v_mix, v_target, queue).backward()
    assert v_mix.grad is not None and v_mix.grad.abs().sum() > 0
    assert v_src.grad is None and queue.grad is None


@pytest.mark.parametrize("r", [0.0, 0.13, 0.5, 0.77, 0.999])
@pytest.mark.parametrize("seed", range(4))
def test_cutmix_effective_r_is_kept_area_fraction(r, seed):
    g = random.Random(seed)
    x = torch.zeros(3, 2, 13, 17)
    x_partner = torch.ones(3, 2, 13, 17)
    x_in, xp_in = x.clone(), x_partner.clone()
    x_mix, r_eff = reco.cutmix(x, x_partner, r, g)
    kept = (x_mix == 0).sum().item() / x_mix.numel()  # fraction of pixels still from x
    assert r_eff == pytest.approx(kept, abs=1e-9)
    assert 0.0 <= r_eff <= 1.0 and r_eff >= r - 1e-9  # clipping only ever keeps more of x
    assert torch.equal(x, x_in) and torch.equal(x_partner, xp_in)  # pure
    # the same box for every image and channel
    assert torch.equal(x_mix[0], x_mix[2]) and torch.equal(x_mix[:, 0], x_mix[:, 1])


def test_cutmix_pastes_partner_pixels_at_same_positions():
    g = random.Random(5)
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    xp = -x - 1
    x_mix, r_eff = reco.cutmix(x, xp, 0.3, g)
    from_partner = x_mix < 0
    assert torch.equal(x_mix[from_partner], xp[from_partner])
    assert torch.equal(x_mix[~from_partner], x[~from_partner])
    assert 1 - from_partner.float().mean().item() == pytest.approx(r_eff)


def test_cutmix_deterministic_with_generator():
    x, xp = torch.zeros(1, 1, 16, 16), torch.ones(1, 1, 16, 16)
    a, b, c = (reco.cutmix(x, xp, 0.4, random.Random(seed)) for seed in (7, 7, 8))
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert not torch.equal(a[0], c[0])  # the box comes from the generator


def test_mixup():
    x, xp = torch.full((2, 3, 4, 4), 2.0), torch.full((2, 3, 4, 4), 6.0)
    x_mix, r = reco.mixup(x, xp, 0.25)
    assert r == 0.25 and torch.allclose(x_mix, torch.full_like(x, 0.25 * 2 + 0.75 * 6))


# ------------------------------------------------------------------------------------------------ Table III


def test_class_similarity_stats_hand_computed_and_loop():
    f = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    y = torch.tensor([0, 0, 1, 1, 1])
    fn = F.normalize(f, dim=1)
    intra, inter, phi = [], [], []
    for i in range(5):
        p = [float(fn[i] @ fn[j]) for j in range(5) if j != i and y[j] == y[i]]
        n = [float(fn[i] @ fn[j]) for j in range(5) if y[j] != y[i]]
        mp, mn = sum(p) / len(p), sum(n) / len(n)
        intra.append(mp), inter.append(mn), phi.append((mp + 1) / (mn + 1))
    got = reco.class_similarity_stats(f, y, chunk=2)
    assert got["s_intra"] == pytest.approx(sum(intra) / 5, abs=1e-6)
    assert got["s_inter"] == pytest.approx(sum(inter) / 5, abs=1e-6)
    assert got["phi"] == pytest.approx(sum(phi) / 5, abs=1e-6)
    # anchor 0: S_p = {1}: cos((1,0),(1,1)) = 1/sqrt2
    assert intra[0] == pytest.approx(1 / math.sqrt(2))


def test_class_similarity_stats_singleton_classes_give_nan():
    got = reco.class_similarity_stats(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    assert all(math.isnan(v) for v in got.values())


def test_class_similarity_stats_perfect_clusters():
    f = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3)
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    got = reco.class_similarity_stats(f, y)
    assert got["s_intra"] == pytest.approx(1.0) and got["s_inter"] == pytest.approx(0.0)
    assert got["phi"] == pytest.approx(2.0)


def test_total_loss_eq2():
    assert reco.total_loss(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0), 1.0, 2.0).item() == 1 + 2 + 6
    assert reco.total_loss(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0), 0.0, 0.0).item() == 1


def test_lr_schedule_end_points():
    assert reco.lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert reco.lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert reco.lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert reco.lr_at(100, 100, 10, 1.0) == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------------------------- shuffle BN, momentum, queue


def test_momentum_state_is_frozen_split_bn_copy_and_ema_update():
    cfg = reco.Config(proj_dim=4)
    online = reco.OnlineEncoder(cfg, cifar_stem=True)
    state = reco.MomentumState(online, 16, 4, splits_per_process=2, weak_bank=True)
    enc = state.momentum_encoder
    assert all(not p.requires_grad for p in enc.parameters())
    assert any(isinstance(m, SplitBatchNorm) for m in enc.modules())
    assert not any(type(m) is nn.BatchNorm2d for m in enc.modules())
    src = nn.Sequential(online.backbone, online.head).state_dict()
    assert list(enc.state_dict()) == list(src) and all(torch.equal(v, src[k]) for k, v in enc.state_dict().items())
    assert torch.allclose(state.queue.norm(dim=1), torch.ones(16)) and state.queue_weak.shape == (16, 4)
    # m = 0 copies, m = 1 freezes, parameters paired in order
    view = nn.Sequential(online.backbone, online.head)
    with torch.no_grad():
        for p in view.parameters():
            p.add_(1.0)
    before = [p.clone() for p in enc.parameters()]
    reco.ema_update(enc, view, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, enc.parameters()))
    reco.ema_update(enc, view, 0.5)
    assert all(torch.allclose(t, 0.5 * b + 0.5 * s) for t, b, s in zip(enc.parameters(), before, view.parameters()))
    reco.ema_update(enc, view, 0.0)
    assert all(torch.equal(t, s) for t, s in zip(enc.parameters(), view.parameters()))


def test_queue_fifo_and_wrap_around():
    queue = torch.zeros(5, 1)
    ptr = reco.enqueue(queue, torch.tensor(0), torch.tensor([[1.0], [2.0], [3.0]]))
    assert ptr.item() == 3 and queue.flatten().tolist() == [1, 2, 3, 0, 0]
    ptr = reco.enqueue(queue, ptr, torch.tensor([[4.0], [5.0], [6.0]]))
    assert ptr.item() == 1 and queue.flatten().tolist() == [6, 2, 3, 4, 5]


class OneProcess:
    """The part of Accelerator that forward_loss uses, for one process (no global state in the pytest process)."""
    num_processes, process_index = 1, 0

    @staticmethod
    def gather(t):
        return t

    @staticmethod
    def autocast():
        return contextlib.nullcontext()


def test_step_randomness_is_a_function_of_seed_and_step():
    a, b, c = (reco.step_randomness(0, s, 16, 1.0, "cpu") for s in (5, 5, 6))
    for u, v in zip(a[1:4], b[1:4]):
        assert torch.equal(u, v)
    assert a[4] == b[4] and a[4] != c[4] and not torch.equal(a[3], c[3])
    draw = [x[0].random() for x in (a, b, c)]  # the generator of the CutMix box
    assert draw[0] == draw[1] != draw[2]
    assert sorted(a[3].tolist()) == list(range(16)) and 0 <= a[4] <= 1


def _tiny_setup(**kw):
    torch.manual_seed(0)
    cfg = reco.Config(proj_dim=8, bn_splits=2, **{"global_bank": "weak", **kw})  # the bank with most state to check
    online = reco.OnlineEncoder(cfg, cifar_stem=False)
    state = reco.MomentumState(online, 16, 8, 2, weak_bank=cfg.lambda_global > 0 and cfg.global_bank == "weak")
    views = [torch.randn(4, 3, s.output_size(32), s.output_size(32)) for s in reco.view_specs(cfg, 32)]
    return cfg, online, state, views


def test_forward_loss_gradient_reaches_online_encoder_only():
    cfg, online, state, views = _tiny_setup()
    queues = (state.queue.clone(), state.queue_weak.clone())
    loss, keys, weak_keys, logs = reco.forward_loss(online, state, views, cfg, 0, OneProcess)
    assert not keys.requires_grad and not weak_keys.requires_grad
    loss.backward()
    assert all(p.grad is not None for p in online.parameters())
    assert all(p.grad is None for p in state.momentum_encoder.parameters())
    assert torch.equal(queues[0], state.queue) and torch.equal(queues[1], state.queue_weak)
    expected = logs["csl"] + cfg.lambda_global * logs["global_relation"] + cfg.lambda_local * logs["local_relation"]
    assert torch.allclose(loss.detach(), expected) and 0 <= logs["r"] <= 1


def test_forward_loss_terms_match_the_pure_functions():
    """Rebuild the step by hand from the public functions: partner j, CutMix with r_eff, the q/k target of Eq. (5)
    (Interpretation 1), S^o and S^t over the bank of weak keys (Interpretation 4), Eq. (2)."""
    cfg, online, state, views = _tiny_setup()
    assert (cfg.feature_pair, cfg.image_pair, cfg.global_bank) == ("q/k", "q/k", "weak")
    state.queue_weak.copy_(F.normalize(torch.randn(16, 8), dim=1))  # a bank that differs from the MoCo queue
    online.eval(), state.eval()  # BN on running statistics: forward passes are batch-independent
    loss, keys, _, logs = reco.forward_loss(online, state, views, cfg, 7, OneProcess)
    g, _, _, partner, r = reco.step_randomness(cfg.seed, 7, 4, cfg.mix_alpha, "cpu")
    x_q, x_k, x_w = views
    with torch.no_grad():
        k = F.normalize(state.momentum_encoder(x_k), dim=1)
        k_w = F.normalize(state.momentum_encoder(x_w), dim=1)
        x_mix, r_eff = reco.cutmix(x_q, x_k[partner], r, g)
        (q,), (v_mix,) = online(x_q), online(x_mix)
    assert torch.allclose(keys, k, atol=1e-5) and logs["r"] == r_eff
    csl = reco.infonce_loss(q, k, state.queue, cfg.tau)
    glob = reco.global_relation_loss(q, k_w, state.queue_weak, cfg.tau_ot, cfg.tau_tt)
    local = reco.local_interpolation_loss(v_mix, reco.interpolated_target(q, k[partner], r_eff), state.queue, cfg.tau)
    assert torch.allclose(logs["csl"], csl, atol=1e-5) and torch.allclose(logs["global_relation"], glob, atol=1e-5)
    assert torch.allclose(logs["local_relation"], local, atol=1e-5)
    assert torch.allclose(loss.detach(), csl + 1.0 * glob + 2.0 * local, atol=1e-5)


@pytest.mark.parametrize("image, pair", [("q/k", "q/k"), ("q/k", "k/q"), ("q/k", "q/q"), ("q/q", "q/q")])
def test_forward_loss_feature_pairs_of_table_vii(image, pair):
    """--image-pair / --feature-pair: Eq. (4) mixes x_i with the named view of partner j, and the target of Eq. (5)
    mixes the named encoders' features of x_i and of j."""
    cfg, online, state, views = _tiny_setup(feature_pair=pair, image_pair=image)
    online.eval(), state.eval()
    _, _, _, logs = reco.forward_loss(online, state, views, cfg, 7, OneProcess)
    g, _, _, partner, r = reco.step_randomness(cfg.seed, 7, 4, cfg.mix_alpha, "cpu")
    x_q, x_k, _ = views
    with torch.no_grad():
        k = F.normalize(state.momentum_encoder(x_k), dim=1)
        x_mix, r_eff = reco.cutmix(x_q, {"q": x_q, "k": x_k}[image[2]][partner], r, g)
        (q,), (v_mix,) = online(x_q), online(x_mix)
    feats = {"q": q, "k": k}
    target = reco.interpolated_target(feats[pair[0]], feats[pair[2]][partner], r_eff)
    expected = reco.local_interpolation_loss(v_mix, target, state.queue, cfg.tau)
    assert torch.allclose(logs["local_relation"], expected, atol=1e-5)


def test_forward_loss_moco_baseline_has_no_relation_terms():
    cfg, online, state, views = _tiny_setup(lambda_global=0.0, lambda_local=0.0)
    assert not hasattr(state, "queue_weak")  # no bank of Eq. (3) without L_global: MoCo-v2's state exactly
    loss, _, weak_keys, logs = reco.forward_loss(online, state, views, cfg, 0, OneProcess)
    assert weak_keys is None and logs["global_relation"].item() == 0 and logs["local_relation"].item() == 0
    assert torch.allclose(loss.detach(), logs["csl"])


def _one_step(cfg, online, state, views, momentum):
    """reco.train_step on one process, as train() calls it (SGD lr 0.1); returns its logs."""
    from accelerate import Accelerator
    optimizer = torch.optim.SGD(online.parameters(), lr=0.1)
    sched = {"lr": 0.1, "ema_momentum": momentum}
    return reco.train_step(online, state, optimizer, views, torch.arange(len(views[0])), cfg, sched, 0,
                           Accelerator(cpu=True))


def test_train_step_order_and_roles(monkeypatch):
    """reco.train_step, as train() calls it: every loss sees the queue, and L_global the bank of Eq. (3), as they were
    BEFORE this batch; SGD moves every online parameter by -lr * its gradient; the momentum encoder moves toward the
    updated online encoder (theta^ <- m theta^ + (1 - m) theta, not the reverse); then the queue holds the momentum
    encoder's keys of the key views x^_i and the bank its keys of the WEAK views x-_i (Interpretation 4), at the same
    positions, wrapping around the end."""
    cfg, online, state, views = _tiny_setup()
    state.queue_weak.copy_(F.normalize(torch.randn(16, 8), dim=1))  # a bank that differs from the MoCo queue
    state.ptr.fill_(14)
    with torch.no_grad():  # the online encoder away from its copy, so that the direction of the update shows
        for p in online.parameters():
            p.add_(0.05 * torch.randn_like(p))
    online.eval(), state.eval()  # BN on running statistics: keys by hand do not depend on the batch or its shuffle
    queue_before, bank_before = state.queue.clone(), state.queue_weak.clone()
    encoder_before = copy.deepcopy(state.momentum_encoder)
    online_before = {n: p.detach().clone() for n, p in online.named_parameters()}
    x_q, x_k, x_w = views
    with torch.no_grad():
        k, k_w = (F.normalize(encoder_before(x), dim=1) for x in (x_k, x_w))
        (q,) = online(x_q)
    seen = []
    for name in ("infonce_loss", "global_relation_loss"):  # Eq. (6) calls infonce_loss too
        def spy(a, b, queue, *args, _real=getattr(reco, name), _name=name, **kw):
            seen.append((_name, queue.clone()))
            return _real(a, b, queue, *args, **kw)
        monkeypatch.setattr(reco, name, spy)
    logs = _one_step(cfg, online, state, views, momentum=0.5)
    assert list(logs)[:4] == ["loss", "csl", "global_relation", "local_relation"] and 0 <= logs.pop("r") <= 1
    assert [n for n, _ in seen] == ["infonce_loss", "global_relation_loss", "infonce_loss"]
    for name, p in online.named_parameters():  # the online encoder trains (plain SGD, lr 0.1)
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert not torch.equal(p, online_before[name]), name
        assert torch.allclose(p, online_before[name] - 0.1 * p.grad, atol=1e-7), name
    for name, queue in seen:  # the queues before this batch entered them; L_global over the bank of weak keys
        assert torch.equal(queue, bank_before if name == "global_relation_loss" else queue_before), name
    online_after = dict(nn.Sequential(online.backbone, online.head).named_parameters())
    for name, p in state.momentum_encoder.named_parameters():
        before = dict(encoder_before.named_parameters())[name]
        assert not torch.allclose(before, online_after[name], atol=1e-3), name
        assert torch.allclose(p, 0.5 * before + 0.5 * online_after[name].detach(), atol=1e-6), name
    rows, kept = [14, 15, 0, 1], slice(2, 14)
    assert torch.allclose(state.queue[rows], k, atol=1e-5) and torch.allclose(state.queue_weak[rows], k_w, atol=1e-5)
    assert torch.equal(state.queue[kept], queue_before[kept]) and torch.equal(state.queue_weak[kept], bank_before[kept])
    assert state.ptr.item() == 2
    # the three candidates differ, so the bank holds the weak keys and not the strong keys or the queries
    q = F.normalize(q, dim=1)
    assert not torch.allclose(k_w, k, atol=1e-3) and not torch.allclose(k_w, q, atol=1e-3)


class SkippedStep(Accelerator):
    """What Accelerate reports after fp16's GradScaler skipped the optimiser step (inf or NaN gradients)."""
    optimizer_step_was_skipped = True


@pytest.mark.parametrize("skipped", [True, False], ids=["skipped", "taken"])
def test_skipped_fp16_step_leaves_the_momentum_state_alone(skipped):
    """A step the GradScaler skipped moves neither the momentum encoder nor the queue, the bank or the pointer; a step
    taken moves every one of them."""
    cfg, online, state, views = _tiny_setup()
    with torch.no_grad():  # the online encoder away from its copy, so that the EMA shows
        for p in online.parameters():
            p.add_(0.05 * torch.randn_like(p))
    before = copy.deepcopy(state.state_dict())
    optimizer = torch.optim.SGD(online.parameters(), lr=0.1)
    accelerator = (SkippedStep if skipped else Accelerator)(cpu=True)
    assert accelerator.optimizer_step_was_skipped == skipped
    reco.train_step(online, state, optimizer, views, torch.arange(4), cfg, {"lr": 0.1, "ema_momentum": 0.5}, 0,
                    accelerator)
    unchanged = {k: torch.equal(v, before[k]) for k, v in state.state_dict().items()}
    assert {"queue", "queue_weak", "ptr", "momentum_encoder.0.conv1.weight"} <= set(unchanged)
    assert all(unchanged.values()) if skipped else not any(unchanged.values()), unchanged


def _script_setup(args):
    """The script's own setup() on one CPU process, tiny: -> (cfg, online, optimizer, state, accelerator, views)."""
    torch.manual_seed(0)
    cfg = reco.common.parse_config(reco.Config, ["--batch-size", "4", "--proj-dim", "8", "--queue-size", "16",
                                                 "--bn-splits", "2", *args])
    accelerator = Accelerator(cpu=True)
    online, optimizer, state = reco.setup(cfg, NO_DATA, accelerator)
    return cfg, online, optimizer, state, accelerator, [torch.randn(4, 3, 32, 32) for _ in range(3)]


@pytest.mark.parametrize("args", [[], ["--image-pair", "q/q", "--feature-pair", "q/q"], ["--mix", "mixup"],
                                  ["--lambda-global", "0"]],
                         ids=lambda a: " ".join(a) or "defaults")
def test_train_step_has_no_host_sync(args):
    """Several train_steps as train() runs them record no op that would make the host wait for a GPU (the CutMix
    box and r are host numbers, the permutations are drawn on the device). reco's train_step has no logging or reset
    step of its own: the loss terms are read on the host in common.Run.after_step, Table III at the epoch's end."""
    cfg, online, optimizer, state, accelerator, views = _script_setup(args)
    online.train(), state.train()
    labels = torch.arange(4)
    for step in range(3):
        with SyncDetector() as syncs, HostTensors() as host:
            logs = reco.train_step(online, state, optimizer, views, labels, cfg,
                                   reco.schedules(cfg, step, 10), step, accelerator)
        assert syncs.ops == [] and host.calls == [], (step, syncs.ops, host.calls)
    assert isinstance(logs["r"], float) and all(torch.is_tensor(v) for k, v in logs.items() if k != "r")


def test_epoch_diagnostics_reads_the_monitors_query_features():
    """epoch_diagnostics(query): Table III of the (features, labels) the kNN monitor extracted, x100; left out when
    no class has two test images."""
    f = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([0, 0, 1, 1, 2])  # class 2 has one image: its anchor is skipped, it still counts as a negative
    got = reco.epoch_diagnostics((f, y))
    # anchors 0-3: the other image of the class at cos 1; negatives: the other class at cos 0 and (1, 1) at 1/sqrt2
    s_inter = (0 + 0 + 1 / math.sqrt(2)) / 3
    assert got == pytest.approx({"s_intra": 100.0, "s_inter": 100 * s_inter, "phi": 100 * 2 / (s_inter + 1)})
    assert reco.epoch_diagnostics((torch.randn(3, 4), torch.tensor([0, 1, 2]))) == {}


def test_global_bank_key_uses_the_moco_queue():
    """--global-bank key: no bank of weak keys; S^o and S^t of Eq. (3) over the MoCo queue, which then receives the
    keys of the key views."""
    cfg, online, state, views = _tiny_setup(global_bank="key")
    online.eval(), state.eval()
    assert not hasattr(state, "queue_weak")
    queue_before = state.queue.clone()
    with torch.no_grad():
        (q,) = online(views[0])
        k, k_w = (F.normalize(state.momentum_encoder(x), dim=1) for x in views[1:])
    logs = _one_step(cfg, online, state, views, momentum=0.999)
    expected = reco.global_relation_loss(q, k_w, queue_before, cfg.tau_ot, cfg.tau_tt)
    assert torch.allclose(logs["global_relation"], expected, atol=1e-5)
    assert torch.allclose(state.queue[:4], k, atol=1e-5) and state.ptr.item() == 4


def test_view_specs_read_like_the_paper():
    """x_i and x^_i: MoCo-v2's view (Sec. III-A); x-_i: crop and flip only (Sec. III-B, Interpretation 6)."""
    strong, key, weak = reco.view_specs(reco.Config(), 32)
    assert strong == key and (strong.crop_scale, strong.flip_p, strong.solarize_p) == ((0.2, 1.0), 0.5, 0.0)
    assert (strong.jitter, strong.jitter_p, strong.gray_p) == ((0.4, 0.4, 0.4, 0.1), 0.8, 0.2)
    assert (strong.blur_p, strong.blur_sigma, strong.blur_kernel) == (0.5, (0.1, 2.0), 0)  # 0: 2 * (size // 20) + 1
    assert (strong.kernel_size(32), strong.kernel_size(224)) == (3, 23)
    assert weak == reco.ViewSpec(crop_scale=(0.2, 1.0)) and weak.flip_p == 0.5
    assert weak.jitter_p == weak.gray_p == weak.blur_p == weak.solarize_p == 0


def test_small_recipe_and_paper_table():
    """The defaults: the shared small protocol for the generic fields (BaseConfig) and the paper's own values for
    ReCo's (Sec. IV-A, Tables I, II, VI, VII); PAPER: Sec. IV-A's ImageNet-1K setting, 5 warm-up epochs from the
    authors' code (Interpretation 7); the bank of Eq. (3) is the MoCo queue in both (Interpretation 4)."""
    cfg, base = reco.Config(), reco.common.BaseConfig()
    generic = ("arch", "optimizer", "lr", "momentum", "weight_decay", "warmup_epochs", "epochs", "batch_size")
    assert all(getattr(cfg, f) == getattr(base, f) for f in generic)
    assert (cfg.lr, cfg.warmup_epochs, cfg.arch) == (0.06, 10, "resnet18")
    assert (cfg.ema_momentum, cfg.tau, cfg.proj_dim, cfg.queue_size, cfg.multi_crop) == (0.999, 0.2, 128, 0, False)
    assert (cfg.tau_tt, cfg.tau_ot, cfg.lambda_global, cfg.lambda_local, cfg.mix_alpha) == (0.04, 0.1, 1.0, 2.0, 1.0)
    assert (cfg.feature_pair, cfg.image_pair, cfg.global_bank, cfg.mix) == ("q/k", "q/k", "key", "cutmix")
    paper = reco.common.parse_config(reco.Config, ["--recipe", "paper"], reco.PAPER)
    assert (paper.arch, paper.optimizer, paper.lr, paper.momentum, paper.weight_decay) == ("resnet50", "sgd", 0.03,
                                                                                          0.9, 5e-4)
    assert (paper.batch_size, paper.epochs, paper.warmup_epochs, paper.queue_size, paper.bn_splits) == (256, 200, 5,
                                                                                                      65536, 8)
    assert (paper.multi_crop, paper.global_bank, paper.proj_dim, paper.lambda_local) == (False, "key", 128, 2.0)


@pytest.mark.parametrize("recipe", ["small", "paper"])
def test_schedules_at_their_boundary_steps(recipe):
    """lr: linear warm-up to lr x batch x accumulate / 256, then cosine to 0 (10 steps per epoch here); the encoder
    momentum is constant (Sec. IV-A: 0.999). small: 0.06, 10 warm-up epochs of 200; paper: 0.03, 5 of 200."""
    cfg = reco.common.parse_config(reco.Config, ["--recipe", recipe], reco.PAPER)
    base, warmup = {"small": (0.06, 100), "paper": (0.03, 50)}[recipe]  # warm-up steps = epochs x 10
    at = lambda step: reco.schedules(cfg, step, 10)
    assert at(0)["lr"] == pytest.approx(base / warmup)  # (step + 1) / warm-up steps
    assert at(warmup - 1)["lr"] == pytest.approx(base) and at(warmup)["lr"] == pytest.approx(base)  # cos(0) = 1
    last = 2000 - 1  # 200 epochs x 10 steps
    assert at(last)["lr"] == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * (last - warmup) / (2000 - warmup))))
    assert at(last)["lr"] < base * 1e-5 and all(at(s)["ema_momentum"] == 0.999 for s in (0, warmup, last))
    half = reco.Config(batch_size=128, accumulate=2, lr=cfg.lr, warmup_epochs=0)  # same effective batch 256
    assert reco.schedules(half, 0, 10)["lr"] == pytest.approx(base)


def test_view_specs_multi_crop():
    """--multi-crop (Interpretation 9): after x_i, x^_i, x-_i, six crops of round(size x 96 / 224) px (SwAV's 96 at
    224), crop scale (0.05, 0.14), x_i's colour augmentations; the three views keep the run's size."""
    assert len(reco.view_specs(reco.Config(), 224)) == 3
    cfg = reco.Config(multi_crop=True)
    for size, side in ((224, 96), (32, 14), (64, 27)):  # 32 x 96 / 224 = 13.71, 64 x 96 / 224 = 27.43
        specs = reco.view_specs(cfg, size)
        strong, small = specs[0], specs[3]
        assert len(specs) == 9 and specs[:3] == reco.view_specs(reco.Config(), size) and specs[3:] == [small] * 6
        assert [s.output_size(size) for s in specs] == [size] * 3 + [side] * 6
        assert small.crop_scale == (0.05, 0.14) and small.flip_p == 0.5
        assert (small.jitter, small.jitter_p, small.gray_p, small.blur_p) == (strong.jitter, 0.8, 0.2, 0.5)
    assert reco.view_specs(cfg, 224)[3].kernel_size(224) == 9 and reco.view_specs(cfg, 32)[3].kernel_size(32) == 1


def test_crop_mean_hand_computed():
    """Eq. (1) averaged over two queries, tau = 1: q1 = k = (1, 0), q2 = (0, 1), queue {(-1, 0)}.
    q1: -log(e / (e + e^-1)) = log(1 + e^-2); q2: both logits 0, log 2; the term is their mean."""
    k, queue = torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, 0.0]])
    queries = (torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    got = reco.crop_mean(reco.infonce_loss, queries, k, queue, 1.0)
    assert got.item() == pytest.approx((math.log(1 + math.exp(-2)) + math.log(2)) / 2)
    assert torch.equal(reco.crop_mean(reco.infonce_loss, queries[:1], k, queue, 1.0),
                       reco.infonce_loss(queries[0], k, queue, 1.0))  # one query: the term itself


def test_forward_loss_multi_crop_matches_the_pure_functions():
    """--multi-crop: Eqs. (1) and (3) averaged over v_i and the six small crops' features (each against x_i's key
    and weak key); Eq. (6) unchanged (x_i only); the gradient reaches the online encoder through the crops."""
    cfg, online, state, views = _tiny_setup(multi_crop=True)
    assert len(views) == 9 and views[3].shape == (4, 3, 14, 14)
    online.eval(), state.eval()
    views[3].requires_grad_()  # a small crop: the loss must depend on it
    loss, _, _, logs = reco.forward_loss(online, state, views, cfg, 7, OneProcess)
    loss.backward()
    assert views[3].grad.abs().sum() > 0
    g, _, _, partner, r = reco.step_randomness(cfg.seed, 7, 4, cfg.mix_alpha, "cpu")
    x_q, x_k, x_w, *small = (v.detach() for v in views)
    with torch.no_grad():
        k, k_w = (F.normalize(state.momentum_encoder(x), dim=1) for x in (x_k, x_w))
        x_mix, r_eff = reco.cutmix(x_q, x_k[partner], r, g)
        queries = [online(x)[0] for x in (x_q, *small)]
        (v_mix,) = online(x_mix)
    csl = sum(reco.infonce_loss(v, k, state.queue, cfg.tau) for v in queries) / 7
    glob = sum(reco.global_relation_loss(v, k_w, state.queue_weak, cfg.tau_ot, cfg.tau_tt) for v in queries) / 7
    local = reco.local_interpolation_loss(v_mix, reco.interpolated_target(queries[0], k[partner], r_eff),
                                          state.queue, cfg.tau)
    assert torch.allclose(logs["csl"], csl, atol=1e-5) and torch.allclose(logs["global_relation"], glob, atol=1e-5)
    assert torch.allclose(logs["local_relation"], local, atol=1e-5)
    assert not torch.allclose(csl, reco.infonce_loss(queries[0], k, state.queue, cfg.tau), atol=1e-4)  # crops count


# ------------------------------------------------------------------------------------------------ the script end to end


def test_smoke_writes_metrics_checkpoint_backbone_and_eval_reads_it(tmp_path):
    out = str(tmp_path / "run")
    # 48 fake images: 12 test images, so some classes have two (Table III needs S_p non-empty)
    run(["reco.py", *TINY, *HEADS, "--fake-size", "48", "--epochs", "1", "--output-dir", out])
    metrics = read_metrics(out)
    steps = [m for m in metrics if "loss" in m]
    assert len(steps) == 6 and all(math.isfinite(m["loss"]) for m in steps)
    assert list(steps[0])[2:6] == ["loss", "csl", "global_relation", "local_relation"]
    assert {"lr", "ema_momentum", "r", "images_per_s"} <= set(steps[0]) and steps[0]["ema_momentum"] == 0.999
    assert all(m["global_relation"] >= 0 and 0 <= m["r"] <= 1 for m in steps)  # a KL divergence; a ratio
    knn = [m for m in metrics if "knn_top1" in m]
    assert [m["epoch"] for m in knn] == [0, 1] and 0 <= knn[-1]["knn_top1"] <= 100
    assert all(math.isfinite(knn[-1][k]) for k in ("s_intra", "s_inter", "phi")) and knn[-1]["phi"] > 0
    assert metrics[-1]["wall_time_s"] > 0 and metrics[-1]["peak_memory_mb"] > 0
    assert latest_checkpoint(out).endswith("checkpoint-6") and os.path.exists(os.path.join(out, "config.json"))
    check_backbone(out, "reco", eval_linear=True)


def test_views_on_device(tmp_path):
    """--views-on device: the three views made in batches on the training device (here the CPU), no workers."""
    out = str(tmp_path / "run")
    run(["reco.py", *TINY, *HEADS, "--epochs", "1", "--eval-every", "0", "--views-on", "device", "--output-dir", out])
    steps = [m for m in read_metrics(out) if "loss" in m]
    assert len(steps) == 4 and all(math.isfinite(m["loss"]) for m in steps)
    assert os.path.exists(os.path.join(out, "backbone.pt"))


@pytest.mark.parametrize("views_on", ["workers", "device"])
def test_multi_crop_smoke(tmp_path, views_on):
    """--multi-crop end to end: nine views per batch (six of 14 px at 32 px) from either view path, finite losses."""
    out = str(tmp_path / "run")
    run(["reco.py", *TINY, *HEADS, "--epochs", "1", "--eval-every", "0", "--multi-crop", "--views-on", views_on,
         "--output-dir", out])
    steps = [m for m in read_metrics(out) if "loss" in m]
    assert len(steps) == 4 and all(math.isfinite(m["loss"]) for m in steps)


def test_resume_equals_uninterrupted(tmp_path):
    args = ["reco.py", *TINY, *HEADS, "--fake-size", "16", "--epochs", "2", "--eval-every", "0",  # 2 steps per epoch
            "--mix", "mixup", "--global-bank", "weak"]
    qa, qb = run_resumed(args, tmp_path)
    for k in ("queue", "queue_weak", "ptr"):
        assert torch.equal(qa[k], qb[k]), k


def ddp_case(accelerator, *args):
    """Run by tests/ddp_step.py on 1 or 2 CPU processes: the script's setup() and one train_step() (loss, backward,
    SGD with momentum and weight decay, momentum update, enqueue) on a fixed global batch of 8, this process taking
    its rows; args: reco flags (e.g. "--image-pair", "q/q") after `--global-bank weak` (the bank with the most state
    to compare; the default key bank is the MoCo queue alone). The online encoder's BN is held in eval mode
    (per-process statistics differ by design on CPU, where SyncBatchNorm is not used); the momentum encoder stays in
    TRAIN mode, because its shuffle BN over the global batch must not depend on the number of processes. reco does
    not clip: the gradients read after the step are the raw ones SGD applied."""
    from accelerate.utils import set_seed
    rank, world, batch = accelerator.process_index, accelerator.num_processes, 8
    cfg = reco.common.parse_config(reco.Config, ["--batch-size", str(batch), "--proj-dim", "16", "--queue-size", "16",
                                                 "--bn-splits", "2", "--global-bank", "weak", *args])
    set_seed(0)
    online, optimizer, state = reco.setup(cfg, NO_DATA, accelerator)
    g = torch.Generator().manual_seed(1)
    sides = [s.output_size(32) for s in reco.view_specs(cfg, 32)]  # --multi-crop: six more views of 14 px
    views = [torch.randn(batch, 3, side, side, generator=g) for side in sides]
    state.queue.copy_(F.normalize(torch.randn(16, cfg.proj_dim, generator=g), dim=1))
    state.queue_weak.copy_(F.normalize(torch.randn(16, cfg.proj_dim, generator=g), dim=1))
    state.ptr.fill_(12)  # the enqueue of 8 keys wraps around the end
    online.eval()
    state.train()
    mine = slice(rank * batch // world, (rank + 1) * batch // world)
    logs = reco.train_step(online, state, optimizer, [v[mine] for v in views], torch.arange(batch)[mine], cfg,
                           {"lr": 0.1, "ema_momentum": 0.9}, 3, accelerator)
    raw = accelerator.unwrap_model(online)
    mean = lambda t: accelerator.reduce(t.detach(), "mean")
    return {"pairs": (cfg.image_pair, cfg.feature_pair), "views": len(views), "r": logs["r"],
            "loss": mean(logs["loss"]), "csl": mean(logs["csl"]), "global": mean(logs["global_relation"]),
            "local": mean(logs["local_relation"]),
            "grads": {n: p.grad.clone() for n, p in raw.named_parameters()},
            "online": {n: p.detach().clone() for n, p in raw.named_parameters()},  # after SGD's momentum and decay
            "momentum_encoder": state.momentum_encoder.state_dict(), "queue": state.queue.clone(),
            "queue_weak": state.queue_weak.clone(), "ptr": state.ptr.clone()}


@pytest.mark.parametrize("args", [[], ["--image-pair", "q/q", "--feature-pair", "q/q"], ["--multi-crop"]],
                         ids=["defaults", "q/q", "multi-crop"])
def test_two_processes_equal_one(tmp_path, args):
    """One train_step on 1 and on 2 processes, the same global batch: the same loss terms, raw gradients, updated
    online encoder, momentum encoder (shuffle BN over the global batch), queue, bank and pointer, on both ranks."""
    one, ranks = two_process_results("reco", tmp_path, *args)
    assert one["pairs"] == (("q/q", "q/q") if "q/q" in args else ("q/k", "q/k"))  # the flags reached the Config
    assert one["views"] == (9 if "--multi-crop" in args else 3)
    assert one["local"] > 0 and one["global"] > 0
    for rank in ranks:
        assert rank["r"] == one["r"] and rank["ptr"].item() == one["ptr"].item() == 4
        for k in ("loss", "csl", "global", "local", "queue", "queue_weak"):
            assert torch.allclose(one[k], rank[k], atol=1e-5), k
        for group, atol in (("grads", 1e-5), ("online", 1e-6), ("momentum_encoder", 1e-6)):
            assert set(rank[group]) == set(one[group]), group
            for k in one[group]:
                assert torch.allclose(one[group][k].float(), rank[group][k].float(), atol=atol), (group, k)
    for group in ("grads", "online", "momentum_encoder"):  # identical on every process, not only close
        assert all(torch.equal(ranks[0][group][k], ranks[1][group][k]) for k in one[group]), group
    for k in ("queue", "queue_weak"):
        assert torch.equal(ranks[0][k], ranks[1][k]), k



def test_two_process_training_run(tmp_path_factory):
    """The real loop on 2 CPU processes (conftest.TWO_PROCESS_RUNS): runs, logs, checkpoints (bn-splits 2 = one
    shuffle-BN group per process)."""
    out = two_process_run("reco", tmp_path_factory)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["provenance"]["num_processes"] == 2  # really distributed, 4 images per process
    assert any("knn_top1" in m for m in read_metrics(out)) and os.path.exists(os.path.join(out, "backbone.pt"))


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("changes, num_processes, message", [
    ({"bn_splits": 3}, 1, "--bn-splits 3 must divide --batch-size 8"),
    ({"bn_splits": 2}, 4, "be a multiple of the number of processes (4)"),
    ({"bn_splits": 8}, 1, "fewer than 2 images per BatchNorm group"),
    ({"bn_splits": 0}, 1, "--bn-splits must be at least 1"),
    ({"queue_size": 4}, 1, "--queue-size 4 must be at least --batch-size 8"),
    ({"queue_size": -1}, 1, "--queue-size -1 must be at least"),
    ({"proj_dim": 0}, 1, "--proj-dim must be at least 1"),
    ({"tau": 0.0}, 1, "--tau must be positive"),
    ({"tau_ot": -0.1}, 1, "--tau-ot must be positive"),
    ({"tau_tt": 0.0}, 1, "--tau-tt must be positive"),
    ({"mix_alpha": -1.0}, 1, "--mix-alpha must be positive"),
    ({"lambda_global": -1.0}, 1, "--lambda-global must be 0 or more"),
    ({"lambda_local": -1.0}, 1, "--lambda-local must be 0 or more"),
    ({"ema_momentum": 1.5}, 1, "--ema-momentum must lie in [0, 1]"),
])
def test_check_config_names_the_flag(changes, num_processes, message):
    cfg = reco.Config(**{"batch_size": 8, "bn_splits": 2, "warmup_epochs": 1, **changes})
    with pytest.raises(reco.common.UserError, match=re.escape(message)):
        reco.check_config(cfg, num_processes)
    reco.check_config(reco.Config(batch_size=8, bn_splits=2), 2)  # fine


@pytest.mark.parametrize("args, message", [
    (["--bn-splits", "3"], "--bn-splits 3 must divide --batch-size 8"),
    (["--bn-splits", "8"], "--bn-splits 8 leaves fewer than 2 images per BatchNorm group"),
    (["--queue-size", "4"], "--queue-size 4 must be at least --batch-size 8"),
    (["--proj-dim", "0"], "--proj-dim must be at least 1"),
    (["--tau", "0"], "--tau must be positive"),
    (["--tau-ot", "0"], "--tau-ot must be positive"),
    (["--tau-tt", "-1"], "--tau-tt must be positive"),
    (["--mix-alpha", "0"], "--mix-alpha must be positive"),
    (["--lambda-global", "-1"], "--lambda-global must be 0 or more"),
    (["--lambda-local", "-1"], "--lambda-local must be 0 or more"),
    (["--ema-momentum", "1.5"], "--ema-momentum must lie in [0, 1]"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_flag_is_one_error_line(args, message, capsys):
    """Runs the command line in this process (as `python reco.py ...` would, without the start-up cost)."""
    code, lines = cli_error("reco.py", [*TINY, *HEADS, "--epochs", "1", *args], capsys)
    assert code == 2 and not any("Traceback" in line for line in lines)
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]] and message in lines[-1], lines[-3:]

