"""ReSSL: losses against hand-computed values and loop transcriptions, momentum/queue updates, and the script
end to end (smoke, resume, two processes, bad input), a train step free of host synchronisations, and a step fp16
skipped."""
import copy
import dataclasses
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed

import common
import ressl
from common import latest_checkpoint
from conftest import (TINY, check_backbone, cli_error, read_metrics, run, run_resumed, two_process_results,
                      two_process_run)
from sync_detector import HostTensors, SyncDetector

HEADS = ["--proj-hidden", "32", "--proj-dim", "16", "--queue-size", "16"]


# ----------------------------------------------------------------------------- losses

def test_relation_loss_hand_computed():
    # z_s -> queue item 0, z_t -> queue item 1; logits (2, 0) for the student, (0, 4) for the teacher
    z_s, z_t = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    queue = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p2 = [1 / (1 + math.e ** 4), math.e ** 4 / (1 + math.e ** 4)]
    log_p1 = [2 - math.log(math.e ** 2 + 1), 0 - math.log(math.e ** 2 + 1)]
    expected = -(p2[0] * log_p1[0] + p2[1] * log_p1[1])
    got = ressl.relation_loss(z_s, z_t, queue, tau_s=0.5, tau_t=0.25)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_infonce_loss_hand_computed():
    z_s, z_t = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    expected = -math.log(math.e ** 2 / (math.e ** 2 + 1 + math.e ** -2))  # logits 1/0.5, 0/0.5, -1/0.5
    assert ressl.infonce_loss(z_s, z_t, queue, tau=0.5).item() == pytest.approx(expected, rel=1e-6)


def _unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def test_losses_match_loop_transcription():
    g = torch.Generator().manual_seed(0)
    z_s, z_t, queue = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g), torch.randn(6, 3, generator=g)
    tau_s, tau_t, tau = 0.1, 0.04, 0.2
    Q = [_unit(q) for q in queue.tolist()]
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))
    rel, nce = 0.0, 0.0
    for s, t in zip(z_s.tolist(), z_t.tolist()):
        s, t = _unit(s), _unit(t)
        zs = sum(math.exp(dot(s, q) / tau_s) for q in Q)
        zt = sum(math.exp(dot(t, q) / tau_t) for q in Q)
        rel += -sum(math.exp(dot(t, q) / tau_t) / zt * math.log(math.exp(dot(s, q) / tau_s) / zs) for q in Q)
        pos = math.exp(dot(s, t) / tau)
        nce += -math.log(pos / (pos + sum(math.exp(dot(s, q) / tau) for q in Q)))
    assert ressl.relation_loss(z_s, z_t, queue, tau_s, tau_t).item() == pytest.approx(rel / 4, rel=1e-5)
    assert ressl.infonce_loss(z_s, z_t, queue, tau).item() == pytest.approx(nce / 4, rel=1e-5)


def test_relation_loss_limits():
    # identical queue entries: p^1 is uniform, so H(p^2, p^1) = log K whatever the teacher says
    queue = torch.ones(7, 4)
    z_s, z_t = torch.randn(3, 4), torch.randn(3, 4)
    assert ressl.relation_loss(z_s, z_t, queue).item() == pytest.approx(math.log(7), rel=1e-6)
    # same input and same temperature: the cross-entropy equals the entropy H(p^2), i.e. KL = 0
    queue, z = torch.randn(9, 4), torch.randn(3, 4)
    p = F.softmax(F.normalize(z, dim=1) @ F.normalize(queue, dim=1).T / 0.1, dim=1)
    entropy = -(p * p.log()).sum(1).mean()
    assert ressl.relation_loss(z, z, queue, 0.1, 0.1).item() == pytest.approx(entropy.item(), rel=1e-5)


@pytest.mark.parametrize("loss_fn", [lambda s, t, q: ressl.relation_loss(s, t, q),
                                     lambda s, t, q: ressl.infonce_loss(s, t, q, 0.1)])
def test_gradient_reaches_student_only(loss_fn):
    z_s, z_t, queue = (torch.randn(n, 8, requires_grad=True) for n in (4, 4, 16))
    loss_fn(z_s, z_t, queue).backward()
    assert z_s.grad is not None and z_s.grad.abs().sum() > 0
    assert z_t.grad is None and queue.grad is None


