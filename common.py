"""Data and evaluation plumbing shared by the five method scripts.

Nothing in here is part of any paper's method: datasets and their download, the multi-view wrapper, loaders that
split the global batch, the weighted kNN monitor, feature extraction, the dataclass-to-argparse helper, JSONL
metrics and seeding. Everything a paper describes lives in its own script.
"""
import argparse
import dataclasses
import inspect
import json
import os
import re
import sys
import typing
import urllib.error

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision.transforms import v2 as T


class UserError(Exception):
    """Bad input (flag, path, data). Scripts print its message and exit, no traceback."""


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

def _field_comments(cls):
    """`name: type = default  # comment` lines of a dataclass -> {name: comment}, used as --help text."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        for line in inspect.getsource(klass).splitlines():
            m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.*)$", line)
            if m:
                comments[m.group(1)] = m.group(2).strip()
    return comments


def parse_config(config_cls, argv=None):
    """Typed flags from a dataclass: `lr: float = 0.06  # comment` becomes `--lr FLOAT` with that help text.

    bool fields get `--name / --no-name`, Literal[...] fields get choices, an unknown flag is an error naming it.
    """
    parser = argparse.ArgumentParser(description=(sys.modules[config_cls.__module__].__doc__ or "").split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    comments = _field_comments(config_cls)
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        flag, tp, help_ = "--" + f.name.replace("_", "-"), hints[f.name], comments.get(f.name, "")
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        elif typing.get_origin(tp) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(tp), default=f.default, help=help_)
        else:
            parser.add_argument(flag, type=tp, default=f.default, help=help_)
    return config_cls(**vars(parser.parse_args(argv)))


# ----------------------------------------------------------------------------- datasets

IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "stl10": 96, "fake": 32}
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
            raise UserError(f"class folders of {test_dir!r} differ from those of the train folder.")
        pretrain, n_cls = train, len(train.classes)
    elif name == "fake":
        train, test = FakeImages(fake_size, seed=0), FakeImages(max(fake_size // 4, 10), seed=1)
        pretrain, n_cls = train, 10
    else:
        raise UserError(f"--dataset {name!r} is not one of cifar10, cifar100, stl10, imagefolder, fake.")
    if len(pretrain) == 0:
        raise UserError(f"dataset {name!r} in {data_dir!r} is empty.")
    if name == "imagefolder":
        size = _first_image_size(train)
        stats = IMAGENET_MEAN_STD
    else:
        size, stats = IMAGE_SIZE[name], MEAN_STD.get(name, IMAGENET_MEAN_STD)
    return pretrain, train, test, n_cls, size, stats


def _first_image_size(ds):
    """Pretraining resolution for an ImageFolder: the first image's shorter side, capped at 224."""
    w, h = ds[0][0].size
    return min(w, h, 224)


class MultiView(Dataset):
    """Applies each view's transform independently to every sample: returns ([view_0, view_1, ...], label, index).

    Randomness is seeded per (seed, epoch, index), so a sample gets the same views whatever the number of processes
    or workers, and a resumed run sees what an uninterrupted one would.
    """

    def __init__(self, dataset, transforms, seed=0):
        self.dataset, self.transforms, self.seed, self.epoch = dataset, list(transforms), seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        img, label = self.dataset[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, i)) % (2**63))
            views = [t(img) for t in self.transforms]
        return views, label, i


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
                      pin_memory=torch.cuda.is_available(), persistent_workers=False)


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
    s = torch.linalg.svdvals(x - x.mean(0, keepdim=True))  # (min(N, D),)
    p = s / s.sum().clamp_min(eps)
    return torch.exp(-(p * p.clamp_min(eps).log()).sum())


# ----------------------------------------------------------------------------- runs

class MetricLogger:
    """Appends one JSON object per call to metrics.jsonl (main process only)."""

    def __init__(self, path, enabled=True):
        self.path, self.enabled = path, enabled

    def log(self, **metrics):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}) + "\n")


def latest_checkpoint(output_dir):
    """Path of the newest `checkpoint-<epoch>` folder in output_dir, or None."""
    if not os.path.isdir(output_dir):
        return None
    ckpts = [d for d in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", d)]
    return os.path.join(output_dir, max(ckpts, key=lambda d: int(d.split("-")[1]))) if ckpts else None


def save_backbone(path, backbone, meta):
    """backbone.pt: a torchvision state_dict (no fc) plus what eval_linear.py needs to rebuild the network."""
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in backbone.state_dict().items()}, **meta}, path)
