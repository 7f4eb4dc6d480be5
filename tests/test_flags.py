"""Every flag reaches the code that uses it.

For each script's Config field (the shared BaseConfig fields included) the table gives a value other than the
probe's and names the consumers that must receive something different when only that flag changes; or it says why
the flag has no effect in this setting. The probe is the script's own train(), run in this process on 16 fake images
(batch 8, 2 epochs of 2 steps, every step logged) with tiny stand-ins for torchvision's ResNets, and spies on what
each consumer receives: the data sets, the accelerator, the view specs and the training batches, the DataLoaders,
the networks and optimiser that setup() builds, the schedules, the lr the optimiser steps with, each train_step's
outputs, the weights and momentum state at the end, the kNN monitor, the metrics lines, the checkpoints,
torch.compile and the run folder. Comparing what the consumers receive, not config.json, catches a flag that is
parsed and saved but never passed on.

A field without a row fails, so a new flag needs one. eval_linear.py's flags have a table of their own, probed
through its evaluate() in the same way.
"""
import dataclasses
import hashlib
import importlib
import inspect
import os
import signal
from typing import NamedTuple

import pytest
import torch
import torch.nn as nn
import torchvision
from accelerate.state import AcceleratorState, GradientState

import common
import common.data
import common.run

SCRIPTS = ["median_triplet", "smog", "ressl", "hnpm", "reco"]


class Uses(NamedTuple):
    """Changing the flag to `value` (from the probe's value) changes what each consumer in `consumers` receives, in
    the probe whose base settings are updated by `setting` (for a flag that only acts together with another)."""
    value: object
    consumers: tuple
    setting: dict = {}


class NoEffect(NamedTuple):
    reason: str


# the probe's settings beside each Config's defaults: 16 images, batch 8, 2 epochs of 2 steps, every step logged,
# views made by the batched engine (faster than torchvision's per sample on the CPU), narrow heads, a short queue
PROBE = dict(dataset="fake", fake_size=16, batch_size=8, num_workers=0, views_on="device", epochs=2, warmup_epochs=1,
             log_every=1, eval_every=0, knn_k=5)
HEADS = dict(proj_hidden=32, proj_dim=16)
PROBE_OF = {"median_triplet": HEADS,
            "smog": dict(**HEADS, reset_every=2, num_groups=4),  # a reset within 4 steps; k-means of 8 rows into 4
            "ressl": dict(**HEADS, queue_size=16),
            "hnpm": HEADS,
            "reco": dict(proj_dim=16, queue_size=16, bn_splits=4)}  # 8 shuffle-BN groups of 1 image are refused

BASE = {  # BaseConfig
    "dataset": Uses("cifar10", ("data",)),
    "data_dir": Uses("elsewhere", ("data",)),
    "fake_size": Uses(24, ("data", "schedules")),
    "num_workers": Uses(2, ("dataloaders",), dict(views_on="workers")),
    "views_on": Uses("workers", ("batches", "dataloaders")),
    "arch": Uses("resnet34", ("backbone",)),
    "stem": Uses("imagenet", ("networks",)),
    "epochs": Uses(3, ("schedules", "checkpoints")),
    "batch_size": Uses(16, ("batches", "schedules")),
    "lr": Uses(0.1, ("schedules", "updates")),
    "momentum": Uses(0.8, ("optimizer",)),
    "weight_decay": Uses(1e-3, ("optimizer",)),
    "warmup_epochs": Uses(0, ("schedules", "updates")),
    "seed": Uses(1, ("steps",)),
    "mixed_precision": Uses("bf16", ("accelerator", "steps")),
    "output_dir": Uses("elsewhere", ("output",)),
    "resume": NoEffect("needs a checkpoint in --output-dir; resuming is tested in tests/test_run.py"),
    "allow_config_change": NoEffect("acts only on --resume with changed settings (tests/test_run.py)"),
    "stop_after_epochs": Uses(1, ("steps", "checkpoints")),
    "log_every": Uses(2, ("log",)),
    "eval_every": Uses(1, ("monitor",)),
    "checkpoint_every": Uses(1, ("checkpoints",)),
    "knn_k": Uses(3, ("knn",)),
    "knn_t": Uses(0.5, ("knn",)),
    "report_to": Uses("tensorboard", ("accelerator",)),
    "compile": Uses(True, ("compile",)),
    "recipe": NoEffect("resolved by common.parse_config before train() (tests/test_config.py, tests/test_recipes.py)"),
    "print_config": NoEffect("common.run_main prints the settings instead of calling train() (tests/test_config.py)"),
    "optimizer": Uses("lars", ("optimizer", "weights")),
    "accumulate": Uses(2, ("schedules", "updates", "weights")),
}

