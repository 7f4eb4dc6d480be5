"""The one shape of every two-process check: `python tests/ddp_step.py METHOD OUT [ARGS...]`, alone or under
torchrun with 2 CPU processes (gloo), calls `ddp_case(accelerator, *ARGS)` of tests/test_<METHOD>.py and saves what
it returns (loss, raw and clipped gradients, momentum state after the step, ...) to OUT/rank<r>.pt.

Each ddp_case runs the script's own setup() and train_step() once (or a few times) on a fixed GLOBAL batch, this
process taking its rows; conftest.two_process_results runs it both ways and returns the results for comparison.
"""
import importlib
import os
import sys

import torch
from accelerate import Accelerator

method, out, args = sys.argv[1], sys.argv[2], sys.argv[3:]
accelerator = Accelerator(cpu=True)
result = importlib.import_module(f"test_{method}").ddp_case(accelerator, *args)
os.makedirs(out, exist_ok=True)
torch.save(result, os.path.join(out, f"rank{accelerator.process_index}.pt"))
