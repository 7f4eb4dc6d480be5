"""SMoG. B. Pang, Y. Zhang, Y. Li, J. Cai, C. Lu. "Unsupervised Visual Representation Learning by Synchronous
Momentum Grouping", ECCV 2022, https://arxiv.org/abs/2207.06167. Full page: docs/smog.md.

Contrastive learning between groups instead of instances: each online feature is contrasted (Eq. 3) with the group
that the momentum network's view of the same image falls into, against all groups; the groups are momentum averages
of the online features (Eq. 4), updated every iteration and carrying gradient; k-means and encoder resets (Sec. 3.2).

Run:    accelerate launch smog.py --data-dir data        (CIFAR-10: the small protocol, ReSSL Sec. 4's SGD recipe)
Smoke:  python smog.py --dataset fake --epochs 2 --warmup-epochs 1 --batch-size 32 --num-workers 0 --reset-every 4
Paper:  accelerate launch --num_processes 8 smog.py --dataset imagenet --data-dir DIR --recipe paper   (Table 1; PAPER)

Glossary (the paper's names):
    f_theta   online network: backbone -> projection head (z) -> prediction head (p); gets the gradient.
    f^_eta    momentum network: backbone -> projection head, EMA of f_theta with ratio alpha (0.999).
    x^a, x^b  the two views; x^a through f_theta, x^b through f^_eta; BYOL's two schemes swap every iteration.
    g_k, G    group features, l = --num-groups (3000) unit vectors; c_i = the group that instance i is assigned to.
    beta      momentum ratio of the groups (Eq. 4), linear 1.0 -> 0.99 over training (Table 7a).
    tau       temperature of Eq. (3), 0.1.

Interpretations and deviations (marked in the code; each explained once in docs/smog.md):
    I2  Eq. (4)'s "argmin sim" is the most similar group (argmax cosine).
    I3  assign with the previous groups, update them, contrast with the updated groups; features L2-normalised.
    I4  initial groups: spherical k-means on the first global batch's online projections.
    I5  one loss direction per iteration; the two BYOL schemes alternate between the streams.
    I6  reset every 300 optimiser updates: spherical k-means (10 Lloyd steps) of cached projections; f^_eta <- f_theta.
    I7  Table 7d's latest / random / average rules.  I9  BatchNorm over the global batch.  I10  diagnostics.
    I11 multi-crop: the 4 small views through f_theta only; Eq. (3) averaged over the online views against c^b.
    I12 --accumulate: the groups move once per optimiser update, with every batch of the window (Eq. 4).
    D1  prediction head on the online branch, not on f^_eta as Sec. 3.4 prints (the released code's placement).
    D2  Table 7d's "average" rule as the exact running average (`--group-update average-paper`: the printed 1/n).
    D3  --recipe small: BYOL's Gaussian blur off for images of 64 px or less (`--blur`).
"""
import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from accelerate.utils import broadcast, set_seed

import common
from common import ViewSpec


# ----------------------------------------------------------------------------- Config

