"""ReSSL. M. Zheng, S. You, F. Wang, C. Qian, C. Zhang, X. Wang, C. Xu, "Weak Augmentation Guided Relational
Self-Supervised Learning", IEEE TPAMI 2024, https://arxiv.org/abs/2203.08717 (NeurIPS 2021 version:
https://arxiv.org/abs/2107.09282). Usage, logged metrics, paper-to-code map and evidence: docs/ressl.md.

A student (strong view) learns to match the sharpened similarity distribution that an EMA teacher (weak view)
computes over a queue of past teacher embeddings (Eqs. 3-6), through an asymmetric predictor and with an InfoNCE
warm-up (Eq. 7). The defaults (--recipe small) are Sec. 4's CIFAR-10 setting; --recipe paper is Sec. 5.1's
ImageNet recipe (PAPER below: LARS, batch 1024, m 0.996 -> 1, BYOL-like student view), --multi-crop Table 8's crops.

Run:    accelerate launch ressl.py --data-dir data    (Sec. 4; --dataset cifar100 --tau-t 0.03: Table 1's best)
Smoke:  python ressl.py --dataset fake --epochs 2 --warmup-epochs 1 --batch-size 32 --num-workers 0 --queue-size 256
Paper:  accelerate launch --num_processes 8 ressl.py --dataset imagenet --data-dir /data/imagenet --recipe paper
        (Table 7's ReSSL (1 Crop); add --multi-crop for Table 8's ReSSL (Multi); docs/ressl.md for the rest)

Glossary (the paper's names):
    student   F_s -> g_s -> q: backbone, projector, predictor; gets the gradient; sees the strong view x^1.
    teacher   F_t -> g_t: EMA of the student's backbone and projector (Eq. 6); sees the weak view x^2.
    z_s, z_t  L2-normalised student prediction and teacher projection (the paper's z^1, z^2).
    Q, K      memory buffer (FIFO queue) of the last K teacher embeddings; p^1, p^2 are distributions over it.
    tau_s/t   student / teacher temperature; tau_t < tau_s sharpens the target p^2 (Sec. 3.2).
    m         teacher momentum of Eq. (6).
    alpha     InfoNCE warm-up weight of Eq. (7): current step / warm-up steps, capped at 1.

Interpretations and deviations (marked in the code; what, why and evidence in docs/ressl.md):
    Interpretation 1: InfoNCE warm-up length not given; the lr warm-up's 10 epochs (--infonce-warmup-epochs).
    Interpretation 2: InfoNCE temperature not given; tau_s = 0.1 (--tau-nce).
    Interpretation 3: head sizes given for ImageNet only; Sec. 5.1's hidden 4096, output 256, BN + ReLU.
    Interpretation 4: the queue starts as random unit vectors (MoCo, the authors' code).
    Interpretation 5: flip, grayscale, jitter, blur sigma/kernel from MoCo v2 / authors' code; CIFAR stem <= 64 px.
    Interpretation 6: multi-crop loss (not given): the mean over student crops of Eq. (7), as the authors' code.
    Interpretation 7: the BYOL-like view's other values (jitter, grayscale, flip, blur sigma) are BYOL's.
    Deviation 1: without the predictor the student keeps global BN (the teacher has shuffle BN, --bn-splits).
"""
import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from accelerate.utils import set_seed

import common
from common import ViewSpec


# ----------------------------------------------------------------------------- Config

