"""ReSSL: Relational Self-Supervised Learning (journal version, with predictor and InfoNCE warm-up).

M. Zheng, S. You, F. Wang, C. Qian, C. Zhang, X. Wang, C. Xu. "Relational Self-Supervised Learning", IEEE TPAMI
(journal extension of the NeurIPS 2021 paper, arXiv:2107.09282). Text: ../shared/papers/ressl.md.

Run:    accelerate launch ressl.py --data-dir data            (CIFAR-10, downloaded into data/)
Smoke:  python ressl.py --dataset fake --epochs 2 --batch-size 32 --num-workers 0 --queue-size 256

Reads with: Sec. 3.2 (relation, Eqs. 3-6), Sec. 3.3 (predictor, InfoNCE warm-up Eq. 7), Sec. 4 "Implementation
Details" (all small-scale defaults below), Tables 1-2 (--tau-s/--tau-t, --no-predictor), Table 3
(--no-infonce-warmup), Table 5 and Table 4's first-vs-last rows (--teacher-aug weak|strong), Table 6 (--queue-size).
Tables 1, 2, 4, 5 and 6 were measured WITHOUT the InfoNCE warm-up (their best entries equal Table 3's "w/o" column):
add --no-infonce-warmup to reproduce them. Table 3 itself shows the warm-up helping CIFAR-100, STL-10 and Tiny
ImageNet and costing CIFAR-10 0.8 points (90.76 -> 89.98); the default keeps it on, as the journal method does.
tau_t: Table 1's best is 0.04 on CIFAR-10 and 0.03 on the other data sets (--tau-t 0.03); ImageNet (Sec. 5.1) uses
0.03, LARS lr 0.6 x batch/256, wd 1e-6, batch 1024, K 65536, m 0.996 -> 1 (cosine): not the defaults here.

Glossary (the paper's names):
    student   F_s -> g_s -> q: backbone, projector, predictor; gets the gradient; sees the strong view x^1.
    teacher   F_t -> g_t: EMA of the student's backbone and projector (Eq. 6); sees the weak view x^2.
    z_s, z_t  L2-normalised student prediction and teacher projection (the paper's z^1, z^2).
    Q         memory buffer (queue) of the last K teacher embeddings, FIFO; p^1, p^2 are distributions over it.
    tau_s/t   student / teacher temperature; tau_t < tau_s sharpens the target (Sec. 3.2).
    alpha     InfoNCE warm-up weight, alpha = step / warm-up steps (Eq. 7).

Interpretations (the paper is silent; each marked in the code):
    1. InfoNCE warm-up length: the paper writes alpha = current_step / warmup_step without a value; we use the
       learning-rate warm-up length (10 epochs), `--infonce-warmup-epochs`.
    2. InfoNCE temperature: Eq. (1) names tau without a value for the warm-up loss; we reuse tau_s = 0.1 (`--tau-nce`).
    3. Projector/predictor sizes at small scale are not given; we use the stated ImageNet sizes (Sec. 5.1: hidden
       4096, output 256, predictor of the same shape) with BN + ReLU after the hidden layer.
    4. The queue starts as random unit vectors (as MoCo does).
    5. Sec. 4 lists crop (0.2, 1), colour distortion (strength 0.5, p 0.8) and blur (p 0.5) for the contrastive view;
       flip and grayscale (p 0.2) come from Table 4's last row and MoCo v2 [11], which the method is based on; the
       blur kernel (about 10 % of the side) and sigma (0.1, 2) are MoCo v2's. The CIFAR stem ("for a small dataset")
       is used for images of 64 px or less (`--stem auto`), so STL-10 and Tiny-ImageNet, resized to 64 px as Sec. 4
       says for medium data sets, get it too; `--stem imagenet` gives them the standard stem.

Deviations:
    1. BatchNorm (Sec. 4: "global BN and shuffle BN for with and without predictor setting"). With the predictor the
       teacher and student use global BN: plain BN on one GPU (the batch is the global batch), SyncBatchNorm on
       several. Without it the teacher uses shuffle BN: its BN statistics come from `--bn-splits` groups (default 8,
       MoCo's 8 GPUs; the paper gives no count) of a random shuffle of the GLOBAL batch drawn from (seed, step);
       every process encodes its groups, outputs are gathered and put back in order. On N GPUs with --bn-splits N
       this is MoCo's shuffle BN, on one GPU its split-BN equivalent, and the result does not depend on the number
       of processes (tested). The deviation: the student keeps global BN in the no-predictor setting too (MoCo's
       query encoder uses per-GPU BN), so that a result does not depend on the number of GPUs.

Results: no full-length run (no GPU in the sessions so far). On a 2,000-image CIFAR-10 (JPEG copy) subset on CPU
(README "Measured on CPU") kNN top-1 rose from 26.5 % (random init) to 31.7 % at epoch 15 and 33.8 % at epoch 100;
with --no-predictor to 32.4 % at epoch 15 with the teacher's shuffle BN and 32.8 % with --bn-splits 1 (global BN).
"""
import copy
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import broadcast_object_list, set_seed
from einops import rearrange
from torchvision.transforms import v2 as T
from tqdm.auto import tqdm

