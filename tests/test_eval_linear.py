"""eval_linear.py: every flag outside its domain and every unusable backbone file ends with one `error:` line and
exit code 2, before any work; the recipes (each paper's ImageNet protocol under --recipe paper, the small protocol
unchanged, flags winning over both) and a LARS linear step. (Its happy path runs in each script's smoke test:
conftest.check_backbone; its SGD training step, against SGD recomputed by hand, in tests/test_train_step.py.)

The table runs main() in-process (a subprocess costs a torch import, seconds each); two subprocess runs check that
the command line itself ends the same way, without a traceback."""
import json
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

import common
import common.optim
import eval_linear
from conftest import run

BAD_FLAGS = [
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--fake-size", "0"], "--fake-size"),
    (["--num-workers", "-1"], "--num-workers"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--momentum", "1.5"], "--momentum"),
    (["--momentum", "-0.1"], "--momentum"),
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--milestones", "80,60"], "--milestones"),
    (["--milestones", "sixty"], "--milestones"),
    (["--milestones", "0,5"], "--milestones"),
    (["--seed", "-1"], "--seed"),
    (["--nesterov", "--optimizer", "lars"], "--nesterov"),
    (["--nesterov", "--momentum", "0"], "--nesterov"),
    (["--output", os.path.join("no-such-folder", "x.json")], "--output"),
]


def assert_one_error(returncode, stderr, message):
    lines = stderr.strip().splitlines()
    assert returncode == 2, stderr
    assert "Traceback" not in stderr and lines and lines[-1].startswith("error:"), stderr
    assert sum(line.startswith("error:") for line in lines) == 1 and message in lines[-1], stderr


@pytest.fixture
def empty_file(tmp_path):
    path = tmp_path / "backbone.pt"
    path.write_bytes(b"")  # exists: what is refused must be the flag
    return str(path)


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag_gives_one_error_line(empty_file, flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        eval_linear.main([empty_file, "--dataset", "fake"] + flags)
    assert_one_error(e.value.code, capsys.readouterr().err, message)


def test_missing_backbone_gives_one_error_line(tmp_path, capsys):
    for argv in ([str(tmp_path / "none.pt")], []):
        with pytest.raises(SystemExit) as e:
            eval_linear.main(argv + ["--dataset", "fake"])
        assert_one_error(e.value.code, capsys.readouterr().err, "backbone")


def test_milestones_after_the_last_epoch_are_allowed_with_a_warning(empty_file, capsys):
    eval_linear.check_config(eval_linear.EvalConfig(backbone=empty_file, epochs=2))  # short checks keep 60,80
    assert "warning: --milestones 60,80" in capsys.readouterr().err
    assert eval_linear.parse_milestones("") == [] and eval_linear.parse_milestones("60,80") == [60, 80]


def write_garbage(path):
    path.write_bytes(b"not a checkpoint")


def write_without_keys(path):
    torch.save({"state_dict": {}}, path)


def write_wrong_weights(path):
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "arch": "resnet18", "cifar_stem": False}, path)


@pytest.mark.parametrize("write", [write_garbage, write_without_keys, write_wrong_weights])
def test_unusable_backbone_is_a_user_error(tmp_path, write):
    path = tmp_path / "backbone.pt"
    write(path)
    with pytest.raises(common.UserError, match="is not a backbone.pt written by a method script"):
        eval_linear.load_backbone(str(path))


@pytest.mark.parametrize("case", ["flag", "backbone"])
def test_command_line_ends_with_one_error_line(tmp_path, case):
    backbone = tmp_path / "backbone.pt"
    write_garbage(backbone)
    flags = ["--momentum", "2"] if case == "flag" else ["--fake-size", "32", "--num-workers", "0"]
    p = run(["eval_linear.py", str(backbone), "--dataset", "fake"] + flags, check=False)
    assert_one_error(p.returncode, p.stderr, "--momentum" if case == "flag" else str(backbone))


# ----------------------------------------------------------------------------- recipes

def resolved(argv, capsys):
    """--print-config of this command line -> the settings as printed (JSON); nothing else runs."""
    eval_linear.main(argv + ["--print-config"])
    return json.loads(capsys.readouterr().out)


