"""Data: the data sets, and the two paths that turn them into batches of views.

- `get_datasets` / `load_data`: CIFAR-10/100, STL-10 (torchvision downloads), image folders, Tiny-ImageNet, ImageNet
  (ILSVRC-2012) and its 100-class subset ImageNet-100, and a synthetic `fake` set -> PIL images and labels;
  `load_data` adds the pretraining size and the stem choice.
- `train_views` picks one of two paths with the same interface, an iterable of ([view per spec], labels, indices)
  for this process's share of each global batch:
  `DeviceViews`: the data set decoded once to uint8 on the training device, views made there in batches
  (common/views.py, `apply_view`);
  `WorkerViews`: per-sample torchvision views (`torchvision_view`) in DataLoader workers.
- Loaders for evaluation: `Transformed`, `eval_transform`, `make_loader`.
"""
import os
import types
import urllib.error
import warnings

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision.transforms import v2 as T

from .config import UserError, check_divides, seed_for
from .views import apply_view, params_slice, params_to, sample_view_params, torchvision_view, view_generator

# ----------------------------------------------------------------------------- data sets

IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "stl10": 96, "tiny-imagenet": 64, "imagenet": 224, "imagenet100": 224,
              "fake": 32}
MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
}
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# the ImageNet-100 classes of CMC (https://arxiv.org/abs/1906.05849), one wnid a line
IMAGENET100_CLASSES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet100.txt")


class FakeImages(Dataset):
    """Deterministic synthetic RGB images with labels: class c has a colour offset so kNN has something to find."""

    def __init__(self, size=64, image_size=32, num_classes=10, seed=0):
        self.size, self.image_size, self.num_classes, self.seed = size, image_size, num_classes, seed

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(seed_for(self.seed, "fake", i))
        label = i % self.num_classes
        x = torch.rand(3, self.image_size, self.image_size, generator=g) * 0.5
        x += torch.linspace(0, 0.5, self.num_classes)[label].view(-1, 1, 1) * torch.tensor([1.0, -1.0, 0.5]).view(3, 1, 1)
        return T.functional.to_pil_image(x.clamp(0, 1)), label


def _download_error(name, data_dir, err):
    return UserError(
        f"could not download {name} into --data-dir {data_dir!r} ({type(err).__name__}: {err}). Without network, "
        f"put the dataset there yourself (torchvision layout) or use --dataset imagefolder with "
        f"<data-dir>/train/<class>/* and <data-dir>/test/<class>/*.")


class _ClassFolders(datasets.ImageFolder):
    """ImageFolder over the named class folders only: the others are never listed (ImageNet-100 from full ImageNet)."""

    def __init__(self, root, classes):
        self.wanted = sorted(classes)
        super().__init__(root)

    def find_classes(self, directory):
        return self.wanted, {c: i for i, c in enumerate(self.wanted)}


