"""HNPM: contrastive self-supervised learning with hard negative pair mining, the first public implementation.

W. Zhu, H. Shang, T. Lv, C. Liao, S. Yang, J. Liu. "Contrastive Self-Supervised Learning with Hard Negative Pair
Mining" (on arXiv as "Adversarial Contrastive Self-Supervised Learning"), 2022. https://arxiv.org/abs/2202.13072

A gradient-carrying TEACHER sees an augmented image, an EMA STUDENT the plain image (the paper's names, the
reverse of BYOL's). Loss α1·L1 + α2·L2: L1 pulls the two L∞-normalised representations of an image together, L2
pushes each student row away from the batch's "hard" teacher rows (Eq. 5). No public code: docs/hnpm.md has it all.

Run:    accelerate launch hnpm.py --data-dir data   (CIFAR-10, ResNet-18, the shared small protocol, Sec. 3.5's loss)
Smoke:  python hnpm.py --dataset fake --fake-size 128 --epochs 2 --warmup-epochs 1 --batch-size 32 --num-workers 0
Paper:  accelerate launch hnpm.py --dataset imagenet --data-dir IMAGENET --recipe paper   (Sec. 3.5, `PAPER`)

Glossary (the paper's symbols)
    T, θ_T    teacher: backbone -> projector on A(I); carries the gradient          `Teacher`, Eq. (1)
    S, θ_S    student: EMA copy of T on the un-augmented I; no gradient             `ema_update`, Eqs. (1), (6)
    U_i, U'_i teacher / student representation of image i, (B, D)                  `u_teacher`, `u_student`
    DisSim    mean over the D dims of (a/||a||_inf - b/||b||_inf)^2, in [0, 4]      `pairwise_dissim`, Eq. (3)
    B~_i      hard negatives of anchor i: {j != i : DisSim(U'_i, U_j) <= 1}         `hard_negative_mask`, Eq. (5)
    L1, L2    positive loss, negative loss -E[log sum_{j in B~_i} DisSim]           `hnpm_terms`, Eqs. (2), (4)
    α1, α2, τ loss weights 0.8, 0.1 (Eq. 7); EMA coefficient 0.5 (Eq. 6)            `--alpha1 --alpha2 --ema-tau`

Interpretations (the text silent or ambiguous; nothing departs from stated text), evidence in docs/hnpm.md:
    I1 DisSim and L1 are means over dims (so L1's gradient is 1/D of a sum's; L2's is unchanged).
    I2 anchors with an empty hard set are left out of L2.    I3 the sum inside L2's log is clamped at 1e-8.
    I4 anchors are student rows, negatives teacher rows, mined over the global batch (autograd all-gather).
    I5 `--mining threshold` (Eq. 5, default) | `hardest` (Sec. 3: nearest j only) | `all` (Fig. 2 "w/o HNPM").
    I6 `--student-grad` (Fig. 2): the student joins the optimiser.    I7 head: BYOL's 2-layer MLP, 4096 -> 256.
    I8 "random crop of scale [0.8, 1.0]" = RandomResizedCrop, made first, not last.    I9 BN statistics copied.
    I10 the student runs in train mode; the teacher is evaluated and saved.    I11 the dataset's mean/std.
    I12 --recipe paper: Sec. 3.5's Adam, lr 0.1 as given, no weight decay or warm-up (none stated); its cosine
        "with the maximum number of iterations as 100" is one half-cosine over 100 epochs.
    I13 augmentation probabilities are per image.    I14 global BatchNorm over GPUs (the paper says nothing).
"""
import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torchvision
from accelerate.utils import set_seed

import common
from common import ViewSpec


# ----------------------------------------------------------------------------- Config