def test_total_loss_and_warmup_alpha():
    rel, nce = torch.tensor(2.0), torch.tensor(5.0)
    assert ressl.total_loss(rel, nce, 0.0).item() == 5.0
    assert ressl.total_loss(rel, nce, 0.25).item() == pytest.approx(0.25 * 2 + 0.75 * 5)
    assert ressl.warmup_alpha(0, 100, True) == 0.0
    assert ressl.warmup_alpha(50, 100, True) == 0.5
    assert ressl.warmup_alpha(500, 100, True) == 1.0
    assert ressl.warmup_alpha(0, 100, False) == 1.0


def test_lr_schedule_end_points():
    assert ressl.lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert ressl.lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert ressl.lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert ressl.lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert ressl.lr_at(100, 100, 10, 1.0) == pytest.approx(0.0, abs=1e-12)


def test_ema_schedule_boundaries():
    # Sec. 5.1's cosine rise, m = 1 - (1 - 0.996) (cos(pi k / K) + 1) / 2: 0.996 at k = 0, 0.998 half-way, 1 at K
    assert ressl.ema_at(0, 100, 0.996, "cosine") == pytest.approx(0.996)
    assert ressl.ema_at(50, 100, 0.996, "cosine") == pytest.approx(0.998)
    assert ressl.ema_at(100, 100, 0.996, "cosine") == pytest.approx(1.0)
    assert ressl.ema_at(70, 100, 0.99, "constant") == 0.99


@pytest.mark.parametrize("batch, accumulate", [(1024, 1), (256, 4)])
def test_paper_schedules_at_their_boundary_steps(batch, accumulate):
    """schedules() under --recipe paper with 10 updates per epoch (200 epochs: K = 2000 updates, 100 of warm-up): the
    lr of LARS is 0.6 x 1024 / 256 = 2.4 (the effective batch counts, so 256 x 4 gives the same), reached at the end
    of the warm-up; alpha of Eq. (7) reaches 1 there too; m starts at 0.996 and ends near 1."""
    cfg = ressl.Config(**{**ressl.PAPER, "batch_size": batch, "accumulate": accumulate})
    first, end_warmup, last = (ressl.schedules(cfg, k, 10) for k in (0, 99, 1999))
    assert first["lr"] == pytest.approx(2.4 / 100) and end_warmup["lr"] == pytest.approx(2.4)
    assert last["lr"] == pytest.approx(2.4 * 0.5 * (1 + math.cos(math.pi * 1899 / 1900)))
    assert first["alpha"] == 0 and end_warmup["alpha"] == pytest.approx(0.99) and last["alpha"] == 1
    assert first["ema_momentum"] == pytest.approx(0.996)
    assert last["ema_momentum"] == pytest.approx(1 - 0.004 * (math.cos(math.pi * 1999 / 2000) + 1) / 2)


def test_paper_recipe_and_typed_flags():
    cfg = common.parse_config(ressl.Config, ["--recipe", "paper", "--queue-size", "64"], ressl.PAPER)
    assert (cfg.optimizer, cfg.lr, cfg.batch_size, cfg.weight_decay, cfg.arch) == ("lars", 0.6, 1024, 1e-6, "resnet50")
    assert (cfg.ema_momentum, cfg.ema_schedule, cfg.tau_t, cfg.student_aug) == (0.996, "cosine", 0.03, "byol")
    assert cfg.queue_size == 64 and not cfg.multi_crop  # a typed flag wins; Table 7's main row has one crop
    small = common.parse_config(ressl.Config, ["--recipe", "small"], ressl.PAPER)
    assert small == dataclasses.replace(ressl.Config(), recipe="small")


# ----------------------------------------------------------------------------- views and multi-crop