@dataclass
class Config(common.BaseConfig):
    # SMoG's own values (Sec. 3.4); the generic fields (common.BaseConfig) hold the small protocol
    proj_hidden: int = 2048  # hidden width of the projection and prediction heads (Sec. 3.4)
    proj_dim: int = 128  # output width of the heads for CNNs (Sec. 3.4)
    ema_momentum: float = 0.999  # alpha of the momentum network (Sec. 3.4)
    num_groups: int = 3000  # l, number of groups (Sec. 3.4 "3k"; Table 7c)
    tau: float = 0.1  # temperature of Eq. (3) (Sec. 3.4)
    beta_schedule: Literal["linear", "fixed"] = "linear"  # beta of Eq. (4): 1.0 -> --beta-end, or fixed (Table 7a)
    beta_end: float = 0.99  # final beta (Table 7a)
    group_update: Literal["momentum", "average", "average-paper", "latest", "random"] = "momentum"  # rule (Table 7d)
    group_init: Literal["kmeans", "random"] = "kmeans"  # initial groups (Sec. 3.2; Interpretation 4)
    reset_every: int = 300  # iterations between periodic resets (Sec. 3.4, Table 7b); 0: never
    kmeans_reset: bool = True  # relocate the groups by k-means at each reset (--no-kmeans-reset: Table 7b)
    encoder_reset: bool = True  # reset f^_eta to f_theta at each reset (--no-encoder-reset: Table 7b)
    kmeans_iters: int = 10  # Lloyd iterations of the spherical k-means (Interpretation 6)
    detach_groups: bool = False  # no gradient through the groups in Eq. (3), as in the authors' released code
    crop_min_scale: float = 0.08  # lower bound of the random resized crop (BYOL's, Sec. 3.4)
    blur: Literal["auto", "on", "off"] = "auto"  # BYOL's Gaussian blur; auto: off for <= 64 px (Deviation 3)
    multi_crop: bool = False  # add 4 small views, side 96/224 of the run's, crop (0.05, 0.2) (Sec. 3.4; Interp. 11)


# --recipe paper: the paper's main ImageNet table (each value cited); --recipe small is the defaults above
PAPER = {
    "arch": "resnet50", "epochs": 400,  # Table 1: "ResNet50 is adopted"; row SMoG-dagger: 400 epochs, 76.4 % top-1
    "optimizer": "lars", "batch_size": 4096,  # Sec. 3.4: "LARS [69] optimizer with 4096 mini-batchsize on 64 GPUS"
    "lr": 0.3, "warmup_epochs": 10,  # Sec. 3.4: "lr = 0.3 x batchsize/256" (schedules() scales it), "10-epoch warm-up"
    "weight_decay": 1e-6,  # Sec. 3.4: "The weight decay and temperature tau are set to 10^-6 and 0.1"
    "multi_crop": True, "crop_min_scale": 0.2,  # Table 1's dagger; Sec. 3.4: "two large views (224x224)", "[0.2, 1.0]"
    "blur": "on",  # Sec. 3.4: BYOL's schemes, "one has a stronger Gaussian blur"
}
SMALL_VIEWS, SMALL_SCALE = 4, (0.05, 0.2)  # Sec. 3.4: "4 small views (96x96)", "[0.05, 0.2]"


# ----------------------------------------------------------------------------- Augmentations

def view_specs(cfg, size):
    """BYOL's two schemes (Sec. 3.4; forward_loss alternates them between the streams): the same crop, flip, jitter and
    grayscale; blur p 1.0 / 0.1 (kernel about 10 % of the side), solarisation p 0 / 0.2; --blur auto: none at <= 64 px
    (Deviation 3). --multi-crop: 4 small views, schemes 1, 2, 1, 2, side round(size * 96 / 224) (Interpretation 11)."""
    blur = cfg.blur == "on" or (cfg.blur == "auto" and size > 64)
    byol = dict(flip_p=0.5, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, blur_sigma=(0.1, 2.0))
    schemes = [dict(byol, blur_p=1.0 if blur else 0.0, solarize_p=0.0),
               dict(byol, blur_p=0.1 if blur else 0.0, solarize_p=0.2)]
    small = [ViewSpec(**schemes[i % 2], crop_scale=SMALL_SCALE, size=round(size * 96 / 224))
             for i in range(SMALL_VIEWS if cfg.multi_crop else 0)]
    return [ViewSpec(**scheme, crop_scale=(cfg.crop_min_scale, 1.0)) for scheme in schemes] + small


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
    """f_theta: backbone -> projection head -> prediction head. Returns (z, p), both (B, D)."""

    def __init__(self, cfg, cifar_stem):
        super().__init__()
        self.backbone, feat_dim = build_backbone(cfg.arch, cifar_stem)
        self.projector = mlp(feat_dim, cfg.proj_hidden, cfg.proj_dim, out_bn=True)
        self.predictor = mlp(cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim)  # Deviation 1: on the online branch

    def forward(self, x):
        z = self.projector(self.backbone(x))
        return z, self.predictor(z)


