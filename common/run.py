"""The run: accelerator, run folder, config.json, metrics, kNN monitor, checkpoints, resume and stops.

A script's train() calls, in order:
    run = Run(cfg, method, accelerator, data, steps_per_epoch)   # folder, config.json, trackers, signal handlers
    start_epoch, done = run.resume()                              # --resume: newest complete checkpoint
    per step:   if run.after_step(step, epoch, terms, **scalars): break   # True: a signal or a non-finite loss
    per epoch:  if run.end_epoch(...): break   # kNN monitor, checkpoint when due; True: a stop
    run.finish(backbone, meta)   # backbone.pt, or for a stop: the checkpoint (signal) or the error (non-finite)
The run's state lives in the objects registered with Accelerate, so a checkpoint does not depend on the number of
processes that wrote it.
"""
import dataclasses
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from .config import RUN_ONLY_FIELDS, UserError
from .data import Transformed, decode_all, eval_batch, eval_transform, make_loader


def make_accelerator(cfg):
    """Accelerator with the run's precision, trackers, seedable sampling, --compile and a process-group timeout of
    30 minutes (a process that died or hangs ends the job then, not hours later).

    --compile hands torch.compile to Accelerate, which applies it inside `accelerator.prepare`, after the DDP wrapper,
    so DDP can overlap its gradient all-reduce with the compiled backward. The backend is inductor, or what
    ACCELERATE_DYNAMO_BACKEND names (e.g. `eager`, which the CPU tests use: it compiles in seconds)."""
    from accelerate import DataLoaderConfiguration, InitProcessGroupKwargs
    trackers = {"none": [], "tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}
    for name in trackers[cfg.report_to]:
        try:
            __import__("torch.utils.tensorboard" if name == "tensorboard" else "wandb")
        except ImportError:
            raise UserError(f"--report-to {cfg.report_to} needs the {name} package: pip install {name}") from None
    backend = (os.environ.get("ACCELERATE_DYNAMO_BACKEND") or "no").lower()
    accelerator = UnwrappingAccelerator(
        mixed_precision=None if cfg.mixed_precision == "auto" else cfg.mixed_precision,
        log_with=trackers[cfg.report_to] or None, project_dir="runs",  # Run points the trackers at the run folder
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
        dynamo_backend=(backend if backend != "no" else "inductor") if cfg.compile else "no",
        gradient_accumulation_steps=cfg.accumulate,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=PROCESS_GROUP_TIMEOUT)])
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return accelerator


class UnwrappingAccelerator(Accelerator):
    """unwrap_model returns the plain module by default. Accelerate's default (keep_torch_compile=True) on a compiled
    DDP model re-points the compiled wrapper at the bare module, and a copy of it (a momentum network) would be a
    second compiled module whose state_dict keys carry `_orig_mod.`."""

    def unwrap_model(self, model, keep_fp32_wrapper=True, keep_torch_compile=False):
        return super().unwrap_model(model, keep_fp32_wrapper, keep_torch_compile)


# how long a collective waits for a missing process before the job fails; every per-process decision is collective
# and downloads happen once per node before the process group is needed, so nothing legitimate waits this long
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)


def fast_model(model, cfg, accelerator):
    """Channels-last memory on CUDA (faster convolutions under bf16 / TF32). --compile is applied by
    `accelerator.prepare` (see make_accelerator), after DDP, not here."""
    if accelerator.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def provenance(accelerator):
    """Where a run came from: commit (and a dirty tree) of the checkout, library versions, hardware."""
    import accelerate
    import torchvision
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "HEAD")
    cuda = accelerator.device.type == "cuda"
    return {"git_commit": commit or None, "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))
            if commit else None, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "accelerate": accelerate.__version__,
            "device_name": torch.cuda.get_device_name(accelerator.device) if cuda else (platform.processor() or "cpu"),
            "device_count": torch.cuda.device_count() if cuda else os.cpu_count(),
            "num_processes": accelerator.num_processes, "num_nodes": int(os.environ.get("NNODES", "1") or 1),
            "mixed_precision": accelerator.mixed_precision, "hostname": platform.node()}


