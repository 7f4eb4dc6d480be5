"""Linear probe (and kNN) of a frozen backbone saved by any method script of this repository.

Run:   accelerate launch eval_linear.py runs/ressl-cifar10-<time>/backbone.pt --data-dir data
Fast:  python eval_linear.py runs/.../backbone.pt --cached       (pre-extracted features, no augmentation)

Paper:  python eval_linear.py runs/reco-imagenet-<time>/backbone.pt --dataset imagenet --data-dir /data/imagenet
        (--recipe auto picks `paper` for ImageNet-scale data: the linear protocol of the paper of --method, by default
        the method backbone.pt names; EVAL_RECIPES below; --print-config shows the resolved settings)

--recipe small (the default for small data): the ReSSL small-scale protocol (https://arxiv.org/abs/2203.08717 Sec. 4,
"Evaluation Protocol"): linear classifier on the average-pooled features of the frozen backbone, 100 epochs, SGD
lr 10, momentum 0.9, no weight decay, lr x 0.1 at epochs 60 and 80, random crop + horizontal flip for training,
centre crop for testing. Flags given on the command line override either recipe. Prints and writes top-1 / top-5
(and the weighted kNN top-1, k = 200, t = 0.1) to linear_eval.json beside the backbone (or --output).
"""
import bisect
import dataclasses
import json
import math
import os
import pickle
import sys
import zipfile
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms import v2 as T
from tqdm.auto import tqdm

import common

METHODS = ("median_triplet", "smog", "ressl", "hnpm", "reco")


@dataclass
class EvalConfig:
    backbone: str = ""  # path to backbone.pt written by a method script (also accepted as the first argument)
    recipe: Literal["auto", "paper", "small"] = "auto"  # paper: --method's ImageNet protocol; auto: paper for > 96 px
    method: Literal["auto", "median_triplet", "smog", "ressl", "hnpm", "reco"] = "auto"  # auto: backbone.pt's method
    print_config: bool = False  # print the resolved settings as JSON and exit
    dataset: Literal["cifar10", "cifar100", "stl10", "tiny-imagenet", "imagenet", "imagenet100", "imagefolder",
                     "fake"] = "cifar10"  # labelled data
    data_dir: str = "data"  # where datasets are downloaded to / read from
    fake_size: int = 512  # number of synthetic images for --dataset fake
    num_workers: int = 8  # data-loading worker processes per GPU
    epochs: int = 100  # linear-classifier epochs
    batch_size: int = 256  # GLOBAL batch size
    optimizer: Literal["sgd", "lars"] = "sgd"  # lars: layer-wise trust ratios, the bias left out (common/optim.py)
    lr: float = 10.0  # learning rate (with --lr-scaling linear: the base lr, x batch-size / 256)
    lr_scaling: Literal["none", "linear"] = "none"  # linear: the lr is --lr x batch-size / 256
    momentum: float = 0.9  # SGD / LARS momentum
    nesterov: bool = False  # Nesterov momentum (--optimizer sgd)
    weight_decay: float = 0.0  # weight decay
    schedule: Literal["step", "cosine"] = "step"  # step: x 0.1 at each of --milestones; cosine: to 0 over --epochs
    milestones: str = "60,80"  # epochs at which the lr is multiplied by 0.1 (--schedule step)
    augment: Literal["crop", "resized-crop"] = "crop"  # crop: pad + random crop + flip; resized-crop: ImageNet's
    cached: bool = False  # train on features extracted once, without augmentation (fast check)
    knn: bool = True  # also report the weighted kNN top-1
    seed: int = 0  # random seed
    output: str = ""  # JSON result path; default linear_eval.json beside the backbone


