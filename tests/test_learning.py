"""Real images: every method on the CIFAR-10 JPEG copy (2,000-image train subset = kNN memory, 1,000 test images =
kNN queries; ResNet-18 with the standard stem on 32 px so that a CPU can train it). Skipped without the copy.

Two tests per method:

- CI (`test_one_epoch_trains_without_collapse`): one epoch (15 steps of 128) must leave finite losses and a kNN
  top-1 above KNN_FLOOR. A collapsed encoder (every image on one point) scores chance, 10 %; the five methods scored
  21.8-26.7 % after one or two epochs in the measurements below, and the random-init network scores 26.5 %.
  This guards against collapse, NaNs and broken pipelines; it does not show learning.
- slow (`test_learns`, not in CI): the longer run that has to beat the run's own epoch-0 line (the random-init
  network, same seed and architecture) by MARGIN points. Measured, and why it is not in CI, in the docstring of
  LONG below and in the README's "Measured on CPU" section.

Why no learning test fits in CI: on 2 CPU cores (~125 images/s) a plain SimCLR (in-batch negatives, gradient
through both views, Adam 1e-3) moves kNN from 26.5 % to 37.6 % in 8 epochs (200 s), and with SGD lr 0.03 to 32.5 %
in 4 epochs, but none of the five methods moves in 6 epochs (26.5 % -> 24.2-28.6 %, every method's default and
ReSSL with several learning rates, momenta, head widths, batch sizes and a shuffle-BN variant). All five learn from
a momentum (EMA) target and/or a queue of old keys; their early epochs move the kNN down before it rises.
"""
import math

import pytest

from conftest import read_metrics, run

KNN_FLOOR = 15.0  # % after one epoch; chance (a collapsed encoder) is 10 %
MARGIN = 5.0  # percentage points over the random-init network for the slow test

COMMON = ["--dataset", "imagefolder", "--stem", "imagenet", "--batch-size", "128", "--num-workers", "0",
          "--log-every", "5"]
# per-method flags for the 2,000-image subset: a queue no larger than half the data set
SMALL = {"ressl.py": ["--queue-size", "1024"], "reco.py": ["--queue-size", "1024"], "median_triplet.py": [],
         "hnpm.py": [], "smog.py": []}


def knn_lines(out):
    knn = [m for m in read_metrics(out) if "knn_top1" in m]
    assert knn and all(math.isfinite(m["knn_top1"]) for m in knn)
    return knn


@pytest.mark.parametrize("script", ["ressl.py", "median_triplet.py", "hnpm.py", "reco.py"])
def test_one_epoch_trains_without_collapse(script, cifar_subset, tmp_path):
    """(smog.py has its own, stricter version in tests/test_smog.py: groups in use and embedding spread.)"""
    out = str(tmp_path / "run")
    run([script, *COMMON, *SMALL[script], "--data-dir", cifar_subset, "--epochs", "1", "--warmup-epochs", "1",
         "--eval-every", "0", "--output-dir", out])
    metrics = read_metrics(out)
    losses = [m["loss"] for m in metrics if "loss" in m]
    knn = knn_lines(out)[-1]
    print(f"{script} 1 epoch: loss {losses[0]:.3f} -> {losses[-1]:.3f}, kNN {knn['knn_top1']:.1f}%")
    assert losses and all(math.isfinite(v) for v in losses)
    assert knn["epoch"] == 1 and knn["knn_top1"] > KNN_FLOOR


# The slow runs: each script's defaults except the data-set-sized queue/groups, a 5-epoch warm-up and the epochs.
LONG = {
    "ressl.py": ["--epochs", "100", "--warmup-epochs", "5", "--infonce-warmup-epochs", "10"],
    "smog.py": ["--epochs", "50", "--warmup-epochs", "5"],
    "median_triplet.py": ["--epochs", "30", "--warmup-epochs", "5"],
    "hnpm.py": ["--epochs", "50", "--warmup-epochs", "5"],
    "reco.py": ["--epochs", "40", "--warmup-epochs", "5"],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", list(LONG))
def test_learns(script, cifar_subset, tmp_path):
    out = str(tmp_path / "run")
    run([script, *COMMON, *SMALL[script], *LONG[script], "--eval-every", "10", "--data-dir", cifar_subset,
         "--output-dir", out], timeout=4 * 3600)
    knn = knn_lines(out)
    assert knn[0]["epoch"] == 0
    print(f"{script} kNN top-1: " + ", ".join(f"{m['epoch']}: {m['knn_top1']:.1f}" for m in knn))
    assert knn[-1]["knn_top1"] >= knn[0]["knn_top1"] + MARGIN, [m["knn_top1"] for m in knn]