# ----------------------------------------------------------------------------- Loss

@torch.no_grad()
def assign_groups(z, groups):
    """Eq. (4), first line (Interpretation 2): c (B,), the index of each z (B, D) row's most cosine-similar group."""
    return (F.normalize(z.float(), dim=1) @ F.normalize(groups.float(), dim=1).T).argmax(dim=1)  # (B,)


def memberships(assign, num_groups):  # (B, K) one-hot; F.one_hot's range check reads values back off CUDA
    return (assign.unsqueeze(1) == torch.arange(num_groups, device=assign.device)).float()


def global_sum(x):  # over processes, with autograd: the backward sums the gradients of every process's loss
    return dist_nn.all_reduce(x) if common.world_size() > 1 else x


def group_counts(assign, num_groups):
    """(K,) float32 sizes of the groups in assign (B,), summed over processes: the global batch's group sizes."""
    return global_sum(memberships(assign, num_groups).sum(dim=0))  # (K,)


def update_groups(groups, z, assign, beta, counts=None, carry=None):
    """Eq. (4) -> new (K, D) float32 groups (no assigned row: unchanged). groups (K, D) are constants; z (B, D) online
    features get the gradient through the result (the "synchronous" grouping of Sec. 3.2); assign (B,) the group of each
    row; beta a float or (K,) tensor (Table 7d's other rules); counts: group_counts(assign, K) if known; carry: (K, D)
    detached sums of the --accumulate window's earlier batches (counts include them); sums are global (global_sum)."""
    groups = groups.detach().float()  # (K, D)
    counts = group_counts(assign, len(groups)) if counts is None else counts  # (K,)
    sums = global_sum(memberships(assign, len(groups)).T @ F.normalize(z.float(), dim=1))  # (K, D)
    mean = (sums if carry is None else sums + carry) / counts.clamp(min=1).unsqueeze(1)  # (K, D)
    beta = beta.unsqueeze(1) if isinstance(beta, torch.Tensor) else beta  # (K, 1); a float stays one (no H2D copy)
    # Eq. (4): g_k <- beta * g_k + (1 - beta) * mean_{c_t = g_k} f(x_t), then normalised (the paper omits it)
    updated = F.normalize(beta * groups + (1.0 - beta) * mean, dim=1)  # (K, D)
    return torch.where((counts > 0).unsqueeze(1), updated, groups)  # empty groups unchanged


def smog_loss(p, groups, target, tau=0.1):
    """Eq. (3): cross-entropy over all groups (K, D; the updated ones, with gradient unless detached) of the online
    predictions p (B, D) against target (B,), the momentum feature's group for the other view. Float32; batch mean."""
    # Eq. (3): L_i = -log exp(sim(p_i, c_i^b) / tau) / sum_j exp(sim(p_i, g_j) / tau)
    logits = F.normalize(p.float(), dim=1) @ F.normalize(groups.float(), dim=1).T / tau  # (B, K)
    return F.cross_entropy(logits, target)


# ----------------------------------------------------------------------------- Momentum, groups, schedules

class MomentumState(nn.Module):
    """Not trained by the optimiser: f^_eta, the groups, the last --reset-every iterations' projections (k-means cache),
    running group sizes ("average" rules), the --accumulate window's group sums and sizes (Interpretation 12). Equal on
    every process (synchronised online network, all-reduced sums, gathered cache, broadcast k-means); checkpointed."""

    def __init__(self, online, num_groups, dim, cache_size, num_classes):
        super().__init__()
        self.num_classes = num_classes  # for the group label-entropy diagnostic only
        self.target = copy.deepcopy(nn.Sequential(online.backbone, online.projector)).requires_grad_(False)
        self.register_buffer("groups", F.normalize(torch.randn(num_groups, dim), dim=1))  # (K, D)
        self.register_buffer("cache", torch.zeros(cache_size, dim))  # (reset_every * accumulate * global batch, D)
        self.register_buffer("seen", torch.zeros(num_groups))  # n_k of the "average" rules (Deviation 2)
        self.register_buffer("window_sums", torch.zeros(num_groups, dim))
        self.register_buffer("window_counts", torch.zeros(num_groups))