import common


# ----------------------------------------------------------------------------- Config

@dataclass
class Config:
    # data
    dataset: Literal["cifar10", "cifar100", "stl10", "imagefolder", "fake"] = "cifar10"  # dataset to pretrain on
    data_dir: str = "data"  # where datasets are downloaded to / read from
    fake_size: int = 512  # number of synthetic images for --dataset fake
    num_workers: int = 8  # data-loading worker processes per GPU
    # model
    arch: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"  # torchvision backbone
    stem: Literal["auto", "cifar", "imagenet"] = "auto"  # auto: 3x3 stride-1 conv and no max-pool for <= 64 px
    # optimisation
    epochs: int = 200  # pretraining epochs (Sec. 4)
    batch_size: int = 256  # GLOBAL batch size, split evenly over processes
    lr: float = 0.06  # base learning rate, scaled by batch_size / 256 (Sec. 4)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # SGD weight decay (Sec. 4)
    warmup_epochs: int = 10  # linear learning-rate warm-up, then cosine decay (Sec. 4)
    # run
    seed: int = 0  # random seed (weights, views, shuffling)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"  # auto: what `accelerate launch` was told
    output_dir: str = ""  # default runs/ressl-<dataset>-<time>
    resume: bool = False  # continue from the latest checkpoint in --output-dir
    stop_after_epochs: int = 0  # end this invocation after this epoch (0: run to --epochs); continue with --resume
    log_every: int = 50  # steps between metric lines
    eval_every: int = 10  # epochs between kNN evaluations (also before training and at the end); 0: only at the end
    checkpoint_every: int = 10  # epochs between checkpoints (and at the end)
    knn_k: int = 200  # neighbours of the kNN monitor
    knn_t: float = 0.1  # temperature of the kNN monitor
    # ReSSL
    proj_hidden: int = 4096  # projector hidden width (Interpretation 3)
    proj_dim: int = 256  # embedding width (Interpretation 3)
    predictor: bool = True  # asymmetric predictor head on the student (Sec. 3.3; --no-predictor: Table 2)
    # Sec. 4: global BN with the predictor, shuffle BN without it
    bn_splits: int = 0  # teacher BN groups over a shuffle of the global batch; 0: 1 with the predictor, 8 without
    ema_momentum: float = 0.99  # teacher momentum m of Eq. (6) for small datasets (Sec. 4)
    queue_size: int = 0  # K; 0: 4096 for 32-px data, 16384 otherwise (Sec. 4, Table 6)
    tau_s: float = 0.1  # student temperature of Eq. (3) (Table 1)
    tau_t: float = 0.04  # teacher temperature of Eq. (4) (Table 1: best on CIFAR-10; 0.03 on the other data sets)
    infonce_warmup: bool = True  # Eq. (7) warm-up (--no-infonce-warmup: Table 3)
    infonce_warmup_epochs: int = 10  # alpha reaches 1 after this many epochs (Interpretation 1)
    tau_nce: float = 0.1  # temperature of the warm-up InfoNCE, Eq. (1) (Interpretation 2)
    teacher_aug: Literal["weak", "strong"] = "weak"  # teacher's view (Tables 4-5)


