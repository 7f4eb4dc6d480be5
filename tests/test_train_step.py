"""Each train step does what the optimiser says: one real train_step of every script (its own setup(), schedules()
and train_step(), Accelerator(cpu=True), tiny heads, random 16 px images), and eval_linear.py's.

For every trainable parameter the test records the gradient its backward produced (a tensor hook) and, at
optimizer.step time (the optimiser's step pre-hook), its value, its .grad and its optimiser state. It then checks

- the .grad the optimiser steps on is the gradient of the step's backward (times the clipping factor where the
  script clips): a step that does not train (zero_grad below backward, no backward) leaves no gradient or a zero one;
- the new value is the optimiser's update recomputed here from that .grad with the SCHEDULED lr (sched["lr"], which
  differs from --lr on purpose) and the CONFIGURED weight decay, not with what the optimiser's groups hold: a schedule
  never written into the optimiser, or a weight decay the optimiser never got, moves the parameters differently.
  SGD: buf = momentum * buf + (g + wd p) (buf = g + wd p on the first step), p <- p - lr buf; Adam (torch's, L2 weight
  decay): moments m, v of g + wd p, p <- p - lr / (1 - b1^t) m / (sqrt(v / (1 - b2^t)) + eps);
- each piece of momentum state moves as its script documents: EMA networks m * old + (1 - m) * (online AFTER the
  step) with the BN statistics copied, queues and banks FIFO with this step's keys (recomputed here from the momentum
  encoder as it was before the step), SMoG's groups by Eq. (4), its cache and group sizes.

Two steps per script (the second with optimiser state: SGD's momentum buffer, Adam's moments). Every parameter
tensor is checked, on all its entries up to SAMPLE and on a fixed random SAMPLE of the larger ones (a full copy of
ResNet-18 per check would cost seconds). Teacher / momentum BN runs over the whole batch here (ReCo --bn-splits 1;
ReSSL's default with the predictor) so that the keys can be recomputed without the shuffle.
"""
import copy
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator

import eval_linear
import hnpm
import median_triplet
import reco
import ressl
import smog

B = 8  # global batch: one process
STEPS_PER_EPOCH = 4  # with --warmup-epochs 1: lr = base / 4, base / 2 on steps 0 and 1, never --lr
DATA = types.SimpleNamespace(cifar_stem=False, size=16, num_classes=4, pretrain=range(64))  # what setup() reads
LABELS = torch.arange(B) % 4
# a large lr and weight decay so that the decay term (lr * wd * p) lies far above float32 rounding
SGD = dict(batch_size=B, lr=3.2, weight_decay=0.05, epochs=2, warmup_epochs=1)  # base lr 3.2 * 8 / 256 = 0.1
SAMPLE = 2048  # entries checked per parameter tensor
_index = {}


def pick(t):
    """The checked entries of a tensor (all of them up to SAMPLE, else a fixed sample per size), detached, flat."""
    n = t.numel()
    if n not in _index:
        _index[n] = (torch.arange(n) if n <= SAMPLE else
                     torch.randperm(n, generator=torch.Generator().manual_seed(n))[:SAMPLE])
    return t.detach().reshape(-1)[_index[n]]


def images(n_views, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, 16, 16, generator=g) for _ in range(n_views)]


def close(a, b, atol=1e-6, rtol=1e-5):
    """allclose that leaves out the entries where b is NaN (those the check cannot predict)."""
    known = ~b.isnan()
    return bool(((a - b).abs() <= atol + rtol * b.abs())[known].all())