@torch.no_grad()
def ema_update(target, online, m):
    """Sec. 3.2: f^_eta <- alpha * f^_eta + (1 - alpha) * f_theta, fused over the parameters; BN statistics copied."""
    torch._foreach_lerp_(list(target.parameters()), [p.detach() for p in online.parameters()], 1 - m)
    torch._foreach_copy_(list(target.buffers()), list(online.buffers()))


def beta_schedule(step, total_steps, end=0.99, start=1.0, kind="linear"):
    """beta of Eq. (4) at a step: linear start -> end over training (Sec. 3.4: 1.0 -> 0.99), or `end` (Table 7a)."""
    last = max(total_steps - 1, 1)  # the step that reaches `end`
    return end if kind == "fixed" else start + (end - start) * (min(max(step, 0), last) / last)


@torch.no_grad()
def spherical_kmeans(x, k, iters=10, generator=None, chunk=8192):
    """Spherical k-means (cosine similarity, unit centroids) of x (N, D) -> centroids (k, D) and the (k,) counts of the
    last assignment. Starts from k distinct random rows; when N < k, all N rows plus k - N random unit vectors (a copy
    of a row could never win an argmax); an empty centroid keeps its previous value. `generator`: on x's device."""
    x = F.normalize(x.float(), dim=1)  # (N, D)
    n = len(x)
    centroids = x[torch.randperm(n, generator=generator, device=x.device)[:k]]  # (min(n, k), D)
    if n < k:
        extra = F.normalize(torch.randn(k - n, x.shape[1], generator=generator, device=x.device), dim=1)
        centroids = torch.cat([centroids, extra])  # (k, D)
    for it in range(iters + 1):
        assign = torch.cat([(xc @ centroids.T).argmax(dim=1) for xc in x.split(chunk)])  # (N,)
        counts = torch.zeros(k, device=x.device).index_add_(0, assign, torch.ones(n, device=x.device))  # (k,)
        if it == iters:
            return centroids, counts
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)  # (k, D)
        centroids = torch.where((counts > 0).unsqueeze(1), F.normalize(sums, dim=1), centroids)


def kmeans_groups(x, cfg, step):
    """Groups and their sizes by spherical k-means of x (Interpretations 4 and 6), seeded by (seed, step) and
    broadcast from process 0: the float atomics of a GPU k-means can differ in the last bits between processes."""
    g = common.generator(cfg.seed, "kmeans", step, device=x.device)
    return broadcast(spherical_kmeans(x, cfg.num_groups, cfg.kmeans_iters, generator=g), from_process=0)


def group_step(groups, z, assign, counts, rule, beta, seen, seed, carry=None):
    """This iteration's groups (K, D), with gradient to z, by Table 7d's rules (Interpretation 7); counts, carry as in
    update_groups. momentum: Eq. (4) with beta; latest: beta = 0; average: beta_k = 1 - m_k / n_k; average-paper:
    beta_k = 1 - 1 / n_k (n_k counts this batch too; Deviation 2); random: each group a random global-batch row."""
    if rule == "random":
        z_all = common.gather_with_grad(z)  # (N, D)
        g = torch.Generator(device=z.device).manual_seed(seed)  # on z's device, the same draw on every process
        n, k = len(z_all), len(groups)  # distinct rows; with replacement only when there are more groups than rows
        idx = (torch.randperm(n, generator=g, device=z.device)[:k] if n >= k
               else torch.randint(n, (k,), generator=g, device=z.device))
        return F.normalize(z_all[idx].float(), dim=1)
    if rule in ("average", "average-paper"):
        beta = 1.0 - (counts if rule == "average" else 1.0) / (seen + counts).clamp(min=1)  # running mean (Deviation 2)
    return update_groups(groups, z, assign, 0.0 if rule == "latest" else beta, counts, carry)


