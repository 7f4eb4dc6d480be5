"""ReCo: relation-aware contrastive SSL, MoCo-v2 plus global distribution and local interpolation relations.

Y. Zhang, C. Liu, Y. Zhou, W. Wang, Q. Ye, X. Ji. "Beyond Instance Discrimination: Relation-aware Contrastive
Self-supervised Learning", https://arxiv.org/abs/2211.01796. Authors' code: https://github.com/zhangyifei01/ReCo

MoCo-v2's InfoNCE (Eq. 1) plus L_global (Eq. 3: the online feature's similarity distribution over a bank of keys
must match the sharper one of the momentum encoder's weak view) plus L_local (Eqs. 4-6: the feature of x_i CutMixed
with a partner's key view must match the same mix of their features); L = L_csl + lambda_1 L_global + lambda_2 L_local.

Run:    accelerate launch reco.py --data-dir data            (CIFAR-10, the shared small protocol: --recipe small)
Smoke:  python reco.py --dataset fake --epochs 2 --warmup-epochs 1 --batch-size 32 --num-workers 0 --queue-size 256
Paper:  accelerate launch --num_processes 8 reco.py --dataset imagenet --data-dir DIR --recipe paper (docs/reco.md)

Glossary (the paper's names -> code):
    f_theta, f_theta^  online encoder `OnlineEncoder` (backbone + 2-layer MLP head) / its EMA, the momentum encoder
    x_i, x^_i, x-_i    strong views to f_theta and f_theta^; weak view (crop + flip) to f_theta^
    v_i, v^_i, v-_i    their features: `q` (raw head output), keys `k` and weak keys (L2-normalised)
    queue, bank        last K keys v^_j (negatives of Eqs. 1, 6; bank of Eq. 3); --global-bank weak: weak keys v-_j
    S^o, S^t           online / target distributions of Eq. (3), temperatures tau_ot, tau_tt (Table I)
    r, j               ratio ~ Beta(alpha, alpha) (CutMix: kept-area fraction of x_i); partner j = randperm(N_b)[i]
    v_ij, v~_ij        feature of the mixed image (Eq. 4); mixed target feature (Eq. 5, stop-gradient)

Interpretations and deviations (each explained once, with its source and evidence, in docs/reco.md):
    Interp. 1  Eqs. (4)-(5): image q/k, features q/k (Table VII's best row); --image-pair, --feature-pair.
    Interp. 2  Eq. (6)'s denominator holds the positive, as Eq. (1).
    Interp. 3  One r, partner permutation and CutMix box per step for the global batch, seeded by (seed, step).
    Interp. 4  The bank of Eq. (3) is the MoCo queue, the paper's one memory bank; --global-bank weak: authors' code.
    Interp. 5  Table III: S_p excludes x_i; L2-normalised backbone features of the test split.
    Interp. 6  Weak view crop scale (0.2, 1).
    Interp. 7  Paper recipe: 5 linear warm-up epochs before the cosine schedule (authors' code).
    Interp. 8  Paper over code: 128-d head (the authors' ReCo runs: 256, their argparse default), lambda_2 2, wd 5e-4.
    Interp. 9  --multi-crop (Table VIII dagger): SwAV's 6 small crops as extra queries of Eqs. (1), (3), averaged.
    Dev. 1     Shuffle BN of the momentum encoder over --bn-splits groups of the global batch; online BN global.
    Dev. 2     K = 4096 instead of 65536 when the pretraining set holds fewer than 65536 images.
    Dev. 3     lr scales with batch / 256 (the paper keeps 0.03 at batch 128 in its ablations).
"""
import copy
import math
import random
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
    proj_dim: int = 128  # output width of the 2-layer MLP head (Table VI "Dim. 128"; Interpretation 8)
    ema_momentum: float = 0.999  # momentum-encoder update (Sec. IV-A)
    queue_size: int = 0  # K; 0: 65536 (Sec. IV-A), 4096 if the pretraining set is smaller (Deviation 2)
    tau: float = 0.2  # InfoNCE temperature of Eqs. (1) and (6) (Sec. IV-A)
    lambda_global: float = 1.0  # lambda_1 of Eq. (2) (Table II); 0 switches the global relation off (Table IV)
    lambda_local: float = 2.0  # lambda_2 of Eq. (2) (Table II; Interp. 8); 0 switches the local relation off (Table IV)
    tau_ot: float = 0.1  # online temperature of S^o, Eq. (3) (Table I)
    tau_tt: float = 0.04  # target temperature of S^t, Eq. (3) (Table I)
    global_bank: Literal["key", "weak"] = "key"  # bank of Eq. (3): MoCo queue, or authors' weak-key queue (Interp. 4)
    mix: Literal["cutmix", "mixup"] = "cutmix"  # image interpolation of Eq. (4) (Sec. I names cutmix)
    mix_alpha: float = 1.0  # r ~ Beta(alpha, alpha) (Sec. III-C)
    feature_pair: Literal["q/k", "k/q", "k/k", "q/q"] = "q/k"  # Eq. (5) features of x_i / of j (Table VII; Interp. 1)
    image_pair: Literal["q/k", "q/q"] = "q/k"  # Eq. (4) views of x_i / of j (Table VII; Interpretation 1)
    bn_splits: int = 8  # shuffle-BN groups of the momentum encoder over the global batch (Deviation 1)
    multi_crop: bool = False  # Table VIII's dagger rows: 6 extra low-resolution query crops (Interpretation 9)


