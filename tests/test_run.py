"""The run plumbing every script shares (common.Run), exercised through ressl.py, the cheapest script: crash-safe
checkpoints, preemption by signal, the non-finite-loss stop, resuming with changed settings, checkpoints that move
between process counts, a simulated 2-node run, trackers and provenance; bad flags as a table over all scripts."""
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import accelerate
import pytest
import torch

import common
from conftest import ROOT, TINY, cli_error, read_metrics, run, two_process_outcome, two_process_run

HEADS = ["--proj-hidden", "32", "--proj-dim", "16", "--queue-size", "16"]
RESSL = ["ressl.py", *TINY, *HEADS, "--eval-every", "0"]
SCRIPTS = ["median_triplet.py", "smog.py", "ressl.py", "hnpm.py", "reco.py"]


def backbone(out):
    return torch.load(os.path.join(out, "backbone.pt"))["state_dict"]


def same_backbone(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 3-epoch run (4 steps per epoch) that the interrupted ones must end equal to."""
    out = str(tmp_path_factory.mktemp("straight") / "run")
    run([*RESSL, "--epochs", "3", "--checkpoint-every", "1", "--output-dir", out])
    return out


class Died(BaseException):
    """Stands in for a process that dies part-way through a save (os._exit): a BaseException, which no handler of the
    scripts catches, raised after Accelerate wrote its files."""


def test_save_interrupted_part_way_resumes_from_the_previous_checkpoint(straight, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    # the second checkpoint dies after Accelerate wrote its files, before it is complete
    orig, calls = accelerate.Accelerator.save_state, []

    def save_state(self, path, *a, **k):
        calls.append(path)
        orig(self, path, *a, **k)
        if len(calls) == 2:
            raise Died
    with monkeypatch.context() as m:
        m.setattr(accelerate.Accelerator, "save_state", save_state)
        with pytest.raises(Died):
            run([*RESSL, "--epochs", "3", "--checkpoint-every", "1", "--output-dir", out], patched=True)
    assert common.latest_checkpoint(out).endswith("checkpoint-4")  # the half-written one is not taken
    assert any(d.startswith(".tmp-checkpoint-8") for d in os.listdir(out))
    p = run([*RESSL, "--epochs", "3", "--checkpoint-every", "1", "--output-dir", out, "--resume"])
    assert "resumed from" in p.stdout and "checkpoint-4" in p.stdout
    assert same_backbone(backbone(straight), backbone(out))
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == list(range(1, 13))  # redone steps logged once


def test_sigterm_checkpoints_mid_epoch_and_resume_ends_where_uninterrupted_ends(straight, tmp_path, monkeypatch):
    import ressl
    out = str(tmp_path / "run")
    orig, calls = ressl.train_step, []

    def train_step(*a, **k):  # SIGTERM to this process during step 6 (mid epoch 2), as a scheduler sends it
        calls.append(1)
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return orig(*a, **k)
    with monkeypatch.context() as m:
        m.setattr(ressl, "train_step", train_step)
        p = run([*RESSL, "--epochs", "3", "--checkpoint-every", "1", "--output-dir", out], patched=True)
    assert "--resume" in p.stdout and "SIGTERM" in p.stderr
    ckpt = common.latest_checkpoint(out)
    with open(os.path.join(ckpt, "progress.json")) as f:
        assert json.load(f)["step"] == 6  # a mid-epoch checkpoint of the step the signal arrived in
    assert not os.path.exists(os.path.join(out, "backbone.pt"))
    p = run([*RESSL, "--epochs", "3", "--checkpoint-every", "1", "--output-dir", out, "--resume"])
    assert "step 6" in p.stdout
    assert same_backbone(backbone(straight), backbone(out))
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == list(range(1, 13))


def test_non_finite_loss_stops_with_step_and_terms_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    import ressl
    out = str(tmp_path / "run")
    orig, calls = ressl.relation_loss, []

    def relation_loss(*a, **k):  # NaN at step 6
        calls.append(1)
        v = orig(*a, **k)
        return v * float("nan") if len(calls) == 6 else v
    monkeypatch.setattr(ressl, "relation_loss", relation_loss)
    p = run([*RESSL, "--epochs", "3", "--checkpoint-every", "1", "--output-dir", out], check=False, patched=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("error: non-finite loss at step 6 (epoch 2)") and "relation nan" in line, line
    assert common.latest_checkpoint(out).endswith("checkpoint-4")  # the last good checkpoint, untouched
    assert not any(d.startswith(".tmp") for d in os.listdir(out))


def test_resume_with_changed_settings_names_the_fields(tmp_path):
    out = str(tmp_path / "run")
    run([*RESSL, "--epochs", "2", "--stop-after-epochs", "1", "--output-dir", out])
    p = run([*RESSL, "--epochs", "3", "--tau-t", "0.05", "--output-dir", out, "--resume"], check=False)
    assert p.returncode == 2 and "epochs 2 -> 3" in p.stderr and "tau_t 0.04 -> 0.05" in p.stderr
    assert "--allow-config-change" in p.stderr and "Traceback" not in p.stderr
    p = run([*RESSL, "--epochs", "2", "--log-every", "2", "--output-dir", out, "--resume"])  # run-only flags may change
    assert "resumed from" in p.stdout


def test_checkpoint_moves_between_process_counts(tmp_path, tmp_path_factory):
    """The state is process-independent: weights are saved without DDP's `module.` prefix, so a 2-process checkpoint
    resumes on 1 process and a 1-process one on 2; each resumed run finishes every step once. (On CPU each process
    normalises with its own BN statistics, so 1- and 2-process trajectories differ by design: what moves must be
    the state, checked in test_two_process_checkpoint_loads_exactly.)"""
    out = str(tmp_path / "two_then_one")
    shutil.copytree(two_process_run("ressl-first-epoch", tmp_path_factory), out)  # epoch 1 of 2 on 2 processes
    p = run([*RESSL, "--epochs", "2", "--output-dir", out, "--resume"])
    one_then_two = two_process_run("ressl-resumed-on-two", tmp_path_factory)  # conftest: epoch 1 ran on 1 process
    _, ranks = two_process_outcome("ressl-resumed-on-two", tmp_path_factory)
    for out, stdout in ((out, p.stdout), (one_then_two, ranks[0]["stdout"])):
        assert "resumed from" in stdout
        assert [m["step"] for m in read_metrics(out) if "loss" in m] == list(range(1, 9))
        assert os.path.exists(os.path.join(out, "backbone.pt"))


def test_two_process_checkpoint_loads_exactly(tmp_path_factory):
    from accelerate import Accelerator
    from safetensors.torch import load_file
    import ressl
    out = two_process_run("ressl-first-epoch", tmp_path_factory)
    ckpt = common.latest_checkpoint(out)
    saved = load_file(os.path.join(ckpt, "model.safetensors"))
    assert not any(k.startswith("module.") for k in saved)
    cfg = ressl.Config(proj_hidden=32, proj_dim=16, queue_size=16, output_dir=out, resume=True, epochs=2,
                       allow_config_change=True)  # only the state matters here
    accelerator = Accelerator(cpu=True)
    student = ressl.Student(cfg, cifar_stem=False)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    student, optimizer = accelerator.prepare(student, optimizer)
    state = ressl.MomentumState(student, 16, 16)
    accelerator.register_for_checkpointing(state)
    r = common.Run(cfg, "ressl", accelerator, data=None, steps_per_epoch=4)
    assert r.resume() == (1, 0)
    assert all(torch.equal(v, saved[k]) for k, v in student.state_dict().items())
    written = torch.load(os.path.join(ckpt, "custom_checkpoint_0.pkl"), weights_only=False)
    assert torch.equal(state.queue, written["queue"])


def test_two_nodes_equal_one_process(tmp_path):
    """Two torchrun launches (one process each, --nnodes 2) with a rendezvous on 127.0.0.1 give the 1-process step of
    tests/ddp_step.py (ressl's ddp_case): the same loss and gradients, identical on both nodes."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from ddp_step import run_case
    two = tmp_path / "two"
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        a = run_case(Accelerator(cpu=True), "ressl")  # the 1-process side, in this process
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ROOT}
    port = str(29700 + os.getpid() % 200)
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(r), "--master_addr", "127.0.0.1", "--master_port", port,
                               "tests/ddp_step.py", "ressl", str(two)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    r0, r1 = (torch.load(p, weights_only=False) for p in (two / "rank0.pt", two / "rank1.pt"))
    assert torch.allclose(a["loss"], r0["loss"], atol=1e-6) and torch.equal(r0["loss"], r1["loss"])
    assert a["grads"].keys() == r0["grads"].keys() and a["grads"]
    for k in a["grads"]:
        assert torch.allclose(a["grads"][k], r0["grads"][k], atol=1e-6), k
        assert torch.equal(r0["grads"][k], r1["grads"][k]), k
    assert torch.allclose(a["queue"], r1["queue"], atol=1e-6)


def test_config_json_has_provenance_and_metrics_end_with_wall_time(tmp_path):
    out = str(tmp_path / "run")
    run([*RESSL, "--epochs", "1", "--output-dir", out])
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    prov = config["provenance"]
    assert config["method"] == "ressl" and config["tau_t"] == 0.04
    assert {"git_commit", "git_dirty", "python", "torch", "torchvision", "accelerate", "device_name", "device_count",
            "num_processes", "mixed_precision"} <= set(prov)
    assert prov["num_processes"] == 1 and prov["torch"] == torch.__version__
    last = read_metrics(out)[-1]
    assert last["wall_time_s"] > 0 and last["peak_memory_mb"] > 0


def test_tensorboard_gets_the_metrics_of_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard", reason="the tracker test needs tensorboard (installed by .ci/run)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = str(tmp_path / "run")
    run([*RESSL, "--epochs", "1", "--eval-every", "1", "--report-to", "tensorboard", "--output-dir", out])
    events = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files if "tfevents" in f]
    assert events
    acc = EventAccumulator(os.path.dirname(events[0]))
    acc.Reload()
    logged = {(m["step"], k): v for m in read_metrics(out) if "step" in m for k, v in m.items()
              if k not in ("step", "epoch") and isinstance(v, float)}
    tags = acc.Tags()["scalars"]
    assert {"loss", "relation", "lr", "knn_top1"} <= set(tags)
    for tag in ("loss", "relation", "knn_top1"):
        for e in acc.Scalars(tag):
            assert e.value == pytest.approx(logged[(e.step, tag)], rel=1e-4, abs=1e-5)


