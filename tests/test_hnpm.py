"""Tests for hnpm.py: the loss on hand-computed numbers and against a loop transcription, the Eq. (5) threshold,
the empty hard set, where gradient flows, the script's own train_step (roles of the two networks and views, the hard
set's pair, the EMA's direction, no host sync, the fp16 skipped step), two processes against one, and the training
script end to end (smoke, device views, resume, bad input)."""
import copy
import dataclasses
import json
import math
import os
import signal
import types

import pytest
import torch
import torch.nn as nn

import common
import hnpm
from conftest import (TINY, check_backbone, cli_error, grads_before_clipping, read_metrics, run, run_resumed,
                      two_process_results, two_process_run)
from sync_detector import HostTensors, SyncDetector

HEADS = ["--proj-hidden", "32", "--proj-dim", "16"]
SMALL = list(TINY)
SMALL[SMALL.index("--fake-size") + 1] = "16"  # 2 steps of 8 per epoch: the CPU tests stay inside CI's budget
NO_DATA = types.SimpleNamespace(cifar_stem=False)  # what setup() reads of the data


# ----------------------------------------------------------------------------- loss

def _loop_hnpm(u_t, u_s, alpha1=0.8, alpha2=0.1, threshold=1.0, mining="threshold"):
    """Plain Python transcription of Eqs. (2)-(5), (7) with DisSim = mean over dims (Interpretation 1)."""
    t = [[float(x) for x in row] for row in u_t]
    s = [[float(x) for x in row] for row in u_s]
    t = [[x / max(abs(v) for v in row) for x in row] for row in t]
    s = [[x / max(abs(v) for v in row) for x in row] for row in s]
    B, D = len(t), len(t[0])

    def dissim(a, b):
        return sum((a[k] - b[k]) ** 2 for k in range(D)) / D

    l1 = sum(dissim(t[i], s[i]) for i in range(B)) / B
    terms, sizes = [], []
    for i in range(B):
        total, size = 0.0, 0
        for j in range(B):
            if j != i and (mining == "all" or dissim(s[i], t[j]) <= threshold):
                total += dissim(s[i], t[j])
                size += 1
        sizes.append(size)
        if size > 0:
            terms.append(-math.log(max(total, 1e-8)))
    l2 = sum(terms) / len(terms) if terms else 0.0
    return alpha1 * l1 + alpha2 * l2, l1, l2, sum(sizes) / B, sum(z == 0 for z in sizes) / B


def test_hand_computed():
    # L-inf normalised: t = [1, .5], [0, -1], [1, 1]; s = [1, 0], [0, 1], [-1, 1]
    u_t = torch.tensor([[2.0, 1.0], [0.0, -1.0], [1.0, 1.0]])
    u_s = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]])
    # L1 = mean(0.125, 2, 2); DisSim(s_i, t_j) = [[.125, 1, .5], [.625, 2, .5], [2.125, 2.5, 2]]
    # hard sets: {1, 2} (DisSim 1 is included) -> 1.5, {0, 2} -> 1.125, anchor 2 empty -> left out
    l1 = (0.125 + 2.0 + 2.0) / 3
    l2 = -(math.log(1.5) + math.log(1.125)) / 2
    loss, parts = hnpm.hnpm_loss(u_t, u_s), hnpm.hnpm_terms(u_t, u_s)
    assert loss.item() == pytest.approx(0.8 * l1 + 0.1 * l2, rel=1e-6)
    assert parts["l1"].item() == pytest.approx(l1, rel=1e-6)
    assert parts["l2"].item() == pytest.approx(l2, rel=1e-6)
    assert parts["hard_size"].item() == pytest.approx(4 / 3)
    assert parts["empty_frac"].item() == pytest.approx(1 / 3)
    assert parts["mask"].tolist() == [[False, True, True], [True, False, True], [False, False, False]]


def test_hardest_keeps_only_the_nearest_negative_hand_computed():
    # the inputs of test_hand_computed: DisSim(s_i, t_j) = [[.125, 1, .5], [.625, 2, .5], [2.125, 2.5, 2]]
    # hardest j != i: anchor 0 -> 2 (.5), anchor 1 -> 2 (.5), anchor 2 -> 0 (2.125; no threshold, so never empty)
    u_t = torch.tensor([[2.0, 1.0], [0.0, -1.0], [1.0, 1.0]])
    u_s = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]])
    l1 = (0.125 + 2.0 + 2.0) / 3
    l2 = -(math.log(0.5) + math.log(0.5) + math.log(2.125)) / 3
    loss, parts = hnpm.hnpm_loss(u_t, u_s, 0.8, 0.1, 1.0, mining="hardest"), hnpm.hnpm_terms(u_t, u_s, mining="hardest")
    assert loss.item() == pytest.approx(0.8 * l1 + 0.1 * l2, rel=1e-6)
    assert parts["l2"].item() == pytest.approx(l2, rel=1e-6)
    assert parts["mask"].tolist() == [[False, False, True], [False, False, True], [True, False, False]]
    assert parts["hard_size"].item() == 1 and parts["empty_frac"].item() == 0
    # the pair statistics that say how far the batch is from the threshold (j != i only)
    assert parts["dissim_mean"].item() == pytest.approx((1 + .5 + .625 + .5 + 2.125 + 2.5) / 6, rel=1e-6)
    assert parts["dissim_max"].item() == pytest.approx(2.5)


