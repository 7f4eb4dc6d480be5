"""common/data.py: data sets and their error messages, the multi-view wrapper, loaders."""
import shutil
import urllib.error

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

import common
from conftest import run


def test_multiview_applies_each_transform_independently_and_reproducibly():
    ds = common.FakeImages(4)
    tf = T.Compose([T.ToImage(), T.RandomResizedCrop(16, scale=(0.2, 1.0)), T.ToDtype(torch.float32, scale=True)])
    mv = common.MultiView(ds, [tf, tf], seed=0)
    (a, b), label, idx = mv[1]
    assert a.shape == (3, 16, 16) and label == 1 and idx == 1
    assert not torch.equal(a, b)  # same transform, independent draws
    (a2, b2), _, _ = mv[1]
    assert torch.equal(a, a2) and torch.equal(b, b2)  # same (seed, epoch, index): same views
    mv.set_epoch(1)
    assert not torch.equal(mv[1][0][0], a)  # a new epoch draws new views


def test_global_batch_is_split_over_processes():
    assert common.per_process_batch(256, 4) == 64
    with pytest.raises(common.UserError, match="--batch-size 10 must divide evenly over 4 processes"):
        common.per_process_batch(10, 4)
    loader = common.make_loader(common.FakeImages(16), 8, 2, train=False, num_workers=0)
    assert loader.batch_size == 4


def _image_folder(root, n=2, corrupt=False):
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(d / f"{i}.png")
    if corrupt:
        (root / "train" / "cat" / "broken.png").write_bytes(b"not an image")
    return str(root)


def test_imagefolder_reads_layout(tmp_path):
    pretrain, train, test, n_cls, size, _ = common.get_datasets("imagefolder", _image_folder(tmp_path))
    assert n_cls == 2 and len(train) == 4 and len(test) == 4 and size == 8 and pretrain is train