@torch.no_grad()
def write_cache(cache, z_all, step, reset_every):
    """Ring buffer of the last reset_every batches: batch `step` owns rows (step % reset_every) * N ..."""
    if len(cache):
        start = (step % reset_every) * len(z_all)
        cache[start:start + len(z_all)] = z_all.float()


@torch.no_grad()
def periodic_reset(state, online_ema_view, cfg, step):
    """"Avoiding Collapse" (Secs. 3.2, 3.4, Table 7b; Interpretation 6): groups <- k-means(cache), f^_eta <- f_theta."""
    if cfg.kmeans_reset:
        groups, counts = kmeans_groups(state.cache, cfg, step)
        state.groups.copy_(groups)
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

def check_config(cfg, num_processes):
    """Every flag's domain, checked before anything runs: one `error:` line and exit code 2 for a bad value."""
    common.check_base_config(cfg, num_processes)
    require = common.require
    for name in ("proj_hidden", "proj_dim", "num_groups"):
        require(getattr(cfg, name) >= 1, f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}.")
    for name in ("reset_every", "kmeans_iters"):
        require(getattr(cfg, name) >= 0, f"--{name.replace('_', '-')} must be 0 or more, got {getattr(cfg, name)}.")
    require(cfg.tau > 0, f"--tau must be positive, got {cfg.tau}.")
    require(0 <= cfg.ema_momentum <= 1, f"--ema-momentum must lie in [0, 1], got {cfg.ema_momentum}.")
    require(0 <= cfg.beta_end <= 1, f"--beta-end must lie in [0, 1], got {cfg.beta_end}.")
    require(0 < cfg.crop_min_scale <= 1, f"--crop-min-scale must lie in (0, 1], got {cfg.crop_min_scale}.")