class Recorder:
    """Records the gradient each backward produces for the named parameters (tensor hooks: before anything could
    zero or drop it; sampled entries and the full norm) and, at each optimizer.step, their value, .grad and
    optimiser state (sampled entries)."""

    def __init__(self, optimizer, named):
        self.named, self.steps, self.backward = named, [], {}
        self.inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the torch optimiser
        self.handles = [self.inner.register_step_pre_hook(self._at_step)]
        for n, p in named.items():
            self.handles.append(p.register_hook(lambda g, n=n: self._on_grad(n, g)))

    def _on_grad(self, n, g):
        assert n not in self.backward, f"{n}: two backward passes before one optimizer.step"
        self.backward[n] = (pick(g).clone(), g.detach().float().pow(2).sum())

    def _at_step(self, opt, args, kwargs):
        group = {id(p): g for g in opt.param_groups for p in g["params"]}
        self.steps.append({
            "backward": self.backward,
            "value": {n: pick(p).clone() for n, p in self.named.items()},
            "grad": {n: None if p.grad is None else pick(p.grad).clone() for n, p in self.named.items()},
            "grad_sq": sum(float(p.grad.float().pow(2).sum()) for p in self.named.values() if p.grad is not None),
            "state": {n: {k: (pick(v) if v.dim() else v).clone() if torch.is_tensor(v) else v
                          for k, v in opt.state.get(p, {}).items()} for n, p in self.named.items()},
            "group": {n: group.get(id(p)) for n, p in self.named.items()}})
        self.backward = {}

    def close(self):
        for h in self.handles:
            h.remove()


def optimiser_holds_exactly(optimizer, named):
    held = {id(p) for g in getattr(optimizer, "optimizer", optimizer).param_groups for p in g["params"]}
    missing = [n for n, p in named.items() if id(p) not in held]
    assert not missing, f"trainable parameters the optimiser does not hold: {missing[:5]}"
    assert len(held) == len(named), "the optimiser holds parameters that are not trainable here"


def expected_update(kind, p, g, state, group, lr, wd, momentum=None):
    """The optimiser's step recomputed by hand -> (new value, new state); torch's own order of operations."""
    d = g.add(p, alpha=wd)
    if kind == "sgd":
        buf = state.get("momentum_buffer")
        buf = d.clone() if buf is None else buf.mul(momentum).add(d)
        return p.add(buf, alpha=-lr), {"momentum_buffer": buf}
    b1, b2 = group["betas"]
    t = int(state.get("step", 0)) + 1
    m = state.get("exp_avg", torch.zeros_like(p)).lerp(d, 1 - b1)
    v = state.get("exp_avg_sq", torch.zeros_like(p)).mul(b2).addcmul(d, d, value=1 - b2)
    new = p.addcdiv(m, (v.sqrt() / (1 - b2 ** t) ** 0.5).add(group["eps"]), value=-lr / (1 - b1 ** t))
    # where g + wd p cancels to within ~100 eps of 0, Adam's step hangs on its last bits: NaN leaves those out
    return torch.where(d.abs() > 100 * group["eps"], new, float("nan")), {"exp_avg": m, "exp_avg_sq": v}


def check_optimiser_step(rec, kind, lr, wd, momentum=None, clip=0.0):
    """Asserts that the recorded step's .grad is its backward's gradient (clipped to total norm `clip` when set, as
    torch.nn.utils.clip_grad_norm_ does) -> {name: (expected new value, expected new optimiser state)}."""
    assert rec["backward"], "optimizer.step ran without a backward before it"
    no_grad = [n for n, g in rec["grad"].items() if g is None]
    assert not no_grad, f"no gradient at optimizer.step (the step does not train): {no_grad[:5]}"
    unused = [n for n in rec["grad"] if n not in rec["backward"]]
    assert not unused, f"trainable parameters the loss does not reach: {unused[:5]}"
    assert rec["grad_sq"] > 0, "all gradients are zero at optimizer.step: the step does not train"
    coef = 1.0
    if clip > 0:
        total = sum(float(sq) for _, sq in rec["backward"].values()) ** 0.5
        coef = min(1.0, clip / (total + 1e-6))
    expected = {}
    for n, g in rec["grad"].items():
        assert close(g, coef * rec["backward"][n][0], atol=1e-7, rtol=1e-4), \
            f"{n}: the .grad at optimizer.step is not this step's backward gradient"
        expected[n] = expected_update(kind, rec["value"][n], g, rec["state"][n], rec["group"][n], lr, wd, momentum)
    return expected