def test_mining_rules():
    d = torch.tensor([[0.0, 0.3, 1.2, 0.2], [0.9, 0.0, 0.4, 1.5], [1.1, 0.1, 0.0, 0.1], [0.3, 0.3, 2.0, 0.0]])
    thr = hnpm.hard_negative_mask(d, 1.0, "threshold")
    assert thr.tolist() == [[False, True, False, True], [True, False, True, False],
                            [False, True, False, True], [True, True, False, False]]
    assert hnpm.hard_negative_mask(d, 1.0, "all").sum().item() == 12
    # hardest: smallest d[i, j] over j != i (the zero diagonal is never chosen), first index on a tie (row 2, 3)
    assert hnpm.hard_negative_mask(d, 1.0, "hardest").nonzero().tolist() == [[0, 3], [1, 2], [2, 1], [3, 0]]
    assert torch.equal(hnpm.hard_negative_mask(d, 0.0, "hardest"), hnpm.hard_negative_mask(d, 5.0, "hardest"))
    with pytest.raises(AssertionError, match="mining='nearest'"):
        hnpm.hnpm_loss(torch.randn(3, 2), torch.randn(3, 2), mining="nearest")


def test_hardest_gradient_goes_only_through_the_nearest_pair():
    g = torch.Generator().manual_seed(6)
    u_t = torch.randn(5, 4, generator=g, dtype=torch.float64).requires_grad_()
    u_s = u_t.detach() + 0.8 * torch.randn(5, 4, generator=g, dtype=torch.float64)
    torch.autograd.gradcheck(lambda x: hnpm.hnpm_loss(x, u_s, mining="hardest"), (u_t,))
    parts = hnpm.hnpm_terms(u_t, u_s, mining="hardest")
    hnpm.hnpm_loss(u_t, u_s, alpha1=0.0, mining="hardest").backward()  # L2 alone
    used = parts["mask"].any(dim=0)  # teacher rows that are some anchor's nearest negative
    assert (u_t.grad[~used] == 0).all() and (u_t.grad[used].abs().sum(-1) > 0).all()


def test_threshold_includes_and_excludes_exactly_at_one():
    # DisSim(s_0, t_1) = ((1 - (-1))^2 + 0 + 0 + 0) / 4 = 1 exactly; DisSim(s_1, t_0) = 1 too.
    u_t = torch.tensor([[1.0, 1.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0]])
    u_s = torch.tensor([[1.0, 0.0, 0.0, 0.0], [-1.0, 1.0, 0.0, 0.0]])
    at_one = hnpm.hnpm_terms(u_t, u_s, threshold=1.0)
    assert at_one["mask"].tolist() == [[False, True], [True, False]]
    assert at_one["l2"].item() == pytest.approx(-math.log(1.0), abs=1e-7)
    below = 1.0 - 2.0 ** -24  # the float32 just below 1
    under = hnpm.hnpm_terms(u_t, u_s, threshold=below)
    assert not under["mask"].any() and under["empty_frac"].item() == 1.0
    d = hnpm.pairwise_dissim(hnpm.linf_normalize(u_s), hnpm.linf_normalize(u_t))
    assert d[0, 1].item() == 1.0


@pytest.mark.parametrize("mining", ["threshold", "all"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_loop(seed, mining):
    g = torch.Generator().manual_seed(seed)
    u_t = torch.randn(9, 5, generator=g, dtype=torch.float64)
    u_s = u_t + 0.7 * torch.randn(9, 5, generator=g, dtype=torch.float64)  # some pairs near, some far
    loss = hnpm.hnpm_loss(u_t, u_s, alpha1=0.3, alpha2=0.6, threshold=0.8, mining=mining)
    parts = hnpm.hnpm_terms(u_t, u_s, threshold=0.8, mining=mining)
    ref, l1, l2, size, empty = _loop_hnpm(u_t.tolist(), u_s.tolist(), 0.3, 0.6, 0.8, mining)
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    assert parts["l1"].item() == pytest.approx(l1, rel=1e-5)
    assert parts["l2"].item() == pytest.approx(l2, rel=1e-5, abs=1e-6)
    assert parts["hard_size"].item() == pytest.approx(size)
    assert parts["empty_frac"].item() == pytest.approx(empty)
    if mining == "threshold" and seed == 0:
        assert 0 < size < 8  # the case really mines something and leaves something out


def test_empty_hard_set_gives_zero_l2_and_still_trains():
    # every student row is far (DisSim > 1) from every other teacher row, so no anchor has a hard negative
    u_s = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0]])
    u_t = torch.tensor([[1.0, 0.5], [-1.0, 0.5], [0.5, -1.0]], requires_grad=True)
    loss, parts = hnpm.hnpm_loss(u_t, u_s), hnpm.hnpm_terms(u_t, u_s)
    assert parts["l2"].item() == 0.0 and parts["empty_frac"].item() == 1.0 and parts["hard_size"].item() == 0.0
    assert loss.item() == pytest.approx(0.8 * 0.125)  # alpha1 * L1 only
    loss.backward()
    assert torch.isfinite(u_t.grad).all() and u_t.grad.abs().sum() > 0


