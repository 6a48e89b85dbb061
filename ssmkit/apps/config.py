"""Configuration by composition: option groups, one configuration class per command, flags and TOML.

An option group is a dataclass of related options (`RunOptions`, `TrainOptions`, an application's model
or data options), each field declared once with its help text by `option`. A command's configuration
class is composed of the groups it uses, with a table of changed defaults:

    SeqTrain = compose("SeqTrain", RunOptions, SeedOptions, SeqTask, ModelOptions, TrainOptions, EvalOptions,
                       DeviceOptions, defaults=dict(model="mamba_lm_tiny", steps=500, lr=1e-2))

Every field becomes a flag (`batch_size` -> `--batch-size`), listed under its group's title in `--help`
with its default, and a key of `--config file.toml`. Values resolve as: default < TOML file < flag.
Field types: int, float (finite), str and bool (`--flag` / `--no-flag`). A group may define
`check(self)` to validate its values (raising ConfigError); the composed class's `validate()` runs them.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import json
import math
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssmkit.errors import ConfigError

__all__ = ["ConfigError", "option", "compose", "given", "replace", "add_arguments", "build_config", "read_toml",
           "to_toml", "parse_kwargs", "RunOptions", "SeedOptions", "DeviceOptions", "TrainOptions", "EvalOptions",
           "WeightsOptions", "ModelOptions"]

_TYPES = (bool, int, float, str)


def option(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A configuration field: its default, the one-line help shown by `--help`, optional allowed values."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


# ----------------------------------------------------------------------------------------------
# the shared option groups


@dataclass
class RunOptions:
    """The run folder a command writes or reads."""

    title = "run"
    out_dir: str = option("", "run folder: config, weights, checkpoints, logs and outputs (empty: runs/<application>)")


@dataclass
class SeedOptions:
    """The seed of every random draw."""

    title = "seed"
    seed: int = option(0, "seed of model init, data order and every random draw")

    def check(self) -> None:
        if self.seed < 0:
            raise ConfigError(f"seed must not be negative, got {self.seed}")


@dataclass
class DeviceOptions:
    """Where and in which precision the runner trains or evaluates."""

    title = "device"
    device: str = option("auto", "where to run (auto: CUDA when available)", ("auto", "cpu", "cuda"))
    precision: str = option("auto", "autocast dtype (auto: bf16 on CUDA, fp32 on CPU)", ("auto", "bf16", "fp32"))
    num_workers: int = option(0, "DataLoader worker processes per process")

    def check(self) -> None:
        if self.num_workers < 0:
            raise ConfigError(f"num_workers must not be negative, got {self.num_workers}")


@dataclass
class ModelOptions:
    """Which registered model to build, at its published size unless --model-kwargs changes it."""

    title = "model"
    model: str = option("", "registered model name (ssmkit.list_models())")
    model_kwargs: str = option("", "constructor overrides, comma-separated key=value "
                                   "(e.g. d_model=64,n_layer=2; tuples as (2,2))")

    def check(self) -> None:
        parse_kwargs(self.model_kwargs, "model_kwargs")


@dataclass
class TrainOptions:
    """The optimisation: steps, batch, AdamW with warm-up + cosine, checkpoints and logs."""

    title = "training"
    steps: int = option(1000, "optimizer steps to train for")
    epochs: float = option(0.0, "if > 0: train for this many passes over the training set instead of --steps")
    batch_size: int = option(32, "samples per optimizer step, summed over all processes and accumulation steps")
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step (splits --batch-size)")
    lr: float = option(1e-3, "peak learning rate of AdamW")
    min_lr_ratio: float = option(0.1, "final learning rate of the cosine schedule, as a fraction of --lr")
    warmup_steps: int = option(100, "steps of linear learning-rate warm-up from 0")
    weight_decay: float = option(0.05, "AdamW weight decay (never on norms, biases or SSM parameters)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.999, "AdamW beta2")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")
    ema_decay: float = option(0.0, "keep an EMA of the weights with this decay, used for eval (0: off)")
    eval_every: int = option(0, "evaluate every N steps (0: only at the end)")
    checkpoint_every: int = option(500, "write a resumable checkpoint every N steps (and at the end)")
    keep_checkpoints: int = option(1, "how many of the newest resumable checkpoints to keep")
    best_metric: str = option("", "eval metric that selects best.safetensors (empty: the application's first)")
    log_every: int = option(20, "print and log the training metrics every N steps")
    resume: bool = option(False, "continue the run in --out-dir from its newest checkpoint (same options; "
                                    "--steps may grow to train further)")
    overwrite: bool = option(False, "replace the checkpoints and logs of a run already in --out-dir")

    def check(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("epochs", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip", "eval_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        if not (0 <= self.ema_decay < 1):
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other; pass one of them")


@dataclass
class EvalOptions:
    """How evaluation batches the eval set."""

    title = "evaluation"
    eval_batch_size: int = option(0, "samples per eval forward pass and process (0: the training micro-batch)")

    def check(self) -> None:
        if self.eval_batch_size < 0:
            raise ConfigError(f"eval_batch_size must not be negative, got {self.eval_batch_size}")


@dataclass
class WeightsOptions:
    """Which weights of the run folder a command uses."""

    title = "weights"
    weights: str = option("", "weights file (empty: the run's best.safetensors, else its model.safetensors)")


# ----------------------------------------------------------------------------------------------
# composition


def _fields(cls: type) -> list[tuple[dataclasses.Field, type]]:
    """The dataclass fields of `cls` with their resolved types; rejects unsupported types."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if kind not in _TYPES:
            raise TypeError(f"{cls.__name__}.{f.name}: config fields must be one of int, float, str, bool")
        out.append((f, kind))
    return out


