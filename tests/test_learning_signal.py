"""A learning signal a frozen network cannot pass: STEPS calls of each script's own train_step (its setup(), tiny
heads, Accelerator(cpu=True)) on ONE fixed batch of fixed views (random 16 px images, seed 1) must lower the method's
loss by a measured margin.

What decreases: the online network's loss against a FIXED target. Each method's target moves with the network (EMA
teacher, queue, bank, groups), so its loss need not fall in a few dozen steps; here the momentum state is held
still by the momentum flags (EMA momentum / tau 1, SMoG's beta 1 without resets), the queues hold exactly the batch's
keys (--queue-size = batch), and every call after the first passes the same `step`, so the step-seeded draws
(ReCo's CutMix box, ratio and partners, shuffle BN; SMoG's stream order) repeat. From call 2 on the state no longer
changes (call 0 fills the queues, k-means sets SMoG's groups, call 1 may still differ in ReCo's keys of step 0's
shuffle), so the loss of call 2 and of the last call differ only by what the optimiser did to the online network.
A frozen network (lr 0, or zero_grad below backward) gives EXACTLY the same loss at both (checked: drop 0.0).

Measured (OMP_NUM_THREADS=1, this file's settings, seed 0; `python -m pytest -q tests/test_learning_signal.py -s`
prints the losses), loss at call 2 -> last call, and the margin asserted (about half the measured drop):
    median triplet  199.50 -> 196.98 (drop 2.53; the margin C = 100 of both directions sits in the loss), margin 1.2
    SMoG            3.224 -> 0.011 (drop 3.21), margin 1.6
    ReSSL           1.964 -> 0.740 (drop 1.22), margin 0.6
    ReCo            5.379 -> 3.220 (drop 2.16), margin 1.0
    HNPM (SGD)      0.045 -> -0.073 (drop 0.118), margin 0.07
With lr 0 every drop is 0.0000. About 20 s for the file on one core.
"""
import types

import pytest
import torch
from accelerate import Accelerator

import hnpm
import median_triplet
import reco
import ressl
import smog

B, STEPS, FIRST = 8, 24, 2
DATA = types.SimpleNamespace(cifar_stem=False, size=16, num_classes=4, pretrain=range(64))  # what setup() reads
LR = 0.05  # SGD lr, set in sched: the scripts' batch-scaled default is ~0.002 at batch 8

# script, Config overrides (tiny heads, momentum state held still), number of views, margin (absolute loss drop)
CASES = {
    "median_triplet": (median_triplet, dict(proj_hidden=64, proj_dim=32, ema_momentum=1.0), 2, 1.2),
    "smog": (smog, dict(proj_hidden=64, proj_dim=32, num_groups=8, ema_momentum=1.0, beta_schedule="fixed",
                        beta_end=1.0, reset_every=0), 2, 1.6),
    "ressl": (ressl, dict(proj_hidden=64, proj_dim=32, queue_size=B, ema_momentum=1.0), 2, 0.6),
    "reco": (reco, dict(proj_dim=32, queue_size=B, bn_splits=2, ema_momentum=1.0), 3, 1.0),
    "hnpm": (hnpm, dict(proj_hidden=64, proj_dim=32, ema_tau=1.0), 2, 0.07),
}


def losses(name, lr=LR):
    """The loss returned by each of STEPS train_step calls on one fixed batch (call 0 at step 0, the others at 2)."""
    script, overrides, n_views, _ = CASES[name]
    cfg = script.Config(batch_size=B, epochs=1, warmup_epochs=0, **overrides)
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model, optimizer, state = script.setup(cfg, DATA, accelerator)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 3, 16, 16, generator=g)
    views = [x + 0.5 * torch.randn(x.shape, generator=g) for _ in range(n_views)]  # related views of each image
    labels = torch.arange(B) % 4
    out = []
    for i in range(STEPS):
        step = 0 if i == 0 else 2  # step 0: SMoG's k-means of the batch; then one step's draws, repeated
        sched = {**script.schedules(cfg, step, 10), "lr": lr}
        model.train(), state.train()
        logs = script.train_step(model, state, optimizer, views, labels, cfg, sched, step, accelerator)
        out.append(logs["loss"].item())
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_loss_falls_on_a_fixed_batch(name):
    trace = losses(name)
    drop = trace[FIRST] - trace[-1]
    print(f"{name}: {trace[FIRST]:.4f} -> {trace[-1]:.4f} (drop {drop:.4f})")
    assert drop >= CASES[name][3], trace