def assert_moved_as(expected, named, optimizer, skip=()):
    """Every parameter took its hand-made update (and the optimiser state agrees), except those in `skip`."""
    state, counted = getattr(optimizer, "optimizer", optimizer).state, [0, 0]
    for n, (value, new_state) in expected.items():
        if n in skip:
            continue
        p = pick(named[n])
        counted = [counted[0] + int((~value.isnan()).sum()), counted[1] + value.numel()]
        assert close(p, value), f"{n}: not the update of the scheduled lr and the configured weight decay " \
                                f"(max error {float((p - value).nan_to_num().abs().max()):.3g})"
        for k, v in new_state.items():
            assert close(pick(state[named[n]][k]), v), f"{n}: optimiser state {k}"
    assert counted[0] >= 0.99 * counted[1], "too few entries checked"


def picked(module):
    """Sampled entries of a module's parameters, in order: what an EMA check needs of the module before the step."""
    return [pick(p).clone() for p in module.parameters()]


def assert_ema(target, old, online, m, what):
    """target = m * old + (1 - m) * online (parameters, in order; old: picked() before the step) and target's
    buffers = online's."""
    new_params, online_params = list(target.parameters()), list(online.parameters())
    assert len(new_params) == len(online_params) == len(old)
    for t, o, s in zip(new_params, old, online_params):
        assert close(pick(t), m * o + (1 - m) * pick(s)), f"{what}: not m * old + (1 - m) * online"
    for t, s in zip(target.buffers(), online.buffers()):
        assert torch.equal(t, s), f"{what}: BN statistics not copied"


def assert_fifo(queue_after, queue_before, ptr, keys, what):
    """Rows ptr .. ptr + N (mod K) hold `keys`, every other row is unchanged."""
    k, n = len(queue_before), len(keys)
    rows = [(ptr + i) % k for i in range(n)]
    assert close(queue_after[rows].float(), keys.float(), atol=1e-5), f"{what}: this step's keys not at rows {rows}"
    others = [r for r in range(k) if r not in rows]
    assert torch.equal(queue_after[others], queue_before[others]), f"{what}: rows outside the FIFO window changed"


# ----------------------------------------------------------------------------- the five scripts

def run_steps(script, cfg, views, kind="sgd", clip=0.0, extra_trainable=None, before=None, check_state=None,
              skip=()):
    """Steps 0 and 1 of the script's train_step after its setup(), each checked as the module docstring says.
    before(network, state) -> what check_state needs from before the step; check_state(step, sched, that, network,
    state, expected updates) checks the momentum state."""
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model, optimizer, state = script.setup(cfg, DATA, accelerator)
    raw = accelerator.unwrap_model(model)
    named = {n: p for n, p in raw.named_parameters() if p.requires_grad}
    if extra_trainable:
        named.update(extra_trainable(state))
    optimiser_holds_exactly(optimizer, named)
    rec = Recorder(optimizer, named)
    try:
        for step in (0, 1):
            sched = script.schedules(cfg, step, STEPS_PER_EPOCH)
            assert sched["lr"] != cfg.lr
            old = before(raw, state) if before else None
            model.train(), state.train()
            logs = script.train_step(model, state, optimizer, views, LABELS, cfg, sched, step, accelerator)
            assert torch.isfinite(logs["loss"])
            assert len(rec.steps) == step + 1, "train_step did not call optimizer.step once"
            expected = check_optimiser_step(rec.steps[-1], kind, sched["lr"], cfg.weight_decay, cfg.momentum, clip)
            assert_moved_as(expected, named, optimizer, skip)
            if check_state:
                check_state(step, sched, old, raw, state, expected)
    finally:
        rec.close()


def test_median_triplet_step():
    """SGD on the online network; target <- m target + (1 - m) (backbone, projector) after the step."""
    cfg = median_triplet.Config(proj_hidden=32, proj_dim=16, ema_momentum=0.5, **SGD)

    def check(step, sched, old, raw, state, expected):
        assert 0 < sched["ema_momentum"] < 1
        assert_ema(state.target, old, nn.Sequential(raw.backbone, raw.projector), sched["ema_momentum"], "target")
    run_steps(median_triplet, cfg, images(2), before=lambda raw, state: picked(state.target), check_state=check)


