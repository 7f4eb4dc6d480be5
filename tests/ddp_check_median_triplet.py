"""One median-triplet training step (median_triplet.train_step, as train() runs it) on a fixed global batch, run under
torchrun with 1 or 2 CPU processes (gloo). argv: output folder, --negatives value (rank: the median; range: ranks 2..5).

Writes rank<r>.pt with the global loss and its two directions, the gradients after backward, the Table 5 counts, the
effective-rank accumulator and the EMA target after the update, so tests/test_median_triplet.py can check that 2
processes equal 1. BatchNorm is held in eval mode (running statistics), because per-process batch statistics differ
by design on CPU, where SyncBatchNorm is not used.
"""
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

import median_triplet as mt

out_dir, negatives = sys.argv[1], sys.argv[2]
accelerator = Accelerator(cpu=True)
rank, world = accelerator.process_index, accelerator.num_processes
cfg = mt.Config(proj_hidden=32, proj_dim=16, negatives=negatives, range_first=2, range_last=5, log_every=1)
set_seed(0)
online = mt.Online(cfg, cifar_stem=False)
g = torch.Generator().manual_seed(1)
B = 8
x1, x2 = torch.randn(B, 3, 32, 32, generator=g), torch.randn(B, 3, 32, 32, generator=g)
labels = torch.tensor([0, 1, 0, 2, 3, 1, 4, 5])  # two pairs of one class: event B holds
optimizer = torch.optim.SGD(online.parameters(), lr=0.1, momentum=0.9)  # train_step sets lr 0.1
online, optimizer = accelerator.prepare(online, optimizer)
raw = accelerator.unwrap_model(online)
state = mt.MomentumState(raw)
online.eval()
state.target.eval()
with torch.no_grad():  # a target unlike the online network, the same on every process
    for p in state.target.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=g))

local = slice(rank * B // world, (rank + 1) * B // world)
# the script's own step (both directions, backward, SGD, EMA), as train() calls it
logs = mt.train_step(online, state, optimizer, [x1[local], x2[local]], labels[local], cfg,
                     {"lr": 0.1, "ema_momentum": 0.9}, 0, accelerator)
grads = {n: p.grad.clone() for n, p in raw.named_parameters() if p.grad is not None}
result = {k: accelerator.reduce(logs[k], "mean") for k in ("loss", "loss_12", "loss_21")}
torch.save({**result, "grads": grads, "table5": logs["table5"], "erank": logs["erank"],
            "target": state.target.state_dict()}, f"{out_dir}/rank{rank}.pt")