def test_no_mining_takes_every_other_row():
    u = torch.randn(6, 4)
    parts = hnpm.hnpm_terms(u + 5, u, mining="all")
    assert parts["hard_size"].item() == 5 and parts["empty_frac"].item() == 0
    assert parts["mask"].sum().item() == 30 and not parts["mask"].diagonal().any()


def test_identical_views_have_zero_positive_loss_and_linf_scale_invariance():
    g = torch.Generator().manual_seed(3)
    u = torch.randn(8, 6, generator=g)
    parts = hnpm.hnpm_terms(u, u)
    assert parts["l1"].item() == pytest.approx(0.0, abs=1e-7)
    v = torch.randn(8, 6, generator=g)
    scale_t, scale_s = torch.rand(8, 1, generator=g) * 10 + 0.1, torch.rand(8, 1, generator=g) * 10 + 0.1
    a = hnpm.hnpm_loss(u, v)
    b = hnpm.hnpm_loss(u * scale_t, v * scale_s)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    assert hnpm.linf_normalize(u).abs().amax(-1).allclose(torch.ones(8))


def test_gradient_reaches_teacher_never_student():
    g = torch.Generator().manual_seed(4)
    u_t = torch.randn(8, 6, generator=g).requires_grad_()
    u_s = (u_t.detach() + 0.5 * torch.randn(8, 6, generator=g)).requires_grad_()
    loss = hnpm.hnpm_loss(u_t, u_s)
    loss.backward()
    assert u_s.grad is None
    assert torch.isfinite(u_t.grad).all() and u_t.grad.abs().sum() > 0
    # the Fig. 2 ablation "student gradient" lets it through
    u_t.grad = None
    hnpm.hnpm_loss(u_t, u_s, student_grad=True).backward()
    assert u_s.grad is not None and u_s.grad.abs().sum() > 0


def test_gradient_of_both_terms_matches_autograd_check():
    g = torch.Generator().manual_seed(5)
    u_t = torch.randn(6, 4, generator=g, dtype=torch.float64).requires_grad_()
    u_s = u_t.detach() + 0.6 * torch.randn(6, 4, generator=g, dtype=torch.float64)
    # the mask is piecewise constant, so away from the threshold the loss is smooth in u_teacher
    torch.autograd.gradcheck(lambda x: hnpm.hnpm_loss(x, u_s), (u_t,))


