"""The contract every application implements, and how commands load a trained run.

An `Application` is stateless: what one run learns from its data lives in that run's `RunSpec.meta`
and reaches every hook through a `RunContext`, never through the application object.

    setup(cfg) -> RunSpec(train, eval, meta)    datasets, and what the model needs to know of the data
    build_model(ctx) -> nn.Module               ctx = RunContext(cfg, meta)
    train_loss(model, batch, ctx) -> loss       the mean loss of one micro-batch
    eval_step(model, batch, ctx) -> outputs     per-sample outputs, the batch as the first dimension
    compute_metrics(outputs, ctx) -> metrics    over the whole eval set
    prepare(cfg)                                 data written once, on rank 0 only (synthetic bags, ...)

`commands()` lists the `ssmkit <application> <command>` subcommands, each a configuration class and a
function of it.

The runner writes `meta` beside config.toml (run.json); `load_run` rebuilds any trained run from its
folder with its own configuration, metadata and best-or-final weights, so eval, predict, embed,
generate and every other command on a run use what that run used unless told otherwise.
"""
from __future__ import annotations

import dataclasses
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils.data import Dataset, default_collate

from ssmkit.apps.config import DeviceOptions, EvalOptions, RunOptions, WeightsOptions, compose, given, parse_kwargs
from ssmkit.apps.run_folder import RunFolder, load_weights
from ssmkit.errors import ConfigError, RunError

__all__ = ["Application", "Command", "RunSpec", "RunContext", "LoadedRun", "load_run", "eval_config",
           "build_registered"]


@dataclass
class RunSpec:
    """What `Application.setup` returns for one configuration."""

    train: Dataset | None
    eval: Dataset | None
    meta: dict[str, Any]  # JSON-serialisable: classes, feature widths, baselines ... (written to run.json)
    eval_data: str = ""   # the eval set in words, for the messages of eval commands


@dataclass(frozen=True)
class RunContext:
    """The configuration and metadata of one run, handed to every hook."""

    cfg: Any
    meta: dict[str, Any]


@dataclass
class Command:
    """One `ssmkit <application> <name>` subcommand: flags come from `config`, then `run(cfg)` runs."""

    name: str
    help: str
    config: type
    run: Callable[[Any], Any]


class Application(ABC):
    """What a domain implements to train, evaluate and demo a model with the shared runner.

    Class attributes:
        name             the CLI subcommand and the default run folder runs/<name>
        help             one line for `ssmkit --help`
        train_config     the configuration class of `train` (composed of option groups)
        data_groups      the option groups a command on a trained run may override to score other data
        metrics          eval metric name -> "max" or "min"; the first selects best.safetensors
        meta_must_match  keys of `RunSpec.meta` that other data must share with the trained run (classes...)
    """

    name: str = ""
    help: str = ""
    train_config: type
    data_groups: tuple[type, ...] = ()
    metrics: dict[str, str] = {}
    meta_must_match: tuple[str, ...] = ()

    def prepare(self, cfg) -> None:
        """Write data that the run needs once (rank 0 only, before `setup` on every rank)."""

    @abstractmethod
    def setup(self, cfg) -> RunSpec:
        """The datasets and metadata of configuration `cfg`. A dataset with `set_epoch(epoch)` is told each
        epoch before it is read (to draw fresh random samples reproducibly)."""

    @abstractmethod
    def build_model(self, ctx: RunContext) -> nn.Module:
        """The model, on CPU in fp32 (the runner moves it and picks the precision)."""

    @abstractmethod
    def train_loss(self, model: nn.Module, batch, ctx: RunContext) -> torch.Tensor:
        """The scalar loss of one batch. `model` may be wrapped in DistributedDataParallel: call it, do not
        reach into its attributes."""

    @abstractmethod
    def eval_step(self, model: nn.Module, batch, ctx: RunContext) -> dict[str, torch.Tensor]:
        """Per-sample outputs of one eval batch: each value has the batch as its first dimension."""

    def compute_metrics(self, outputs: dict[str, torch.Tensor], ctx: RunContext) -> dict[str, float]:
        """Metrics of the whole eval set from the concatenated `eval_step` outputs (in dataset order); the
        default is the mean of every output."""
        return {key: value.double().mean().item() for key, value in outputs.items()}

    def collate(self, samples: list) -> Any:
        """Make a batch of a list of dataset items."""
        return default_collate(samples)

    def commands(self) -> list[Command]:
        """The subcommands: most applications start from `ssmkit.apps.runner.train_and_eval(self)` (train
        and eval through the runner) and add their own."""
        return []

    def demo(self, out_dir: Path, smoke: bool):
        """Train and show this application on its embedded data for `ssmkit demo`, writing its runs under
        `out_dir / self.name`; `smoke` asks for a seconds-long version (the test suite runs it). Returns a
        `ReportSection`, or None when the application has no demo."""
        return None


