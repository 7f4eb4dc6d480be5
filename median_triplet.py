"""Median triplet: self-supervised learning with a median (rank-k) triplet loss.

G. Wang, K. Wang, G. Wang, P. H. S. Torr, L. Lin. "Solving Inefficiency of Self-supervised Representation
Learning", ICCV 2021, arXiv:2104.08760 (the version that names it "median triplet loss"; later arXiv versions call
the same loss "truncated triplet"). Text: ../shared/papers/median_triplet.md.

Run:    accelerate launch median_triplet.py --data-dir data            (CIFAR-10, downloaded into data/)
Smoke:  python median_triplet.py --dataset fake --epochs 2 --batch-size 32 --num-workers 0
Paper:  add --rank-k 0 (the median k = m // 2, the paper's default; this script defaults to k = 5, Deviation 3)
Ablations: --rank-k 1 | 5 | 0 (0 = median; Table 7), --margin 0.3 | 1.2 | 100 (Table 6), --gamma (Sec. 3.2).
           Eq. (1), the hardest triplet, is --rank-k 1 --gamma 1.

Reads with: Sec. 3.2 (Eq. 2, the rank-k triplet; `triplet_loss`), Sec. 3.3 (Bernoulli model;
`over_clustering_probability`), Sec. 4 "Other protocols" (optimisation, beside the CIFAR defaults below), Sec. 5
Table 5 (`overclustering_events`, logged per epoch as omega_given_a / omega_given_b / rank_k_same_label), Table 6
(--margin), Table 7 (--rank-k).

Glossary (x, x+, x-, d, m, k, gamma, C are the paper's; online/target are BYOL's, Interpretation 8):
    online    backbone -> projector -> predictor; gets the gradient; its output p is the anchor x of Eq. (2).
    target    EMA of the online backbone and projector, momentum ramped from --ema-momentum to 1 on a cosine (BYOL);
              its output z gives the positive x+ (the other view of the same image) and the negatives.
    d(x, y)   -cos(x, y) (Sec. 3.2).
    m         negatives per anchor: all other images of the GLOBAL batch, m = batch_size - 1 (255 by default). The
              paper's analysis uses m = 104 (its per-GPU batch, Sec. 3.3).
    k         rank of the negative used, 1-based over distances sorted ascending; k = 1 is the hardest negative.
              The paper's default is the median m // 2 (DESIGN.md's rule: the paper's k = 52 for m = 104; for
              m = 255 it is 127, one rank below the exact middle 128), `--rank-k 0`; this script's default is k = 5
              (Table 7's other good value, Deviation 3).
    gamma     weight of the positive distance (2); C the margin (100: the hinge never clips since |d| <= 1).
    A, B, Omega  Table 5's events: A every batch; B a batch holding two images of one class; Omega a batch in which
              some anchor's rank-k negative has the anchor's own label (labels used only for this monitor).

Deviations (each marked in the code):
    1. Optimisation: DESIGN.md's CIFAR defaults (SGD momentum 0.9, lr 0.06 x batch/256, weight decay 5e-4, global
       batch 256, 10 warm-up epochs then cosine, 200 epochs) instead of the paper's ImageNet protocol (LARS with
       momentum 0.9, lr 4.8 with cosine annealing, weight decay 1e-6, batch 104 per GPU x 8 GPUs, gradient update
       interval 5, i.e. accumulation, 200 epochs; Sec. 4). No gradient accumulation.
    2. Negatives span the global batch (target projections gathered from all processes, anchors local), so m and
       the result do not depend on the number of GPUs; the paper's m = 104 is a per-GPU batch (its official code
       uses the per-GPU batch only).
    3. Default rank k = 5 instead of the median (`--rank-k 0` restores the paper's default). Measured on the 2,000-image
       CIFAR-10 (JPEG copy) subset on CPU (README "Measured on CPU"; ResNet-18, batch 128 so m = 127, 100-epoch
       schedule stopped at epoch 15, seed 0): median k = 63 went 26.5 % (random init) -> 26.0 % kNN top-1 while the
       target projections' effective rank fell from 104 to 45; k = 5 went 26.5 % -> 30.7 % (32.8 % at epoch 25;
       seed 1: 25.3 % -> 27.4 % at 15, 31.4 % at 25; effective rank 83 at 15), k = 1 -> 30.5 % at 15. One
       reason: with C = 100 the hinge never clips, so the loss is linear in the two cosines, and a batch split into
       three far-apart groups already puts every anchor's median negative at cos -1/2 (fewer than half of the others
       share its group); pushing the rank-5 negative away instead needs groups of fewer than 5 images. The paper
       itself finds k = 5 nearly as good as the median (Table 7: 29.5 vs 30.0 % after 20 ImageNet epochs).

Interpretations (the paper is silent or ambiguous; each marked in the code):
    1. Eq. (2) prints max(gamma d+ - d-_k, C); it is read as the hinge max(gamma d(x, x+) - d(x, x-_k) + C, 0)
       (papers/README.md). The official code uses d = -2 cos (twice the gradient); this script follows the text.
    2. The target branch carries no gradient (BYOL's stop-gradient); triplet_loss detaches z itself.
    3. Sec. 3.3's Pr = sum_{j=k..m} C(m, j) p^j (1 - p)^(m - j) is implemented as written. The paper's printed values
       (6.53e-121 for m = 104, k = 52, p = 1/1000 and 3.03e-94 for k = 5) do not follow from that formula: exact
       rational arithmetic (fractions.Fraction, see the tests) gives 1.504e-126 and 8.469e-8.
    4. The median is k = m // 2 (DESIGN.md; the paper's "k = m/2 = 52" for m = 104); for odd m this is one rank
       below the middle one, which the official code's torch.median would pick. The symmetrised loss is the SUM of
       both directions (online view 1 vs target view 2, and the reverse), as the official code.
    5. Augmentations: Sec. 4 names the operations only; their parameters are BYOL's (random resized crop scale
       (0.08, 1) `--crop-min-scale`, colour jitter 0.4, 0.4, 0.2, 0.1 with p 0.8, grayscale p 0.2, Gaussian blur
       p 1.0 / 0.1, solarisation p 0 / 0.2 for views 1 / 2). "Randomly resizing" is read as the resize of the random
       resized crop; the official code also rescales each ImageNet batch to a random resolution (96-224 px online,
       128-224 px target), which has no counterpart at 32 px and is not reproduced.
    6. Table 5: the "batch" is one step's global batch, its anchors are both directions' anchors;
       Pr(Omega|A) = #batches with Omega / #batches, Pr(Omega|B) = #batches with Omega / #batches with B;
       rank_k_same_label is the per-anchor rate. Accumulated over each epoch (epoch 1 stands for "epoch 0"). With
       CIFAR-10's 10 classes (p = 1/10, not ImageNet's 1/1000) the per-batch events saturate near 1; the per-anchor
       rate (chance 1/10) is the informative figure there.
    7. Target momentum: the paper cites BYOL's mean teacher without values; base 0.99 (DESIGN.md, and the official
       code's value) ramped to 1 on a cosine over training.
    8. Network: the paper describes no heads. Its protocols follow BYOL and its official code is BYOL with the
       triplet head: online = backbone -> projector (4096 -> 256) -> predictor, target = EMA backbone -> projector;
       the anchor x is the online prediction, x+ and the negatives are target projections.

Results: no full-length run (no GPU in the sessions so far). On a 2,000-image CIFAR-10 (JPEG copy) subset on CPU
(README "Measured on CPU"; 100-epoch schedule stopped at epoch 25) the default k = 5 took kNN top-1 from 26.5 %
(random init) to 32.8 % (seed 1: 25.3 % -> 31.4 %); the paper's median went down instead (26.0 % at epoch 15 of the
same schedule, 20.9 % at epoch 25 of a 40-epoch one; C = 0.3: 26.2 % at 15). Full-length behaviour is open.
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
    # optimisation (Deviation 1; paper: LARS, lr 4.8, wd 1e-6, batch 104 x 8 GPUs, update interval 5)
    epochs: int = 200  # pretraining epochs (Sec. 4: 200)
    batch_size: int = 256  # GLOBAL batch size, split evenly over processes; m = batch_size - 1 negatives
    lr: float = 0.06  # base learning rate, scaled by batch_size / 256 (DESIGN.md; paper 4.8 with LARS)
    momentum: float = 0.9  # SGD momentum (paper: LARS momentum 0.9)
    weight_decay: float = 5e-4  # SGD weight decay (DESIGN.md; paper 1e-6)
    warmup_epochs: int = 10  # linear learning-rate warm-up, then cosine decay (paper: cosine annealing)
    # run
    seed: int = 0  # random seed (weights, views, shuffling)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"  # auto: what `accelerate launch` was told
    output_dir: str = ""  # default runs/median_triplet-<dataset>-<time>
    resume: bool = False  # continue from the latest checkpoint in --output-dir
    stop_after_epochs: int = 0  # end this invocation after this epoch (0: run to --epochs); continue with --resume
    log_every: int = 50  # steps between metric lines
    eval_every: int = 10  # epochs between kNN evaluations (also before training and at the end); 0: only at the end
    checkpoint_every: int = 10  # epochs between checkpoints (and at the end)
    knn_k: int = 200  # neighbours of the kNN monitor
    knn_t: float = 0.1  # temperature of the kNN monitor
    # median triplet
    proj_hidden: int = 4096  # projector and predictor hidden width (BYOL's, as the official code)
    proj_dim: int = 256  # embedding width
    ema_momentum: float = 0.99  # base target momentum, ramped to 1 on a cosine (Interpretation 7)
    rank_k: int = 5  # k of Eq. (2): rank of the negative, 1 = hardest; 0: the median m // 2 (paper; Deviation 3)
    gamma: float = 2.0  # weight of the positive distance in Eq. (2) (Sec. 3.2)
    margin: float = 100.0  # C of Eq. (2) (Table 6: 0.3, 1.2, 100)
    crop_min_scale: float = 0.08  # lower bound of the random resized crop (BYOL's; Interpretation 5)


# ----------------------------------------------------------------------------- Augmentations

def byol_view(size, mean_std, blur_p, solarize_p, crop_min_scale=0.08):
    """Sec. 4's views: crop, resize, flip, colour jitter, grayscale, Gaussian blur, solarisation (Interpretation 5:
    BYOL's parameters)."""
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