def test_smog_step():
    """SGD on f_theta; f^_eta by EMA; the groups by Eq. (4) from the online projections of stream a (before the
    step) assigned to the old groups (step 1; step 0's groups come from k-means); the group sizes grow by the step's
    counts; the cache rows of the step hold those projections."""
    cfg = smog.Config(proj_hidden=32, proj_dim=16, num_groups=4, ema_momentum=0.5, beta_schedule="fixed",
                      beta_end=0.5, **SGD)
    views = images(2)

    def before(raw, state):
        with torch.no_grad():  # the projections of stream a (the streams swap every step), train-mode BN as the step
            online = copy.deepcopy(nn.Sequential(raw.backbone, raw.projector))
            z = [F.normalize(online(x).float(), dim=1) for x in views]
        return picked(state.target), state.groups.clone(), state.seen.clone(), z

    def check(step, sched, old, raw, state, expected):
        target, groups_before, seen_before, z = old
        assert_ema(state.target, target, nn.Sequential(raw.backbone, raw.projector), sched["ema_momentum"],
                   "momentum network")
        z = z[step % 2]
        rows = slice((step % cfg.reset_every) * B, (step % cfg.reset_every + 1) * B)
        assert close(F.normalize(state.cache[rows], dim=1), z, atol=1e-5), "cache rows of the step"
        if step == 0:
            return
        assign = (z @ F.normalize(groups_before, dim=1).T).argmax(dim=1)
        beta, groups = sched["beta"], groups_before.clone()
        for k in range(len(groups)):
            if (assign == k).any():
                groups[k] = F.normalize(beta * groups_before[k] + (1 - beta) * z[assign == k].mean(0), dim=0)
        assert close(state.groups, groups, atol=1e-5), "groups not Eq. (4)"
        assert torch.equal(state.seen - seen_before, torch.bincount(assign, minlength=len(groups)).float())
    run_steps(smog, cfg, views, before=before, check_state=check)


def test_ressl_step():
    """SGD on the student (Eq. 7's InfoNCE on at alpha < 1); teacher by EMA (Eq. 6); the teacher's normalised keys of
    the step and their labels enter the queue at ptr (wrapping on the second step)."""
    cfg = ressl.Config(proj_hidden=32, proj_dim=16, queue_size=12, ema_momentum=0.5, infonce_warmup_epochs=1, **SGD)
    views = images(2)

    def before(raw, state):
        with torch.no_grad():
            keys = F.normalize(copy.deepcopy(state.teacher)(views[1]).float(), dim=1)
        return picked(state.teacher), state.queue.clone(), state.queue_labels.clone(), int(state.ptr), keys

    def check(step, sched, old, raw, state, expected):
        teacher, queue, queue_labels, ptr, keys = old
        assert_ema(state.teacher, teacher, nn.Sequential(raw.backbone, raw.projector), sched["ema_momentum"],
                   "teacher")
        assert_fifo(state.queue, queue, ptr, keys, "queue")
        assert_fifo(state.queue_labels, queue_labels, ptr, LABELS, "queue labels")
        assert int(state.ptr) == (ptr + B) % cfg.queue_size
    run_steps(ressl, cfg, views, before=before, check_state=check)


def test_reco_step():
    """SGD on the online encoder (all three terms on); momentum encoder by EMA; the step's keys enter the queue and
    its weak keys the bank of Eq. (3) at the same rows; the pointer moves on by the batch."""
    cfg = reco.Config(proj_dim=16, queue_size=12, bn_splits=1, ema_momentum=0.5, global_bank="weak", **SGD)
    views = images(3)

    def before(raw, state):
        with torch.no_grad():
            encoder = copy.deepcopy(state.momentum_encoder)
            keys, weak = (F.normalize(encoder(x).float(), dim=1) for x in views[1:])
        return picked(state.momentum_encoder), state.queue.clone(), state.queue_weak.clone(), int(state.ptr), keys, weak

    def check(step, sched, old, raw, state, expected):
        encoder, queue, bank, ptr, keys, weak = old
        assert_ema(state.momentum_encoder, encoder, nn.Sequential(raw.backbone, raw.head), sched["ema_momentum"],
                   "momentum encoder")
        assert_fifo(state.queue, queue, ptr, keys, "queue")
        assert_fifo(state.queue_weak, bank, ptr, weak, "bank of Eq. (3)")
        assert int(state.ptr) == (ptr + B) % cfg.queue_size
    run_steps(reco, cfg, views, before=before, check_state=check)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_hnpm_step(optimizer):
    """Adam (the paper's) or SGD on the teacher, on the gradient clipped to norm 1; the student then moves to
    tau student + (1 - tau) teacher (Eq. 6)."""
    cfg = hnpm.Config(proj_hidden=32, proj_dim=16, optimizer=optimizer,
                      **{**SGD, "lr": 0.1 if optimizer == "adam" else SGD["lr"]})

    def check(step, sched, old, raw, student, expected):
        assert 0 < sched["ema_tau"] < 1
        assert_ema(student, old, raw, sched["ema_tau"], "student")
    run_steps(hnpm, cfg, images(2), kind=optimizer, clip=cfg.grad_clip, before=lambda raw, student: picked(student),
              check_state=check)


