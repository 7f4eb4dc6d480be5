"""Shared test helpers: run a script as a user would (subprocess, CPU, no network) and read its outputs."""
import json
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_ZIP = os.path.join(ROOT, "..", "shared", "data", "cifar10-jpeg.zip")
# small and fast: standard ResNet stem on 32 px (16x less compute than the CIFAR stem), narrow heads
TINY = ["--dataset", "fake", "--fake-size", "32", "--batch-size", "8", "--num-workers", "0", "--stem", "imagenet",
        "--log-every", "1", "--eval-every", "1", "--knn-k", "5"]


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


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def cifar_subset(tmp_path_factory):
    """ImageFolder with 200 train and 100 test images per class from the CIFAR-10 JPEG copy (skips without it)."""
    if not os.path.exists(CIFAR_ZIP):
        pytest.skip(f"CIFAR-10 JPEG copy not found at {CIFAR_ZIP}")
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
