"""Throughput of each method's data path and training step, one JSON line per method.

    python bench.py --device cpu                  # minutes on a CPU: batch 32, few steps, a reduced model
    python bench.py --device cuda                 # on a GPU: batch 256, bf16, the CIFAR-10 shapes
    python bench.py --device cuda --methods ressl smog --data-zip cifar10-jpeg.zip

Keys (samples/s unless said otherwise):
    data_torchvision_1core  the method's views made per sample by torchvision on one CPU core (the workers path)
    data_batched            the same views made in batches on --device (the --views-on device path)
    model_only              the method's own train_step on views already on the device (no data loading)
    train_step              train_step fed by the data path the script would use on --device (common.train_views)
    train_over_model        train_step / model_only: 1.0 means the data path costs nothing
Images are CIFAR-10's 32 px (from --data-zip, an ImageFolder zip, when given; else synthetic). Ratios are from one
run: compare numbers of the same run only.

    python bench.py --imagenet-decode --data-zip cifar10-jpeg.zip   # the workers path at ImageNet size, one core

prints instead what one CPU core feeds a 224-px run on the workers path (--views-on workers), in images per
CPU-second of this process (other load on the machine does not lower it), for: reading + decoding a 500x375 JPEG
(quality 90) of an ImageNet-layout folder (common.get_datasets("imagenet")); one view RandomResizedCrop(224) + flip +
float + normalise (torchvision_view); decode + 1 and + 2 such views; then decode + each method's own views at 224
(jitter, blur, ...). The JPEGs are CIFAR-10 images (--data-zip) or synthetic ones, upscaled; --decode-noise adds pixel
noise, which makes the files larger and slower to decode, like photos: ImageNet's train JPEGs average about 110 KB
(its 138 GB train tar over 1,281,167 images); `mean_kb` gives these ones'.
"""
import argparse
import importlib
import io
import json
import os
import tempfile
import time
import types
import zipfile

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

import common

METHODS = ["ressl", "smog", "median_triplet", "hnpm", "reco"]
CIFAR10_MEAN_STD = common.MEAN_STD["cifar10"]


