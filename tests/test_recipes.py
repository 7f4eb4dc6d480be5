"""Recipes across the five scripts: `--recipe small` is ONE optimisation for all of them (ReSSL Sec. 4), `--recipe
paper --print-config` shows every value of a script's PAPER table, and the paper recipe trains a ResNet-50 on an
ILSVRC-2012-layout tree and resumes (the paper_scale tests: the second README test command runs them)."""
import dataclasses
import importlib
import json
import os

import pytest
import torch

import common
from conftest import read_metrics, run
from test_imagenet import _imagenet_tree

SCRIPTS = ["median_triplet", "smog", "ressl", "hnpm", "reco"]

# ReSSL Sec. 4 (https://arxiv.org/abs/2203.08717): SGD momentum 0.9, lr 0.06 x B/256, weight decay 5e-4, 10 warm-up
# epochs then cosine, 200 epochs, batch 256, ResNet-18 (with the CIFAR stem for 32 px: --stem auto)
SEC4 = dict(optimizer="sgd", momentum=0.9, lr=0.06, weight_decay=5e-4, warmup_epochs=10, epochs=200, batch_size=256,
            arch="resnet18", stem="auto", accumulate=1)


@pytest.mark.parametrize("script", SCRIPTS)
def test_small_protocol_is_one_optimisation_for_all_five(script):
    m = importlib.import_module(script)
    for argv in ([], ["--dataset", "cifar100"], ["--dataset", "stl10"], ["--dataset", "tiny-imagenet"]):
        cfg = common.parse_config(m.Config, argv, m.PAPER)
        assert cfg.recipe == "small"
        assert {k: getattr(cfg, k) for k in SEC4} == SEC4, argv
    cfg = common.parse_config(m.Config, ["--batch-size", "512"], m.PAPER)
    steps_per_epoch = 10
    after_warmup = m.schedules(cfg, cfg.warmup_epochs * steps_per_epoch, steps_per_epoch)
    assert after_warmup["lr"] == pytest.approx(0.06 * 512 / 256)  # the cosine's start: lr x B / 256
    assert m.schedules(cfg, 0, steps_per_epoch)["lr"] == pytest.approx(0.12 / (cfg.warmup_epochs * steps_per_epoch))


def _json(v):
    return json.loads(json.dumps(v))


@pytest.mark.parametrize("script", SCRIPTS)
def test_paper_recipe_prints_every_cited_value(script, capsys):
    m = importlib.import_module(script)
    assert m.PAPER.get("arch") == "resnet50" and "epochs" in m.PAPER and "batch_size" in m.PAPER
    for argv in (["--recipe", "paper"], ["--dataset", "imagenet"]):
        common.run_main(m.train, m.Config, [*argv, "--print-config"], m.PAPER)
        shown = json.loads(capsys.readouterr().out)
        assert shown["recipe"] == "paper"
        assert {k: shown[k] for k in m.PAPER} == _json(m.PAPER)
    # a typed flag wins over the table, and the small recipe ignores it
    value = m.PAPER["epochs"] + 1
    assert common.parse_config(m.Config, ["--recipe", "paper", "--epochs", str(value)], m.PAPER).epochs == value
    small = common.parse_config(m.Config, ["--recipe", "small"], m.PAPER)
    assert dataclasses.asdict(small) == {**dataclasses.asdict(m.Config()), "recipe": "small"}


# what a CPU with a batch of 4 needs beside the paper recipe: no accumulation window longer than the 1-step epoch,
# group counts, shuffle-BN splits and queues that fit 4 images
SMOKE = {"median_triplet": [], "smog": ["--num-groups", "4"], "ressl": ["--queue-size", "64"], "hnpm": [],
         "reco": ["--bn-splits", "2"]}


@pytest.fixture(scope="module")
def imagenet_tree(tmp_path_factory):
    return _imagenet_tree(tmp_path_factory.mktemp("imagenet"), ["n01440764", "n01443537"], train_per_class=2)


@pytest.mark.paper_scale
@pytest.mark.parametrize("script", SCRIPTS)
def test_paper_recipe_trains_a_resnet50_on_imagenet_layout_and_resumes(script, imagenet_tree, tmp_path):
    m = importlib.import_module(script)
    multi = ["--multi-crop"] if "multi_crop" in {f.name for f in dataclasses.fields(m.Config)} else []
    out = str(tmp_path / "run")
    args = [f"{script}.py", "--dataset", "imagenet", "--data-dir", imagenet_tree, "--arch", "resnet50", "--batch-size",
            "4", "--epochs", "2", "--warmup-epochs", "1", "--accumulate", "1", "--eval-every", "0", "--log-every", "1",
            "--num-workers", "0", *multi, *SMOKE[script], "--output-dir", out]
    run([*args, "--stop-after-epochs", "1"])
    assert not os.path.exists(os.path.join(out, "backbone.pt"))
    assert "resumed from" in run([*args, "--resume"]).stdout
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["recipe"] == "paper" and config["arch"] == "resnet50"
    assert config["optimizer"] == m.PAPER.get("optimizer", "sgd")
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2]
    state = torch.load(os.path.join(out, "backbone.pt"))["state_dict"]
    assert state["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)  # ResNet-50's last bottleneck
    assert all(torch.isfinite(v).all() for v in state.values())
