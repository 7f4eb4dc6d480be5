"""One ReSSL training step (ressl.train_step, as train() runs it) on a fixed global batch, run under torchrun with 1 or 2 CPU processes (gloo).

Writes rank<r>.pt with, for each case, the global loss, the gradients after backward, and the queue / teacher after
the update, so tests/test_ressl.py can check that 2 processes equal 1 process. Cases: the default (predictor, global
BN) and --no-predictor with shuffle BN over 2 groups. The student's BatchNorm is held in eval mode (running
statistics) because per-process batch statistics differ by design on CPU, where SyncBatchNorm is not used; the
shuffle-BN teacher runs in train mode, since its groups do not depend on the number of processes.
"""
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

import ressl

out_dir = sys.argv[1]
accelerator = Accelerator(cpu=True)
rank, world = accelerator.process_index, accelerator.num_processes
result = {}
for case, kw in {"global_bn": {}, "shuffle_bn": {"predictor": False, "bn_splits": 2}}.items():
    cfg = ressl.Config(proj_hidden=32, proj_dim=16, tau_s=0.1, tau_t=0.04, tau_nce=0.1, ema_momentum=0.9, **kw)
    set_seed(0)
    student = ressl.Student(cfg, cifar_stem=False)
    g = torch.Generator().manual_seed(1)
    B, K = 8, 16
    x_s, x_t = torch.randn(B, 3, 32, 32, generator=g), torch.randn(B, 3, 32, 32, generator=g)
    labels = torch.randint(0, 10, (B,), generator=g)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)  # train_step sets lr 0.1
    student, optimizer = accelerator.prepare(student, optimizer)
    raw = accelerator.unwrap_model(student)
    splits = ressl.teacher_bn_splits(cfg)
    state = ressl.MomentumState(raw, K, cfg.proj_dim, splits // world if splits > 1 else None)
    state.queue.copy_(torch.nn.functional.normalize(torch.randn(K, cfg.proj_dim, generator=g), dim=1))
    state.queue_labels.copy_(torch.randint(0, 10, (K,), generator=g))
    state.ptr.fill_(12)  # the enqueue of 8 keys wraps around the end
    student.eval()
    state.teacher.train(splits > 1)

    local = slice(rank * B // world, (rank + 1) * B // world)
    # the script's own step (loss, backward, SGD, EMA, enqueue), as train() calls it
    sched = {"lr": 0.1, "alpha": 0.5, "ema_momentum": 0.9}
    logs = ressl.train_step(student, state, optimizer, [x_s[local], x_t[local]], labels[local], cfg, sched, 3,
                            accelerator)
    loss = logs["loss"]
    grads = {n: p.grad.clone() for n, p in raw.named_parameters() if p.grad is not None}
    result[case] = {"loss": accelerator.reduce(loss.detach(), "mean"), "grads": grads, "queue": state.queue.clone(),
                    "queue_labels": state.queue_labels.clone(), "ptr": state.ptr.clone(),
                    "teacher": state.teacher.state_dict(), "relation": accelerator.reduce(logs["relation"], "mean")}
torch.save(result, f"{out_dir}/rank{rank}.pt")