def load_images(data_zip, n):
    """n (PIL image, label) pairs spread over the train images of an ImageFolder (a zip, or an extracted folder with
    train/<class>/*), or synthetic ones."""
    if not data_zip:
        fake = common.FakeImages(n, image_size=32)
        return [fake[i] for i in range(n)]
    if os.path.isdir(data_zip):
        root = os.path.join(data_zip, "train")
        names = sorted(os.path.join(c, x) for c in os.listdir(root) for x in os.listdir(os.path.join(root, c))
                       if x.endswith((".jpg", ".png")))
        step = max(1, len(names) // n)
        classes = sorted(os.listdir(root))
        return [(Image.open(os.path.join(root, x)).convert("RGB"), classes.index(x.split(os.sep)[0]))
                for x in names[::step][:n]]
    with zipfile.ZipFile(data_zip) as z:
        names = sorted(x for x in z.namelist() if x.startswith("train/") and x.endswith((".jpg", ".png")))
        classes = sorted({x.split("/")[1] for x in names})
        step = max(1, len(names) // n)
        return [(Image.open(io.BytesIO(z.read(x))).convert("RGB"), classes.index(x.split("/")[1]))
                for x in names[::step][:n]]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, n_items, device, repeat):
    """Items per second of fn() over `repeat` calls, after one warm-up call."""
    fn()
    sync(device)
    tic = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return n_items * repeat / (time.perf_counter() - tic)


def bench_method(name, images, args, accelerator):
    m = importlib.import_module(name)
    device, batch, size = accelerator.device, args.batch_size, 32
    cpu_model = {} if device.type == "cuda" else {"stem": "imagenet", **CPU_HEADS.get(name, {})}
    cfg = m.Config(dataset="fake", batch_size=batch, num_workers=args.num_workers, epochs=10, warmup_epochs=1,
                   views_on="device" if device.type == "cuda" else "workers", seed=0, **cpu_model)
    data = types.SimpleNamespace(pretrain=images, size=size, mean_std=CIFAR10_MEAN_STD, num_classes=10,
                                 cifar_stem=cfg.stem != "imagenet")
    specs = m.view_specs(cfg, size)
    row = {"method": name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}

    # (a) torchvision per sample on one core
    tfs = [common.torchvision_view(s, size, CIFAR10_MEAN_STD) for s in specs]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pil = [img for img, _ in images[:args.tv_samples]]
    row["data_torchvision_1core"] = timed(lambda: [t(img) for img in pil for t in tfs], len(pil), torch.device("cpu"), 1)
    if device.type == "cuda":  # on the CPU the batched views are measured on the same single core
        torch.set_num_threads(threads)

    # (b) batched views on the device, at the default global batch whatever the model's batch here
    u8 = torch.stack([pil_to_tensor(img) for img, _ in images[:args.data_batch]]).to(device)  # (N, 3, 32, 32) uint8
    gens = [common.view_generator(0, 0, 0, v) for v in range(len(specs))]
    row["data_batched"] = timed(lambda: [common.batched_view(s, u8, size, CIFAR10_MEAN_STD, g)
                                         for s, g in zip(specs, gens)], len(u8), device, max(args.steps, 3))
    u8 = u8[:batch]

    # (c) the training step on device-resident views
    set_seed(0)
    model, optimizer, state = m.setup(cfg, data, accelerator)
    model.train()
    views = [common.batched_view(s, u8, size, CIFAR10_MEAN_STD, g) for s, g in zip(specs, gens)]
    labels = torch.tensor([lab for _, lab in images[:batch]], device=device)
    counter = iter(range(10**9))

    def step_on(v, y):
        step = next(counter)
        m.train_step(model, state, optimizer, v, y, cfg, m.schedules(cfg, step, 100), step, accelerator)
    row["model_only"] = timed(lambda: step_on(views, labels), batch, device, args.steps)

    # (d) the full step with the script's data path
    loader = common.train_views(cfg, data, specs, accelerator)
    loader.set_epoch(0)
    batches = iter(loader)

    def full_step():
        nonlocal batches
        try:
            v, y, _ = next(batches)
        except StopIteration:
            batches = iter(loader)
            v, y, _ = next(batches)
        step_on(v, y)
    row["train_step"] = timed(full_step, batch, device, args.steps)
    row["train_over_model"] = row["train_step"] / row["model_only"]
    torch.set_num_threads(threads)
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}


# --device cpu times a reduced model (standard stem: 16x fewer FLOPs at 32 px; narrow heads) so that the whole
# benchmark takes minutes on one core; --device cuda times every script at its defaults
CPU_HEADS = {"ressl": {"proj_hidden": 512}, "smog": {"proj_hidden": 512}, "median_triplet": {"proj_hidden": 512},
             "hnpm": {}, "reco": {}}


def cpu_timed(fn, n_items, repeat):
    """Items per CPU-second of this process over `repeat` calls, after one warm-up call: a one-core figure that
    other work on the machine does not lower (the work timed is single-threaded)."""
    fn()
    tic = time.process_time()
    for _ in range(repeat):
        fn()
    return n_items * repeat / (time.process_time() - tic)


