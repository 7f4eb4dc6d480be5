"""bench.py: one JSON line per method with the documented keys and sane values (a tiny CPU measurement)."""
import json

import pytest

from conftest import run

KEYS = {"method", "device", "data_torchvision_1core", "data_batched", "model_only", "train_step", "train_over_model"}


METHODS = ["ressl", "smog", "median_triplet", "hnpm", "reco"]


def test_bench_prints_one_json_line_per_method():
    p = run(["bench.py", "--device", "cpu", "--batch-size", "16", "--steps", "1", "--tv-samples", "16",
             "--data-zip", ""], timeout=900)
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert [r["method"] for r in rows] == METHODS
    for row in rows:
        assert set(row) == KEYS and row["device"] == "cpu"
        assert all(row[k] > 0 for k in KEYS - {"method", "device"}), row
        assert row["train_over_model"] == pytest.approx(row["train_step"] / row["model_only"], rel=1e-2)


def test_images_come_from_an_imagefolder_zip_or_its_extracted_folder(tmp_path):
    import zipfile
    from PIL import Image
    import bench
    folder = tmp_path / "cifar"
    for c, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (folder / "train" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (32, 32), colour).save(folder / "train" / c / f"{i:04d}.png")
    with zipfile.ZipFile(tmp_path / "cifar.zip", "w") as z:
        for f in sorted(folder.rglob("*.png")):
            z.write(f, f.relative_to(folder).as_posix())
    for source in (str(folder), str(tmp_path / "cifar.zip")):
        pairs = bench.load_images(source, 6)
        assert [label for _, label in pairs] == [0, 0, 0, 1, 1, 1], source
        assert pairs[0][0].getpixel((0, 0)) == (255, 0, 0) and pairs[5][0].getpixel((0, 0)) == (0, 0, 255)
