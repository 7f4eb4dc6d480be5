"""Linear probe (and kNN) of a frozen backbone saved by any method script of this repository.

Run:   accelerate launch eval_linear.py runs/ressl-cifar10-<time>/backbone.pt --data-dir data
Fast:  python eval_linear.py runs/.../backbone.pt --cached       (pre-extracted features, no augmentation)

Default protocol: the ReSSL small-scale one (Sec. 4, "Evaluation Protocol"): linear classifier on the average-pooled
features of the frozen backbone, 100 epochs, SGD lr 10, momentum 0.9, no weight decay, lr x 0.1 at epochs 60 and 80,
random crop + horizontal flip for training, centre crop for testing. Prints and writes top-1 / top-5 (and the
weighted kNN top-1, k = 200, t = 0.1) to linear_eval.json beside the backbone (or --output).
"""
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


@dataclass
class EvalConfig:
    backbone: str = ""  # path to backbone.pt written by a method script (also accepted as the first argument)
    dataset: Literal["cifar10", "cifar100", "stl10", "tiny-imagenet", "imagefolder", "fake"] = "cifar10"  # labelled data
    data_dir: str = "data"  # where datasets are downloaded to / read from
    fake_size: int = 512  # number of synthetic images for --dataset fake
    num_workers: int = 8  # data-loading worker processes per GPU
    epochs: int = 100  # linear-classifier epochs
    batch_size: int = 256  # GLOBAL batch size
    lr: float = 10.0  # SGD learning rate
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 0.0  # SGD weight decay
    milestones: str = "60,80"  # epochs at which the lr is multiplied by 0.1
    cached: bool = False  # train on features extracted once, without augmentation (fast check)
    knn: bool = True  # also report the weighted kNN top-1
    seed: int = 0  # random seed
    output: str = ""  # JSON result path; default linear_eval.json beside the backbone


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
    need(math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0, "weight-decay", cfg.weight_decay,
         "a finite number, 0 or more")
    late = [m for m in parse_milestones(cfg.milestones) if m >= cfg.epochs]
    if late and os.environ.get("RANK", "0") == "0":  # allowed (short checks keep the default 60,80), but say so
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


def make_classifier(cfg, feat_dim, num_classes):
    """The linear classifier, its SGD optimiser and the lr schedule (x 0.1 at each of --milestones) -> all three."""
    classifier = nn.Linear(feat_dim, num_classes)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, parse_milestones(cfg.milestones), 0.1)
    return classifier, optimizer, scheduler


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
    """One epoch of train_step over `loader`, then the epoch's step of the lr schedule (--milestones)."""
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
    eval_tf = common.eval_transform(size, mean_std)
    train_tf = T.Compose([T.ToImage(), T.Resize(size, antialias=True), T.RandomCrop(size, padding=size // 8),
                          T.RandomHorizontalFlip(), T.ToDtype(torch.float32, scale=True), T.Normalize(*mean_std)])
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

    classifier, optimizer, scheduler = make_classifier(cfg, test_x.shape[1], num_classes)
    if cfg.cached:  # features computed once; each process trains on all of them (a linear layer is cheap)
        train_loader = DataLoader(TensorDataset(train_x.cpu(), train_y.cpu()), batch_size=cfg.batch_size,
                                  shuffle=True, drop_last=False)
        classifier = classifier.to(accelerator.device)
    else:
        train_loader = common.make_loader(common.Transformed(train, train_tf), cfg.batch_size, n, True, cfg.num_workers)
        classifier, optimizer, train_loader = accelerator.prepare(classifier, optimizer, train_loader)
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
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):  # positional backbone path
        argv = ["--backbone", argv[0]] + argv[1:]
    common.run_main(evaluate, EvalConfig, argv)


if __name__ == "__main__":
    main()