# --recipe paper: the paper's main ImageNet-1K table (Table VIII, ReCo: R50-MLP, batch 256, 200 epochs, 71.3 top-1)
PAPER = {
    "arch": "resnet50",  # Sec. IV-A "ResNet-50 [4] is set as the backbone network by default"
    "optimizer": "sgd",  # Sec. IV-A "We use the SGD optimizer with the momentum of 0.9
    "momentum": 0.9,  # ... and weight decay of 0.0005"
    "weight_decay": 5e-4,
    "lr": 0.03,  # Sec. IV-A "a base learning rate of 0.03, and the batch size is 256" (x B/256: Deviation 3)
    "batch_size": 256,
    "epochs": 200,  # Table VIII, ReCo row: 200 epochs (the 800-epoch rows: --epochs 800)
    "warmup_epochs": 5,  # paper silent (cosine only); authors' main_reco.py --warmup 5 (Interpretation 7)
    "queue_size": 65536,  # Sec. IV-A "The size of the memory bank is 65536"
    "ema_momentum": 0.999,  # Sec. IV-A "updated with a parameter of 0.999"
    "tau": 0.2,  # Sec. IV-A "The temperature tau of InfoNCE loss is 0.2"
    "proj_dim": 128,  # Table VI "Dim. 128" (Interpretation 8)
    "tau_tt": 0.04,  # Sec. IV-B "We set tau_tt=0.04 and tau_ot=0.1 by default"
    "tau_ot": 0.1,
    "lambda_global": 1.0,  # Sec. IV-B "When lambda_1=1.0 and lambda_2=2.0, the best top-1 accuracy"
    "lambda_local": 2.0,
    "mix_alpha": 1.0,  # Sec. III-C "alpha is a hyper-parameter set to 1.0 by default"
    "global_bank": "key",  # Sec. III-A "a queue (memory bank)", the one bank the paper names (Interpretation 4)
    "bn_splits": 8,  # shuffle BN (MoCo-v2 [32]) over the 8 GPUs of the authors' README command (Deviation 1)
    "multi_crop": False,  # Table VIII: the ReCo row has no dagger (the dagger rows: --multi-crop)
}


# ----------------------------------------------------------------------------- Augmentations