def test_missing_tracker_package_is_one_line(tmp_path):
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    p = run([*RESSL, "--epochs", "1", "--report-to", "wandb", "--output-dir", str(tmp_path / "r")], check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "error: --report-to wandb needs the wandb package: pip install wandb"]


# ----------------------------------------------------------------------------- bad flags, every script

GENERIC_BAD = [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--lr", "0"], "--lr must be positive"),
    (["--momentum", "1.5"], "--momentum must lie in [0, 1]"),
    (["--weight-decay", "-0.1"], "--weight-decay must be 0 or more"),
    (["--warmup-epochs", "5", "--epochs", "2"], "--warmup-epochs 5 exceeds --epochs 2"),
    (["--stop-after-epochs", "3", "--epochs", "2"], "--stop-after-epochs 3 exceeds --epochs 2"),
    (["--log-every", "0"], "--log-every must be at least 1"),
    (["--knn-t", "0"], "--knn-t must be positive"),
    (["--knn-k", "0"], "--knn-k must be at least 1"),
    (["--fake-size", "0"], "--fake-size must be at least 1"),
    (["--accumulate", "0"], "--accumulate must be at least 1"),
    (["--accumulate", "3", "--batch-size", "16"], "--accumulate 3 exceeds the 2 batches of an epoch"),
]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("args, message", GENERIC_BAD, ids=[" ".join(a) for a, _ in GENERIC_BAD])
def test_bad_generic_flag_is_one_error_line(script, args, message, capsys):
    code, lines = cli_error(script, [*TINY, "--epochs", "2", *args], capsys)
    assert code == 2 and lines and lines[-1].startswith("error:") and message in lines[-1], lines[-3:]
    assert not any("Traceback" in line for line in lines)


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_flag_on_the_real_command_line(script):
    p = run([script, *TINY, "--epochs", "2", "--lr", "-1"], check=False, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == "error: --lr must be positive, got -1.0."


def test_batch_size_must_divide_over_processes(tmp_path_factory):
    _, ranks = two_process_outcome("ressl-batch-7", tmp_path_factory)  # --batch-size 7 on 2 processes
    for r in ranks:
        assert not r["ok"] and "SystemExit: 2" in r["error"], r["error"]
        assert r["stderr"].strip().splitlines()[-1] == "error: --batch-size 7 must divide evenly over 2 processes."
        assert "Traceback" not in r["stderr"]


# ----------------------------------------------------------------------------- evaluation helpers

def test_knn_predict_hand_computed():
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]])
    labels = torch.tensor([0, 1, 1])
    scores = common.knn_predict(memory, labels, torch.tensor([[2.0, 0.0]]), num_classes=2, k=2, t=0.1)
    # the 2 nearest are item 0 (cos 1, class 0) and item 2 (cos 0.9/sqrt(0.82), class 1)
    expected = [math.exp(1 / 0.1), math.exp(0.9 / math.sqrt(0.82) / 0.1)]
    assert scores[0].tolist() == pytest.approx(expected, rel=1e-5)