@dataclass
class Config(common.BaseConfig):
    # ReSSL (the generic fields, common.BaseConfig, hold Sec. 4's optimisation: SGD, lr 0.06, wd 5e-4, 200 epochs)
    proj_hidden: int = 4096  # projector hidden width (Interpretation 3)
    proj_dim: int = 256  # embedding width (Interpretation 3)
    predictor: bool = True  # asymmetric predictor head on the student (Sec. 3.3; --no-predictor: Table 2)
    # Sec. 4: global BN with the predictor, shuffle BN without it
    bn_splits: int = 0  # teacher BN groups over a shuffle of the global batch; 0: 1 with the predictor, 8 without
    ema_momentum: float = 0.99  # teacher momentum m of Eq. (6) for small datasets (Sec. 4); cosine: its start
    ema_schedule: Literal["constant", "cosine"] = "constant"  # cosine: m rises to 1 by the last step (Sec. 5.1)
    queue_size: int = 0  # K; 0: 4096 for 32-px data, 16384 otherwise (Sec. 4, Table 6)
    tau_s: float = 0.1  # student temperature of Eq. (3) (Table 1)
    tau_t: float = 0.04  # teacher temperature of Eq. (4) (Table 1: best on CIFAR-10; 0.03 on the other data sets)
    infonce_warmup: bool = True  # Eq. (7) warm-up (--no-infonce-warmup: Table 3)
    infonce_warmup_epochs: int = 10  # alpha reaches 1 after this many epochs (Interpretation 1)
    tau_nce: float = 0.1  # temperature of the warm-up InfoNCE, Eq. (1) (Interpretation 2)
    teacher_aug: Literal["weak", "strong"] = "weak"  # teacher's view (Tables 4-5)
    student_aug: Literal["mocov2", "byol"] = "mocov2"  # student's view: Sec. 4's, or Sec. 5.1's BYOL-like one
    multi_crop: bool = False  # Table 8: 5 student crops, 224/192/160/128/96 px at 224 (scaled to the run's size)


# --recipe paper: Sec. 5.1's ImageNet recipe of Table 7's "ReSSL (1 Crop)"; --recipe small is the defaults above
PAPER = dict(
    arch="resnet50", epochs=200,  # Table 7: "ImageNet with the ResNet-50 backbone", 200 epochs
    batch_size=1024,  # Sec. 5.1: "we use a batch size of 1024"
    optimizer="lars", lr=0.6,  # Sec. 5.1: "LARS [83] optimizer with learning rate equals to 0.6*BatchSize/256"
    momentum=0.9, weight_decay=1e-6,  # Sec. 5.1: "momentum 0.9, and weight decay 1e-6"
    warmup_epochs=10,  # Sec. 5.1: "a cosine learning rate scheduler [58] with 10 epochs of Warm-up"
    queue_size=65536,  # Sec. 5.1: "a memory buffer to save 65536 past examples"
    ema_momentum=0.996, ema_schedule="cosine",  # Sec. 5.1: "m = 0.996 and increases to 1 with a cosine schedule"
    proj_hidden=4096, proj_dim=256,  # Sec. 5.1: "the hidden dimension is 4096, and the output dimension is 256"
    predictor=True, infonce_warmup=True,  # Table 7: ReSSL without * ("without predictor and InfoNCE warm-up")
    tau_s=0.1, tau_t=0.03,  # Sec. 5.1: "tau_t = 0.03 and tau_s = 0.1"
    student_aug="byol",  # Sec. 5.1: "the strategy from [35]" with blur / solarisation 50% / 10%, min crop 14%
    teacher_aug="weak",  # Sec. 5.1: "For weak augmentation, we follow the best setting in Table 4"
)


# ----------------------------------------------------------------------------- Augmentations

