"""Real images: the methods on the CIFAR-10 JPEG copy (2,000-image train subset = kNN memory, 1,000 test images =
kNN queries; ResNet-18 with the standard stem on 32 px so that a CPU can train it). Skipped without the copy.

Every learning test compares a run with its own epoch-0 line: the random-init network of the same architecture and
seed (26.5 % kNN top-1 at seed 0). The margins come from the runs listed in the README's "Measured on CPU" section.

- CI, `test_ressl_learns`: 15 epochs of ReSSL (lr kept near its peak by a 100-epoch cosine, stopped early with
  --stop-after-epochs) must gain MARGIN_CI = 3 points. Measured gains at 15 epochs: +5.2, +4.0, +5.7 (seeds 0, 1, 2);
  about 8 min per run on one of two shared cores.
- CI, `test_one_epoch_trains_without_collapse` (median triplet, HNPM, ReCo; SMoG has its own in tests/test_smog.py):
  one epoch must leave finite losses and kNN above KNN_FLOOR = 15 %. A collapsed encoder scores chance (10 %); after
  one epoch the methods score 21.8-26.7 %. This catches collapse, NaNs and broken pipelines, not learning.
- slow, `test_learns`: the longer runs of the methods that were measured to learn at this scale (LONG below;
  ReCo with its default k/k target, Deviation 3 in reco.py; median triplet with its default k = 5, Deviation 3 in
  median_triplet.py: the paper's median did not learn here; HNPM with its default τ = 0.999, Deviation 3 in
  hnpm.py: the paper's τ = 0.5 did not learn here).

A short schedule does not show learning for any of the five: with a 6-epoch cosine every method ends at 22-28 %.
Each learns from a momentum (EMA) target and/or a queue of old keys, and their early epochs move kNN down before it
rises; what works on 2 cores is the start of a long schedule.
"""
import math

import pytest

from conftest import read_metrics, run

KNN_FLOOR = 15.0  # % after one epoch; chance (a collapsed encoder) is 10 %
MARGIN_CI = 3.0  # percentage points over the random-init network, CI's 15-epoch ReSSL run

COMMON = ["--dataset", "imagefolder", "--stem", "imagenet", "--batch-size", "128", "--num-workers", "0",
          "--log-every", "5"]
# a queue no larger than half the 2,000-image data set
SMALL = {"ressl.py": ["--queue-size", "1024"], "reco.py": ["--queue-size", "1024"], "median_triplet.py": [],
         "hnpm.py": [], "smog.py": []}


def knn_lines(out):
    knn = [m for m in read_metrics(out) if "knn_top1" in m]
    assert knn and all(math.isfinite(m["knn_top1"]) for m in knn)
    return knn


def gain(knn):
    """kNN top-1 of the last line minus the epoch-0 (random-init) line, in points."""
    assert knn[0]["epoch"] == 0
    return knn[-1]["knn_top1"] - knn[0]["knn_top1"]


def test_ressl_learns(cifar_subset, tmp_path):
    out = str(tmp_path / "run")
    run(["ressl.py", *COMMON, *SMALL["ressl.py"], "--data-dir", cifar_subset, "--epochs", "100", "--warmup-epochs",
         "5", "--infonce-warmup-epochs", "10", "--stop-after-epochs", "15", "--eval-every", "15", "--output-dir", out],
        timeout=3600)
    knn = knn_lines(out)
    print("ressl.py kNN top-1: " + ", ".join(f"{m['epoch']}: {m['knn_top1']:.1f}" for m in knn))
    assert knn[-1]["epoch"] == 15
    assert gain(knn) >= MARGIN_CI, [m["knn_top1"] for m in knn]


@pytest.mark.parametrize("script", ["median_triplet.py", "hnpm.py", "reco.py"])
def test_one_epoch_trains_without_collapse(script, cifar_subset, tmp_path):
    out = str(tmp_path / "run")
    run([script, *COMMON, *SMALL[script], "--data-dir", cifar_subset, "--epochs", "1", "--warmup-epochs", "1",
         "--eval-every", "0", "--output-dir", out])
    metrics = read_metrics(out)
    losses = [m["loss"] for m in metrics if "loss" in m]
    knn = knn_lines(out)[-1]
    print(f"{script} 1 epoch: loss {losses[0]:.3f} -> {losses[-1]:.3f}, kNN {knn['knn_top1']:.1f}%")
    assert losses and all(math.isfinite(v) for v in losses)
    assert knn["epoch"] == 1 and knn["knn_top1"] > KNN_FLOOR


# The slow runs: flags, and the gain over the random-init line they must reach. Each margin sits 2 points or more
# below the measured gain (README, "Measured on CPU"; seed 0, two runs sharing the 2 cores).
LONG = {
    # measured: 26.5 -> 33.8 (+7.3) at epoch 100, 2634 s
    "ressl.py": (["--epochs", "100", "--warmup-epochs", "5", "--infonce-warmup-epochs", "10", "--eval-every", "10"],
                 5.0),
    # measured: 26.5 -> 32.5 (+6.0) at epoch 50, 1462 s
    "smog.py": (["--epochs", "50", "--warmup-epochs", "5", "--eval-every", "10"], 4.0),
    # the default k/k target (Deviation 3); measured: 26.5 -> 32.8 (+6.3) at epoch 15 of a 40-epoch schedule, 894 s;
    # seed 1: 25.3 -> 33.0 (+7.7)
    "reco.py": (["--epochs", "40", "--warmup-epochs", "5", "--stop-after-epochs", "15", "--eval-every", "5"], 4.0),
    # the default k = 5 (Deviation 3); measured at epoch 25 of a 100-epoch schedule: 26.5 -> 32.8 (+6.3), seed 1:
    # 25.3 -> 31.4 (+6.1); about 27 min. At epoch 15 the gains were only +4.2 and +2.1 (the median: -0.5).
    "median_triplet.py": (["--epochs", "100", "--warmup-epochs", "5", "--stop-after-epochs", "25", "--eval-every", "5"],
                          4.0),
    # the default τ = 0.999 (Deviation 3); measured at epoch 25 of a 100-epoch schedule: 26.5 -> 30.9 (+4.4), seed 1:
    # 25.3 -> 29.2 (+3.9); 836 s through pytest (same kNN as the measurement run). The paper's τ = 0.5: -2.7 at 15.
    "hnpm.py": (["--epochs", "100", "--warmup-epochs", "5", "--stop-after-epochs", "25", "--eval-every", "5"], 1.5),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", list(LONG))
def test_learns(script, cifar_subset, tmp_path):
    flags, margin = LONG[script]
    out = str(tmp_path / "run")
    run([script, *COMMON, *SMALL[script], *flags, "--data-dir", cifar_subset, "--output-dir", out], timeout=4 * 3600)
    knn = knn_lines(out)
    print(f"{script} kNN top-1: " + ", ".join(f"{m['epoch']}: {m['knn_top1']:.1f}" for m in knn))
    assert gain(knn) >= margin, [m["knn_top1"] for m in knn]