@dataclass
class Config(common.BaseConfig):
    # HNPM's own values (Sec. 3.5); the generic optimisation fields keep the shared small protocol of BaseConfig
    projector: bool = True  # backbone -> 2-layer MLP head (Interpretation 7); --no-projector: backbone features
    proj_hidden: int = 4096  # projector hidden width (Interpretation 7)
    proj_dim: int = 256  # representation width D of U and U' (Interpretation 7)
    ema_tau: float = 0.5  # τ of Eq. (6), θ_S <- τ θ_S + (1-τ) θ_T (Sec. 3.5; Table 7: 1.0, 0.999, 0.5, 0.0)
    alpha1: float = 0.8  # weight of the positive loss L1 in Eq. (7) (Sec. 3.5)
    alpha2: float = 0.1  # weight of the negative loss L2 in Eq. (7) (Sec. 3.5)
    threshold: float = 1.0  # hard negative if DisSim(U'_i, U_j) <= threshold, Eq. (5) (--mining threshold)
    # Interpretation 5: threshold: Eq. (5); hardest: Sec. 3's "most similar pair"; all: Fig. 2 "w/o HNPM"
    mining: Literal["threshold", "hardest", "all"] = "threshold"  # which j != i enter the hard set of anchor i
    student_grad: bool = False  # --student-grad: gradient through the student too (Fig. 2, Interpretation 6)
    grad_clip: float = 1.0  # max gradient norm (Sec. 3.3, 3.5); 0 turns clipping off


# --recipe paper: Sec. 3.5's values for the ImageNet tables (ILSVRC-2012, ResNet-50: Tables 1, 3, 5-7)
PAPER = {
    "arch": "resnet50",  # Tables 1, 3, 5-7: "with the ResNet-50 encoder"
    "optimizer": "adam",  # Sec. 3.5: "The Adam optimizer is used to minimize the loss in equation 7"
    "lr": 0.1,  # Sec. 3.5: "The learning rate is set as 0.1" (no batch rule stated: Adam's lr is used as given)
    "batch_size": 160,  # Sec. 3.5: "The batch size is 160"
    "epochs": 100,  # Interpretation 12: the cosine's "maximum number of iterations as 100", read as 100 epochs
    "warmup_epochs": 0,  # Sec. 3.5 names only "a cosine annealing schedule" (no code released): no warm-up
    "weight_decay": 0.0,  # Sec. 3.5 names none (no code released): torch.optim.Adam's default, 0
    "grad_clip": 1.0,  # Sec. 3.5: "the maximum norm of gradient clipping as 1.0"
    "ema_tau": 0.5,  # Sec. 3.5: "The smoothing coefficient τ ... is set as 0.5"
    "alpha1": 0.8,  # Sec. 3.5: "α_1 is set to 0.8"
    "alpha2": 0.1,  # Sec. 3.5: "α_2 is set to 0.1"
}


# ----------------------------------------------------------------------------- Augmentations

def view_specs(cfg, size):
    """[teacher view A(I), student view I]. A(I), Sec. 3.5: colour jitter (0.8, 0.8, 0.8, 0.2) on 80 %, grayscale
    20 %, horizontal flip 50 %, Gaussian blur 3x3 with sigma 1.5 on 10 %, random crop of scale [0.8, 1.0].
    I of Eq. (1): the un-augmented image, only resized to `size` and normalised (Interpretation 11: the dataset's
    mean/std)."""
    # Interpretation 13: "to random 80% training images in each batch" is p = 0.8 per image (likewise 20, 50, 10 %)
    # Interpretation 8: a random resized crop back to `size`, made first (the paper lists it last)
    augmented = ViewSpec(crop_scale=(0.8, 1.0), flip_p=0.5, jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, gray_p=0.2,
                         blur_p=0.1, blur_sigma=(1.5, 1.5), blur_kernel=3)
    plain = ViewSpec(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0)
    return [augmented, plain]


# ----------------------------------------------------------------------------- Encoder and heads

def build_backbone(arch, cifar_stem):
    """torchvision ResNet without its classifier; the CIFAR stem swaps conv1 for 3x3 stride 1 and drops max-pool."""
    net = getattr(torchvision.models, arch)(weights=None)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    feat_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feat_dim


def mlp(in_dim, hidden, out_dim):
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))


class Teacher(nn.Module):
    """T(.; θ_T): backbone -> projector; the student S is an EMA copy of the whole network."""

    def __init__(self, cfg, cifar_stem):
        super().__init__()
        self.backbone, feat_dim = build_backbone(cfg.arch, cifar_stem)
        # Interpretation 7: the paper names no head; a BYOL-style 2-layer MLP, or none with --no-projector
        self.projector = mlp(feat_dim, cfg.proj_hidden, cfg.proj_dim) if cfg.projector else nn.Identity()

    def forward(self, x):
        return self.projector(self.backbone(x))


