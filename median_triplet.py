"""Median triplet: self-supervised learning with a median (rank-k) triplet loss.

G. Wang, K. Wang, G. Wang, P. H. S. Torr, L. Lin. "Solving Inefficiency of Self-supervised Representation Learning",
ICCV 2021, https://arxiv.org/abs/2104.08760. Evidence, logged metrics and runs: docs/median_triplet.md.

A BYOL network (online backbone -> projector -> predictor; EMA target) trained with Eq. (2): each online prediction
is pulled towards the target projection of its other view and pushed away from ONE negative, the rank-k closest target
projection among the other images of the batch; k is the median, m // 2, by default (Sec. 3.2).

Run:    accelerate launch median_triplet.py --data-dir data           (CIFAR-10: --recipe small, the median k)
Smoke:  python median_triplet.py --dataset fake --epochs 2 --warmup-epochs 1 --batch-size 32 --num-workers 0
Paper:  accelerate launch --num_processes 8 median_triplet.py --dataset imagenet --data-dir DIR --recipe paper
        (Sec. 4: ResNet-50, LARS, 104 images x 8 GPUs, update interval 5, 200 epochs: PAPER); Tables 6 / 7:
        --margin 0.3 | 1.2, --rank-k 1 | 5; Eq. (1): --rank-k 1 --gamma 1; the released head: --negatives range.

Glossary (the paper's symbols; online / target are BYOL's):
    x, x+, x-  anchor (online prediction of one view), positive (target projection of the other view), negatives
               (target projections of the other images of the global batch).
    d(x, y)    -cos(x, y).   gamma: weight of d(x, x+), 2.   C: the margin, 100.   m: negatives per anchor, batch - 1.
    k          rank of the negative, distances sorted ascending, 1 = hardest; --rank-k 0 = the median m // 2.
    A, B, Omega  Table 5's events: every batch; a batch with two images of one class; a batch in which some anchor's
               rank-k negative has the anchor's own class (labels feed this monitor only).

Interpretations (the paper is silent or ambiguous) and deviations; each marked in the code, explained in the docs:
    Interpretation 1: Eq. (2)'s max(gamma d+ - d-, C) is read as the hinge max(gamma d+ - d- + C, 0).
    Interpretation 2: no gradient reaches the target branch (BYOL's stop-gradient).
    Interpretation 3: Sec. 3.3's Pr is implemented as printed; the paper's printed values do not follow from it.
    Interpretation 4: the median is k = m // 2; the loss sums both directions (view 1 -> 2 and 2 -> 1).
    Interpretation 5: augmentation parameters are BYOL's; the released code's random batch resolution is not used.
    Interpretation 6: Table 5 is counted per global batch over each epoch, both directions' anchors.
    Interpretation 7: target momentum 0.99 ramped to 1 on a cosine, once per optimiser update (as released).
    Interpretation 8: heads are BYOL's (projector 4096 -> 256, predictor on the online branch), as released.
    Interpretation 9: --negatives range is the released head (mean distance of ranks 2..10); Table 5 counts any.
    Interpretation 10: --recipe paper: lr "starts from 4.8" after 10 warm-up epochs (OpenSelfSup [49], as released).
    Deviation 1: no Gaussian blur for images <= 64 px (--blur auto; Sec. 4 lists blur); --blur on restores BYOL's.
    Deviation 2: negatives span the global batch (the paper: each GPU's batch), so no result depends on the GPU count.
"""
import copy
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
    # Median triplet's own fields (the generic ones are common.BaseConfig's small protocol; the paper's: PAPER).
    # --batch-size is the global batch: m = batch_size - 1 negatives per anchor (Deviation 2)
    proj_hidden: int = 4096  # projector and predictor hidden width (BYOL's, as released; Interpretation 8)
    proj_dim: int = 256  # embedding width (Interpretation 8)
    ema_momentum: float = 0.99  # base target momentum, ramped to 1 on a cosine (Interpretation 7)
    negatives: Literal["rank", "range"] = "rank"  # rank: Eq. (2); range: mean over ranks --range-first..last (released)
    rank_k: int = 0  # k of Eq. (2), 1 = hardest; 0 = the median m // 2, the paper's default (Sec. 3.2)
    range_first: int = 2  # --negatives range: first rank averaged (the released head: 2)
    range_last: int = 10  # --negatives range: last rank averaged (the released head: 10)
    gamma: float = 2.0  # weight of the positive distance in Eq. (2) (Sec. 3.2)
    margin: float = 100.0  # C of Eq. (2) (Table 6: 0.3, 1.2, 100)
    crop_min_scale: float = 0.08  # lower bound of the random resized crop (BYOL's; Interpretation 5)
    blur: Literal["auto", "on", "off"] = "auto"  # BYOL's Gaussian blur; auto: off for <= 64 px (Deviation 1)


