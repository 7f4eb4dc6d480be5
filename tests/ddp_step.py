"""The one shape of every two-process check: `python tests/ddp_step.py METHOD OUT [ARGS...]`, alone or under
torchrun with 2 CPU processes (gloo), calls `ddp_case(accelerator, *ARGS)` of tests/test_<METHOD>.py and saves what
it returns (loss, raw and clipped gradients, momentum state after the step, ...) to OUT/rank<r>.pt.
tests/ddp_runs.py runs all the suite's cases so (run_case), in the one 2-process start-up of the suite.

Each ddp_case runs the script's own setup() and train_step() once (or a few times) on a fixed GLOBAL batch, this
process taking its rows; every case starts from set_seed(0).
"""
import importlib
import os
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed


def run_case(accelerator, method, *args):
    set_seed(0)
    return importlib.import_module(f"test_{method}").ddp_case(accelerator, *args)


if __name__ == "__main__":
    accelerator = Accelerator(cpu=True)
    out = sys.argv[2]
    result = run_case(accelerator, sys.argv[1], *sys.argv[3:])
    os.makedirs(out, exist_ok=True)
    torch.save(result, os.path.join(out, f"rank{accelerator.process_index}.pt"))