def test_float32_under_autocast():
    u = torch.randn(8, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = hnpm.hnpm_loss(u.bfloat16(), (u + 0.3).bfloat16())
    assert loss.dtype == torch.float32


def test_bad_shapes():
    with pytest.raises(AssertionError, match="same shape"):
        hnpm.hnpm_loss(torch.randn(4, 3), torch.randn(5, 3))


def test_mined_pairs_counts_same_label_pairs():
    mask = torch.tensor([[False, True, True], [True, False, False], [False, False, False]])
    labels = torch.tensor([0, 0, 1])
    assert hnpm.mined_pairs(mask, labels).tolist() == [2, 3]
    assert hnpm.mined_pairs(torch.zeros(3, 3, dtype=torch.bool), labels).tolist() == [0, 0]


# ----------------------------------------------------------------------------- momentum and schedules

@pytest.mark.parametrize("tau", [0.0, 1.0, 0.5])
def test_ema_update(tau):
    student = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    teacher = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    teacher(torch.randn(5, 3))  # moves the teacher's running statistics
    s0 = [p.clone() for p in student.parameters()]
    hnpm.ema_update(student, teacher, tau)
    for before, p_s, p_t in zip(s0, student.parameters(), teacher.parameters()):  # Eq. (6) on the parameters
        assert torch.allclose(p_s, tau * before + (1 - tau) * p_t)
        if tau in (0.0, 1.0):  # Table 7's ends: a copy of the teacher, a frozen student
            assert torch.equal(p_s, p_t if tau == 0.0 else before)
    for b_s, b_t in zip(student.buffers(), teacher.buffers()):  # Interpretation 9: BN statistics are copied
        assert torch.equal(b_s, b_t)


def test_lr_schedule_end_points():
    assert hnpm.lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert hnpm.lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert hnpm.lr_at(0, 100, 0, 0.1) == pytest.approx(0.1)
    assert hnpm.lr_at(100, 100, 0, 0.1) == pytest.approx(0.0, abs=1e-12)


def test_schedules_small_protocol_and_paper():
    """10 steps per epoch. Small (defaults): SGD lr 0.06 x 256 / 256, 10 warm-up epochs (100 steps), then a cosine over
    the other 1900 steps of 200 epochs. Paper: Adam lr 0.1 as given, no warm-up, one cosine over 100 epochs (1000
    steps). --accumulate 2 doubles the effective batch: sgd's lr doubles, Adam's does not."""
    small = hnpm.Config()
    lr = lambda cfg, step: hnpm.schedules(cfg, step, 10)["lr"]
    assert hnpm.schedules(small, 0, 10) == {"lr": pytest.approx(0.06 / 100), "ema_tau": 0.5}
    assert lr(small, 99) == pytest.approx(0.06) and lr(small, 100) == pytest.approx(0.06)  # end of warm-up, top
    assert lr(small, 1999) == pytest.approx(0.03 * (1 + math.cos(math.pi * 1899 / 1900)))  # the last step
    assert lr(dataclasses.replace(small, accumulate=2), 100) == pytest.approx(0.12)
    paper = hnpm.Config(**hnpm.PAPER)
    assert hnpm.schedules(paper, 0, 10) == {"lr": pytest.approx(0.1), "ema_tau": 0.5}  # Sec. 3.5
    assert lr(paper, 500) == pytest.approx(0.05)  # half-way down the 100-epoch cosine
    assert lr(paper, 999) == pytest.approx(0.05 * (1 + math.cos(math.pi * 999 / 1000)))  # the last step
    assert lr(dataclasses.replace(paper, accumulate=2), 0) == pytest.approx(0.1)


def test_defaults_are_the_small_protocol_and_paper_recipe_is_sec_3_5():
    cfg, base = hnpm.Config(), common.BaseConfig()
    # the generic fields are the shared small protocol: hnpm.py overrides none of them
    assert all(getattr(cfg, f.name) == getattr(base, f.name) for f in dataclasses.fields(base))
    # HNPM's own values are Sec. 3.5's in both recipes
    assert (cfg.ema_tau, cfg.alpha1, cfg.alpha2, cfg.grad_clip, cfg.threshold, cfg.mining) == (0.5, 0.8, 0.1, 1.0,
                                                                                              1.0, "threshold")
    paper = common.parse_config(hnpm.Config, ["--recipe", "paper"], hnpm.PAPER)
    assert (paper.optimizer, paper.lr, paper.batch_size, paper.epochs, paper.arch) == ("adam", 0.1, 160, 100,
                                                                                     "resnet50")
    assert (paper.weight_decay, paper.warmup_epochs, paper.grad_clip, paper.ema_tau) == (0.0, 0, 1.0, 0.5)
    assert dataclasses.replace(paper, recipe="auto", **{k: getattr(cfg, k) for k in hnpm.PAPER}) == cfg  # only these
    typed = common.parse_config(hnpm.Config, ["--recipe", "paper", "--lr", "0.01", "--batch-size", "64"], hnpm.PAPER)
    assert (typed.lr, typed.batch_size, typed.optimizer) == (0.01, 64, "adam")  # typed flags win over the recipe


# ----------------------------------------------------------------------------- networks and views

def test_teacher_heads():
    cfg = hnpm.Config(proj_hidden=8, proj_dim=4)
    assert hnpm.Teacher(cfg, cifar_stem=True)(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    bare = hnpm.Teacher(hnpm.Config(projector=False), cifar_stem=True)
    assert isinstance(bare.projector, nn.Identity) and bare(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_views_are_the_papers_and_the_student_sees_the_plain_image():
    augmented, plain = hnpm.view_specs(hnpm.Config(), 32)
    # Sec. 3.5: jitter (0.8, 0.8, 0.8, 0.2) on 80 %, grayscale 20 %, flip 50 %, 3x3 blur sigma 1.5 on 10 %, crop [0.8, 1]
    assert (augmented.jitter, augmented.jitter_p, augmented.gray_p, augmented.flip_p) == ((0.8, 0.8, 0.8, 0.2), 0.8,
                                                                                         0.2, 0.5)
    assert (augmented.blur_p, augmented.blur_sigma, augmented.kernel_size(32)) == (0.1, (1.5, 1.5), 3)
    assert augmented.crop_scale == (0.8, 1.0) and augmented.solarize_p == 0
    from PIL import Image
    stats = ((0.5, 0.4, 0.3), (0.25, 0.2, 0.3))
    hwc = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    img, u8 = Image.fromarray(hwc.numpy()), hwc.permute(2, 0, 1)[None]  # PIL for torchvision, uint8 for batches
    # both data paths give the un-augmented image, as the evaluation transform does
    expected = common.eval_transform(32, stats)(img)
    for seed in range(3):
        torch.manual_seed(seed)
        assert torch.equal(common.torchvision_view(plain, 32, stats)(img), expected)
        got = common.batched_view(plain, u8, 32, stats, common.view_generator(seed, 0, 0, 1))
        assert torch.allclose(got[0], expected, atol=1e-4)


# ----------------------------------------------------------------------------- the script's own step

def _step_setup(accelerator=None, **overrides):
    from accelerate import Accelerator
    accelerator = accelerator or Accelerator(cpu=True)
    torch.manual_seed(0)
    cfg = hnpm.Config(**{"proj_hidden": 32, "proj_dim": 16, "optimizer": "sgd", **overrides})
    teacher, optimizer, student = hnpm.setup(cfg, NO_DATA, accelerator)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the student differs from the teacher, as after some training
    return cfg, accelerator, teacher, optimizer, student


def test_train_step_order_and_roles(monkeypatch):
    """hnpm.train_step, as train() calls it: the loss sees the TEACHER's representation of the AUGMENTED view
    (views[0]) and the STUDENT's of the un-augmented one (views[1]), both as before the step; the hard set is Eq.
    (5)'s {j != i : DisSim(U'_i, U_j) <= threshold} of exactly that pair (checked by a loop); the teacher takes the
    optimiser step; the student then moves toward the UPDATED teacher by Eq. (6), θ_S <- τ θ_S + (1-τ) θ_T."""
    cfg, accelerator, teacher, optimizer, student = _step_setup(ema_tau=0.5, log_every=1)
    teacher.eval(), student.eval()  # BN on running statistics, so that the representations can be recomputed here
    g = torch.Generator().manual_seed(1)
    x_aug, x_plain, labels = torch.randn(6, 3, 32, 32, generator=g), torch.randn(6, 3, 32, 32, generator=g), \
        torch.tensor([0, 1, 0, 1, 2, 2])
    teacher_before, student_before = copy.deepcopy(teacher), copy.deepcopy(student)
    with torch.no_grad():
        u_t, u_s = teacher_before(x_aug), student_before(x_plain)
    t, s = hnpm.linf_normalize(u_t), hnpm.linf_normalize(u_s)
    off = ~torch.eye(6, dtype=torch.bool)
    values = hnpm.pairwise_dissim(s, t)[off].sort().values
    threshold = ((values[14] + values[15]) / 2).item()  # half the pairs: no pair sits at the threshold
    cfg = dataclasses.replace(cfg, threshold=threshold)
    expected = [[i != j and ((s[i] - t[j]) ** 2).mean().item() <= threshold for j in range(6)] for i in range(6)]
    for a, b in ((t, s), (s, s), (t, t)):  # the wrong pairs select other sets here, so the check can tell them apart
        assert (hnpm.hard_negative_mask(hnpm.pairwise_dissim(a, b), threshold) & off).tolist() != expected
    seen, real = {}, hnpm.hnpm_terms

    def spy(u_teacher, u_student, *a, **k):
        out = real(u_teacher, u_student, *a, **k)
        seen.update(u_teacher=u_teacher.detach().clone(), u_student=u_student.detach().clone(), mask=out["mask"])
        return out
    monkeypatch.setattr(hnpm, "hnpm_terms", spy)
    logs = hnpm.train_step(teacher, student, optimizer, [x_aug, x_plain], labels, cfg,
                           {"lr": 0.1, "ema_tau": 0.5}, 0, accelerator)
    assert list(logs)[0] == "loss" and all(v.dim() == 0 for k, v in logs.items() if k not in ("epoch_sums", "u"))
    assert torch.allclose(logs["u"], u_t, atol=1e-6)  # what train() measures the effective rank on
    assert torch.allclose(seen["u_teacher"], u_t, atol=1e-6) and torch.allclose(seen["u_student"], u_s, atol=1e-6)
    assert seen["mask"].tolist() == expected
    ref_loss, l1, l2, size, empty = _loop_hnpm(u_t.tolist(), u_s.tolist(), 0.8, 0.1, threshold)
    assert logs["loss"].item() == pytest.approx(ref_loss, rel=1e-5) and logs["hard_size"].item() == pytest.approx(size)
    # the teacher took SGD's first step (lr 0.1, no momentum buffer yet, L2 weight decay) on the clipped gradient of
    # that loss, computed here by hand
    ref = copy.deepcopy(teacher_before)
    hnpm.hnpm_loss(ref(x_aug), u_s, 0.8, 0.1, threshold).backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    after = dict(teacher.named_parameters())
    for name, p in ref.named_parameters():
        assert torch.allclose(after[name], p - 0.1 * (p.grad + cfg.weight_decay * p), atol=1e-6), name
    # Eq. (6): the student moved halfway toward the updated teacher (a swapped call would move the teacher instead)
    before = dict(student_before.named_parameters())
    for name, p in student.named_parameters():
        assert torch.allclose(p, 0.5 * before[name] + 0.5 * after[name], atol=1e-6), name
    assert all(not p.requires_grad for p in student.parameters())


def test_train_step_lowers_the_loss_without_collapse():
    """Four steps of train_step on one fixed batch (train-mode BN): the loss goes down, the rows stay distinct."""
    cfg, accelerator, teacher, optimizer, student = _step_setup()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 3, 32, 32, generator=g)
    views, labels = [x + 0.1 * torch.randn(x.shape, generator=g), x], torch.zeros(12, dtype=torch.long)
    losses = [hnpm.train_step(teacher, student, optimizer, views, labels, cfg, {"lr": 0.05, "ema_tau": 0.5}, i,
                              accelerator)["loss"].item() for i in range(4)]
    assert losses[-1] < losses[0]
    with torch.no_grad():
        t = hnpm.linf_normalize(teacher.eval()(x))
    assert t.std(dim=0).mean() > 1e-2  # rows still differ


def _batch(n=8, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    return [x + 0.1 * torch.randn(x.shape, generator=g), x], torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("flags", [{"optimizer": "adam"}, {}, {"student_grad": True}, {"mining": "hardest"},
                                   {"mining": "all"}], ids=["adam", "sgd", "student_grad", "hardest", "all"])
def test_train_step_has_no_host_sync(flags):
    """Three train_steps (log_every 2, so steps 0 and 2 are logging steps of train()) record no op that would make
    the host wait for a CUDA device: train_step is the same on every step."""
    cfg, accelerator, teacher, optimizer, student = _step_setup(log_every=2, **flags)
    if cfg.optimizer == "adam":
        # Adam (neither fused nor capturable) keeps its step counts on the host, where reading them is no device
        # sync; the CPU stand-in cannot tell them apart, so Adam's own update runs unwatched (SGD's is watched)
        from torch.utils._python_dispatch import _disable_current_modes
        inner, adam_step = optimizer.optimizer, optimizer.optimizer.step

        def unwatched(*a, **k):
            with _disable_current_modes():
                return adam_step(*a, **k)
        inner.step = unwatched
    views, labels = _batch()
    for step in range(3):
        with SyncDetector() as syncs, HostTensors() as host:
            hnpm.train_step(teacher, student, optimizer, views, labels, cfg, hnpm.schedules(cfg, step, 10), step,
                            accelerator)
        assert syncs.ops == [] and host.calls == [], (step, syncs.ops, host.calls)


def test_train_takes_the_effective_rank_on_logging_steps_outside_the_step(tmp_path, monkeypatch):
    """The loop of train() (in this process, 2 epochs of 2 steps, --log-every 3): no train_step syncs; the effective
    rank of U, an SVD (its one sync), is taken at the logging steps 3 and 4 (the last), after their train_step."""
    step_ops, erank_at, erank_ops = [], [], []
    real_step, real_erank = hnpm.train_step, common.effective_rank

    def watched_step(*a, **k):
        with SyncDetector() as syncs:
            out = real_step(*a, **k)
        step_ops.append(syncs.ops)
        return out

    def watched_erank(u):
        erank_at.append(len(step_ops))  # train_steps done so far
        with SyncDetector() as syncs:
            out = real_erank(u)
        erank_ops.append(syncs.ops)
        return out
    monkeypatch.setattr(hnpm, "train_step", watched_step)
    monkeypatch.setattr(common, "effective_rank", watched_erank)
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # Run's handlers would outlive the run in this process
    out = str(tmp_path / "run")
    common.run_main(hnpm.train, hnpm.Config, [*SMALL, *HEADS, "--epochs", "2", "--log-every", "3", "--eval-every",
                                              "0", "--optimizer", "sgd", "--output-dir", out])
    assert step_ops == [[]] * 4
    assert erank_at == [3, 4] and erank_ops == [["_linalg_svd"]] * 2
    knn = [m for m in read_metrics(out) if "knn_top1" in m]
    assert [m["epoch"] for m in knn] == [2] and 1 - 1e-4 <= knn[0]["u_erank"] <= 7 + 1e-3


@pytest.mark.parametrize("skipped", [True, False])
def test_student_stays_when_the_fp16_step_is_skipped(skipped):
    """GradScaler skips the optimiser step on inf gradients; the student must then keep its weights (the teacher did
    not move), and follow the teacher on a normal step. Stand-in: an Accelerator that reports the skip."""
    from accelerate import Accelerator

    class Reporting(Accelerator):
        optimizer_step_was_skipped = property(lambda self: skipped)
    cfg, accelerator, teacher, optimizer, student = _step_setup(Reporting(cpu=True))
    before = copy.deepcopy(dict(student.named_parameters()))  # its BN statistics move in its own forward
    views, labels = _batch()
    hnpm.train_step(teacher, student, optimizer, views, labels, cfg, {"lr": 0.1, "ema_tau": 0.5}, 0, accelerator)
    moved = [k for k, p in student.named_parameters() if not torch.equal(before[k], p)]
    assert (moved == []) == skipped, moved


# ----------------------------------------------------------------------------- the script end to end

def test_smoke_writes_metrics_checkpoint_backbone(tmp_path):
    out = str(tmp_path / "run")
    run(["hnpm.py", *SMALL, *HEADS, "--epochs", "2", "--warmup-epochs", "0", "--output-dir", out])
    metrics = read_metrics(out)
    steps = [m for m in metrics if "loss" in m]
    assert len(steps) == 4 and all(math.isfinite(m["loss"]) for m in steps)
    assert list(steps[0])[:11] == ["step", "epoch", "loss", "l1", "l2", "hard_size", "empty_frac", "dissim_mean",
                                   "dissim_max", "false_neg", "lr"] and {"ema_tau", "images_per_s"} <= set(steps[0])
    assert steps[0]["ema_tau"] == 0.5  # Sec. 3.5
    assert steps[0]["lr"] == pytest.approx(0.06 * 8 / 256, abs=1e-6)  # SGD lr 0.06 x 8 / 256, no warm-up here
    assert 0 <= steps[0]["dissim_mean"] <= steps[0]["dissim_max"] <= 4
    knn = [m for m in metrics if "knn_top1" in m]
    assert [m["epoch"] for m in knn] == [0, 1, 2] and 0 <= knn[-1]["knn_top1"] <= 100
    assert {"hard_size", "empty_frac", "false_neg", "u_erank"} <= set(knn[-1])
    assert 1 - 1e-4 <= knn[-1]["u_erank"] <= 7 + 1e-3  # 8 rows have at most 7 centred directions
    assert {"wall_time_s", "peak_memory_mb"} <= set(metrics[-1])
    assert common.latest_checkpoint(out).endswith("checkpoint-4")
    check_backbone(out, "hnpm")


def test_paper_recipe_and_hardest_mining_run(tmp_path):
    """--recipe paper with what a CPU holds typed over it (ResNet-18, batch 8, 1 epoch): Adam, lr 0.1 not
    batch-scaled and no warm-up (Sec. 3.5), the cosine over the epoch's 2 steps: 0.1 at step 0, 0.05 at step 1."""
    out = str(tmp_path / "run")
    i = SMALL.index("--warmup-epochs")
    run(["hnpm.py", *SMALL[:i], *SMALL[i + 2:], *HEADS, "--recipe", "paper", "--arch", "resnet18", "--epochs", "1",
         "--eval-every", "0", "--mining", "hardest", "--output-dir", out])
    with open(os.path.join(out, "config.json")) as f:
        saved = json.load(f)
    assert {k: saved[k] for k in ("recipe", "optimizer", "weight_decay", "warmup_epochs", "batch_size")} == \
        {"recipe": "paper", "optimizer": "adam", "weight_decay": 0.0, "warmup_epochs": 0, "batch_size": 8}
    steps = [m for m in read_metrics(out) if "loss" in m]
    assert len(steps) == 2 and all(math.isfinite(m["loss"]) for m in steps)
    assert [m["lr"] for m in steps] == [pytest.approx(0.1), pytest.approx(0.05)]
    assert all(m["hard_size"] == 1 and m["empty_frac"] == 0 for m in steps) and steps[0]["ema_tau"] == 0.5


@pytest.mark.parametrize("flags", [[], ["--views-on", "device"]], ids=["workers", "device_views"])
def test_resume_equals_uninterrupted(flags, tmp_path):
    args = ["hnpm.py", *SMALL, *HEADS, "--epochs", "2", "--eval-every", "0", *flags]
    # the student (the EMA network, registered with Accelerate) is checkpointed and ends identical too
    sa, sb = run_resumed(args, tmp_path)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def ddp_case(accelerator):
    """tests/ddp_step.py: one hnpm.train_step (networks and optimiser of hnpm.setup) on a fixed global batch of 8,
    this process taking its rows, for the default and for --student-grad (one start-up for both). The threshold
    of Eq. (5) is lowered to 0.25 so that the mining selects some but not all rows of the global batch. BatchNorm
    is held in eval mode (running statistics): per-process batch statistics differ by design on CPU, where
    SyncBatchNorm is not used. -> per case: the loss and logs, the gradients before and after clipping, teacher
    and student (EMA) after the step."""
    return {flags: _ddp_step(accelerator, student_grad) for flags, student_grad in (("", False),
                                                                                    ("--student-grad", True))}


def _ddp_step(accelerator, student_grad):
    from accelerate.utils import set_seed
    cfg = hnpm.Config(proj_hidden=32, proj_dim=16, threshold=0.25, student_grad=student_grad, optimizer="sgd")
    set_seed(0)
    teacher, optimizer, student = hnpm.setup(cfg, NO_DATA, accelerator)
    raw = accelerator.unwrap_model(teacher)
    g = torch.Generator().manual_seed(1)
    B, rank, world = 8, accelerator.process_index, accelerator.num_processes
    x_t, x_s = torch.randn(B, 3, 32, 32, generator=g), torch.randn(B, 3, 32, 32, generator=g)
    labels = torch.randint(0, 3, (B,), generator=g)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))  # student != teacher, as after some training
    teacher.eval(), student.eval()
    local = slice(rank * B // world, (rank + 1) * B // world)
    params = {**dict(raw.named_parameters()), **{"student." + n: p for n, p in student.named_parameters()}}
    with grads_before_clipping(accelerator, params) as before_clipping:
        logs = hnpm.train_step(teacher, student, optimizer, [x_t[local], x_s[local]], labels[local], cfg,
                               {"lr": 0.1, "ema_tau": 0.5}, 0, accelerator)
    return {"logs": {k: v for k, v in logs.items() if k not in ("epoch_sums", "u")}, "u": logs["u"],
            "epoch_sums": logs["epoch_sums"], "raw_grads": before_clipping,
            "grads": {n: p.grad.clone() for n, p in params.items() if p.grad is not None},
            "teacher": raw.state_dict(), "student": student.state_dict()}


@pytest.fixture(scope="module")
def two_process(tmp_path_factory):
    return two_process_results("hnpm", tmp_path_factory.mktemp("ddp"))


@pytest.mark.parametrize("flags", ["", "--student-grad"])
def test_two_processes_equal_one(flags, two_process):
    """2 gloo processes, each with half the global batch, give the 1-process loss, logs, gradients (before clipping,
    scale included, and after) and teacher and student (EMA) after the step, on both ranks."""
    one, ranks = two_process[0][flags], [r[flags] for r in two_process[1]]
    # the case means something: the mining selects some but not all of the 7 other rows of the global batch, and
    # the raw gradient is beyond the clipping norm, which would hide a wrong scale from the clipped one
    assert 0 < one["logs"]["hard_size"].item() < 7
    assert torch.linalg.vector_norm(torch.stack([g.norm() for g in one["raw_grads"].values()])) > 1.0
    assert any(k.startswith("student.") for k in one["grads"]) == bool(flags)  # the student's gradient iff asked
    for r in ranks:
        assert torch.allclose(one["u"], r["u"], atol=1e-6)
        for part in ("logs", "epoch_sums", "raw_grads", "grads", "teacher", "student"):
            assert one[part].keys() == r[part].keys(), part
            for k in one[part]:
                assert torch.allclose(one[part][k], r[part][k], atol=1e-6), (part, k)
    for part in ("logs", "raw_grads", "grads", "teacher", "student"):  # and the ranks agree exactly
        assert all(torch.equal(ranks[0][part][k], ranks[1][part][k]) for k in ranks[0][part]), part


def test_two_process_training_run(tmp_path_factory):
    """The real loop on 2 CPU processes (and --student-grad; conftest.TWO_PROCESS_RUNS): runs, logs, checkpoints."""
    out = two_process_run("hnpm", tmp_path_factory)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["provenance"]["num_processes"] == 2  # really distributed, 4 images per process
    assert any("knn_top1" in m for m in read_metrics(out)) and os.path.exists(os.path.join(out, "backbone.pt"))


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("args, message", [
    (["--ema-tau", "1.5"], "--ema-tau 1.5 must lie in [0, 1]"),
    (["--ema-tau", "-0.1"], "--ema-tau -0.1 must lie in [0, 1]"),
    (["--batch-size", "1"], "--batch-size 1: HNPM mines negatives inside the batch, use >= 2"),
    (["--alpha1", "-0.5"], "--alpha1 must be 0 or more"),
    (["--alpha2", "-1"], "--alpha2 must be 0 or more"),
    (["--threshold", "-1"], "--threshold must be 0 or more"),
    (["--grad-clip", "-1"], "--grad-clip must be 0 or more"),
    (["--proj-dim", "0"], "--proj-dim must be at least 1"),
    (["--proj-hidden", "0"], "--proj-hidden must be at least 1"),
    (["--mining", "nearest"], "argument --mining: invalid choice: 'nearest'"),
    (["--optimizer", "rmsprop"], "argument --optimizer: invalid choice: 'rmsprop'"),
])
def test_bad_flag_is_one_error_line(args, message, capsys):
    """Runs the command line in this process (as `python hnpm.py ...` would, without the start-up cost)."""
    code, lines = cli_error("hnpm.py", [*SMALL, *HEADS, "--epochs", "1", *args], capsys)
    assert code == 2 and "error:" in lines[-1] and message in lines[-1], lines[-3:]
    assert not any("Traceback" in line for line in lines)


def test_too_few_images_is_one_error_line(tmp_path):
    p = run(["hnpm.py", *SMALL, *HEADS, "--epochs", "1", "--fake-size", "4", "--output-dir", str(tmp_path / "r")],
            check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: the dataset has 4 images, fewer than one global batch")
