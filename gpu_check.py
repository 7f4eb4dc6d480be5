"""The first command to run on a new GPU: throughput, host synchronisations, and every script end to end.

    python gpu_check.py --data-dir cifar10-jpeg.zip     # CUDA: CIFAR-10 JPEG copy (ImageFolder zip or folder)
    python gpu_check.py --device cpu                    # the same checks on a tiny model and synthetic images

Three parts, one Markdown table (also written to <out>/summary.md) with figures and PASS / FAIL per line; the exit
code is 1 when any line fails:
  bench     bench.py's measurements of all five methods (samples/s; on CUDA train_over_model >= 0.85 passes)
  sync      several non-logging train_steps of each method with host synchronisation forbidden: on CUDA
            torch.cuda.set_sync_debug_mode("error"); on the CPU a dispatch mode that records the ops which would
            synchronise a GPU (reading a value on the host, value-dependent shapes, checked linear algebra, tensors
            made from Python numbers)
  run       each script as a user runs it: one epoch (CUDA: bf16, --compile), a checkpoint, a second invocation with
            --resume for the second epoch, the kNN monitor before, between and after; checked: both exit 0, the
            resume message, every step logged once, a finite kNN top-1, backbone.pt
"""
import argparse
import contextlib
import importlib
import io
import json
import math
import os
import sys
import tempfile
import time
import types
import zipfile

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bench
import common

ROOT = os.path.dirname(os.path.abspath(__file__))
METHODS = bench.METHODS
# small heads and groups for the CPU run (the CUDA run uses every script's defaults)
CPU_FLAGS = {"ressl": ["--proj-hidden", "32", "--proj-dim", "16", "--queue-size", "16"],
             "smog": ["--proj-hidden", "32", "--proj-dim", "16", "--num-groups", "8", "--reset-every", "3"],
             "median_triplet": ["--proj-hidden", "32", "--proj-dim", "16"],
             "hnpm": ["--proj-hidden", "32", "--proj-dim", "16"],
             "reco": ["--proj-dim", "16", "--queue-size", "16", "--bn-splits", "2"]}


# ----------------------------------------------------------------------------- host synchronisations on the CPU

_VALUE_DEPENDENT = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2",
                    "unique_consecutive", "unique_dim", "repeat_interleave_tensor_only", "lift_fresh",
                    "lift_fresh_copy"}
_CHECKED_LINALG = ("svd", "eigh", "eig", "cholesky", "inv", "solve", "lstsq", "lu", "qr")


class SyncRecorder(TorchDispatchMode):
    """Records, in `ops`, the ops that make a CUDA host wait for the device (or copy a Python value to it): .item()
    and friends (_local_scalar_dense), value-dependent output sizes (nonzero, masked_select, boolean-mask indexing,
    unique), linear algebra with a host-side error check, and tensors made from Python numbers (lift_fresh)."""

    def __init__(self):
        super().__init__()
        self.ops, self.paused = [], False

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        if self.paused:
            return func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        linalg = name.lstrip("_").startswith("linalg_") and any(k in name for k in _CHECKED_LINALG)
        bool_index = name in ("index", "index_put", "index_put_", "_index_put_impl_") and len(args) > 1 and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()) if i is not None)
        if name in _VALUE_DEPENDENT or linalg or name in ("svd", "_svd_helper") or bool_index:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def sync_check(name, images, args, accelerator):
    """A warm-up step, then `args.sync_steps` non-logging train_steps with host synchronisation forbidden."""
    m = __import__(name)
    device, batch, size = accelerator.device, args.batch_size, 32
    cuda = device.type == "cuda"
    extra = {} if cuda else {"stem": "imagenet", **bench.CPU_HEADS.get(name, {})}
    cfg = m.Config(dataset="fake", batch_size=batch, num_workers=0, epochs=10, warmup_epochs=1, log_every=1000,
                   seed=0, **extra)
    data = types.SimpleNamespace(pretrain=images, size=size, mean_std=bench.CIFAR10_MEAN_STD, num_classes=10,
                                 cifar_stem=cfg.stem != "imagenet")
    specs = m.view_specs(cfg, size)
    model, optimizer, state = m.setup(cfg, data, accelerator)
    model.train()
    u8 = torch.stack([bench.pil_to_tensor(img) for img, _ in images[:batch]]).to(device)
    views = [common.batched_view(s, u8, size, bench.CIFAR10_MEAN_STD, common.view_generator(0, 0, 0, v))
             for v, s in enumerate(specs)]
    labels = torch.tensor([lab for _, lab in images[:batch]], device=device)

    def step(i):
        return m.train_step(model, state, optimizer, views, labels, cfg, m.schedules(cfg, i, 100), i, accelerator)
    step(1)  # warm-up (and compilation, cudnn autotuning) outside the check
    found = []
    for i in range(2, 2 + args.sync_steps):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.set_sync_debug_mode("error")
            try:
                step(i)
            except RuntimeError as e:
                found.append(f"step {i}: {str(e).splitlines()[0][:80]}")
            finally:
                torch.cuda.set_sync_debug_mode(0)
        else:
            # torch's stock optimizers keep their step counters on the host, where reading one costs no device wait
            # (Adam reads it with .item() every step): their own update is not watched here, only on CUDA
            with SyncRecorder() as rec:
                original = optimizer.step

                def unwatched_step(*a, **k):
                    rec.paused = True
                    try:
                        return original(*a, **k)
                    finally:
                        rec.paused = False
                optimizer.step = unwatched_step
                try:
                    step(i)
                finally:
                    del optimizer.step
            found += [f"step {i}: {op}" for op in rec.ops]
    return found