# --recipe paper: Sec. 4's protocol behind Table 1 (each value cited); --recipe small is the defaults above
PAPER = {
    "arch": "resnet50",  # Sec. 4: "The backbone is ResNet-50"
    "optimizer": "lars", "momentum": 0.9,  # Sec. 4: "The optimizer is LARS [17] with a momentum 0.9"
    "batch_size": 832,  # Sec. 4: "104 images per GPU, and we use eight GPUs" (global; m = 831, Deviation 2)
    "accumulate": 5,  # Sec. 4: "The gradient update interval is five steps"
    "lr": 4.8 * 256 / (832 * 5),  # Sec. 4: "starts from 4.8", for 4160 images per update (x 4160 / 256 in schedules)
    "warmup_epochs": 10,  # Interpretation 10: OpenSelfSup [49]'s BYOL config and the released ones, warmup_iters=10
    "weight_decay": 1e-6, "epochs": 200,  # Sec. 4: "The weight decay factor is 1e-6", "The maximum epoch is 200"
    "blur": "on",  # Sec. 4: "Gaussian blurring" (BYOL's p 1.0 / 0.1, Interpretation 5) at every size
}


# ----------------------------------------------------------------------------- Augmentations

def view_specs(cfg, size):
    """[view 1, view 2]: BYOL's asymmetric pair (Sec. 4 names the operations; Interpretation 5). Both: crop
    (--crop-min-scale, 1), flip, colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale p 0.2; Gaussian blur
    (sigma 0.1-2, kernel about 10 % of the side) p 1.0 / 0.1 and solarisation p 0 / 0.2 for views 1 / 2."""
    # Deviation 1: no blur for images <= 64 px unless --blur on (CIFAR recipes of this family drop it)
    blur = cfg.blur == "on" or (cfg.blur == "auto" and size > 64)
    byol = dict(crop_scale=(cfg.crop_min_scale, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2)
    return [ViewSpec(**byol, blur_p=1.0 if blur else 0.0, solarize_p=0.0),
            ViewSpec(**byol, blur_p=0.1 if blur else 0.0, solarize_p=0.2)]


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
    """backbone -> projector -> predictor (BYOL; Interpretation 8); the target copies backbone and projector."""

    def __init__(self, cfg, cifar_stem):
        super().__init__()
        self.backbone, feat_dim = build_backbone(cfg.arch, cifar_stem)
        self.projector = mlp(feat_dim, cfg.proj_hidden, cfg.proj_dim)
        self.predictor = mlp(cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim)

    def forward(self, x):
        return self.predictor(self.projector(self.backbone(x)))


# ----------------------------------------------------------------------------- Loss

def _ranked_distances(p, z, k, pos_offset, k_range):
    """-> d(x, x+) (B,), d(x, x-) (B,) and the rows of z used as negatives (B, R); the arguments of triplet_loss."""
    b, n = p.shape[0], z.shape[0]
    m = n - 1  # negatives per anchor
    k = max(m // 2, 1) if k is None else k
    first, last = k_range or (k, k)
    assert (p.dim() == z.dim() == 2 and p.shape[1] == z.shape[1] and 0 <= pos_offset <= n - b
            and 1 <= first <= last <= m), f"p {tuple(p.shape)}, z {tuple(z.shape)}, offset {pos_offset}: need " \
        f"(B, D), (N, D), 0 <= offset <= N - B and ranks 1 <= {first} <= {last} <= m = {m}"
    # Interpretation 2: the target branch is a constant; float32 even under autocast
    p_hat = F.normalize(p.float(), dim=1)  # (B, D)
    z_hat = F.normalize(z.detach().float(), dim=1)  # (N, D)
    dist = -(p_hat @ z_hat.T)  # (B, N), d(x, y) = -cos(x, y)
    pos_idx = torch.arange(b, device=p.device) + pos_offset  # (B,)
    d_pos = dist.gather(1, pos_idx[:, None]).squeeze(1)  # (B,)
    # the positive moves past every negative (d <= 1 < inf): ranks 1..m are the negatives
    neg_dist = dist.scatter(1, pos_idx[:, None], float("inf"))  # (B, N)
    nearest, nearest_idx = neg_dist.topk(last, dim=1, largest=False)  # (B, last), ascending
    return d_pos, nearest[:, first - 1:].mean(dim=1), nearest_idx[:, first - 1:]  # (B,), (B,), (B, R)


def triplet_loss(p, z, k=None, gamma=2.0, margin=100.0, *, pos_offset=0, k_range=None):
    """Median (rank-k) triplet loss, Eq. (2), averaged over the anchors (rows of p).

    p (B, D) online predictions (anchors); z (N, D) target projections, N >= B: the positive of p[i] is
    z[pos_offset + i], every other row a negative (m = N - 1). Multi-process: z is the gathered global batch and
    pos_offset = process_index * B (local anchors, global negatives). d(x, y) = -cos(x, y); of the m negative distances
    sorted ascending, the k-th (1-based) is used: k = None is the median m // 2 (1 when m = 1), k = 1 the hardest;
    k_range = (first, last): the mean of ranks first..last instead, k ignored (the released head: (2, 10))."""
    d_pos, d_neg, _ = _ranked_distances(p, z, k, pos_offset, k_range)
    # Eq. (2) (Interpretation 1): max(gamma * d(x, x+) - d(x, x-_rank-k) + C, 0)
    return F.relu(gamma * d_pos - d_neg + margin).mean()


@torch.no_grad()
def negative_index(p, z, k=None, *, pos_offset=0, k_range=None):
    """(B, R): the rows of z that triplet_loss uses as each anchor's negative (R = 1 but for a k_range; Table 5)."""
    return _ranked_distances(p, z, k, pos_offset, k_range)[2]


def over_clustering_probability(m, k, p):
    """Sec. 3.3: Pr(at least k of m negatives share the anchor's class), class probability p: the binomial upper tail,
    in log space to stay accurate far below float64's normal range (the paper's m = 104, k = 52, p = 1e-3: ~1e-126).
    Interpretation 3: the paper's printed 6.53e-121 (k = 52) and 3.03e-94 (k = 5) do not follow from this formula."""
    assert m >= 0 and 0 <= k <= m + 1 and 0.0 <= p <= 1.0, f"need m >= 0, 0 <= k <= m + 1, 0 <= p <= 1: {m}, {k}, {p}"
    if k == 0:
        return 1.0
    if k > m or p == 0.0:
        return 0.0
    if p == 1.0:
        return 1.0
    # Sec. 3.3: Pr = sum_{j=k}^{m} C_m^j p^j (1-p)^(m-j)
    logs = [math.lgamma(m + 1) - math.lgamma(j + 1) - math.lgamma(m - j + 1) + j * math.log(p)
            + (m - j) * math.log1p(-p) for j in range(k, m + 1)]
    top = max(logs)
    return math.exp(top) * math.fsum(math.exp(t - top) for t in logs)


@torch.no_grad()
def overclustering_events(neg_idx, anchor_labels, all_labels):
    """Table 5. neg_idx (B, R): each anchor's negative rows of z (negative_index; R > 1: the released head);
    anchor_labels (B,); all_labels (N,): labels of z's rows, -1 (unlabelled, STL-10) never counted. -> omega_i (B,)
    bool: the rank-k negative has the anchor's label (Interpretation 9: any of the R); event_b, 0-dim bool: the batch
    holds two labelled images of one class (event B). A batch has event Omega if any omega_i. No host sync."""
    same = all_labels[neg_idx] == anchor_labels[:, None]  # (B, R)
    omega_i = same.any(dim=1) & (anchor_labels >= 0)  # (B,)
    s = all_labels.sort().values  # equal labels side by side
    return omega_i, ((s[1:] == s[:-1]) & (s[1:] >= 0)).any()


# ----------------------------------------------------------------------------- Momentum, schedules

class MomentumState(nn.Module):
    """What is not trained by the optimiser: the EMA target (backbone + projector). Identical on every process (it
    follows the synchronised online network); registered with Accelerate so that checkpoints hold it."""

    def __init__(self, online):
        super().__init__()
        self.target = copy.deepcopy(nn.Sequential(online.backbone, online.projector)).requires_grad_(False)


@torch.no_grad()
def ema_update(target, online, m):
    """BYOL's mean teacher, fused over all parameters: theta_target <- m * theta_target + (1 - m) * theta_online.
    BN running statistics are copied (the target runs in train mode: they matter only to whoever evaluates it)."""
    torch._foreach_lerp_(list(target.parameters()), [p.detach() for p in online.parameters()], 1 - m)
    torch._foreach_copy_(list(target.buffers()), list(online.buffers()))


def target_momentum(step, total_steps, base):
    """BYOL's schedule (Interpretation 7): tau = 1 - (1 - base) * (cos(pi * step / total) + 1) / 2, ending at 1."""
    return 1 - (1 - base) * (math.cos(math.pi * step / max(1, total_steps)) + 1) / 2


def lr_at(step, total_steps, warmup_steps, base_lr):
    """Linear warm-up to base_lr, then cosine decay to 0 (Sec. 4: "cosine annealing"; Interpretation 10)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1 + math.cos(math.pi * t))


# ----------------------------------------------------------------------------- Training

def check_config(cfg, num_processes):
    """Every flag's domain, checked before anything runs: one `error:` line and exit code 2 for a bad value."""
    common.check_base_config(cfg, num_processes)
    require, m = common.require, cfg.batch_size - 1  # m: negatives per anchor over the global batch (Deviation 2)
    require(m >= 1, f"--batch-size {cfg.batch_size}: the triplet loss needs at least 2 images per batch.")
    for name in ("proj_hidden", "proj_dim"):
        require(getattr(cfg, name) >= 1, f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}.")
    require(0 <= cfg.ema_momentum <= 1, f"--ema-momentum must lie in [0, 1], got {cfg.ema_momentum}.")
    require(0 <= cfg.rank_k <= m, f"--rank-k {cfg.rank_k} must lie in [1, batch_size - 1 = {m}] (the number of "
            f"negatives), or be 0 for the median.")
    require(1 <= cfg.range_first <= cfg.range_last and (cfg.negatives == "rank" or cfg.range_last <= m),
            f"--range-first {cfg.range_first} and --range-last {cfg.range_last} must satisfy 1 <= first <= last "
            f"<= batch_size - 1 = {m} (the number of negatives).")
    require(cfg.gamma > 0, f"--gamma must be positive, got {cfg.gamma}.")
    require(cfg.margin >= 0, f"--margin must be 0 or more, got {cfg.margin}.")
    require(0 < cfg.crop_min_scale <= 1, f"--crop-min-scale must lie in (0, 1], got {cfg.crop_min_scale}.")


def forward_loss(online, state, views, labels, cfg, accelerator):
    """This process's share of the batch -> (loss, logs). Anchors: its online predictions; positives and negatives: the
    global batch's target projections (Deviation 2), row r = image r. logs: both directions' losses, the step's Table 5
    counts (0-dim device tensors, the same on every process), the gathered view-1 target projections (z_erank)."""
    x1, x2 = views
    p1, p2 = online(x1), online(x2)  # (B, D) each
    with torch.no_grad(), accelerator.autocast():
        z1, z2 = state.target(x1), state.target(x2)  # (B, D) each
    # Deviation 2: negatives from every process; accelerator.gather carries no gradient, the target needs none
    z1_all, z2_all, labels_all = accelerator.gather((z1.float().contiguous(), z2.float().contiguous(), labels))
    ranks = dict(k=cfg.rank_k or None, pos_offset=accelerator.process_index * len(p1),  # rank_k 0: the median
                 k_range=(cfg.range_first, cfg.range_last) if cfg.negatives == "range" else None)  # Interpretation 9
    # Interpretation 4: both directions, summed: online(view 1) vs target(view 2), online(view 2) vs target(view 1)
    loss_12 = triplet_loss(p1, z2_all, gamma=cfg.gamma, margin=cfg.margin, **ranks)
    loss_21 = triplet_loss(p2, z1_all, gamma=cfg.gamma, margin=cfg.margin, **ranks)
    # Table 5 (Interpretation 6): every process gets the whole batch's negatives and the same counts
    neg_all = accelerator.gather(torch.stack([negative_index(p1, z2_all, **ranks),
                                              negative_index(p2, z1_all, **ranks)], dim=1))  # (N, 2, R)
    omega, event_b = overclustering_events(neg_all.flatten(0, 1), labels_all.repeat_interleave(2), labels_all)  # (2N,)
    table5 = {"same_label": omega.sum(), "labelled": 2 * (labels_all >= 0).sum(), "omega": omega.any().long(),
              "event_b": event_b.long(), "batches": torch.ones_like(event_b, dtype=torch.long)}
    return loss_12 + loss_21, {"loss_12": loss_12.detach(), "loss_21": loss_21.detach(), "table5": table5,
                               "target_z1": z1_all}


def train_step(online, state, optimizer, views, labels, cfg, sched, step, accelerator):
    """One batch, no host sync: Eq. (2) both ways against the target as it was before the step, backward (Accelerate
    divides the loss by --accumulate), then on the last batch of an --accumulate window only the optimiser step on the
    mean gradient of the window's batches and the target's EMA toward the updated online network (`step`: unused)."""
    for g in optimizer.param_groups:
        g["lr"] = sched["lr"]
    loss, logs = forward_loss(online, state, views, labels, cfg, accelerator)
    common.zero_grad(optimizer, accelerator)  # on the first batch of each --accumulate window
    accelerator.backward(loss)
    optimizer.step()
    # a step GradScaler skipped (fp16, inf gradients) must not move the target either
    if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
        raw = accelerator.unwrap_model(online)
        ema_update(state.target, nn.Sequential(raw.backbone, raw.projector), sched["ema_momentum"])
    return {"loss": loss.detach(), **logs}


def schedules(cfg, step, steps_per_epoch):
    """Optimiser update `step`'s lr (lr_at, x batch x accumulate / 256) and target momentum (Interpretation 7)."""
    total = cfg.epochs * steps_per_epoch
    base_lr = cfg.lr * cfg.batch_size * cfg.accumulate / 256
    return {"lr": lr_at(step, total, cfg.warmup_epochs * steps_per_epoch, base_lr),
            "ema_momentum": target_momentum(step, total, cfg.ema_momentum)}


def setup(cfg, data, accelerator):
    """The online network and its optimiser, prepared by Accelerate, and the momentum state (EMA target), registered
    for checkpointing -> (online, optimizer, state)."""
    online = Online(cfg, data.cifar_stem)
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        online = common.global_batchnorm(online)  # global BN, as the released SyncBN; target too
    optimizer = common.make_optimizer(cfg, online)  # --optimizer: sgd (small), lars (paper) or adam
    online, optimizer = accelerator.prepare(common.fast_model(online, cfg, accelerator), optimizer)
    state = MomentumState(accelerator.unwrap_model(online)).to(accelerator.device)
    accelerator.register_for_checkpointing(state)
    return online, optimizer, state


def epoch_diagnostics(table5, target_z1):
    """Table 5 over the epoch (Interpretation 6; the steps' counts summed, the same on every process) and the effective
    rank of the epoch's last target projections of view 1 (an SVD, whose error check syncs: once an epoch)."""
    c = dict(zip([*table5, "erank"], torch.stack([*table5.values(), common.effective_rank(target_z1)]).tolist()))
    return {"omega_given_a": c["omega"] / max(1, c["batches"]), "omega_given_b": c["omega"] / max(1, c["event_b"]),
            "rank_k_same_label": c["same_label"] / max(1, c["labelled"]), "z_erank": c["erank"]}


def train(cfg: Config):
    accelerator = common.make_accelerator(cfg)
    check_config(cfg, accelerator.num_processes)
    set_seed(cfg.seed)
    data = common.load_data(cfg, accelerator)
    loader = common.train_views(cfg, data, view_specs(cfg, data.size), accelerator)
    run = common.Run(cfg, "median_triplet", accelerator, data, steps_per_epoch=len(loader))
    online, optimizer, state = setup(cfg, data, accelerator)
    backbone = accelerator.unwrap_model(online).backbone

    start_epoch, done = run.resume()
    step = start_epoch * run.steps_per_epoch + done
    if step == 0 and cfg.eval_every:
        run.monitor(0, 0, backbone, lambda query: {})  # the random-init baseline
    for epoch in range(start_epoch, run.last_epoch):
        online.train()
        table5 = {}  # the epoch's Table 5 counts, summed on the device
        for views, labels, _ in run.epoch_batches(loader, epoch, done if epoch == start_epoch else 0):
            sched = schedules(cfg, step // cfg.accumulate, run.updates_per_epoch)  # per optimiser update
            with run.accumulate(step, online):
                logs = train_step(online, state, optimizer, views, labels, cfg, sched, step, accelerator)
            table5 = {k: table5.get(k, 0) + v for k, v in logs.pop("table5").items()}
            target_z1 = logs.pop("target_z1")
            step += 1
            if run.after_step(step, epoch, logs, **sched):
                break  # a signal or a non-finite loss: run.finish() checkpoints or raises
        # Table 5 every epoch, not only with kNN: epoch 1 stands for the paper's "epoch 0" column
        run.log(epoch=epoch + 1, step=step, **epoch_diagnostics(table5, target_z1))
        if run.end_epoch(epoch + 1, step, backbone, lambda query: {}):
            break
    return run.finish(backbone, {})


if __name__ == "__main__":
    common.run_main(train, Config, paper=PAPER)
