"""common/config.py: flags from a dataclass, their help text and errors, and the seeding rule."""
import dataclasses
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