def test_view_specs_small_paper_and_multi_crop():
    student, teacher = ressl.view_specs(ressl.Config(), 32)  # Sec. 4: two views at the run's size
    assert student.crop_scale == (0.2, 1.0) and student.blur_p == 0.5 and student.solarize_p == 0
    assert teacher == ressl.ViewSpec(crop_scale=(0.2, 1.0))  # Table 4's best: crop + flip only
    paper = dataclasses.replace(ressl.Config(), **ressl.PAPER)
    student, teacher = ressl.view_specs(paper, 224)  # Sec. 5.1: BYOL's view, blur 0.5, solarise 0.1, min crop 0.14
    assert (student.crop_scale, student.blur_p, student.solarize_p, student.jitter) == ((0.14, 1.0), 0.5, 0.1,
                                                                                         (0.4, 0.4, 0.2, 0.1))
    assert teacher == ressl.ViewSpec(crop_scale=(0.2, 1.0))
    specs = ressl.view_specs(dataclasses.replace(paper, multi_crop=True), 224)
    assert [s.output_size(224) for s in specs] == [224, 224, 192, 160, 128, 96]  # Table 8; the teacher second
    assert [s.crop_scale for s in specs] == [(0.14, 1.0), (0.2, 1.0), (0.117, 0.86), (0.095, 0.715), (0.073, 0.571),
                                             (0.05, 0.429)]
    assert all(s.solarize_p == 0.1 for s in specs[:1] + specs[2:])
    # at 32 px the sizes scale by 32 / 224: 27.4, 22.9, 18.3, 13.7 px rounded
    assert [s.output_size(32) for s in ressl.view_specs(dataclasses.replace(paper, multi_crop=True), 32)] == [
        32, 32, 27, 23, 18, 14]


def test_multi_crop_loss_hand_computed():
    """Two student crops against one teacher view (identity networks): the loss is the mean over crops of Eq. (7).
    Queue e1, e2; tau_s 0.5, tau_t 0.25, tau_nce 0.5; alpha 0.5. Teacher (0, 2): logits (0, 4), p2 = (1, e^4) / (1 +
    e^4). Crop 1 (3, 0): student logits (2, 0); crop 2 (0, 1): (0, 2). InfoNCE logits [pos, e1, e2] / 0.5: crop 1
    [0, 2, 0], crop 2 [2, 0, 2]."""
    cfg = ressl.Config(tau_s=0.5, tau_t=0.25, tau_nce=0.5)
    state = SimpleNamespace(teacher=nn.Identity(), queue=torch.eye(2), queue_labels=torch.tensor([0, 1]))
    views = [torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([[0.0, 1.0]])]
    loss, _, logs = ressl.forward_loss(nn.Identity(), state, views, torch.tensor([1]), cfg, 0.5, 0,
                                       Accelerator(cpu=True))
    p2 = [1 / (1 + math.e ** 4), math.e ** 4 / (1 + math.e ** 4)]
    lse = math.log(math.e ** 2 + 1)
    rel = (-(p2[0] * (2 - lse) + p2[1] * (0 - lse)) - (p2[0] * (0 - lse) + p2[1] * (2 - lse))) / 2
    nce = (math.log(2 + math.e ** 2) + math.log(2 * math.e ** 2 + 1) - 2) / 2
    assert logs["relation"].item() == pytest.approx(rel, rel=1e-6)
    assert logs["infonce"].item() == pytest.approx(nce, rel=1e-6)
    assert loss.item() == pytest.approx(0.5 * rel + 0.5 * nce, rel=1e-6)


# ----------------------------------------------------------------------------- momentum and queue

@pytest.mark.parametrize("m", [0.0, 1.0, 0.9])
def test_ema_update(m):
    student, teacher = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)), nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    student(torch.randn(5, 3))  # moves the student's running statistics
    before = [p.clone() for p in teacher.parameters()]
    ressl.ema_update(teacher, student, m)
    for t0, t1, s in zip(before, teacher.parameters(), student.parameters()):
        assert torch.allclose(t1, m * t0 + (1 - m) * s)
    for bt, bs in zip(teacher.buffers(), student.buffers()):
        assert torch.equal(bt, bs)


def test_queue_fifo_and_wrap_around():
    queue, labels = torch.zeros(5, 1), torch.full((5,), -1)
    ptr = ressl.enqueue(queue, labels, torch.tensor(0), torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([1, 2, 3]))
    assert ptr.item() == 3 and queue.flatten().tolist() == [1, 2, 3, 0, 0]
    ptr = ressl.enqueue(queue, labels, ptr, torch.tensor([[4.0], [5.0], [6.0]]), torch.tensor([4, 5, 6]))
    assert ptr.item() == 1 and queue.flatten().tolist() == [6, 2, 3, 4, 5] and labels.tolist() == [6, 2, 3, 4, 5]


def test_teacher_is_a_frozen_copy_of_backbone_and_projector():
    cfg = ressl.Config(proj_hidden=8, proj_dim=4)
    student = ressl.Student(cfg, cifar_stem=True)
    state = ressl.MomentumState(student, 16, 4)
    assert all(not p.requires_grad for p in state.teacher.parameters())
    src = nn.Sequential(student.backbone, student.projector).state_dict()
    assert all(torch.equal(v, src[k]) for k, v in state.teacher.state_dict().items())
    assert torch.allclose(state.queue.norm(dim=1), torch.ones(16))