def test_imagefolder_accepts_val_instead_of_test(tmp_path):
    root = _image_folder(tmp_path)
    (tmp_path / "test").rename(tmp_path / "val")
    assert len(common.get_datasets("imagefolder", root)[2]) == 4


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "does not exist"),
    (lambda p: (p / "train").mkdir(), "holds no images"),
    (lambda p: _image_folder(p) and shutil.rmtree(p / "test"), "test'; it does not exist"),  # no test/ nor val/
    (lambda p: [(p / s / "cls").mkdir(parents=True) for s in ("train", "test")], "holds no images"),
])
def test_imagefolder_missing_or_empty_is_one_clear_error(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(common.UserError, match=message):
        common.get_datasets("imagefolder", str(tmp_path))


def test_unreadable_image_is_one_clear_error(tmp_path):
    _, train, _, _, _, _ = common.get_datasets("imagefolder", _image_folder(tmp_path, corrupt=True))
    bad = [i for i, (path, _) in enumerate(train.samples) if path.endswith("broken.png")][0]
    with pytest.raises(common.UserError, match="cannot read image .*broken.png"):
        train[bad]


def test_download_without_network_is_one_clear_error(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(common.data.datasets, "CIFAR10", no_network)
    with pytest.raises(common.UserError, match="could not download cifar10 into --data-dir"):
        common.get_datasets("cifar10", str(tmp_path))


def test_unknown_dataset_is_an_error():
    with pytest.raises(common.UserError, match="not one of"):
        common.get_datasets("mnist", "data")


def test_script_reports_unreadable_image_without_traceback(tmp_path):
    root = _image_folder(tmp_path, n=4, corrupt=True)
    p = run(["ressl.py", "--dataset", "imagefolder", "--data-dir", root, "--batch-size", "2", "--num-workers", "1",
             "--epochs", "1", "--warmup-epochs", "1", "--stem", "imagenet", "--proj-hidden", "8", "--proj-dim", "4",
             "--queue-size", "8", "--eval-every", "0", "--output-dir", str(tmp_path / "out")], check=False)
    assert p.returncode == 2 and "cannot read image" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


def _tiny_imagenet(root, classes=("n01", "n02"), per_class=3):
    for c in classes:
        d = root / "train" / c / "images"
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(d / f"{c}_{i}.JPEG")
        (root / "train" / c / f"{c}_boxes.txt").write_text("")
    (root / "val" / "images").mkdir(parents=True)
    rows = []
    for i, c in enumerate(classes * 2):
        Image.new("RGB", (64, 64), (0, i * 30, 0)).save(root / "val" / "images" / f"val_{i}.JPEG")
        rows.append(f"val_{i}.JPEG\t{c}\t0\t0\t10\t10")
    (root / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")


def test_tiny_imagenet_reads_the_distributed_layout(tmp_path):
    _tiny_imagenet(tmp_path)
    pretrain, memory, query, n_cls, size, _ = common.get_datasets("tiny-imagenet", str(tmp_path))
    assert n_cls == 2 and size == 64 and len(pretrain) == 6 and len(query) == 4
    assert [query[i][1] for i in range(4)] == [0, 1, 0, 1] and query[0][0].size == (64, 64)


def test_tiny_imagenet_through_imagefolder_says_how_to_fix_it(tmp_path):
    _tiny_imagenet(tmp_path)
    with pytest.raises(common.UserError, match="--dataset tiny-imagenet"):
        common.get_datasets("imagefolder", str(tmp_path))


def test_tiny_imagenet_without_annotations_is_one_clear_error(tmp_path):
    _tiny_imagenet(tmp_path)
    (tmp_path / "val" / "val_annotations.txt").unlink()
    with pytest.raises(common.UserError, match="val_annotations.txt"):
        common.get_datasets("tiny-imagenet", str(tmp_path))


# ----------------------------------------------------------------------------- both training paths: multi-size views

@pytest.mark.parametrize("views_on", ["device", "workers"])
def test_train_views_gives_each_view_its_own_size_in_spec_order(views_on):
    """A multi-crop spec list (the run's size, then small views of their own sizes) through train_views: every batch
    is a list with one view per spec, in the specs' order, each at spec.size or else the run's size."""
    import dataclasses
    import types
    from accelerate import Accelerator
    big = common.ViewSpec(crop_scale=(0.2, 1.0), blur_p=0.5)
    specs = [big, dataclasses.replace(big, crop_scale=(0.05, 0.2), size=8), big,
             common.ViewSpec(crop_scale=(0.05, 0.2), size=12)]
    data = types.SimpleNamespace(pretrain=common.FakeImages(12, image_size=20), size=16,
                                 mean_std=common.MEAN_STD["cifar10"])
    cfg = types.SimpleNamespace(views_on=views_on, batch_size=4, seed=0, num_workers=0)
    loader = common.train_views(cfg, data, specs, Accelerator(cpu=True))
    assert isinstance(loader, common.DeviceViews if views_on == "device" else common.WorkerViews)
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == 3
    for views, labels, idx in batches:
        assert [tuple(v.shape) for v in views] == [(4, 3, s, s) for s in (16, 8, 16, 12)]
        assert all(v.dtype == torch.float32 and v.isfinite().all() for v in views) and labels.shape == (4,)


# ----------------------------------------------------------------------------- the device path: budget, kNN monitor

class CountingImages(common.FakeImages):
    """FakeImages that counts how often an image is decoded."""
    reads = 0

    def __getitem__(self, i):
        CountingImages.reads += 1
        return super().__getitem__(i)


def test_device_budget_counts_the_native_size_and_the_monitor_splits(monkeypatch):
    """STL-10's case: 96-px images pretrained at 64 px are stored at 96 px, and the kNN monitor's splits are stored
    beside them; `--views-on auto` must budget exactly what is stored."""
    import types
    pretrain, memory, query = (common.FakeImages(n, image_size=96) for n in (40, 12, 8))
    data = types.SimpleNamespace(pretrain=pretrain, memory=memory, query=query, size=64, mean_std=common.MEAN_STD["stl10"])
    stored = (40 + 12 + 8) * 3 * 96 * 96
    assert common.device_bytes(data) == stored
    assert common.device_bytes(types.SimpleNamespace(**{**vars(data), "memory": pretrain})) == (40 + 8) * 3 * 96 * 96
    views = common.DeviceViews(pretrain, [], 64, data.mean_std, 8, 1, 0, "cpu")
    assert views.images.numel() == 40 * 3 * 96 * 96  # what decoding keeps: the native size

    # the decision of --views-on auto on a (pretend) CUDA device with plenty of free memory
    picked = []
    monkeypatch.setattr(common.data, "DeviceViews", lambda *a, **k: picked.append("device"))
    monkeypatch.setattr(common.data, "WorkerViews", lambda *a, **k: picked.append("workers"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**40, 2**40))
    accelerator = types.SimpleNamespace(device=torch.device("cuda"), num_processes=1, process_index=0)
    cfg = types.SimpleNamespace(views_on="auto", batch_size=8, seed=0)
    for budget, expected in ((stored, "device"), (stored - 1, "workers")):
        monkeypatch.setattr(common.data, "DEVICE_BUDGET_BYTES", budget)
        common.train_views(cfg, data, [], accelerator)
        assert picked[-1] == expected, budget
    # --views-on device asked for explicitly: beyond the budget is fine, beyond the free memory is one error line
    device = types.SimpleNamespace(**{**vars(cfg), "views_on": "device"})
    common.train_views(device, data, [], accelerator)
    assert picked[-1] == "device"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (stored - 1, 2**40))
    with pytest.raises(common.UserError, match="--views-on device: the decoded data set"):
        common.train_views(device, data, [], accelerator)


@pytest.mark.parametrize("native", [32, 40])
def test_knn_monitor_from_device_tensors_equals_the_loader_path_and_decodes_once(native, tmp_path):
    """The device path's kNN monitor reads the splits decoded once on the device; its features and kNN top-1 are
    the DataLoader path's (eval_transform per PIL image), with and without a resize to the pretraining size."""
    import types
    from accelerate import Accelerator
    train, query = CountingImages(48, image_size=native, seed=0), CountingImages(20, image_size=native, seed=1)
    base = dict(pretrain=train, memory=train, query=query, size=32, mean_std=common.MEAN_STD["cifar10"],
                num_classes=10)
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                   torch.nn.Conv2d(8, 16, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    accelerator = Accelerator(cpu=True)
    cfg = common.BaseConfig(batch_size=16, num_workers=0, knn_k=5, output_dir=str(tmp_path / "loader"))
    loader_run = common.Run(cfg, "test", accelerator, types.SimpleNamespace(**base), steps_per_epoch=1)
    expected = loader_run._eval_features(backbone)

    data = types.SimpleNamespace(**base)
    data.device_views = common.DeviceViews(train, [], 32, data.mean_std, 16, 1, 0, "cpu")
    cfg = common.BaseConfig(batch_size=16, num_workers=0, knn_k=5, output_dir=str(tmp_path / "device"))
    device_run = common.Run(cfg, "test", accelerator, data, steps_per_epoch=1)
    got = device_run._eval_features(backbone)
    reads = CountingImages.reads
    assert backbone.training  # the monitor restores the mode
    for (f, y), (f0, y0) in zip(got, expected):
        assert torch.equal(y, y0) and f.shape == f0.shape
        torch.testing.assert_close(f, f0, rtol=1e-5, atol=1e-5)
    assert common.knn_top1(*got, 10, 5) == common.knn_top1(*expected, 10, 5)
    device_run._eval_features(backbone)
    assert CountingImages.reads == reads  # later evaluations decode nothing


def test_device_features_are_split_over_processes_and_gathered_in_order():
    import contextlib
    import types
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(20)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    mean_std = common.MEAN_STD["cifar10"]

    def acc(rank, n):
        return types.SimpleNamespace(num_processes=n, process_index=rank, autocast=contextlib.nullcontext,
                                     gather=lambda t: t)
    whole, _ = common.extract_features_on_device(backbone, images, labels, acc(0, 1), 8, 32, mean_std)
    # 3 processes take rows 0-6, 7-13, 14-19 (+ a copy of row 19); all-gather concatenates them in rank order
    parts = [common.extract_features_on_device(backbone, images, labels, acc(r, 3), 4, 32, mean_std)[0]
             for r in range(3)]
    assert [len(p) for p in parts] == [7, 7, 7]
    torch.testing.assert_close(torch.cat(parts)[:20], whole)