def view_specs(cfg, size):
    """[x_i, x^_i, x-_i] (+ 6 small crops with --multi-crop). x_i, x^_i: MoCo-v2's view (Sec. III-A, [32]), crop
    (0.2, 1), flip, colour jitter (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale p 0.2, blur sigma (0.1, 2) p 0.5, kernel ~10 %
    of the side. x-_i: Sec. III-B's weak view, crop (Interpretation 6: scale (0.2, 1)) and flip. Small crops
    (Interpretation 9): SwAV's 6 x 96 px at 224, scale (0.05, 0.14), x_i's colour. forward_loss applies Eq. (4)."""
    colour = dict(jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=0.5)
    strong, weak = ViewSpec(crop_scale=(0.2, 1.0), **colour), ViewSpec(crop_scale=(0.2, 1.0))
    small = ViewSpec(crop_scale=(0.05, 0.14), size=round(size * 96 / 224), **colour)
    return [strong, strong, weak] + [small] * (6 if cfg.multi_crop else 0)


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
    """f_theta: backbone -> 2-layer MLP head (MoCo-v2: Linear, ReLU, Linear). forward(*views) -> tuple: each view in
    its own BN batch (as the authors' code does for x_i and the mixed image), in ONE call: one DDP forward per step."""

    def __init__(self, cfg, cifar_stem):
        super().__init__()
        self.backbone, feat_dim = build_backbone(cfg.arch, cifar_stem)
        self.head = nn.Sequential(nn.Linear(feat_dim, feat_dim), nn.ReLU(inplace=True),
                                  nn.Linear(feat_dim, cfg.proj_dim))

    def forward(self, *views):
        return tuple(self.head(self.backbone(x)) for x in views)


# ----------------------------------------------------------------------------- Loss

def infonce_loss(q, k, queue, tau=0.2):
    """MoCo-v2 InfoNCE, Eq. (1). q (B, D) queries (carry gradient), k (B, D) positive keys, queue (K, D) -> scalar.
    All three are L2-normalised here; k and the queue are detached (they come from the momentum encoder)."""
    q, k, queue = (F.normalize(t.float(), dim=1) for t in (q, k.detach(), queue.detach()))
    # Eq. (1): -1/N sum_i log exp(v_i.v^_i/tau) / (exp(v_i.v^_i/tau) + sum_j exp(v_i.v^_j/tau)); positive is logit 0
    pos = (q * k).sum(dim=1, keepdim=True)  # (B, 1)
    neg = q @ queue.T  # (B, K)
    logits = torch.cat([pos, neg], dim=1) / tau  # (B, 1 + K)
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def global_relation_loss(v, v_weak, queue, tau_ot=0.1, tau_tt=0.04):
    """Global distribution relation, Eq. (3): mean_i KL(S^t(i) || S^o(i)) -> scalar. v (B, D) online features of x_i
    (carry gradient); v_weak (B, D) momentum features of the weak view x-_i (detached); queue (K, D) the bank
    (detached); all L2-normalised here. The KL value itself: 0 when S^t = S^o; its gradient is the cross-entropy's."""
    v, v_weak, queue = (F.normalize(t.float(), dim=1) for t in (v, v_weak.detach(), queue.detach()))
    # S^o(i) = softmax_j(v_i . v~_j / tau_ot), S^t(i) = softmax_j(v-_i . v~_j / tau_tt), as log-probabilities
    log_s_o = F.log_softmax(v @ queue.T / tau_ot, dim=1)  # (B, K)
    log_s_t = F.log_softmax(v_weak @ queue.T / tau_tt, dim=1)  # (B, K), no gradient
    # Eq. (3): L_global = 1/N sum_i sum_j S^t_ij (log S^t_ij - log S^o_ij)
    return (log_s_t.exp() * (log_s_t - log_s_o)).sum(dim=1).mean()


def cutmix(x, x_partner, r, rng=random):
    """Image interpolation by CutMix, Eq. (4): x (B, C, H, W) with one box (the same for the batch) of sides sqrt(1 - r)
    and a uniform centre (drawn from `rng`, a random.Random), clipped, taken from x_partner -> (x_mix, r_eff); r_eff,
    the kept fraction of x, is the ratio Eq. (5) uses (CutMix's and the authors' code). Pure: inputs unchanged."""
    h, w = x.shape[-2:]
    cut_h, cut_w = int(h * math.sqrt(1 - r)), int(w * math.sqrt(1 - r))
    cy, cx = rng.randrange(h), rng.randrange(w)  # host numbers: no tensor read back from the device
    y0, y1, x0, x1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h), max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    # Eq. (4): x_ij = r * x_i (+) (1 - r) * x_j, the box of x_j pasted into x_i
    x_mix = x.clone()
    x_mix[..., y0:y1, x0:x1] = x_partner[..., y0:y1, x0:x1]
    return x_mix, 1.0 - (y1 - y0) * (x1 - x0) / (h * w)