def zero_grad(optimizer, accelerator):
    """Zero the gradients on the first batch of each --accumulate window (every batch without accumulation), where
    a train_step starts; Accelerate's own optimizer.zero_grad() acts only on a window's last batch."""
    if (accelerator.step - 1) % accelerator.gradient_accumulation_steps == 0:
        getattr(optimizer, "optimizer", optimizer).zero_grad(set_to_none=True)


class NonFiniteLoss(UserError):
    pass


class Run:
    """One training run: its folder, config.json, metrics.jsonl (and trackers), the kNN monitor, crash-safe
    checkpoints, resume, preemption (SIGTERM / SIGUSR1) and the non-finite-loss stop. All its state is set here."""

    def __init__(self, cfg, method, accelerator, data, steps_per_epoch):
        from accelerate.utils import broadcast_object_list
        self.cfg, self.method, self.accelerator, self.data = cfg, method, accelerator, data
        name = [cfg.output_dir or os.path.join("runs", f"{method}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")]
        broadcast_object_list(name)  # one folder on every process
        self.out = name[0]
        self.metrics_path = os.path.join(self.out, "metrics.jsonl")
        # the schedule, in batches; an epoch drops its last batches that do not fill an --accumulate window
        if steps_per_epoch < cfg.accumulate:
            raise UserError(f"--accumulate {cfg.accumulate} exceeds the {steps_per_epoch} batches of an epoch.")
        self.steps_per_epoch = steps_per_epoch - steps_per_epoch % cfg.accumulate
        self.updates_per_epoch = self.steps_per_epoch // cfg.accumulate  # optimiser updates: the schedules' unit
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.last_epoch = min(cfg.epochs, cfg.stop_after_epochs or cfg.epochs)  # this invocation ends after it
        # progress: the current step and epoch, images seen in this epoch and its start time, the progress bar
        self.step, self.epoch, self.seen, self.epoch_tic, self.tic, self.bar = 0, 0, 0, time.time(), time.time(), None
        # stops: a signal sets `signalled`, `stop_agreed` once every process knows; stop_reason is "signal" (at the
        # next --accumulate window's end: a checkpoint holds no half-summed gradient) or "non-finite" once it must end
        self.signalled, self.stop_agreed, self.stop_reason = False, False, None
        # non-finite watch on the device: (step of the first bad loss or -1, its terms, steps counted), term names
        self.bad, self.terms_names = None, []
        self.memory_loader = self.query_loader = None  # kNN monitor loaders, built at the first evaluation
        self.eval_tensors = None  # or, on the device path, ((images, labels) of memory, of query) on the device

        config = {"method": method, **dataclasses.asdict(cfg)}
        path = os.path.join(self.out, "config.json")
        if cfg.resume and os.path.isfile(path):
            with open(path) as f:
                self._check_same_config(json.load(f), config)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            os.makedirs(self.out, exist_ok=True)
            with open(path, "w") as f:
                json.dump({**config, "provenance": provenance(accelerator)}, f, indent=2)
        if cfg.report_to != "none":
            accelerator.project_configuration.set_directories(self.out)
            accelerator.project_configuration.logging_dir = self.out
            accelerator.init_trackers(os.path.basename(os.path.normpath(self.out)),
                                      config={k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))})
        accelerator.register_save_state_pre_hook(_save_plain_names)
        accelerator.register_load_state_pre_hook(lambda models, input_dir: _load_unwrapped(accelerator, models))
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    def _check_same_config(self, old, new):
        diff = [k for k in new if k not in RUN_ONLY_FIELDS and k in old and old[k] != new[k]]
        if diff and not self.cfg.allow_config_change:
            raise UserError("--resume with settings that differ from the checkpoint's config.json: " + ", ".join(
                f"{k} {old[k]!r} -> {new[k]!r}" for k in diff) + " (add --allow-config-change to resume anyway).")

    def _on_signal(self, signum, frame):
        self.signalled = True
        print(f"received {signal.Signals(signum).name}: checkpointing after the current step", file=sys.stderr)

    # ------------------------------------------------------------------------- metrics

    def log(self, **metrics):
        """One line of metrics.jsonl (main process) and the same values to the trackers, at the same step."""
        if self.accelerator.is_main_process:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}) + "\n")
        if self.cfg.report_to != "none":
            self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"},
                                 step=metrics.get("step"))

    def after_step(self, step, epoch, terms, **scalars):
        """Per step: watch the loss terms (0-dim device tensors) for non-finite values without a host sync; on a
        logging step reduce and log them. Returns True when the training loop must end: a signal (single process:
        at once; several: at the logging step, where the processes agree) or a non-finite loss on any process
        (found at the logging step or the epoch end, before any checkpoint). run.finish() then acts on it."""
        vals = torch.stack([t.detach().float().reshape(()) for t in terms.values()])
        if self.bad is None:
            self.bad = (torch.full((), -1, dtype=torch.long, device=vals.device), torch.zeros_like(vals),
                        torch.zeros((), dtype=torch.long, device=vals.device))
        first_bad, bad_vals, counter = self.bad
        counter += 1  # the step number, kept on the device
        new = (first_bad < 0) & ~torch.isfinite(vals).all()
        self.bad = (torch.where(new, counter, first_bad), torch.where(new, vals, bad_vals), counter)
        self.terms_names, self.step, self.epoch = list(terms), step, epoch
        if self.logging_step(step):
            # one collective for the means, the non-finite flag and the signal flag of every process
            flags = torch.stack([(self.bad[0] >= 0).float(), torch.tensor(float(self.signalled), device=vals.device)])
            total = self.accelerator.reduce(torch.cat([vals, flags]), "sum").tolist()
            means = [v / self.accelerator.num_processes for v in total[:len(vals)]]
            if total[-2] > 0:
                self.stop_reason = "non-finite"
                return True
            self.log(step=step, epoch=epoch + 1, **dict(zip(terms, means)), **scalars,
                     images_per_s=self.seen / max(time.time() - self.epoch_tic, 1e-9))
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{means[0]:.3f}")
            if total[-1] > 0:
                self.stop_agreed = True
        elif self.signalled and self.accelerator.num_processes == 1:  # a Python flag: no host sync
            self.stop_agreed = True
        if self.stop_agreed and step % self.cfg.accumulate == 0:  # at the end of an --accumulate window
            self.stop_reason = "signal"
        return self.stop_reason is not None

    def logging_step(self, step):
        """Whether after_step logs (and so synchronises) after `step`: every --log-every steps and the last step."""
        return step % self.cfg.log_every == 0 or step == self.total_steps

    def _any_non_finite(self):
        """Whether any process saw a non-finite loss term since the run started (one collective; epoch ends only)."""
        if self.bad is None:
            return False
        return self.accelerator.reduce((self.bad[0] >= 0).float(), "sum").item() > 0

    def _non_finite_error(self):
        first_bad, bad_vals, counter = self.bad
        if first_bad.item() < 0:  # another process saw it
            return NonFiniteLoss(f"non-finite loss on another process by step {self.step}. The last checkpoint in "
                                 f"{self.out} is untouched; lower --lr or use --mixed-precision no.")
        bad_step = self.step - counter.item() + first_bad.item()  # the device counter started at this run's first step
        terms = ", ".join(f"{k} {v}" for k, v in zip(self.terms_names, bad_vals.tolist()))
        return NonFiniteLoss(f"non-finite loss at step {bad_step} (epoch {bad_step // self.steps_per_epoch + 1}): "
                             f"{terms}. The last checkpoint in {self.out} is untouched; lower --lr or use "
                             f"--mixed-precision no.")

    # ------------------------------------------------------------------------- epochs, monitor, checkpoints

    def epoch_batches(self, loader, epoch, start_step=0):
        """The epoch's batches (skipping the first `start_step` after a mid-epoch resume) behind a progress bar."""
        from tqdm.auto import tqdm
        loader.set_epoch(epoch, start_step)
        self.seen, self.epoch_tic = 0, time.time()
        self.bar = tqdm(loader, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", initial=start_step,
                        total=self.steps_per_epoch, disable=not self.accelerator.is_local_main_process)
        for i, batch in enumerate(self.bar, start_step):
            if i == self.steps_per_epoch:  # the batches after the last full --accumulate window
                break
            self.seen += self.cfg.batch_size
            yield batch

    def accumulate(self, step, model):
        """Context of one batch (Accelerate's accumulate): the optimiser steps, gradients synchronise and
        accelerator.sync_gradients is True on the last batch of each --accumulate window. The window is counted
        from the run's step, so a resumed run stays in phase."""
        self.accelerator.step = step
        return self.accelerator.accumulate(model)

    def monitor(self, epoch, step, backbone, diagnostics_fn):
        """kNN top-1 of the backbone (train split as memory, test split as queries) and the method's diagnostics:
        diagnostics_fn(query) -> dict, where query = (features (M, D), labels (M,)) of the test split, extracted once
        for the kNN and handed on (ReCo's Table III reads them).

        On the device path (train_views put the decoded data set on the device) both splits are decoded once, at
        the first evaluation, and every evaluation reads them from device memory; else DataLoaders decode them."""
        memory, query = self._eval_features(backbone)
        knn = knn_top1(memory, query, self.data.num_classes, self.cfg.knn_k, self.cfg.knn_t)
        self.log(epoch=epoch, step=step, knn_top1=knn, **diagnostics_fn(query))
        self.accelerator.print(f"epoch {epoch}: kNN top-1 {knn:.2f}%")

    def _eval_features(self, backbone):
        acc, data, n = self.accelerator, self.data, self.accelerator.num_processes
        views = getattr(data, "device_views", None)
        if views is not None:
            if self.eval_tensors is None:
                memory = ((views.images, views.labels) if data.memory is data.pretrain
                          else tuple(t.to(views.device) for t in decode_all(data.memory, data.size)))
                query = tuple(t.to(views.device) for t in decode_all(data.query, data.size))
                self.eval_tensors = memory, query
            batch = self.cfg.batch_size // n
            return tuple(extract_features_on_device(backbone, images, labels, acc, batch, data.size, data.mean_std)
                         for images, labels in self.eval_tensors)
        if self.memory_loader is None:
            tf = eval_transform(data.size, data.mean_std)
            self.memory_loader, self.query_loader = acc.prepare(
                make_loader(Transformed(data.memory, tf), self.cfg.batch_size, n, False, self.cfg.num_workers),
                make_loader(Transformed(data.query, tf), self.cfg.batch_size, n, False, self.cfg.num_workers))
        return (extract_features(backbone, self.memory_loader, acc),
                extract_features(backbone, self.query_loader, acc))

    def end_epoch(self, epoch_done, step, backbone, diagnostics_fn):
        """kNN monitor and checkpoint when due; diagnostics_fn(query) -> dict of the method's epoch diagnostics (see
        monitor). Returns True when the training loop must end: after a stop, or on finding a non-finite loss (which
        then becomes the stop), when it does nothing else."""
        cfg = self.cfg
        if self.stop_reason is None and self._any_non_finite():
            self.stop_reason = "non-finite"
        if self.stop_reason is not None:
            return True
        if (cfg.eval_every and epoch_done % cfg.eval_every == 0) or epoch_done == cfg.epochs:
            self.monitor(epoch_done, step, backbone, diagnostics_fn)
        if epoch_done % cfg.checkpoint_every == 0 or epoch_done in (cfg.epochs, self.last_epoch):
            self.save_checkpoint(epoch_done, step)
        return False

    def save_checkpoint(self, epoch, step):
        """checkpoint-<step>: Accelerate state (trained network, optimiser, registered momentum state, RNG) and
        progress.json, written into a temporary folder and renamed when complete; older checkpoints are removed."""
        acc, path = self.accelerator, os.path.join(self.out, f"checkpoint-{step}")
        tmp = os.path.join(self.out, f".tmp-checkpoint-{step}")
        if acc.is_main_process and os.path.isdir(tmp):
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(tmp)
        acc.wait_for_everyone()
        if acc.is_main_process:
            with open(os.path.join(tmp, "progress.json"), "w") as f:
                json.dump({"epoch": epoch, "step": step, "mixed_precision": acc.mixed_precision}, f)
            if os.path.isdir(path):
                shutil.rmtree(path)
            os.replace(tmp, path)  # atomic: a checkpoint folder is complete or absent
            for d in os.listdir(self.out):
                if re.fullmatch(r"checkpoint-\d+", d) and d != os.path.basename(path):
                    shutil.rmtree(os.path.join(self.out, d))
        acc.wait_for_everyone()

    def resume(self):
        """-> (start epoch, steps of it already done). With --resume, loads the newest complete checkpoint (one
        written by any number of processes) and says which."""
        cfg, acc = self.cfg, self.accelerator
        ckpt = latest_checkpoint(self.out) if cfg.resume and acc.is_main_process else None
        if cfg.resume and acc.num_processes > 1:  # every process loads the one the main process chose
            from accelerate.utils import broadcast_object_list
            ckpt = broadcast_object_list([ckpt], from_process=0)[0]
        if cfg.resume and ckpt is None:
            acc.print(f"--resume: no complete checkpoint in {self.out}, starting from scratch")
        if ckpt is None:
            return 0, 0
        with open(os.path.join(ckpt, "progress.json")) as f:
            progress = json.load(f)
        written = progress.get("mixed_precision", acc.mixed_precision)
        if written != acc.mixed_precision and "fp16" in (written, acc.mixed_precision):
            # only fp16 runs checkpoint a GradScaler: Accelerate cannot load one that is absent, nor drop one
            raise UserError(f"{ckpt} was written under --mixed-precision {written}; this run uses "
                            f"{acc.mixed_precision}. Resume with --mixed-precision {written}.")
        acc.load_state(ckpt)
        step = progress.get("step", progress["epoch"] * self.steps_per_epoch)
        if acc.is_main_process and os.path.isfile(self.metrics_path):  # drop lines of steps that will be redone
            with open(self.metrics_path) as f:
                lines = [line for line in f if json.loads(line).get("step", 0) <= step]
            with open(self.metrics_path, "w") as f:
                f.writelines(lines)
        acc.print(f"resumed from {ckpt} (epoch {progress['epoch']}, step {step})")
        return step // self.steps_per_epoch, step % self.steps_per_epoch

    def finish(self, backbone, meta):
        """The end of an invocation. After a signal: a checkpoint of the current step and how to continue; after a
        non-finite loss: the error (the last checkpoint untouched); else backbone.pt when the schedule is complete.
        Wall time and peak memory are the last metrics line."""
        acc = self.accelerator
        if self.stop_reason == "non-finite":
            raise self._non_finite_error()
        if self.stop_reason == "signal":
            self.save_checkpoint(self.epoch, self.step)
            acc.print(f"stopped by a signal at step {self.step} (epoch {self.epoch + 1}); checkpoint written. "
                      f"Continue with the same command plus --resume --output-dir {self.out}")
        elif self.last_epoch == self.cfg.epochs and acc.is_main_process:
            save_backbone(os.path.join(self.out, "backbone.pt"), backbone,
                          {"arch": self.cfg.arch, "cifar_stem": self.data.cifar_stem, "image_size": self.data.size,
                           "mean_std": self.data.mean_std, "method": self.method, "dataset": self.cfg.dataset,
                           "epochs": self.cfg.epochs, **meta})
        if acc.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(acc.device) / 2**20
        else:  # peak resident memory of this process (Linux reports KiB)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.log(wall_time_s=round(time.time() - self.tic, 1), peak_memory_mb=round(peak, 1))
        acc.wait_for_everyone()
        acc.end_training()
        return self.out


