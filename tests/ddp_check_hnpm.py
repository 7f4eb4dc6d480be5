"""One HNPM training step (hnpm.train_step, as train() runs it, on the networks and optimiser of hnpm.setup) on a
fixed global batch of 8, under torchrun with 1 or 2 CPU processes (gloo).

Writes rank<r>.pt with, for the default and for --student-grad, the global loss, the gradients after backward (and
clipping), the step's diagnostics, and the teacher and student (EMA) after the update, so that tests/test_hnpm.py
can check that 2 processes equal 1. The threshold of Eq. (5) is lowered to 0.25 so that the mining selects some but
not all rows of the global batch. BatchNorm is held in eval mode (running statistics): per-process batch statistics
differ by design on CPU, where SyncBatchNorm is not used.
"""
import sys
import types

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

import hnpm

out_dir = sys.argv[1]
accelerator = Accelerator(cpu=True)
rank, world = accelerator.process_index, accelerator.num_processes
result = {}
for student_grad in (False, True):
    cfg = hnpm.Config(proj_hidden=32, proj_dim=16, threshold=0.25, student_grad=student_grad, optimizer="sgd")
    set_seed(0)
    teacher, optimizer, student = hnpm.setup(cfg, types.SimpleNamespace(cifar_stem=False), accelerator)
    raw = accelerator.unwrap_model(teacher)
    g = torch.Generator().manual_seed(1)
    B = 8
    x_t, x_s = torch.randn(B, 3, 32, 32, generator=g), torch.randn(B, 3, 32, 32, generator=g)
    labels = torch.randint(0, 3, (B,), generator=g)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))  # student != teacher, as after some training
    teacher.eval()
    student.eval()
    local = slice(rank * B // world, (rank + 1) * B // world)
    logs = hnpm.train_step(teacher, student, optimizer, [x_t[local], x_s[local]], labels[local], cfg,
                           {"lr": 0.1, "ema_tau": 0.5}, 0, accelerator)
    grads = {n: p.grad.clone() for n, p in raw.named_parameters()}
    grads.update({"student." + n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
    result[student_grad] = {"loss": logs["loss"], "grads": grads, "hard_size": logs["hard_size"],
                            "diag": logs["diag"], "teacher": raw.state_dict(), "student": student.state_dict()}
torch.save(result, f"{out_dir}/rank{rank}.pt")
