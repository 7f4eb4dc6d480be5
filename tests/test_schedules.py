"""Every schedule against values computed by hand at its boundary steps: the learning rate of the five scripts
(first step, last warm-up step, first step after it, the middle of the cosine, the last step), the EMA momentum,
ReSSL's alpha and SMoG's beta, and eval_linear.py's lr milestones, counted in epochs.

The runs below are 10 epochs of 5 steps (50 steps, global batch 512: the SGD lr is scaled by 512 / 256 = 2) with
2 warm-up epochs (10 steps), so the cosine runs over steps 10..49 and its middle is step 30. Each script's
schedules() must return exactly the keys of its row: a new schedule needs one.
"""
import math

import pytest
import torch
import torch.nn as nn
from accelerate.state import AcceleratorState, GradientState

import common
import eval_linear
import hnpm
import median_triplet
import reco
import ressl
import smog

STEPS_PER_EPOCH = 5
RUN = dict(epochs=10, warmup_epochs=2, batch_size=512)


def warmup_cosine(base):
    """The lr at steps 0, 9, 10, 30 and 49 of a 2-epoch warm-up and a cosine to 0 over the other 40 steps."""
    return {0: base / 10,  # (0 + 1) / 10 of the way
            9: base,  # the last warm-up step reaches the base lr
            10: base,  # the cosine starts at its top
            30: base / 2,  # halfway down: 0.5 * (1 + cos(pi / 2))
            49: base / 2 * (1 - math.cos(math.pi / 40))}  # 0.5 * (1 + cos(39 pi / 40)), one step short of 0


def constant(value):
    return {step: value for step in (0, 9, 10, 30, 49)}


# script, Config changes, {schedule key: {step: value}}
CASES = [
    ("ressl", dict(infonce_warmup_epochs=4), {
        "lr": warmup_cosine(0.06 * 2),
        "ema_momentum": constant(0.99),
        # Eq. (7): alpha = step / warm-up steps (20), capped at 1
        "alpha": {0: 0.0, 10: 0.5, 19: 0.95, 20: 1.0, 49: 1.0}}),
    ("ressl", dict(infonce_warmup=False), {
        "lr": warmup_cosine(0.06 * 2), "ema_momentum": constant(0.99), "alpha": constant(1.0)}),
    ("smog", {}, {
        "lr": warmup_cosine(0.06 * 2),
        "ema_momentum": constant(0.999),
        # Eq. (4)'s beta, linear from 1.0 at the first step to 0.99 at the last (step 49)
        "beta": {0: 1.0, 1: 1 - 0.01 / 49, 24: 1 - 0.01 * 24 / 49, 48: 1 - 0.01 * 48 / 49, 49: 0.99}}),
    ("smog", dict(beta_schedule="fixed", beta_end=0.95), {
        "lr": warmup_cosine(0.06 * 2), "ema_momentum": constant(0.999), "beta": constant(0.95)}),
    ("median_triplet", {}, {
        "lr": warmup_cosine(0.06 * 2),
        # BYOL's tau = 1 - (1 - 0.99) (cos(pi step / 50) + 1) / 2: 0.99 at the start, 0.995 halfway, -> 1
        "ema_momentum": {0: 0.99, 10: 1 - 0.005 * (1 + math.cos(math.pi / 5)), 25: 0.995,
                         49: 1 - 0.005 * (1 - math.cos(math.pi / 50))}}),
    ("hnpm", {}, {"lr": warmup_cosine(0.06 * 2), "ema_tau": constant(0.5)}),  # the small protocol's SGD
    ("hnpm", dict(optimizer="adam", lr=0.1, warmup_epochs=0), {  # Sec. 3.5's Adam: lr 0.1 as given (not batch-scaled),
        # no warm-up: one cosine over 50 steps
        "lr": {0: 0.1, 1: 0.05 * (1 + math.cos(math.pi / 50)), 25: 0.05, 49: 0.05 * (1 - math.cos(math.pi / 50))},
        "ema_tau": constant(0.5)}),
    ("reco", dict(warmup_epochs=2), {"lr": warmup_cosine(0.06 * 2), "ema_momentum": constant(0.999)}),
]
RUN_OF = {}
MODULES = {"ressl": ressl, "smog": smog, "median_triplet": median_triplet, "hnpm": hnpm, "reco": reco}