def test_cifar_stem_and_no_predictor():
    student = ressl.Student(ressl.Config(proj_hidden=8, proj_dim=4, predictor=False), cifar_stem=True)
    assert student.backbone.conv1.stride == (1, 1) and isinstance(student.backbone.maxpool, nn.Identity)
    assert isinstance(student.predictor, nn.Identity)
    assert student(torch.randn(2, 3, 32, 32)).shape == (2, 4)


# ----------------------------------------------------------------------------- shuffle BN (Sec. 4, no predictor)

def test_teacher_bn_splits_global_with_predictor_shuffle_without():
    assert ressl.teacher_bn_splits(ressl.Config()) == 1 and ressl.teacher_bn_splits(ressl.Config(predictor=False)) == 8
    assert ressl.teacher_bn_splits(ressl.Config(predictor=False, bn_splits=4)) == 4


# ----------------------------------------------------------------------------- the script end to end

def test_smoke_writes_metrics_checkpoint_backbone_and_eval_reads_it(tmp_path):
    out = str(tmp_path / "run")
    run(["ressl.py", *TINY, *HEADS, "--epochs", "2", "--output-dir", out])
    metrics = read_metrics(out)
    steps = [m for m in metrics if "loss" in m]
    assert len(steps) == 8 and all(math.isfinite(m["loss"]) for m in steps)
    assert {"relation", "infonce", "alpha", "lr", "images_per_s"} <= set(steps[0])
    knn = [m for m in metrics if "knn_top1" in m]
    assert [m["epoch"] for m in knn] == [0, 1, 2] and 0 <= knn[-1]["knn_top1"] <= 100 and "teacher_nn_same_label" in knn[-1]
    assert latest_checkpoint(out).endswith("checkpoint-8") and os.path.exists(os.path.join(out, "config.json"))
    # backbone.pt loads into a plain torchvision ResNet-18 (no fc)
    check_backbone(out, "ressl", eval_linear=True)


@pytest.mark.parametrize("flags", [[], ["--no-predictor", "--bn-splits", "2"], ["--views-on", "device"]],
                         ids=["default", "shuffle_bn", "device_views"])
def test_resume_equals_uninterrupted(flags, tmp_path):
    args = ["ressl.py", *TINY, *HEADS, "--epochs", "2", "--eval-every", "0", *flags]
    qa, qb = run_resumed(args, tmp_path)
    assert torch.equal(qa["queue"], qb["queue"]) and torch.equal(qa["ptr"], qb["ptr"])


