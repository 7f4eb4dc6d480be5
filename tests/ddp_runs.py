"""Every 2-process job of the suite in ONE start-up: `python tests/ddp_runs.py OUT SPEC` on each rank (conftest
starts the ranks), SPEC a JSON object {"steps": [[METHOD, ARGS...], ...], "runs": {NAME: [SCRIPT, ARGS...]},
"patches": {NAME: "MODULE:FUNCTION"}}, one job after the other, each with a fresh Accelerate state (the process group
itself stays):
- step i: ddp_case of tests/test_<METHOD>.py (tests/ddp_step.py) -> OUT/steps/<i>/rank<r>.pt;
- run NAME: `python SCRIPT ARGS... --output-dir OUT/<NAME>` as under torchrun, its stdout and stderr in
  OUT/<NAME>.rank<r>.out and .err, and {"ok", "error", "seconds"} in OUT/<NAME>.rank<r>.json; patches[NAME], a
  context manager of the test module called with the script's module, is in force during the run.
conftest.two_process_results and conftest.two_process_run read them."""
import contextlib
import importlib
import json
import os
import sys
import time
import traceback

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

import common
from ddp_step import run_case


def fresh_state():
    AcceleratorState._reset_state(True)  # as in a new process
    GradientState._reset_state()


def run_script(out, name, script, args, patch, rank):
    module = importlib.import_module(script[:-3])
    ctx = contextlib.nullcontext()
    if patch:
        test_module, function = patch.split(":")
        ctx = getattr(importlib.import_module(test_module), function)(module)
    result, tic = {"ok": True, "error": ""}, time.time()
    base = os.path.join(out, f"{name}.rank{rank}")
    with open(f"{base}.out", "w") as o, open(f"{base}.err", "w") as e, contextlib.redirect_stdout(o), \
            contextlib.redirect_stderr(e), ctx:
        try:
            common.run_main(module.train, module.Config, [*args, "--output-dir", os.path.join(out, name)],
                            getattr(module, "PAPER", None))
        except BaseException:  # noqa: BLE001 - SystemExit of a UserError included: the test reads it
            result = {"ok": False, "error": traceback.format_exc()}
    with open(f"{base}.json", "w") as f:
        json.dump({**result, "seconds": time.time() - tic}, f)


if __name__ == "__main__":
    out, spec = sys.argv[1], json.loads(sys.argv[2])
    rank = int(os.environ.get("RANK", 0))
    for i, case in enumerate(spec.get("steps", [])):
        fresh_state()
        accelerator = Accelerator(cpu=True)
        os.makedirs(os.path.join(out, "steps", str(i)), exist_ok=True)
        torch.save(run_case(accelerator, *case), os.path.join(out, "steps", str(i), f"rank{rank}.pt"))
    for name, (script, *args) in spec.get("runs", {}).items():
        fresh_state()
        run_script(out, name, script, args, spec.get("patches", {}).get(name), rank)
