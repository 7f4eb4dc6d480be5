"""Real images: the methods on the CIFAR-10 JPEG copy (2,000-image train subset = kNN memory, 1,000 test images =
kNN queries; ResNet-18 with the standard stem on 32 px so that a CPU can train it). Skipped without the copy.

Every learning test compares a run with its own epoch-0 line: the random-init network of the same architecture and
seed (26.5 % kNN top-1 at seed 0). The margins come from the runs listed in docs/cpu-runs.md.

- CI, `test_ressl_learns[device]`: 15 epochs of ReSSL (lr kept near its peak by a 100-epoch cosine, stopped early
  with --stop-after-epochs) through the batched views must gain MARGIN_CI = 3 points; measured +4.8 at seed 0, as
  the torchvision path (`[workers]`, slow) on the same machine; earlier torchvision-path gains +5.2, +4.0, +5.7 (seeds
  0, 1, 2, another machine). About 10 min on one of two shared cores. Measured again with ressl.py at 447fb0c:
  26.5 -> 29.5 (+3.0, exactly MARGIN_CI) in 443 s (2 threads, 2 shared cores).
- CI, `test_one_epoch_trains_without_collapse` (median triplet, HNPM, ReCo; SMoG has its own in tests/test_smog.py):
  one epoch must leave finite losses and kNN above KNN_FLOOR = 15 %. A collapsed encoder scores chance (10 %); after
  one epoch at their defaults the methods scored 19.8-22.9 % (docs/cpu-runs.md); measured again at seed 0: 22.7 %
  (ReCo), 23.6 % (median triplet), 17.0 % (HNPM). This catches collapse, NaNs and broken pipelines on real images,
  NOT a network that never trains: with zero_grad moved below backward (no parameter moves, only the BN statistics)
  the same runs scored 25.3 %, 26.1 % and 23.6 % (26.5 % at init). One epoch lies in the early dip of every method
  (below), so no kNN comparison at one epoch separates a trained network from a frozen one. That is caught in the
  quick tier: tests/test_train_step.py (each step is the optimiser's update of the step's gradient) and
  tests/test_learning_signal.py (the loss falls on a fixed batch). About 1 min each (ReCo: 61 s, 2 shared cores).
- slow, `test_learns`: the longer runs of the methods that were measured to learn at this scale (LONG below;
  SMoG with its measured flags (--num-groups 256 --ema-momentum 0.99 --blur on, the defaults when it was measured);
  ReCo with its measured flags (k/k, not the default); median triplet with its measured flags
  (--rank-k 5 --blur on, not the defaults: the paper's median did not learn here); HNPM with its measured flags
  (--optimizer sgd --lr 0.06 --weight-decay 5e-4 --ema-tau 0.999, not the defaults: the paper's Adam and τ = 0.5 did
  not learn here).

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


@pytest.mark.learning
@pytest.mark.parametrize("views", ["device", pytest.param("workers", marks=pytest.mark.slow)])
def test_ressl_learns(views, cifar_subset, tmp_path):
    """Through the batched views in CI (--views-on device, here on the CPU) and torchvision's in the slow set: at seed 0
    both measured 26.5 -> 31.3 at epoch 15 (docs/cpu-runs.md)."""
    out = str(tmp_path / "run")
    run(["ressl.py", *COMMON, *SMALL["ressl.py"], "--data-dir", cifar_subset, "--epochs", "100", "--warmup-epochs",
         "5", "--infonce-warmup-epochs", "10", "--stop-after-epochs", "15", "--eval-every", "15", "--views-on", views,
         "--output-dir", out], timeout=3600)
    knn = knn_lines(out)
    print(f"ressl.py ({views}) kNN top-1: " + ", ".join(f"{m['epoch']}: {m['knn_top1']:.1f}" for m in knn))
    assert knn[-1]["epoch"] == 15
    assert gain(knn) >= MARGIN_CI, [m["knn_top1"] for m in knn]


@pytest.mark.learning
@pytest.mark.parametrize("script", ["median_triplet.py", "hnpm.py", "reco.py"])
def test_one_epoch_trains_without_collapse(script, cifar_subset, tmp_path):
    """Finite losses and no collapse after one epoch on real images. It cannot tell a trained network from one that
    never trains (a frozen one scores 23.6-26.1 % here, above the floor; see the module docstring): the quick-tier
    step and learning-signal tests catch that."""
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
# below the measured gain (docs/cpu-runs.md; seed 0, two runs sharing the 2 cores).
LONG = {
    # measured: 26.5 -> 33.8 (+7.3) at epoch 100, 2634 s
    "ressl.py": (["--epochs", "100", "--warmup-epochs", "5", "--infonce-warmup-epochs", "10", "--eval-every", "10"],
                 5.0),
    # not the defaults: the flags of the measured run (smog.py at 1962dc4, when 256 groups, alpha 0.99 and BYOL's
    # blur at 32 px were the defaults); the paper's 3000 groups and alpha 0.999, the defaults now, were not measured
    # at this length. Measured: 26.5 -> 32.5 (+6.0) at epoch 50, 1462 s.
    "smog.py": (["--epochs", "50", "--warmup-epochs", "5", "--eval-every", "10", "--num-groups", "256",
                 "--ema-momentum", "0.99", "--blur", "on"], 4.0),
    # not the defaults: the flags of the measured run. k/k target (the paper's q/k fell 26.5 -> 21.1 at epoch 15
    # here), MoCo queue as the bank of Eq. (3), momentum 0.99 and lr 0.06 x 128/256, the defaults when it was measured.
    # Measured: 26.5 -> 32.8 (+6.3) at epoch 15 of a 40-epoch schedule, 894 s; seed 1: 25.3 -> 33.0 (+7.7), 938 s.
    "reco.py": (["--epochs", "40", "--warmup-epochs", "5", "--stop-after-epochs", "15", "--eval-every", "5",
                 "--feature-pair", "k/k", "--global-bank", "key", "--ema-momentum", "0.99", "--lr", "0.06"], 4.0),
    # not the defaults: the flags of the measured run. --rank-k 5 (Table 7's other good k; the paper's median, the
    # default, went 26.5 -> 26.0 at epoch 15 here and does not move in CI's time) and --blur on (BYOL's blur, the
    # default at 32 px when measured). Measured at epoch 25 of a 100-epoch schedule: 26.5 -> 32.8 (+6.3), seed 1:
    # 25.3 -> 31.4 (+6.1); 1615 s through pytest. At epoch 15 the gains were only +4.2 and +2.1 (the median: -0.5).
    "median_triplet.py": (["--epochs", "100", "--warmup-epochs", "5", "--stop-after-epochs", "25", "--eval-every", "5",
                           "--rank-k", "5", "--blur", "on"], 4.0),
    # not the defaults: --optimizer sgd --lr 0.06 --weight-decay 5e-4 (this project's SGD recipe, lr 0.06 x 128/256,
    # wd 5e-4; the defaults of --lr and --weight-decay were 0.06 and 5e-4 when it was measured) and --ema-tau 0.999
    # (Table 7's slow student), the one setting measured to learn on this subset; the paper's τ = 0.5 (with SGD) fell
    # 26.5 -> 23.8 (-2.7) at epoch 15, its Adam (with τ = 0.999) to 17.1. Measured at epoch 25 of a 100-epoch
    # schedule: 26.5 -> 30.9 (+4.4), seed 1: 25.3 -> 29.2 (+3.9); 836 s through pytest (same kNN as the measurement).
    "hnpm.py": (["--optimizer", "sgd", "--lr", "0.06", "--weight-decay", "5e-4", "--ema-tau", "0.999", "--epochs",
                 "100", "--warmup-epochs", "5", "--stop-after-epochs", "25", "--eval-every", "5"], 1.5),
}


@pytest.mark.learning
@pytest.mark.slow
@pytest.mark.parametrize("script", list(LONG))
def test_learns(script, cifar_subset, tmp_path):
    flags, margin = LONG[script]
    out = str(tmp_path / "run")
    run([script, *COMMON, *SMALL[script], *flags, "--data-dir", cifar_subset, "--output-dir", out], timeout=4 * 3600)
    knn = knn_lines(out)
    print(f"{script} kNN top-1: " + ", ".join(f"{m['epoch']}: {m['knn_top1']:.1f}" for m in knn))
    assert gain(knn) >= margin, [m["knn_top1"] for m in knn]