# each paper's linear protocol as its text states it (the quotes beside EVAL_RECIPES), and the filled-in values of
# the protocol it follows where it is silent: (optimizer, nesterov, batch, epochs, lr, lr scaling, wd, schedule)
PAPERS = {
    # Sec. 4.1: "the batch size is 256. The maximum epoch is 100. There is no weight decay [...] The optimizer is SGD";
    # lr 30 and steps 60, 80 from OpenSelfSup's ImageNet linear config, which Sec. 4 says it follows
    "median_triplet": ("sgd", False, 256, 100, 30.0, "none", 0.0, "step"),
    # silent: MoCo v3's ResNet-50 linear protocol (momentum SGD, batch 1024, 90 epochs, 0.1 x B/256, cosine, wd 0)
    "smog": ("sgd", False, 1024, 90, 0.1, "linear", 0.0, "cosine"),
    # Sec. 5.1: "90 epochs using a SGD optimizer with a Nesterov momentum value of 0.9, weight decay of 0, learning rate
    # with 0.1 * BatchSize/256, and a cosine-annealed learning rate scheduler"; batch 4096 from SimCLR's setting
    "ressl": ("sgd", True, 4096, 90, 0.1, "linear", 0.0, "cosine"),
    # silent: BYOL's (Nesterov SGD, batch 1024, 80 epochs, no weight decay, 0.2 x B/256 with cosine decay)
    "hnpm": ("sgd", True, 1024, 80, 0.2, "linear", 0.0, "cosine"),
    # Sec. IV-C: "LARS optimizer with weight decay of 0. and momentum of 0.9 [...] A cosine decay schedule [...] initial
    # learning rate of 0.1 * batch/256 and a batch size of 4096 for training 90 epochs"
    "reco": ("lars", False, 4096, 90, 0.1, "linear", 0.0, "cosine"),
}
KEYS = ("optimizer", "nesterov", "batch_size", "epochs", "lr", "lr_scaling", "weight_decay", "schedule")


@pytest.mark.parametrize("method", list(PAPERS))
def test_paper_recipe_prints_the_papers_protocol(method, capsys):
    cfg = resolved(["--recipe", "paper", "--method", method], capsys)
    assert tuple(cfg[k] for k in KEYS) == PAPERS[method]
    assert (cfg["recipe"], cfg["method"], cfg["momentum"], cfg["augment"]) == ("paper", method, 0.9, "resized-crop")
    if method == "median_triplet":
        assert cfg["milestones"] == "60,80"


def test_explicit_flags_win_over_the_recipe(capsys):
    # --epochs 100 and --optimizer sgd are the small protocol's defaults: typed, they still win over ReCo's 90 / LARS
    cfg = resolved(["--recipe", "paper", "--method", "reco", "--batch-size", "512", "--epochs", "100",
                    "--optimizer", "sgd", "--augment", "crop"], capsys)
    assert (cfg["batch_size"], cfg["epochs"], cfg["optimizer"], cfg["augment"]) == (512, 100, "sgd", "crop")
    assert (cfg["lr"], cfg["lr_scaling"], cfg["schedule"], cfg["weight_decay"]) == (0.1, "linear", "cosine", 0.0)


def test_small_recipe_is_the_protocol_of_before(capsys):
    """--recipe small (auto on CIFAR-10, even with --method): ReSSL's small protocol, SGD lr 10, 100 epochs, batch
    256, momentum 0.9, no weight decay, x 0.1 at 60 and 80, pad + crop + flip, no lr scaling."""
    small = dict(optimizer="sgd", nesterov=False, batch_size=256, epochs=100, lr=10.0, lr_scaling="none",
                 momentum=0.9, weight_decay=0.0, schedule="step", milestones="60,80", augment="crop")
    for argv in ([], ["--recipe", "small", "--method", "reco"], ["--dataset", "cifar10", "--method", "smog"]):
        cfg = resolved(argv, capsys)
        assert cfg["recipe"] == "small" and {k: cfg[k] for k in small} == small, argv
    assert {k: getattr(eval_linear.EvalConfig(), k) for k in small} == small


def test_auto_recipe_is_the_paper_one_for_imagenet(capsys):
    for dataset in ("imagenet", "imagenet100"):
        cfg = resolved(["--dataset", dataset, "--method", "hnpm"], capsys)
        assert cfg["recipe"] == "paper" and tuple(cfg[k] for k in KEYS) == PAPERS["hnpm"]


def test_paper_recipe_takes_the_method_from_the_backbone(tmp_path, capsys):
    path = tmp_path / "backbone.pt"
    torch.save({"state_dict": {}, "arch": "resnet18", "cifar_stem": False, "method": "ressl"}, path)
    cfg = resolved([str(path), "--recipe", "paper"], capsys)
    assert cfg["method"] == "ressl" and tuple(cfg[k] for k in KEYS) == PAPERS["ressl"]
    cfg = resolved([str(path), "--recipe", "paper", "--method", "reco"], capsys)  # --method wins
    assert tuple(cfg[k] for k in KEYS) == PAPERS["reco"]