def view_specs(cfg, size):
    """[student view, teacher view, --multi-crop's 4 smaller student crops]. Student (mocov2): Sec. 4's contrastive
    view, crop (0.2, 1), flip, colour distortion of strength s = 0.5 (jitter 0.8s, 0.8s, 0.8s, 0.2s) with p 0.8,
    grayscale p 0.2, blur p 0.5 (Interpretation 5); byol: Sec. 5.1's. Teacher: Table 4's best row, crop (0.2, 1) and
    flip only (--teacher-aug strong: the student's view)."""
    # Interpretation 5: flip, grayscale, jitter strengths, blur sigma and kernel as MoCo v2 / the authors' code
    strong = ViewSpec(crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=0.5)
    if cfg.student_aug == "byol":  # Interpretation 7: BYOL's (arXiv 2006.07733, Table 6) with Sec. 5.1's changes
        strong = ViewSpec(crop_scale=(0.14, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=0.5,
                          solarize_p=0.1)
    crops = [strong]
    if cfg.multi_crop:  # Table 8: sizes 224 ... 96 px and their min / max crop areas (the first replaces strong's)
        crops = [dataclasses.replace(strong, size=round(size * s / 224), crop_scale=c) for s, c in zip(
            (224, 192, 160, 128, 96), ((0.14, 1.0), (0.117, 0.86), (0.095, 0.715), (0.073, 0.571), (0.05, 0.429)))]
    weak = ViewSpec(crop_scale=(0.2, 1.0))
    return [crops[0], crops[0] if cfg.teacher_aug == "strong" else weak, *crops[1:]]


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


class Student(nn.Module):
    """backbone -> projector -> predictor (Sec. 3.3); the teacher copies backbone and projector."""

    def __init__(self, cfg, cifar_stem):
        super().__init__()
        self.backbone, feat_dim = build_backbone(cfg.arch, cifar_stem)
        self.projector = mlp(feat_dim, cfg.proj_hidden, cfg.proj_dim)
        self.predictor = mlp(cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim) if cfg.predictor else nn.Identity()

    def forward(self, x):
        return self.predictor(self.projector(self.backbone(x)))


# ----------------------------------------------------------------------------- Loss

def relation_loss(z_s, z_t, queue, tau_s=0.1, tau_t=0.04):
    """Relational consistency, Eqs. (3)-(5). z_s (B, D) student, z_t (B, D) teacher, queue (K, D) -> scalar, the
    mean cross-entropy H(p^2, p^1) (Eq. 5's KL up to a constant). No gradient reaches z_t or the queue."""
    z_s, z_t, queue = (F.normalize(t.float(), dim=1) for t in (z_s, z_t.detach(), queue.detach()))
    # Eq. (3): p^1 = softmax(z_s . Q^T / tau_s), kept as log-probabilities
    log_p1 = F.log_softmax(z_s @ queue.T / tau_s, dim=1)  # (B, K)
    # Eq. (4): p^2 = softmax(z_t . Q^T / tau_t), the sharper target
    p2 = F.softmax(z_t @ queue.T / tau_t, dim=1)  # (B, K)
    # Eq. (5): KL(p^2 || p^1) = H(p^2, p^1) - H(p^2); H(p^2) is constant, so minimise H(p^2, p^1)
    return -(p2 * log_p1).sum(dim=1).mean()


def infonce_loss(z_s, z_t, queue, tau):
    """InfoNCE, Eq. (1): positive z_s . z_t, negatives z_s . Q^T. z_s, z_t (B, D), queue (K, D) -> scalar."""
    z_s, z_t, queue = (F.normalize(t.float(), dim=1) for t in (z_s, z_t.detach(), queue.detach()))
    # Eq. (1): -log exp(pos/tau) / (exp(pos/tau) + sum_k exp(neg_k/tau)); the positive is logit 0
    pos = (z_s * z_t).sum(dim=1, keepdim=True)  # (B, 1)
    neg = z_s @ queue.T  # (B, K)
    logits = torch.cat([pos, neg], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(len(z_s), dtype=torch.long, device=z_s.device))


def total_loss(rel, nce, alpha):
    # Eq. (7): L = alpha * L_relation + (1 - alpha) * L_InfoNCE
    return alpha * rel + (1 - alpha) * nce


# ----------------------------------------------------------------------------- Momentum, queue, schedules

class MomentumState(nn.Module):
    """What is not trained by the optimiser: the EMA teacher, the queue Q and its labels (monitoring only). Identical
    on every process (the teacher follows the synchronised student, the queue gets keys gathered from all processes);
    registered with Accelerate so that checkpoints hold it."""

    def __init__(self, student, queue_size, dim, bn_groups=None):
        super().__init__()
        self.teacher = copy.deepcopy(nn.Sequential(student.backbone, student.projector)).requires_grad_(False)
        if bn_groups:  # shuffle BN: BN groups per process of the shuffled global batch (Sec. 4, no predictor)
            common.to_split_bn(self.teacher, bn_groups)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))  # Interpretation 4
        self.register_buffer("queue_labels", torch.full((queue_size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.pending = []  # (keys, labels) of the --accumulate window so far: they enter the queue at its update


@torch.no_grad()
def ema_update(teacher, student, m):
    """Eq. (6): theta_t <- m * theta_t + (1 - m) * theta_s, fused over all parameters. BN running statistics are
    copied (the teacher runs in train mode, so they only matter for whoever evaluates the teacher)."""
    params = list(teacher.parameters())
    torch._foreach_lerp_(params, [p.detach() for p in student.parameters()], 1 - m)  # one fused op
    torch._foreach_copy_(list(teacher.buffers()), list(student.buffers()))


@torch.no_grad()
def enqueue(queue, queue_labels, ptr, keys, labels):
    """FIFO: write keys (N, D) over the oldest entries, wrapping around the end; returns the new pointer."""
    idx = (ptr + torch.arange(len(keys), device=queue.device)) % len(queue)
    queue[idx] = keys.to(queue.dtype)
    queue_labels[idx] = labels
    return (ptr + len(keys)) % len(queue)


def lr_at(step, total_steps, warmup_steps, base_lr):
    """Linear warm-up to base_lr, then cosine decay to 0 (Sec. 4)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1 + math.cos(math.pi * t))


def ema_at(step, total_steps, base, schedule):
    """Teacher momentum: constant, or Sec. 5.1's rise from `base` to 1 by BYOL's cosine (https://arxiv.org/abs/
    2006.07733, Sec. 3.3): m = 1 - (1 - base) * (cos(pi * step / total_steps) + 1) / 2."""
    if schedule == "constant":
        return base
    return 1 - (1 - base) * (math.cos(math.pi * step / max(1, total_steps)) + 1) / 2


def warmup_alpha(step, warmup_steps, enabled):
    """Eq. (7): alpha = current_step / warmup_step, capped at 1; 1 (relation loss only) when disabled."""
    return min(1.0, step / warmup_steps) if enabled and warmup_steps > 0 else 1.0


def teacher_bn_splits(cfg):
    """Teacher BN groups: --bn-splits, or 1 (global BN) with the predictor, 8 (shuffle BN, MoCo's 8 GPUs) without."""
    return cfg.bn_splits or (1 if cfg.predictor else 8)


# ----------------------------------------------------------------------------- Training

def check_config(cfg, num_processes):
    """Every flag's domain, checked before anything runs: one `error:` line and exit code 2 for a bad value."""
    common.check_base_config(cfg, num_processes)
    require = common.require
    for name in ("proj_hidden", "proj_dim"):
        require(getattr(cfg, name) >= 1, f"--{name.replace('_', '-')} must be at least 1.")
    for name in ("tau_s", "tau_t", "tau_nce"):
        require(getattr(cfg, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}.")
    require(0 <= cfg.ema_momentum <= 1, f"--ema-momentum must lie in [0, 1], got {cfg.ema_momentum}.")
    require(cfg.queue_size >= 0 and (cfg.queue_size or 4096) >= cfg.batch_size * cfg.accumulate,
            f"--queue-size {cfg.queue_size} must be at least --batch-size {cfg.batch_size} x --accumulate "
            f"{cfg.accumulate} (0: the default).")
    require(cfg.infonce_warmup_epochs >= 0, "--infonce-warmup-epochs must be 0 or more.")
    require(cfg.bn_splits >= 0, f"--bn-splits must be 0 (auto) or more, got {cfg.bn_splits}.")
    splits = teacher_bn_splits(cfg)
    require(splits == 1 or (cfg.batch_size % splits == 0 and cfg.batch_size // splits >= 2
                            and splits % num_processes == 0),
            f"--bn-splits {splits} (shuffle BN) must divide --batch-size {cfg.batch_size} into groups of at least 2 "
            f"images and be a multiple of the number of processes ({num_processes}).")


def forward_loss(student, state, views, labels, cfg, alpha, step, accelerator):
    """The loss of this process's share of the batch -> (loss, teacher keys (B, D), logs). `step` (global optimiser
    step) seeds the shuffle of shuffle BN (drawn on the device: no host copy), used when teacher_bn_splits(cfg) > 1."""
    x_s, x_t, *x_more = views  # strong view for the student, weak (or strong) for the teacher, --multi-crop's crops
    p = torch.cat([student(x) for x in (x_s, *x_more)])  # (V B, D): crop-major, one forward per crop size
    with torch.no_grad(), accelerator.autocast():
        if teacher_bn_splits(cfg) > 1:
            x_all = accelerator.gather(x_t.contiguous())  # (N, C, H, W)
            shuffle = torch.randperm(len(x_all), device=x_all.device,
                                     generator=common.generator(cfg.seed, "shuffle-bn", step, device=x_all.device))
            rank, b = accelerator.process_index, len(x_t)
            z_t = common.shuffle_bn(state.teacher, x_all, shuffle, accelerator)[rank * b:(rank + 1) * b]  # (B, D)
        else:
            z_t = state.teacher(x_t)  # (B, D), global BN
    # Interpretation 6: every crop against its image's teacher target, the mean over crops and images (V = 1: Eq. 7)
    z_rep = z_t.repeat(len(p) // len(z_t), 1)  # (V B, D)
    rel = relation_loss(p, z_rep, state.queue, cfg.tau_s, cfg.tau_t)
    nce = infonce_loss(p, z_rep, state.queue, cfg.tau_nce) if alpha < 1 else torch.zeros((), device=p.device)
    loss = total_loss(rel, nce, alpha)
    with torch.no_grad():
        # Fig. 2 diagnostic: does the teacher's most similar queue entry (argmax p^2) share the query's label?
        keys = F.normalize(z_t.float(), dim=1)
        nn_labels = state.queue_labels[(keys @ state.queue.T).argmax(dim=1)]
        labelled = nn_labels >= 0  # the initial random entries have no label
    return loss, keys, {"relation": rel.detach(), "infonce": nce.detach(),
                        "nn_same_label": (labelled & (nn_labels == labels)).sum(), "nn_labelled": labelled.sum()}


def train_step(student, state, optimizer, views, labels, cfg, sched, step, accelerator):
    """One batch, in the paper's order: the loss against the queue as it was before this batch, SGD on the student,
    the teacher's EMA (Eq. 6), then the batch's teacher keys (from every process) enter the queue. With --accumulate
    the last three wait for the window's last batch, and its keys enter together, as one large batch's."""
    for g in optimizer.param_groups:
        g["lr"] = sched["lr"]
    loss, keys, logs = forward_loss(student, state, views, labels, cfg, sched["alpha"], step, accelerator)
    common.zero_grad(optimizer, accelerator)  # on the first batch of each --accumulate window
    accelerator.backward(loss)
    optimizer.step()
    state.pending.append((accelerator.gather(keys), accelerator.gather(labels)))
    if accelerator.sync_gradients:
        keys, labels = (torch.cat(t) for t in zip(*state.pending))
        state.pending.clear()
        if not accelerator.optimizer_step_was_skipped:  # fp16 skipped it: nothing moves
            raw = accelerator.unwrap_model(student)
            ema_update(state.teacher, nn.Sequential(raw.backbone, raw.projector), sched["ema_momentum"])
            state.ptr.copy_(enqueue(state.queue, state.queue_labels, state.ptr, keys, labels))
    return {"loss": loss.detach(), **logs}


def schedules(cfg, step, steps_per_epoch):
    """This update's learning rate (linear warm-up, then cosine; Secs. 4, 5.1), alpha of Eq. (7) and teacher
    momentum m of Eq. (6). `step` and `steps_per_epoch` count optimiser updates."""
    base_lr = cfg.lr * cfg.batch_size * cfg.accumulate / 256  # lr x (effective) BatchSize / 256
    total = cfg.epochs * steps_per_epoch
    return {"lr": lr_at(step, total, cfg.warmup_epochs * steps_per_epoch, base_lr),
            "alpha": warmup_alpha(step, cfg.infonce_warmup_epochs * steps_per_epoch, cfg.infonce_warmup),
            "ema_momentum": ema_at(step, total, cfg.ema_momentum, cfg.ema_schedule)}


def setup(cfg, data, accelerator):
    """The student and its optimiser, prepared by Accelerate, and the momentum state (teacher, queue), registered
    for checkpointing -> (student, optimizer, state)."""
    student = Student(cfg, data.cifar_stem)
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        student = common.global_batchnorm(student)  # global BN (Deviation 1); the teacher inherits it
    optimizer = common.make_optimizer(cfg, student)  # --optimizer: sgd, lars or adam
    student, optimizer = accelerator.prepare(common.fast_model(student, cfg, accelerator), optimizer)
    splits, queue_size = teacher_bn_splits(cfg), cfg.queue_size or (4096 if data.size <= 32 else 16384)
    state = MomentumState(accelerator.unwrap_model(student), queue_size, cfg.proj_dim,
                          splits // accelerator.num_processes if splits > 1 else None).to(accelerator.device)
    accelerator.register_for_checkpointing(state)
    return student, optimizer, state


def epoch_diagnostics(same_label, labelled, accelerator):
    """Fig. 2's check, over the epoch: % of teacher keys whose nearest labelled queue entry has the query's label."""
    same_label, labelled = accelerator.reduce(torch.stack([same_label, labelled]), "sum")  # one collective
    return {"teacher_nn_same_label": (same_label / labelled.clamp(min=1)).item() * 100}


def train(cfg: Config):
    accelerator = common.make_accelerator(cfg)
    check_config(cfg, accelerator.num_processes)
    set_seed(cfg.seed)
    # Sec. 4: medium data sets are resized to 64 px
    data = common.load_data(cfg, accelerator, size=64 if cfg.dataset in ("stl10", "tiny-imagenet") else None)
    loader = common.train_views(cfg, data, view_specs(cfg, data.size), accelerator)
    run = common.Run(cfg, "ressl", accelerator, data, steps_per_epoch=len(loader))
    student, optimizer, state = setup(cfg, data, accelerator)
    backbone = accelerator.unwrap_model(student).backbone

    start_epoch, done = run.resume()
    step = start_epoch * run.steps_per_epoch + done
    same_label = labelled = torch.zeros((), device=accelerator.device, dtype=torch.long)
    diagnostics = lambda query: epoch_diagnostics(same_label, labelled, accelerator)  # reads the counts when called
    if step == 0 and cfg.eval_every:
        run.monitor(0, 0, backbone, diagnostics)  # the random-init baseline
    for epoch in range(start_epoch, run.last_epoch):
        student.train()
        same_label = labelled = torch.zeros((), device=accelerator.device, dtype=torch.long)
        for views, labels, _ in run.epoch_batches(loader, epoch, done if epoch == start_epoch else 0):
            sched = schedules(cfg, step // cfg.accumulate, run.updates_per_epoch)  # per optimiser update
            with run.accumulate(step, student):
                logs = train_step(student, state, optimizer, views, labels, cfg, sched, step, accelerator)
            same_label, labelled = same_label + logs.pop("nn_same_label"), labelled + logs.pop("nn_labelled")
            step += 1
            if run.after_step(step, epoch, logs, **sched):
                break  # a signal or a non-finite loss: run.finish() checkpoints or raises
        if run.end_epoch(epoch + 1, step, backbone, diagnostics):
            break
    return run.finish(backbone, {})


if __name__ == "__main__":
    common.run_main(train, Config, paper=PAPER)