# ----------------------------------------------------------------------------- Loss

def linf_normalize(u, eps=1e-12):
    """u / ||u||_inf row-wise (Eq. 2): every row ends with its largest |entry| equal to 1. u: (N, D)."""
    return u / u.abs().amax(dim=-1, keepdim=True).clamp_min(eps)


def pairwise_dissim(a, b):
    """DisSim of every row of `a` (Na, D) against every row of `b` (Nb, D), Eq. (3), inputs L-inf normalised. Expanded
    (below) so that memory is (Na, Nb), not (Na, Nb, D); same value as the loop `((a[i] - b[j]) ** 2).mean()` up to
    float rounding (exact for small integer entries, which the tests use)."""
    # Interpretation 1: the vector (a - b)^2 is reduced by the MEAN over the D dims
    # Eq. (3): DisSim(a, b) = mean_k (a_k - b_k)^2 = (|a|^2 + |b|^2 - 2 a.b) / D
    sq = a.pow(2).sum(-1)[:, None] + b.pow(2).sum(-1)[None, :] - 2.0 * a @ b.T  # (Na, Nb)
    return sq.clamp_min(0.0) / a.shape[-1]  # (Na, Nb)


MINING = ("threshold", "hardest", "all")


def hard_negative_mask(d, threshold=1.0, mining="threshold"):
    """mask[i, j] = True when j is in the hard negative set of anchor i. d: (B, B), d[i, j] = DisSim(U'_i, U_j).

    mining (Interpretation 5): "threshold", Eq. (5): every j != i with d[i, j] <= threshold; "hardest", Sec. 3's
    "only retain the most similar pair": the one j != i of smallest d[i, j] (the first on a tie; threshold unused);
    "all", Fig. 2's "w/o HNPM": every j != i.
    """
    assert mining in MINING, f"mining={mining!r}: use one of {MINING}"
    idx = torch.arange(d.shape[0], device=d.device)
    not_self = idx[:, None] != idx[None, :]  # (B, B)
    if mining == "all":  # Interpretation 5: "w/o HNPM" takes every other sample of the batch as a negative
        return not_self
    if mining == "hardest":  # Interpretation 5: Sec. 3, "we only retain the most similar pair of two different samples"
        nearest = d.masked_fill(~not_self, float("inf")).argmin(dim=1)  # (B,)
        return (idx[None, :] == nearest[:, None]) & not_self  # (B, B)
    # Eq. (5): B~_i = {I_j in B_i, I_j != I_i, DisSim(U'_i, U_j) <= 1}
    return not_self & (d <= threshold)  # (B, B)


