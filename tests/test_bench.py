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