def test_knn_of_a_collapsed_encoder_is_chance():
    """The floor of tests/test_learning.py rests on this: identical features predict one class for every query, so
    on balanced classes top-1 is 1 / C (10 % on CIFAR-10)."""
    labels = torch.arange(10).repeat(20)  # 200 memory items, balanced
    pred = common.knn_predict(torch.ones(200, 8), labels, torch.ones(100, 8), num_classes=10, k=50).argmax(1)
    accuracy = (pred == torch.arange(10).repeat(10)).float().mean().item()
    assert len(set(pred.tolist())) == 1 and accuracy == pytest.approx(0.1)


def test_effective_rank_hand_computed():
    # singular values (2, 1) after centring: p = (2/3, 1/3), exp(entropy) = exp(-(2/3 ln 2/3 + 1/3 ln 1/3)) = 1.8899
    x = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]]) / math.sqrt(2)
    assert common.effective_rank(x).item() == pytest.approx(math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))),
                                                     rel=1e-5)
    two_clusters = torch.tensor([[1.0, 2.0, 3.0]] * 5 + [[-1.0, 0.0, 1.0]] * 5)
    assert common.effective_rank(two_clusters).item() == pytest.approx(1.0, abs=1e-4)  # all on one line after centring
    assert common.effective_rank(torch.eye(4).repeat(3, 1)).item() == pytest.approx(3.0, rel=1e-4)  # 4 clusters -> 3
    assert common.effective_rank(torch.randn(4000, 8, generator=torch.Generator().manual_seed(0))).item() > 7.9


