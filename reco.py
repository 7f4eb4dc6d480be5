"""ReCo: relation-aware contrastive SSL, MoCo-v2 plus global distribution and local interpolation relations.

Y. Zhang, C. Liu, Y. Zhou, W. Wang, Q. Ye, X. Ji. "Beyond Instance Discrimination: Relation-aware Contrastive
Self-supervised Learning", IEEE journal paper (the text copy names no venue), arXiv:2211.01796.
Text: ../shared/papers/reco.md. Authors' code: github.com/zhangyifei01/EIR (read for Interpretations 1-4 and 6).

Run:    accelerate launch reco.py --data-dir data            (CIFAR-10, downloaded into data/)
Smoke:  python reco.py --dataset fake --epochs 2 --batch-size 32 --num-workers 0 --queue-size 256
MoCo-v2 baseline of the same script: --lambda-global 0 --lambda-local 0

Reads with: Sec. III-A (MoCo-v2 baseline, Eq. 1; total loss Eq. 2), Sec. III-B (global distribution relation,
Eq. 3), Sec. III-C (local interpolation relation, Eqs. 4-6), Sec. IV-A (pre-training settings), Table I
(--tau-tt/--tau-ot), Tables II and IV (--lambda-global/--lambda-local: MoCo-v2, +Global, +Local, ReCo), Table III
(s_intra, s_inter, phi, logged with kNN), Table VI (global relation: online/target encoders, weak view), Table VII
(interpolation pairs: image q/k with feature q/k, --mix).

Glossary (the paper's names -> code):
    f_theta      online (query) encoder: backbone -> 2-layer MLP head (MoCo-v2); `OnlineEncoder`, gets the gradient.
    f_theta^     momentum (key) encoder, EMA of f_theta; `MomentumState.momentum_encoder`.
    x_i, x^_i    two strong (MoCo-v2) views; x_i goes to f_theta, x^_i to f_theta^.
    x-_i         the weak view (random resized crop + flip only, Sec. III-B), encoded by f_theta^ (Table VI "o/t").
    v_i, v^_i    L2-normalised features of f_theta(x_i) and f_theta^(x^_i); `q` is the raw head output (each loss
                 normalises it), the keys `k` are stored normalised; v-_i = f_theta^(x-_i).
    queue        the memory bank / queue of the last K keys v^_j (FIFO); negatives of Eqs. (1) and (6).
    S^o, S^t     online / target similarity distributions over the memory bank, temperatures tau_ot, tau_tt (Eq. 3).
    r            interpolation ratio ~ Beta(alpha, alpha), alpha = 1; with CutMix, the kept-area fraction of x_i
                 after the box is clipped to the image (as CutMix and the authors' code), which is what Eq. (5) uses;
                 clipping makes its mean about 0.7 rather than 0.5 at 32 px.
    j            the partner of sample i: j = randperm(batch)[i] (Sec. III-C).
    v_ij, v~_ij  feature of the interpolated image (Eq. 4) and the interpolated target feature (Eq. 5, no gradient).
    lambda_1/2   weights of L_global and L_local in Eq. (2) (1 and 2, Table II).

Interpretations (the paper is silent or ambiguous; each marked in the code):
    1. Eq. (5) writes f_theta for both interpolated features. Table VII's best row ("image q/k, feature q/k") and the
       authors' code mix the query image x_i with the partner's KEY view x^_j, and the online feature v_i with the
       partner's key feature v^_j (both L2-normalised before mixing). We mix images q/k; the features mixed are
       k/k by default (Deviation 3), `--feature-pair q/k` is the paper's best row, `k/q` and `q/q` (Eq. (5) read
       literally) Table VII's other feature rows. `--image-pair q/q` mixes x_i with the partner's QUERY view instead
       (Table VII's first ReCo-Local row is `--image-pair q/q --feature-pair q/q`).
    2. Eq. (6) prints a denominator over the K bank entries only; we use the InfoNCE form of Eq. (1) (positive plus K
       negatives), as the authors' code does.
    3. One r, one partner permutation and one CutMix box per step for the whole GLOBAL batch ("for each mini-batch"),
       drawn from a generator seeded by (seed, step), so they are the same on every process, do not depend on the
       number of processes, and a resumed run draws what an uninterrupted one would. The partner j ranges over the
       global batch (the key-view images are gathered anyway for shuffle BN); the authors' code permutes per GPU.
    4. Memory bank of Eq. (3): the text says "the memory bank", i.e. the MoCo queue of strong keys v^_j
       (`--global-bank key`, default). The authors' code keeps a second queue of weak-view keys v-_j for it
       (`--global-bank weak`), so the paper's tables were produced with that choice.
    5. Table III: S_p excludes x_i itself; features are the L2-normalised backbone features of the test split (the
       kNN features); logged x100 as in the table.
    6. The weak view's crop scale is (0.2, 1), as the strong views and the authors' code.

Deviations:
    1. BatchNorm. MoCo-style InfoNCE can cheat through batch statistics shared by the query and its key; MoCo's
       remedy is shuffle BN (keys encoded on a random other GPU's sub-batch). Here the momentum encoder computes BN
       statistics over `--bn-splits` groups of a random shuffle of the GLOBAL batch (every process encodes its
       groups, keys are gathered and unshuffled): on N GPUs with --bn-splits N this is exactly MoCo's shuffle BN, on
       one GPU it is the split-BN equivalent, and the keys do not depend on the number of processes. The online
       encoder uses global BN (SyncBatchNorm on several GPUs) instead of MoCo's per-GPU BN, so that a result does
       not depend on the number of GPUs.
    2. Small-scale defaults (DESIGN.md), paper ImageNet values beside each field: lr 0.06 x batch/256 with 10 warm-up
       epochs (paper 0.03, cosine, no warm-up), momentum 0.99 (paper 0.999), K 4096 on 32-px data (paper 65536,
       more than CIFAR's 50,000 images: the queue would hold stale copies of the same images), ResNet-18 with the
       CIFAR stem on 32 px (paper ResNet-50 at 224 px). None of these has been tuned or measured against the paper
       values here.
    3. Target features of Eq. (5): k/k (momentum features of x_i and of the partner's key view) instead of Table VII's
       best row q/k (74.9 vs 72.0 on ImageNet-100; MoCo-v2 66.2). Measured on the 2,000-image CIFAR-10 (JPEG copy)
       subset (README "Measured on CPU", ResNet-18, batch 128, 40-epoch schedule, kNN top-1 from 26.5 % at init):
       with q/k the full method went DOWN to 21.1 % at epoch 15 (MoCo-v2 + Local alone: 18.3 %, its test features
       nearly parallel), with k/k it rose to 32.8 % (MoCo-v2 alone: 35.9 %). With q/k the target contains the
       online feature of x_i itself, which the mixed image's online feature can match better than any queued
       momentum key; Table VII's image-and-feature q/q row (`--image-pair q/q --feature-pair q/q`), whose target
       is made of online features only, fell to 17.1 %. This is small-scale evidence only; `--feature-pair q/k` is
       the paper's choice.

Results: no full-length run (no GPU in the sessions so far); the CPU runs are in README "Measured on CPU".
"""
import copy
import dataclasses
import json
import math
import os
import random
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
    arch: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"  # torchvision backbone (paper: resnet50)
    stem: Literal["auto", "cifar", "imagenet"] = "auto"  # auto: 3x3 stride-1 conv and no max-pool for <= 64 px
    # optimisation
    epochs: int = 200  # pretraining epochs (Table VIII: 200)
    batch_size: int = 256  # GLOBAL batch size, split evenly over processes (Sec. IV-A: 256)
    lr: float = 0.06  # base learning rate, scaled by batch_size / 256 (Sec. IV-A ImageNet: 0.03; Deviation 2)
    momentum: float = 0.9  # SGD momentum (Sec. IV-A)
    weight_decay: float = 5e-4  # SGD weight decay (Sec. IV-A)
    warmup_epochs: int = 10  # linear learning-rate warm-up, then cosine decay (paper: cosine only; Deviation 2)
    # run
    seed: int = 0  # random seed (weights, views, shuffling, r, partners, CutMix boxes)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"  # auto: what `accelerate launch` was told
    output_dir: str = ""  # default runs/reco-<dataset>-<time>
    resume: bool = False  # continue from the latest checkpoint in --output-dir
    stop_after_epochs: int = 0  # end this invocation after this epoch (0: run to --epochs); continue with --resume
    log_every: int = 50  # steps between metric lines
    eval_every: int = 10  # epochs between kNN evaluations (also before training and at the end); 0: only at the end
    checkpoint_every: int = 10  # epochs between checkpoints (and at the end)
    knn_k: int = 200  # neighbours of the kNN monitor
    knn_t: float = 0.1  # temperature of the kNN monitor
    # ReCo
    proj_dim: int = 128  # output width of the 2-layer MLP head (MoCo-v2; Table VI "Dim. 128")
    ema_momentum: float = 0.99  # momentum-encoder update (Sec. IV-A ImageNet: 0.999; Deviation 2)
    queue_size: int = 0  # K; 0: 4096 for 32-px data, 16384 otherwise (Sec. IV-A ImageNet: 65536; Deviation 2)
    tau: float = 0.2  # InfoNCE temperature of Eqs. (1) and (6) (Sec. IV-A)
    lambda_global: float = 1.0  # lambda_1 of Eq. (2) (Table II); 0 switches the global relation off (Table IV)
    lambda_local: float = 2.0  # lambda_2 of Eq. (2) (Table II); 0 switches the local relation off (Table IV)
    tau_ot: float = 0.1  # online temperature of S^o, Eq. (3) (Table I)
    tau_tt: float = 0.04  # target temperature of S^t, Eq. (3) (Table I)
    global_bank: Literal["key", "weak"] = "key"  # bank of Eq. (3): MoCo queue, or a queue of weak keys (Interp. 4)
    mix: Literal["cutmix", "mixup"] = "cutmix"  # image interpolation of Eq. (4) (Sec. I names cutmix)
    mix_alpha: float = 1.0  # r ~ Beta(alpha, alpha) (Sec. III-C)
    feature_pair: Literal["q/k", "k/q", "k/k", "q/q"] = "k/k"  # Eq. (5) features of x_i / of j (paper q/k; Deviation 3)
    image_pair: Literal["q/k", "q/q"] = "q/k"  # Eq. (4) views of x_i / of j (Table VII; Interpretation 1)
    bn_splits: int = 8  # shuffle-BN groups of the momentum encoder over the global batch (Deviation 1)