# --recipe paper: each paper's ImageNet linear-evaluation protocol, applied to the fields not given on the command line
# (resolved before anything runs; --print-config shows the result). "Not in the paper" marks what a paper leaves
# open, filled from the protocol of the family it follows. None of the five states the augmentation: all use
# --augment resized-crop, random-resized crop + flip for training and resize to 8/7 of the crop + centre crop for
# testing (256 -> 224), as the linear-evaluation code of every family cited below does (OpenSelfSup's r50_last.py,
# MoCo v3's and ReCo's main_*lincls.py, BYOL's byol/utils/dataset.py with its 224 / (224 + 32) centre crop).
EVAL_RECIPES = {
    # Median triplet, https://arxiv.org/abs/2104.08760 Sec. 4.1: "For the linear classification stage, the batch size
    # is 256. The maximum epoch is 100. There is no weight decay in linear classification training. The optimizer is
    # SGD." Not in the paper: lr 30, x 0.1 at epochs 60 and 80, the augmentation; from the protocol the paper says its
    # settings follow (Sec. 4, "All the protocols are in line with [49]", OpenSelfSup): configs/benchmarks/
    # linear_classification/imagenet/r50_last.py of https://github.com/open-mmlab/OpenSelfSup (SGD lr 30, momentum
    # 0.9, weight decay 0, steps [60, 80], 100 epochs, 32 x 8 GPUs, RandomResizedCrop(224) + flip, Resize(256) +
    # CenterCrop(224)).
    "median_triplet": dict(optimizer="sgd", nesterov=False, momentum=0.9, batch_size=256, epochs=100, lr=30.0,
                           lr_scaling="none", weight_decay=0.0, schedule="step", milestones="60,80",
                           augment="resized-crop"),
    # SMoG, https://arxiv.org/abs/2207.06167 Sec. 4.1 says only "Following the standard benchmarks [...] linear
    # classification on frozen features". Not in the paper, all of it: MoCo v3's ResNet-50 linear protocol
    # (https://arxiv.org/abs/2104.02057; main_lincls.py of https://github.com/facebookresearch/moco-v3: "momentum-SGD
    # and a batch size of 1024", 90 epochs, lr 0.1 x batch / 256 with cosine decay, weight decay 0), MoCo v3 being the
    # momentum-network-with-predictor setting SMoG adopts (Sec. 3.4, "Like many previous works [21, 10, 68]").
    "smog": dict(optimizer="sgd", nesterov=False, momentum=0.9, batch_size=1024, epochs=90, lr=0.1,
                 lr_scaling="linear", weight_decay=0.0, schedule="cosine", augment="resized-crop"),
    # ReSSL, https://arxiv.org/abs/2203.08717 Sec. 5.1, "Linear Evaluation": "we follow the same setting in SimCLR [...]
    # we train the linear classification layer for 90 epochs using a SGD optimizer with a Nesterov momentum value of
    # 0.9, weight decay of 0, learning rate with 0.1 * BatchSize/256, and a cosine-annealed learning rate scheduler".
    # Not in the paper: the batch size, 4096 from that SimCLR setting (the ImageNet linear-eval command of
    # https://github.com/google-research/simclr: --train_batch_size=4096 --train_epochs=90 --learning_rate=0.1).
    "ressl": dict(optimizer="sgd", nesterov=True, momentum=0.9, batch_size=4096, epochs=90, lr=0.1,
                  lr_scaling="linear", weight_decay=0.0, schedule="cosine", augment="resized-crop"),
    # HNPM, https://arxiv.org/abs/2202.13072 Sec. 4.1 gives no setting; it evaluates "by freezing the SSL model and
    # training a separate linear classifier after the SSL model [Grill and others, 2020; ...]", BYOL being also the
    # student-teacher (EMA) family it builds on. Not in the paper, all of it: BYOL's linear protocol
    # (https://arxiv.org/abs/2006.07733 Appendix C.1: SGD with Nesterov momentum 0.9, batch 1024, 80 epochs, no weight decay; the lr, swept there over
    # {0.4, 0.3, 0.2, 0.1, 0.05}, is 0.2 x batch / 256 with cosine decay in the released byol/configs/eval.py and
    # byol/utils/schedules.py of https://github.com/deepmind/deepmind-research).
    "hnpm": dict(optimizer="sgd", nesterov=True, momentum=0.9, batch_size=1024, epochs=80, lr=0.2,
                 lr_scaling="linear", weight_decay=0.0, schedule="cosine", augment="resized-crop"),
    # ReCo, https://arxiv.org/abs/2211.01796 Sec. IV-C, "1) Linear Classification", Setup: "We use a LARS optimizer
    # with weight decay of 0. and momentum of 0.9 to train a linear classifier. A cosine decay schedule is used with an
    # initial learning rate of 0.1 * batch/256 and a batch size of 4096 for training 90 epochs" (its alternative, SGD
    # lr 10, batch 256, 100 epochs, x 0.1 at 60 and 80, "obtain[s] the same performance"; the first is its default).
    # Not in the paper: the augmentation, RandomResizedCrop(224) + flip / Resize(256) + CenterCrop(224) in the
    # authors' main_simsiam_lincls.py (https://github.com/zhangyifei01/ReCo).
    "reco": dict(optimizer="lars", nesterov=False, momentum=0.9, batch_size=4096, epochs=90, lr=0.1,
                 lr_scaling="linear", weight_decay=0.0, schedule="cosine", augment="resized-crop"),
}


