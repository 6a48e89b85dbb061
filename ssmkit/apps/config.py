"""Configuration declared once per application, as a dataclass, and read from flags and TOML files.

Every field of an application's configuration dataclass becomes a command-line flag (`batch_size` ->
`--batch-size`) whose help text comes from the field's metadata and shows its default, and a key of
`--config file.toml`. Values are resolved as: dataclass default < TOML file < command-line flag.
Supported field types: `int`, `float`, `str` and `bool` (a bool gives `--flag` / `--no-flag`).

    @dataclass
    class SeqConfig(TrainConfig):
        seq_len: int = option(64, "length of the context the data tokens are scattered in")
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["ConfigError", "option", "TrainConfig", "add_arguments", "build_config", "to_toml"]

_TYPES = (bool, int, float, str)


class ConfigError(ValueError):
    """A configuration that cannot be used: unknown TOML key, wrong value type or out-of-range value."""


def option(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A configuration field: its default, the one-line help shown by `--help`, optional allowed values."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    """Training hyper-parameters shared by every application (an application's config inherits them)."""

    out_dir: str = option("", "run folder for checkpoints, logs and plots (empty: runs/<application>)")
    seed: int = option(0, "seed of model init, data order and every random draw")
    steps: int = option(1000, "optimizer steps to train for")
    epochs: float = option(0.0, "if > 0: train for this many passes over the training set instead of --steps")
    batch_size: int = option(32, "samples per optimizer step, summed over all processes and accumulation steps")
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step (splits --batch-size)")
    lr: float = option(1e-3, "peak learning rate of AdamW")
    min_lr_ratio: float = option(0.1, "final learning rate of the cosine schedule, as a fraction of --lr")
    warmup_steps: int = option(100, "steps of linear learning-rate warm-up from 0")
    weight_decay: float = option(0.05, "AdamW weight decay (never on norms, biases, A_log, D)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.999, "AdamW beta2")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")
    ema_decay: float = option(0.0, "keep an EMA of the weights with this decay, used for eval (0: off)")
    eval_every: int = option(0, "evaluate every N steps (0: only at the end)")
    eval_batch_size: int = option(0, "samples per eval forward pass and process (0: the training micro-batch)")
    checkpoint_every: int = option(500, "write a resumable checkpoint every N steps (and at the end)")
    keep_checkpoints: int = option(1, "how many of the newest resumable checkpoints to keep")
    best_metric: str = option("", "eval metric that selects best.safetensors (empty: the application's first)")
    log_every: int = option(20, "print and log the training metrics every N steps")
    num_workers: int = option(0, "DataLoader worker processes per training process")
    device: str = option("auto", "where to train (auto: CUDA when available)", ("auto", "cpu", "cuda"))
    precision: str = option("auto", "autocast dtype (auto: bf16 on CUDA, fp32 on CPU)", ("auto", "bf16", "fp32"))
    resume: bool = option(False, "continue the run in --out-dir from its newest checkpoint")
    overwrite: bool = option(False, "replace the checkpoints and logs of a run already in --out-dir")

    def validate(self) -> None:
        """Raise ConfigError for values no run can use (subclasses extend it and call super)."""
        if self.seed < 0:
            raise ConfigError(f"seed must not be negative, got {self.seed}")
        positive = ("steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("epochs", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip",
                     "eval_every", "eval_batch_size", "num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        if not (0 <= self.ema_decay < 1):
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other; pass one of them")


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


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _help(f: dataclasses.Field) -> str:
    text = f.metadata.get("help", "")
    default = json.dumps(f.default) if isinstance(f.default, str) else f.default
    return f"{text} (default: {default})".replace("%", "%%")


def add_arguments(parser: argparse.ArgumentParser, cls: type, title: str = "options") -> None:
    """Add one flag per field of dataclass `cls` to `parser`, plus `--config FILE.toml`.

    Fields inherited from `TrainConfig` are listed under "training options", the others under
    `title`. Flags default to `argparse.SUPPRESS`, so the parsed namespace holds only what
    was typed and `build_config` can layer it over the TOML file.
    """
    parser.add_argument("--config", metavar="FILE.toml", default=argparse.SUPPRESS,
                        help="read options from a TOML file of `name = value` lines; flags override it")
    shared = {f.name for f in dataclasses.fields(TrainConfig)} if issubclass(cls, TrainConfig) else set()
    own = parser.add_argument_group(title)
    train = parser.add_argument_group("training options") if shared else own
    for f, kind in _fields(cls):
        group = train if f.name in shared else own
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
    """An instance of `cls`: defaults, then the TOML file named by `config`, then the other values."""
    given = dict(vars(args) if isinstance(args, argparse.Namespace) else (args or {}))
    names = {f.name: (f, kind) for f, kind in _fields(cls)}
    values = read_toml(given.pop("config"), cls) if "config" in given else {}
    for name, value in given.items():
        if name in names:
            values[name] = _check_value(*names[name], value, "option")
    cfg = cls(**values)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        validate()
    return cfg


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def to_toml(cfg: Any, exclude: tuple[str, ...] = ()) -> str:
    """`cfg` as TOML text that `--config` reads back to the same configuration (less `exclude`)."""
    return "".join(f"{f.name} = {_toml_value(getattr(cfg, f.name))}\n"
                   for f in dataclasses.fields(cfg) if f.name not in exclude)