# ----------------------------------------------------------------------------- the scripts end to end

def invoke(name, argv):
    """`python <name>.py argv` in this process (no second start-up of Python and torch per invocation); Accelerate's
    process-wide state is reset first, as a new process would have it -> (exit code, stdout, last stderr line)."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state()
    GradientState._reset_state()
    module = importlib.import_module(name)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            common.run_main(module.train, module.Config, argv)
            code = 0
        except SystemExit as e:
            code = e.code
        except Exception as e:  # a crash is a failed line, not the end of the check
            code, err = 1, io.StringIO(f"{type(e).__name__}: {e}")
    lines = err.getvalue().strip().splitlines()
    return code, out.getvalue(), lines[-1] if lines else ""


def script_check(name, args, dataset_flags, out_root):
    """Epoch 1, checkpoint, then --resume for epoch 2, as two invocations -> (row dict, ok)."""
    out = os.path.join(out_root, name)
    cuda = args.device == "cuda"
    flags = [*dataset_flags, "--epochs", "2", "--warmup-epochs", "1", "--eval-every", "1", "--checkpoint-every", "1",
             "--output-dir", out]
    if cuda:
        flags += ["--batch-size", "256", "--mixed-precision", "bf16", "--log-every", "50"]
    else:
        flags += ["--batch-size", "8", "--num-workers", "0", "--stem", "imagenet", "--log-every", "2", "--knn-k", "5",
                  *CPU_FLAGS[name]]
    if args.compile:
        flags.append("--compile")
    walls, problems, out_text = [], [], ""
    for extra in (["--stop-after-epochs", "1"], ["--resume"]):
        tic = time.time()
        code, stdout, last_err = invoke(name, [*flags, *extra])
        walls.append(time.time() - tic)
        out_text += stdout
        if code != 0:
            problems.append(f"exit {code}: {last_err[:100]}")
            break
    metrics = []
    if os.path.isfile(os.path.join(out, "metrics.jsonl")):
        with open(os.path.join(out, "metrics.jsonl")) as f:
            metrics = [json.loads(line) for line in f]
    steps = [m["step"] for m in metrics if "loss" in m]
    knn = [m["knn_top1"] for m in metrics if "knn_top1" in m]
    speed = [m["images_per_s"] for m in metrics if "images_per_s" in m]
    if not problems:
        if "resumed from" not in out_text:
            problems.append("no resume message")
        if not steps or steps != sorted(set(steps)) or steps[-1] != max(steps):
            problems.append("steps logged twice or out of order")
        if len(knn) != 3 or not all(math.isfinite(k) for k in knn):
            problems.append(f"kNN monitor: {knn}")
        if not os.path.isfile(os.path.join(out, "backbone.pt")):
            problems.append("no backbone.pt")
    row = {"check": f"run {name}", "figures": f"{len(steps) and steps[-1]} steps, wall {walls[0]:.0f} s + "
           f"{sum(walls[1:]):.0f} s (resume), kNN top-1 {knn[-1] if knn else float('nan'):.1f}%, "
           f"{speed[-1] if speed else 0:.0f} img/s", "problems": problems}
    return row, not problems


# ----------------------------------------------------------------------------- data and main

def dataset_flags(args, tmp):
    """Script flags for the data: the CIFAR-10 JPEG copy (folder, or zip extracted once) or synthetic images."""
    if not args.data_dir:
        return ["--dataset", "fake", "--fake-size", "32"], ""
    path = args.data_dir
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            z.extractall(os.path.join(tmp, "data"))
        path = os.path.join(tmp, "data")
        if not os.path.isdir(os.path.join(path, "train")):  # a zip holding one top folder
            path = os.path.join(path, os.listdir(path)[0])
    return ["--dataset", "imagefolder", "--data-dir", path, "--num-workers", "8"], path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-dir", default=os.environ.get("CIFAR10_JPEG_ZIP", ""),
                   help="CIFAR-10 JPEG copy: ImageFolder folder (train/<class>/*, test/<class>/*) or its zip; "
                        "empty: synthetic images")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    p.add_argument("--parts", nargs="+", choices=["bench", "sync", "run"], default=["bench", "sync", "run"])
    p.add_argument("--sync-steps", type=int, default=2, help="checked train_steps per method")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="run the scripts with --compile (default: on CUDA; the CPU then uses the eager backend)")
    p.add_argument("--out", default="", help="folder for the runs and summary.md (default: a temporary folder)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.compile = cuda if args.compile is None else args.compile
    if args.compile and not cuda:  # inductor would compile C++ for minutes: Dynamo's capture alone
        os.environ.setdefault("ACCELERATE_DYNAMO_BACKEND", "eager")
    if cuda and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.data_dir and not os.path.exists(args.data_dir):
        print(f"error: --data-dir {args.data_dir!r} does not exist", file=sys.stderr)
        return 2
    tic = time.time()
    out = args.out or tempfile.mkdtemp(prefix="gpu_check-")
    os.makedirs(out, exist_ok=True)
    flags, data_path = dataset_flags(args, out)
    # bench's settings: CUDA at the real shapes, the CPU at bench's reduced model and tiny counts
    args.batch_size = 256 if cuda else 16
    args.steps = 20 if cuda else 1
    args.tv_samples, args.data_batch, args.num_workers = (256, 256, 0) if cuda else (32, 32, 0)
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    images = bench.load_images(data_path, max(4 * args.batch_size, args.data_batch, args.tv_samples))
    rows = []

    def add(check, figures, problems):
        rows.append({"check": check, "figures": figures, "problems": problems})
        status = "PASS" if not problems else "FAIL: " + "; ".join(problems)
        print(f"{check}: {figures} -> {status}", flush=True)

    for name in args.methods:
        if "bench" in args.parts:
            try:
                r = bench.bench_method(name, images, args, accelerator)
                ratio = r["train_over_model"]
                problems = [f"train_over_model {ratio} < 0.85"] if cuda and ratio < 0.85 else []
                problems += [] if all(math.isfinite(r[k]) and r[k] > 0 for k in ("model_only", "train_step")) else \
                    ["no throughput"]
                add(f"bench {name}", f"model_only {r['model_only']:.0f}/s, train_step {r['train_step']:.0f}/s, "
                    f"train_over_model {ratio:.2f}, views {r['data_batched']:.0f}/s", problems)
            except Exception as e:  # a failing method must not hide the others
                add(f"bench {name}", "-", [f"{type(e).__name__}: {str(e)[:100]}"])
        if "sync" in args.parts:
            try:
                found = sync_check(name, images, args, accelerator)
                add(f"sync {name}", f"{len(found)} synchronisations in {args.sync_steps} steps",
                    [", ".join(found[:4])] if found else [])
            except Exception as e:
                add(f"sync {name}", "-", [f"{type(e).__name__}: {str(e)[:100]}"])
    if "run" in args.parts:
        for name in args.methods:
            row, _ = script_check(name, args, flags, out)
            add(row["check"], row["figures"], row["problems"])
    device = torch.cuda.get_device_name() if cuda else "cpu"
    lines = [f"gpu_check on {device}, torch {torch.__version__}, {time.time() - tic:.0f} s in all, data: "
             f"{args.data_dir or 'synthetic'}", "", "| check | figures | result |", "|---|---|---|"]
    lines += [f"| {r['check']} | {r['figures']} | {'PASS' if not r['problems'] else 'FAIL: ' + '; '.join(r['problems'])} |"
              for r in rows]
    summary = "\n".join(lines) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary)
    print("\n" + summary + f"\n(written to {os.path.join(out, 'summary.md')})")
    return 1 if any(r["problems"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