METHOD = {
    "median_triplet": {
        "proj_hidden": Uses(64, ("networks",)),
        "proj_dim": Uses(32, ("networks",)),
        "ema_momentum": Uses(0.9, ("schedules", "steps")),
        "negatives": Uses("range", ("steps",), dict(range_last=5)),
        "rank_k": Uses(1, ("steps",)),
        "range_first": Uses(3, ("steps",), dict(negatives="range", range_last=5)),
        "range_last": Uses(6, ("steps",), dict(negatives="range", range_last=5)),
        "gamma": Uses(1.0, ("steps",)),
        "margin": Uses(0.3, ("steps",)),
        "crop_min_scale": Uses(0.5, ("views",)),
        "blur": Uses("on", ("views",)),
    },
    "smog": {
        "proj_hidden": Uses(64, ("networks",)),
        "proj_dim": Uses(32, ("networks",)),
        "ema_momentum": Uses(0.9, ("schedules", "weights")),  # the loss sees f^_eta only through an argmax
        "num_groups": Uses(6, ("networks", "steps")),
        "tau": Uses(0.2, ("steps",)),
        "beta_schedule": Uses("fixed", ("schedules", "steps")),
        "beta_end": Uses(0.5, ("schedules", "steps")),
        "group_update": Uses("latest", ("steps",)),
        "group_init": Uses("random", ("steps",)),
        "reset_every": Uses(3, ("networks", "steps")),
        "kmeans_reset": Uses(False, ("networks", "steps")),
        "encoder_reset": Uses(False, ("steps",)),
        "kmeans_iters": Uses(0, ("steps",)),  # the initial rows: 8 points settle within one Lloyd step
        "detach_groups": Uses(True, ("steps",)),
        "crop_min_scale": Uses(0.5, ("views",)),
        "blur": Uses("on", ("views",)),
        "multi_crop": Uses(True, ("views", "steps")),
    },
    "ressl": {
        "proj_hidden": Uses(64, ("networks",)),
        "proj_dim": Uses(32, ("networks",)),
        "predictor": Uses(False, ("networks",), dict(bn_splits=2)),  # 0 would mean 8 groups without it
        "bn_splits": Uses(2, ("networks", "steps")),
        "ema_momentum": Uses(0.9, ("schedules", "steps")),
        "queue_size": Uses(32, ("networks",)),
        "tau_s": Uses(0.2, ("steps",)),
        "tau_t": Uses(0.1, ("steps",)),
        "infonce_warmup": Uses(False, ("schedules", "steps")),
        "infonce_warmup_epochs": Uses(1, ("schedules", "steps")),
        "tau_nce": Uses(0.2, ("steps",)),
        "teacher_aug": Uses("strong", ("views",)),
        "ema_schedule": Uses("cosine", ("schedules", "steps")),
        "student_aug": Uses("byol", ("views",)),
        "multi_crop": Uses(True, ("views", "steps")),
    },
    "hnpm": {
        "projector": Uses(False, ("networks",)),
        "proj_hidden": Uses(64, ("networks",)),
        "proj_dim": Uses(32, ("networks",)),
        "ema_tau": Uses(0.9, ("schedules", "steps")),
        "alpha1": Uses(0.5, ("steps",)),
        "alpha2": Uses(0.5, ("steps",)),
        "threshold": Uses(0.01, ("steps",)),
        "mining": Uses("hardest", ("steps",)),  # "all": at threshold 1 nearly every pair is hard already
        "student_grad": Uses(True, ("optimizer", "steps")),
        "grad_clip": Uses(1e-3, ("steps",)),  # the probe's gradients have norms below 1
    },
    "reco": {
        "proj_dim": Uses(32, ("networks",)),
        "ema_momentum": Uses(0.9, ("schedules", "steps")),
        "queue_size": Uses(32, ("networks",)),
        "tau": Uses(0.5, ("steps",)),
        "lambda_global": Uses(0.0, ("steps",)),  # with --global-bank weak it also drops the bank (networks)
        "lambda_local": Uses(0.0, ("steps",)),
        "tau_ot": Uses(0.2, ("steps",)),
        "tau_tt": Uses(0.1, ("steps",)),
        "global_bank": Uses("weak", ("networks", "steps")),
        "multi_crop": Uses(True, ("views", "steps")),
        "mix": Uses("mixup", ("steps",)),
        "mix_alpha": Uses(0.5, ("steps",)),
        "feature_pair": Uses("k/k", ("steps",)),
        "image_pair": Uses("q/q", ("steps",)),
        "bn_splits": Uses(2, ("networks", "steps")),
    },
}


