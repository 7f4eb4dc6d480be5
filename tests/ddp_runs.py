"""Several 2-process script runs in ONE start-up: `python tests/ddp_runs.py OUT JSON` on each rank (conftest starts
the ranks) runs every case of JSON, {name: [script.py, args...]}, as `python script.py args... --output-dir
OUT/<name>` would under torchrun, one after the other with a fresh Accelerate state, and writes OUT/<name>.rank<r>
with "ok" or the error. conftest.two_process_run reads them (tests of the real training loop on 2 processes)."""
import importlib
import json
import os
import sys
import traceback

from accelerate.state import AcceleratorState, GradientState

import common

if __name__ == "__main__":
    out, cases = sys.argv[1], json.loads(sys.argv[2])
    rank = int(os.environ.get("RANK", 0))
    for name, (script, *args) in cases.items():
        AcceleratorState._reset_state(True)  # as in a new process (the process group itself stays)
        GradientState._reset_state()
        module = importlib.import_module(script[:-3])
        try:
            common.run_main(module.train, module.Config, [*args, "--output-dir", os.path.join(out, name)],
                            getattr(module, "PAPER", None))
            result = "ok"
        except BaseException:  # noqa: BLE001 - SystemExit of a UserError included: the test shows it
            result = traceback.format_exc()
        with open(os.path.join(out, f"{name}.rank{rank}"), "w") as f:
            f.write(result)
