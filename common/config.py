"""Flags, errors and the seeding rule: the parts of a run that exist before any data or model.

A method's `Config` dataclass (extending `BaseConfig`) is its command line: `lr: float = 0.06  # comment` becomes
`--lr FLOAT` with that help text. A bad flag, path or data set is a `UserError`: one `error:` line, exit code 2.
Everything random in a run (views, epoch order, shuffle BN, random group draws) is seeded by `seed_for`.
"""
import argparse
import dataclasses
import hashlib
import inspect
import io
import json
import os
import sys
import tokenize
import typing
from dataclasses import dataclass
from typing import Literal

import torch


class UserError(Exception):
    """Bad input (flag, path, data). Scripts print its message and exit with code 2, no traceback."""


def require(ok, message):
    """Flag validation in check_config: a false condition ends the run with `error: <message>`."""
    if not ok:
        raise UserError(message)


def run_main(train_fn, config_cls, argv=None, paper=None):
    """Parse the CLI into `config_cls` with the recipe resolved (`paper`: the script's PAPER table), then print it
    (--print-config) or call `train_fn(cfg)`; a UserError ends the run with its one message."""
    try:
        cfg = parse_config(config_cls, argv, paper)
        if cfg.print_config:
            print(json.dumps(dataclasses.asdict(cfg), indent=2))
            return cfg
        return train_fn(cfg)
    except UserError as e:
        # a DataLoader worker re-raises with the worker's traceback in the message: keep only the message
        print(f"error: {str(e).strip().splitlines()[-1].split('UserError: ')[-1]}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------- config -> argparse

@dataclass
class BaseConfig:
    """The fields no paper describes; each method's Config extends it with its own. The defaults are the small-data
    protocol shared by the five scripts (ReSSL Sec. 4's optimisation); `--recipe paper` applies the script's PAPER
    table (resolve_recipe)."""
    recipe: Literal["auto", "paper", "small"] = "auto"  # paper: the paper's ImageNet table; auto: paper for > 96 px
    print_config: bool = False  # print the resolved settings as JSON and exit
    # data
    dataset: Literal["cifar10", "cifar100", "stl10", "tiny-imagenet", "imagenet", "imagenet100", "imagefolder",
                     "fake"] = "cifar10"  # data set
    data_dir: str = "data"  # where datasets are downloaded to / read from
    fake_size: int = 512  # number of synthetic images for --dataset fake
    num_workers: int = 8  # data-loading worker processes per GPU (--views-on workers)
    views_on: Literal["auto", "workers", "device"] = "auto"  # where views are made; auto: device on CUDA if it fits
    # model
    arch: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"  # torchvision backbone
    stem: Literal["auto", "cifar", "imagenet"] = "auto"  # auto: 3x3 stride-1 conv and no max-pool for <= 64 px
    # optimisation
    epochs: int = 200  # pretraining epochs
    batch_size: int = 256  # GLOBAL batch size, split evenly over processes
    lr: float = 0.06  # base learning rate, scaled by batch_size / 256
    optimizer: Literal["sgd", "lars", "adam"] = "sgd"  # lars: SGD with layer-wise trust ratios (common/optim.py)
    momentum: float = 0.9  # SGD / LARS momentum
    weight_decay: float = 5e-4  # weight decay
    accumulate: int = 1  # batches per optimiser update (gradient accumulation); the effective batch is N x batch-size
    warmup_epochs: int = 10  # linear learning-rate warm-up, then cosine decay
    # run
    seed: int = 0  # random seed (weights, views, shuffling)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"  # auto: what `accelerate launch` was told
    output_dir: str = ""  # default runs/<method>-<dataset>-<time>
    resume: bool = False  # continue from the newest complete checkpoint in --output-dir
    allow_config_change: bool = False  # --resume with settings that differ from the checkpoint's config.json
    stop_after_epochs: int = 0  # end this invocation after this epoch (0: run to --epochs); continue with --resume
    log_every: int = 50  # steps between metric lines
    eval_every: int = 10  # epochs between kNN evaluations (also before training and at the end); 0: only at the end
    checkpoint_every: int = 10  # epochs between checkpoints (and at the end)
    knn_k: int = 200  # neighbours of the kNN monitor
    knn_t: float = 0.1  # temperature of the kNN monitor
    report_to: Literal["none", "tensorboard", "wandb", "all"] = "none"  # trackers besides metrics.jsonl
    compile: bool = False  # torch.compile the trained network


# fields that may change between an interrupted run and its --resume
RUN_ONLY_FIELDS = {"data_dir", "num_workers", "views_on", "output_dir", "resume", "allow_config_change",
                   "stop_after_epochs", "log_every", "eval_every", "checkpoint_every", "report_to", "compile",
                   "mixed_precision", "print_config"}


def check_base_config(cfg, num_processes):
    """Domains of the generic flags; each script's check_config calls it first."""
    for name in ("batch_size", "epochs", "fake_size", "log_every", "checkpoint_every", "knn_k", "accumulate"):
        require(getattr(cfg, name) >= 1, f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}.")
    for name in ("num_workers", "eval_every", "stop_after_epochs", "warmup_epochs", "weight_decay"):
        require(getattr(cfg, name) >= 0, f"--{name.replace('_', '-')} must be 0 or more, got {getattr(cfg, name)}.")
    require(cfg.lr > 0, f"--lr must be positive, got {cfg.lr}.")
    require(cfg.knn_t > 0, f"--knn-t must be positive, got {cfg.knn_t}.")
    require(0 <= cfg.momentum <= 1, f"--momentum must lie in [0, 1], got {cfg.momentum}.")
    require(cfg.warmup_epochs <= cfg.epochs, f"--warmup-epochs {cfg.warmup_epochs} exceeds --epochs {cfg.epochs}.")
    require(cfg.stop_after_epochs <= cfg.epochs,
            f"--stop-after-epochs {cfg.stop_after_epochs} exceeds --epochs {cfg.epochs}.")
    check_divides(cfg.batch_size, num_processes)


def _field_comments(cls):
    """`name: type = default  # comment` lines of a dataclass -> {name: comment}, used as --help text.

    Read with tokenize, so a `#` inside a default string is not a comment. Where the source cannot be read (a
    Config pasted into a notebook or REPL) the flags simply have no help text."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        field, depth = None, 0
        try:
            for tok in tokenize.generate_tokens(io.StringIO(source).readline):
                if tok.type == tokenize.NEWLINE or (tok.type == tokenize.NL and depth == 0):
                    field = None  # a field's line ends here (a line break inside brackets does not end it)
                elif tok.type == tokenize.NAME and field is None and tok.start[1] > 0 and depth == 0:
                    field = tok.string
                elif tok.type == tokenize.OP and tok.string in "([{":
                    depth += 1
                elif tok.type == tokenize.OP and tok.string in ")]}":
                    depth -= 1
                elif tok.type == tokenize.COMMENT and field:
                    comments[field] = tok.string.lstrip("#").strip()
        except (tokenize.TokenError, IndentationError):
            continue
    return comments


def parse_config(config_cls, argv=None, paper=None):
    """Typed flags from a dataclass: `lr: float = 0.06  # comment` becomes `--lr FLOAT` with that help text, with
    the recipe resolved (resolve_recipe): the flags given on the command line win over the recipe's values.

    bool fields get `--name / --no-name`, Literal[...] fields get choices, an unknown flag is an error naming it.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = config_cls(**vars(_parser(config_cls).parse_args(argv)))
    return resolve_recipe(cfg, paper, explicit=explicit_flags(config_cls, argv))


def explicit_flags(config_cls, argv):
    """The fields given on the command line `argv` (parsed without defaults: only what was typed is left)."""
    parser = _parser(config_cls)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _parser(config_cls):
    module = sys.modules.get(config_cls.__module__)
    parser = argparse.ArgumentParser(description=((module and module.__doc__) or "").split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    comments = _field_comments(config_cls)
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        flag, tp = "--" + f.name.replace("_", "-"), hints[f.name]
        help_ = comments.get(f.name, "").replace("%", "%%")  # argparse formats help with %
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        elif typing.get_origin(tp) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(tp), default=f.default, help=help_)
        else:
            parser.add_argument(flag, type=tp, default=f.default, help=help_)
    return parser


# ----------------------------------------------------------------------------- recipes

SMALL_DATASETS = ("cifar10", "cifar100", "stl10", "tiny-imagenet", "fake")


def auto_recipe(cfg):
    """--recipe auto: `paper` for ImageNet-scale data (imagenet, imagenet100, an image folder whose images are larger
    than 96 px), `small` for CIFAR-10/100, STL-10, Tiny-ImageNet and images of 96 px or less."""
    if cfg.dataset in ("imagenet", "imagenet100"):
        return "paper"
    if cfg.dataset == "imagefolder":  # the first training image decides, as it decides the pretraining size
        from PIL import Image
        try:
            folder = os.path.join(cfg.data_dir, "train")
            first_class = os.path.join(folder, sorted(os.listdir(folder))[0])
            with Image.open(os.path.join(first_class, sorted(os.listdir(first_class))[0])) as im:
                return "paper" if min(im.size) > 96 else "small"
        except (OSError, IndexError):
            return "small"  # the data loader reports what is wrong with the folder
    return "small"


def resolve_recipe(cfg, paper, explicit=None):
    """The recipe applied: `small` is the Config's defaults (the protocol shared by the five scripts); `paper` sets
    the fields of the script's PAPER table that are not in `explicit` (the flags given on the command line; None:
    the fields whose value differs from the default). Returns a new Config whose `recipe` is `paper` or `small`."""
    if not hasattr(cfg, "recipe"):  # a Config without recipes (e.g. a user's own dataclass)
        return cfg
    recipe = cfg.recipe if cfg.recipe != "auto" else auto_recipe(cfg)
    if explicit is None:
        defaults = type(cfg)()
        explicit = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(defaults, f.name)}
    values = dict(paper or {}) if recipe == "paper" else {}
    unknown = set(values) - {f.name for f in dataclasses.fields(cfg)}
    if unknown:
        raise ValueError(f"PAPER table names fields {sorted(unknown)} that {type(cfg).__name__} does not have")
    if recipe == "paper" and paper is None:
        raise UserError("--recipe paper: this script has no paper recipe.")
    return dataclasses.replace(cfg, recipe=recipe, **{k: v for k, v in values.items() if k not in explicit})


def check_divides(batch_size, num_processes):
    """--batch-size is the GLOBAL batch: it must split evenly over the processes."""
    require(batch_size % num_processes == 0,
            f"--batch-size {batch_size} must divide evenly over {num_processes} processes.")


# ----------------------------------------------------------------------------- the seeding rule

def seed_for(*key):
    """THE seeding rule of this repository: a 63-bit seed from a key of ints and strings, e.g. (seed, "views", epoch,
    step, view). The same in every process and Python run (unlike hash() of a str), so whatever is drawn from it is
    the same on 1 or N processes and after a resume."""
    key = tuple(k if isinstance(k, str) else int(k) for k in key)
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def generator(*key, device="cpu"):
    """A torch.Generator seeded by seed_for(*key)."""
    return torch.Generator(device=device).manual_seed(seed_for(*key))