def compose(name: str, *groups: type, defaults: dict[str, Any] | None = None, doc: str = "") -> type:
    """A configuration class with the fields of `groups`, in order, and `defaults` replacing field defaults.

    The class inherits from the groups (their properties and `check` methods apply), remembers which
    group each field belongs to (`--help` lists them by group), and its `validate()` runs every group's
    `check`."""
    owner: dict[str, type] = {}
    for group in groups:
        for f in dataclasses.fields(group):
            if f.name in owner:
                raise TypeError(f"{name}: option {f.name!r} is in both {owner[f.name].__name__} and {group.__name__}")
            owner[f.name] = group
    defaults = dict(defaults or {})
    unknown = sorted(set(defaults) - set(owner))
    if unknown:
        raise TypeError(f"{name}: defaults for options it does not have: {', '.join(unknown)}")
    hints = {k: v for g in groups for k, v in typing.get_type_hints(g).items()}
    changed = [(k, hints[k], dataclasses.field(default=v, metadata=next(
        f.metadata for f in dataclasses.fields(owner[k]) if f.name == k))) for k, v in defaults.items()]

    def validate(self) -> None:
        for group in groups:
            check = getattr(group, "check", None)
            if check is not None:
                check(self)

    cls = dataclasses.make_dataclass(name, changed, bases=tuple(reversed(groups)),
                                     namespace={"validate": validate, "__doc__": doc or groups[0].__doc__})
    cls.__option_groups__ = tuple((getattr(g, "title", g.__name__), tuple(f.name for f in dataclasses.fields(g)))
                                  for g in groups)
    return cls


def given(cfg: Any) -> frozenset[str]:
    """The options of `cfg` that were set by a flag or a TOML file (not left at their defaults)."""
    return getattr(cfg, "_given", frozenset())


def replace(cfg: Any, **changes: Any) -> Any:
    """`dataclasses.replace` that keeps the record of which options were given."""
    out = dataclasses.replace(cfg, **changes)
    object.__setattr__(out, "_given", given(cfg))
    return out