def hnpm_terms(u_teacher, u_student, threshold=1.0, *, mining="threshold", student_grad=False, eps=1e-8):
    """The terms of Eq. (7) and what the mining saw, named tensors (no host sync; arguments as in `hnpm_loss`): l1, l2
    (Eqs. 2, 4; 0-dim float32, with gradient), hard_size (mean |B~_i| over anchors), empty_frac (fraction of anchors
    with an empty hard set), dissim_mean and dissim_max (over the pairs j != i: how far the batch is from the
    threshold) and mask ((B, B) bool, mask[i, j] = j in B~_i)."""
    assert u_teacher.shape == u_student.shape and u_teacher.dim() == 2, \
        f"two (B, D) tensors of the same shape, got {tuple(u_teacher.shape)} and {tuple(u_student.shape)}"
    if not student_grad:
        u_student = u_student.detach()  # Sec. 3.3: the student's gradient is blocked
    # float32 math even under bf16/fp16 autocast: the threshold at 1 and the log need it.
    with torch.autocast(device_type=u_teacher.device.type, enabled=False):
        dtype = torch.promote_types(u_teacher.dtype, torch.float32)  # float32, or float64 if given
        t = linf_normalize(u_teacher.to(dtype))  # (B, D)  U_j / ||U_j||_inf
        s = linf_normalize(u_student.to(dtype))  # (B, D)  U'_i / ||U'_i||_inf
        # Eq. (2): L1 = E_i[(U_i/||U_i||_inf - U'_i/||U'_i||_inf)^2]  (mean over dims, Interpretation 1)
        l1 = (t - s).pow(2).mean(-1).mean()
        # Eq. (3): d[i, j] = DisSim(U'_i, U_j); anchors are student rows, negatives teacher rows (Interpretation 4)
        d = pairwise_dissim(s, t)  # (B, B)
        mask = hard_negative_mask(d.detach(), threshold, mining)  # (B, B) bool
        # Eq. (4): L2 = -E_i[log sum_{j in B~_i} DisSim(U'_i, U_j)]
        neg_sum = (d * mask).sum(dim=1).clamp_min(eps)  # (B,); Interpretation 3: the sum clamped at eps
        # Interpretation 2: anchors with an empty hard set weigh 0 in the mean (L2 = 0 if all are empty)
        has_hard = mask.any(dim=1).to(dtype)  # (B,)
        l2 = -(neg_sum.log() * has_hard).sum() / has_hard.sum().clamp_min(1)
    off, pairs = ~torch.eye(len(d), dtype=torch.bool, device=d.device), d.detach()  # (B, B): the pairs j != i
    return {"l1": l1, "l2": l2, "hard_size": mask.sum(1).to(dtype).mean(), "empty_frac": 1 - has_hard.mean(),
            "dissim_mean": (pairs * off).sum() / off.sum(), "dissim_max": pairs.masked_fill(~off, -math.inf).amax(),
            "mask": mask}


def hnpm_loss(u_teacher, u_student, alpha1=0.8, alpha2=0.1, threshold=1.0, *, mining="threshold",
              student_grad=False, eps=1e-8):
    """Eqs. (2)-(5) and (7): α1·L1 + α2·L2 over a batch of positive pairs (row i of both inputs is image i), a 0-dim
    float32 tensor; `hnpm_terms` gives the terms and the mining diagnostics.

    u_teacher: (B, D) from the gradient-carrying teacher on augmented images A(I) (U in the paper).
    u_student: (B, D) from the EMA student on the un-augmented images I (U' in the paper); detached here unless
        `student_grad` (the Fig. 2 ablation). Pass the GLOBAL batch: the hard set spans every row.
    mining: "threshold" (Eq. 5), "hardest" or "all" (Fig. 2 "w/o HNPM"), see `hard_negative_mask`.
    """
    terms = hnpm_terms(u_teacher, u_student, threshold, mining=mining, student_grad=student_grad, eps=eps)
    return alpha1 * terms["l1"] + alpha2 * terms["l2"]  # Eq. (7)


def mined_pairs(mask, labels):
    """Diagnostic (not in the paper): (mined pairs (i, j) whose labels agree, mined pairs), a (2,) tensor.
    mask: (B, B) bool, labels: (B,)."""
    same = labels[:, None] == labels[None, :]  # (B, B)
    return torch.stack([(mask & same).sum(), mask.sum()])


# ----------------------------------------------------------------------------- Momentum, schedules

@torch.no_grad()
def ema_update(student, teacher, tau):
    """Eq. (6): θ_S <- τ·θ_S + (1-τ)·θ_T, one fused call over all parameters; τ = 0 copies the teacher, τ = 1
    freezes the student (Table 7). Interpretation 9: BN running statistics are copied (the student runs in train
    mode, so they only matter for whoever evaluates it)."""
    params = list(student.parameters())
    torch._foreach_lerp_(params, [p.detach() for p in teacher.parameters()], 1 - tau)  # one fused op
    torch._foreach_copy_(list(student.buffers()), list(teacher.buffers()))


def average_student_grads(student, accelerator):
    """--student-grad: the student is not wrapped by DDP, so average its gradients over processes here."""
    if accelerator.num_processes > 1:
        for p in student.parameters():
            if p.grad is not None:
                p.grad.copy_(accelerator.reduce(p.grad, "mean"))


