"""Five SMoG training steps (smog.train_step, as train() runs it) on fixed global batches of 8, under torchrun with 1
or 2 CPU processes (gloo).

Step 0 initialises the groups by k-means of the first global batch; step 3 is a periodic reset (--reset-every 3):
k-means of the cached projections of steps 0-2 and f^_eta <- f_theta. Writes <rule>-rank<r>.pt (rules momentum and
random) with, per step, the global loss, the gradients after backward, and the groups, running group sizes, cache
and f^_eta after the step, plus the number of k-means runs, so that tests/test_smog.py can check that 2 processes equal
1 and that every rank holds the same bits.

The k-means result is perturbed on every process but process 0 (1e-6 on the centroids, +1 on the counts), as float
atomics on a GPU can make it differ in the last bits: the groups stay bit-identical only because smog.kmeans_groups
broadcasts process 0's result. A small backbone keeps the run fast; BatchNorm is in eval mode, since per-process
batch statistics differ by design on CPU, where SyncBatchNorm is not used.
"""
import sys

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import set_seed

import smog

out_dir = sys.argv[1]
accelerator = Accelerator(cpu=True)
rank, world = accelerator.process_index, accelerator.num_processes
exact_kmeans, kmeans_runs = smog.spherical_kmeans, []


def perturbed_kmeans(*args, **kwargs):
    kmeans_runs.append(1)
    centroids, counts = exact_kmeans(*args, **kwargs)
    return centroids + 1e-6 * rank, counts + rank


smog.spherical_kmeans = perturbed_kmeans
B = 8
for rule in ("momentum", "random"):
    cfg = smog.Config(proj_hidden=32, proj_dim=16, num_groups=6, group_update=rule, reset_every=3, seed=3)
    set_seed(0)
    online = smog.Online(cfg, cifar_stem=False)
    online.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                    nn.AdaptiveAvgPool2d(1), nn.Flatten())
    online.projector = smog.mlp(16, cfg.proj_hidden, cfg.proj_dim, out_bn=True)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(B, 3, 8, 8, generator=g), torch.randn(B, 3, 8, 8, generator=g),
                torch.randint(0, 10, (B,), generator=g)) for _ in range(5)]
    optimizer = torch.optim.SGD(online.parameters(), lr=0.1, momentum=0.9)
    online, optimizer = accelerator.prepare(online, optimizer)
    raw = accelerator.unwrap_model(online)
    state = smog.MomentumState(raw, cfg.num_groups, cfg.proj_dim, cache_size=3 * B, num_classes=10)
    online.eval()
    state.target.eval()
    local = slice(rank * B // world, (rank + 1) * B // world)
    kmeans_runs.clear()
    steps = []
    for step, (x1, x2, labels) in enumerate(batches):
        sched = {"lr": 0.1, "beta": 0.9, "ema_momentum": 0.9}
        logs = smog.train_step(online, state, optimizer, [x1[local], x2[local]], labels[local], cfg, sched, step,
                               accelerator)
        steps.append({"loss": accelerator.reduce(logs["loss"], "mean"),
                      "grads": {n: p.grad.clone() for n, p in raw.named_parameters() if p.grad is not None},
                      "groups": state.groups.clone(), "seen": state.seen.clone(), "cache": state.cache.clone(),
                      "target": {k: v.clone() for k, v in state.target.state_dict().items()},
                      "same_group": accelerator.reduce(logs["same_group"], "sum")})
    torch.save({"steps": steps, "kmeans_runs": len(kmeans_runs)}, f"{out_dir}/{rule}-rank{rank}.pt")