def backbone_method(path):
    """The method named in backbone.pt ("method"), or None where the file cannot be read (load_backbone then says
    what is wrong with it)."""
    try:
        meta = torch.load(path, map_location="cpu", mmap=True)
    except Exception:  # any unreadable file: the method is simply unknown here
        return None
    return meta.get("method") if isinstance(meta, dict) else None


def paper_recipe(argv):
    """The values --recipe paper sets for this command line: EVAL_RECIPES of --method (auto: of the method backbone.pt
    names); {} when the recipe resolves to small. Flags on the command line still win (common.parse_config)."""
    cfg = common.parse_config(EvalConfig, argv, paper={})  # the flags as given, the recipe resolved, nothing applied
    if cfg.recipe != "paper":
        return {}
    method = cfg.method if cfg.method != "auto" else backbone_method(cfg.backbone)
    if method not in EVAL_RECIPES:
        source = f"{cfg.backbone!r} names none of them" if cfg.backbone else "no backbone.pt given to name one"
        raise common.UserError(f"--recipe paper (the choice of --recipe auto for ImageNet-scale data) needs --method "
                               f"({', '.join(METHODS)}): {source}.")
    return {**EVAL_RECIPES[method], "method": method}


def parse_milestones(text):
    """--milestones "60,80" -> [60, 80]; a UserError unless a (possibly empty) list of increasing positive integers."""
    try:
        milestones = [int(m) for m in text.split(",") if m.strip()]
    except ValueError:
        milestones = None
    if milestones is None or any(m < 1 for m in milestones) or milestones != sorted(set(milestones)):
        raise common.UserError(f"--milestones must be increasing positive epoch numbers separated by commas (e.g. "
                               f"60,80), or empty for a constant lr, got {text!r}.")
    return milestones


def check_config(cfg: EvalConfig):
    """Flags outside their domain or a missing backbone file -> UserError naming the flag, before any work starts."""
    def need(ok, flag, value, domain):
        if not ok:
            raise common.UserError(f"--{flag} must be {domain}, got {value!r}.")

    if not cfg.backbone:
        raise common.UserError("no backbone given: pass the backbone.pt a method script wrote "
                               "(python eval_linear.py runs/<run>/backbone.pt).")
    for flag in ("fake_size", "epochs", "batch_size"):
        need(getattr(cfg, flag) >= 1, flag.replace("_", "-"), getattr(cfg, flag), "at least 1")
    need(cfg.num_workers >= 0, "num-workers", cfg.num_workers, "0 or more")
    need(0 <= cfg.seed < 2**32, "seed", cfg.seed, "in [0, 2**32)")
    need(math.isfinite(cfg.lr) and cfg.lr > 0, "lr", cfg.lr, "a finite positive number")
    need(0 <= cfg.momentum <= 1, "momentum", cfg.momentum, "in [0, 1]")
    if cfg.nesterov and (cfg.optimizer != "sgd" or cfg.momentum == 0):
        raise common.UserError(f"--nesterov needs --optimizer sgd and a momentum above 0, got --optimizer "
                               f"{cfg.optimizer} --momentum {cfg.momentum}.")
    need(math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0, "weight-decay", cfg.weight_decay,
         "a finite number, 0 or more")
    late = [m for m in parse_milestones(cfg.milestones) if m >= cfg.epochs]
    # allowed (short checks keep the default 60,80), but say so
    if late and cfg.schedule == "step" and os.environ.get("RANK", "0") == "0":
        print(f"warning: --milestones {','.join(map(str, late))} come at or after --epochs {cfg.epochs}, so they "
              f"never lower the lr.", file=sys.stderr)
    if not os.path.isfile(cfg.backbone):
        raise common.UserError(f"backbone file {cfg.backbone!r} not found: pass the backbone.pt a method script "
                               f"wrote.")
    if cfg.output and (os.path.isdir(cfg.output) or not os.path.isdir(os.path.dirname(os.path.abspath(cfg.output)))):
        raise common.UserError(f"--output must be a file path in an existing folder, got {cfg.output!r}.")


