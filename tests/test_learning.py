"""Learning on real images: a CPU run of ReSSL must beat the random-init network of the same architecture on kNN
top-1 (CIFAR-10 JPEG copy, 2,000-image train subset as kNN memory, 1,000 test images as queries).

The random-init figure is the run's own epoch-0 kNN line (same seed, same architecture, before any step).

NOT YET CALIBRATED, hence marked slow (CI does not run it). What was measured on 2 heavily shared CPU cores
(load average 8-11) with ResNet-18, standard stem, 32 px, `--queue-size 1024 --warmup-epochs 1`:
  - batch 128, paper lr, `--infonce-warmup-epochs 2`: kNN 26.5 % (random init) -> 24.9 % (epoch 1) -> 26.5 % (2);
  - batch 64, `--lr 0.5`, `--infonce-warmup-epochs 8`: 26.5 % -> 20.9 % (1) -> 21.2 % (2) -> 23.1 % (3).
On an idle 2-core machine (~125 images/s), batch 128, `--lr 0.24`:
  - 8 epochs, `--infonce-warmup-epochs 4` (167 s): 26.5 % -> 23.3, 21.8, 22.3, 22.7, 23.5, 24.2, 25.4, 25.2 %;
  - 30 epochs, `--infonce-warmup-epochs 10` (500 s): 26.5 % -> 27.5 % (23.3 % at epoch 5, 22.8 % at epoch 10).
The first epochs lower kNN below the random-init network before it recovers, so a CI-sized run does not clear the
margin yet. This test runs the same recipe for 100 epochs (~28 min); it has NOT been run, the margin is unverified.
"""
import pytest

from conftest import read_metrics, run

MARGIN = 5.0  # percentage points over the random-init network

FAST = ["--dataset", "imagefolder", "--stem", "imagenet", "--batch-size", "128", "--lr", "0.24", "--num-workers", "0",
        "--eval-every", "5", "--log-every", "10", "--warmup-epochs", "1", "--queue-size", "1024"]


def knn_gain(out):
    knn = [m for m in read_metrics(out) if "knn_top1" in m]
    assert knn[0]["epoch"] == 0
    return knn[0]["knn_top1"], knn[-1]["knn_top1"]


@pytest.mark.slow
def test_ressl_learns(cifar_subset, tmp_path):
    out = str(tmp_path / "ressl")
    run(["ressl.py", *FAST, "--data-dir", cifar_subset, "--epochs", "100", "--infonce-warmup-epochs", "10",
         "--output-dir", out], timeout=7200)
    before, after = knn_gain(out)
    print(f"ReSSL kNN top-1: random init {before:.1f}% -> {after:.1f}% after 100 epochs")
    assert after >= before + MARGIN, (before, after)