def test_paper_recipe_without_a_method_is_one_error_line(tmp_path, capsys):
    for argv in ([str(tmp_path / "none.pt"), "--recipe", "paper"], ["--dataset", "imagenet"]):
        with pytest.raises(SystemExit) as e:
            eval_linear.main(argv + ["--print-config"])
        assert_one_error(e.value.code, capsys.readouterr().err, "--method")


def test_resized_crop_tests_on_the_centre_of_an_image_resized_to_8_7_of_the_crop():
    """ImageNet's 256 -> 224: a 512 x 384 image is resized to 341 x 256 and its centre 224 x 224 kept."""
    cfg = eval_linear.EvalConfig(augment="resized-crop")
    _, test = eval_linear.transforms(cfg, 224, ((0.0,) * 3, (1.0,) * 3))
    image = torch.zeros(3, 384, 512, dtype=torch.uint8)
    image[:, 192, 256] = 255  # the centre pixel, and one 169 px below it: 113 px at 2/3 scale, outside the crop
    image[:, 192 + 169, 256] = 255  # (resized to 224 instead, it would lie 99 px below the centre, inside)
    out = test(image)
    rows = (out[0] > 0.01).nonzero()[:, 0]
    assert out.shape == (3, 224, 224) and len(rows) and 110 <= rows.min() and rows.max() <= 114, rows


# ----------------------------------------------------------------------------- LARS

def test_lars_linear_step_and_cosine_schedule():
    """--optimizer lars --lr-scaling linear --schedule cosine: the weight's step is lr x eta ||w|| / ||g|| x g, the
    bias's plain lr x g (no trust ratio), at lr = 0.1 x 8 / 256; the lr then follows the cosine, per step."""
    cfg = eval_linear.EvalConfig(optimizer="lars", lr=0.1, lr_scaling="linear", batch_size=8, epochs=2,
                                 schedule="cosine", cached=True)
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    classifier, optimizer, scheduler = eval_linear.make_classifier(cfg, 4, 3, steps_per_epoch=2)
    assert isinstance(optimizer, common.optim.LARS)
    assert [g["lars_exclude"] for g in optimizer.param_groups] == [False, True]
    feats, y = torch.randn(8, 4), torch.arange(8) % 3
    w, b = classifier.weight.detach().clone(), classifier.bias.detach().clone()
    F.cross_entropy(nn.functional.linear(feats, w.requires_grad_(), b.requires_grad_()), y).backward()
    lr = 0.1 * 8 / 256
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr)
    eval_linear.train_epoch(classifier, None, optimizer, scheduler, [(feats, y)], cfg, accelerator)
    ratio = common.optim.LARS_ETA * w.norm() / w.grad.norm()
    assert torch.allclose(classifier.weight.detach(), w.detach() - lr * ratio * w.grad, atol=1e-7)
    assert torch.allclose(classifier.bias.detach(), b.detach() - lr * b.grad, atol=1e-7)
    # after 1 of 4 steps: lr x (1 + cos(pi / 4)) / 2
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr * (1 + math.cos(math.pi / 4)) / 2)


def test_lars_probe_runs_end_to_end(tmp_path, monkeypatch):
    """The whole evaluate() with --optimizer lars and the paper's augmentation on fake images: one LARS step per batch
    at the cosine's lr, and a result file."""
    backbone = tmp_path / "backbone.pt"
    backbone.write_bytes(b"")  # check_config wants the file; load_backbone is replaced below
    tiny = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    monkeypatch.setattr(eval_linear, "load_backbone", lambda path: (tiny, {
        "image_size": 32, "mean_std": common.IMAGENET_MEAN_STD, "method": "tiny"}))
    lrs, step = [], common.optim.LARS.step
    monkeypatch.setattr(common.optim.LARS, "step", lambda self, *a: lrs.append(self.param_groups[0]["lr"]) or
                        step(self, *a))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    out = tmp_path / "result.json"
    eval_linear.main([str(backbone), "--dataset", "fake", "--fake-size", "16", "--batch-size", "8", "--num-workers",
                      "0", "--epochs", "2", "--optimizer", "lars", "--lr", "0.1", "--lr-scaling", "linear",
                      "--schedule", "cosine", "--augment", "resized-crop", "--no-knn", "--output", str(out)])
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    assert lrs == pytest.approx([0.1 * 8 / 256 * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)])
    result = json.loads(out.read_text())
    assert result["config"]["optimizer"] == "lars" and 0 <= result["top1"] <= 100
