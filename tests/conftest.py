"""Shared test helpers: run a script as a user would (subprocess, CPU, no network) and read its outputs."""
import contextlib
import json
import os
import subprocess
import sys
import time
import zipfile

import pytest
import torch
import torch.nn as nn
import torchvision

from common import latest_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a JPEG copy of CIFAR-10 in ImageFolder layout (train/<class>/NNNN.jpg, test/<class>/NNNN.jpg)
CIFAR_ZIP = os.environ.get("CIFAR10_JPEG_ZIP", os.path.join(ROOT, "..", "shared", "data", "cifar10-jpeg.zip"))
# small and fast: standard ResNet stem on 32 px (16x less compute than the CIFAR stem), narrow heads
TINY = ["--dataset", "fake", "--fake-size", "32", "--batch-size", "8", "--num-workers", "0", "--stem", "imagenet",
        "--log-every", "1", "--eval-every", "1", "--knn-k", "5", "--warmup-epochs", "1"]


# scripts whose command line `run` executes inside the test process: a new Python process costs ~5 s of imports
IN_PROCESS = {"median_triplet.py", "smog.py", "ressl.py", "hnpm.py", "reco.py", "eval_linear.py", "bench.py",
              "gpu_check.py"}


def run(args, nproc=1, check=True, timeout=600, patched=False):
    """Run `python <args>` (or torchrun with nproc CPU processes) in the repository root; returns CompletedProcess.

    A single-process run of a method script, eval_linear.py, bench.py or gpu_check.py executes its command line in
    this process, as `python <script>` would (its exit code, stdout and stderr; a fresh Accelerate state), without the
    start-up cost; TESTS_SUBPROCESS=1 runs every command in a new process instead, except a `patched` run (the test
    replaced a function, which only this process sees)."""
    if nproc == 1 and args[0] in IN_PROCESS and (patched or not os.environ.get("TESTS_SUBPROCESS")):
        p = _run_in_process(args)
    else:
        # ACCELERATE_USE_CPU: without it Accelerate does not start gloo under torchrun on CPU (each rank runs alone)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1",
               "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONPATH": ROOT}
        if nproc > 1 and os.environ.get("TESTS_TORCHRUN"):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_port", str(29500 + os.getpid() % 1000)] + args
            p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        elif nproc > 1:
            p = _run_ranks(args, nproc, env, timeout)
        else:
            p = subprocess.run([sys.executable] + args, cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def _run_ranks(args, nproc, env, timeout, grace=60):
    """What torchrun does for one node, without its launcher process (~4 s of imports a launch): nproc processes of
    `python <args>` with the ranks and rendezvous address in their environment -> CompletedProcess with the ranks'
    stdout and stderr one after the other and the first non-zero exit code. When one rank fails, the others get
    `grace` seconds to end on their own (a rank that hangs is then killed and its error line is missing)."""
    import socket
    import tempfile
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs, files = [], []
    for rank in range(nproc):
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        rank_env = {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                    "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
                    "GROUP_RANK": "0"}
        procs.append(subprocess.Popen([sys.executable] + args, cwd=ROOT, env=rank_env, stdout=out, stderr=err,
                                      text=True))
        files.append((out, err))
    deadline, failed_at = time.time() + timeout, None
    try:
        while any(p.poll() is None for p in procs):
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = time.time()
            if time.time() > deadline:
                raise subprocess.TimeoutExpired(args, timeout)
            if failed_at is not None and time.time() - failed_at > grace:
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = []
    for out, err in files:
        out.seek(0), err.seek(0)
        texts.append((out.read(), err.read()))
        out.close(), err.close()
    code = next((p.returncode for p in procs if p.returncode != 0), 0)
    return subprocess.CompletedProcess(args, code, "".join(o for o, _ in texts), "".join(e for _, e in texts))


def _run_in_process(args):
    import contextlib
    import importlib
    import io
    import signal
    import traceback
    import warnings
    from accelerate.state import AcceleratorState, GradientState
    import common
    module = importlib.import_module(args[0][:-3])
    out, err, code = io.StringIO(), io.StringIO(), 0
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    saved_env, cwd = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "ACCELERATE_USE_CPU")}, os.getcwd()
    os.environ.update(CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="1")
    os.chdir(ROOT)
    AcceleratorState._reset_state(True)  # as in a new process
    GradientState._reset_state()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("always")  # a warning shows in every run, as in a new process
            try:
                if args[0] in ("eval_linear.py", "bench.py", "gpu_check.py"):
                    code = module.main(list(args[1:])) or 0  # gpu_check returns its exit code
                else:
                    common.run_main(module.train, module.Config, list(args[1:]), getattr(module, "PAPER", None))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # what the interpreter would print before exiting with 1
                traceback.print_exc()
                code = 1
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        os.chdir(cwd)
        for k, v in saved_env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        for s, h in handlers.items():
            signal.signal(s, h)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def cli_error(script, argv, capsys):
    """Runs a script's command line in this process (as `python script argv` would, without the start-up cost) and
    returns its exit code and stderr lines."""
    import importlib
    import common
    module = importlib.import_module(script[:-3])
    with pytest.raises(SystemExit) as e:
        common.run_main(module.train, module.Config, argv, getattr(module, "PAPER", None))
    return e.value.code, capsys.readouterr().err.strip().splitlines()


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def check_backbone(out, method, eval_linear=False):
    """backbone.pt of run `out` loads into a plain torchvision ResNet-18 (no fc); optionally eval_linear.py reads it."""
    ckpt = torch.load(os.path.join(out, "backbone.pt"))
    net = torchvision.models.resnet18()
    net.fc = nn.Identity()
    net.load_state_dict(ckpt["state_dict"])
    assert ckpt["method"] == method and ckpt["cifar_stem"] is False
    if eval_linear:
        p = run(["eval_linear.py", os.path.join(out, "backbone.pt"), "--dataset", "fake", "--fake-size", "32",
                 "--epochs", "2", "--batch-size", "8", "--num-workers", "0", "--cached"])
        assert "top-1" in p.stdout