def rows(script):
    return {**BASE, **METHOD[script]}


# ----------------------------------------------------------------------------- the probe

class TinyResNet(nn.Module):
    """The parts of a torchvision ResNet that build_backbone touches (conv1, maxpool, fc), at a fraction of the cost."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1, self.relu, self.maxpool = nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(64, 1000)

    def forward(self, x):
        return self.fc(self.pool(self.maxpool(self.relu(self.bn1(self.conv1(x))))).flatten(1))


def plain(x):
    """Tensors (in dicts and lists) as comparable Python values."""
    if torch.is_tensor(x):
        return x.detach().float().tolist()
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


def module_print(m):
    """What a network is built as: every submodule's type (and shuffle-BN groups), every tensor's name, shape and
    whether it is trained."""
    return ([(n, type(s).__name__, getattr(s, "num_splits", None)) for n, s in m.named_modules()]
            + [(n, tuple(t.shape), t.requires_grad) for n, t in m.state_dict(keep_vars=True).items()])


def probe(script, cfg, monkeypatch, tmp_path):
    """Runs script.train(cfg) in a fresh folder with the spies -> {consumer: what it received}."""
    module = importlib.import_module(script)
    seen = {k: [] for k in ("data", "accelerator", "views", "batches", "dataloaders", "backbone", "networks",
                            "optimizer", "updates", "schedules", "steps", "weights", "knn", "log", "monitor",
                            "checkpoints", "compile", "output")}
    trained, handlers = [], {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    AcceleratorState._reset_state(True)  # each probe is a new run: its own precision and trackers
    GradientState._reset_state()
    with monkeypatch.context() as patch:
        patch.chdir(tmp_path)
        patch.setenv("CUDA_VISIBLE_DEVICES", "")

        def spy(owner, name, record):
            real = getattr(owner, name)

            def wrapper(*args, **kwargs):
                out = real(*args, **kwargs)
                bound = inspect.signature(real).bind(*args, **kwargs)
                bound.apply_defaults()
                record(bound, out)
                return out
            patch.setattr(owner, name, wrapper)

        def fake_datasets(name, data_dir, fake_size=256, download=True):
            seen["data"].append((name, data_dir, fake_size))  # every data set is a fake one of 16 px images here
            train, test = common.FakeImages(fake_size, 16, seed=0), common.FakeImages(8, 16, seed=1)
            return train, train, test, 10, 16, common.IMAGENET_MEAN_STD
        patch.setattr(common.data, "get_datasets", fake_datasets)
        spy(common.data, "load_data", lambda a, d: seen["data"].append((d.size, d.cifar_stem, len(d.pretrain))))
        spy(common, "make_accelerator", lambda a, acc: seen["accelerator"].append(
            (acc.mixed_precision, sorted(str(t) for t in acc.log_with))))
        spy(common, "train_views", lambda a, out: (seen["views"].append(list(a.arguments["specs"])),
                                                    seen["batches"].append((type(out).__name__, len(out)))))

        def loader(*args, **kwargs):  # records the request; workers are not started (num_workers 0)
            b = inspect.signature(torch.utils.data.DataLoader).bind(*args, **kwargs).arguments
            seen["dataloaders"].append({k: b.get(k) for k in ("batch_size", "shuffle", "drop_last", "num_workers")})
            return torch.utils.data.DataLoader(*args, **{**kwargs, "num_workers": 0, "persistent_workers": False})
        patch.setattr(common.data, "DataLoader", loader)
        for arch in ("resnet18", "resnet34", "resnet50"):
            patch.setattr(torchvision.models, arch,
                          lambda weights=None, arch=arch: seen["backbone"].append(arch) or TinyResNet())

        def built(a, out):
            for x in out:
                if isinstance(x, nn.Module):
                    seen["networks"].append(module_print(x))
                    trained.append(x)
                elif hasattr(x, "param_groups"):  # the optimiser, and the lr of its groups at each step
                    seen["optimizer"].append([type(getattr(x, "optimizer", x)).__name__] + [
                        {k: (len(v) if k == "params" else v) for k, v in g.items()} for g in x.param_groups])
                    step = x.step
                    x.step = lambda *a, x=x, step=step, **k: (
                        seen["updates"].append([g["lr"] for g in x.param_groups]), step(*a, **k))[1]
        spy(module, "setup", built)
        spy(module, "schedules", lambda a, out: seen["schedules"].append(
            (a.arguments["step"], a.arguments["steps_per_epoch"], out)))
        spy(module, "train_step", lambda a, out: seen["steps"].append(plain(out)))
        spy(common.run, "knn_predict", lambda a, out: seen["knn"].append((a.arguments["k"], a.arguments["t"])))
        timing = ("images_per_s", "wall_time_s", "peak_memory_mb")
        spy(common.Run, "log", lambda a, out: seen["log"].append(
            (a.arguments["metrics"].get("step"), sorted(k for k in a.arguments["metrics"] if k not in timing))))
        spy(common.Run, "monitor", lambda a, out: seen["monitor"].append(a.arguments["epoch"]))
        spy(common.Run, "save_checkpoint", lambda a, out: seen["checkpoints"].append(
            (a.arguments["epoch"], a.arguments["step"])))
        patch.setattr(torch, "compile", lambda model, *a, **k: seen["compile"].append(type(model).__name__) or model)
        try:
            out = module.train(cfg)
        finally:  # leave no run behind: Run's signal handlers, Accelerate's state
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
        seen["output"].append(os.path.relpath(out).split(os.sep)[0])
    # the networks and momentum state at the end: what the EMA, queue and group updates received
    seen["weights"] = [hashlib.sha1(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()
                       for m in trained for t in m.state_dict().values()]
    return seen


def config(script, setting=None, **change):
    module = importlib.import_module(script)
    return module.Config(**{**PROBE, **PROBE_OF.get(script, {}), **(setting or {}), **change})


@pytest.fixture(scope="module")
def base_probes():
    return {}


def base_probe(script, setting, cache, monkeypatch, tmp_path_factory):
    key = (script, tuple(sorted(setting.items())))
    if key not in cache:
        cache[key] = probe(script, config(script, setting), monkeypatch, tmp_path_factory.mktemp("base"))
    return cache[key]


CASES = [(s, f) for s in SCRIPTS for f, row in rows(s).items() if isinstance(row, Uses)]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_config_field_has_a_row(script):
    fields = {f.name for f in dataclasses.fields(importlib.import_module(script).Config)}
    assert fields == set(rows(script)), (f"fields without a row: {sorted(fields - set(rows(script)))}; rows without "
                                         f"a field: {sorted(set(rows(script)) - fields)}")


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_probe_is_reproducible(script, base_probes, monkeypatch, tmp_path_factory):
    """Two runs with the same flags hand every consumer the same: a difference below is the flag's."""
    assert probe(script, config(script), monkeypatch, tmp_path_factory.mktemp("again")) == base_probe(
        script, {}, base_probes, monkeypatch, tmp_path_factory)