def forward_loss(online, state, views, labels, cfg, beta, step, accelerator):
    """The loss of this process's share of the batch -> (loss, new groups (K, D) for train_step to store, the global
    batch's projections z_all (N, D), logs); stores step 0's k-means groups, --accumulate's window sums and sizes."""
    x_a, x_b = views[:2] if step % 2 == 0 else views[1::-1]  # Interpretation 5: schemes swap every batch (Sec. 3.4)
    z_a, p_a = online(x_a)  # (B, D) each: online projection f_theta(x^a) and prediction
    if len(views) > 2:  # Interpretation 11: the small views go through f_theta only, in one forward
        p_a = torch.cat([p_a, online(torch.cat(views[2:]))[1]])  # ((1 + S) B, D)
    with torch.no_grad(), accelerator.autocast():
        z_b = state.target(x_b)  # (B, D) momentum projection f^_eta(x^b)
    z_all = accelerator.gather(z_a.detach().float().contiguous())  # (N, D) no gradient: cache, init, diagnostics
    if cfg.group_init == "kmeans" and step == 0:  # Interpretation 4: k-means of the first global batch
        state.groups.copy_(kmeans_groups(z_all, cfg, step)[0])
    groups = state.groups  # Eq. (4), first line, with the groups before this batch (Interpretation 3)
    target = assign_groups(z_b, groups)  # (B,) c_i^b, from the momentum network
    assign = assign_groups(z_a, groups)  # (B,) c_i^a, the groups the online features update
    counts = group_counts(assign, cfg.num_groups)  # (K,) over the global batch
    carry = None
    if cfg.accumulate > 1:  # Interpretation 12: Eq. (4) over the whole window, earlier batches detached
        if step % cfg.accumulate:
            carry, counts = state.window_sums.clone(), counts + state.window_counts
        sums = global_sum(memberships(assign, cfg.num_groups).T @ F.normalize(z_a.detach().float(), dim=1))  # (K, D)
        state.window_sums.copy_(sums if carry is None else sums + carry)
        state.window_counts.copy_(counts)
    # Eq. (4), second line: synchronous update; gradient flows from the new groups to z_a (and to other processes)
    new_groups = group_step(groups, z_a, assign, counts, cfg.group_update, beta, state.seen,
                            common.seed_for(cfg.seed, "random-groups", step), carry)
    # Eq. (3) against the updated groups, for every online view (the mean over views); --detach-groups cuts the path
    loss = smog_loss(p_a, new_groups.detach() if cfg.detach_groups else new_groups,
                     target.repeat(len(p_a) // len(target)), cfg.tau)
    with torch.no_grad():  # Interpretation 10; STL-10's unlabelled images (label -1) are not counted
        class_counts = torch.zeros(cfg.num_groups * state.num_classes, device=z_a.device).index_add_(
            0, assign * state.num_classes + labels.clamp(min=0), (labels >= 0).float()).view(cfg.num_groups, -1)
        logs = {"groups_used_step": (counts > 0).sum().float(),
                "z_std": F.normalize(z_all, dim=1).std(dim=0).mean(),  # embedding spread (collapse: 0)
                "counts": counts, "class_counts": class_counts,  # (K,), (K, C)
                "same_group": (assign == target).sum(),  # this process's images whose two views share a group
                "images": torch.full((), len(assign), device=assign.device)}
    return loss, new_groups.detach(), z_all, logs


def train_step(online, state, optimizer, views, labels, cfg, sched, step, accelerator):
    """One optimiser step in the paper's order, no host sync: reset when due (Sec. 3.2), forward_loss (Eqs. 3-4), the
    step on f_theta, f^_eta's momentum update; the new groups and k-means cache stored unless fp16 skipped the step."""
    for g in optimizer.param_groups:
        g["lr"] = sched["lr"]
    raw = accelerator.unwrap_model(online)
    online_ema_view = nn.Sequential(raw.backbone, raw.projector)  # the layers f^_eta averages
    update, batch = divmod(step, cfg.accumulate)  # the paper's iterations are optimiser updates
    if cfg.reset_every and update > 0 and batch == 0 and update % cfg.reset_every == 0:
        periodic_reset(state, online_ema_view, cfg, step)
    loss, new_groups, z_all, logs = forward_loss(online, state, views, labels, cfg, sched["beta"], step, accelerator)
    common.zero_grad(optimizer, accelerator)  # on the first batch of each --accumulate window
    accelerator.backward(loss)
    optimizer.step()
    counts = logs.pop("counts")
    if not (accelerator.sync_gradients and accelerator.optimizer_step_was_skipped):
        write_cache(state.cache, z_all, step, cfg.reset_every * cfg.accumulate)  # every batch of the window
    if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
        ema_update(state.target, online_ema_view, sched["ema_momentum"])
        state.groups.copy_(new_groups)  # under --accumulate: Eq. (4) with the whole window's batches
        state.seen.add_(counts)
    return {"loss": loss.detach(), **logs}


def schedules(cfg, step, steps_per_epoch):
    """This step's learning rate (linear warm-up, then cosine; Sec. 3.4), beta of Eq. (4) and alpha."""
    total = cfg.epochs * steps_per_epoch
    base_lr = cfg.lr * cfg.batch_size * cfg.accumulate / 256
    return {"lr": lr_at(step, total, cfg.warmup_epochs * steps_per_epoch, base_lr),
            "beta": beta_schedule(step, total, cfg.beta_end, kind=cfg.beta_schedule), "ema_momentum": cfg.ema_momentum}


def setup(cfg, data, accelerator):
    """f_theta and its optimiser, prepared by Accelerate, and the momentum state, registered for checkpointing."""
    online = Online(cfg, data.cifar_stem)
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        online = common.global_batchnorm(online)  # global BN (Interpretation 9)
    optimizer = common.make_optimizer(cfg, online)  # --optimizer: sgd, lars or adam
    online, optimizer = accelerator.prepare(common.fast_model(online, cfg, accelerator), optimizer)
    cache_size = cfg.reset_every * cfg.accumulate * cfg.batch_size if cfg.kmeans_reset else 0
    state = MomentumState(accelerator.unwrap_model(online), cfg.num_groups, cfg.proj_dim, cache_size,
                          data.num_classes).to(accelerator.device)
    accelerator.register_for_checkpointing(state)
    return online, optimizer, state


def epoch_tally(num_groups, num_classes, device):
    """The epoch's diagnostic accumulators, named as the train_step logs that feed them."""
    return {"class_counts": torch.zeros(num_groups, num_classes, device=device),
            **{k: torch.zeros((), dtype=torch.long, device=device) for k in ("same_group", "images")}}


def epoch_diagnostics(tally, accelerator):
    """Interpretation 10, over the epoch (epoch_tally's accumulators): groups used, Fig. 5's mean label entropy of the
    used groups, % of images whose two views fell into the same group. Reads the values back (epoch end only)."""
    tally = {k: accelerator.reduce(v, "sum") for k, v in tally.items()}
    size = tally["class_counts"].sum(dim=1)  # (K,)
    p = tally["class_counts"] / size.clamp(min=1).unsqueeze(1)  # (K, C)
    entropy = -(p * p.clamp(min=1e-12).log()).sum(dim=1)  # (K,), 0 for an unused group
    used = (size > 0).sum()
    return {"groups_used": int(used), "group_label_entropy": (entropy.sum() / used.clamp(min=1)).item(),
            "same_group": (tally["same_group"] / tally["images"].clamp(min=1)).item() * 100}


def train(cfg: Config):
    accelerator = common.make_accelerator(cfg)
    check_config(cfg, accelerator.num_processes)
    set_seed(cfg.seed)
    data = common.load_data(cfg, accelerator)
    loader = common.train_views(cfg, data, view_specs(cfg, data.size), accelerator)
    run = common.Run(cfg, "smog", accelerator, data, steps_per_epoch=len(loader))
    online, optimizer, state = setup(cfg, data, accelerator)
    backbone = accelerator.unwrap_model(online).backbone

    start_epoch, done = run.resume()
    step = start_epoch * run.steps_per_epoch + done
    if step == 0 and cfg.eval_every:
        baseline = epoch_tally(cfg.num_groups, data.num_classes, accelerator.device)  # the random-init network
        run.monitor(0, 0, backbone, lambda query: epoch_diagnostics(baseline, accelerator))
    for epoch in range(start_epoch, run.last_epoch):
        online.train()
        tally = epoch_tally(cfg.num_groups, data.num_classes, accelerator.device)
        for views, labels, _ in run.epoch_batches(loader, epoch, done if epoch == start_epoch else 0):
            sched = schedules(cfg, step // cfg.accumulate, run.updates_per_epoch)  # per optimiser update
            with run.accumulate(step, online):
                logs = train_step(online, state, optimizer, views, labels, cfg, sched, step, accelerator)
            for name, total in tally.items():
                total += logs.pop(name)
            step += 1
            if run.after_step(step, epoch, logs, **sched):
                break  # a signal or a non-finite loss: run.finish() checkpoints or raises
        if run.end_epoch(epoch + 1, step, backbone, lambda query: epoch_diagnostics(tally, accelerator)):
            break
    return run.finish(backbone, {})


if __name__ == "__main__":
    common.run_main(train, Config, paper=PAPER)
