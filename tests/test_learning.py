"""Learning on real images: a short CPU run of each method beats the random-init network of the same architecture
on kNN top-1 (CIFAR-10 JPEG copy, 2,000-image train subset as kNN memory, 1,000 test images as queries).

The random-init figure is the run's own epoch-0 kNN line (same seed, same architecture, before any step).
"""
import pytest

from conftest import read_metrics, run

# standard ResNet stem on 32 px keeps this within CI's budget on 2 cores; the CIFAR stem is 16x the compute
FAST = ["--dataset", "imagefolder", "--stem", "imagenet", "--batch-size", "128", "--num-workers", "0",
        "--eval-every", "100", "--log-every", "10", "--warmup-epochs", "1"]


def knn_gain(out):
    knn = [m for m in read_metrics(out) if "knn_top1" in m]
    assert knn[0]["epoch"] == 0
    return knn[0]["knn_top1"], knn[-1]["knn_top1"]


def test_ressl_learns(cifar_subset, tmp_path):
    out = str(tmp_path / "ressl")
    run(["ressl.py", *FAST, "--data-dir", cifar_subset, "--epochs", "12", "--queue-size", "1024",
         "--infonce-warmup-epochs", "3", "--output-dir", out])
    before, after = knn_gain(out)
    print(f"ReSSL kNN top-1: random init {before:.1f}% -> {after:.1f}% after 12 epochs")
    assert after >= before + MARGIN, (before, after)


MARGIN = 5.0  # percentage points; see the calibration note in README "Tests"
