"""SMoG: Synchronous Momentum Grouping, group-level contrastive learning with groups that carry gradient.

B. Pang, Y. Zhang, Y. Li, J. Cai, C. Lu. "Unsupervised Visual Representation Learning by Synchronous Momentum
Grouping", ECCV 2022, arXiv:2207.06167. Text: ../shared/papers/smog.md.

Run:    accelerate launch smog.py --data-dir data            (CIFAR-10, downloaded into data/)
Smoke:  python smog.py --dataset fake --epochs 2 --batch-size 32 --num-workers 0 --reset-every 4
Ablations: --num-groups (Table 7c), --beta-schedule linear|fixed --beta-end (Table 7a), --reset-every,
           --no-kmeans-reset, --no-encoder-reset (Table 7b), --group-update momentum|average|latest|random (Table 7d),
           --group-update average-paper (Table 7d's printed 1/n weight), --detach-groups (no gradient through the
           groups: reported for the authors' released code, which we could not find to check; the paper has it),
           --crop-min-scale (BYOL's 0.08 by default).

Reads with: Sec. 3.1 (Eq. 3 `smog_loss`; Eq. 2 is the variant the paper discards), Sec. 3.2 (momentum network, Eq. 4 `assign_groups` / `update_groups`,
"Avoiding Collapse" `periodic_reset`), Sec. 3.4 (views `byol_view`, heads, alpha, beta, 3k groups, 300-iteration
resets), Sec. 4.4 (Fig. 5 group label entropy, logged as group_label_entropy; Table 7 a-d, flags above).

Glossary (the paper's names):
    f_theta     online network: backbone -> projection head; gets the gradient. Its projection z is the "instance
                feature" f_theta(x) that updates the groups (Eq. 4); its prediction p (prediction head on top) is
                contrasted with the groups (Eq. 3; Interpretation 1).
    f^_eta      momentum network: backbone -> projection head, EMA of f_theta with ratio alpha; its projection of view
                b picks the target group c_i^b.
    x^a, x^b    the two augmented views; stream a goes through f_theta, stream b through f^_eta. The two BYOL schemes
                swap streams every iteration (Sec. 3.4).
    g_k, G      group features (l of them, `--num-groups`), unit vectors; c_i = the group instance i is assigned to.
    beta        momentum ratio of the group features (Eq. 4), linear 1.0 -> 0.99 over training (Table 7a).
    alpha       momentum ratio of the momentum network (Sec. 3.2).
    tau         temperature of Eq. (3), 0.1.

Interpretations (the paper is silent or ambiguous; each marked in the code):
    1. Prediction head on the ONLINE branch. Sec. 3.4's text stacks it on f^_eta, but Sec. 3.2 says the EMA covers
       "layers [of f_theta] that also exist in f^_eta" (so f_theta has extra layers), Eq. (3) contrasts
       f_theta(x^a) and not f^_eta, and every Siamese method it builds on (BYOL, MoCo v3) and lightly's SMoG put
       the predictor on the online branch. The groups are updated with the online projection z (what f^_eta also
       has), and the online prediction p is what Eq. (3) compares with the groups.
    2. Eq. (4) prints argmin sim; the assignment is to the most similar group (argmax cosine; papers/README.md).
    3. Order within an iteration: both views are assigned with the groups of the previous iteration, the groups
       are then updated with the online features of this batch (Eq. 4), and Eq. (3) uses the UPDATED groups, so
       its gradient reaches the online features through them (Sec. 3.2: "the updated g_k is adopted to conduct
       contrasting"). "We omit the normalization": features are L2-normalised before the mean and every updated
       group is normalised again.
    4. Initial groups: "initialized with K-means" on unnamed features; here spherical k-means on the online
       projections of the first global batch (--group-init kmeans), or random unit vectors (--group-init random,
       the paper's other option). With more groups than images in the first batch (the paper's l = 3000), the
       groups beyond the batch size start as random unit vectors; the first k-means reset relocates all of them.
    5. Eq. (3) is asymmetric and the paper alternates the schemes between the streams rather than symmetrising:
       one direction per iteration, and the views swap schemes every iteration (Sec. 3.4).
    6. k-means ("Avoiding Collapse", Table 7b): spherical k-means (cosine, unit centroids) with 10 Lloyd
       iterations (`--kmeans-iters`), initialised from random cached features, on the online projections of the
       last `--reset-every` iterations gathered from every process; an empty cluster keeps its previous centroid.
       The momentum network is reset at the same iterations (weights and BN statistics copied from f_theta).
    7. Table 7d's other rules: "latest" is beta = 0; "random" re-draws every group from distinct rows of the
       current global batch's online features each iteration (with replacement only when there are more groups
       than images); n_k of the "average" rules is restarted from the cluster sizes at each k-means (Deviation 4).
    8. Views: BYOL's two schemes (random resized crop scale (0.08, 1), colour jitter 0.4, 0.4, 0.2, 0.1 with p 0.8,
       grayscale p 0.2, Gaussian blur p 1.0 / 0.1, solarisation p 0 / 0.2), blur kernel about 10 % of the side.
    9. BatchNorm: global (plain BN on one process, SyncBatchNorm on several GPUs); the paper does not say.
   10. Diagnostics, accumulated over the epoch before each kNN line: groups_used = groups that received at least
       one online feature; group_label_entropy = Fig. 5's entropy sum_i -p_i log p_i of the class mix of each used
       group, averaged over groups (natural log; labels used only here); same_group = % of instances whose two
       views were assigned to the same group.

Deviations (each marked in the code):
    1. Optimisation: DESIGN.md's CIFAR defaults (SGD momentum 0.9, lr 0.06 x batch/256, weight decay 5e-4, global
       batch 256, 10 warm-up epochs then cosine, 200 epochs) instead of the paper's ImageNet recipe (LARS, lr 0.3 x
       batch/256, weight decay 1e-6, batch 4096 on 64 GPUs, 10 warm-up epochs then cosine). Multi-crop (the paper's
       dagger results) is not implemented.
    2. alpha = 0.99 (DESIGN.md's small-scale value) instead of ImageNet's 0.999: with 195 iterations per CIFAR epoch
       and a reset every 300 iterations, alpha = 0.999 would keep f^_eta at 74 % of its reset snapshot for the whole
       period (0.999^300), while 0.99 follows f_theta within about 100 iterations. Not measured.
    3. l = 256 groups instead of 3000: the paper's 3000 groups at batch 4096 are 0.73 groups per image of a batch,
       about 190 at CIFAR's batch 256, and Table 7c shows accuracy flat from 1k to 10k groups for ImageNet's 1000
       classes (300 is too few there); 256 = one per image of the global batch, 25 per CIFAR-10 class. Not
       measured: --num-groups 3000 is the paper's value.
    4. Table 7d's "average" rule: the paper prints g_k <- g_k + (1/n)(mean - g_k), n counting this iteration's
       instances too. With the mean of m_k new instances, 1/n under-weights them m_k-fold and the group is no
       longer the average of its instances, so `--group-update average` uses m_k / n_k (sequential k-means, the
       exact running average); `--group-update average-paper` is the printed 1/n.

Results: no full-length run (no GPU in the sessions so far). On a 2,000-image CIFAR-10 (JPEG copy) subset on CPU
(README "Measured on CPU") kNN top-1 rose from 26.5 % (random init) to 32.5 % in 50 epochs; with --reset-every 300
(20 epochs there) the groups in use fell to 18 of 256 before the first reset.
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
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import broadcast, broadcast_object_list, set_seed
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
    epochs: int = 200  # pretraining epochs (Deviation 1)
    batch_size: int = 256  # GLOBAL batch size, split evenly over processes (Deviation 1; paper 4096)
    lr: float = 0.06  # base learning rate, scaled by batch_size / 256 (Deviation 1; paper LARS 0.3)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # SGD weight decay (Deviation 1; paper 1e-6)
    warmup_epochs: int = 10  # linear learning-rate warm-up, then cosine decay (Sec. 3.4)
    # run
    seed: int = 0  # random seed (weights, views, shuffling)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"  # auto: what `accelerate launch` was told
    output_dir: str = ""  # default runs/smog-<dataset>-<time>
    resume: bool = False  # continue from the latest checkpoint in --output-dir
    stop_after_epochs: int = 0  # end this invocation after this epoch (0: run to --epochs); continue with --resume
    log_every: int = 50  # steps between metric lines
    eval_every: int = 10  # epochs between kNN evaluations (also before training and at the end); 0: only at the end
    checkpoint_every: int = 10  # epochs between checkpoints (and at the end)
    knn_k: int = 200  # neighbours of the kNN monitor
    knn_t: float = 0.1  # temperature of the kNN monitor
    # SMoG
    proj_hidden: int = 2048  # hidden width of the projection and prediction heads (Sec. 3.4)
    proj_dim: int = 128  # output width of the heads for CNNs (Sec. 3.4)
    ema_momentum: float = 0.99  # alpha of the momentum network (Deviation 2; paper 0.999 on ImageNet)
    num_groups: int = 256  # l, number of groups (Deviation 3; paper 3000; Table 7c)
    tau: float = 0.1  # temperature of Eq. (3) (Sec. 3.4)
    beta_schedule: Literal["linear", "fixed"] = "linear"  # beta of Eq. (4): 1.0 -> --beta-end, or fixed (Table 7a)
    beta_end: float = 0.99  # final beta (Table 7a)
    group_update: Literal["momentum", "average", "average-paper", "latest", "random"] = "momentum"  # rule (Table 7d)
    group_init: Literal["kmeans", "random"] = "kmeans"  # initial groups (Sec. 3.2; Interpretation 4)
    reset_every: int = 300  # iterations between periodic resets (Sec. 3.4, Table 7b); 0: never
    kmeans_reset: bool = True  # relocate the groups by k-means at each reset (--no-kmeans-reset: Table 7b)
    encoder_reset: bool = True  # reset f^_eta to f_theta at each reset (--no-encoder-reset: Table 7b)
    kmeans_iters: int = 10  # Lloyd iterations of the spherical k-means (Interpretation 6)
    detach_groups: bool = False  # stop gradient at the groups (reported for the released code; the paper does not)
    crop_min_scale: float = 0.08  # lower bound of the random resized crop (BYOL's, Sec. 3.4)


# ----------------------------------------------------------------------------- Augmentations

def byol_view(size, mean_std, blur_p, solarize_p, crop_min_scale=0.08):
    """One of BYOL's two schemes (Sec. 3.4; Interpretation 8): same colour jitter, different blur / solarisation."""
    return T.Compose([
        T.ToImage(),
        T.RandomResizedCrop(size, scale=(crop_min_scale, 1.0), antialias=True),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(kernel_size=2 * (size // 20) + 1, sigma=(0.1, 2.0))], p=blur_p),
        T.RandomSolarize(threshold=128, p=solarize_p),  # on uint8 images
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


def mlp(in_dim, hidden, out_dim, out_bn=False):
    """Two-layer head, hidden BN + ReLU (Sec. 3.4); the projection head also has BN on its output."""
    layers = [nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)]
    return nn.Sequential(*layers, *([nn.BatchNorm1d(out_dim)] if out_bn else []))


class Online(nn.Module):
    """f_theta: backbone -> projection head -> prediction head (Interpretation 1). Returns (z, p), both (B, D)."""

    def __init__(self, cfg, cifar_stem):
        super().__init__()
        self.backbone, feat_dim = build_backbone(cfg.arch, cifar_stem)
        self.projector = mlp(feat_dim, cfg.proj_hidden, cfg.proj_dim, out_bn=True)
        self.predictor = mlp(cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim)

    def forward(self, x):
        z = self.projector(self.backbone(x))
        return z, self.predictor(z)


# ----------------------------------------------------------------------------- Loss

def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def assign_groups(z: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Index of the most cosine-similar group for each row of z; no gradient.

    z (B, D) instance features, groups (K, D) group features. Returns (B,) int64.
    """
    # Eq. (4), first line: c_i = the closest group. The paper prints "argmin sim"; the closest group is the
    # argMAX of the cosine similarity (papers/README.md).
    sim = F.normalize(z.float(), dim=1) @ F.normalize(groups.float(), dim=1).T  # (B, K)
    return sim.argmax(dim=1)  # (B,)


def update_groups(
    groups: torch.Tensor,
    z: torch.Tensor,
    assign: torch.Tensor,
    beta: float | torch.Tensor,
    return_counts: bool = False,
    sync_processes: bool = True,
):
    """Eq. (4): momentum update of the group features with the instance features assigned to them.

    groups (K, D) current group features (treated as constants), z (B, D) online instance features (gradient flows
    back to them through the returned tensor: the "synchronous" grouping of Sec. 3.2), assign (B,) group index of
    each row of z, beta a float or a (K,) tensor (a per-group beta gives the other update rules of Table 7d).
    For every group with at least one assigned row: g <- normalize(beta * g + (1 - beta) * mean of normalize(z)
    assigned to it); other groups are returned unchanged. Returns a new (K, D) float32 tensor (and the (K,) global
    counts of assigned rows if return_counts).

    sync_processes: under torch.distributed with more than one process, the per-group sums and counts are summed
    over all processes with an autograd-aware all_reduce, so that every process gets the same groups as one process
    would on the concatenated global batch, and the gradient reaches the features of every process.
    """
    groups = groups.detach().float()  # (K, D)
    K = groups.shape[0]
    z_hat = F.normalize(z.float(), dim=1)  # (B, D)
    one_hot = F.one_hot(assign, K).to(z_hat.dtype)  # (B, K)
    sums = one_hot.T @ z_hat  # (K, D)
    counts = one_hot.sum(dim=0)  # (K,)
    if sync_processes and _world_size() > 1:
        # Autograd-aware all_reduce: the backward pass sums the incoming gradients over processes, so each
        # process's features receive the gradient of the loss terms of every process.
        import torch.distributed.nn.functional as dist_fn

        sums = dist_fn.all_reduce(sums)
        counts = counts.detach().clone()
        dist.all_reduce(counts)  # counts carry no gradient
    mean = sums / counts.clamp(min=1).unsqueeze(1)  # (K, D) mean of the assigned normalised features
    beta = torch.as_tensor(beta, dtype=groups.dtype, device=groups.device)
    if beta.dim() == 1:
        beta = beta.unsqueeze(1)  # (K, 1)
    # Eq. (4): g_k <- beta * g_k + (1 - beta) * mean_{c_t = g_k} f(x_t), then normalised (the paper omits it).
    updated = F.normalize(beta * groups + (1.0 - beta) * mean, dim=1)  # (K, D)
    new_groups = torch.where((counts > 0).unsqueeze(1), updated, groups)  # empty groups unchanged
    return (new_groups, counts.detach()) if return_counts else new_groups


def smog_loss(p: torch.Tensor, groups: torch.Tensor, target: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Eq. (3): cross-entropy of the online prediction against the group of the other view, over all groups.

    p (B, D) online predictions of view a, groups (K, D) group features (the updated ones, carrying gradient to the
    online features unless the caller detaches them), target (B,) index of the group that the momentum network's
    feature of view b was assigned to. Returns the scalar mean over the batch, computed in float32.
    """
    # Eq. (3): L_i = -log exp(sim(p_i, c_i^b)/tau) / sum_j exp(sim(p_i, g_j)/tau)
    logits = F.normalize(p.float(), dim=1) @ F.normalize(groups.float(), dim=1).T / tau  # (B, K)
    return F.cross_entropy(logits, target)


# ----------------------------------------------------------------------------- Momentum, groups, schedules

class MomentumState(nn.Module):
    """What is not trained by the optimiser: the momentum network f^_eta, the group features, the feature cache of
    the last --reset-every iterations (for the k-means relocation) and the running group counts ("average" rule).

    Identical on every process: f^_eta follows the synchronised online network, the groups are updated from sums
    reduced over all processes, the cache holds features gathered from all processes. Registered with Accelerate so
    that checkpoints hold it.
    """

    def __init__(self, online, num_groups, dim, cache_size, num_classes):
        super().__init__()
        self.num_classes = num_classes  # for the group label-entropy diagnostic only
        self.target = copy.deepcopy(nn.Sequential(online.backbone, online.projector))
        self.target.requires_grad_(False)
        self.register_buffer("groups", F.normalize(torch.randn(num_groups, dim), dim=1))  # (K, D)
        self.register_buffer("cache", torch.zeros(cache_size, dim))  # (reset_every * global batch, D)
        self.register_buffer("seen", torch.zeros(num_groups))  # n_k of the "average" rules (Deviation 4)
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))  # groups set by k-means yet?


@torch.no_grad()
def ema_update(target, online, m):
    """f^_eta <- alpha * f^_eta + (1 - alpha) * f_theta (Sec. 3.2); BN running statistics are copied."""
    for p_t, p_o in zip(target.parameters(), online.parameters()):
        p_t.mul_(m).add_(p_o.detach(), alpha=1 - m)
    for b_t, b_o in zip(target.buffers(), online.buffers()):
        b_t.copy_(b_o)


def beta_schedule(step: int, total_steps: int, end: float = 0.99, start: float = 1.0, kind: str = "linear") -> float:
    """Momentum ratio beta of the group features at a step (Sec. 3.4, Table 7a).

    linear: start -> end linearly over training (the paper: 1.0 -> 0.99); fixed: end at every step.
    """
    if kind == "fixed":
        return end
    if kind != "linear":
        raise ValueError(f"--beta-schedule must be 'linear' or 'fixed', got {kind!r}")
    frac = min(max(step, 0), max(total_steps - 1, 1)) / max(total_steps - 1, 1)
    return start + (end - start) * frac


@torch.no_grad()
def spherical_kmeans(
    x: torch.Tensor, k: int, iters: int = 10, generator: torch.Generator | None = None, chunk: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means (cosine similarity, unit centroids) in torch, on x's device.

    x (N, D) features; returns centroids (k, D) unit rows and counts (k,) of the last assignment. Initial centroids are
    k distinct random rows; when N < k, all N rows plus k - N random unit vectors (copies of a row would never win an
    argmax and stay dead). A centroid left empty keeps its previous value.
    """
    x = F.normalize(x.float(), dim=1)  # (N, D)
    n = x.shape[0]
    if n == 0:
        raise ValueError("spherical_kmeans needs at least one feature")
    centroids = x[torch.randperm(n, generator=generator)[:k].to(x.device)]  # (min(n, k), D)
    if n < k:
        extra = F.normalize(torch.randn(k - n, x.shape[1], generator=generator), dim=1).to(x.device)
        centroids = torch.cat([centroids, extra])  # (k, D)
    counts = torch.zeros(k, device=x.device)
    for _ in range(iters + 1):
        assign = torch.cat([(xc @ centroids.T).argmax(dim=1) for xc in x.split(chunk)])  # (N,)
        counts = torch.bincount(assign, minlength=k).float()  # (k,)
        if _ == iters:
            break
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)  # (k, D)
        centroids = torch.where((counts > 0).unsqueeze(1), F.normalize(sums, dim=1), centroids)
    return centroids, counts


def _all_gather_with_grad(x):
    """Concatenate x (B, D) from every process; the gradient flows back to each process's rows."""
    if _world_size() == 1:
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x.contiguous()))


def group_counts(assign, num_groups):
    """(K,) number of rows assigned to each group over the global batch (no gradient)."""
    counts = torch.bincount(assign, minlength=num_groups).float()
    if _world_size() > 1:
        dist.all_reduce(counts)
    return counts


def group_step(groups, z, assign, rule, beta, seen, generator):
    """One iteration's group features under the update rules of Table 7d -> (new groups (K, D), global counts (K,)).

    The new groups carry gradient to z (the online projections of this process). momentum: Eq. (4) with beta;
    latest: beta = 0; average: beta_k = 1 - m_k / n_k, average-paper: beta_k = 1 - 1 / n_k, with n_k counting this
    batch too (Deviation 4); random: every group re-drawn from the global batch's features (generator: same seed on
    every process).
    """
    K = groups.shape[0]
    if rule in ("momentum", "latest"):
        return update_groups(groups, z, assign, beta if rule == "momentum" else 0.0, return_counts=True)
    counts = group_counts(assign, K)
    if rule in ("average", "average-paper"):
        # Deviation 4: g_k + m_k / n_k * (mean - g_k), the running average; the paper prints 1 / n_k
        n = (seen + counts).clamp(min=1)
        return update_groups(groups, z, assign, 1.0 - (counts if rule == "average" else 1.0) / n), counts
    if rule == "random":
        z_all = _all_gather_with_grad(z)  # (N, D)
        n = len(z_all)  # distinct rows; with replacement only when there are more groups than rows
        idx = torch.randperm(n, generator=generator)[:K] if n >= K else torch.randint(n, (K,), generator=generator)
        idx = idx.to(z_all.device)
        return F.normalize(z_all[idx].float(), dim=1), counts
    raise ValueError(f"--group-update must be momentum, average, average-paper, latest or random, got {rule!r}")


@torch.no_grad()
def write_cache(cache, z_all, step, reset_every):
    """Ring buffer of the last reset_every iterations: iteration `step` owns rows (step % reset_every) * N ..."""
    if len(cache):
        n = len(z_all)
        start = (step % reset_every) * n
        cache[start:start + n] = z_all.float()


@torch.no_grad()
def periodic_reset(state, online_ema_view, cfg, step):
    """"Avoiding Collapse" (Sec. 3.2, 3.4, Table 7b): relocate the groups by k-means on the cached online features
    of the last reset_every iterations, and reset f^_eta to f_theta."""
    if cfg.kmeans_reset:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # the same on every process
        groups, counts = spherical_kmeans(state.cache, cfg.num_groups, cfg.kmeans_iters, generator=g)
        state.groups.copy_(broadcast(groups, from_process=0) if _world_size() > 1 else groups)
        state.seen.copy_(counts)
    if cfg.encoder_reset:
        state.target.load_state_dict(online_ema_view.state_dict())  # parameters and BN statistics


def lr_at(step, total_steps, warmup_steps, base_lr):
    """Linear warm-up to base_lr, then cosine decay to 0 (Sec. 3.4)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1 + math.cos(math.pi * t))


# ----------------------------------------------------------------------------- Training

def forward_loss(online, state, views, labels, cfg, beta, step, accelerator):
    """One step's loss on this process's share of the batch -> (loss, new groups (K, D), z_all (N, D), logs).

    new groups: the group features after this iteration's update (to be stored after the optimiser step);
    z_all: the online projections of the global batch (for the k-means cache).
    """
    # Interpretation 5: the two schemes swap streams every iteration (Sec. 3.4)
    x_a, x_b = views if step % 2 == 0 else views[::-1]
    z_a, p_a = online(x_a)  # (B, D) each: online projection f_theta(x^a) and prediction
    with torch.no_grad(), accelerator.autocast():
        z_b = state.target(x_b)  # (B, D) momentum projection f^_eta(x^b)
    z_all = accelerator.gather(z_a.detach().float().contiguous())  # (N, D) no gradient: cache, init, diagnostics
    groups = state.groups
    if cfg.group_init == "kmeans" and not state.initialised:
        # Interpretation 4: initial groups by k-means on the first global batch's online features
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        groups = spherical_kmeans(z_all, cfg.num_groups, cfg.kmeans_iters, generator=g)[0]
    # Eq. (4), first line: c_i, the closest group, for both views (groups of the previous iteration; Interpr. 3)
    target = assign_groups(z_b, groups)  # (B,) c_i^b, from the momentum network
    assign = assign_groups(z_a, groups)  # (B,) c_i^a, the groups the online features update
    # Eq. (4), second line: synchronous update; gradient flows from the new groups to z_a (and to other processes)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    new_groups, counts = group_step(groups, z_a, assign, cfg.group_update, beta, state.seen, g)
    # Eq. (3) with the updated groups; --detach-groups cuts the path through them
    loss = smog_loss(p_a, new_groups.detach() if cfg.detach_groups else new_groups, target, cfg.tau)
    with torch.no_grad():
        lab = labels >= 0  # STL-10's unlabelled images carry -1
        class_counts = torch.zeros(cfg.num_groups, state.num_classes, device=z_a.device)
        class_counts.index_put_((assign[lab], labels[lab]), torch.ones_like(assign[lab], dtype=torch.float),
                                accumulate=True)
        logs = {"same_group": torch.stack([(assign == target).sum(), torch.tensor(len(assign), device=z_a.device)]),
                "class_counts": class_counts, "counts": counts,
                "z_std": F.normalize(z_all, dim=1).std(dim=0).mean()}  # embedding spread (collapse: 0)
    return loss, new_groups.detach(), z_all, logs


def diagnostics(class_counts, same_group):
    """Interpretation 10: groups used, Fig. 5's mean label entropy of the used groups, % of same-group pairs."""
    size = class_counts.sum(dim=1)  # (K,)
    used = size > 0
    p = class_counts[used] / size[used].unsqueeze(1)  # (used, C)
    entropy = -(p * p.clamp(min=1e-12).log()).sum(dim=1)  # (used,)
    return {"groups_used": int(used.sum()), "group_label_entropy": entropy.mean().item() if used.any() else 0.0,
            "same_group": (same_group[0] / same_group[1].clamp(min=1)).item() * 100}


def train(cfg: Config):
    accelerator = Accelerator(mixed_precision=None if cfg.mixed_precision == "auto" else cfg.mixed_precision,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    set_seed(cfg.seed)
    check_config(cfg)
    with accelerator.main_process_first():  # one process downloads, the others then find the files
        pretrain, memory, query, num_classes, size, mean_std = common.get_datasets(
            cfg.dataset, cfg.data_dir, cfg.fake_size)
    cifar_stem = cfg.stem == "cifar" or (cfg.stem == "auto" and size <= 64)

    run = [cfg.output_dir or os.path.join("runs", f"smog-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")]
    broadcast_object_list(run)  # one name on every process
    out = run[0]
    if accelerator.is_main_process:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
    logger = common.MetricLogger(os.path.join(out, "metrics.jsonl"), accelerator.is_main_process)

    # Sec. 3.4: BYOL's two schemes (strong blur / solarisation); forward_loss alternates them between the streams
    views = [byol_view(size, mean_std, blur_p=1.0, solarize_p=0.0, crop_min_scale=cfg.crop_min_scale),
             byol_view(size, mean_std, blur_p=0.1, solarize_p=0.2, crop_min_scale=cfg.crop_min_scale)]
    train_set = common.MultiView(pretrain, views, seed=cfg.seed)
    loader = common.make_loader(train_set, cfg.batch_size, accelerator.num_processes, True, cfg.num_workers)
    eval_tf = common.eval_transform(size, mean_std)
    memory_loader = common.make_loader(common.Transformed(memory, eval_tf), cfg.batch_size,
                                       accelerator.num_processes, False, cfg.num_workers)
    query_loader = common.make_loader(common.Transformed(query, eval_tf), cfg.batch_size,
                                      accelerator.num_processes, False, cfg.num_workers)

    online = Online(cfg, cifar_stem)
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        online = nn.SyncBatchNorm.convert_sync_batchnorm(online)  # global BN (Interpretation 9)
    base_lr = cfg.lr * cfg.batch_size / 256
    optimizer = torch.optim.SGD(online.parameters(), lr=base_lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    online, optimizer, loader, memory_loader, query_loader = accelerator.prepare(
        online, optimizer, loader, memory_loader, query_loader)
    raw = accelerator.unwrap_model(online)
    cache_size = cfg.reset_every * cfg.batch_size if cfg.kmeans_reset else 0
    state = MomentumState(raw, cfg.num_groups, cfg.proj_dim, cache_size, num_classes).to(accelerator.device)
    accelerator.register_for_checkpointing(state)
    online_ema_view = nn.Sequential(raw.backbone, raw.projector)  # the modules f^_eta averages

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

    def monitor(epoch, step, class_counts, same_group):
        knn = common.knn_accuracy(raw.backbone, memory_loader, query_loader, num_classes, accelerator,
                                  cfg.knn_k, cfg.knn_t)
        diag = diagnostics(accelerator.reduce(class_counts, "sum"), accelerator.reduce(same_group, "sum"))
        logger.log(epoch=epoch, step=step, knn_top1=knn, **diag)
        accelerator.print(f"epoch {epoch}: kNN top-1 {knn:.2f}%, groups used {diag['groups_used']}, "
                          f"group label entropy {diag['group_label_entropy']:.3f}")

    def zero_diagnostics():
        return (torch.zeros(cfg.num_groups, num_classes, device=accelerator.device),
                torch.zeros(2, device=accelerator.device, dtype=torch.long))

    last_epoch = min(cfg.epochs, cfg.stop_after_epochs or cfg.epochs)
    step = start_epoch * steps_per_epoch
    if start_epoch == 0 and cfg.eval_every:
        monitor(0, 0, *zero_diagnostics())  # the random-init baseline
    for epoch in range(start_epoch, last_epoch):
        online.train()
        loader.set_epoch(epoch)
        train_set.set_epoch(epoch)
        class_counts, same_group = zero_diagnostics()
        tic, seen = time.time(), 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not accelerator.is_local_main_process)
        for (x_views, labels, _) in bar:
            lr = lr_at(step, total_steps, warmup_steps, base_lr)
            for g in optimizer.param_groups:
                g["lr"] = lr
            if cfg.reset_every and step > 0 and step % cfg.reset_every == 0:
                periodic_reset(state, online_ema_view, cfg, step)
            beta = beta_schedule(step, total_steps, cfg.beta_end, kind=cfg.beta_schedule)
            loss, new_groups, z_all, logs = forward_loss(online, state, x_views, labels, cfg, beta, step, accelerator)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            if accelerator.sync_gradients:
                ema_update(state.target, online_ema_view, cfg.ema_momentum)
                state.groups.copy_(new_groups)
                state.seen.add_(logs["counts"])
                state.initialised.fill_(True)
                write_cache(state.cache, z_all, step, cfg.reset_every)
            class_counts += logs["class_counts"]
            same_group += logs["same_group"]
            step += 1
            seen += cfg.batch_size
            if step % cfg.log_every == 0 or step == total_steps:
                l = accelerator.reduce(loss.detach(), "mean").item()
                logger.log(step=step, epoch=epoch + 1, loss=l, lr=lr, beta=beta, ema_momentum=cfg.ema_momentum,
                           groups_used_step=int((logs["counts"] > 0).sum()), z_std=logs["z_std"].item(),
                           images_per_s=seen / (time.time() - tic))
                bar.set_postfix(loss=f"{l:.3f}", lr=f"{lr:.3g}")

        epoch_done = epoch + 1
        if (cfg.eval_every and epoch_done % cfg.eval_every == 0) or epoch_done == cfg.epochs:
            monitor(epoch_done, step, class_counts, same_group)
        if epoch_done % cfg.checkpoint_every == 0 or epoch_done in (cfg.epochs, last_epoch):
            save_checkpoint(accelerator, out, epoch_done)

    if last_epoch == cfg.epochs and accelerator.is_main_process:
        common.save_backbone(os.path.join(out, "backbone.pt"), raw.backbone, {
            "arch": cfg.arch, "cifar_stem": cifar_stem, "image_size": size, "mean_std": mean_std,
            "method": "smog", "dataset": cfg.dataset, "epochs": cfg.epochs})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def check_config(cfg):
    """SMoG's own flags: one clear message for a bad value."""
    if cfg.num_groups < 1:
        raise common.UserError(f"--num-groups must be at least 1, got {cfg.num_groups}.")
    if not 0.0 <= cfg.beta_end <= 1.0:
        raise common.UserError(f"--beta-end must lie in [0, 1], got {cfg.beta_end}.")
    if cfg.tau <= 0:
        raise common.UserError(f"--tau must be positive, got {cfg.tau}.")
    if cfg.reset_every < 0:
        raise common.UserError(f"--reset-every must be 0 (never) or positive, got {cfg.reset_every}.")
    if not 0.0 < cfg.crop_min_scale <= 1.0:
        raise common.UserError(f"--crop-min-scale must lie in (0, 1], got {cfg.crop_min_scale}.")
    if cfg.kmeans_iters < 0:
        raise common.UserError(f"--kmeans-iters must be 0 or positive, got {cfg.kmeans_iters}.")


def save_checkpoint(accelerator, out, epoch):
    """checkpoint-<epoch>: Accelerate state (online, optimiser, f^_eta, groups, cache, RNG) + progress; keeps the
    newest."""
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
