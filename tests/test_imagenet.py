"""--dataset imagenet / imagenet100: the ILSVRC-2012 layout, its errors, the ImageNet-100 class list, and bench.py's
one-core decode measurement on ImageNet-sized JPEGs."""
import contextlib
import re
import types

import pytest
from PIL import Image

import common

# three wnids of ImageNet-100 (the first three lines of common/imagenet100.txt) and one ImageNet class outside it
IN100 = ["n02869837", "n01749939", "n02488291"]
OTHER = "n01440764"


def _imagenet_tree(root, classes, train_per_class=2, val_per_class=1):
    """ILSVRC-2012 layout with small ImageNet-like JPEGs (400 x 300, landscape as most ImageNet photos)."""
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c, wnid in enumerate(classes):
            d = root / split / wnid
            d.mkdir(parents=True)
            for i in range(n):
                name = f"{wnid}_{i}.JPEG" if split == "train" else f"ILSVRC2012_val_{c * n + i:08d}.JPEG"
                Image.new("RGB", (400, 300), (40 * c, 20 * i, 100)).save(d / name, quality=90)
    return str(root)


def _accelerator():
    return types.SimpleNamespace(local_main_process_first=contextlib.nullcontext)


def test_imagenet_reads_the_usual_layout_at_224_px_with_the_imagenet_stem(tmp_path):
    root = _imagenet_tree(tmp_path, [OTHER] + IN100)
    pretrain, memory, query, n_cls, size, stats = common.get_datasets("imagenet", root)
    assert n_cls == 4 and len(pretrain) == 8 and len(query) == 4 and pretrain is memory
    assert memory.classes == query.classes == sorted([OTHER] + IN100)
    assert size == 224 and stats == common.IMAGENET_MEAN_STD
    img, label = query[1]
    assert img.size == (400, 300) and img.mode == "RGB" and query.classes[label] == query.samples[1][0].split("/")[-2]
    data = common.load_data(common.BaseConfig(dataset="imagenet", data_dir=root), _accelerator())
    assert data.size == 224 and not data.cifar_stem and data.num_classes == 4


def test_imagenet_opens_no_image_before_training(tmp_path, monkeypatch):
    """1.28 M images: listing the files is all get_datasets may do (an image folder opens its first image for its
    size; ImageNet's size is fixed)."""
    root = _imagenet_tree(tmp_path, IN100)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    common.get_datasets("imagenet", root)
    assert opened == []
    common.get_datasets("imagefolder", root)
    assert len(opened) == 1  # the spy sees what it should


def test_flat_val_folder_is_one_error_that_says_how_to_sort_it(tmp_path):
    root = _imagenet_tree(tmp_path, IN100)
    for f in list((tmp_path / "val").rglob("*.JPEG")):  # as the val tar unpacks: 50,000 files in val/
        f.rename(tmp_path / "val" / f.name)
        f.parent.rmdir()
    with pytest.raises(common.UserError) as e:
        common.get_datasets("imagenet", root)
    message = str(e.value)
    assert "\n" not in message and "holds 3 images directly" in message
    assert "valprep.sh" in message and "ILSVRC2012_validation_ground_truth.txt" in message


def test_missing_split_or_differing_classes_are_clear_errors(tmp_path):
    root = _imagenet_tree(tmp_path, IN100)
    (tmp_path / "val" / IN100[0]).rename(tmp_path / "val-aside")
    with pytest.raises(common.UserError, match=f"differ .*1 in only one of them, e.g. {IN100[0]}"):
        common.get_datasets("imagenet", root)
    (tmp_path / "val").rename(tmp_path / "elsewhere")
    with pytest.raises(common.UserError, match="expects the folder .*val'; it does not exist"):
        common.get_datasets("imagenet", root)


def test_imagenet100_selects_its_classes_and_never_lists_the_others(tmp_path, monkeypatch):
    root = _imagenet_tree(tmp_path, [OTHER] + IN100)
    (tmp_path / "train" / "n99999999").mkdir()  # an empty class folder: listing it would be an error
    listed = tmp_path / "three.txt"
    listed.write_text("# a test list\n" + "\n".join(IN100) + "\n")
    monkeypatch.setattr(common.data, "IMAGENET100_CLASSES", str(listed))
    pretrain, memory, query, n_cls, size, stats = common.get_datasets("imagenet100", root)
    assert memory.classes == query.classes == sorted(IN100) and n_cls == 3
    assert len(pretrain) == 6 and len(query) == 3 and size == 224 and stats == common.IMAGENET_MEAN_STD
    assert {p.split("/")[-2] for p, _ in pretrain.samples} == set(IN100)
    assert [memory.classes[y] for _, y in memory.samples] == [p.split("/")[-2] for p, _ in memory.samples]


def test_imagenet100_names_the_missing_classes(tmp_path):
    root = _imagenet_tree(tmp_path, [OTHER] + IN100)
    with pytest.raises(common.UserError) as e:
        common.get_datasets("imagenet100", root)
    message = str(e.value)
    missing = sorted(set(common.data.imagenet100_classes()) - set(IN100))
    assert "lacks 97 of the 100 class folders" in message and ", ".join(missing[:5]) + " and 92 more." in message
    assert not set(IN100) & set(re.findall(r"n\d{8}", message))


def test_imagenet100_class_list_is_100_unique_wnids_with_its_source():
    with open(common.data.IMAGENET100_CLASSES) as f:
        lines = f.read().splitlines()
    header = [line for line in lines if line.startswith("#")]
    wnids = common.data.imagenet100_classes()
    assert lines[:len(header)] == header and "1906.05849" in " ".join(header)  # comments first, naming the source
    assert lines[len(header):] == wnids  # then one bare wnid a line
    assert len(wnids) == 100 == len(set(wnids)) and all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    assert wnids[:3] == IN100


def test_bench_measures_the_workers_path_on_imagenet_sized_jpegs(tmp_path):
    import bench
    images = common.FakeImages(4, image_size=32)
    pairs = [images[i] for i in range(4)]
    plain, noisy = tmp_path / "plain", tmp_path / "noisy"
    kb_plain, kb_noisy = bench.imagenet_jpegs(str(plain), pairs), bench.imagenet_jpegs(str(noisy), pairs, noise=24)
    assert kb_noisy > kb_plain  # noise is detail JPEG must keep: larger files, as photos are
    train, _, val, n_cls, size, _ = common.get_datasets("imagenet", str(plain))
    assert n_cls == 4 and len(train) == 4 and len(val) == 4 and size == 224 and train[0][0].size == (500, 375)
    args = types.SimpleNamespace(decode_images=4, decode_repeat=1, decode_noise=0.0, methods=["hnpm"])
    first, method = bench.bench_imagenet_decode(args, "")
    assert first["source"] == "synthetic upscaled" and first["image_wh"] == [500, 375] and first["images"] == 4
    assert all(first[k] > 0 for k in ("decode_1core", "crop_flip_1core", "decode_crop_flip_1core",
                                      "decode_2x_crop_flip_1core"))
    assert method["method"] == "hnpm" and method["views"] == 2 and method["decode_views_1core"] > 0