def test_effective_rank_of_non_finite_input_is_nan_not_an_error():
    x = torch.randn(8, 4)
    x[0, 0] = float("nan")
    assert math.isnan(common.effective_rank(x).item())
    assert math.isfinite(common.effective_rank(torch.randn(8, 4)).item())


# ----------------------------------------------------------------------------- what a first GPU run would hit

def fp16_scaler(monkeypatch, init_scale):
    """An fp16 run on a GPU checkpoints its GradScaler (scaler.pt); Accelerate makes none on the CPU, so give it one."""
    orig = accelerate.Accelerator.__init__

    def init(self, *a, **k):
        orig(self, *a, **k)
        if self.mixed_precision == "fp16":
            self.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    monkeypatch.setattr(accelerate.Accelerator, "__init__", init)


def test_resume_under_another_precision_is_one_error_line_and_fp16_state_round_trips(tmp_path, monkeypatch):
    bf16, fp16 = str(tmp_path / "bf16"), str(tmp_path / "fp16")
    run([*RESSL, "--epochs", "2", "--stop-after-epochs", "1", "--mixed-precision", "bf16", "--output-dir", bf16])
    fp16_scaler(monkeypatch, 2.0**10)
    # bf16 -> fp16: Accelerate would look for a scaler.pt that a bf16 run never wrote
    p = run([*RESSL, "--epochs", "2", "--mixed-precision", "fp16", "--output-dir", bf16, "--resume"], check=False,
            patched=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "written under --mixed-precision bf16" in errors[0], p.stderr[-2000:]
    assert "Resume with --mixed-precision bf16" in errors[0]
    # an fp16 run writes its scaler and resumes under fp16 with it; under bf16 it is refused the same way
    run([*RESSL, "--epochs", "2", "--stop-after-epochs", "1", "--mixed-precision", "fp16", "--output-dir", fp16],
        patched=True)
    ckpt = common.latest_checkpoint(fp16)
    saved = torch.load(os.path.join(ckpt, "scaler.pt"))
    assert saved["scale"] == 2.0**10
    p = run([*RESSL, "--epochs", "2", "--mixed-precision", "bf16", "--output-dir", fp16, "--resume"], check=False)
    assert p.returncode == 2 and "written under --mixed-precision fp16" in p.stderr.splitlines()[-1], p.stderr[-2000:]
    # the resumed run starts from another scale: after load_state it must hold the checkpoint's
    monkeypatch.undo()
    fp16_scaler(monkeypatch, 2.0**5)
    load, scales = accelerate.Accelerator.load_state, []

    def load_state(self, *a, **k):
        load(self, *a, **k)
        scales.append(self.scaler.get_scale())
    monkeypatch.setattr(accelerate.Accelerator, "load_state", load_state)
    p = run([*RESSL, "--epochs", "2", "--mixed-precision", "fp16", "--output-dir", fp16, "--resume"], patched=True)
    assert "resumed from" in p.stdout and scales == [2.0**10]


def test_compile_on_and_off_across_resumes_ends_where_an_uncompiled_run_ends(straight, tmp_path, monkeypatch):
    """Epoch 1 with --compile, epoch 2 without, epoch 3 with: a resume in each direction; checkpoints hold the
    network's own parameter names and the result is the uncompiled run's, bit for bit."""
    from safetensors.torch import load_file
    # the eager backend: Dynamo's graph capture and wrappers as on a GPU, compiled in seconds on a CPU
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "eager")
    out = str(tmp_path / "run")
    for epoch, flag in ((1, "--compile"), (2, "--no-compile"), (3, "--compile")):
        p = run([*RESSL, "--epochs", "3", "--checkpoint-every", "1", "--stop-after-epochs", str(epoch), flag,
                 "--output-dir", out, *(["--resume"] if epoch > 1 else [])])
        assert epoch == 1 or f"resumed from {out}/checkpoint-{4 * (epoch - 1)}" in p.stdout
        keys = load_file(os.path.join(common.latest_checkpoint(out), "model.safetensors"))
        assert not any("_orig_mod" in k or k.startswith("module.") for k in keys)
    assert same_backbone(backbone(straight), backbone(out))