def lr_at(step, total_steps, warmup_steps, base_lr):
    """Linear warm-up to base_lr, then cosine decay to 0."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1 + math.cos(math.pi * t))


# ----------------------------------------------------------------------------- Training

def check_config(cfg, num_processes):
    """Every flag's domain, checked before anything runs: one `error:` line and exit code 2 for a bad value."""
    common.check_base_config(cfg, num_processes)
    require = common.require
    require(cfg.batch_size >= 2, f"--batch-size {cfg.batch_size}: HNPM mines negatives inside the batch, use >= 2.")
    for name in ("proj_hidden", "proj_dim"):
        require(getattr(cfg, name) >= 1, f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}.")
    require(0 <= cfg.ema_tau <= 1, f"--ema-tau {cfg.ema_tau} must lie in [0, 1] (Eq. 6).")
    for name in ("alpha1", "alpha2", "threshold", "grad_clip"):
        require(getattr(cfg, name) >= 0, f"--{name.replace('_', '-')} must be 0 or more, got {getattr(cfg, name)}.")


def forward_loss(teacher, student, views, labels, cfg, accelerator):
    """One step's loss over the GLOBAL batch (identical on every process) -> (loss, logs): the step's log terms,
    `epoch_sums` (named 0-dim tensors train() adds up) and `u`, the teacher's (B, D) representations, detached."""
    x_t, x_s = views  # A(I) for the teacher, the un-augmented I for the student
    # Eq. (1): U = T(A(I); θ_T), U' = S(I; θ_S)
    u_t = teacher(x_t)  # (b, D), b = this process's share
    with torch.set_grad_enabled(cfg.student_grad), accelerator.autocast():
        u_s = student(x_s)  # (b, D)
    # Interpretation 4: mine over the global batch; the teacher rows used as negatives carry gradient
    u_t = common.gather_with_grad(u_t)  # (B, D)
    u_s = common.gather_with_grad(u_s) if cfg.student_grad else accelerator.gather(u_s.detach())
    terms = hnpm_terms(u_t, u_s, cfg.threshold, mining=cfg.mining, student_grad=cfg.student_grad)
    loss = cfg.alpha1 * terms["l1"] + cfg.alpha2 * terms["l2"]  # Eq. (7), as hnpm_loss
    with torch.no_grad():
        same, mined = mined_pairs(terms.pop("mask"), accelerator.gather(labels)).float()  # labels: monitoring only
        logs = {k: v.detach() for k, v in terms.items()}
        sums = {"hard_size": logs["hard_size"], "empty_frac": logs["empty_frac"], "same_label": same, "mined": mined}
    return loss, {**logs, "false_neg": same / mined.clamp(min=1), "epoch_sums": sums, "u": u_t.detach()}


def train_step(teacher, student, optimizer, views, labels, cfg, sched, step, accelerator):
    """One optimiser step: the loss against the student as it was before the step, --optimizer on the teacher
    with gradient clipping (Sec. 3.3, 3.5), then the student's EMA toward the updated teacher (Eq. 6). No host
    sync, and the same on every `step`; -> the logs of `forward_loss`, the loss first."""
    for g in optimizer.param_groups:
        g["lr"] = sched["lr"]
    loss, logs = forward_loss(teacher, student, views, labels, cfg, accelerator)
    common.zero_grad(optimizer, accelerator)  # on the first batch of each --accumulate window
    accelerator.backward(loss)
    raw = accelerator.unwrap_model(teacher)
    if cfg.student_grad:
        average_student_grads(student, accelerator)
    if cfg.grad_clip > 0 and accelerator.sync_gradients:
        # Sec. 3.3 / 3.5: gradient clipping at max norm 1.0 (Interpretation 6: over both networks)
        accelerator.clip_grad_norm_([*raw.parameters(), *(student.parameters() if cfg.student_grad else [])],
                                    cfg.grad_clip)
    optimizer.step()
    # only after a step the teacher took: not after one fp16's GradScaler skipped (a host flag, no sync)
    if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
        ema_update(student, raw, sched["ema_tau"])
    return {"loss": loss.detach(), **logs}


