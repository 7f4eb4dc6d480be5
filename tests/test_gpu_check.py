"""gpu_check.py, the first command on a new GPU, run here with --device cpu: every part passes on a clean method,
and a host synchronisation put into a train_step is a FAIL line and exit code 1."""
import os

from conftest import run


def test_cpu_check_of_one_method_passes_every_part(tmp_path):
    out = str(tmp_path / "check")
    p = run(["gpu_check.py", "--device", "cpu", "--methods", "ressl", "--out", out], timeout=400)
    with open(os.path.join(out, "summary.md")) as f:
        table = [line for line in f if line.startswith("| ") and "---" not in line][1:]
    assert [line.split(" | ")[0] for line in table] == ["| bench ressl", "| sync ressl", "| run ressl"], table
    assert all(line.rstrip().endswith("| PASS |") for line in table), table
    assert "0 synchronisations" in table[1] and "8 steps" in table[2], table
    assert os.path.isfile(os.path.join(out, "ressl", "backbone.pt")) and p.returncode == 0


def test_a_sync_in_the_step_fails_the_check(tmp_path, monkeypatch, capsys):
    import gpu_check
    import ressl
    orig = ressl.train_step

    def syncing_step(*a, **k):
        logs = orig(*a, **k)
        logs["loss"].item()  # what .item() in a step costs on CUDA: the host waits for the device
        return logs
    monkeypatch.setattr(ressl, "train_step", syncing_step)
    code = gpu_check.main(["--device", "cpu", "--methods", "ressl", "--parts", "sync", "--out", str(tmp_path)])
    with open(tmp_path / "summary.md") as f:
        summary = f.read()
    assert code == 1 and "| sync ressl | 2 synchronisations in 2 steps | FAIL: step 2: _local_scalar_dense" in summary