def mixup(x, x_partner, r):
    """Image interpolation by mixup (`--mix mixup`), Eq. (4): r * x + (1 - r) * x_partner -> (x_mix, r)."""
    return r * x + (1 - r) * x_partner, float(r)


def interpolated_target(v, v_partner, r):
    """Feature-level interpolation, Eq. (5): v~_ij = l2(r * v_i + (1 - r) * v^_j) (B, D), detached. v (B, D) features
    of x_i; v_partner (B, D) row i: features of partner j of i (which encoders': --feature-pair, Interpretation 1);
    r a float or a (B,) tensor, the ratio of x_i in the interpolated image (CutMix: its kept-area fraction)."""
    # Interpretation 1: both features L2-normalised before mixing
    v, v_partner = (F.normalize(t.detach().float(), dim=1) for t in (v, v_partner))
    r = r[:, None] if torch.is_tensor(r) and r.dim() == 1 else r  # (B, 1) or scalar
    # Eq. (5)
    return F.normalize(r * v + (1 - r) * v_partner, dim=1)


def local_interpolation_loss(v_mix, v_target, queue, tau=0.2):
    """Local interpolation relation, Eq. (6) -> scalar. v_mix (B, D) online features of the interpolated images
    (carry gradient); v_target (B, D) interpolated features of Eq. (5) (stop-gradient); queue (K, D) negatives."""
    # Interpretation 2: the positive is in the denominator, as in Eq. (1)
    # Eq. (6): -1/N sum_i log exp(v_ij . v~_ij / tau) / (exp(v_ij . v~_ij / tau) + sum_k exp(v_ij . v~_k / tau))
    return infonce_loss(v_mix, v_target.detach(), queue, tau)


def crop_mean(loss_fn, queries, *args):
    """Multi-crop (Interpretation 9): a term of Eq. (1) or (3) averaged over the online queries, v_i and the features
    of its small crops, each against x_i's target; without small crops it is the term itself."""
    return sum(loss_fn(v, *args) for v in queries) / len(queries)


def total_loss(csl, glob, local, lambda_global, lambda_local):
    # Eq. (2): L = L_csl + lambda_1 * L_global + lambda_2 * L_local
    return csl + lambda_global * glob + lambda_local * local


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
    per_anchor = {"s_intra": [], "s_inter": [], "phi": []}
    for fi, yi in zip(f.split(chunk), labels.split(chunk)):
        to_class = (fi * class_sum[yi]).sum(1)  # (b,) sum of x_i . x over i's class, x_i included
        same, n_same = to_class - (fi * fi).sum(1), counts[yi] - 1
        other, n_other = fi @ total - to_class, len(f) - counts[yi]
        ok = (n_same > 0) & (n_other > 0)
        mean_p, mean_n = same[ok] / n_same[ok], other[ok] / n_other[ok]
        for name, value in (("s_intra", mean_p), ("s_inter", mean_n), ("phi", (mean_p + 1) / (mean_n + 1))):
            per_anchor[name].append(value)
    return {name: torch.cat(values).mean().item() for name, values in per_anchor.items()}


# ----------------------------------------------------------------------------- Momentum, queue, schedules

class MomentumState(nn.Module):
    """What the optimiser does not train, identical on every process and held by checkpoints: the momentum encoder
    f_theta^ (split BN, Deviation 1), the queue of keys v^_j and, with `weak_bank` (L_global on, --global-bank weak),
    the bank of Eq. (3), a queue of weak-view keys v-_j (Interpretation 4)."""

    def __init__(self, online, queue_size, dim, splits_per_process, weak_bank=False):
        super().__init__()
        encoder = copy.deepcopy(nn.Sequential(online.backbone, online.head))
        self.momentum_encoder = common.to_split_bn(encoder, splits_per_process).requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))  # random unit keys (MoCo)
        if weak_bank:
            self.register_buffer("queue_weak", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))