# ----------------------------------------------------------------------------- Augmentations

def strong_view(size, mean_std):
    """Contrastive view of Sec. 4: crop scale (0.2, 1), flip, colour distortion strength 0.5 with p 0.8,
    grayscale p 0.2, Gaussian blur p 0.5."""
    s = 0.5
    return T.Compose([
        T.ToImage(),
        T.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(kernel_size=2 * (size // 20) + 1, sigma=(0.1, 2.0))], p=0.5),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(*mean_std),
    ])


def weak_view(size, mean_std):
    """Teacher view, Table 4's best row: random resized crop (0.2, 1) and horizontal flip only."""
    return T.Compose([
        T.ToImage(),
        T.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
        T.RandomHorizontalFlip(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(*mean_std),
    ])


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


class SplitBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (1d or 2d) whose train-mode statistics come from `num_splits` contiguous chunks of the batch: the
    teacher's shuffle BN (Sec. 4, without the predictor). Eval mode uses the running statistics, which the EMA update
    copies from the student."""

    num_splits = 1

    def forward(self, x):
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        g = self.num_splits
        # the chunks side by side as channels: one batch_norm call normalises each chunk with its own statistics
        y = F.batch_norm(rearrange(x, "(g n) c ... -> n (g c) ...", g=g), None, None,
                         self.weight.repeat(g), self.bias.repeat(g), True, 0.0, self.eps)
        return rearrange(y, "n (g c) ... -> (g n) c ...", g=g)


def to_split_bn(module, num_splits):
    """Replace every BatchNorm (plain or Sync) of `module` in place by a SplitBatchNorm with the same state."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            bn = SplitBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                child.track_running_stats).to(child.weight.device)
            bn.load_state_dict(child.state_dict())
            bn.num_splits = num_splits
            setattr(module, name, bn)  # same position in _modules: parameter order unchanged for the EMA
        else:
            to_split_bn(child, num_splits)
    return module


# ----------------------------------------------------------------------------- Loss

def relation_loss(z_s, z_t, queue, tau_s=0.1, tau_t=0.04):
    """Relational consistency, Eqs. (3)-(5). z_s (B, D) student, z_t (B, D) teacher, queue (K, D) -> scalar.

    Returns the mean cross-entropy H(p^2, p^1); it differs from KL(p^2 || p^1) by H(p^2), which has no gradient.
    No gradient reaches z_t or the queue.
    """
    z_s = F.normalize(z_s.float(), dim=1)
    z_t = F.normalize(z_t.detach().float(), dim=1)
    queue = F.normalize(queue.detach().float(), dim=1)
    # Eq. (3): p^1 = softmax(z_s . Q^T / tau_s), kept as log-probabilities
    log_p1 = F.log_softmax(z_s @ queue.T / tau_s, dim=1)  # (B, K)
    # Eq. (4): p^2 = softmax(z_t . Q^T / tau_t), the sharper target
    p2 = F.softmax(z_t @ queue.T / tau_t, dim=1)  # (B, K)
    # Eq. (5): KL(p^2 || p^1) = H(p^2, p^1) - H(p^2); H(p^2) is constant, so minimise H(p^2, p^1)
    return -(p2 * log_p1).sum(dim=1).mean()


def infonce_loss(z_s, z_t, queue, tau):
    """InfoNCE, Eq. (1): positive z_s . z_t, negatives z_s . Q^T. z_s, z_t (B, D), queue (K, D) -> scalar."""
    z_s = F.normalize(z_s.float(), dim=1)
    z_t = F.normalize(z_t.detach().float(), dim=1)
    queue = F.normalize(queue.detach().float(), dim=1)
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
    """What is not trained by the optimiser: the EMA teacher, the queue Q and its labels (monitoring only).

    Identical on every process: the teacher is updated from the synchronised student, the queue from keys gathered
    from all processes. Registered with Accelerate so that checkpoints hold it.
    """

    def __init__(self, student, queue_size, dim, bn_groups=None):
        super().__init__()
        self.teacher = copy.deepcopy(nn.Sequential(student.backbone, student.projector))
        self.teacher.requires_grad_(False)
        if bn_groups:  # shuffle BN: BN groups per process of the shuffled global batch (Sec. 4, no predictor)
            to_split_bn(self.teacher, bn_groups)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))  # Interpretation 4
        self.register_buffer("queue_labels", torch.full((queue_size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))


@torch.no_grad()
def ema_update(teacher, student, m):
    """Eq. (6): theta_t <- m * theta_t + (1 - m) * theta_s. BN running statistics are copied (the teacher runs in
    train mode, so they only matter for whoever evaluates the teacher)."""
    for p_t, p_s in zip(teacher.parameters(), student.parameters()):
        # Eq. (6)
        p_t.mul_(m).add_(p_s.detach(), alpha=1 - m)
    for b_t, b_s in zip(teacher.buffers(), student.buffers()):
        b_t.copy_(b_s)


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


def warmup_alpha(step, warmup_steps, enabled):
    """Eq. (7): alpha = current_step / warmup_step, capped at 1; 1 (relation loss only) when disabled."""
    return min(1.0, step / warmup_steps) if enabled and warmup_steps > 0 else 1.0


def teacher_bn_splits(cfg):
    """Teacher BN groups over the global batch: --bn-splits, or by default 1 (global BN) with the predictor and 8
    (shuffle BN, as MoCo's 8 GPUs) without it (Sec. 4)."""
    return cfg.bn_splits or (1 if cfg.predictor else 8)


@torch.no_grad()
def shuffled_teacher(teacher, x_t, seed, step, accelerator):
    """Shuffle BN (Sec. 4, no predictor): the global batch in a random order drawn from (seed, step), the same on
    every process; this process encodes its 1/world share in its BN groups; outputs are gathered, put back in order,
    and this process's rows returned (B, D). The result does not depend on the number of processes."""
    x_all = accelerator.gather(x_t.contiguous())  # (N, C, H, W)
    shuffle = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(seed * 1_000_003 + step))
    share = rearrange(shuffle, "(w n) -> w n", w=accelerator.num_processes)[accelerator.process_index]
    z_all = accelerator.gather(teacher(x_all[share.to(x_all.device)]).contiguous())
    z_all = z_all[torch.argsort(shuffle).to(z_all.device)]  # original order
    rank, b = accelerator.process_index, len(x_t)
    return z_all[rank * b:(rank + 1) * b]


# ----------------------------------------------------------------------------- Training

def forward_loss(student, state, views, labels, cfg, alpha, step, accelerator):
    """One step's loss on this process's share of the batch -> (loss, teacher keys (B, D), logs). `step` (global
    optimiser step) seeds the shuffle of shuffle BN, used when teacher_bn_splits(cfg) > 1."""
    x_s, x_t = views  # strong view for the student, weak (or strong) for the teacher
    p = student(x_s)  # (B, D)
    with torch.no_grad(), accelerator.autocast():
        if teacher_bn_splits(cfg) > 1:
            z_t = shuffled_teacher(state.teacher, x_t, cfg.seed, step, accelerator)  # (B, D)
        else:
            z_t = state.teacher(x_t)  # (B, D), global BN
    rel = relation_loss(p, z_t, state.queue, cfg.tau_s, cfg.tau_t)
    nce = infonce_loss(p, z_t, state.queue, cfg.tau_nce) if alpha < 1 else torch.zeros((), device=p.device)
    loss = total_loss(rel, nce, alpha)
    with torch.no_grad():
        # Fig. 2 diagnostic: does the teacher's most similar queue entry (argmax p^2) share the query's label?
        keys = F.normalize(z_t.float(), dim=1)
        nn_labels = state.queue_labels[(keys @ state.queue.T).argmax(dim=1)]
        nn_match = torch.stack([((nn_labels == labels) & (nn_labels >= 0)).sum(), (nn_labels >= 0).sum()])
    return loss, keys, {"relation": rel.detach(), "infonce": nce.detach(), "nn_match": nn_match}


def train(cfg: Config):
    accelerator = Accelerator(mixed_precision=None if cfg.mixed_precision == "auto" else cfg.mixed_precision,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    set_seed(cfg.seed)
    with accelerator.main_process_first():  # one process downloads, the others then find the files
        pretrain, memory, query, num_classes, size, mean_std = common.get_datasets(
            cfg.dataset, cfg.data_dir, cfg.fake_size)
    if cfg.dataset == "stl10":
        size = 64  # Sec. 4: medium data sets are resized to 64 px
    cifar_stem = cfg.stem == "cifar" or (cfg.stem == "auto" and size <= 64)
    queue_size = cfg.queue_size or (4096 if size <= 32 else 16384)
    if queue_size < cfg.batch_size:
        raise common.UserError(f"--queue-size {queue_size} must be at least --batch-size {cfg.batch_size}.")
    splits = teacher_bn_splits(cfg)
    if splits > 1 and (cfg.batch_size % splits or cfg.batch_size // splits < 2 or splits % accelerator.num_processes):
        raise common.UserError(
            f"--bn-splits {splits} (shuffle BN) must divide --batch-size {cfg.batch_size} into groups of at least 2 "
            f"images and be a multiple of the number of processes ({accelerator.num_processes}).")

    run = [cfg.output_dir or os.path.join("runs", f"ressl-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")]
    broadcast_object_list(run)  # one name on every process
    out = run[0]
    if accelerator.is_main_process:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump({**dataclasses.asdict(cfg), "num_processes": accelerator.num_processes}, f, indent=2)
    logger = common.MetricLogger(os.path.join(out, "metrics.jsonl"), accelerator.is_main_process)

    views = [strong_view(size, mean_std), strong_view(size, mean_std) if cfg.teacher_aug == "strong"
             else weak_view(size, mean_std)]
    train_set = common.MultiView(pretrain, views, seed=cfg.seed)
    loader = common.make_loader(train_set, cfg.batch_size, accelerator.num_processes, True, cfg.num_workers)
    eval_tf = common.eval_transform(size, mean_std)
    memory_loader = common.make_loader(common.Transformed(memory, eval_tf), cfg.batch_size,
                                       accelerator.num_processes, False, cfg.num_workers)
    query_loader = common.make_loader(common.Transformed(query, eval_tf), cfg.batch_size,
                                      accelerator.num_processes, False, cfg.num_workers)

    student = Student(cfg, cifar_stem)
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)  # global BN (Deviation 1)
    base_lr = cfg.lr * cfg.batch_size / 256
    optimizer = torch.optim.SGD(student.parameters(), lr=base_lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    student, optimizer, loader, memory_loader, query_loader = accelerator.prepare(
        student, optimizer, loader, memory_loader, query_loader)
    raw = accelerator.unwrap_model(student)
    state = MomentumState(raw, queue_size, cfg.proj_dim,
                          splits // accelerator.num_processes if splits > 1 else None).to(accelerator.device)
    accelerator.register_for_checkpointing(state)
    student_ema_view = nn.Sequential(raw.backbone, raw.projector)  # the modules the teacher averages

    steps_per_epoch = len(loader)
    total_steps, warmup_steps = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    start_epoch = 0
    if cfg.resume:
        ckpt = common.latest_checkpoint(out)
        if ckpt is None:
            accelerator.print(f"--resume: no checkpoint in {out}, starting from scratch")
        else:
            accelerator.load_state(ckpt)
            with open(os.path.join(ckpt, "progress.json")) as f:
                start_epoch = json.load(f)["epoch"]
            accelerator.print(f"resumed from {ckpt} (epoch {start_epoch})")

    def monitor(epoch, step, nn_match):
        knn = common.knn_accuracy(raw.backbone, memory_loader, query_loader, num_classes, accelerator,
                                  cfg.knn_k, cfg.knn_t)
        m = accelerator.reduce(nn_match, "sum")
        logger.log(epoch=epoch, step=step, knn_top1=knn, teacher_nn_same_label=(m[0] / m[1].clamp(min=1)).item() * 100)
        accelerator.print(f"epoch {epoch}: kNN top-1 {knn:.2f}%")

    last_epoch = min(cfg.epochs, cfg.stop_after_epochs or cfg.epochs)
    step = start_epoch * steps_per_epoch
    if start_epoch == 0 and cfg.eval_every:
        monitor(0, 0, torch.zeros(2, device=accelerator.device, dtype=torch.long))  # the random-init baseline
    for epoch in range(start_epoch, last_epoch):
        student.train()
        loader.set_epoch(epoch)
        train_set.set_epoch(epoch)
        nn_match = torch.zeros(2, device=accelerator.device, dtype=torch.long)
        tic, seen = time.time(), 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not accelerator.is_local_main_process)
        for (x_views, labels, _) in bar:
            lr = lr_at(step, total_steps, warmup_steps, base_lr)
            for g in optimizer.param_groups:
                g["lr"] = lr
            alpha = warmup_alpha(step, cfg.infonce_warmup_epochs * steps_per_epoch, cfg.infonce_warmup)
            loss, keys, logs = forward_loss(student, state, x_views, labels, cfg, alpha, step, accelerator)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            if accelerator.sync_gradients:
                ema_update(state.teacher, student_ema_view, cfg.ema_momentum)
                # the current batch enters the queue after the loss; keys from every process
                state.ptr.copy_(enqueue(state.queue, state.queue_labels, state.ptr,
                                        accelerator.gather(keys), accelerator.gather(labels)))
            nn_match += logs["nn_match"]
            step += 1
            seen += cfg.batch_size
            if step % cfg.log_every == 0 or step == total_steps:
                rel, nce, l = (accelerator.reduce(t, "mean").item() for t in (logs["relation"], logs["infonce"], loss.detach()))
                logger.log(step=step, epoch=epoch + 1, loss=l, relation=rel, infonce=nce, alpha=alpha, lr=lr,
                           ema_momentum=cfg.ema_momentum, images_per_s=seen / (time.time() - tic))
                bar.set_postfix(loss=f"{l:.3f}", lr=f"{lr:.3g}")

        epoch_done = epoch + 1
        if (cfg.eval_every and epoch_done % cfg.eval_every == 0) or epoch_done == cfg.epochs:
            monitor(epoch_done, step, nn_match)
        if epoch_done % cfg.checkpoint_every == 0 or epoch_done in (cfg.epochs, last_epoch):
            save_checkpoint(accelerator, out, epoch_done)

    if last_epoch == cfg.epochs and accelerator.is_main_process:
        common.save_backbone(os.path.join(out, "backbone.pt"), raw.backbone, {
            "arch": cfg.arch, "cifar_stem": cifar_stem, "image_size": size, "mean_std": mean_std,
            "method": "ressl", "dataset": cfg.dataset, "epochs": cfg.epochs})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def save_checkpoint(accelerator, out, epoch):
    """checkpoint-<epoch>: Accelerate state (student, optimiser, teacher, queue, RNG) + progress; keeps the newest."""
    path = os.path.join(out, f"checkpoint-{epoch}")
    accelerator.save_state(path)
    if accelerator.is_main_process:
        with open(os.path.join(path, "progress.json"), "w") as f:
            json.dump({"epoch": epoch}, f)
        for d in os.listdir(out):
            if d.startswith("checkpoint-") and d != os.path.basename(path):
                shutil.rmtree(os.path.join(out, d))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    common.run_main(train, Config)