def ddp_case(accelerator, *args):
    """tests/ddp_step.py: one ressl.train_step (setup() as the script runs it) on a fixed global batch of 8, this
    process taking its rows. No args: the default (predictor, global BN); "shuffle": --no-predictor with shuffle BN
    over 2 teacher groups; "multi": two more student crops of 24 and 16 px (--multi-crop's shape). The student's BN is held in eval mode (per-process batch statistics differ by design on
    CPU, where SyncBatchNorm is not used); the shuffle-BN teacher runs in train mode, since its groups do not depend
    on the number of processes."""
    shuffle = args == ("shuffle",)
    cfg, student, optimizer, state = _setup(accelerator, ema_momentum=0.9,
                                            **({"predictor": False, "bn_splits": 2} if shuffle else {}))
    g = torch.Generator().manual_seed(1)
    B, K = 8, len(state.queue)
    x_s, x_t = torch.randn(B, 3, 32, 32, generator=g), torch.randn(B, 3, 32, 32, generator=g)
    more = [torch.randn(B, 3, s, s, generator=g) for s in (24, 16)] if args == ("multi",) else []
    labels = torch.randint(0, 10, (B,), generator=g)
    state.queue.copy_(F.normalize(torch.randn(K, cfg.proj_dim, generator=g), dim=1))
    state.queue_labels.copy_(torch.randint(0, 10, (K,), generator=g))
    state.ptr.fill_(12)  # the enqueue of 8 keys wraps around the end
    student.eval()
    state.teacher.train(shuffle)
    rows = slice(accelerator.process_index * B // accelerator.num_processes,
                 (accelerator.process_index + 1) * B // accelerator.num_processes)
    sched = {"lr": 0.1, "alpha": 0.5, "ema_momentum": 0.9}  # alpha < 1: both loss terms
    logs = ressl.train_step(student, state, optimizer, [x_s[rows], x_t[rows], *(x[rows] for x in more)],
                            labels[rows], cfg, sched, 3, accelerator)
    raw = accelerator.unwrap_model(student)
    # no gradient clipping in ressl: the gradients after backward are the raw ones and the ones SGD used
    return {"loss": accelerator.reduce(logs["loss"], "mean"), "relation": accelerator.reduce(logs["relation"], "mean"),
            "grads": {n: p.grad.clone() for n, p in raw.named_parameters() if p.grad is not None},
            "student": {k: v.clone() for k, v in raw.state_dict().items()},
            "teacher": {k: v.clone() for k, v in state.teacher.state_dict().items()},
            "queue": state.queue.clone(), "queue_labels": state.queue_labels.clone(), "ptr": state.ptr.clone()}


@pytest.mark.parametrize("case", ["default", "shuffle", "multi"])
def test_two_processes_equal_one(case, tmp_path):
    """Loss, gradients, the student after SGD, the teacher after the EMA and the queue after the enqueue: each rank
    of 2 processes equals 1 process on the same global batch."""
    one, ranks = two_process_results("ressl", tmp_path, *([] if case == "default" else [case]))
    # the shuffle-BN teacher runs in train mode on 8 images in one process and on 4 in each of two, with the default
    # thread count in the first: float rounding then differs (about 2e-6 on gradients of 0.03-2.3), amplified by
    # 1/tau_t = 25; a wrong grouping or order would differ by orders of magnitude more
    tol = dict(atol=1e-5, rtol=1e-4) if case == "shuffle" else dict(atol=1e-6)
    assert one["grads"] and one["grads"].keys() == ranks[0]["grads"].keys() == ranks[1]["grads"].keys()
    for r in ranks:
        assert torch.allclose(one["loss"], r["loss"], **tol) and torch.allclose(one["relation"], r["relation"], **tol)
        for k in one["grads"]:
            assert torch.allclose(one["grads"][k], r["grads"][k], **tol), k
            assert torch.equal(r["grads"][k], ranks[0]["grads"][k]), k  # all-reduced: the same on every rank
        for k in one["student"]:  # after SGD at lr 0.1 on those gradients
            assert torch.allclose(one["student"][k], r["student"][k], **tol), k
        for k in one["teacher"]:
            assert torch.allclose(one["teacher"][k], r["teacher"][k], atol=1e-6), k
        assert torch.allclose(one["queue"], r["queue"], atol=1e-6) and torch.equal(r["queue"], ranks[0]["queue"])
        assert torch.equal(one["queue_labels"], r["queue_labels"]) and one["ptr"].item() == r["ptr"].item() == 4


@pytest.mark.parametrize("name", ["ressl", "ressl-shuffle-bn"])
def test_two_process_training_run(name, tmp_path_factory):
    """The real loop on 2 CPU processes (conftest.TWO_PROCESS_RUNS; global BN, and shuffle BN without the
    predictor): runs, logs, checkpoints."""
    out = two_process_run(name, tmp_path_factory)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["provenance"]["num_processes"] == 2  # really distributed, 4 images per process
    assert any("knn_top1" in m for m in read_metrics(out)) and os.path.exists(os.path.join(out, "backbone.pt"))


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("args, message", [
    (["--bogus-flag", "1"], "unrecognized arguments: --bogus-flag"),
    (["--dataset", "imagefolder", "--data-dir", "/nonexistent/place"], "does not exist"),
    (["--queue-size", "4"], "--queue-size 4 must be at least --batch-size 8"),
    (["--fake-size", "4"], "fewer than one global batch"),
    (["--no-predictor"], "--bn-splits 8 (shuffle BN) must divide --batch-size 8 into groups of at least 2"),
    (["--bn-splits", "3"], "--bn-splits 3 (shuffle BN) must divide --batch-size 8"),
])
def test_bad_input_gives_one_clear_message(args, message, capsys, tmp_path):
    """Runs the command line in this process (as `python ressl.py ...` would, without the start-up cost)."""
    code, lines = cli_error("ressl.py", [*TINY, *HEADS, "--epochs", "1", "--output-dir", str(tmp_path), *args], capsys)
    assert code == 2 and "error:" in lines[-1] and message in lines[-1], lines[-3:]
    assert not any("Traceback" in line for line in lines)


# ----------------------------------------------------------------------------- the script's own step

def test_train_step_order_and_roles(monkeypatch):
    """ressl.train_step, as train() calls it: the loss sees the queue as it was BEFORE the batch; the teacher moves
    toward the updated student by Eq. (6) (teacher <- m teacher + (1 - m) student, not the reverse); the queue then
    holds the teacher's keys of the teacher's (weak) view."""
    accelerator = Accelerator(cpu=True)
    cfg = ressl.Config(proj_hidden=32, proj_dim=16, ema_momentum=0.5)
    torch.manual_seed(0)
    student = ressl.Student(cfg, cifar_stem=False)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    state = ressl.MomentumState(student, 16, cfg.proj_dim)
    x_s, x_t = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0, -1, 2, 3])  # -1: an image without a label (STL-10's unlabelled split)
    teacher_before = copy.deepcopy(state.teacher)
    with torch.no_grad():
        expected_keys = F.normalize(teacher_before(x_t), dim=1)  # the teacher's keys of ITS view
    # Fig. 2's counts: each key's nearest queue entry is itself; label -1 (an initial entry or an unlabelled image)
    # is not counted, not even against the query's -1
    state.queue[:4] = expected_keys
    state.queue_labels[:4] = torch.tensor([0, -1, 2, 4])
    queue_before = state.queue.clone()
    seen = {}
    real = ressl.relation_loss

    def spy(z_s, z_t, queue, *a, **k):
        seen["queue"] = queue.clone()
        return real(z_s, z_t, queue, *a, **k)
    monkeypatch.setattr(ressl, "relation_loss", spy)
    sched = {"lr": 0.1, "alpha": 1.0, "ema_momentum": cfg.ema_momentum}
    logs = ressl.train_step(student, state, optimizer, [x_s, x_t], labels, cfg, sched, 0, accelerator)
    assert logs["nn_labelled"].item() == 3 and logs["nn_same_label"].item() == 2
    assert torch.equal(seen["queue"], queue_before)  # the loss saw the queue before this batch entered it
    online = dict(nn.Sequential(student.backbone, student.projector).named_parameters())
    for name, p in state.teacher.named_parameters():
        before = dict(teacher_before.named_parameters())[name]
        assert torch.allclose(p, 0.5 * before + 0.5 * online[name].detach(), atol=1e-6), name
    assert torch.allclose(state.queue[:4], expected_keys, atol=1e-5) and torch.equal(state.queue[4:], queue_before[4:])
    assert state.ptr.item() == 4 and torch.equal(state.queue_labels[:4], labels)


