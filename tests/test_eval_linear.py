"""eval_linear.py: every flag outside its domain and every unusable backbone file ends with one `error:` line and
exit code 2, before any work. (Its happy path runs in each script's smoke test: conftest.check_backbone; its
training step, against SGD recomputed by hand, in tests/test_train_step.py.)

The table runs main() in-process (a subprocess costs a torch import, seconds each); two subprocess runs check that
the command line itself ends the same way, without a traceback."""
import os

import pytest
import torch

import common
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
