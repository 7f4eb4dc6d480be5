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