def imagenet_jpegs(root, images, wh=(500, 375), quality=90, noise=0.0, seed=0):
    """Writes ImageNet's layout (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG) under root from (PIL image, label) pairs,
    each upscaled (bicubic) to wh, plus Gaussian pixel noise of std `noise` (0-255 scale); returns the mean file KB."""
    g, sizes, in_val = torch.Generator().manual_seed(seed), [], set()
    for i, (img, label) in enumerate(images):
        big = pil_to_tensor(img.convert("RGB").resize(wh, Image.BICUBIC)).float()
        if noise:
            big += noise * torch.randn(big.shape, generator=g)
        big = Image.fromarray(big.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
        for split in ("train",) if label in in_val else ("train", "val"):  # val: one image a class
            in_val.add(label)
            path = os.path.join(root, split, f"n{label:08d}", f"{i:06d}.JPEG")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            big.save(path, quality=quality)
        sizes.append(os.path.getsize(os.path.join(root, "train", f"n{label:08d}", f"{i:06d}.JPEG")))
    return sum(sizes) / len(sizes) / 1024


def bench_imagenet_decode(args, source):
    """One core's images/s on the workers path at 224 px (see the module docstring) -> list of JSON rows."""
    images = load_images(source, args.decode_images)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        with tempfile.TemporaryDirectory() as root:
            kb = imagenet_jpegs(root, images, noise=args.decode_noise)
            train = common.get_datasets("imagenet", root)[0]
            mean_std = common.IMAGENET_MEAN_STD
            crop_flip = common.torchvision_view(common.ViewSpec(crop_scale=(0.08, 1.0)), 224, mean_std)
            decoded = [train[i][0] for i in range(len(train))]
            n, rep = len(train), args.decode_repeat

            def decode_then(views):  # what a worker does per sample: read + decode once, then each view
                return lambda: [v(img) for i in range(n) for img in [train[i][0]] for v in views]

            row = {"bench": "imagenet_decode", "source": ("cifar10" if source else "synthetic") + " upscaled",
                   "image_wh": list(decoded[0].size), "quality": 90, "noise": args.decode_noise,
                   "mean_kb": round(kb, 1), "images": len(train)}
            row["decode_1core"] = cpu_timed(lambda: [train[i] for i in range(n)], n, rep)
            row["crop_flip_1core"] = cpu_timed(lambda: [crop_flip(x) for x in decoded], n, rep)
            row["decode_crop_flip_1core"] = cpu_timed(decode_then([crop_flip]), n, rep)
            row["decode_2x_crop_flip_1core"] = cpu_timed(decode_then([crop_flip, crop_flip]), n, rep)
            rows = [row]
            for name in args.methods:
                m = importlib.import_module(name)
                cfg = m.Config(dataset="imagenet")
                if hasattr(m, "PAPER"):  # the settings a run on ImageNet gets (--recipe auto)
                    cfg = common.resolve_recipe(cfg, m.PAPER)
                tfs = [common.torchvision_view(s, 224, mean_std) for s in m.view_specs(cfg, 224)]
                rows.append({"bench": "imagenet_decode", "method": name, "views": len(tfs),
                             "decode_views_1core": cpu_timed(decode_then(tfs), n, rep)})
    finally:
        torch.set_num_threads(threads)
    return [{k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()} for r in rows]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    p.add_argument("--batch-size", type=int, default=0, help="0: 256 on cuda, 32 on cpu")
    p.add_argument("--steps", type=int, default=0, help="timed steps per measurement; 0: 50 on cuda, 3 on cpu")
    p.add_argument("--tv-samples", type=int, default=256, help="images for the torchvision measurement")
    p.add_argument("--data-batch", type=int, default=256, help="batch of the batched-views measurement")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers of the workers path")
    p.add_argument("--data-zip", default=os.environ.get("CIFAR10_JPEG_ZIP", ""),
                   help="ImageFolder zip (or extracted folder) of 32-px images")
    p.add_argument("--mixed-precision", default="", help="default: bf16 on cuda, no on cpu")
    p.add_argument("--imagenet-decode", action="store_true",
                   help="instead: one core's decode + view throughput at ImageNet size (see above)")
    p.add_argument("--decode-images", type=int, default=100, help="JPEGs of --imagenet-decode")
    p.add_argument("--decode-repeat", type=int, default=2, help="timed passes over them")
    p.add_argument("--decode-noise", type=float, default=0.0, help="pixel noise std (0-255) added to the JPEGs")
    args = p.parse_args(argv)
    if args.imagenet_decode:
        for row in bench_imagenet_decode(args, args.data_zip if os.path.exists(args.data_zip) else ""):
            print(json.dumps(row), flush=True)
        return
    cuda = args.device == "cuda"
    args.batch_size = args.batch_size or (256 if cuda else 32)
    args.steps = args.steps or (50 if cuda else 3)
    accelerator = Accelerator(cpu=not cuda, mixed_precision=args.mixed_precision or ("bf16" if cuda else "no"))
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    images = load_images(args.data_zip if os.path.exists(args.data_zip) else "",
                         max(4 * args.batch_size, args.data_batch, args.tv_samples, 512))
    for name in args.methods:
        print(json.dumps(bench_method(name, images, args, accelerator)), flush=True)


if __name__ == "__main__":
    main()
