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
                    rc = module.main(list(args[1:]))
                    code = rc if isinstance(rc, int) else 0  # gpu_check returns its exit code
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


# ---------------------------------------------------------------------- the suite's 2-process jobs, ONE start-up
# Each 2-process start-up costs two Python processes' imports (a start-up that only prints the batch-divides error
# took 7.6-8.4 s on 2 cores): the first test that needs a 2-process result runs every job below in one 2-rank
# start-up (tests/ddp_runs.py), later ones read its outputs.

# ddp_case of tests/test_<method>.py: a step of the script on a fixed global batch (two_process_results)
TWO_PROCESS_CASES = [("hnpm",), ("median_triplet", "rank"), ("median_triplet", "range"), ("reco",),
                     ("reco", "--image-pair", "q/q", "--feature-pair", "q/q"), ("ressl",), ("ressl", "shuffle"),
                     ("smog",), ("smog", "multicrop"), ("reco", "--multi-crop"),
                     ("ressl", "multi"), ("distributed",)]
# real script runs, the loop of train() (two_process_run): name -> command line; runs that end in an error last
TINY_HEADS = ["--proj-hidden", "32", "--proj-dim", "16"]
RESSL_RUN = ["ressl.py", *TINY, *TINY_HEADS, "--queue-size", "16", "--eval-every", "0"]
TWO_PROCESS_RUNS = {
    "hnpm": ["hnpm.py", *TINY, "--fake-size", "16", *TINY_HEADS, "--epochs", "1", "--student-grad"],
    "median_triplet": ["median_triplet.py", *TINY, *TINY_HEADS, "--epochs", "1"],
    "reco": ["reco.py", *TINY, "--proj-dim", "16", "--queue-size", "16", "--bn-splits", "2", "--epochs", "1"],
    "ressl": ["ressl.py", *TINY, *TINY_HEADS, "--queue-size", "16", "--epochs", "1"],
    "ressl-shuffle-bn": ["ressl.py", *TINY, *TINY_HEADS, "--queue-size", "16", "--epochs", "1", "--no-predictor",
                         "--bn-splits", "2"],
    "smog": ["smog.py", *TINY, *TINY_HEADS, "--num-groups", "8", "--reset-every", "3", "--epochs", "1"],
    # test_run: a checkpoint written by 2 processes; one written by 1 process (BEFORE) resumed on 2
    "ressl-first-epoch": [*RESSL_RUN, "--epochs", "2", "--stop-after-epochs", "1"],
    "ressl-resumed-on-two": [*RESSL_RUN, "--epochs", "2", "--resume"],
    # test_run: errors, on both processes
    "ressl-batch-7": [*RESSL_RUN, "--epochs", "1", "--batch-size", "7"],
    "ressl-nan-on-rank-1": [*RESSL_RUN, "--epochs", "3", "--checkpoint-every", "1", "--log-every", "4"],
}
TWO_PROCESS_BEFORE = {"ressl-resumed-on-two": [*RESSL_RUN, "--epochs", "2", "--stop-after-epochs", "1"]}  # 1 process
TWO_PROCESS_PATCHES = {"ressl-nan-on-rank-1": "test_run:nan_on_rank_1"}  # in force during the run, on each rank
_two_processes = {}


def _two_process_jobs(base):
    """Runs all TWO_PROCESS_CASES and TWO_PROCESS_RUNS at the first call -> (output folder, CompletedProcess)."""
    if not _two_processes:
        out = base / "two-processes"
        for name, args in TWO_PROCESS_BEFORE.items():
            run([*args, "--output-dir", str(out / name)])
        spec = {"steps": TWO_PROCESS_CASES, "runs": TWO_PROCESS_RUNS, "patches": TWO_PROCESS_PATCHES}
        _two_processes["all"] = out, run(["tests/ddp_runs.py", str(out), json.dumps(spec)], nproc=2, check=False,
                                         timeout=900)
    return _two_processes["all"]


def two_process_results(method, tmp_path, *args):
    """ddp_case of tests/test_<method>.py on 1 process (in this process, a fresh Accelerator) and on 2 gloo processes
    on the same global batch -> (result of the single process, [result of rank 0, result of rank 1]). A case not in
    TWO_PROCESS_CASES runs in a start-up of its own."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from ddp_step import run_case
    key = (method, *args)
    if key in TWO_PROCESS_CASES:
        out, p = _two_process_jobs(tmp_path.parent)
        folder = out / "steps" / str(TWO_PROCESS_CASES.index(key))
    else:
        folder = tmp_path / "two-processes"
        p = run(["tests/ddp_runs.py", str(folder), json.dumps({"steps": [key]})], nproc=2, check=False)
        folder = folder / "steps" / "0"
    assert all((folder / f"rank{r}.pt").exists() for r in (0, 1)), f"{key}: no result\n{p.stderr[-5000:]}"
    ranks = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        one = run_case(Accelerator(cpu=True), method, *args)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    return one, ranks


def two_process_outcome(name, tmp_path_factory):
    """TWO_PROCESS_RUNS[name] on 2 gloo processes -> (output folder, [{"ok", "error", "seconds", "stdout", "stderr"}
    of rank 0, of rank 1])."""
    out, p = _two_process_jobs(tmp_path_factory.getbasetemp())

    def read(rank, ext):
        return (out / f"{name}.rank{rank}.{ext}").read_text()
    ranks = []
    for rank in (0, 1):
        assert (out / f"{name}.rank{rank}.json").exists(), f"{name}, rank {rank}: no result\n{p.stderr[-3000:]}"
        ranks.append({**json.loads(read(rank, "json")), "stdout": read(rank, "out"), "stderr": read(rank, "err")})
    return str(out / name), ranks


def two_process_run(name, tmp_path_factory):
    """The output folder of TWO_PROCESS_RUNS[name], which must have succeeded on both processes."""
    out, ranks = two_process_outcome(name, tmp_path_factory)
    for rank, r in enumerate(ranks):
        assert r["ok"], f"{name}, rank {rank}: {r['error']}\n{r['stderr'][-3000:]}"
    return out


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