# ----------------------------------------------------------------------------- checkpoint files

def plain_name(key):
    """A parameter name without the wrappers' prefixes (DDP `module.`, torch.compile `_orig_mod.`)."""
    return re.sub(r"^(module\.|_orig_mod\.)+", "", key)


def _save_plain_names(models, weights, output_dir):
    """Checkpoint the trained network under its own parameter names, so a checkpoint written by N processes, with or
    without --compile, loads into a run with any number, with or without it."""
    for i, w in enumerate(weights):
        weights[i] = {plain_name(k): v for k, v in w.items()}


def _load_unwrapped(accelerator, models):
    for i, m in enumerate(models):
        models[i] = accelerator.unwrap_model(m, keep_torch_compile=False)


def latest_checkpoint(output_dir):
    """Path of the newest complete `checkpoint-<step>` folder (one holding progress.json) in output_dir, or None."""
    if not os.path.isdir(output_dir):
        return None
    ckpts = [d for d in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", d)
             and os.path.isfile(os.path.join(output_dir, d, "progress.json"))]
    return os.path.join(output_dir, max(ckpts, key=lambda d: int(d.split("-")[1]))) if ckpts else None


def save_backbone(path, backbone, meta):
    """backbone.pt: a torchvision state_dict (no fc) plus what eval_linear.py needs to rebuild the network."""
    state = {plain_name(k): v.detach().cpu() for k, v in backbone.state_dict().items()}
    torch.save({"state_dict": state, **meta}, path)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def extract_features(backbone, loader, accelerator):
    """Backbone features (N, D) and labels (N,) of a prepared loader, gathered from every process, float32."""
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for x, y in loader:
        with accelerator.autocast():
            f = backbone(x)
        f, y = accelerator.gather_for_metrics((f.float().contiguous(), y))
        feats.append(f)
        labels.append(y)
    backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def extract_features_on_device(backbone, images, labels, accelerator, batch, size, mean_std):
    """extract_features for a split held as uint8 (N, 3, H, W) on the device: each process takes a contiguous
    share of the rows (the last padded with copies of the last row), the gathered features are cut back to N, in the
    order of `images`. -> features (N, D) float32, labels (N,)."""
    was_training = backbone.training
    backbone.eval()
    n, per = len(images), -(-len(images) // accelerator.num_processes)
    rows = torch.arange(per, device=images.device) + accelerator.process_index * per
    feats = []
    for idx in rows.clamp_(max=n - 1).split(batch):
        with accelerator.autocast():
            f = backbone(eval_batch(images[idx], size, mean_std))
        feats.append(f.float())
    backbone.train(was_training)
    return accelerator.gather(torch.cat(feats).contiguous())[:n], labels


@torch.no_grad()
def knn_predict(memory, memory_labels, query, num_classes, k=200, t=0.1, chunk=1024):
    """Weighted kNN (InstDisc): each of the k most cosine-similar memory items votes exp(sim / t) for its label.

    memory (N, D), query (M, D) -> class scores (M, C). Features are L2-normalised here.
    """
    memory, query = F.normalize(memory, dim=1), F.normalize(query, dim=1)
    k = min(k, memory.shape[0])
    scores = []
    for q in query.split(chunk):
        sim, idx = (q @ memory.T).topk(k, dim=1)                      # (m, k)
        weight = (sim / t).exp()
        one_hot = F.one_hot(memory_labels[idx], num_classes).float()  # (m, k, C)
        scores.append((weight.unsqueeze(-1) * one_hot).sum(1))
    return torch.cat(scores)


def knn_top1(memory, query, num_classes, k=200, t=0.1):
    """Top-1 (%) of the weighted kNN classifier: memory and query are (features, labels) pairs."""
    pred = knn_predict(memory[0], memory[1], query[0], num_classes, k, t).argmax(1)
    return (pred == query[1]).float().mean().item() * 100


@torch.no_grad()
def effective_rank(x, eps=1e-12):
    """Diagnostic of dimensional collapse: exp(entropy of the normalised singular values) of the centred rows of x.

    x: (N, D). Roy & Vetterli (2007)'s effective rank, a 0-dim float32 tensor on x's device (no host sync, so the
    scripts can accumulate it every step): near min(N - 1, D) for isotropic rows, 1 when every row lies on one line
    (two opposite clusters included), c - 1 for c equal clusters at orthogonal points.
    """
    x = x.detach().float()
    finite = torch.isfinite(x).all()
    x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)  # a diagnostic must never end a run: NaN out instead
    try:
        s = torch.linalg.svdvals(x - x.mean(0, keepdim=True))  # (min(N, D),)
    except RuntimeError:  # no convergence
        return torch.full((), float("nan"), device=x.device)
    p = s / s.sum().clamp_min(eps)
    return torch.where(finite, torch.exp(-(p * p.clamp_min(eps).log()).sum()), float("nan"))