def run_resumed(args, tmp_path):
    """Runs `args` (2 epochs) straight through, and again as 1 epoch + --resume + 1 epoch. Asserts that the interrupted
    run wrote no backbone, that the resumed one says so, ends with the same backbone and logged every step once.
    Returns both runs' last momentum state (the module registered with Accelerate) for method-specific checks."""
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run(args + ["--output-dir", straight])
    run(args + ["--output-dir", resumed, "--stop-after-epochs", "1"])
    assert not os.path.exists(os.path.join(resumed, "backbone.pt"))
    assert "resumed from" in run(args + ["--output-dir", resumed, "--resume"]).stdout
    a, b = torch.load(os.path.join(straight, "backbone.pt")), torch.load(os.path.join(resumed, "backbone.pt"))
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    steps = [[m["step"] for m in read_metrics(out) if "loss" in m] for out in (straight, resumed)]
    assert steps[1] == steps[0] == list(range(1, len(steps[0]) + 1))  # no step done twice or skipped
    return [torch.load(os.path.join(latest_checkpoint(out), "custom_checkpoint_0.pkl"), weights_only=False)
            for out in (straight, resumed)]


@pytest.fixture(scope="session")
def cifar_subset(tmp_path_factory):
    """ImageFolder with 200 train and 100 test images per class from the CIFAR-10 JPEG copy (skips without it)."""
    if not os.path.exists(CIFAR_ZIP):
        pytest.skip(f"CIFAR-10 JPEG copy not found at {CIFAR_ZIP} (set CIFAR10_JPEG_ZIP)")
    root = tmp_path_factory.mktemp("cifar10-jpeg-subset")
    per_split = {"train": 200, "test": 100}
    with zipfile.ZipFile(CIFAR_ZIP) as z:
        for name in z.namelist():
            parts = name.split("/")  # train/<class>/0000.jpg
            if len(parts) == 3 and parts[0] in per_split and parts[2].endswith(".jpg"):
                if int(os.path.splitext(parts[2])[0]) < per_split[parts[0]]:
                    dest = root.joinpath(*parts)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(z.read(name))
    return str(root)