def test_compile_is_applied_after_prepare():
    """DDP (when there is one) must be inside the compiled module, so that its gradient all-reduce overlaps the
    compiled backward; and unwrapping must give the plain network whatever --compile says."""
    import ressl
    from accelerate.state import AcceleratorState
    os.environ["ACCELERATE_DYNAMO_BACKEND"] = "eager"
    AcceleratorState._reset_state()  # as in a new process: an earlier test's Accelerator fixed the compile setting
    try:
        cfg = ressl.Config(compile=True, proj_hidden=32, proj_dim=16, queue_size=16)
        accelerator = common.make_accelerator(cfg)
        student = common.fast_model(ressl.Student(cfg, cifar_stem=False), cfg, accelerator)
        assert not hasattr(student, "_orig_mod")  # not compiled before prepare
        prepared = accelerator.prepare(student)
        assert type(prepared).__name__ == "OptimizedModule" and prepared._orig_mod is student
        assert accelerator.unwrap_model(prepared) is student and prepared._orig_mod is student
    finally:
        del os.environ["ACCELERATE_DYNAMO_BACKEND"]
        AcceleratorState._reset_state()


def test_process_group_timeout_is_at_most_30_minutes():
    """A process that died or hangs must end the job within 30 minutes, not after hours of idle GPUs."""
    import datetime
    import ressl
    accelerator = common.make_accelerator(ressl.Config())
    assert accelerator.init_handler.timeout <= datetime.timedelta(minutes=30)