def load_backbone(path):
    """Rebuild the torchvision backbone described by backbone.pt -> (network without fc, metadata)."""
    if not os.path.isfile(path):
        raise common.UserError(f"backbone file {path!r} not found: pass the backbone.pt a method script wrote.")
    try:
        ckpt = torch.load(path, map_location="cpu")
        net = getattr(torchvision.models, ckpt["arch"])(weights=None)
        if ckpt["cifar_stem"]:
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        net.fc = nn.Identity()
        net.load_state_dict(ckpt["state_dict"])
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, KeyError, IndexError, TypeError,
            ValueError, AttributeError) as e:
        first_line = (str(e).strip() or "-").splitlines()[0][:200]
        raise common.UserError(f"{path!r} is not a backbone.pt written by a method script of this repository "
                               f"({type(e).__name__}: {first_line}).") from None
    return net, ckpt


def top_k(logits, labels, ks=(1, 5)):
    top = logits.topk(max(ks), dim=1).indices
    return [(top[:, :k] == labels[:, None]).any(1).float().mean().item() * 100 for k in ks]


def transforms(cfg, size, mean_std):
    """The training and test transforms of the probe -> (train, test). crop: resize, random crop with padding size/8,
    flip; test: resize + centre crop (the pretraining size). resized-crop, ImageNet's linear protocol: random-resized
    crop + flip; test: resize the shorter side to 8/7 of `size` (256 for 224) + centre crop."""
    finish = [T.ToDtype(torch.float32, scale=True), T.Normalize(*mean_std)]
    if cfg.augment == "resized-crop":
        train = [T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip()]
        test = T.Compose([T.ToImage(), T.Resize(round(size * 8 / 7), antialias=True), T.CenterCrop(size), *finish])
    else:
        train = [T.Resize(size, antialias=True), T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip()]
        test = common.eval_transform(size, mean_std)
    return T.Compose([T.ToImage(), *train, *finish]), test


def make_classifier(cfg, feat_dim, num_classes, steps_per_epoch=1):
    """The linear classifier, its optimiser (--optimizer, common.make_optimizer; the lr x batch-size / 256 with
    --lr-scaling linear) and the lr schedule, stepped after every optimiser step: x 0.1 from each of --milestones'
    epochs on, or a cosine from the lr to 0 over --epochs -> all three."""
    classifier = nn.Linear(feat_dim, num_classes)
    lr = cfg.lr * cfg.batch_size / 256 if cfg.lr_scaling == "linear" else cfg.lr
    optimizer = common.make_optimizer(cfg, classifier, lr=lr, nesterov=cfg.nesterov)
    if cfg.schedule == "cosine":
        total = cfg.epochs * steps_per_epoch
        factor = lambda step: 0.5 * (1 + math.cos(math.pi * step / total))  # noqa: E731
    else:
        starts = [m * steps_per_epoch for m in parse_milestones(cfg.milestones)]
        factor = lambda step: 0.1 ** bisect.bisect_right(starts, step)  # noqa: E731
    return classifier, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_step(classifier, backbone, optimizer, x, y, cfg, accelerator):
    """One SGD step of the linear classifier on a batch: images through the frozen backbone, or with --cached its
    features -> the loss (0-dim tensor)."""
    x, y = x.to(accelerator.device), y.to(accelerator.device)
    if not cfg.cached:
        with torch.no_grad(), accelerator.autocast():
            x = backbone(x)
    loss = F.cross_entropy(classifier(x.float()), y)
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss) if not cfg.cached else loss.backward()  # --cached: classifier not prepared
    optimizer.step()
    return loss.detach()