# ----------------------------------------------------------------------------------------------
# flags, TOML


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _help(f: dataclasses.Field) -> str:
    text = f.metadata.get("help", "")
    default = json.dumps(f.default) if isinstance(f.default, str) else f.default
    return f"{text} (default: {default})".replace("%", "%%")


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of `cls` to `parser` (one argument group per option group), plus
    `--config FILE.toml`. Flags default to `argparse.SUPPRESS`, so the parsed namespace holds only what
    was typed and `build_config` can layer it over the TOML file."""
    parser.add_argument("--config", metavar="FILE.toml", default=argparse.SUPPRESS,
                        help="read options from a TOML file of `name = value` lines; flags override it")
    fields = dict((f.name, (f, kind)) for f, kind in _fields(cls))
    for title, names in getattr(cls, "__option_groups__", ((getattr(cls, "title", ""), tuple(fields)),)):
        group = parser.add_argument_group(f"{title} options" if title else "options")
        for name in names:
            f, kind = fields[name]
            kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=_help(f))
            if kind is bool:
                group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
            else:
                choices = f.metadata.get("choices")
                group.add_argument(_flag(f.name), type=kind, choices=choices,
                                   metavar=None if choices else kind.__name__.upper(), **kwargs)


def _check_value(f: dataclasses.Field, kind: type, value: Any, where: str) -> Any:
    """`value` converted to `kind`, or a ConfigError naming the field and `where` it came from."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not kind:
        raise ConfigError(f"{where}: {f.name} must be {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{where}: {f.name} must be a finite number, got {value}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{where}: {f.name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def read_toml(path: str | Path, cls: type) -> dict[str, Any]:
    """The key/value pairs of TOML file `path`, checked against the fields of `cls`."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    fields = {f.name: (f, kind) for f, kind in _fields(cls)}
    values = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: unknown key {key!r}{hint}; run with --help to see the options")
        values[name] = _check_value(*fields[name], value, str(path))
    return values


def build_config(cls: type, args: argparse.Namespace | dict[str, Any] | None = None):
    """An instance of `cls`: defaults, then the TOML file named by `config`, then the other values;
    validated, and remembering which options were given (`given(cfg)`)."""
    values_in = dict(vars(args) if isinstance(args, argparse.Namespace) else (args or {}))
    names = {f.name: (f, kind) for f, kind in _fields(cls)}
    values = read_toml(values_in.pop("config"), cls) if "config" in values_in else {}
    for name, value in values_in.items():
        if name in names:
            values[name] = _check_value(*names[name], value, "option")
    cfg = cls(**values)
    object.__setattr__(cfg, "_given", frozenset(values))
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        validate()
    return cfg


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def to_toml(cfg: Any, exclude: tuple[str, ...] = ()) -> str:
    """`cfg` as TOML text that `--config` reads back to the same configuration (less `exclude`)."""
    return "".join(f"{f.name} = {_toml_value(getattr(cfg, f.name))}\n"
                   for f in dataclasses.fields(cfg) if f.name not in exclude)


# ----------------------------------------------------------------------------------------------
# key=value lists


def _split_top_level(text: str) -> list[str]:
    """Split at commas that are not inside brackets, parentheses or quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def parse_kwargs(text: str, what: str = "kwargs") -> dict[str, Any]:
    """`"a=1,b=0.5,c=true,d=name,e=(2,2)"` -> {"a": 1, "b": 0.5, "c": True, "d": "name", "e": (2, 2)}:
    Python literals (numbers, tuples, lists, quoted strings, True/False/None, also true/false); anything
    else is a plain string."""
    out = {}
    for item in _split_top_level(text):
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigError(f"{what}: {item!r} is not key=value")
        value = value.strip()
        lowered = {"true": "True", "false": "False", "none": "None"}.get(value.lower(), value)
        try:
            out[key.strip()] = ast.literal_eval(lowered)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out