@torch.no_grad()
def ema_update(target, online, m):
    """MoCo's momentum update theta^ <- m * theta^ + (1 - m) * theta, one fused call over all parameters; BN running
    statistics are copied (the momentum encoder runs in train mode with split BN, so they only matter for eval)."""
    params = list(target.parameters())
    torch._foreach_lerp_(params, [p.detach() for p in online.parameters()], 1 - m)  # one fused op
    torch._foreach_copy_(list(target.buffers()), list(online.buffers()))


@torch.no_grad()
def enqueue(queue, ptr, keys):
    """FIFO: write keys (N, D) over the oldest entries, wrapping around the end; returns the new pointer."""
    idx = (ptr + torch.arange(len(keys), device=queue.device)) % len(queue)
    queue[idx] = keys.to(queue.dtype)
    return (ptr + len(keys)) % len(queue)


def lr_at(step, total_steps, warmup_steps, base_lr):
    """Linear warm-up to base_lr (the paper recipe's 5 epochs: Interpretation 7), then cosine decay to 0."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1 + math.cos(math.pi * t))


def step_randomness(seed, step, global_batch, alpha, device):
    """The step's draws, the same on every process (Interpretation 3) -> (rng, shuffle_k, shuffle_w, partner, r): the
    shuffle-BN permutations of the key and weak views and the partners j = randperm(N_b), drawn on `device` (no
    host-to-device copy); r ~ Beta(a, a), then the CutMix box, from one host random.Random (nothing read back)."""
    on_device = common.generator(seed, "step", step, device=device)
    shuffle_k, shuffle_w, partner = (torch.randperm(global_batch, generator=on_device, device=device)
                                     for _ in range(3))
    host = random.Random(common.seed_for(seed, "mix", step))
    return host, shuffle_k, shuffle_w, partner, host.betavariate(alpha, alpha)


# ----------------------------------------------------------------------------- Training

def check_config(cfg, num_processes):
    """Every flag's domain, checked before anything runs: one `error:` line and exit code 2 for a bad value."""
    common.check_base_config(cfg, num_processes)
    require = common.require
    require(cfg.proj_dim >= 1, f"--proj-dim must be at least 1, got {cfg.proj_dim}.")
    for name in ("tau", "tau_ot", "tau_tt", "mix_alpha"):
        require(getattr(cfg, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}.")
    for name in ("lambda_global", "lambda_local"):
        require(getattr(cfg, name) >= 0, f"--{name.replace('_', '-')} must be 0 or more, got {getattr(cfg, name)}.")
    require(0 <= cfg.ema_momentum <= 1, f"--ema-momentum must lie in [0, 1], got {cfg.ema_momentum}.")
    require(cfg.queue_size >= 0 and (cfg.queue_size or 4096) >= cfg.batch_size,
            f"--queue-size {cfg.queue_size} must be at least --batch-size {cfg.batch_size} (0: the default).")
    require(cfg.bn_splits >= 1, f"--bn-splits must be at least 1, got {cfg.bn_splits}.")
    require(cfg.batch_size % cfg.bn_splits == 0 and cfg.bn_splits % num_processes == 0,
            f"--bn-splits {cfg.bn_splits} must divide --batch-size {cfg.batch_size} and be a multiple of the number "
            f"of processes ({num_processes}).")
    require(cfg.batch_size // cfg.bn_splits >= 2, f"--bn-splits {cfg.bn_splits} leaves fewer than 2 images per "
            f"BatchNorm group at --batch-size {cfg.batch_size}: lower --bn-splits.")


def forward_loss(online, state, views, cfg, step, accelerator):
    """The loss of this process's share of the batch -> (loss, keys (N, D), weak keys (N, D) or None, logs); the keys
    are those of the GLOBAL batch (N = world x B), ready for the queues. `step` (global optimiser step) seeds the
    step's draws (Interpretation 3)."""
    x_q, x_k, x_w, *x_small = views  # x_i (strong, online), x^_i (strong, momentum), x-_i (weak, momentum), crops
    b, rank = len(x_q), accelerator.process_index
    mine = slice(rank * b, (rank + 1) * b)  # this process's rows of the global batch
    rng, shuffle_k, shuffle_w, partner, r = step_randomness(cfg.seed, step, b * accelerator.num_processes,
                                                            cfg.mix_alpha, x_q.device)
    x_k_all = accelerator.gather(x_k.contiguous())  # (N, C, H, W): for shuffle BN and as CutMix partners
    with torch.no_grad(), accelerator.autocast():
        k_all = F.normalize(common.shuffle_bn(state.momentum_encoder, x_k_all, shuffle_k, accelerator).float(),
                            dim=1)  # v^ (N, D)
        k_weak_all = None
        if cfg.lambda_global > 0:
            x_w_all = accelerator.gather(x_w.contiguous())
            k_weak_all = F.normalize(common.shuffle_bn(state.momentum_encoder, x_w_all, shuffle_w, accelerator).float(),
                                     dim=1)  # v- (N, D)
    inputs, r_eff = [x_q], r
    if cfg.lambda_local > 0:
        j = partner[mine]  # partner of each of my samples, an index into the global batch
        # Eq. (4) (Interpretation 1: image q/k; q/q mixes x_i with the partner's query view)
        x_j = x_k_all[j] if cfg.image_pair == "q/k" else accelerator.gather(x_q.contiguous())[j]
        x_mix, r_eff = cutmix(x_q, x_j, r, rng) if cfg.mix == "cutmix" else mixup(x_q, x_j, r)
        inputs.append(x_mix)
    if x_small:  # Interpretation 9: the small crops in one BN batch, as SwAV forwards crops of one resolution
        inputs.append(torch.cat(x_small))
    # Eq. (4): v_ij = f_theta(x_ij), beside v_i = f_theta(x_i): each input its own BN batch, one DDP forward
    q, *rest = online(*inputs)
    queries = (q, *rest[-1].chunk(len(x_small))) if x_small else (q,)
    csl = crop_mean(infonce_loss, queries, k_all[mine], state.queue, cfg.tau)
    glob = local = torch.zeros((), device=x_q.device)
    if cfg.lambda_global > 0:
        bank = state.queue_weak if cfg.global_bank == "weak" else state.queue  # Interpretation 4: the v~_j of Eq. (3)
        glob = crop_mean(global_relation_loss, queries, k_weak_all[mine], bank, cfg.tau_ot, cfg.tau_tt)
    if cfg.lambda_local > 0:
        # Interpretation 1: which encoders' features of x_i and of partner j enter Eq. (5) (Table VII's best: q/k)
        first, second = cfg.feature_pair.split("/")
        v_i = q if first == "q" else k_all[mine]
        v_j = k_all[j] if second == "k" else accelerator.gather(q.detach().float().contiguous())[j]
        local = local_interpolation_loss(rest[0], interpolated_target(v_i, v_j, r_eff), state.queue, cfg.tau)
    loss = total_loss(csl, glob, local, cfg.lambda_global, cfg.lambda_local)
    return loss, k_all, k_weak_all, {"csl": csl.detach(), "global_relation": glob.detach(),
                                     "local_relation": local.detach(), "r": r_eff}


def train_step(online, state, optimizer, views, labels, cfg, sched, step, accelerator):
    """One optimiser step, in MoCo's order: the loss against the queues as they were before this batch, SGD on the
    online encoder, the momentum update of f_theta^, then the batch's keys (from every process) enter the queue and
    its weak keys the bank of Eq. (3) (not on a step the fp16 GradScaler skipped: a host flag, False without fp16).
    -> loss terms (0-dim tensors) and the step's r (a host float). Nothing here reads a device value back."""
    for g in optimizer.param_groups:
        g["lr"] = sched["lr"]
    loss, keys, weak_keys, logs = forward_loss(online, state, views, cfg, step, accelerator)
    common.zero_grad(optimizer, accelerator)  # on the first batch of each --accumulate window
    accelerator.backward(loss)
    optimizer.step()
    if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
        raw = accelerator.unwrap_model(online)
        ema_update(state.momentum_encoder, nn.Sequential(raw.backbone, raw.head), sched["ema_momentum"])
        if hasattr(state, "queue_weak"):  # the bank of Eq. (3), written at the queue's positions (Interpretation 4)
            enqueue(state.queue_weak, state.ptr, weak_keys)
        state.ptr.copy_(enqueue(state.queue, state.ptr, keys))
    return {"loss": loss.detach(), **logs}


def schedules(cfg, step, steps_per_epoch):
    """This step's learning rate (linear warm-up, then cosine: Sec. IV-A, Interpretation 7) and encoder momentum."""
    base_lr = cfg.lr * cfg.batch_size * cfg.accumulate / 256  # Deviation 3: linear scaling
    return {"lr": lr_at(step, cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch, base_lr),
            "ema_momentum": cfg.ema_momentum}


def setup(cfg, data, accelerator):
    """The online encoder and its optimiser, prepared by Accelerate, and the momentum state (momentum encoder, queue,
    bank of Eq. 3), registered for checkpointing -> (online, optimizer, state)."""
    online = OnlineEncoder(cfg, data.cifar_stem)
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        online = common.global_batchnorm(online)  # global BN (Deviation 1)
    optimizer = common.make_optimizer(cfg, online)  # --optimizer: sgd, lars or adam
    online, optimizer = accelerator.prepare(common.fast_model(online, cfg, accelerator), optimizer)
    # Deviation 2: the paper's K = 65536 would exceed a smaller data set (MoCo's CIFAR-10 recipe uses 4096)
    queue_size = cfg.queue_size or (65536 if len(data.pretrain) > 65536 else 4096)
    state = MomentumState(accelerator.unwrap_model(online), queue_size, cfg.proj_dim,
                          cfg.bn_splits // accelerator.num_processes,
                          weak_bank=cfg.lambda_global > 0 and cfg.global_bank == "weak").to(accelerator.device)
    accelerator.register_for_checkpointing(state)
    return online, optimizer, state


def epoch_diagnostics(query):
    """Table III on the L2-normalised backbone features of the test split (query: the kNN monitor's (features,
    labels)), x100 as the table prints them; left out (NaN) when no class has two test images (Interpretation 5)."""
    sims = class_similarity_stats(*query)
    return {k: v * 100 for k, v in sims.items() if math.isfinite(v)}


def train(cfg: Config):
    accelerator = common.make_accelerator(cfg)
    check_config(cfg, accelerator.num_processes)
    set_seed(cfg.seed)
    data = common.load_data(cfg, accelerator)
    loader = common.train_views(cfg, data, view_specs(cfg, data.size), accelerator)
    run = common.Run(cfg, "reco", accelerator, data, steps_per_epoch=len(loader))
    online, optimizer, state = setup(cfg, data, accelerator)
    backbone = accelerator.unwrap_model(online).backbone

    start_epoch, done = run.resume()
    step = start_epoch * run.steps_per_epoch + done
    if step == 0 and cfg.eval_every:
        run.monitor(0, 0, backbone, epoch_diagnostics)  # the random-init baseline
    for epoch in range(start_epoch, run.last_epoch):
        online.train()
        state.train()
        for views, labels, _ in run.epoch_batches(loader, epoch, done if epoch == start_epoch else 0):
            sched = schedules(cfg, step // cfg.accumulate, run.updates_per_epoch)  # per optimiser update
            with run.accumulate(step, online):
                logs = train_step(online, state, optimizer, views, labels, cfg, sched, step, accelerator)
            r = logs.pop("r")  # the step's interpolation ratio, drawn on the host
            step += 1
            if run.after_step(step, epoch, logs, **sched, r=r):
                break  # a signal or a non-finite loss: run.finish() checkpoints or raises
        if run.end_epoch(epoch + 1, step, backbone, epoch_diagnostics):
            break
    return run.finish(backbone, {})


if __name__ == "__main__":
    common.run_main(train, Config, paper=PAPER)