def train_epoch(classifier, backbone, optimizer, scheduler, loader, cfg, accelerator):
    """One epoch of train_step over `loader`, each followed by its step of the lr schedule."""
    for x, y in loader:
        train_step(classifier, backbone, optimizer, x, y, cfg, accelerator)
        scheduler.step()


def evaluate(cfg: EvalConfig):
    check_config(cfg)
    accelerator = Accelerator()
    set_seed(cfg.seed)
    backbone, meta = load_backbone(cfg.backbone)
    with accelerator.local_main_process_first():
        _, train, test, num_classes, _, _ = common.get_datasets(cfg.dataset, cfg.data_dir, cfg.fake_size)
    size, mean_std = meta["image_size"], tuple(map(tuple, meta["mean_std"]))
    train_tf, eval_tf = transforms(cfg, size, mean_std)
    n = accelerator.num_processes
    plain_train = common.make_loader(common.Transformed(train, eval_tf), cfg.batch_size, n, False, cfg.num_workers)
    test_loader = common.make_loader(common.Transformed(test, eval_tf), cfg.batch_size, n, False, cfg.num_workers)
    backbone, plain_train, test_loader = accelerator.prepare(backbone, plain_train, test_loader)
    backbone.eval().requires_grad_(False)

    result = {"backbone": cfg.backbone, "method": meta.get("method"), "dataset": cfg.dataset, "cached": cfg.cached}
    test_x, test_y = common.extract_features(backbone, test_loader, accelerator)
    if cfg.knn or cfg.cached:
        train_x, train_y = common.extract_features(backbone, plain_train, accelerator)
    if cfg.knn:
        pred = common.knn_predict(train_x, train_y, test_x, num_classes).argmax(1)
        result["knn_top1"] = (pred == test_y).float().mean().item() * 100

    if cfg.cached:  # features computed once; each process trains on all of them (a linear layer is cheap)
        train_loader = DataLoader(TensorDataset(train_x.cpu(), train_y.cpu()), batch_size=cfg.batch_size,
                                  shuffle=True, drop_last=False)
    else:
        train_loader = accelerator.prepare(common.make_loader(common.Transformed(train, train_tf), cfg.batch_size, n,
                                                              True, cfg.num_workers))
    classifier, optimizer, scheduler = make_classifier(cfg, test_x.shape[1], num_classes, len(train_loader))
    if cfg.cached:
        classifier = classifier.to(accelerator.device)
    else:
        classifier, optimizer = accelerator.prepare(classifier, optimizer)
    for epoch in tqdm(range(cfg.epochs), desc="linear", disable=not accelerator.is_local_main_process):
        train_epoch(classifier, backbone, optimizer, scheduler, train_loader, cfg, accelerator)
    with torch.no_grad():
        result["top1"], result["top5"] = top_k(accelerator.unwrap_model(classifier)(test_x), test_y)
    result["config"] = dataclasses.asdict(cfg)
    accelerator.print(f"linear top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%"
                      + (f"  kNN top-1 {result['knn_top1']:.2f}%" if "knn_top1" in result else ""))
    if accelerator.is_main_process:
        path = cfg.output or os.path.join(os.path.dirname(os.path.abspath(cfg.backbone)), "linear_eval.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
    return result


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):  # positional backbone path
        argv = ["--backbone", argv[0]] + argv[1:]
    try:  # the paper table depends on --method (or the backbone's method), so it is picked before parsing
        paper = paper_recipe(argv)
    except common.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return common.run_main(evaluate, EvalConfig, argv, paper=paper)


if __name__ == "__main__":
    main()
