"""common/config.py: flags from a dataclass, their help text and errors, and the seeding rule."""
import dataclasses
import json
import os
from typing import Literal

import pytest

import common


@dataclasses.dataclass
class Cfg:
    lr: float = 0.1  # the learning rate
    epochs: int = 3  # how long
    name: str = "x"  # a name
    flag: bool = True  # a switch
    mode: Literal["a", "b"] = "a"  # a choice


def test_parse_config_types_bools_choices():
    cfg = common.parse_config(Cfg, ["--lr", "0.5", "--epochs", "7", "--no-flag", "--mode", "b"])
    assert cfg == Cfg(lr=0.5, epochs=7, name="x", flag=False, mode="b")
    assert common.parse_config(Cfg, []) == Cfg()


def test_parse_config_help_comes_from_field_comments(capsys):
    with pytest.raises(SystemExit):
        common.parse_config(Cfg, ["--help"])
    out = capsys.readouterr().out
    assert "the learning rate" in out and "--no-flag" in out and "{a,b}" in out


@pytest.mark.parametrize("argv, message", [(["--lrr", "1"], "unrecognized arguments: --lrr"),
                                            (["--epochs", "two"], "invalid int value: 'two'"),
                                            (["--mode", "c"], "invalid choice: 'c'")])
def test_parse_config_bad_flag_is_an_error_naming_it(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        common.parse_config(Cfg, argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@dataclasses.dataclass
class HashCfg:
    tag: str = "a#b"  # a default holding a hash sign
    size: int = 3  # plain


def test_help_is_not_garbled_by_a_hash_in_a_default(capsys):
    assert common.config._field_comments(HashCfg) == {"tag": "a default holding a hash sign", "size": "plain"}
    with pytest.raises(SystemExit):
        common.parse_config(HashCfg, ["--help"])
    out = capsys.readouterr().out
    assert "a default holding a hash sign" in out and "a#b" in out


def test_config_without_source_still_parses(monkeypatch):
    """A Config pasted into a notebook or REPL has no source file: flags work, without help text."""
    def no_source(obj):
        raise OSError("could not get source code")
    monkeypatch.setattr(common.config.inspect, "getsource", no_source)
    assert common.config._field_comments(Cfg) == {}
    assert common.parse_config(Cfg, ["--lr", "0.5", "--no-flag"]) == Cfg(lr=0.5, flag=False)


def test_config_defined_by_exec_parses():
    namespace = {"dataclasses": dataclasses}
    exec("@dataclasses.dataclass\nclass C:\n    x: int = 1  # an int\n", namespace)
    assert common.parse_config(namespace["C"], ["--x", "4"]).x == 4


def test_method_configs_extend_the_base_config():
    import hnpm, median_triplet, reco, ressl, smog
    base = [f.name for f in dataclasses.fields(common.BaseConfig)]
    for m in (median_triplet, smog, ressl, hnpm, reco):
        assert issubclass(m.Config, common.BaseConfig)
        assert [f.name for f in dataclasses.fields(m.Config)][:len(base)] == base  # generic fields first


# ----------------------------------------------------------------------------- recipes

@dataclasses.dataclass
class RecipeCfg(common.BaseConfig):
    tau: float = 0.1  # a method's own value


PAPER = {"lr": 0.3, "epochs": 100, "optimizer": "lars", "tau": 0.2}


@pytest.mark.parametrize("argv, recipe", [([], "small"), (["--dataset", "imagenet"], "paper"),
                                           (["--dataset", "imagenet100"], "paper"), (["--dataset", "stl10"], "small"),
                                           (["--recipe", "paper"], "paper"),
                                           (["--dataset", "imagenet", "--recipe", "small"], "small")])
def test_recipe_auto_and_explicit(argv, recipe):
    cfg = common.parse_config(RecipeCfg, argv, PAPER)
    assert cfg.recipe == recipe
    expected = PAPER if recipe == "paper" else {"lr": 0.06, "epochs": 200, "optimizer": "sgd", "tau": 0.1}
    assert {k: getattr(cfg, k) for k in PAPER} == expected


def test_recipe_flags_given_win_even_at_their_default_value():
    """--lr 0.06 is the default's value, yet it was typed: the paper's lr must not replace it."""
    cfg = common.parse_config(RecipeCfg, ["--recipe", "paper", "--lr", "0.06", "--no-compile", "--tau", "0.5"], PAPER)
    assert (cfg.lr, cfg.tau, cfg.epochs, cfg.optimizer) == (0.06, 0.5, 100, "lars")
    assert common.explicit_flags(RecipeCfg, ["--lr", "0.06", "--no-compile"]) == {"lr", "compile"}


def test_recipe_of_an_image_folder_follows_its_image_size(tmp_path):
    from PIL import Image
    for name, side in (("small", 64), ("large", 128)):
        os.makedirs(tmp_path / name / "train" / "a")
        Image.new("RGB", (side + 20, side)).save(tmp_path / name / "train" / "a" / "0.jpg")
    for name, recipe in (("small", "small"), ("large", "paper"), ("missing", "small")):
        argv = ["--dataset", "imagefolder", "--data-dir", str(tmp_path / name)]
        assert common.parse_config(RecipeCfg, argv, PAPER).recipe == recipe


def test_resolve_recipe_in_python_and_bad_tables():
    cfg = common.resolve_recipe(RecipeCfg(recipe="paper", lr=0.5), PAPER)  # Python: non-default values count as set
    assert (cfg.recipe, cfg.lr, cfg.epochs) == ("paper", 0.5, 100)
    with pytest.raises(ValueError, match="nope"):
        common.resolve_recipe(RecipeCfg(recipe="paper"), {"nope": 1})
    with pytest.raises(common.UserError, match="no paper recipe"):
        common.resolve_recipe(RecipeCfg(recipe="paper"), None)
    assert common.parse_config(Cfg, ["--lr", "0.5"]) == Cfg(lr=0.5)  # a Config without a recipe field: as parsed


def test_print_config_prints_the_resolved_json_and_does_not_train(capsys):
    def train(cfg):
        raise AssertionError("--print-config must not train")
    common.run_main(train, RecipeCfg, ["--print-config", "--dataset", "imagenet", "--epochs", "5"], PAPER)
    shown = json.loads(capsys.readouterr().out)
    assert shown["recipe"] == "paper" and shown["epochs"] == 5 and shown["lr"] == 0.3 and shown["tau"] == 0.2
