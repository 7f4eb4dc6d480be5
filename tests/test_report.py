"""report.py: the Markdown table of synthetic run folders (values, "–" for what is missing, skipped folders) and
of a real tiny ReSSL run with its linear probe."""
import json
import os

import torch

import report
from conftest import TINY, run

HEADER = ("| run | method | dataset | epochs | kNN last | kNN best | linear | diagnostic | wall time | img/s | commit "
          "| hardware |")


def make_run(root, name, config, metrics, linear=None, progress=None):
    folder = root / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if linear is not None:
        (folder / "linear_eval.json").write_text(json.dumps(linear))
    if progress is not None:  # the newest checkpoint, named by its step
        (folder / f"checkpoint-{progress['step']}").mkdir()
        (folder / f"checkpoint-{progress['step']}" / "progress.json").write_text(json.dumps(progress))
    return str(folder)


def table_rows(capsys, folders, *flags):
    report.main(list(folders) + list(flags))
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return lines, cells, err


def synthetic_runs(tmp_path):
    provenance = {"git_commit": "0123456789abcdef", "git_dirty": True, "python": "3.11", "torch": "2.4",
                  "torchvision": "0.19", "accelerate": "1.0", "device_name": "NVIDIA H100", "device_count": 4,
                  "num_processes": 4, "mixed_precision": "bf16"}
    smog = make_run(tmp_path, "smog-cifar10-20260101-000000",
                    {"method": "smog", "dataset": "cifar10", "epochs": 3, "provenance": provenance},
                    [{"epoch": 0, "step": 0, "knn_top1": 10.0, "groups_used": 3, "group_label_entropy": 2.3},
                     {"step": 1, "epoch": 1, "loss": 5.0, "images_per_s": 100.0},
                     {"step": 2, "epoch": 1, "loss": 4.0, "images_per_s": 120.5},
                     {"epoch": 1, "step": 2, "knn_top1": 30.25, "groups_used": 3, "group_label_entropy": 1.5},
                     {"step": 3, "epoch": 2, "loss": 3.0, "images_per_s": 130.0},
                     {"epoch": 2, "step": 3, "knn_top1": 25.0, "groups_used": 3, "group_label_entropy": 1.25},
                     {"step": 4, "epoch": 3, "loss": 2.0, "images_per_s": 140.0},
                     {"epoch": 3, "step": 4, "knn_top1": 28.0, "groups_used": 3, "group_label_entropy": 1.125},
                     {"wall_time_s": 3725.0, "peak_memory_mb": 1000.0}],
                    linear={"top1": 61.234, "top5": 95.0, "method": "smog", "cached": False})
    # older run: no "method", no provenance, stopped in epoch 3 of 4 (checkpoint after 2), a half-written last line
    old = make_run(tmp_path, "median_triplet-stl10-20250101-000000", {"dataset": "stl10", "epochs": 4},
                   [{"step": 1, "epoch": 1, "loss": 1.0, "images_per_s": 50.0},
                    {"epoch": 1, "step": 1, "omega_given_a": 1.0, "rank_k_same_label": 0.375},
                    {"step": 2, "epoch": 2, "loss": 1.0, "images_per_s": 60.0},
                    {"step": 3, "epoch": 3, "loss": 1.0, "images_per_s": 70.0}],
                   progress={"epoch": 2, "step": 2})
    with open(os.path.join(old, "metrics.jsonl"), "a") as f:
        f.write('{"step": 2, "epo')
    return smog, old


def test_synthetic_runs_table(tmp_path, capsys):
    smog, old = synthetic_runs(tmp_path)
    lines, cells, err = table_rows(capsys, [smog, old])
    assert lines[0] == HEADER and set(lines[1]) == {"|", "-"} and len(cells) == 2
    assert cells[0] == ["smog-cifar10-20260101-000000", "smog", "cifar10", "3/3", "28.00", "30.25", "61.23",
                        "group_label_entropy 1.125", "1h02m", "140.0", "01234567+dirty", "4× NVIDIA H100 (bf16)"]
    assert cells[1] == ["median_triplet-stl10-20250101-000000", "median_triplet", "stl10", "2/4", "–", "–", "–",
                        "rank_k_same_label 0.375", "–", "70.0", "–", "–"]
    assert err == ""


def test_skips_folders_without_config_and_sorts(tmp_path, capsys):
    smog, old = synthetic_runs(tmp_path)
    (tmp_path / "empty").mkdir()
    # the diagnostic is the epoch-level value, not that of a later per-step line; a resumed run sums wall times
    cached = make_run(tmp_path, "my-run", {"method": "hnpm", "dataset": "fake", "epochs": 2},
                      [{"epoch": 1, "step": 1, "knn_top1": 50.0, "hard_size": 12.5},
                       {"wall_time_s": 30.0, "peak_memory_mb": 1.0},
                       {"step": 2, "epoch": 2, "loss": 1.0, "hard_size": 99.0, "images_per_s": 10.0},
                       {"wall_time_s": 45.4, "peak_memory_mb": 1.0}],
                      linear={"top1": 70.0, "top5": 99.0, "cached": True})
    # a finished run without "method" in config.json in a folder not named after it: no method (report.py reads no
    # checkpoint or backbone file)
    finished = make_run(tmp_path, "straight", {"dataset": "fake", "epochs": 1}, [])
    torch.save({"state_dict": {"conv1.weight": torch.zeros(2, 3)}, "arch": "resnet18", "method": "reco"},
               os.path.join(finished, "backbone.pt"))
    lines, cells, err = table_rows(capsys, [old, str(tmp_path / "empty"), smog, cached, finished],
                                   "--sort", "kNN best")
    assert [row[0] for row in cells] == ["my-run", "smog-cifar10-20260101-000000",
                                         "median_triplet-stl10-20250101-000000", "straight"]
    assert cells[3][1:5] == ["–", "fake", "1/1", "–"]
    assert cells[0][1:9] == ["hnpm", "fake", "1/2", "50.00", "50.00", "70.00 cached", "hard_size 12.5", "1m15s"]
    assert err.count("warning: skipping") == 1 and "empty" in err


def test_report_of_a_real_ressl_run(tmp_path):
    out = str(tmp_path / "ressl-run")
    run(["ressl.py"] + TINY + ["--epochs", "1", "--queue-size", "16", "--output-dir", out])
    run(["eval_linear.py", os.path.join(out, "backbone.pt"), "--dataset", "fake", "--fake-size", "32",
         "--epochs", "1", "--batch-size", "8", "--num-workers", "0", "--cached", "--no-knn"])
    lines = run(["report.py", out]).stdout.strip().splitlines()
    assert lines[0] == HEADER and len(lines) == 3
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[1:4] == ["ressl", "fake", "1/1"]
    assert float(cells[4]) >= 0 and float(cells[5]) >= float(cells[4])  # kNN last, best
    assert float(cells[6].split()[0]) >= 0 and cells[6].endswith("cached")
    assert cells[7].startswith("teacher_nn_same_label ")
