"""The one shape of every two-process check: `python tests/ddp_step.py METHOD OUT [ARGS...]`, alone or under
torchrun with 2 CPU processes (gloo), calls `ddp_case(accelerator, *ARGS)` of tests/test_<METHOD>.py and saves what
it returns (loss, raw and clipped gradients, momentum state after the step, ...) to OUT/rank<r>.pt.
`python tests/ddp_step.py --cases OUT JSON` runs several cases, [[METHOD, ARGS...], ...], in one start-up and saves
case i to OUT/<i>/rank<r>.pt (conftest.two_process_results runs all the suite's cases so, in one torchrun).

Each ddp_case runs the script's own setup() and train_step() once (or a few times) on a fixed GLOBAL batch, this
process taking its rows; every case starts from set_seed(0).
"""
import importlib
import json
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
    if sys.argv[1] == "--cases":
        out, cases = sys.argv[2], json.loads(sys.argv[3])
        outs = [os.path.join(out, str(i)) for i in range(len(cases))]
    else:
        out, cases = sys.argv[2], [[sys.argv[1], *sys.argv[3:]]]
        outs = [out]
    for case, case_out in zip(cases, outs):
        result = run_case(accelerator, *case)
        os.makedirs(case_out, exist_ok=True)
        torch.save(result, os.path.join(case_out, f"rank{accelerator.process_index}.pt"))