@contextlib.contextmanager
def nan_on_rank_1(ressl):
    """conftest.TWO_PROCESS_PATCHES: rank 1's logged relation term of step 6 becomes NaN (only its logged value, so
    that no NaN gradient reaches rank 0 through the all-reduce)."""
    orig, calls = ressl.train_step, []

    def train_step(*a, **k):
        logs = orig(*a, **k)
        calls.append(1)
        if len(calls) == 6 and os.environ["RANK"] == "1":
            logs["relation"] = logs["relation"] * float("nan")
        return logs
    ressl.train_step = train_step
    try:
        yield
    finally:
        ressl.train_step = orig


def test_non_finite_loss_on_one_process_stops_both_with_the_error_line(tmp_path_factory):
    """Only rank 1 sees a NaN loss term (at step 6, between the logging steps 4 and 8): both processes must learn it
    at the same collective and exit with the error, not leave one waiting for the other until the process-group
    timeout."""
    out, ranks = two_process_outcome("ressl-nan-on-rank-1", tmp_path_factory)
    errors = [r["stderr"].strip().splitlines()[-1] for r in ranks]
    assert all(not r["ok"] and "SystemExit: 2" in r["error"] and r["seconds"] < 60 for r in ranks), ranks
    assert errors[1].startswith("error: non-finite loss at step 6 (epoch 2)"), errors
    assert errors[0].startswith("error: non-finite loss") and "on another process" in errors[0], errors
    assert common.latest_checkpoint(out).endswith("checkpoint-4")


def test_resume_takes_the_complete_checkpoint_with_the_highest_step(tmp_path):
    """Steps compare as numbers (checkpoint-100 after checkpoint-12 after checkpoint-8), and a folder without
    progress.json (a save that died part-way) is never taken."""
    def make(step, complete=True, prefix="checkpoint-"):
        d = tmp_path / f"{prefix}{step}"
        d.mkdir()
        if complete:
            (d / "progress.json").write_text(json.dumps({"epoch": step // 4, "step": step}))
    for step in (8, 12):
        make(step)
    make(100, complete=False)
    make(200, prefix=".tmp-checkpoint-")
    assert common.latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-12")
    (tmp_path / "checkpoint-100" / "progress.json").write_text(json.dumps({"epoch": 25, "step": 100}))
    assert common.latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-100")
    assert common.latest_checkpoint(str(tmp_path / "absent")) is None


def test_accumulation_of_n_batches_is_one_update_of_the_whole_batch():
    """--accumulate 3: three batches of 4 through Run.accumulate + common.zero_grad + backward + step give the SGD
    update of one step on the 12 rows (a per-row loss, no BatchNorm), the optimiser steps once per window, and
    sync_gradients is True exactly on each window's last batch; the next window starts from zero gradients."""
    import types
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    torch.manual_seed(0)
    x, y = torch.randn(24, 5), torch.randn(24, 1)
    init = torch.nn.Linear(5, 1)

    def train(accumulate, batch):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        acc = Accelerator(cpu=True, gradient_accumulation_steps=accumulate)
        model = torch.nn.Linear(5, 1)
        model.load_state_dict(init.state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model, opt = acc.prepare(model, opt)
        run, syncs = types.SimpleNamespace(accelerator=acc), []
        for step in range(len(x) // batch):
            rows = slice(step * batch, (step + 1) * batch)
            with common.Run.accumulate(run, step, model):
                common.zero_grad(opt, acc)
                acc.backward(torch.nn.functional.mse_loss(model(x[rows]), y[rows]))
                opt.step()
                syncs.append(acc.sync_gradients)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        return model.weight.detach().clone(), syncs

    w_acc, syncs = train(3, 4)
    w_one, _ = train(1, 12)
    assert syncs == [False, False, True] * 2
    assert torch.allclose(w_acc, w_one, atol=1e-6)
    assert not torch.allclose(w_acc, init.weight)
