"""common.py: config parsing, datasets and their error messages, multi-view wrapper, loaders, kNN monitor."""
import dataclasses
import math
import shutil
import urllib.error
from typing import Literal

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

import common
from conftest import run


@dataclasses.dataclass
class Cfg:
    lr: float = 0.1  # the learning rate
    epochs: int = 3  # how long
    name: str = "x"  # a name
    flag: bool = True  # a switch
    mode: Literal["a", "b"] = "a"  # a choice


def test_parse_config_types_bools_choices():
    cfg = common.parse_config(Cfg, ["--lr", "0.5", "--epochs", "7", "--no-flag", "--mode", "b"])
    assert cfg == Cfg(lr=0.5, epochs=7, name="x", flag=False, mode="b")
    assert common.parse_config(Cfg, []) == Cfg()


def test_parse_config_help_comes_from_field_comments(capsys):
    with pytest.raises(SystemExit):
        common.parse_config(Cfg, ["--help"])
    out = capsys.readouterr().out
    assert "the learning rate" in out and "--no-flag" in out and "{a,b}" in out


@pytest.mark.parametrize("argv, message", [(["--lrr", "1"], "unrecognized arguments: --lrr"),
                                            (["--epochs", "two"], "invalid int value: 'two'"),
                                            (["--mode", "c"], "invalid choice: 'c'")])
def test_parse_config_bad_flag_is_an_error_naming_it(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        common.parse_config(Cfg, argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


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


def test_knn_predict_hand_computed():
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]])
    labels = torch.tensor([0, 1, 1])
    scores = common.knn_predict(memory, labels, torch.tensor([[2.0, 0.0]]), num_classes=2, k=2, t=0.1)
    # the 2 nearest are item 0 (cos 1, class 0) and item 2 (cos 0.9/sqrt(0.82), class 1)
    expected = [math.exp(1 / 0.1), math.exp(0.9 / math.sqrt(0.82) / 0.1)]
    assert scores[0].tolist() == pytest.approx(expected, rel=1e-5)



def test_knn_of_a_collapsed_encoder_is_chance():
    """The floor of tests/test_learning.py rests on this: identical features predict one class for every query, so
    on balanced classes top-1 is 1 / C (10 % on CIFAR-10)."""
    labels = torch.arange(10).repeat(20)  # 200 memory items, balanced
    pred = common.knn_predict(torch.ones(200, 8), labels, torch.ones(100, 8), num_classes=10, k=50).argmax(1)
    accuracy = (pred == torch.arange(10).repeat(10)).float().mean().item()
    assert len(set(pred.tolist())) == 1 and accuracy == pytest.approx(0.1)

# ----------------------------------------------------------------------------- datasets and bad input

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


def test_effective_rank_hand_computed():
    # singular values (2, 1) after centring: p = (2/3, 1/3), exp(entropy) = exp(-(2/3 ln 2/3 + 1/3 ln 1/3)) = 1.8899
    x = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]]) / math.sqrt(2)
    assert common.effective_rank(x).item() == pytest.approx(math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))),
                                                     rel=1e-5)
    two_clusters = torch.tensor([[1.0, 2.0, 3.0]] * 5 + [[-1.0, 0.0, 1.0]] * 5)
    assert common.effective_rank(two_clusters).item() == pytest.approx(1.0, abs=1e-4)  # all on one line after centring
    assert common.effective_rank(torch.eye(4).repeat(3, 1)).item() == pytest.approx(3.0, rel=1e-4)  # 4 clusters -> 3
    assert common.effective_rank(torch.randn(4000, 8, generator=torch.Generator().manual_seed(0))).item() > 7.9


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
    monkeypatch.setattr(common.datasets, "CIFAR10", no_network)
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


@dataclasses.dataclass
class HashCfg:
    tag: str = "a#b"  # a default holding a hash sign
    size: int = 3  # plain


def test_help_is_not_garbled_by_a_hash_in_a_default(capsys):
    assert common._field_comments(HashCfg) == {"tag": "a default holding a hash sign", "size": "plain"}
    with pytest.raises(SystemExit):
        common.parse_config(HashCfg, ["--help"])
    out = capsys.readouterr().out
    assert "a default holding a hash sign" in out and "a#b" in out


def test_config_without_source_still_parses(monkeypatch):
    """A Config pasted into a notebook or REPL has no source file: flags work, without help text."""
    def no_source(obj):
        raise OSError("could not get source code")
    monkeypatch.setattr(common.inspect, "getsource", no_source)
    assert common._field_comments(Cfg) == {}
    assert common.parse_config(Cfg, ["--lr", "0.5", "--no-flag"]) == Cfg(lr=0.5, flag=False)


def test_config_defined_by_exec_parses():
    namespace = {"dataclasses": dataclasses}
    exec("@dataclasses.dataclass\nclass C:\n    x: int = 1  # an int\n", namespace)
    assert common.parse_config(namespace["C"], ["--x", "4"]).x == 4


def test_method_configs_extend_the_base_config():
    import hnpm, median_triplet, reco, ressl, smog
    base = [f.name for f in dataclasses.fields(common.BaseConfig)]
    for m in (median_triplet, smog, ressl, hnpm, reco):
        assert issubclass(m.Config, common.BaseConfig)
        assert [f.name for f in dataclasses.fields(m.Config)][:len(base)] == base  # generic fields first


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


def test_effective_rank_of_non_finite_input_is_nan_not_an_error():
    x = torch.randn(8, 4)
    x[0, 0] = float("nan")
    assert math.isnan(common.effective_rank(x).item())
    assert math.isfinite(common.effective_rank(torch.randn(8, 4)).item())