@pytest.mark.parametrize("script", SCRIPTS)
def test_train_asks_the_schedules_for_every_step_and_the_optimiser_gets_the_lr(script, base_probes, monkeypatch,
                                                                                tmp_path_factory):
    seen = base_probe(script, {}, base_probes, monkeypatch, tmp_path_factory)
    per_epoch = seen["batches"][0][1]
    steps = range(PROBE["epochs"] * per_epoch)
    assert [(step, n) for step, n, _ in seen["schedules"]] == [(s, per_epoch) for s in steps]
    assert seen["updates"] == [[sched["lr"]] for _, _, sched in seen["schedules"]]  # one parameter group


@pytest.mark.parametrize("script, field", CASES, ids=[f"{s}-{f}" for s, f in CASES])
def test_flag_reaches_its_use(script, field, base_probes, monkeypatch, tmp_path_factory):
    row = rows(script)[field]
    base = base_probe(script, row.setting, base_probes, monkeypatch, tmp_path_factory)
    assert getattr(config(script, row.setting), field) != row.value, "the row's value is the probe's own"
    changed = probe(script, config(script, row.setting, **{field: row.value}), monkeypatch,
                    tmp_path_factory.mktemp(field))
    same = [c for c in row.consumers if changed[c] == base[c]]
    assert not same, f"--{field.replace('_', '-')} {row.value!r} changes nothing that {same} receive"