def test_hnpm_step_with_student_grad():
    """--student-grad: the student is trained by the same optimiser (clipped together with the teacher), then
    averaged toward the updated teacher: student <- tau (its optimiser update) + (1 - tau) teacher."""
    cfg = hnpm.Config(proj_hidden=32, proj_dim=16, student_grad=True, **{**SGD, "lr": 0.1, "optimizer": "adam"})
    student_names = {}

    def extra(student):
        student_names.update({"student." + n: p for n, p in student.named_parameters()})
        return student_names

    def check(step, sched, old, raw, student, expected):
        tau = sched["ema_tau"]
        for (n, p), t in zip(student.named_parameters(), raw.parameters()):
            stepped = expected["student." + n][0]
            assert close(pick(p), tau * stepped + (1 - tau) * pick(t)), f"student.{n}"
    run_steps(hnpm, cfg, images(2), kind="adam", clip=cfg.grad_clip, extra_trainable=extra, check_state=check,
              skip=student_names)  # filled by extra(); their final value is checked in check()


# ----------------------------------------------------------------------------- eval_linear.py

@pytest.mark.parametrize("cached", [True, False])
def test_eval_linear_step(cached):
    """eval_linear's own classifier, optimiser and schedule (make_classifier) driven by train_epoch over one batch for
    two epochs with --milestones 1: epoch 0 at --lr, epoch 1 at --lr x 0.1 (the schedule applied), SGD with momentum
    and weight decay, on the gradient of the cross-entropy of the frozen backbone's features (recomputed here); the
    backbone does not move."""
    cfg = eval_linear.EvalConfig(lr=0.5, momentum=0.9, weight_decay=0.05, milestones="1", cached=cached)
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval().requires_grad_(False)
    frozen = copy.deepcopy(backbone)
    classifier, optimizer, scheduler = eval_linear.make_classifier(cfg, 4, 3)
    if not cached:  # as evaluate() does
        classifier, optimizer = accelerator.prepare(classifier, optimizer)
    x, y = torch.randn(B, 3, 8, 8), torch.arange(B) % 3
    with torch.no_grad():
        feats = backbone(x)
    batch = [(feats, y)] if cached else [(x, y)]
    named = dict(accelerator.unwrap_model(classifier).named_parameters())
    rec = Recorder(optimizer, named)
    try:
        for epoch, lr in enumerate([cfg.lr, cfg.lr * 0.1]):
            ref = copy.deepcopy(accelerator.unwrap_model(classifier))
            F.cross_entropy(ref(feats), y).backward()
            eval_linear.train_epoch(classifier, backbone, optimizer, scheduler, batch, cfg, accelerator)
            assert len(rec.steps) == epoch + 1
            for n, p in ref.named_parameters():
                assert close(rec.steps[-1]["backward"][n][0], pick(p.grad)), f"{n}: not the cross-entropy's gradient"
            expected = check_optimiser_step(rec.steps[-1], "sgd", lr, cfg.weight_decay, cfg.momentum)
            assert_moved_as(expected, named, optimizer)
    finally:
        rec.close()
    for a, b in zip(backbone.parameters(), frozen.parameters()):
        assert torch.equal(a, b)