_EVAL_CONFIGS: dict[str, type] = {}


def eval_config(app: Application) -> type:
    """The configuration of `<app> eval`: the run folder, the weights, batching, and the app's data groups."""
    if app.name not in _EVAL_CONFIGS:
        _EVAL_CONFIGS[app.name] = compose(f"{type(app).__name__}Eval", RunOptions, WeightsOptions, *app.data_groups,
                                          EvalOptions, DeviceOptions, doc=f"`ssmkit {app.name} eval`")
    return _EVAL_CONFIGS[app.name]


# ----------------------------------------------------------------------------------------------
# loading a trained run


@dataclass
class LoadedRun:
    """A trained run rebuilt from its folder."""

    folder: RunFolder
    cfg: Any               # its training configuration, with the options given to this command applied
    meta: dict[str, Any]   # what it learned from its training data
    model: nn.Module       # in eval mode on CPU, with `weights` loaded
    weights: Path
    step: int

    @property
    def ctx(self) -> RunContext:
        return RunContext(self.cfg, self.meta)


def run_config(app: Application, command_cfg) -> tuple[RunFolder, Any]:
    """The run folder of `command_cfg` and its training configuration, updated with the options this
    command was given that the training configuration also has (its data options, batching, device)."""
    folder = RunFolder.of(command_cfg, app.name)
    values = folder.read_config(app.train_config)
    names = {f.name for f in dataclasses.fields(app.train_config)}
    values.update({k: getattr(command_cfg, k) for k in given(command_cfg) if k in names and k != "out_dir"})
    cfg = app.train_config(**values)
    cfg.validate()
    return folder, cfg


def load_run(app: Application, command_cfg) -> LoadedRun:
    """The trained run in `command_cfg.out_dir`, with its configuration, metadata and weights (`--weights`
    when given, else best.safetensors, else model.safetensors)."""
    folder, cfg = run_config(app, command_cfg)
    meta = folder.read_meta()
    if meta is None:  # written before run.json existed: recompute it from the training data
        saved = app.train_config(**folder.read_config(app.train_config))
        meta = app.setup(saved).meta
        print(f"note: {folder} has no run.json (an older ssmkit run); its metadata was recomputed from its "
              f"training data", file=sys.stderr)
    model = app.build_model(RunContext(cfg, meta))
    path = folder.trained_weights(getattr(command_cfg, "weights", ""))
    info = load_weights(model, path)
    return LoadedRun(folder, cfg, meta, model.eval(), path, int(info.get("step", 0)))


def check_same_data(app: Application, run: LoadedRun, spec: RunSpec) -> None:
    """Refuse data whose classes (or other label metadata) differ from the trained run's."""
    for key in app.meta_must_match:
        if key in spec.meta and spec.meta[key] != run.meta.get(key):
            raise RunError(f"the data given here have {key} {spec.meta[key]!r}, the run in {run.folder} was trained "
                           f"with {run.meta.get(key)!r}")


def build_registered(cfg, official_weights: str = "", **from_data) -> nn.Module:
    """The registered model `cfg.model` at its published size, with `--model-kwargs` overrides and the
    arguments the application takes from the data (`from_data`: classes, input width, ...); holding the
    official checkpoint `official_weights` when given (`ssmkit.load_official`)."""
    from ssmkit.registry import create_model, load_official

    kwargs = parse_kwargs(cfg.model_kwargs, "model_kwargs")
    clash = sorted(set(kwargs) & set(from_data))
    if clash:
        raise ConfigError(f"--model-kwargs sets {', '.join(clash)}, which {cfg.model} takes from the data")
    try:
        if official_weights:
            return load_official(cfg.model, official_weights, **from_data, **kwargs)
        return create_model(cfg.model, **from_data, **kwargs)
    except KeyError as e:
        raise ConfigError(f"--model: {e.args[0]}") from None
    except TypeError as e:
        raise ConfigError(f"--model {cfg.model} --model-kwargs {cfg.model_kwargs!r}: {e}") from None