def schedules(cfg, step, steps_per_epoch):
    """This step's learning rate and τ of Eq. (6): --warmup-epochs of linear warm-up, then one half-cosine to 0 over
    --epochs (Interpretation 12); sgd and lars scale --lr by the effective batch / 256, Adam takes it as given."""
    base_lr = cfg.lr if cfg.optimizer == "adam" else cfg.lr * cfg.batch_size * cfg.accumulate / 256
    return {"lr": lr_at(step, cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch, base_lr),
            "ema_tau": cfg.ema_tau}


def setup(cfg, data, accelerator):
    """The teacher and its optimiser, prepared by Accelerate, and the EMA student, registered for checkpointing
    -> (teacher, optimizer, student)."""
    teacher = Teacher(cfg, data.cifar_stem)
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        teacher = common.global_batchnorm(teacher)  # Interpretation 14: the student inherits it
    optimizer = common.make_optimizer(cfg, teacher)  # --optimizer: sgd, lars or adam (Sec. 3.5: Adam)
    teacher, optimizer = accelerator.prepare(common.fast_model(teacher, cfg, accelerator), optimizer)
    # Interpretation 10: S starts as T and stays in train mode (batch statistics); identical on every process
    student = copy.deepcopy(accelerator.unwrap_model(teacher)).requires_grad_(cfg.student_grad)
    if cfg.student_grad:  # Interpretation 6: the student's parameters are trained by the same optimiser
        optimizer.add_param_group({"params": list(student.parameters())})
    accelerator.register_for_checkpointing(student)
    return teacher, optimizer, student


def epoch_diagnostics(sums, steps, eranks):
    """The epoch's means of the hard-set size and empty fraction, the share of mined pairs with the anchor's label,
    and the mean effective rank of U over its logging steps (`eranks`); `sums` of `steps` steps, see forward_loss."""
    if not steps:
        return {}
    s = dict(zip(sums, torch.stack(list(sums.values())).tolist()))  # one host read for all of them
    return {"hard_size": s["hard_size"] / steps, "empty_frac": s["empty_frac"] / steps, "false_neg": s["same_label"]
            / max(s["mined"], 1), **({"u_erank": torch.stack(eranks).mean().item()} if eranks else {})}


def train(cfg: Config):
    accelerator = common.make_accelerator(cfg)
    check_config(cfg, accelerator.num_processes)
    set_seed(cfg.seed)
    data = common.load_data(cfg, accelerator)
    loader = common.train_views(cfg, data, view_specs(cfg, data.size), accelerator)
    run = common.Run(cfg, "hnpm", accelerator, data, steps_per_epoch=len(loader))
    teacher, optimizer, student = setup(cfg, data, accelerator)
    backbone = accelerator.unwrap_model(teacher).backbone  # Interpretation 10: the teacher is evaluated and saved

    start_epoch, done = run.resume()
    step = start_epoch * run.steps_per_epoch + done
    if step == 0 and cfg.eval_every:
        run.monitor(0, 0, backbone, lambda query: {})  # the random-init baseline
    for epoch in range(start_epoch, run.last_epoch):
        teacher.train()
        sums, steps, eranks = {}, 0, []  # the epoch's diagnostics, see forward_loss
        for views, labels, _ in run.epoch_batches(loader, epoch, done if epoch == start_epoch else 0):
            sched = schedules(cfg, step // cfg.accumulate, run.updates_per_epoch)  # per optimiser update
            with run.accumulate(step, teacher):
                logs = train_step(teacher, student, optimizer, views, labels, cfg, sched, step, accelerator)
            sums = {k: sums.get(k, 0) + v for k, v in logs.pop("epoch_sums").items()}
            u, steps, step = logs.pop("u"), steps + 1, step + 1
            if run.logging_step(step):  # logging steps synchronise anyway:
                eranks.append(common.effective_rank(u))  # dimensional collapse of U, an SVD (it syncs)
            if run.after_step(step, epoch, logs, **sched):
                break  # a signal or a non-finite loss: run.finish() checkpoints or raises
        if run.end_epoch(epoch + 1, step, backbone, lambda query: epoch_diagnostics(sums, steps, eranks)):
            break
    return run.finish(backbone, {})


if __name__ == "__main__":
    common.run_main(train, Config, paper=PAPER)