# every two-process case of the suite: the first call runs all that are selected in ONE torchrun start-up
TWO_PROCESS_CASES = [("hnpm",), ("median_triplet", "rank"), ("median_triplet", "range"), ("reco",),
                     ("reco", "--image-pair", "q/q", "--feature-pair", "q/q"), ("ressl",), ("ressl", "shuffle"),
                     ("smog",), ("smog", "multicrop"), ("reco", "--multi-crop"),
                     ("ressl", "multi"), ("batchnorm",)]
_two_process_done = {}


def two_process_results(method, tmp_path, *args):
    """ddp_case of tests/test_<method>.py on 1 process (in this process, a fresh Accelerator) and on 2 gloo processes
    (tests/ddp_step.py under torchrun) on the same global batch -> (result of the single process, [result of rank 0,
    result of rank 1]). The 2-process runs of all TWO_PROCESS_CASES share one start-up; a case not listed there
    runs alone."""
    import json
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from ddp_step import run_case
    key = (method, *args)
    if key not in _two_process_done:
        batch = [c for c in TWO_PROCESS_CASES if c not in _two_process_done] if key in TWO_PROCESS_CASES else [key]
        out = tmp_path / "two-processes"
        run(["tests/ddp_step.py", "--cases", str(out), json.dumps(batch)], nproc=2)
        for i, case in enumerate(batch):
            _two_process_done[case] = [torch.load(out / str(i) / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        one = run_case(Accelerator(cpu=True), method, *args)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    return one, _two_process_done[key]


# every real 2-process training run of the suite (the loop of train(), 1 epoch): the first call runs them all in
# ONE 2-rank start-up (tests/ddp_runs.py); name -> command line
TINY_HEADS = ["--proj-hidden", "32", "--proj-dim", "16"]
TWO_PROCESS_RUNS = {
    "hnpm": ["hnpm.py", *TINY, "--fake-size", "16", *TINY_HEADS, "--epochs", "1", "--student-grad"],
    "median_triplet": ["median_triplet.py", *TINY, *TINY_HEADS, "--epochs", "1"],
    "reco": ["reco.py", *TINY, "--proj-dim", "16", "--queue-size", "16", "--bn-splits", "2", "--epochs", "1"],
    "ressl": ["ressl.py", *TINY, *TINY_HEADS, "--queue-size", "16", "--epochs", "1"],
    "ressl-shuffle-bn": ["ressl.py", *TINY, *TINY_HEADS, "--queue-size", "16", "--epochs", "1", "--no-predictor",
                         "--bn-splits", "2"],
    "smog": ["smog.py", *TINY, *TINY_HEADS, "--num-groups", "8", "--reset-every", "3", "--epochs", "1"],
}
_two_process_runs = {}


def two_process_run(name, tmp_path_factory):
    """The output folder of TWO_PROCESS_RUNS[name] run on 2 gloo processes; all of them run in one start-up at the
    first call. Fails with the rank's traceback when the run failed."""
    import json
    if not _two_process_runs:
        out = tmp_path_factory.mktemp("two-process-runs")
        p = run(["tests/ddp_runs.py", str(out), json.dumps(TWO_PROCESS_RUNS)], nproc=2, check=False, timeout=900)
        _two_process_runs.update({n: (out, p) for n in TWO_PROCESS_RUNS})
    out, p = _two_process_runs[name]
    for rank in (0, 1):
        result = out / f"{name}.rank{rank}"
        assert result.exists() and result.read_text() == "ok", (
            f"{name}, rank {rank}: {result.read_text() if result.exists() else 'no result'}\n{p.stderr[-3000:]}")
    return str(out / name)


@contextlib.contextmanager
def grads_before_clipping(accelerator, params):
    """Records {name: grad.clone()} of `params` (name -> parameter) as the step's accelerator.clip_grad_norm_ finds
    them: the raw gradients, scale included, which clipping would normalise, so that a two-process check compares
    them and not only the clipped ones. Yields the dict it fills."""
    raw, clip = {}, accelerator.clip_grad_norm_

    def recording(parameters, *a, **k):
        raw.update({n: p.grad.clone() for n, p in params.items() if p.grad is not None})
        return clip(parameters, *a, **k)
    accelerator.clip_grad_norm_ = recording
    try:
        yield raw
    finally:
        del accelerator.clip_grad_norm_