def test_accumulate_two_batches_equals_one_batch_of_both():
    """--accumulate 2 over rows 0-3 then 4-7 = one batch of 8 (student BN and teacher in eval mode, whose statistics
    do not depend on the batch): the gradient is the mean over the window, and teacher, queue and pointer move once,
    at the window's last batch, with all 8 keys in order. After the first batch nothing has moved yet."""
    g = torch.Generator().manual_seed(2)
    x_s, x_t, labels = torch.randn(8, 3, 32, 32, generator=g), torch.randn(8, 3, 32, 32, generator=g), torch.arange(8)
    sched = {"lr": 0.1, "alpha": 0.5, "ema_momentum": 0.9}
    results = []
    for accumulate, windows in ((1, [slice(0, 8)]), (2, [slice(0, 4), slice(4, 8)])):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulate)
        cfg, student, optimizer, state = _setup(accelerator, accumulate=accumulate)
        student.eval()
        state.teacher.eval()
        state.ptr.fill_(12)  # the window's 8 keys wrap around the end of the queue of 16
        queue0, teacher0 = state.queue.clone(), copy.deepcopy(state.teacher.state_dict())
        for step, rows in enumerate(windows):
            accelerator.step = step  # as Run.accumulate
            with accelerator.accumulate(student):
                ressl.train_step(student, state, optimizer, [x_s[rows], x_t[rows]], labels[rows], cfg, sched, step,
                                 accelerator)
            if step < len(windows) - 1:
                assert torch.equal(state.queue, queue0) and state.ptr.item() == 12
                assert all(torch.equal(v, teacher0[k]) for k, v in state.teacher.state_dict().items())
        results.append((accelerator.unwrap_model(student).state_dict(), state.teacher.state_dict(), state.queue,
                        state.queue_labels, state.ptr.item(), state.pending))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    (s1, t1, q1, l1, p1, pend1), (s2, t2, q2, l2, p2, pend2) = results
    assert p1 == p2 == 4 and torch.equal(l1, l2) and torch.allclose(q1, q2, atol=1e-6) and pend1 == pend2 == []
    assert not torch.equal(q1, queue0)  # the keys did enter
    for a, b in ((s1, s2), (t1, t2)):  # student after SGD, teacher after Eq. (6)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not all(torch.equal(v, teacher0[k]) for k, v in t1.items())  # the teacher did move


