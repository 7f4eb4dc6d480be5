"""Plumbing shared by the five method scripts: nothing in here is part of any paper's method.

Config flags from a dataclass, datasets and their download, view specs -> pipelines (per-sample torchvision in
DataLoader workers, or batched on the training device), the weighted kNN monitor, and the run itself: run folder,
config.json with provenance, metrics (JSONL and optional trackers), crash-safe checkpoints, resume, preemption and
non-finite-loss stops. Everything a paper describes lives in its own script.
"""
import argparse
import dataclasses
import datetime
import hashlib
import inspect
import io
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import tokenize
import types
import typing
import urllib.error
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision.transforms import v2 as T


class UserError(Exception):
    """Bad input (flag, path, data). Scripts print its message and exit with code 2, no traceback."""


def require(ok, message):
    """Flag validation in check_config: a false condition ends the run with `error: <message>`."""
    if not ok:
        raise UserError(message)


def run_main(train_fn, config_cls, argv=None):
    """Parse the CLI into `config_cls`, call `train_fn(cfg)`; a UserError ends the run with its one message."""
    cfg = parse_config(config_cls, argv)
    try:
        return train_fn(cfg)
    except UserError as e:
        # a DataLoader worker re-raises with the worker's traceback in the message: keep only the message
        print(f"error: {str(e).strip().splitlines()[-1].split('UserError: ')[-1]}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------- config -> argparse

@dataclass
class BaseConfig:
    """The fields no paper describes; each method's Config extends it with its own (and may override defaults)."""
    # data
    dataset: Literal["cifar10", "cifar100", "stl10", "tiny-imagenet", "imagefolder", "fake"] = "cifar10"  # data set
    data_dir: str = "data"  # where datasets are downloaded to / read from
    fake_size: int = 512  # number of synthetic images for --dataset fake
    num_workers: int = 8  # data-loading worker processes per GPU (--views-on workers)
    views_on: Literal["auto", "workers", "device"] = "auto"  # where views are made; auto: device on CUDA if it fits
    # model
    arch: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"  # torchvision backbone
    stem: Literal["auto", "cifar", "imagenet"] = "auto"  # auto: 3x3 stride-1 conv and no max-pool for <= 64 px
    # optimisation
    epochs: int = 200  # pretraining epochs
    batch_size: int = 256  # GLOBAL batch size, split evenly over processes
    lr: float = 0.06  # base learning rate, scaled by batch_size / 256
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # SGD weight decay
    warmup_epochs: int = 10  # linear learning-rate warm-up, then cosine decay
    # run
    seed: int = 0  # random seed (weights, views, shuffling)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"  # auto: what `accelerate launch` was told
    output_dir: str = ""  # default runs/<method>-<dataset>-<time>
    resume: bool = False  # continue from the newest complete checkpoint in --output-dir
    allow_config_change: bool = False  # --resume with settings that differ from the checkpoint's config.json
    stop_after_epochs: int = 0  # end this invocation after this epoch (0: run to --epochs); continue with --resume
    log_every: int = 50  # steps between metric lines
    eval_every: int = 10  # epochs between kNN evaluations (also before training and at the end); 0: only at the end
    checkpoint_every: int = 10  # epochs between checkpoints (and at the end)
    knn_k: int = 200  # neighbours of the kNN monitor
    knn_t: float = 0.1  # temperature of the kNN monitor
    report_to: Literal["none", "tensorboard", "wandb", "all"] = "none"  # trackers besides metrics.jsonl
    compile: bool = False  # torch.compile the trained network


# fields that may change between an interrupted run and its --resume
RUN_ONLY_FIELDS = {"data_dir", "num_workers", "views_on", "output_dir", "resume", "allow_config_change",
                   "stop_after_epochs", "log_every", "eval_every", "checkpoint_every", "report_to", "compile",
                   "mixed_precision"}


def check_base_config(cfg, num_processes):
    """Domains of the generic flags; each script's check_config calls it first."""
    for name in ("batch_size", "epochs", "fake_size", "log_every", "checkpoint_every", "knn_k"):
        require(getattr(cfg, name) >= 1, f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}.")
    for name in ("num_workers", "eval_every", "stop_after_epochs", "warmup_epochs", "weight_decay"):
        require(getattr(cfg, name) >= 0, f"--{name.replace('_', '-')} must be 0 or more, got {getattr(cfg, name)}.")
    require(cfg.lr > 0, f"--lr must be positive, got {cfg.lr}.")
    require(cfg.knn_t > 0, f"--knn-t must be positive, got {cfg.knn_t}.")
    require(0 <= cfg.momentum <= 1, f"--momentum must lie in [0, 1], got {cfg.momentum}.")
    require(cfg.warmup_epochs <= cfg.epochs, f"--warmup-epochs {cfg.warmup_epochs} exceeds --epochs {cfg.epochs}.")
    require(cfg.stop_after_epochs <= cfg.epochs,
            f"--stop-after-epochs {cfg.stop_after_epochs} exceeds --epochs {cfg.epochs}.")
    require(cfg.batch_size % num_processes == 0,
            f"--batch-size {cfg.batch_size} must divide evenly over {num_processes} processes.")


def _field_comments(cls):
    """`name: type = default  # comment` lines of a dataclass -> {name: comment}, used as --help text.

    Read with tokenize, so a `#` inside a default string is not a comment. Where the source cannot be read (a
    Config pasted into a notebook or REPL) the flags simply have no help text."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        field, depth = None, 0
        try:
            for tok in tokenize.generate_tokens(io.StringIO(source).readline):
                if tok.type == tokenize.NL or tok.type == tokenize.NEWLINE:
                    field = None
                elif tok.type == tokenize.NAME and field is None and tok.start[1] > 0 and depth == 0:
                    field = tok.string
                elif tok.type == tokenize.OP and tok.string in "([{":
                    depth += 1
                elif tok.type == tokenize.OP and tok.string in ")]}":
                    depth -= 1
                elif tok.type == tokenize.COMMENT and field:
                    comments[field] = tok.string.lstrip("#").strip()
        except (tokenize.TokenError, IndentationError):
            continue
    return comments


def parse_config(config_cls, argv=None):
    """Typed flags from a dataclass: `lr: float = 0.06  # comment` becomes `--lr FLOAT` with that help text.

    bool fields get `--name / --no-name`, Literal[...] fields get choices, an unknown flag is an error naming it.
    """
    module = sys.modules.get(config_cls.__module__)
    parser = argparse.ArgumentParser(description=((module and module.__doc__) or "").split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    comments = _field_comments(config_cls)
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        flag, tp = "--" + f.name.replace("_", "-"), hints[f.name]
        help_ = comments.get(f.name, "").replace("%", "%%")  # argparse formats help with %
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        elif typing.get_origin(tp) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(tp), default=f.default, help=help_)
        else:
            parser.add_argument(flag, type=tp, default=f.default, help=help_)
    return config_cls(**vars(parser.parse_args(argv)))


# ----------------------------------------------------------------------------- datasets

IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "stl10": 96, "tiny-imagenet": 64, "fake": 32}
MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
}
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class FakeImages(Dataset):
    """Deterministic synthetic RGB images with labels: class c has a colour offset so kNN has something to find."""

    def __init__(self, size=64, image_size=32, num_classes=10, seed=0):
        self.size, self.image_size, self.num_classes, self.seed = size, image_size, num_classes, seed

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        label = i % self.num_classes
        x = torch.rand(3, self.image_size, self.image_size, generator=g) * 0.5
        x += torch.linspace(0, 0.5, self.num_classes)[label].view(-1, 1, 1) * torch.tensor([1.0, -1.0, 0.5]).view(3, 1, 1)
        return T.functional.to_pil_image(x.clamp(0, 1)), label


def _download_error(name, data_dir, err):
    return UserError(
        f"could not download {name} into --data-dir {data_dir!r} ({type(err).__name__}: {err}). Without network, "
        f"put the dataset there yourself (torchvision layout) or use --dataset imagefolder with "
        f"<data-dir>/train/<class>/* and <data-dir>/test/<class>/*.")


def _checked_image_folder(root, split_dir):
    if not os.path.isdir(split_dir):
        raise UserError(f"--dataset imagefolder expects the folder {split_dir!r}; it does not exist. Layout: "
                        f"{root}/train/<class>/<image> and {root}/test/<class>/<image> (or val/).")
    try:
        ds = datasets.ImageFolder(split_dir)
    except FileNotFoundError as e:  # raised for no class folder or no image file
        raise UserError(f"--dataset imagefolder: {split_dir!r} holds no images in class sub-folders ({e}).")
    ds.loader = _checked_pil_loader
    return ds


def _checked_pil_loader(path):
    from PIL import Image, UnidentifiedImageError
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"cannot read image {path!r} ({e}); remove or replace the file.")


def get_datasets(name, data_dir, fake_size=256, download=True):
    """-> (pretrain, memory, query, num_classes, image_size, (mean, std)); images are PIL, no transform applied.

    pretrain: images SSL trains on (STL-10: train + unlabeled); memory / query: labelled train / test splits used
    by the kNN monitor and the linear probe.
    """
    def tv(cls, **kw):
        try:
            return cls(data_dir, download=download, **kw)
        except (urllib.error.URLError, OSError, RuntimeError) as e:
            raise _download_error(name, data_dir, e) from None

    if name in ("cifar10", "cifar100"):
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        train, test = tv(cls, train=True), tv(cls, train=False)
        pretrain, n_cls = train, len(train.classes)
    elif name == "stl10":
        train, test = tv(datasets.STL10, split="train"), tv(datasets.STL10, split="test")
        pretrain, n_cls = tv(datasets.STL10, split="train+unlabeled"), 10
    elif name == "imagefolder":
        train = _checked_image_folder(data_dir, os.path.join(data_dir, "train"))
        test_dir = os.path.join(data_dir, "test")
        if not os.path.isdir(test_dir) and os.path.isdir(os.path.join(data_dir, "val")):
            test_dir = os.path.join(data_dir, "val")
        test = _checked_image_folder(data_dir, test_dir)
        if test.classes != train.classes:
            raise UserError(
                f"class folders of {test_dir!r} differ from those of the train folder: each split needs one "
                f"sub-folder per class with the same names, <split>/<class>/<image>. Tiny-ImageNet as distributed "
                f"(a flat val/images with val_annotations.txt) reads with --dataset tiny-imagenet.")
        pretrain, n_cls = train, len(train.classes)
    elif name == "tiny-imagenet":
        train, test = _tiny_imagenet(data_dir)
        pretrain, n_cls = train, len(train.classes)
    elif name == "fake":
        train, test = FakeImages(fake_size, seed=0), FakeImages(max(fake_size // 4, 10), seed=1)
        pretrain, n_cls = train, 10
    else:
        raise UserError(f"--dataset {name!r} is not one of cifar10, cifar100, stl10, tiny-imagenet, imagefolder, fake.")
    if len(pretrain) == 0:
        raise UserError(f"dataset {name!r} in {data_dir!r} is empty.")
    if name == "imagefolder":
        size = _first_image_size(train)
        stats = IMAGENET_MEAN_STD
    elif name == "tiny-imagenet":
        size, stats = IMAGE_SIZE[name], IMAGENET_MEAN_STD
    else:
        size, stats = IMAGE_SIZE[name], MEAN_STD.get(name, IMAGENET_MEAN_STD)
    return pretrain, train, test, n_cls, size, stats


def _tiny_imagenet(root):
    """Tiny-ImageNet-200 as distributed (http://cs231n.stanford.edu/tiny-imagenet-200.zip, unzipped into --data-dir):
    train/<wnid>/images/*.JPEG and a flat val/images/ labelled by val/val_annotations.txt (file, wnid, box)."""
    train = _checked_image_folder(root, os.path.join(root, "train"))
    notes = os.path.join(root, "val", "val_annotations.txt")
    if not os.path.isfile(notes):
        raise UserError(f"--dataset tiny-imagenet expects {notes!r} (the layout of tiny-imagenet-200.zip: "
                        f"train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt).")
    with open(notes) as f:
        rows = [line.split("\t")[:2] for line in f if line.strip()]
    unknown = sorted({wnid for _, wnid in rows} - set(train.class_to_idx))
    if unknown:
        raise UserError(f"{notes!r} names classes without a train folder: {unknown[:3]}.")
    val = datasets.ImageFolder.__new__(datasets.ImageFolder)  # same interface, samples from the annotation file
    val.root, val.loader, val.transform, val.target_transform = os.path.join(root, "val"), _checked_pil_loader, None, None
    val.classes, val.class_to_idx = train.classes, train.class_to_idx
    val.samples = [(os.path.join(root, "val", "images", file), train.class_to_idx[wnid]) for file, wnid in rows]
    val.targets = [c for _, c in val.samples]
    val.imgs = val.samples
    return train, val


def _first_image_size(ds):
    """Pretraining resolution for an ImageFolder: the first image's shorter side, capped at 224."""
    w, h = ds[0][0].size
    return min(w, h, 224)


# ----------------------------------------------------------------------------- views: specs -> pipelines
# Augmentation views, written once as a spec and run two ways.
#
# A method script states each view as a `ViewSpec` that reads like its paper's augmentation table. The spec becomes
#   (a) `torchvision_view`: a per-sample torchvision pipeline for DataLoader workers on the CPU, or
#   (b) `batched_view` / `DeviceViews`: the same random augmentations on a whole batch of uint8 tensors at once, on
#       any device, every sample drawing its own parameters from torchvision's distributions, with no Python loop
#       over samples and no host synchronisation.
# The batched path computes in float32 from the uint8 input; torchvision's per-sample pipeline rounds to uint8 after
# each operation, so the two differ by up to about one grey level per operation (tests/test_views.py states each
# bound). Its resampling and blur are batched matrix products, so they follow torch's float32 matmul precision
# (TF32, 10 mantissa bits, where a script enables it).



_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


@dataclass(frozen=True)
class ViewSpec:
    """One view's random augmentations, in torchvision's order: crop, flip, jitter, grayscale, blur, solarize."""
    crop_scale: tuple = (0.08, 1.0)    # RandomResizedCrop area range; (1.0, 1.0) with crop_ratio (1, 1) = no crop
    crop_ratio: tuple = (3 / 4, 4 / 3)  # RandomResizedCrop aspect-ratio (width / height) range
    flip_p: float = 0.5                # horizontal flip probability
    jitter: tuple = (0.0, 0.0, 0.0, 0.0)  # colour-jitter strengths: brightness, contrast, saturation, hue
    jitter_p: float = 0.0              # probability of applying colour jitter (as T.RandomApply)
    gray_p: float = 0.0                # random grayscale probability
    blur_p: float = 0.0                # Gaussian blur probability
    blur_sigma: tuple = (0.1, 2.0)     # blur sigma range (uniform, per sample)
    blur_kernel: int = 0               # blur kernel size; 0: about 10 % of the side, 2 * (size // 20) + 1
    solarize_p: float = 0.0            # solarisation probability (threshold 0.5 on [0, 1] images)

    def __post_init__(self):
        b, c, s, h = self.jitter
        if min(b, c, s, h) < 0 or h > 0.5:
            raise ValueError(f"ViewSpec.jitter {self.jitter}: strengths must be >= 0 and hue <= 0.5.")
        if not (0 < self.crop_scale[0] <= self.crop_scale[1] and 0 < self.crop_ratio[0] <= self.crop_ratio[1]):
            raise ValueError(f"ViewSpec crop_scale {self.crop_scale}, crop_ratio {self.crop_ratio}: "
                             f"need 0 < min <= max.")
        if self.blur_kernel and self.blur_kernel % 2 == 0:
            raise ValueError(f"ViewSpec.blur_kernel {self.blur_kernel} must be odd (or 0 for the default).")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"ViewSpec.blur_sigma {self.blur_sigma}: need 0 < min <= max.")

    def kernel_size(self, size):
        return self.blur_kernel or 2 * (size // 20) + 1

    def has_jitter(self):
        return self.jitter_p > 0 and any(v > 0 for v in self.jitter)


def torchvision_view(spec, size, mean_std):
    """Per-sample torchvision.transforms.v2 pipeline (PIL image -> normalised float32 tensor) of a spec.

    Operations whose probability is 0 are left out of the Compose.
    """
    ops = [T.ToImage(), T.RandomResizedCrop(size, scale=spec.crop_scale, ratio=spec.crop_ratio, antialias=True)]
    if spec.flip_p > 0:
        ops.append(T.RandomHorizontalFlip(spec.flip_p))
    if spec.has_jitter():
        ops.append(T.RandomApply([T.ColorJitter(*spec.jitter)], p=spec.jitter_p))
    if spec.gray_p > 0:
        ops.append(T.RandomGrayscale(spec.gray_p))
    if spec.blur_p > 0:
        ops.append(T.RandomApply([T.GaussianBlur(spec.kernel_size(size), spec.blur_sigma)], p=spec.blur_p))
    if spec.solarize_p > 0:  # the image is uint8 here: v >= 128 is v / 255 >= 0.5
        ops.append(T.RandomSolarize(threshold=128, p=spec.solarize_p))
    ops += [T.ToDtype(torch.float32, scale=True), T.Normalize(*mean_std)]
    return T.Compose(ops)


# --- random parameters

def _uniform(n, lo, hi, g):
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def _fallback_crop(in_hw, ratio):
    """torchvision's RandomResizedCrop fallback: the centre crop, clamped to the ratio bounds."""
    height, width = in_hw
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _sample_crops(spec, n, in_hw, g, attempts=10):
    """RandomResizedCrop.get_params for n samples at once: the first of 10 attempts that fits, else the fallback."""
    height, width = in_hw
    area = _uniform((n, attempts), *spec.crop_scale, g) * (height * width)
    log_r = _uniform((n, attempts), math.log(spec.crop_ratio[0]), math.log(spec.crop_ratio[1]), g)
    w = torch.sqrt(area * torch.exp(log_r)).round()  # round half to even, as Python's round()
    h = torch.sqrt(area / torch.exp(log_r)).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (n, attempts)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # index of the first True (0 when none)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    u_top, u_left = torch.rand(n, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64)
    top = torch.minimum(torch.floor(u_top * (height - h + 1)), height - h)  # randint(0, height - h + 1)
    left = torch.minimum(torch.floor(u_left * (width - w + 1)), width - w)
    found = fits.any(1)
    f_top, f_left, f_h, f_w = _fallback_crop(in_hw, spec.crop_ratio)
    pick = lambda a, b: torch.where(found, a, torch.full_like(a, b)).long()
    return dict(top=pick(top, f_top), left=pick(left, f_left), height=pick(h, f_h), width=pick(w, f_w),
                fallback=~found)


def sample_view_params(spec, n, in_hw, size, generator, device):
    """Per-sample random parameters of a spec for n images of height/width in_hw, as tensors on `device`.

    Everything is drawn on the CPU with `generator`, in a fixed order and whatever the spec's probabilities, so one
    generator state gives the same parameters on any device. Distributions are torchvision's: the crop rule of
    RandomResizedCrop.get_params; flip / jitter / grayscale / blur / solarize applied when U(0,1) < p; jitter factors
    brightness, contrast, saturation ~ U(max(0, 1-s), 1+s), hue ~ U(-h, h), and a uniformly random order of the four
    (as ColorJitter's randperm(4)); blur sigma ~ U(blur_sigma).
    """
    g = generator
    p = _sample_crops(spec, n, in_hw, g)
    p["flip"] = torch.rand(n, generator=g) < spec.flip_p
    p["jitter"] = torch.rand(n, generator=g) < spec.jitter_p
    for name, s in zip(("brightness", "contrast", "saturation"), spec.jitter[:3]):
        p[name] = _uniform(n, max(0.0, 1.0 - s), 1.0 + s, g).float()
    p["hue"] = _uniform(n, -spec.jitter[3], spec.jitter[3], g).float()
    p["order"] = torch.rand(n, 4, generator=g).argsort(1)  # (n, 4) a random permutation of 0..3 per sample
    p["gray"] = torch.rand(n, generator=g) < spec.gray_p
    p["blur"] = torch.rand(n, generator=g) < spec.blur_p
    p["sigma"] = _uniform(n, *spec.blur_sigma, g).float()
    p["solarize"] = torch.rand(n, generator=g) < spec.solarize_p
    return _params_to(p, device)


def _params_to(params, device):
    device = torch.device(device)
    if device.type == "cpu":
        return params
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in params.items()}


def _params_slice(params, start, stop):
    return {k: v[start:stop] for k, v in params.items()}


# --- batched operations on (n, 3, H, W) float tensors in [0, 1]; per-sample parameters are (n,) tensors

def _per_sample(v):
    return v.view(-1, 1, 1, 1)


def _resample_matrix(start, length, in_len, out_len, flip=None):
    """(n, out_len, in_len) weights of a crop [start, start + length) resized to out_len along one axis, the output
    reversed where `flip`.

    torchvision's resized_crop with bilinear antialiasing (PyTorch's upsample_bilinear2d_aa): output pixel i is
    centred at start + (i + 0.5) * scale in input pixels, scale = length / out_len; input pixel j (centre j + 0.5)
    weighs max(0, 1 - |j + 0.5 - centre| / max(scale, 1)), only pixels inside the crop, normalised to sum 1. When
    upsampling this is plain bilinear with half-pixel centres and the crop's edge pixels repeated.
    """
    dev = start.device
    start, length = start.float().view(-1, 1, 1), length.float().view(-1, 1, 1)
    scale = length / out_len
    i = torch.arange(out_len, device=dev, dtype=torch.float32).view(1, -1, 1)
    if flip is not None:  # output pixel i of a flipped sample is pixel out_len - 1 - i of the unflipped one
        i = torch.lerp(i, out_len - 1 - i, flip.view(-1, 1, 1).to(i.dtype))  # (n, out, 1)
    centre = (i + 0.5) * scale + start  # (n, out, 1)
    j = torch.arange(in_len, device=dev, dtype=torch.float32).view(1, 1, -1)
    w = (j + 0.5 - centre).abs_().mul_(1 / scale.clamp(min=1)).neg_().add_(1).clamp_(min=0)  # (n, out, in)
    w.mul_(((j >= start) & (j < start + length)).to(w.dtype))  # only pixels inside the crop
    return w.div_(w.sum(-1, keepdim=True))


def _separable(x, rows, cols):
    """x (n, c, H, W) -> rows @ x @ cols^T for each sample: rows (n, H', H), cols (n, W', W); -> (n, c, H', W')."""
    n, c, h, w = x.shape
    x = torch.bmm(x.reshape(n, c * h, w), cols.transpose(1, 2)).view(n * c, h, -1)  # (n*c, H, W')
    x = torch.bmm(rows.repeat_interleave(c, 0), x)  # (n*c, H', W'); bmm: broadcasting matmul is slower on the CPU
    return x.view(n, c, rows.shape[1], cols.shape[1])


def _crop_resize_flip(images_uint8, top, left, height, width, flip, size):
    """resized_crop + optional hflip for every sample with two batched matrix products; -> floats in [0, 1]."""
    n, c, H, W = images_uint8.shape
    rows = _resample_matrix(top, height, H, size).div_(255)  # the uint8 -> [0, 1] scale folded in
    cols = _resample_matrix(left, width, W, size, flip)
    return _separable(images_uint8.float(), rows, cols)


def _grayscale(x):
    r, g, b = x.unbind(1)
    return r.mul(_GRAY_WEIGHTS[0]).add_(g, alpha=_GRAY_WEIGHTS[1]).add_(b, alpha=_GRAY_WEIGHTS[2]).unsqueeze(1)


def _blend_op(x, op, brightness, contrast, saturation):
    """One colour-jitter slot: per sample op 0 brightness, 1 contrast, 2 saturation, anything else identity.

    All three are torchvision's blend f * x + (1 - f) * target, clamped to [0, 1], with target 0 (brightness), the
    image's mean grey level (contrast) or its grey image (saturation). Identity is f = 1, which lerp keeps exact.
    """
    f = torch.where(op == 0, brightness, torch.where(op == 1, contrast, torch.where(op == 2, saturation, 1.0)))
    gray = _grayscale(x)  # (n, 1, H, W)
    is_con, is_sat = (_per_sample(op == k).to(x.dtype) for k in (1, 2))
    target = torch.addcmul(gray.mean((1, 2, 3), keepdim=True) * is_con, gray, is_sat)
    return torch.lerp(target, x, _per_sample(f)).clamp_(0, 1)


def _adjust_hue(x, hue):
    """torchvision's adjust_hue (RGB -> HSV, h += hue mod 1, HSV -> RGB) for a per-sample hue, in closed form.

    A hue shift keeps value (max) and chroma C (max - min). With h6 = 6 * h in [0, 6), each channel is
    max - C * clamp(2 - d, 0, 1), d the distance around the hue circle from h6 to the channel's opposite hue
    (R 3, G 5, B 1): torchvision's six-case HSV -> RGB table in closed form. Selections are lerps with 0/1 weights
    (exact) rather than torch.where, which is ten times slower on the CPU.
    """
    r, g, b = x.unbind(1)
    maxc = x.amax(1)  # (n, H, W)
    chroma = maxc - x.amin(1)
    at_r = (maxc == r).to(x.dtype)
    at_g = (maxc == g).to(x.dtype).mul_(1 - at_r)
    # hue in sixths as torchvision: (g - b) / C if max is r, else 2 + (b - r) / C if max is g, else 4 + (r - g) / C
    num = torch.lerp(torch.lerp(r - g, b - r, at_g), g - b, at_r)
    offset = (6 * hue.view(-1, 1, 1) + 4).sub(at_g, alpha=2).sub_(at_r, alpha=4)
    h6 = offset.addcdiv_(num, chroma.clamp(min=1e-8))  # chroma 0 means num 0: h6 = offset
    h6 -= 6 * torch.floor(h6 * (1 / 6))  # mod 6
    opposite = (torch.arange(3, device=x.device, dtype=x.dtype) * 2 + 3).remainder_(6)  # R 3, G 5, B 1; no copy
    d = (h6.unsqueeze(1) - opposite.view(1, 3, 1, 1)).abs_()  # (n, 3, H, W)
    shade = d.sub_(3).abs_().sub_(1).clamp_(0, 1)  # 2 - min(d, 6 - d) = |d - 3| - 1, clamped
    return torch.addcmul(maxc.unsqueeze(1), chroma.unsqueeze(1), shade, value=-1)


def _color_jitter(x, params, spec):
    """ColorJitter on the samples with params['jitter'], each in its own random order of the four operations.

    Loops over order positions, never over samples. Hue is the costly one, so it runs once: each sample's ops before
    its hue go into three 'before' slots and those after into three 'after' slots (identity where a slot is empty),
    which applies exactly its own order.
    """
    on = params["jitter"]
    bri, con, sat = (torch.where(on, params[k], 1.0) for k in ("brightness", "contrast", "saturation"))
    order = params["order"]  # (n, 4): 0 brightness, 1 contrast, 2 saturation, 3 hue
    if spec.jitter[3] == 0:  # no hue: the order's four positions, hue's position being identity
        for pos in range(4):
            x = _blend_op(x, order[:, pos], bri, con, sat)
        return x
    hue_pos = (order == 3).to(torch.uint8).argmax(1)  # (n,)
    for slot in range(3):
        op = torch.where(slot < hue_pos, order[:, slot], -1)
        x = _blend_op(x, op, bri, con, sat)
    x = _adjust_hue(x, torch.where(on, params["hue"], 0.0))
    for slot in range(3):
        pos = hue_pos + 1 + slot
        op = torch.where(pos < 4, order.gather(1, pos.clamp(max=3).unsqueeze(1)).squeeze(1), -1)
        x = _blend_op(x, op, bri, con, sat)
    return x


def _blur_matrix(sigma, apply, kernel_size, size):
    """(n, size, size): Gaussian blur with reflect padding along one axis (torchvision's gaussian_blur); identity
    for the samples that are not blurred."""
    dev, half = sigma.device, kernel_size // 2
    if half >= size:
        raise ValueError(f"blur kernel {kernel_size} is too large for {size} px views (reflect padding needs "
                         f"kernel // 2 < size); set ViewSpec.blur_kernel.")
    t = torch.arange(-half, half + 1, device=dev, dtype=torch.float32)  # (k,)
    w = torch.softmax(-0.5 * (t / sigma.view(-1, 1)) ** 2, dim=1)  # (n, k) normalised Gaussian taps
    idx = torch.arange(size, device=dev).view(-1, 1) + torch.arange(-half, half + 1, device=dev)  # (S, k)
    idx = idx.abs()  # reflect at 0: -m -> m
    idx = torch.where(idx > size - 1, 2 * (size - 1) - idx, idx)  # reflect at size - 1
    n = sigma.shape[0]
    m = torch.zeros(n, size, size, device=dev).scatter_add_(
        2, idx.expand(n, size, -1), w.unsqueeze(1).expand(n, size, -1))
    return torch.where(apply.view(-1, 1, 1), m, torch.eye(size, device=dev))


def _gaussian_blur(x, sigma, apply, kernel_size):
    """Separable per-sample Gaussian blur as two batched matrix products."""
    m = _blur_matrix(sigma, apply, kernel_size, x.shape[-1])  # square views: one matrix for rows and columns
    return _separable(x, m, m)


def _solarize(x, apply):
    """x -> 1 - x where x >= 0.5, i.e. min(x, 1 - x), for the samples in `apply` (a lerp with 0/1 weights: an exact
    selection)."""
    return torch.lerp(x, torch.minimum(x, 1 - x), _per_sample(apply).to(x.dtype))


def apply_view(images_uint8, params, spec, size, mean_std):
    """(n, 3, H, W) uint8 on any device -> (n, 3, size, size) float32, normalised, with per-sample `params`
    (from sample_view_params, on the images' device). No loop over samples, no host synchronisation."""
    x = _crop_resize_flip(images_uint8, params["top"], params["left"], params["height"], params["width"],
                          params["flip"], size)
    if spec.has_jitter():
        x = _color_jitter(x, params, spec)
    if spec.gray_p > 0:
        x = torch.lerp(x, _grayscale(x).expand_as(x), _per_sample(params["gray"]).to(x.dtype))
    if spec.blur_p > 0:
        x = _gaussian_blur(x, params["sigma"], params["blur"], spec.kernel_size(size))
    if spec.solarize_p > 0:
        x = _solarize(x, params["solarize"])
    for c, (mean, std) in enumerate(zip(*mean_std)):  # Python numbers: no host-to-device copy
        x[:, c].sub_(mean).div_(std)
    return x


def batched_view(spec, images_uint8, size, mean_std, generator):
    """One view of a batch: per-sample parameters from `generator` (a CPU torch.Generator), then apply_view."""
    params = sample_view_params(spec, images_uint8.shape[0], images_uint8.shape[-2:], size, generator,
                                images_uint8.device)
    return apply_view(images_uint8, params, spec, size, mean_std)


def _mix(*key):
    """A 63-bit seed from a tuple of ints, the same in every process and Python run (unlike hash of a str)."""
    digest = hashlib.blake2b(repr(tuple(int(k) for k in key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def view_generator(seed, epoch, step, view_index):
    """CPU generator whose state depends only on (seed, epoch, step, view_index)."""
    return torch.Generator().manual_seed(_mix(seed, epoch, step, view_index))


# --- data paths

def _decode_all(dataset, size):
    """(N, 3, H, W) uint8 and (N,) long labels on the CPU; if the images differ in size, each is resized to
    size x size (a warning says so)."""
    n, to_square = len(dataset), T.Resize((size, size), antialias=True)
    images, labels, resizing = None, torch.empty(n, dtype=torch.long), False
    for i in range(n):
        img, label = dataset[i]
        x, labels[i] = T.functional.pil_to_tensor(img.convert("RGB")), int(label)  # (3, h, w) uint8
        if images is None:
            images = torch.empty(n, 3, *x.shape[1:], dtype=torch.uint8)
        elif x.shape[1:] != images.shape[2:] and not resizing:
            warnings.warn(f"images differ in size ({tuple(images.shape[2:])} and {tuple(x.shape[1:])}): each is "
                          f"resized to {size}x{size} once while decoding.")
            resized = torch.empty(n, 3, size, size, dtype=torch.uint8)
            resized[:i] = to_square(images[:i])
            images, resizing = resized, True
        images[i] = x if x.shape[1:] == images.shape[2:] else to_square(x)
    return images, labels


class DeviceViews:
    """The data set decoded ONCE into a uint8 tensor (N, 3, H, W) on `device` (CUDA or CPU); each global batch is
    indexed there and its views are made there with the batched operations.

    The epoch's permutation of all N images comes from (seed, epoch); step s takes rows [s*G, (s+1)*G) of it
    (G = global_batch) and this process rows [rank*B, (rank+1)*B) of those (B = G / processes). Each view's random
    parameters are drawn for the whole global batch from (seed, epoch, step, view) and sliced to the process's rows,
    so the views do not depend on the number of processes and a mid-epoch resume (set_epoch(e, start_step)) is exact.
    Images of different sizes are resized to size x size once while decoding (a warning says so).
    """

    def __init__(self, dataset, specs, size, mean_std, global_batch, num_processes, process_index, device, seed=0):
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index {process_index} is not in [0, {num_processes}).")
        if global_batch % num_processes:
            raise UserError(f"--batch-size {global_batch} must divide evenly over {num_processes} processes.")
        if len(dataset) < global_batch:
            raise UserError(f"the dataset has {len(dataset)} images, fewer than one global batch (--batch-size "
                            f"{global_batch}): lower --batch-size.")
        self.specs, self.size, self.mean_std, self.seed = list(specs), size, mean_std, seed
        self.global_batch, self.batch = global_batch, global_batch // num_processes
        self.rank, self.device = process_index, torch.device(device)
        images, labels = _decode_all(dataset, size)
        self.images, self.labels = images.to(self.device), labels.to(self.device)
        self.epoch, self.start_step = 0, 0

    @staticmethod
    def fits(dataset_len, image_hw, device, budget_bytes):
        """Whether the decoded uint8 copy (dataset_len x 3 x H x W bytes) fits the budget (and, on CUDA, the free
        device memory)."""
        need = dataset_len * 3 * image_hw[0] * image_hw[1]
        device = torch.device(device)
        if device.type == "cuda":
            budget_bytes = min(budget_bytes, torch.cuda.mem_get_info(device)[0])
        return need <= budget_bytes

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def __len__(self):
        return len(self.labels) // self.global_batch

    def __iter__(self):
        n, hw = len(self.labels), tuple(self.images.shape[-2:])
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(self.seed, self.epoch, -1)))
        lo, hi = self.rank * self.batch, (self.rank + 1) * self.batch
        for step in range(self.start_step, len(self)):
            idx = perm[step * self.global_batch:(step + 1) * self.global_batch][lo:hi]
            idx = _params_to({"i": idx}, self.device)["i"]
            images = self.images[idx]
            views = []
            for v, spec in enumerate(self.specs):
                g = view_generator(self.seed, self.epoch, step, v)
                params = sample_view_params(spec, self.global_batch, hw, self.size, g, "cpu")
                params = _params_to(_params_slice(params, lo, hi), self.device)
                views.append(apply_view(images, params, spec, self.size, self.mean_std))
            yield views, self.labels[idx], idx


class MultiView(Dataset):
    """CPU-worker path: applies each view's transform to every sample -> ([view_0, view_1, ...], label, index).

    Randomness is seeded per (seed, epoch, index), so a sample gets the same views whatever the number of processes
    or workers, and a resumed run sees what an uninterrupted one would. The epoch lives in a shared-memory tensor,
    so persistent DataLoader workers see set_epoch from the main process (call it before iterating the loader).
    """

    def __init__(self, dataset, transforms, seed=0):
        self.dataset, self.transforms, self.seed = dataset, list(transforms), seed
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()

    @property
    def epoch(self):
        return int(self._epoch)

    def set_epoch(self, epoch):
        self._epoch.fill_(epoch)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        img, label = self.dataset[i]
        with torch.random.fork_rng(devices=[]):
            # hash of an int tuple is the same in every Python process and run (PYTHONHASHSEED salts only str/bytes)
            torch.manual_seed(hash((self.seed, self.epoch, i)) % (2**63))
            views = [t(img) for t in self.transforms]
        return views, label, i


# ----------------------------------------------------------------------------- loaders

class Transformed(Dataset):
    """A labelled dataset with one deterministic transform (evaluation)."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        img, label = self.dataset[i]
        return self.transform(img), label


def eval_transform(size, mean_std):
    """Resize (shorter side) + centre crop to the pretraining size, tensor, normalise."""
    return T.Compose([T.ToImage(), T.Resize(size, antialias=True), T.CenterCrop(size),
                      T.ToDtype(torch.float32, scale=True), T.Normalize(*mean_std)])


def per_process_batch(global_batch, num_processes):
    """--batch-size is the GLOBAL batch; each of the processes gets an equal share."""
    if global_batch % num_processes:
        raise UserError(f"--batch-size {global_batch} must divide evenly over {num_processes} processes.")
    return global_batch // num_processes


def make_loader(dataset, global_batch, num_processes, train, num_workers):
    """DataLoader with the per-process batch; wrap it with accelerator.prepare to shard it over processes."""
    bs = per_process_batch(global_batch, num_processes)
    if train and len(dataset) < global_batch:
        raise UserError(f"the dataset has {len(dataset)} images, fewer than one global batch (--batch-size "
                        f"{global_batch}): lower --batch-size.")
    return DataLoader(dataset, batch_size=bs, shuffle=train, drop_last=train, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=train and num_workers > 0)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def extract_features(backbone, loader, accelerator):
    """Backbone features (N, D) and labels (N,) of a prepared loader, gathered from every process, float32."""
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for x, y in loader:
        with accelerator.autocast():
            f = backbone(x)
        f, y = accelerator.gather_for_metrics((f.float().contiguous(), y))
        feats.append(f)
        labels.append(y)
    backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_predict(memory, memory_labels, query, num_classes, k=200, t=0.1, chunk=1024):
    """Weighted kNN (InstDisc): each of the k most cosine-similar memory items votes exp(sim / t) for its label.

    memory (N, D), query (M, D) -> class scores (M, C). Features are L2-normalised here.
    """
    memory, query = F.normalize(memory, dim=1), F.normalize(query, dim=1)
    k = min(k, memory.shape[0])
    scores = []
    for q in query.split(chunk):
        sim, idx = (q @ memory.T).topk(k, dim=1)                      # (m, k)
        weight = (sim / t).exp()
        one_hot = F.one_hot(memory_labels[idx], num_classes).float()  # (m, k, C)
        scores.append((weight.unsqueeze(-1) * one_hot).sum(1))
    return torch.cat(scores)


def knn_accuracy(backbone, memory_loader, query_loader, num_classes, accelerator, k=200, t=0.1):
    """Top-1 (%) of the weighted kNN classifier on backbone features: train split as memory, test as queries."""
    mem, mem_y = extract_features(backbone, memory_loader, accelerator)
    qry, qry_y = extract_features(backbone, query_loader, accelerator)
    pred = knn_predict(mem, mem_y, qry, num_classes, k, t).argmax(1)
    return (pred == qry_y).float().mean().item() * 100


@torch.no_grad()
def effective_rank(x, eps=1e-12):
    """Diagnostic of dimensional collapse: exp(entropy of the normalised singular values) of the centred rows of x.

    x: (N, D). Roy & Vetterli (2007)'s effective rank, a 0-dim float32 tensor on x's device (no host sync, so the
    scripts can accumulate it every step): near min(N - 1, D) for isotropic rows, 1 when every row lies on one line
    (two opposite clusters included), c - 1 for c equal clusters at orthogonal points.
    """
    x = x.detach().float()
    finite = torch.isfinite(x).all()
    x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)  # a diagnostic must never end a run: NaN out instead
    try:
        s = torch.linalg.svdvals(x - x.mean(0, keepdim=True))  # (min(N, D),)
    except RuntimeError:  # no convergence
        return torch.full((), float("nan"), device=x.device)
    p = s / s.sum().clamp_min(eps)
    return torch.where(finite, torch.exp(-(p * p.clamp_min(eps).log()).sum()), float("nan"))


# ----------------------------------------------------------------------------- run setup

def make_accelerator(cfg):
    """Accelerator with the run's precision, trackers, seedable sampling and a process-group timeout long enough for
    rank 0 to download a data set while the others wait (NCCL's default of 10 minutes is not)."""
    from accelerate import Accelerator, DataLoaderConfiguration, InitProcessGroupKwargs
    trackers = {"none": [], "tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}
    for name in trackers[cfg.report_to]:
        try:
            __import__("torch.utils.tensorboard" if name == "tensorboard" else "wandb")
        except ImportError:
            raise UserError(f"--report-to {cfg.report_to} needs the {name} package: pip install {name}") from None
    accelerator = Accelerator(
        mixed_precision=None if cfg.mixed_precision == "auto" else cfg.mixed_precision,
        log_with=trackers[cfg.report_to] or None, project_dir="runs",  # Run points the trackers at the run folder
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(hours=2))])
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return accelerator


def fast_model(model, cfg, accelerator):
    """Channels-last memory on CUDA (faster convolutions under bf16 / TF32) and, with --compile, torch.compile."""
    if accelerator.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if cfg.compile else model


def load_data(cfg, accelerator, size=None):
    """Datasets of the run -> namespace(pretrain, memory, query, num_classes, size, mean_std, cifar_stem).

    `size` overrides the pretraining resolution (e.g. a paper's 64 px for STL-10); the CIFAR stem (3x3 stride-1 conv,
    no max-pool) is used for images of 64 px or less unless --stem says otherwise."""
    with accelerator.main_process_first():  # one process downloads, the others then find the files
        pretrain, memory, query, num_classes, native, mean_std = get_datasets(cfg.dataset, cfg.data_dir, cfg.fake_size)
    size = size or native
    cifar_stem = cfg.stem == "cifar" or (cfg.stem == "auto" and size <= 64)
    return types.SimpleNamespace(pretrain=pretrain, memory=memory, query=query, num_classes=num_classes, size=size,
                                 mean_std=mean_std, cifar_stem=cifar_stem)


def provenance(accelerator):
    """Where a run came from: commit (and a dirty tree) of the checkout, library versions, hardware."""
    import accelerate
    import torchvision
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "HEAD")
    cuda = accelerator.device.type == "cuda"
    return {"git_commit": commit or None, "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))
            if commit else None, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "accelerate": accelerate.__version__,
            "device_name": torch.cuda.get_device_name(accelerator.device) if cuda else (platform.processor() or "cpu"),
            "device_count": torch.cuda.device_count() if cuda else os.cpu_count(),
            "num_processes": accelerator.num_processes, "num_nodes": int(os.environ.get("NNODES", "1") or 1),
            "mixed_precision": accelerator.mixed_precision, "hostname": platform.node()}


class NonFiniteLoss(UserError):
    pass


class Run:
    """One training run: its folder, config.json, metrics.jsonl (and trackers), the kNN monitor, crash-safe
    checkpoints, resume, preemption (SIGTERM / SIGUSR1) and the non-finite-loss stop.

    A script calls, in order: Run(...), resume(...), then per step after_step(...), per epoch end_epoch(...), and
    finish(...). The run's state lives in the objects registered with Accelerate, so a checkpoint does not depend on
    the number of processes that wrote it."""

    def __init__(self, cfg, method, accelerator, data):
        from accelerate.utils import broadcast_object_list
        self.cfg, self.method, self.accelerator, self.data = cfg, method, accelerator, data
        name = [cfg.output_dir or os.path.join("runs", f"{method}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")]
        broadcast_object_list(name)  # one folder on every process
        self.out = name[0]
        self.tic, self.signalled, self.stop_reason = time.time(), False, None
        config = {"method": method, **dataclasses.asdict(cfg)}
        path = os.path.join(self.out, "config.json")
        if cfg.resume and os.path.isfile(path):
            with open(path) as f:
                self._check_same_config(json.load(f), config)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            os.makedirs(self.out, exist_ok=True)
            with open(path, "w") as f:
                json.dump({**config, "provenance": provenance(accelerator)}, f, indent=2)
        if cfg.report_to != "none":
            accelerator.project_configuration.set_directories(self.out)
            accelerator.project_configuration.logging_dir = self.out
            accelerator.init_trackers(os.path.basename(os.path.normpath(self.out)),
                                      config={k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))})
        self.metrics_path = os.path.join(self.out, "metrics.jsonl")
        self.bad = None  # (step, terms) of the first non-finite loss, kept on the device
        self.memory_loader = self.query_loader = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    def _check_same_config(self, old, new):
        diff = [k for k in new if k not in RUN_ONLY_FIELDS and k in old and old[k] != new[k]]
        if diff and not self.cfg.allow_config_change:
            raise UserError("--resume with settings that differ from the checkpoint's config.json: " + ", ".join(
                f"{k} {old[k]!r} -> {new[k]!r}" for k in diff) + " (add --allow-config-change to resume anyway).")

    def _on_signal(self, signum, frame):
        self.signalled = True
        print(f"received {signal.Signals(signum).name}: checkpointing after the current step", file=sys.stderr)

    # ------------------------------------------------------------------------- metrics

    def log(self, **metrics):
        """One line of metrics.jsonl (main process) and the same values to the trackers, at the same step."""
        if self.accelerator.is_main_process:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}) + "\n")
        if self.cfg.report_to != "none":
            self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"},
                                 step=metrics.get("step"))

    def after_step(self, step, epoch, terms, **scalars):
        """Per step: watch the loss terms (0-dim device tensors) for non-finite values without a host sync; on a
        logging step reduce and log them; stop for a signal (single process: now; several: at the logging step, where
        the processes agree) or a non-finite loss (at the logging step or the epoch end, before any checkpoint)."""
        vals = torch.stack([t.detach().float().reshape(()) for t in terms.values()])
        if self.bad is None:
            self.bad = (torch.full((), -1, dtype=torch.long, device=vals.device), torch.zeros_like(vals),
                        torch.zeros((), dtype=torch.long, device=vals.device))
        first_bad, bad_vals, counter = self.bad
        counter += 1  # the step number, kept on the device
        new = (first_bad < 0) & ~torch.isfinite(vals).all()
        self.bad = (torch.where(new, counter, first_bad), torch.where(new, vals, bad_vals), counter)
        self.terms_names, self.step, self.epoch = list(terms), step, epoch
        logging_step = step % self.cfg.log_every == 0 or step == self.total_steps
        if logging_step:
            means = self.accelerator.reduce(vals, "mean").tolist()
            self.check_finite()
            self.log(step=step, epoch=epoch + 1, **dict(zip(terms, means)), **scalars,
                     images_per_s=self.seen / max(time.time() - self.epoch_tic, 1e-9))
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{means[0]:.3f}")
        stop = self.signalled  # a Python flag: no host sync on a single process
        if self.accelerator.num_processes > 1:  # the processes agree at logging steps only
            stop = logging_step and self.accelerator.reduce(
                torch.tensor(float(stop), device=self.accelerator.device), "sum").item() > 0
        if stop:
            self.check_finite()
            self.save_checkpoint(epoch, step)
            self.accelerator.print(f"stopped by a signal at step {step} (epoch {epoch + 1}); checkpoint written. "
                                   f"Continue with the same command plus --resume --output-dir {self.out}")
            self.accelerator.end_training()
            sys.exit(0)

    def check_finite(self):
        first_bad, bad_vals, counter = self.bad if self.bad is not None else (None, None, None)
        if first_bad is not None and first_bad.item() >= 0:
            offset = self.step - counter.item()  # the device counter started at this run's first step
            bad_step = offset + first_bad.item()
            terms = ", ".join(f"{k} {v}" for k, v in zip(self.terms_names, bad_vals.tolist()))
            raise NonFiniteLoss(f"non-finite loss at step {bad_step} (epoch {bad_step // self.steps_per_epoch + 1}): "
                                f"{terms}. The last checkpoint in {self.out} is untouched; lower --lr or use "
                                f"--mixed-precision no.")

    # ------------------------------------------------------------------------- epochs, monitor, checkpoints

    def epoch_batches(self, loader, epoch, start_step=0):
        """The epoch's batches (skipping the first `start_step` after a mid-epoch resume) behind a progress bar."""
        from tqdm.auto import tqdm
        loader.set_epoch(epoch, start_step)
        self.seen, self.epoch_tic, self.steps_per_epoch = 0, time.time(), len(loader)
        self.bar = tqdm(loader, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", initial=start_step,
                        total=len(loader), disable=not self.accelerator.is_local_main_process)
        for batch in self.bar:
            self.seen += self.cfg.batch_size
            yield batch

    def monitor(self, epoch, step, backbone, diagnostics):
        """kNN top-1 of the backbone (train split as memory, test split as queries) and the method's diagnostics."""
        if self.memory_loader is None:
            tf, n = eval_transform(self.data.size, self.data.mean_std), self.accelerator.num_processes
            self.memory_loader, self.query_loader = self.accelerator.prepare(
                make_loader(Transformed(self.data.memory, tf), self.cfg.batch_size, n, False, self.cfg.num_workers),
                make_loader(Transformed(self.data.query, tf), self.cfg.batch_size, n, False, self.cfg.num_workers))
        knn = knn_accuracy(backbone, self.memory_loader, self.query_loader, self.data.num_classes, self.accelerator,
                           self.cfg.knn_k, self.cfg.knn_t)
        self.log(epoch=epoch, step=step, knn_top1=knn, **diagnostics)
        self.accelerator.print(f"epoch {epoch}: kNN top-1 {knn:.2f}%")

    def end_epoch(self, epoch_done, step, backbone, diagnostics_fn):
        """kNN monitor and checkpoint when due; diagnostics_fn() -> dict of the method's epoch diagnostics."""
        cfg = self.cfg
        self.check_finite()
        if (cfg.eval_every and epoch_done % cfg.eval_every == 0) or epoch_done == cfg.epochs:
            self.monitor(epoch_done, step, backbone, diagnostics_fn())
        if epoch_done % cfg.checkpoint_every == 0 or epoch_done in (cfg.epochs, self.last_epoch):
            self.save_checkpoint(epoch_done, step)

    def save_checkpoint(self, epoch, step):
        """checkpoint-<step>: Accelerate state (trained network, optimiser, registered momentum state, RNG) and
        progress.json, written into a temporary folder and renamed when complete; older checkpoints are removed."""
        acc, path = self.accelerator, os.path.join(self.out, f"checkpoint-{step}")
        tmp = os.path.join(self.out, f".tmp-checkpoint-{step}")
        if acc.is_main_process and os.path.isdir(tmp):
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(tmp)
        acc.wait_for_everyone()
        if acc.is_main_process:
            with open(os.path.join(tmp, "progress.json"), "w") as f:
                json.dump({"epoch": epoch, "step": step}, f)
            if os.path.isdir(path):
                shutil.rmtree(path)
            os.replace(tmp, path)  # atomic: a checkpoint folder is complete or absent
            for d in os.listdir(self.out):
                if re.fullmatch(r"checkpoint-\d+", d) and d != os.path.basename(path):
                    shutil.rmtree(os.path.join(self.out, d))
        acc.wait_for_everyone()

    def resume(self, steps_per_epoch):
        """-> (start epoch, steps of it already done). With --resume, loads the newest complete checkpoint (one
        written by any number of processes) and says which."""
        cfg, acc = self.cfg, self.accelerator
        self.steps_per_epoch, self.total_steps = steps_per_epoch, cfg.epochs * steps_per_epoch
        self.last_epoch = min(cfg.epochs, cfg.stop_after_epochs or cfg.epochs)
        self.bar, self.seen, self.epoch_tic = None, 0, time.time()
        acc.register_save_state_pre_hook(_strip_wrapper_prefix)
        acc.register_load_state_pre_hook(lambda models, input_dir: _load_unwrapped(acc, models))
        ckpt = latest_checkpoint(self.out) if cfg.resume else None
        if cfg.resume and ckpt is None:
            acc.print(f"--resume: no complete checkpoint in {self.out}, starting from scratch")
        if ckpt is None:
            return 0, 0
        acc.load_state(ckpt)
        with open(os.path.join(ckpt, "progress.json")) as f:
            progress = json.load(f)
        step = progress.get("step", progress["epoch"] * steps_per_epoch)
        if acc.is_main_process and os.path.isfile(self.metrics_path):  # drop lines of steps that will be redone
            with open(self.metrics_path) as f:
                lines = [line for line in f if json.loads(line).get("step", 0) <= step]
            with open(self.metrics_path, "w") as f:
                f.writelines(lines)
        acc.print(f"resumed from {ckpt} (epoch {progress['epoch']}, step {step})")
        return step // steps_per_epoch, step % steps_per_epoch

    def finish(self, backbone, meta):
        """backbone.pt when the schedule is complete; wall time and peak memory as the last metrics line."""
        acc = self.accelerator
        if self.last_epoch == self.cfg.epochs and acc.is_main_process:
            save_backbone(os.path.join(self.out, "backbone.pt"), backbone,
                          {"arch": self.cfg.arch, "cifar_stem": self.data.cifar_stem, "image_size": self.data.size,
                           "mean_std": self.data.mean_std, "method": self.method, "dataset": self.cfg.dataset,
                           "epochs": self.cfg.epochs, **meta})
        if acc.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(acc.device) / 2**20
        else:  # peak resident memory of this process (Linux reports KiB)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.log(wall_time_s=round(time.time() - self.tic, 1), peak_memory_mb=round(peak, 1))
        acc.wait_for_everyone()
        acc.end_training()
        return self.out


def _strip_wrapper_prefix(models, weights, output_dir):
    """Checkpoint the trained network under its own parameter names (no DDP `module.` / compile `_orig_mod.`), so
    a checkpoint written by N processes loads into a run with any number."""
    for i, w in enumerate(weights):
        weights[i] = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in w.items()}


def _load_unwrapped(accelerator, models):
    for i, m in enumerate(models):
        models[i] = accelerator.unwrap_model(m)


def latest_checkpoint(output_dir):
    """Path of the newest complete `checkpoint-<step>` folder (one holding progress.json) in output_dir, or None."""
    if not os.path.isdir(output_dir):
        return None
    ckpts = [d for d in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", d)
             and os.path.isfile(os.path.join(output_dir, d, "progress.json"))]
    return os.path.join(output_dir, max(ckpts, key=lambda d: int(d.split("-")[1]))) if ckpts else None


def save_backbone(path, backbone, meta):
    """backbone.pt: a torchvision state_dict (no fc) plus what eval_linear.py needs to rebuild the network."""
    state = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v.detach().cpu() for k, v in backbone.state_dict().items()}
    torch.save({"state_dict": state, **meta}, path)


# ----------------------------------------------------------------------------- training data

class WorkerViews:
    """Views made per sample by torchvision in DataLoader workers (large image folders, CPU): the loader of
    ([views], labels, indices) with the same interface as DeviceViews."""

    def __init__(self, dataset, transforms, cfg, accelerator):
        self.views = MultiView(dataset, transforms, seed=cfg.seed)
        loader = make_loader(self.views, cfg.batch_size, accelerator.num_processes, True, cfg.num_workers)
        self.loader, self.accelerator, self.batches = accelerator.prepare(loader), accelerator, None

    def set_epoch(self, epoch, start_step=0):
        self.views.set_epoch(epoch)
        self.loader.set_epoch(epoch)
        self.batches = (self.accelerator.skip_first_batches(self.loader, start_step) if start_step else self.loader)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        return iter(self.batches if self.batches is not None else self.loader)


DEVICE_BUDGET_BYTES = 8 * 2**30  # the decoded uint8 copy `--views-on auto` may put on the GPU


def train_views(cfg, data, specs, accelerator):
    """The training batches: ([view per spec], labels, indices) for this process's share of each global batch.

    --views-on device: the data set decoded once onto the training device and views made there in batches;
    workers: per-sample torchvision views in DataLoader workers; auto: device on CUDA when the decoded copy fits
    DEVICE_BUDGET_BYTES, else workers."""
    mode = cfg.views_on
    if mode == "auto":
        mode = "device" if accelerator.device.type == "cuda" and DeviceViews.fits(
            len(data.pretrain), (data.size, data.size), accelerator.device, DEVICE_BUDGET_BYTES) else "workers"
    if mode == "device":
        return DeviceViews(data.pretrain, specs, data.size, data.mean_std, cfg.batch_size, accelerator.num_processes,
                           accelerator.process_index, accelerator.device, seed=cfg.seed)
    return WorkerViews(data.pretrain, [torchvision_view(s, data.size, data.mean_std) for s in specs], cfg, accelerator)
