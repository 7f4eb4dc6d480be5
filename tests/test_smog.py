"""SMoG: the three public functions (Eqs. 3-4) against hand-computed values and loop transcriptions, limits, where
gradient flows and where it must not; beta schedule, k-means, the periodic resets; and the script end to end (smoke,
resume, two processes equal one, bad input, no collapse on real images).

Run as a script (`python tests/test_smog.py OUT_DIR`, under torchrun for 2 processes) it is the 2-process helper.
"""
import math
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import smog  # noqa: E402
from conftest import TINY, check_backbone, read_metrics, run, run_resumed  # noqa: E402

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
    # closest group by cosine, NOT argmin (papers/README.md); [5, 4] is nearer [1, 0] than [0, 1]
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
    new, counts = smog.update_groups(groups, z, assign, beta, return_counts=True)
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
    in addition to the prediction path; detaching the groups (the released code's choice) cuts that path."""
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
    with pytest.raises(ValueError, match="beta-schedule"):
        smog.beta_schedule(0, 10, kind="cosine")


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
    avg, counts = smog.group_step(g, z, assign, "average", 0.9, seen, None)
    assert torch.equal(counts, torch.tensor([2.0, 0.0]))
    assert torch.allclose(avg[0], F.normalize(torch.tensor([0.5, 0.5]), dim=0)) and torch.equal(avg[1], g[1])
    paper, _ = smog.group_step(g, z, assign, "average-paper", 0.9, seen, None)
    assert torch.allclose(paper[0], F.normalize(torch.tensor([0.75, 0.25]), dim=0))
    for seed in range(20):
        rows = torch.eye(6)
        drawn, _ = smog.group_step(torch.zeros(4, 6), rows, torch.zeros(6, dtype=torch.long), "random", 0.9,
                                   torch.zeros(4), torch.Generator().manual_seed(seed))
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
    assert logs["class_counts"].sum() == 10 and logs["same_group"][1] == 10


def test_forward_loss_alternates_schemes_and_inits_groups_by_kmeans():
    torch.manual_seed(10)
    cfg = smog.Config(num_groups=4, proj_dim=4, group_init="kmeans")
    online = _Split()
    state = smog.MomentumState(online, 4, 4, cache_size=0, num_classes=3)
    x1, x2 = torch.randn(6, 3, 2, 2), torch.randn(6, 3, 2, 2)
    y = torch.zeros(6, dtype=torch.long)
    _, g0, z0, _ = smog.forward_loss(online, state, [x1, x2], y, cfg, 1.0, 0, _OneProcess())
    _, _, z1, _ = smog.forward_loss(online, state, [x1, x2], y, cfg, 1.0, 1, _OneProcess())
    with torch.no_grad():
        assert torch.allclose(z0, online.projector(x1.flatten(1)))  # step 0: online stream gets scheme 1
        assert torch.allclose(z1, online.projector(x2.flatten(1)))  # step 1: the schemes swap streams
        # beta = 1 keeps the groups: they are the k-means of the first batch's online features
        km, _ = smog.spherical_kmeans(z0, 4, cfg.kmeans_iters, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(g0, km, atol=1e-6)


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
                                               generator=torch.Generator().manual_seed(5 * 1_000_003 + 300))
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


def test_diagnostics():
    class_counts = torch.tensor([[4.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    d = smog.diagnostics(class_counts, torch.tensor([3, 4]))
    assert d["groups_used"] == 2 and d["same_group"] == pytest.approx(75.0)
    assert d["group_label_entropy"] == pytest.approx((0.0 + math.log(2)) / 2)


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


# ----------------------------------------------------------------------------- the script end to end


def test_smoke_writes_metrics_checkpoint_backbone_and_eval_reads_it(tmp_path):
    out = str(tmp_path / "run")
    run(["smog.py", *TINY, *HEADS, "--epochs", "2", "--output-dir", out])
    metrics = read_metrics(out)
    steps = [m for m in metrics if "loss" in m]
    assert len(steps) == 8 and all(math.isfinite(m["loss"]) for m in steps)
    assert {"beta", "lr", "groups_used_step", "z_std", "images_per_s"} <= set(steps[0])
    assert steps[0]["beta"] == 1.0 and steps[-1]["beta"] == pytest.approx(0.99)
    knn = [m for m in metrics if "knn_top1" in m]
    assert [m["epoch"] for m in knn] == [0, 1, 2] and 0 <= knn[-1]["knn_top1"] <= 100
    assert 1 <= knn[-1]["groups_used"] <= 8 and knn[-1]["group_label_entropy"] >= 0 and "same_group" in knn[-1]
    assert os.path.isdir(os.path.join(out, "checkpoint-2")) and os.path.exists(os.path.join(out, "config.json"))
    check_backbone(out, "smog", eval_linear=True)


def test_ablation_flags_run(tmp_path):
    out = str(tmp_path / "ablation")
    run(["smog.py", *TINY, *HEADS, "--epochs", "1", "--eval-every", "0", "--group-update", "average",
         "--beta-schedule", "fixed", "--beta-end", "0.9", "--no-encoder-reset", "--detach-groups",
         "--group-init", "random", "--output-dir", out])
    steps = [m for m in read_metrics(out) if "loss" in m]
    assert all(m["beta"] == 0.9 for m in steps) and all(math.isfinite(m["loss"]) for m in steps)


def test_resume_equals_uninterrupted(tmp_path):
    """--reset-every 3 with 4 steps per epoch: the reset at step 6 uses cached features from epoch 1."""
    args = ["smog.py", *TINY, *HEADS, "--epochs", "2", "--eval-every", "0"]
    sa, sb = run_resumed(args, tmp_path)
    for k in ("groups", "cache", "seen"):
        assert torch.equal(sa[k], sb[k]), k


def test_two_processes_equal_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    run(["tests/test_smog.py", str(one)])
    run(["tests/test_smog.py", str(two)], nproc=2)
    for rule in ("momentum", "random"):
        a, r0, r1 = (torch.load(p / f"{rule}-rank{r}.pt") for p, r in ((one, 0), (two, 0), (two, 1)))
        assert torch.allclose(a["loss"], r0["loss"], atol=1e-6), rule
        assert a["grads"].keys() == r0["grads"].keys()
        for k in a["grads"]:
            assert torch.allclose(a["grads"][k], r0["grads"][k], atol=1e-6), (rule, k)
            assert torch.equal(r0["grads"][k], r1["grads"][k]), (rule, k)
        for r in (r0, r1):  # groups, cache, k-means and f^_eta identical on every rank and equal to one process
            for k in ("groups", "counts", "cache", "groups_after_reset", "same_group"):
                assert torch.allclose(a[k].float(), r[k].float(), atol=1e-6), (rule, k)
            assert all(torch.allclose(a["target"][k], r["target"][k], atol=1e-6) for k in a["target"])
        for k in ("groups", "cache", "groups_after_reset"):
            assert torch.equal(r0[k], r1[k]), (rule, k)
    # the gradient through the groups reaches the projector (a detached update would leave only the predictor path)
    assert any(k.startswith("projector") and a["grads"][k].abs().sum() > 0 for k in a["grads"])


def test_two_process_training_run(tmp_path):
    """The real loop under torchrun, k-means resets included: runs, logs, checkpoints."""
    out = str(tmp_path / "ddp")
    run(["smog.py", *TINY, *HEADS, "--epochs", "1", "--output-dir", out], nproc=2)
    assert any("knn_top1" in m for m in read_metrics(out)) and os.path.exists(os.path.join(out, "backbone.pt"))


def test_bad_input_gives_one_clear_message():
    """SMoG's own flags (the generic ones are tested with ressl.py): one subprocess, the rest in-process."""
    p = run(["smog.py", *TINY, *HEADS, "--epochs", "1", "--num-groups", "0"], check=False)
    assert p.returncode == 2 and "--num-groups must be at least 1" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("field, value, message", [
    ("beta_end", 1.5, "--beta-end must lie in [0, 1]"),
    ("tau", 0.0, "--tau must be positive"),
    ("reset_every", -1, "--reset-every must be 0 (never) or positive"),
    ("kmeans_iters", -2, "--kmeans-iters must be 0 or positive"),
    ("crop_min_scale", 0.0, "--crop-min-scale must lie in (0, 1]"),
])
def test_check_config(field, value, message):
    import common

    with pytest.raises(common.UserError) as e:
        smog.check_config(smog.Config(**{field: value}))
    assert message in str(e.value)


# ----------------------------------------------------------------------------- real images

FAST = ["--dataset", "imagefolder", "--stem", "imagenet", "--batch-size", "128", "--num-workers", "0",
        "--log-every", "5", "--warmup-epochs", "1", "--num-groups", "128", "--reset-every", "10"]


def test_no_collapse_on_real_images(cifar_subset, tmp_path):
    """CI's collapse check (1 epoch, 15 steps, one k-means reset, kNN only at the end): groups stay in use and the
    online embeddings keep their spread.

    Floors: at least 16 of the 128 groups receive features over the last epoch, and the per-dimension std of the
    L2-normalised projections stays above 0.02 (0 = collapsed to one point; 1/sqrt(128) = 0.088 is isotropic), and
    kNN top-1 stays above 15 % (tests/test_learning.py). The learning test is the slow one in tests/test_learning.py.
    """
    out = str(tmp_path / "collapse")
    run(["smog.py", *FAST, "--data-dir", cifar_subset, "--epochs", "1", "--eval-every", "0", "--output-dir", out])
    metrics = read_metrics(out)
    last = [m for m in metrics if "knn_top1" in m][-1]
    spread = [m["z_std"] for m in metrics if "z_std" in m]
    print(f"SMoG 1 epoch: groups used {last['groups_used']}, z_std {spread[-1]:.4f}, kNN {last['knn_top1']:.1f}%")
    assert last["groups_used"] >= 16 and min(spread) > 0.02
    assert last["knn_top1"] > 15.0  # chance (collapse) is 10 %; tests/test_learning.py explains the floor


# ----------------------------------------------------------------------------- 2-process helper (run as a script)


def _ddp_check(out_dir):
    """One SMoG step on a fixed global batch of 8, then a k-means / encoder reset, with 1 or 2 CPU processes.

    BatchNorm in eval mode (per-process batch statistics differ by design on CPU, where SyncBatchNorm is not used).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    for rule in ("momentum", "random"):
        cfg = smog.Config(proj_hidden=32, proj_dim=16, num_groups=6, group_update=rule, reset_every=3, seed=3)
        set_seed(0)
        online = smog.Online(cfg, cifar_stem=False)
        g = torch.Generator().manual_seed(1)
        B = 8
        x1, x2 = torch.randn(B, 3, 32, 32, generator=g), torch.randn(B, 3, 32, 32, generator=g)
        labels = torch.randint(0, 10, (B,), generator=g)
        optimizer = torch.optim.SGD(online.parameters(), lr=0.1, momentum=0.9)
        online, optimizer = accelerator.prepare(online, optimizer)
        raw = accelerator.unwrap_model(online)
        state = smog.MomentumState(raw, 6, 16, cache_size=3 * B, num_classes=10)
        state.groups.copy_(F.normalize(torch.randn(6, 16, generator=g), dim=1))
        state.cache.copy_(torch.randn(3 * B, 16, generator=g))
        state.initialised.fill_(True)
        online.eval()
        state.target.eval()
        local = slice(rank * B // world, (rank + 1) * B // world)
        loss, new_groups, z_all, logs = smog.forward_loss(online, state, [x1[local], x2[local]], labels[local], cfg,
                                                          0.9, 1, accelerator)
        accelerator.backward(loss)
        grads = {n: p.grad.clone() for n, p in raw.named_parameters() if p.grad is not None}
        optimizer.step()
        online_view = nn.Sequential(raw.backbone, raw.projector)
        smog.ema_update(state.target, online_view, 0.9)
        state.groups.copy_(new_groups)
        smog.write_cache(state.cache, z_all, 1, 3)
        groups, cache = state.groups.clone(), state.cache.clone()
        smog.periodic_reset(state, online_view, cfg, step=3)
        torch.save({"loss": accelerator.reduce(loss.detach(), "mean"), "grads": grads, "groups": groups,
                    "counts": logs["counts"], "cache": cache, "groups_after_reset": state.groups.clone(),
                    "same_group": accelerator.reduce(logs["same_group"], "sum"),
                    "target": state.target.state_dict()}, os.path.join(out_dir, f"{rule}-rank{rank}.pt"))


if __name__ == "__main__":
    _ddp_check(sys.argv[1])