# ----------------------------------------------------------------------------- eval_linear.py

EVAL_PROBE = dict(backbone="backbone.pt", dataset="fake", fake_size=16, batch_size=8, num_workers=0, epochs=3,
                  milestones="1")
EVAL_ROWS = {
    "backbone": Uses("other.pt", ("backbone",)),
    "dataset": Uses("cifar10", ("data",)),
    "data_dir": Uses("elsewhere", ("data",)),
    "fake_size": Uses(24, ("data", "updates")),
    "num_workers": Uses(2, ("dataloaders",)),
    "epochs": Uses(4, ("updates",)),
    "batch_size": Uses(16, ("dataloaders", "updates")),
    "lr": Uses(1.0, ("optimizer", "updates")),
    "momentum": Uses(0.5, ("optimizer", "weights")),
    "weight_decay": Uses(1e-3, ("optimizer", "weights")),
    "milestones": Uses("2", ("updates",)),
    "cached": Uses(True, ("features",)),
    "knn": Uses(False, ("knn",)),
    "seed": Uses(1, ("weights",)),
    "output": Uses("elsewhere.json", ("output",)),
    "recipe": NoEffect("resolved by main() before evaluate() (tests/test_eval_linear.py)"),
    "method": NoEffect("picks the --recipe paper table in main() before evaluate() (tests/test_eval_linear.py)"),
    "print_config": NoEffect("main() prints the resolved settings instead of calling evaluate() "
                             "(tests/test_eval_linear.py)"),
    "optimizer": Uses("lars", ("optimizer", "weights")),
    "lr_scaling": Uses("linear", ("optimizer", "updates")),
    "nesterov": Uses(True, ("optimizer", "weights")),
    "schedule": Uses("cosine", ("updates",)),
    "augment": Uses("resized-crop", ("weights",)),
}