# ----------------------------------------------------------------------------- Augmentations

def strong_view(size, mean_std):
    """MoCo-v2 view (Sec. III-A, [32]): crop scale (0.2, 1), colour jitter (0.4, 0.4, 0.4, 0.1) with p 0.8,
    grayscale p 0.2, Gaussian blur sigma (0.1, 2) p 0.5, flip."""
    return T.Compose([
        T.ToImage(),
        T.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(kernel_size=2 * (size // 20) + 1, sigma=(0.1, 2.0))], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(*mean_std),
    ])


def weak_view(size, mean_std):
    """Weak view x-_i of Sec. III-B: random resized crop and horizontal flip only (Interpretation 6: scale (0.2, 1))."""
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


class OnlineEncoder(nn.Module):
    """f_theta: backbone -> 2-layer MLP head (MoCo-v2: Linear, ReLU, Linear; no BN in the head).

    forward(*views) encodes each view in its own forward pass (its own BatchNorm batch, as the authors' code does
    for x_i and the interpolated image) inside ONE module call, so DDP sees one forward per step. Returns a tuple.
    """

    def __init__(self, cfg, cifar_stem):
        super().__init__()
        self.backbone, feat_dim = build_backbone(cfg.arch, cifar_stem)
        self.head = nn.Sequential(nn.Linear(feat_dim, feat_dim), nn.ReLU(inplace=True),
                                  nn.Linear(feat_dim, cfg.proj_dim))

    def forward(self, *views):
        return tuple(self.head(self.backbone(x)) for x in views)


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training-mode statistics are computed separately on `num_splits` contiguous chunks of the
    batch (Deviation 1: shuffle BN of the momentum encoder). Eval mode uses the running statistics, which the EMA
    update copies from the online encoder."""

    num_splits = 1

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        g = self.num_splits
        y = F.batch_norm(rearrange(x, "(g n) c h w -> n (g c) h w", g=g), None, None,
                         self.weight.repeat(g), self.bias.repeat(g), True, 0.0, self.eps)
        return rearrange(y, "n (g c) h w -> (g n) c h w", g=g)


def to_split_bn(module, num_splits):
    """Replace every BatchNorm (plain or Sync) of `module` in place by a SplitBatchNorm2d with the same state."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            bn = SplitBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats).to(child.weight.device)
            bn.load_state_dict(child.state_dict())
            bn.num_splits = num_splits
            setattr(module, name, bn)  # same position in _modules: parameter order unchanged for the EMA
        else:
            to_split_bn(child, num_splits)
    return module


# ----------------------------------------------------------------------------- Loss

def infonce_loss(q, k, queue, tau=0.2):
    """MoCo-v2 InfoNCE, Eq. (1). q (B, D) queries (carry gradient), k (B, D) positive keys, queue (K, D) -> scalar.

    All three are L2-normalised here; k and the queue are detached (they come from the momentum encoder).
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.detach().float(), dim=1)
    queue = F.normalize(queue.detach().float(), dim=1)
    pos = (q * k).sum(dim=1, keepdim=True)  # (B, 1)
    neg = q @ queue.T  # (B, K)
    # Eq. (1): -1/N sum_i log exp(v_i.v^_i/tau) / (exp(v_i.v^_i/tau) + sum_j exp(v_i.v^_j/tau)); positive is logit 0
    logits = torch.cat([pos, neg], dim=1) / tau  # (B, 1 + K)
    return -F.log_softmax(logits, dim=1)[:, 0].mean()


def global_relation_loss(v, v_weak, queue, tau_ot=0.1, tau_tt=0.04):
    """Global distribution relation, Eq. (3): mean_i KL(S^t(i) || S^o(i)) -> scalar.

    v (B, D) online features of x_i (carry gradient); v_weak (B, D) momentum-encoder features of the weak view x-_i
    (the target: detached); queue (K, D) the memory bank (detached). All L2-normalised here. Returns the KL value
    itself, which is 0 when the two distributions agree (its gradient equals that of the cross-entropy).
    """
    v = F.normalize(v.float(), dim=1)
    v_weak = F.normalize(v_weak.detach().float(), dim=1)
    queue = F.normalize(queue.detach().float(), dim=1)
    # S^o(i) = softmax_j(v_i . v~_j / tau_ot), S^t(i) = softmax_j(v-_i . v~_j / tau_tt), as log-probabilities
    log_s_o = F.log_softmax(v @ queue.T / tau_ot, dim=1)  # (B, K)
    log_s_t = F.log_softmax(v_weak @ queue.T / tau_tt, dim=1)  # (B, K), no gradient
    # Eq. (3): L_global = 1/N sum_i sum_j S^t_ij (log S^t_ij - log S^o_ij)
    return (log_s_t.exp() * (log_s_t - log_s_o)).sum(dim=1).mean()


def interpolated_target(v, v_partner, r):
    """Feature-level interpolation, Eq. (5): v~_ij = l2(r * v_i + (1 - r) * v^_j) (B, D), detached.

    v (B, D) features of x_i; v_partner (B, D) features of the partners, row i holding partner j of i (which
    encoders' features: `--feature-pair`, Deviation 3);
    r a float or (B,) tensor: the ratio that relates the interpolated image to x_i (CutMix: its kept-area fraction).
    """
    # Interpretation 1: both features L2-normalised before mixing
    v = F.normalize(v.detach().float(), dim=1)
    v_partner = F.normalize(v_partner.detach().float(), dim=1)
    r = torch.as_tensor(r, dtype=torch.float32, device=v.device)
    r = r[:, None] if r.dim() == 1 else r  # (B, 1) or scalar
    # Eq. (5)
    return F.normalize(r * v + (1 - r) * v_partner, dim=1)


def local_interpolation_loss(v_mix, v_target, queue, tau=0.2):
    """Local interpolation relation, Eq. (6) -> scalar. v_mix (B, D) online features of the interpolated images
    (carry gradient); v_target (B, D) interpolated features of Eq. (5) (stop-gradient); queue (K, D) negatives."""
    # Interpretation 2: the positive is in the denominator, as in Eq. (1)
    # Eq. (6): -1/N sum_i log exp(v_ij . v~_ij / tau) / (exp(v_ij . v~_ij / tau) + sum_k exp(v_ij . v~_k / tau))
    return infonce_loss(v_mix, v_target.detach(), queue, tau)


def total_loss(csl, glob, local, lambda_global, lambda_local):
    # Eq. (2): L = L_csl + lambda_1 * L_global + lambda_2 * L_local
    return csl + lambda_global * glob + lambda_local * local


# ----------------------------------------------------------------------------- Interpolation and Table III

def cutmix_box(height, width, r, generator=None):
    """CutMix box (y0, y1, x0, x1) for a target ratio r: sides sqrt(1 - r) of the image's, uniform centre, clipped
    to the image (so the area replaced can be smaller than 1 - r; `cutmix` returns the effective ratio)."""
    cut = math.sqrt(1.0 - r)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy = int(torch.randint(height, (1,), generator=generator))
    cx = int(torch.randint(width, (1,), generator=generator))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return y0, y1, x0, x1


def cutmix(x, x_partner, r, generator=None):
    """Image interpolation by CutMix, Eq. (4): x (B, C, H, W) with one box (the same for the batch) taken from
    x_partner (B, C, H, W) -> (x_mix, r_eff), r_eff = 1 - box area / (H W), the fraction of x_mix that is x: the
    ratio actually used by Eq. (5). Pure: the inputs are not modified."""
    h, w = x.shape[-2:]
    y0, y1, x0, x1 = cutmix_box(h, w, r, generator)
    x_mix = x.clone()
    x_mix[..., y0:y1, x0:x1] = x_partner[..., y0:y1, x0:x1]
    return x_mix, 1.0 - (y1 - y0) * (x1 - x0) / (h * w)


def mixup(x, x_partner, r):
    """Image interpolation by mixup (`--mix mixup`), Eq. (4): r * x + (1 - r) * x_partner -> (x_mix, r)."""
    return r * x + (1 - r) * x_partner, float(r)


@torch.no_grad()
def class_similarity_stats(features, labels, chunk=1024):
    """Table III on features (N, D) with labels (N,) -> {"s_intra", "s_inter", "phi"} (fractions, not x100).

    s_intra = 1/N sum_i mean_{x+ in S_p(i)} x_i.x+, s_inter = 1/N sum_i mean_{x- in S_n(i)} x_i.x-,
    phi = 1/N sum_i (mean_p + 1) / (mean_n + 1); features L2-normalised here; S_p(i) excludes x_i (Interpretation 5);
    anchors with an empty S_p or S_n are skipped (all NaN when none is left). Per-class feature sums: O((N + C) D).
    """
    f = F.normalize(features.float(), dim=1)  # (N, D)
    labels = labels.to(f.device)
    onehot = F.one_hot(labels, int(labels.max()) + 1).float()  # (N, C)
    class_sum, counts, total = onehot.T @ f, onehot.sum(0), f.sum(0)  # (C, D), (C,), (D,)
    intra, inter, phi = [], [], []
    for fi, yi in zip(f.split(chunk), labels.split(chunk)):
        to_class = (fi * class_sum[yi]).sum(1)  # (b,) sum of x_i . x over i's class, x_i included
        same, n_same = to_class - (fi * fi).sum(1), counts[yi] - 1
        other, n_other = fi @ total - to_class, len(f) - counts[yi]
        ok = (n_same > 0) & (n_other > 0)
        mean_p, mean_n = same[ok] / n_same[ok], other[ok] / n_other[ok]
        intra.append(mean_p)
        inter.append(mean_n)
        phi.append((mean_p + 1) / (mean_n + 1))
    return {"s_intra": torch.cat(intra).mean().item(), "s_inter": torch.cat(inter).mean().item(),
            "phi": torch.cat(phi).mean().item()}


# ----------------------------------------------------------------------------- Momentum, queue, schedules

class MomentumState(nn.Module):
    """What is not trained by the optimiser: the momentum encoder f_theta^ (with split BN, Deviation 1), the queue
    of keys v^_j and, with --global-bank weak, the queue of weak-view keys v-_j (Interpretation 4).

    Identical on every process: the encoder is updated from the synchronised online encoder, the queues from keys
    of the global batch. Registered with Accelerate so that checkpoints hold it.
    """

    def __init__(self, online, queue_size, dim, splits_per_process, weak_bank=False):
        super().__init__()
        self.momentum_encoder = to_split_bn(copy.deepcopy(nn.Sequential(online.backbone, online.head)),
                                            splits_per_process)
        self.momentum_encoder.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))  # random unit keys (MoCo)
        if weak_bank:
            self.register_buffer("queue_weak", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))


@torch.no_grad()
def ema_update(target, online, m):
    """theta^ <- m * theta^ + (1 - m) * theta (MoCo); BN running statistics are copied."""
    for p_t, p_o in zip(target.parameters(), online.parameters()):
        p_t.mul_(m).add_(p_o.detach(), alpha=1 - m)
    for b_t, b_o in zip(target.buffers(), online.buffers()):
        b_t.copy_(b_o)


@torch.no_grad()
def enqueue(queue, ptr, keys):
    """FIFO: write keys (N, D) over the oldest entries, wrapping around the end; returns the new pointer."""
    idx = (ptr + torch.arange(len(keys), device=queue.device)) % len(queue)
    queue[idx] = keys.to(queue.dtype)
    return (ptr + len(keys)) % len(queue)


def lr_at(step, total_steps, warmup_steps, base_lr):
    """Linear warm-up to base_lr, then cosine decay to 0."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1 + math.cos(math.pi * t))


def step_randomness(seed, step, global_batch, alpha):
    """The step's draws, identical on every process (Interpretation 3): a generator for the CutMix box, the two
    shuffle-BN permutations (key and weak views), the partner permutation j = randperm(N_b) and r ~ Beta(a, a)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    shuffle_k, shuffle_w, partner = (torch.randperm(global_batch, generator=g) for _ in range(3))
    r = random.Random(seed * 1_000_003 + step).betavariate(alpha, alpha)
    return g, shuffle_k, shuffle_w, partner, r


@torch.no_grad()
def shuffled_keys(encoder, x_all, shuffle, accelerator):
    """Shuffle BN (Deviation 1): the global batch x_all (N, ...) in the order `shuffle`; this process encodes its
    1/world share (in the encoder's BN splits); keys of all processes are gathered and put back in order -> (N, D)."""
    share = rearrange(shuffle, "(w n) -> w n", w=accelerator.num_processes)[accelerator.process_index]
    k = F.normalize(encoder(x_all[share]).float(), dim=1)  # (N / world, D)
    return accelerator.gather(k)[torch.argsort(shuffle)]  # (N, D), original order


# ----------------------------------------------------------------------------- Training

def forward_loss(online, state, views, cfg, step, accelerator):
    """One step's loss on this process's share of the batch -> (loss, keys (N, D), weak keys (N, D) or None, logs);
    the keys are those of the GLOBAL batch (N = world x B), ready for the queues."""
    x_q, x_k, x_w = views  # x_i (strong, online), x^_i (strong, momentum), x-_i (weak, momentum)
    b, rank = len(x_q), accelerator.process_index
    n = b * accelerator.num_processes
    mine = slice(rank * b, (rank + 1) * b)  # this process's rows of the global batch
    g, shuffle_k, shuffle_w, partner, r = step_randomness(cfg.seed, step, n, cfg.mix_alpha)
    dev = x_q.device
    x_k_all = accelerator.gather(x_k.contiguous())  # (N, C, H, W): for shuffle BN and as CutMix partners
    with torch.no_grad(), accelerator.autocast():
        k_all = shuffled_keys(state.momentum_encoder, x_k_all, shuffle_k.to(dev), accelerator)  # v^ (N, D)
        k_weak_all = None
        if cfg.lambda_global > 0 or cfg.global_bank == "weak":
            k_weak_all = shuffled_keys(state.momentum_encoder, accelerator.gather(x_w.contiguous()),
                                       shuffle_w.to(dev), accelerator)  # v- (N, D)
    zero = torch.zeros((), device=dev)
    if cfg.lambda_local > 0:
        j = partner.to(dev)[mine]  # partner of each of my samples, an index into the global batch
        # Eq. (4): x_ij = r * x_i (+) (1 - r) * x^_j (Interpretation 1: image q/k; q/q mixes the partner's query view)
        x_j = x_k_all[j] if cfg.image_pair == "q/k" else accelerator.gather(x_q.contiguous())[j]
        if cfg.mix == "cutmix":
            x_mix, r_eff = cutmix(x_q, x_j, r, generator=g)
        else:
            x_mix, r_eff = mixup(x_q, x_j, r)
        # Eq. (4): v_ij = f_theta(x_ij), beside v_i = f_theta(x_i)
        q, v_mix = online(x_q, x_mix)  # (B, D) each, separate BN batches
    else:
        (q,), r_eff = online(x_q), r
    csl = infonce_loss(q, k_all[mine], state.queue, cfg.tau)
    bank = state.queue_weak if cfg.global_bank == "weak" else state.queue
    glob = global_relation_loss(q, k_weak_all[mine], bank, cfg.tau_ot, cfg.tau_tt) if cfg.lambda_global > 0 else zero
    if cfg.lambda_local > 0:
        # Deviation 3: which encoder's feature of x_i and of partner j enter Eq. (5) (Table VII's best row: q/k)
        first, second = cfg.feature_pair.split("/")
        q_all = accelerator.gather(q.detach().float().contiguous()) if second == "q" else None  # partners' queries
        v_i = q if first == "q" else k_all[mine]
        v_j = k_all[j] if second == "k" else q_all[j]
        v_target = interpolated_target(v_i, v_j, r_eff)
        local = local_interpolation_loss(v_mix, v_target, state.queue, cfg.tau)
    else:
        local = zero
    loss = total_loss(csl, glob, local, cfg.lambda_global, cfg.lambda_local)
    return loss, k_all, k_weak_all, {"csl": csl.detach(), "global": glob.detach(), "local": local.detach(),
                                     "r": r_eff}


def check_config(cfg, num_processes, queue_size):
    """Bad flags stop the run here with one message naming the flag."""
    if cfg.batch_size % cfg.bn_splits or cfg.bn_splits % num_processes:
        raise common.UserError(f"--bn-splits {cfg.bn_splits} must divide --batch-size {cfg.batch_size} and be a "
                               f"multiple of the number of processes ({num_processes}).")
    if cfg.batch_size // cfg.bn_splits < 2:
        raise common.UserError(f"--bn-splits {cfg.bn_splits} leaves fewer than 2 images per BatchNorm group at "
                               f"--batch-size {cfg.batch_size}: lower --bn-splits.")
    if queue_size < cfg.batch_size:
        raise common.UserError(f"--queue-size {queue_size} must be at least --batch-size {cfg.batch_size}.")
    for flag, value in (("tau", cfg.tau), ("tau-ot", cfg.tau_ot), ("tau-tt", cfg.tau_tt), ("mix-alpha", cfg.mix_alpha)):
        if value <= 0:
            raise common.UserError(f"--{flag} must be positive (got {value}).")
    if cfg.lambda_global < 0 or cfg.lambda_local < 0:
        raise common.UserError("--lambda-global and --lambda-local must be >= 0.")


def train(cfg: Config):
    accelerator = Accelerator(mixed_precision=None if cfg.mixed_precision == "auto" else cfg.mixed_precision,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    set_seed(cfg.seed)
    with accelerator.main_process_first():  # one process downloads, the others then find the files
        pretrain, memory, query, num_classes, size, mean_std = common.get_datasets(
            cfg.dataset, cfg.data_dir, cfg.fake_size)
    cifar_stem = cfg.stem == "cifar" or (cfg.stem == "auto" and size <= 64)
    queue_size = cfg.queue_size or (4096 if size <= 32 else 16384)
    check_config(cfg, accelerator.num_processes, queue_size)

    run = [cfg.output_dir or os.path.join("runs", f"reco-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")]
    broadcast_object_list(run)  # one name on every process
    out = run[0]
    if accelerator.is_main_process:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
    logger = common.MetricLogger(os.path.join(out, "metrics.jsonl"), accelerator.is_main_process)

    views = [strong_view(size, mean_std), strong_view(size, mean_std), weak_view(size, mean_std)]
    train_set = common.MultiView(pretrain, views, seed=cfg.seed)
    loader = common.make_loader(train_set, cfg.batch_size, accelerator.num_processes, True, cfg.num_workers)
    eval_tf = common.eval_transform(size, mean_std)
    memory_loader = common.make_loader(common.Transformed(memory, eval_tf), cfg.batch_size,
                                       accelerator.num_processes, False, cfg.num_workers)
    query_loader = common.make_loader(common.Transformed(query, eval_tf), cfg.batch_size,
                                      accelerator.num_processes, False, cfg.num_workers)

    online = OnlineEncoder(cfg, cifar_stem)
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        online = nn.SyncBatchNorm.convert_sync_batchnorm(online)  # global BN (Deviation 1)
    base_lr = cfg.lr * cfg.batch_size / 256
    optimizer = torch.optim.SGD(online.parameters(), lr=base_lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    online, optimizer, loader, memory_loader, query_loader = accelerator.prepare(
        online, optimizer, loader, memory_loader, query_loader)
    raw = accelerator.unwrap_model(online)
    state = MomentumState(raw, queue_size, cfg.proj_dim, cfg.bn_splits // accelerator.num_processes,
                          cfg.global_bank == "weak").to(accelerator.device)
    accelerator.register_for_checkpointing(state)
    online_ema_view = nn.Sequential(raw.backbone, raw.head)  # the modules the momentum encoder averages

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

    def monitor(epoch, step):
        knn = common.knn_accuracy(raw.backbone, memory_loader, query_loader, num_classes, accelerator,
                                  cfg.knn_k, cfg.knn_t)
        # Table III on the test features, x100 as the table prints them (NaN, not logged: no class has 2 images)
        sims = class_similarity_stats(*common.extract_features(raw.backbone, query_loader, accelerator))
        logger.log(epoch=epoch, step=step, knn_top1=knn, **{k: v * 100 for k, v in sims.items() if math.isfinite(v)})
        accelerator.print(f"epoch {epoch}: kNN top-1 {knn:.2f}%, s_intra {sims['s_intra'] * 100:.1f}, "
                          f"s_inter {sims['s_inter'] * 100:.1f}, phi {sims['phi'] * 100:.1f}")

    last_epoch = min(cfg.epochs, cfg.stop_after_epochs or cfg.epochs)
    step = start_epoch * steps_per_epoch
    if start_epoch == 0 and cfg.eval_every:
        monitor(0, 0)  # the random-init baseline
    for epoch in range(start_epoch, last_epoch):
        online.train()
        state.train()
        loader.set_epoch(epoch)
        train_set.set_epoch(epoch)
        tic, seen = time.time(), 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not accelerator.is_local_main_process)
        for (x_views, _, _) in bar:
            lr = lr_at(step, total_steps, warmup_steps, base_lr)
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss, keys, weak_keys, logs = forward_loss(online, state, x_views, cfg, step, accelerator)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            if accelerator.sync_gradients:
                ema_update(state.momentum_encoder, online_ema_view, cfg.ema_momentum)
                # the current batch enters the queues after the loss; keys are already those of the global batch
                if cfg.global_bank == "weak":
                    enqueue(state.queue_weak, state.ptr, weak_keys)
                state.ptr.copy_(enqueue(state.queue, state.ptr, keys))
            step += 1
            seen += cfg.batch_size
            if step % cfg.log_every == 0 or step == total_steps:
                csl, glob, local, l = (accelerator.reduce(t, "mean").item()
                                       for t in (logs["csl"], logs["global"], logs["local"], loss.detach()))
                logger.log(step=step, epoch=epoch + 1, loss=l, csl=csl, global_relation=glob, local_relation=local,
                           r=logs["r"], lr=lr, ema_momentum=cfg.ema_momentum, images_per_s=seen / (time.time() - tic))
                bar.set_postfix(loss=f"{l:.3f}", lr=f"{lr:.3g}")

        epoch_done = epoch + 1
        if (cfg.eval_every and epoch_done % cfg.eval_every == 0) or epoch_done == cfg.epochs:
            monitor(epoch_done, step)
        if epoch_done % cfg.checkpoint_every == 0 or epoch_done in (cfg.epochs, last_epoch):
            save_checkpoint(accelerator, out, epoch_done)

    if last_epoch == cfg.epochs and accelerator.is_main_process:
        common.save_backbone(os.path.join(out, "backbone.pt"), raw.backbone, {
            "arch": cfg.arch, "cifar_stem": cifar_stem, "image_size": size, "mean_std": mean_std,
            "method": "reco", "dataset": cfg.dataset, "epochs": cfg.epochs})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def save_checkpoint(accelerator, out, epoch):
    """checkpoint-<epoch>: Accelerate state (online encoder, optimiser, momentum encoder, queues, RNG) + progress;
    keeps the newest."""
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