def _checked_image_folder(root, split_dir, name="imagefolder", classes=None):
    if not os.path.isdir(split_dir):
        raise UserError(f"--dataset imagefolder expects the folder {split_dir!r}; it does not exist. Layout: "
                        f"{root}/train/<class>/<image> and {root}/test/<class>/<image> (or val/).")
    try:
        ds = datasets.ImageFolder(split_dir) if classes is None else _ClassFolders(split_dir, classes)
    except FileNotFoundError as e:  # raised for no class folder or no image file
        raise UserError(f"--dataset {name}: {split_dir!r} holds no images in class sub-folders ({e}).")
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
    elif name in ("imagenet", "imagenet100"):
        train, test = _imagenet(data_dir, name, imagenet100_classes() if name == "imagenet100" else None)
        pretrain, n_cls = train, len(train.classes)
    elif name == "fake":
        train, test = FakeImages(fake_size, seed=0), FakeImages(max(fake_size // 4, 10), seed=1)
        pretrain, n_cls = train, 10
    else:
        raise UserError(f"--dataset {name!r} is not one of cifar10, cifar100, stl10, tiny-imagenet, imagenet, "
                        f"imagenet100, imagefolder, fake.")
    if len(pretrain) == 0:
        raise UserError(f"dataset {name!r} in {data_dir!r} is empty.")
    if name == "imagefolder":
        size = _first_image_size(train)
        stats = IMAGENET_MEAN_STD
    elif name in ("tiny-imagenet", "imagenet", "imagenet100"):
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


def imagenet100_classes(path=None):
    """The wnids of ImageNet-100 from common/imagenet100.txt (one a line, `#` starts a comment)."""
    with open(path or IMAGENET100_CLASSES) as f:
        return [w for w in (line.split("#")[0].strip() for line in f) if w]


def _imagenet(root, name, classes=None):
    """ILSVRC-2012 as usually prepared: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (val sorted into class folders).

    classes: keep only these wnids (ImageNet-100; the tree may hold more). Nothing is decoded here: ImageFolder lists
    the files of the class folders, as it does for any image folder."""
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    for d in (train_dir, val_dir):
        if not os.path.isdir(d):
            raise UserError(f"--dataset {name} expects the folder {d!r}; it does not exist. Layout (ILSVRC-2012): "
                            f"{root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG.")
    with os.scandir(val_dir) as entries:  # one listing of val/, no image opened
        flat = sum(e.is_file() and e.name.lower().endswith(datasets.folder.IMG_EXTENSIONS) for e in entries)
    if flat:
        raise UserError(
            f"--dataset {name}: {val_dir!r} holds {flat} images directly, not in class folders val/<wnid>/*.JPEG "
            f"(the val tar of ILSVRC-2012 unpacks flat). Sort them once: run the widely used valprep.sh inside val/ "
            f"(https://raw.githubusercontent.com/soumith/imagenetloader.torch/master/valprep.sh), or move each image "
            f"into the folder of its label in the devkit's data/ILSVRC2012_validation_ground_truth.txt (its class IDs "
            f"map to wnids through data/meta.mat).")
    if classes is not None:
        for d in (train_dir, val_dir):
            missing = sorted(set(classes) - set(os.listdir(d)))
            if missing:
                more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                raise UserError(f"--dataset {name}: {d!r} lacks {len(missing)} of the {len(classes)} class folders "
                                f"of ImageNet-100 (common/imagenet100.txt): {', '.join(missing[:5])}{more}. Point "
                                f"--data-dir at full ImageNet or at a tree with all of them.")
    train = _checked_image_folder(root, train_dir, name, classes)
    val = _checked_image_folder(root, val_dir, name, classes)
    if val.classes != train.classes:
        extra = sorted(set(train.classes) ^ set(val.classes))
        raise UserError(f"--dataset {name}: the class folders of {val_dir!r} and {train_dir!r} differ "
                        f"({len(extra)} in only one of them, e.g. {extra[0]}); both need the same <wnid> folders.")
    return train, val


def _first_image_size(ds):
    """Pretraining resolution for an ImageFolder: the first image's shorter side, capped at 224."""
    w, h = ds[0][0].size
    return min(w, h, 224)


def load_data(cfg, accelerator, size=None):
    """Datasets of the run -> namespace(pretrain, memory, query, num_classes, size, mean_std, cifar_stem).

    `size` overrides the pretraining resolution (e.g. a paper's 64 px for STL-10); the CIFAR stem (3x3 stride-1 conv,
    no max-pool) is used for images of 64 px or less unless --stem says otherwise."""
    # one process per node downloads (nodes may not share a file system), the others then find the files
    with accelerator.local_main_process_first():
        pretrain, memory, query, num_classes, native, mean_std = get_datasets(cfg.dataset, cfg.data_dir, cfg.fake_size)
    size = size or native
    cifar_stem = cfg.stem == "cifar" or (cfg.stem == "auto" and size <= 64)
    return types.SimpleNamespace(pretrain=pretrain, memory=memory, query=query, num_classes=num_classes, size=size,
                                 mean_std=mean_std, cifar_stem=cifar_stem)


# ----------------------------------------------------------------------------- training batches: two paths

DEVICE_BUDGET_BYTES = 8 * 2**30  # the decoded uint8 copy `--views-on auto` may put on the GPU


def train_views(cfg, data, specs, accelerator):
    """The training batches: ([view per spec], labels, indices) for this process's share of each global batch; view
    v is (B, 3, S, S) with S = specs[v].output_size(data.size), so a multi-crop list yields views of several sizes.

    --views-on device: the data set decoded once onto the training device and views made there in batches (the kNN
    monitor then reads its splits from the device too: `data.device_views` is set); workers: per-sample torchvision
    views in DataLoader workers; auto: device on CUDA when the decoded copies fit DEVICE_BUDGET_BYTES and the free
    memory of every process's device, else workers."""
    mode = cfg.views_on
    if mode != "workers":
        cuda = accelerator.device.type == "cuda"
        budget = DEVICE_BUDGET_BYTES if mode == "auto" else float("inf")  # explicit: the free memory is the limit
        need = device_bytes(data) if cuda else 0
        fits = _fits(need, accelerator.device, budget) if cuda else mode == "device"
        if accelerator.num_processes > 1:  # one decision for all: the device with the least free memory decides
            fits = accelerator.reduce(torch.tensor(float(not fits), device=accelerator.device), "sum").item() == 0
        if mode == "device" and not fits:
            raise UserError(f"--views-on device: the decoded data set ({need / 2**30:.1f} GiB) does not "
                            f"fit the free memory of every process's device; use --views-on workers (or auto).")
        mode = "device" if fits else "workers"
    if mode == "device":
        data.device_views = DeviceViews(data.pretrain, specs, data.size, data.mean_std, cfg.batch_size,
                                        accelerator.num_processes, accelerator.process_index, accelerator.device,
                                        seed=cfg.seed)
        return data.device_views
    return WorkerViews(data.pretrain, [torchvision_view(s, data.size, data.mean_std) for s in specs], cfg, accelerator)


def device_bytes(data):
    """Bytes of the uint8 copies the device path keeps: the pretraining split and the kNN monitor's memory (when it
    is another data set) and query splits, each at its first image's native size (what decoding stores; images of
    another size are resized to data.size)."""
    total = 0
    for ds in {id(d): d for d in (data.pretrain, data.memory, data.query)}.values():
        w, h = ds[0][0].size
        total += len(ds) * 3 * h * w
    return total


def _fits(need_bytes, device, budget_bytes):
    device = torch.device(device)
    if device.type == "cuda":
        budget_bytes = min(budget_bytes, torch.cuda.mem_get_info(device)[0])
    return need_bytes <= budget_bytes


def decode_all(dataset, size):
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
    Each view comes out at its spec's own size (`size` for specs without one). Images of different sizes are resized
    to size x size once while decoding (a warning says so).
    """

    def __init__(self, dataset, specs, size, mean_std, global_batch, num_processes, process_index, device, seed=0):
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index {process_index} is not in [0, {num_processes}).")
        check_divides(global_batch, num_processes)
        check_enough_images(len(dataset), global_batch)
        self.specs, self.size, self.mean_std, self.seed = list(specs), size, mean_std, seed
        self.global_batch, self.batch = global_batch, global_batch // num_processes
        self.rank, self.device = process_index, torch.device(device)
        images, labels = decode_all(dataset, size)
        self.images, self.labels = images.to(self.device), labels.to(self.device)
        self.epoch, self.start_step = 0, 0

    @staticmethod
    def fits(dataset_len, image_hw, device, budget_bytes):
        """Whether the decoded uint8 copy (dataset_len x 3 x H x W bytes) fits the budget (and, on CUDA, the free
        device memory)."""
        return _fits(dataset_len * 3 * image_hw[0] * image_hw[1], device, budget_bytes)

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def __len__(self):
        return len(self.labels) // self.global_batch

    def __iter__(self):
        n, hw = len(self.labels), tuple(self.images.shape[-2:])
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed_for(self.seed, "order", self.epoch)))
        lo, hi = self.rank * self.batch, (self.rank + 1) * self.batch
        for step in range(self.start_step, len(self)):
            idx = perm[step * self.global_batch:(step + 1) * self.global_batch][lo:hi]
            idx = params_to({"i": idx}, self.device)["i"]
            images = self.images[idx]
            views = []
            for v, spec in enumerate(self.specs):
                g = view_generator(self.seed, self.epoch, step, v)
                params = sample_view_params(spec, self.global_batch, hw, self.size, g, "cpu")
                params = params_to(params_slice(params, lo, hi), self.device)
                views.append(apply_view(images, params, spec, self.size, self.mean_std))
            yield views, self.labels[idx], idx


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


class MultiView(Dataset):
    """CPU-worker path: applies each view's transform to every sample -> ([view_0, view_1, ...], label, index); the
    default collate stacks each view separately, so views of different sizes batch as a list.

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
            torch.manual_seed(seed_for(self.seed, "views", self.epoch, i))
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


def eval_batch(images_uint8, size, mean_std):
    """eval_transform for a batch of uint8 tensors (N, 3, H, W) on any device, the same operations in the same
    order (resize of the uint8 image, centre crop, scale, normalise) -> float32 (N, 3, size, size)."""
    x = images_uint8
    if tuple(x.shape[-2:]) != (size, size):
        x = T.functional.center_crop(T.functional.resize(x, size, antialias=True), size)
    return T.functional.normalize(T.functional.to_dtype(x, torch.float32, scale=True), *mean_std)


def per_process_batch(global_batch, num_processes):
    """--batch-size is the GLOBAL batch; each of the processes gets an equal share."""
    check_divides(global_batch, num_processes)
    return global_batch // num_processes


def check_enough_images(num_images, global_batch):
    """A training epoch drops the last partial batch: the data set must hold at least one global batch."""
    if num_images < global_batch:
        raise UserError(f"the dataset has {num_images} images, fewer than one global batch (--batch-size "
                        f"{global_batch}): lower --batch-size.")


def make_loader(dataset, global_batch, num_processes, train, num_workers):
    """DataLoader with the per-process batch; wrap it with accelerator.prepare to shard it over processes."""
    bs = per_process_batch(global_batch, num_processes)
    if train:
        check_enough_images(len(dataset), global_batch)
    return DataLoader(dataset, batch_size=bs, shuffle=train, drop_last=train, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=train and num_workers > 0)