def eval_probe(cfg, monkeypatch, tmp_path):
    """Runs eval_linear.evaluate(cfg) in a fresh folder with spies -> {consumer: what it received}."""
    import eval_linear
    seen = {k: [] for k in ("backbone", "data", "dataloaders", "optimizer", "updates", "weights", "features", "knn",
                            "output")}
    optimizers = []
    for name in ("backbone.pt", "other.pt"):
        (tmp_path / name).write_bytes(b"")  # check_config wants the file; load_backbone is replaced below

    class RecordingSGD(torch.optim.SGD):
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            seen["optimizer"].append(kwargs)
            optimizers.append(self)

        def step(self, *args, **kwargs):
            seen["updates"].append(self.param_groups[0]["lr"])
            return super().step(*args, **kwargs)

    def backbone(path):
        seen["backbone"].append(path)
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        net.register_forward_hook(lambda m, x, out: seen["features"].append(len(x[0])))
        return net, {"image_size": 16, "mean_std": common.IMAGENET_MEAN_STD, "method": "tiny"}

    def fake_datasets(name, data_dir, fake_size=256, download=True):
        seen["data"].append((name, data_dir, fake_size))
        train, test = common.FakeImages(fake_size, 16, seed=0), common.FakeImages(8, 16, seed=1)
        return train, train, test, 10, 16, common.IMAGENET_MEAN_STD

    def loader(*args, **kwargs):
        b = inspect.signature(torch.utils.data.DataLoader).bind(*args, **kwargs).arguments
        seen["dataloaders"].append({k: b.get(k) for k in ("batch_size", "shuffle", "drop_last", "num_workers")})
        return torch.utils.data.DataLoader(*args, **{**kwargs, "num_workers": 0, "persistent_workers": False})

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    with monkeypatch.context() as patch:
        patch.chdir(tmp_path)
        patch.setenv("CUDA_VISIBLE_DEVICES", "")
        patch.setattr(torch.optim, "SGD", RecordingSGD)
        patch.setattr(eval_linear, "load_backbone", backbone)
        patch.setattr(common, "get_datasets", fake_datasets)
        patch.setattr(common.data, "DataLoader", loader)
        patch.setattr(eval_linear, "DataLoader", loader)
        real_knn = common.knn_predict
        patch.setattr(common, "knn_predict", lambda *a, **k: seen["knn"].append(len(a[0])) or real_knn(*a, **k))
        eval_linear.evaluate(cfg)
        seen["output"] = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.json"))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    # the trained classifier
    seen["weights"] = [p.detach().tolist() for o in optimizers for g in o.param_groups for p in g["params"]]
    return seen


def test_every_eval_linear_flag_has_a_row():
    import eval_linear
    assert {f.name for f in dataclasses.fields(eval_linear.EvalConfig)} == set(EVAL_ROWS)


@pytest.fixture(scope="module")
def eval_base(tmp_path_factory):
    import eval_linear
    with pytest.MonkeyPatch.context() as patch:
        return eval_probe(eval_linear.EvalConfig(**EVAL_PROBE), patch, tmp_path_factory.mktemp("eval-base"))


def test_the_eval_linear_probe_is_reproducible(eval_base, monkeypatch, tmp_path):
    import eval_linear
    assert eval_probe(eval_linear.EvalConfig(**EVAL_PROBE), monkeypatch, tmp_path) == eval_base


@pytest.mark.parametrize("field", [f for f, row in EVAL_ROWS.items() if isinstance(row, Uses)])
def test_eval_linear_flag_reaches_its_use(field, eval_base, monkeypatch, tmp_path):
    import eval_linear
    row = EVAL_ROWS[field]
    assert EVAL_PROBE.get(field, getattr(eval_linear.EvalConfig, field)) != row.value
    changed = eval_probe(eval_linear.EvalConfig(**{**EVAL_PROBE, field: row.value}), monkeypatch, tmp_path)
    same = [c for c in row.consumers if changed[c] == eval_base[c]]
    assert not same, f"eval_linear --{field.replace('_', '-')} {row.value!r} changes nothing that {same} receive"