@pytest.mark.parametrize("script, change, expected", CASES, ids=[f"{s}-{'-'.join(c) or 'default'}"
                                                                 for s, c, _ in CASES])
def test_schedules_at_their_boundary_steps(script, change, expected):
    module = MODULES[script]
    cfg = module.Config(**{**RUN_OF.get(script, RUN), **change})
    for key, values in expected.items():
        for step, value in values.items():
            got = module.schedules(cfg, step, STEPS_PER_EPOCH)
            assert set(got) == set(expected), f"{script}.schedules returns {sorted(got)}"
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15), f"{script} {key} at step {step}"


@pytest.mark.parametrize("script", MODULES)
def test_default_lr_warmup_lasts_warmup_epochs(script):
    """Each script's own --warmup-epochs default, over 100 epochs of 5 steps at batch 256 (base lr = --lr): the lr
    climbs in equal steps to the base lr at the warm-up's last step, and the cosine starts at the base lr next."""
    module = MODULES[script]
    cfg = module.Config(epochs=100, batch_size=256)
    lr = lambda step: module.schedules(cfg, step, STEPS_PER_EPOCH)["lr"]
    n = cfg.warmup_epochs * STEPS_PER_EPOCH
    if n:
        assert lr(0) == pytest.approx(cfg.lr / n) and lr(n // 2 - 1) == pytest.approx(cfg.lr * (n // 2) / n)
        assert lr(n - 1) == pytest.approx(cfg.lr)
    assert lr(n) == pytest.approx(cfg.lr) and lr(n + 1) < cfg.lr


# ----------------------------------------------------------------------------- eval_linear.py

class RecordingSGD(torch.optim.SGD):
    lrs = []

    def step(self, *args, **kwargs):
        RecordingSGD.lrs.append(self.param_groups[0]["lr"])
        return super().step(*args, **kwargs)


@pytest.mark.parametrize("flags, expected", [
    # the default protocol: 100 epochs, lr 10, x 0.1 at epochs 60 and 80
    (["--cached"], [10.0] * 60 + [1.0] * 20 + [0.1] * 20),
    # through the backbone with augmentation (not cached): the same rule at milestones 2 and 4 of 5 epochs
    (["--epochs", "5", "--milestones", "2,4", "--no-knn"], [10.0, 10.0, 1.0, 1.0, 0.1]),
], ids=["cached-default", "augmented"])
def test_eval_linear_lr_milestones_count_epochs(flags, expected, tmp_path, monkeypatch):
    """The lr of every optimiser step of eval_linear.py, 2 steps per epoch (16 images, batch 8): each epoch runs at one
    lr, lowered x 0.1 at the start of each milestone epoch."""
    backbone = tmp_path / "backbone.pt"
    backbone.write_bytes(b"")  # check_config wants the file; load_backbone is replaced below
    tiny = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    monkeypatch.setattr(eval_linear, "load_backbone", lambda path: (tiny, {
        "image_size": 32, "mean_std": common.IMAGENET_MEAN_STD, "method": "tiny"}))
    monkeypatch.setattr(torch.optim, "SGD", RecordingSGD)
    monkeypatch.setattr(RecordingSGD, "lrs", [])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    eval_linear.main([str(backbone), "--dataset", "fake", "--fake-size", "16", "--batch-size", "8",
                      "--num-workers", "0", "--output", str(tmp_path / "result.json"), *flags])
    assert RecordingSGD.lrs == pytest.approx([lr for lr in expected for _ in range(2)])