def _setup(accelerator, **kw):
    """The script's own setup() with a ResNet-18 on 32-px images (standard stem) and narrow heads -> (cfg, student,
    optimizer, state)."""
    cfg = ressl.Config(proj_hidden=32, proj_dim=16, queue_size=16, batch_size=8, **kw)
    set_seed(0)
    return (cfg, *ressl.setup(cfg, SimpleNamespace(cifar_stem=False, size=32), accelerator))


@pytest.mark.parametrize("kw", [{}, {"infonce_warmup": False}, {"predictor": False, "bn_splits": 2},
                                {"bn_splits": 2}], ids=["default", "no_warmup", "shuffle_bn", "predictor_shuffle_bn"])
def test_train_step_never_waits_for_the_device(kw):
    """Three train_steps (InfoNCE warm-up on and off; global BN, and shuffle BN with and without the predictor): no op
    that would make the host wait for a CUDA device, and no tensor built on the host. ressl's step has no logging or
    reset branch: every step must be free of them."""
    accelerator = Accelerator(cpu=True)
    cfg, student, optimizer, state = _setup(accelerator, **kw)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        views = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]
        labels = torch.randint(0, 10, (4,), generator=g)
        sched = ressl.schedules(cfg, step, steps_per_epoch=2)
        with SyncDetector() as syncs, HostTensors() as host:
            ressl.train_step(student, state, optimizer, views, labels, cfg, sched, step, accelerator)
        assert syncs.ops == [] and host.calls == [], (step, syncs.ops, host.calls)
    assert state.ptr.item() == 12  # three steps really ran


def test_epoch_diagnostics_is_the_one_sync():
    """The Fig. 2 percentage reads one value on the host, at the end of an epoch (one all-reduce on several GPUs)."""
    accelerator = Accelerator(cpu=True)
    same_label, labelled, none = torch.tensor(3), torch.tensor(4), torch.tensor(0)
    with SyncDetector() as syncs:
        d = ressl.epoch_diagnostics(same_label, labelled, accelerator)
    assert d == {"teacher_nn_same_label": 75.0} and syncs.ops == ["_local_scalar_dense"]
    assert ressl.epoch_diagnostics(none, none, accelerator) == {"teacher_nn_same_label": 0.0}  # no labelled entry yet


@pytest.mark.parametrize("skipped", [True, False])
def test_a_step_fp16_skipped_moves_no_momentum_state(skipped):
    """When GradScaler skips the optimiser step (inf gradients), teacher, queue, labels and pointer stay as they were;
    after a real step all of them move. A stand-in Accelerator reports the skip (on the CPU there is no fp16 scaler)."""
    class Skipping(Accelerator):
        optimizer_step_was_skipped = property(lambda self: skipped)
    accelerator = Skipping(cpu=True)
    cfg, student, optimizer, state = _setup(accelerator)
    views, labels = [torch.randn(4, 3, 32, 32) for _ in range(2)], torch.arange(4)
    # the teacher's BN running statistics are left out: its own train-mode forward moves them, and every step that is
    # not skipped overwrites them with the student's
    momentum_state = lambda: {"queue": state.queue, "queue_labels": state.queue_labels, "ptr": state.ptr,
                              **{f"teacher.{n}": p for n, p in state.teacher.named_parameters()}}
    before = {k: v.clone() for k, v in momentum_state().items()}
    ressl.train_step(student, state, optimizer, views, labels, cfg, {"lr": 0.1, "alpha": 0.5, "ema_momentum": 0.9}, 0,
                     accelerator)
    moved = {k for k, v in momentum_state().items() if not torch.equal(v, before[k])}
    assert moved == (set() if skipped else set(before)), set(before) - moved