def mlp(in_dim, hidden, out_dim):
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))


class Online(nn.Module):
    """backbone -> projector -> predictor (BYOL); the target copies backbone and projector."""

    def __init__(self, cfg, cifar_stem):
        super().__init__()
        self.backbone, feat_dim = build_backbone(cfg.arch, cifar_stem)
        self.projector = mlp(feat_dim, cfg.proj_hidden, cfg.proj_dim)
        self.predictor = mlp(cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim)

    def forward(self, x):
        return self.predictor(self.projector(self.backbone(x)))


# ----------------------------------------------------------------------------- Loss

def triplet_loss(
    p: torch.Tensor,
    z: torch.Tensor,
    k: int | None = None,
    gamma: float = 2.0,
    margin: float = 100.0,
    *,
    pos_offset: int = 0,
    return_index: bool = False,
):
    """Median (rank-k) triplet loss, Eq. (2), averaged over the anchors (rows of p).

    p: (B, D) online predictions (anchors). z: (N, D) target projections, N >= B; the positive of p[i] is
    z[pos_offset + i] and every other row of z is a negative (m = N - 1). With pos_offset = 0 and N = B this is
    the DESIGN.md signature (row i of z is the positive of row i of p). Under multi-process training z is the
    gathered global batch and pos_offset = process_index * B, so anchors stay local and negatives are global.
    d(x, y) = -cos(x, y). The m negative distances are sorted ascending and the k-th (1-based) is used; k=None
    means the median k = m // 2 (1 when m = 1), k = 1 the hardest negative.
    loss_i = max(gamma * d(p_i, z_pos) - d(p_i, z_rank-k) + margin, 0).
    With return_index=True also returns the row of z chosen as the rank-k negative of each anchor, (B,) long.
    """
    if p.dim() != 2 or z.dim() != 2 or p.shape[1] != z.shape[1]:
        raise ValueError(f"triplet_loss expects p (B, D) and z (N, D); got {tuple(p.shape)} and {tuple(z.shape)}")
    b, n = p.shape[0], z.shape[0]
    if pos_offset < 0 or pos_offset + b > n:
        raise ValueError(f"positives z[{pos_offset}:{pos_offset + b}] do not fit in z with {n} rows")
    m = n - 1  # negatives per anchor
    if m < 1:
        raise ValueError("triplet_loss needs at least one negative (z must have 2 or more rows)")
    if k is None:
        k = max(m // 2, 1)
    if not 1 <= k <= m:
        raise ValueError(f"rank k must lie in [1, m] = [1, {m}]; got k={k}")

    # Interpretation 2: the target branch is a constant; float32 even under autocast.
    p_hat = F.normalize(p.float(), dim=1)  # (B, D)
    z_hat = F.normalize(z.detach().float(), dim=1)  # (N, D)
    dist = -(p_hat @ z_hat.T)  # (B, N), d(x, y) = -cos(x, y)
    pos_idx = torch.arange(b, device=p.device) + pos_offset  # (B,)
    d_pos = dist.gather(1, pos_idx[:, None]).squeeze(1)  # (B,)
    # The positive is pushed past every negative (d <= 1 < inf), so the k-th smallest (k <= m) is a negative.
    is_pos = F.one_hot(pos_idx, n).bool()  # (B, N)
    d_neg, neg_idx = dist.masked_fill(is_pos, float("inf")).kthvalue(k, dim=1)  # (B,), (B,)
    # Eq. (2) (Interpretation 1): max(gamma * d(x, x+) - d(x, x-_rank-k) + C, 0)
    loss = F.relu(gamma * d_pos - d_neg + margin).mean()
    if return_index:
        return loss, neg_idx
    return loss


def over_clustering_probability(m: int, k: int, p: float) -> float:
    """Sec. 3.3: probability that at least k of m negatives share the anchor's class (class probability p).

    Pr = sum_{j=k..m} C(m, j) p^j (1 - p)^(m - j)   (binomial upper tail), summed in log space so that values far
    below float64's normal range (the paper's m = 104, k = 52, p = 1e-3 gives ~1e-126) stay accurate.
    Interpretation 3: the paper's printed 6.53e-121 (k = 52) and 3.03e-94 (k = 5) do not follow from this formula.
    """
    if m < 0 or not 0 <= k <= m + 1:
        raise ValueError(f"need m >= 0 and 0 <= k <= m + 1; got m={m}, k={k}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a probability; got {p}")
    if k == 0:
        return 1.0
    if k > m or p == 0.0:
        return 0.0
    if p == 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    # Sec. 3.3: Pr = sum_{j=k}^{m} C_m^j p^j (1-p)^(m-j)
    logs = [math.lgamma(m + 1) - math.lgamma(j + 1) - math.lgamma(m - j + 1) + j * log_p + (m - j) * log_q
            for j in range(k, m + 1)]
    top = max(logs)
    return math.exp(top) * math.fsum(math.exp(t - top) for t in logs)


@torch.no_grad()
def overclustering_events(
    neg_idx: torch.Tensor, anchor_labels: torch.Tensor, all_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Table 5 diagnostic (labels used for monitoring only, never for training).

    neg_idx: (B,) row of the batch chosen as each anchor's rank-k negative (from triplet_loss(return_index=True));
    anchor_labels: (B,) labels of the anchors; all_labels: (N,) labels of the rows of z.
    Returns (omega_i, event_b): omega_i (B,) bool, True where the rank-k negative has the anchor's own label
    (the per-anchor event); event_b, a bool scalar, True when the batch holds two or more images of one class
    (event B). A batch has event Omega when omega_i is True for any of its anchors.
    """
    omega_i = all_labels[neg_idx] == anchor_labels  # (B,)
    event_b = torch.as_tensor(all_labels.unique().numel() < all_labels.numel(), device=all_labels.device)
    return omega_i, event_b


# ----------------------------------------------------------------------------- Momentum, schedules

class MomentumState(nn.Module):
    """What is not trained by the optimiser: the EMA target (backbone + projector).

    Identical on every process: it is updated from the synchronised online network. Registered with Accelerate so
    that checkpoints hold it.
    """

    def __init__(self, online):
        super().__init__()
        self.target = copy.deepcopy(nn.Sequential(online.backbone, online.projector))
        self.target.requires_grad_(False)


@torch.no_grad()
def ema_update(target, online, m):
    """theta_target <- m * theta_target + (1 - m) * theta_online; BN running statistics are copied."""
    for p_t, p_o in zip(target.parameters(), online.parameters()):
        p_t.mul_(m).add_(p_o.detach(), alpha=1 - m)
    for b_t, b_o in zip(target.buffers(), online.buffers()):
        b_t.copy_(b_o)


def target_momentum(step, total_steps, base):
    """BYOL's schedule (Interpretation 7): tau = 1 - (1 - base) * (cos(pi * step / total) + 1) / 2, ending at 1."""
    return 1 - (1 - base) * (math.cos(math.pi * step / max(1, total_steps)) + 1) / 2


def lr_at(step, total_steps, warmup_steps, base_lr):
    """Linear warm-up to base_lr, then cosine decay to 0 (Deviation 1)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1 + math.cos(math.pi * t))


# ----------------------------------------------------------------------------- Training

def forward_loss(online, state, views, labels, cfg, accelerator):
    """One step's loss on this process's share of the batch -> (loss, logs).

    Anchors are this process's online predictions; positives and negatives are the target projections of the whole
    global batch (Deviation 2), gathered without gradient; row r of the gathered batch is image r of the batch.
    """
    x1, x2 = views
    p1, p2 = online(x1), online(x2)  # (B, D) each
    with torch.no_grad(), accelerator.autocast():
        z1, z2 = state.target(x1), state.target(x2)  # (B, D) each
    # Deviation 2: negatives from every process; accelerator.gather carries no gradient, the target needs none
    z1_all, z2_all, labels_all = accelerator.gather((z1.float().contiguous(), z2.float().contiguous(), labels))
    offset = accelerator.process_index * len(p1)  # rows of this process's images in the global batch
    k = cfg.rank_k or None  # None: the median m // 2; Deviation 3: the default is k = 5
    loss_12, neg_12 = triplet_loss(p1, z2_all, k, cfg.gamma, cfg.margin, pos_offset=offset, return_index=True)
    loss_21, neg_21 = triplet_loss(p2, z1_all, k, cfg.gamma, cfg.margin, pos_offset=offset, return_index=True)
    loss = loss_12 + loss_21  # Interpretation 4: symmetrised by summing both directions
    with torch.no_grad():
        # Table 5 (Interpretation 6): every process gets the whole batch's rank-k choices and computes the same counts
        neg_all = accelerator.gather(torch.stack([neg_12, neg_21], dim=1)).T  # (2, N) rows of the global batch
        omega_12, event_b = overclustering_events(neg_all[0], labels_all, labels_all)
        omega_21, _ = overclustering_events(neg_all[1], labels_all, labels_all)
        omega = torch.cat([omega_12, omega_21])
        # counts: anchors whose rank-k negative shares their label, anchors, batches with Omega, with B, batches
        table5 = torch.stack([omega.sum(), torch.tensor(omega.numel(), device=omega.device),
                              omega.any().long(), event_b.long(), torch.ones((), dtype=torch.long, device=omega.device)])
        z_erank = common.effective_rank(z1_all)  # dimensional collapse monitor (the same on every process)
    return loss, {"loss_12": loss_12.detach(), "loss_21": loss_21.detach(), "table5": table5, "z_erank": z_erank}


def train(cfg: Config):
    accelerator = Accelerator(mixed_precision=None if cfg.mixed_precision == "auto" else cfg.mixed_precision,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    set_seed(cfg.seed)
    with accelerator.main_process_first():  # one process downloads, the others then find the files
        pretrain, memory, query, num_classes, size, mean_std = common.get_datasets(
            cfg.dataset, cfg.data_dir, cfg.fake_size)
    cifar_stem = cfg.stem == "cifar" or (cfg.stem == "auto" and size <= 64)
    if cfg.batch_size < 2:
        raise common.UserError(f"--batch-size {cfg.batch_size}: the triplet loss needs at least 2 images per batch.")
    if not 0 <= cfg.rank_k <= cfg.batch_size - 1:
        raise common.UserError(f"--rank-k {cfg.rank_k} must lie in [1, batch_size - 1 = {cfg.batch_size - 1}] "
                               f"(the number of negatives), or be 0 for the median.")
    if not 0.0 < cfg.crop_min_scale <= 1.0:
        raise common.UserError(f"--crop-min-scale must lie in (0, 1], got {cfg.crop_min_scale}.")

    run = [cfg.output_dir or os.path.join("runs", f"median_triplet-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")]
    broadcast_object_list(run)  # one name on every process
    out = run[0]
    if accelerator.is_main_process:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
    logger = common.MetricLogger(os.path.join(out, "metrics.jsonl"), accelerator.is_main_process)

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
        online = nn.SyncBatchNorm.convert_sync_batchnorm(online)  # global BN, as the official code's SyncBN
    base_lr = cfg.lr * cfg.batch_size / 256
    # Deviation 1: SGD at CIFAR scale instead of LARS
    optimizer = torch.optim.SGD(online.parameters(), lr=base_lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    online, optimizer, loader, memory_loader, query_loader = accelerator.prepare(
        online, optimizer, loader, memory_loader, query_loader)
    raw = accelerator.unwrap_model(online)
    state = MomentumState(raw).to(accelerator.device)
    accelerator.register_for_checkpointing(state)
    online_ema_view = nn.Sequential(raw.backbone, raw.projector)  # the modules the target averages

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

    def monitor(epoch, step, diag):
        knn = common.knn_accuracy(raw.backbone, memory_loader, query_loader, num_classes, accelerator,
                                  cfg.knn_k, cfg.knn_t)
        logger.log(epoch=epoch, step=step, knn_top1=knn, **diag)
        accelerator.print(f"epoch {epoch}: kNN top-1 {knn:.2f}%")

    last_epoch = min(cfg.epochs, cfg.stop_after_epochs or cfg.epochs)
    step = start_epoch * steps_per_epoch
    if start_epoch == 0 and cfg.eval_every:
        monitor(0, 0, {})  # the random-init baseline
    for epoch in range(start_epoch, last_epoch):
        online.train()
        loader.set_epoch(epoch)
        train_set.set_epoch(epoch)
        table5 = torch.zeros(5, device=accelerator.device, dtype=torch.long)
        erank_sum, tic, seen = torch.zeros((), device=accelerator.device), time.time(), 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not accelerator.is_local_main_process)
        for (x_views, labels, _) in bar:
            lr = lr_at(step, total_steps, warmup_steps, base_lr)
            for g in optimizer.param_groups:
                g["lr"] = lr
            tau = target_momentum(step, total_steps, cfg.ema_momentum)
            loss, logs = forward_loss(online, state, x_views, labels, cfg, accelerator)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            if accelerator.sync_gradients:
                ema_update(state.target, online_ema_view, tau)
            table5 += logs["table5"]
            erank_sum += logs["z_erank"]
            step += 1
            seen += cfg.batch_size
            if step % cfg.log_every == 0 or step == total_steps:
                l12, l21, l = (accelerator.reduce(t, "mean").item() for t in (logs["loss_12"], logs["loss_21"], loss.detach()))
                logger.log(step=step, epoch=epoch + 1, loss=l, loss_12=l12, loss_21=l21, lr=lr,
                           ema_momentum=tau, images_per_s=seen / (time.time() - tic))
                bar.set_postfix(loss=f"{l:.3f}", lr=f"{lr:.3g}")

        epoch_done = epoch + 1
        # Table 5 every epoch (same counts on every process): epoch 1 stands for the paper's "epoch 0" column
        hits, anchors, n_omega, n_b, n_batches = table5.tolist()
        diag = {"omega_given_a": n_omega / max(1, n_batches), "omega_given_b": n_omega / max(1, n_b),
                "rank_k_same_label": hits / max(1, anchors),
                "z_erank": erank_sum.item() / max(1, n_batches)}  # mean effective rank of the batch's target projections
        if (cfg.eval_every and epoch_done % cfg.eval_every == 0) or epoch_done == cfg.epochs:
            monitor(epoch_done, step, diag)
        else:
            logger.log(epoch=epoch_done, step=step, **diag)
        if epoch_done % cfg.checkpoint_every == 0 or epoch_done in (cfg.epochs, last_epoch):
            save_checkpoint(accelerator, out, epoch_done)

    if last_epoch == cfg.epochs and accelerator.is_main_process:
        common.save_backbone(os.path.join(out, "backbone.pt"), raw.backbone, {
            "arch": cfg.arch, "cifar_stem": cifar_stem, "image_size": size, "mean_std": mean_std,
            "method": "median_triplet", "dataset": cfg.dataset, "epochs": cfg.epochs})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def save_checkpoint(accelerator, out, epoch):
    """checkpoint-<epoch>: Accelerate state (online network, optimiser, target, RNG) + progress; keeps the newest."""
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
