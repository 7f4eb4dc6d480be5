"""Shared test helpers: run a script as a user would (subprocess, CPU, no network) and read its outputs."""
import contextlib
import json
import os
import subprocess
import sys
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


def run(args, nproc=1, check=True, timeout=600):
    """Run `python <args>` (or torchrun with nproc CPU processes) in the repository root; returns CompletedProcess."""
    # ACCELERATE_USE_CPU: without it Accelerate does not start gloo under torchrun on CPU (each rank runs alone)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1" if nproc > 1 else
           os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONPATH": ROOT}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + os.getpid() % 1000)] + args
    else:
        cmd = [sys.executable] + args
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def cli_error(script, argv, capsys):
    """Runs a script's command line in this process (as `python script argv` would, without the start-up cost) and
    returns its exit code and stderr lines."""
    import importlib
    import common
    module = importlib.import_module(script[:-3])
    with pytest.raises(SystemExit) as e:
        common.run_main(module.train, module.Config, argv)
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


def two_process_results(method, tmp_path, *args):
    """Runs tests/ddp_step.py (ddp_case of tests/test_<method>.py) on 1 and on 2 gloo processes on the same global
    batch -> (result of the single process, [result of rank 0, result of rank 1])."""
    tag = "-".join([method, *args]).replace("/", "_")
    one, two = tmp_path / f"{tag}-one", tmp_path / f"{tag}-two"
    run(["tests/ddp_step.py", method, str(one), *args])
    run(["tests/ddp_step.py", method, str(two), *args], nproc=2)
    load = lambda d, r: torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False)
    return load(one, 0), [load(two, 0), load(two, 1)]


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
