"""The model registry: every domain registers its published configurations here by name.

`create_model(name, **overrides)` builds a registered model; `list_models(pattern)` lists names.
The core and the domains register with `@register_model` when imported; the registry imports them on
first use, so `ssmkit.create_model("vim_tiny")` works without importing `ssmkit.vision` by hand.

Official checkpoints: a family registers its converter with `register_official`, and
`load_official(name_or_model, path, **options)` is the one entry point for every family. The file is
read by `ssmkit.checkpoints.read_state_dict`; the family's `convert(state_dict, config)` maps the
official keys and tensors onto the ssmkit state dict of the model's configuration; the model then
loads it strictly, and every problem is a one-line `CheckpointError` naming the file.
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ssmkit.checkpoints import read_state_dict
from ssmkit.errors import CheckpointError, ConfigError

_DOMAINS = ("ssmkit.core", "ssmkit.vision", "ssmkit.audio", "ssmkit.genomics", "ssmkit.medical")
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_domains_loaded = False


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None):
    """Decorator: register `fn(**overrides) -> nn.Module` under `name` (default: the function's name)."""

    def wrap(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        if key in _REGISTRY and _REGISTRY[key] is not f:
            raise ValueError(f"model name {key!r} is already registered by {_REGISTRY[key].__module__}")
        _REGISTRY[key] = f
        return f

    return wrap(fn) if fn is not None else wrap


def _load_domains() -> None:
    global _domains_loaded
    if not _domains_loaded:
        for module in _DOMAINS:
            importlib.import_module(module)
        _domains_loaded = True


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of registered models matching a shell-style `pattern`."""
    _load_domains()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **overrides) -> nn.Module:
    """Build the registered model `name`; keyword `overrides` replace configuration fields."""
    _load_domains()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=4)
        hint = f" Similar: {', '.join(close)}." if close else ""
        raise KeyError(f"unknown model {name!r}.{hint} See ssmkit.list_models().")
    return _REGISTRY[name](**overrides)


# ----------------------------------------------------------------------------------------------------
# Official checkpoints


@dataclass(frozen=True)
class OfficialFormat:
    """How the official checkpoints of one model family become ssmkit weights (see `register_official`)."""

    family: str
    model_types: tuple[type, ...]
    convert: Callable[..., dict[str, torch.Tensor]]
    config_of: Callable[[nn.Module], Any]
    build: Callable[..., nn.Module] | None
    convert_options: tuple[str, ...]
    head: str | None


_OFFICIAL: dict[str, OfficialFormat] = {}


def _config_attribute(model: nn.Module) -> Any:
    return model.config


def register_official(family: str, model_types: type | tuple[type, ...],
                      convert: Callable[..., dict[str, torch.Tensor]], *,
                      config_of: Callable[[nn.Module], Any] = _config_attribute,
                      build: Callable[..., nn.Module] | None = None, convert_options: tuple[str, ...] = (),
                      head: str | None = None) -> None:
    """Register the official checkpoints of `family` (its registered models are named `<family>_...`).

    convert(state_dict, config, **convert_options) -> ssmkit state dict, for models of `model_types`
    whose configuration `config_of(model)` gives (default: `model.config`). build(state_dict, name,
    **options) -> the model to load, for a registered `name` or, with name None, for the family itself
    with the sizes the checkpoint carries; without it, names build with `create_model` and the family
    name alone is refused. head: the prefix of a classifier head that the model keeps as initialised
    when the checkpoint has none of its size (a new set of classes).
    """
    if family in _OFFICIAL:
        raise ValueError(f"official checkpoints of {family!r} are already registered by "
                         f"{_OFFICIAL[family].convert.__module__}")
    types_ = model_types if isinstance(model_types, tuple) else (model_types,)
    _OFFICIAL[family] = OfficialFormat(family, types_, convert, config_of, build, tuple(convert_options), head)


def _format_of_name(name: str) -> OfficialFormat:
    for fmt in _OFFICIAL.values():
        if name == fmt.family or name.startswith(fmt.family + "_"):
            return fmt
    raise KeyError(f"no official checkpoint format for {name!r}; give a family ({', '.join(sorted(_OFFICIAL))}) "
                   f"or one of its registered models")


def _format_of_model(model: nn.Module) -> OfficialFormat:
    for fmt in _OFFICIAL.values():
        if isinstance(model, fmt.model_types):
            return fmt
    raise TypeError(f"no official checkpoint format converts for a {type(model).__name__}; families: "
                    f"{', '.join(sorted(_OFFICIAL))}")


def _build_for(fmt: OfficialFormat, state: dict[str, torch.Tensor], name: str, options: dict) -> nn.Module:
    if fmt.build is not None:
        return fmt.build(state, None if name == fmt.family else name, **options)
    if name == fmt.family and name not in _REGISTRY:
        raise ConfigError(f"official {fmt.family} checkpoints do not carry their sizes: give a model name "
                          f"({', '.join(list_models(fmt.family + '_*'))})")
    return create_model(name, **options)


def _listed(label: str, items: list[str], limit: int = 6) -> str:
    return f"{label}: {', '.join(items[:limit])}{' ...' if len(items) > limit else ''}" if items else ""


def _shapes(state: dict[str, torch.Tensor], keys: list[str]) -> str:
    return ", ".join(f"{k} {tuple(state[k].shape)}" for k in keys)


def _keep_own_head(state: dict, expected: dict, head: str, described: str) -> str:
    """Replace a head under `head` that does not fit the model (or is absent) by the model's own; returns
    the checkpoint's head that goes unused, in words ("" when none does)."""
    ours = sorted(k for k in expected if k.startswith(head))
    theirs = sorted(k for k in state if k.startswith(head))
    if ours == theirs and all(state[k].shape == expected[k].shape for k in ours):
        return ""
    if not theirs:  # a backbone checkpoint: the new head is what the caller asked for
        message = ""
    elif not ours:
        message = f"{described} has no {head}*; the checkpoint's ({_shapes(state, theirs)}) are not used"
    else:
        message = (f"the checkpoint's {_shapes(state, theirs)} do not fit {described} ({_shapes(expected, ours)}); "
                   f"it keeps its own, as initialised")
    for key in theirs:
        del state[key]
    state.update({key: expected[key] for key in ours})
    return message


def _load_strictly(model: nn.Module, state: dict[str, torch.Tensor], source: str, described: str,
                   head: str | None) -> None:
    """Load `state` into `model` with every key and shape checked. Tied parameters (one tensor under several
    names) need one of their names in `state`; a head under the prefix `head` may be the model's own."""
    expected = model.state_dict()
    state = dict(state)
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    for names in names_of.values():
        given = [n for n in names if n in state]
        if given:
            for name in names:
                state.setdefault(name, state[given[0]])
    unused_head = _keep_own_head(state, expected, head, described) if head else ""
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                  for k in sorted(expected.keys() & state.keys()) if state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        parts = (_listed("missing keys", missing), _listed("unexpected keys", unexpected),
                 _listed("shape mismatches (checkpoint vs model)", mismatched, 4))
        raise CheckpointError(f"{source}: does not fit {described}: {'; '.join(p for p in parts if p)}")
    model.load_state_dict(state)
    if unused_head:
        warnings.warn(f"{source}: {unused_head}", stacklevel=3)


def load_official(name_or_model: str | nn.Module, path: str | Path, *, weights_key: str | None = None,
                  **options) -> nn.Module:
    """A model holding the official checkpoint at `path` (a file, or a folder with one of
    `ssmkit.checkpoints.WEIGHT_FILES`), read without running code from the file.

    name_or_model: a model (converted for its configuration, loaded in place and returned); a registered
    name (`vim_tiny`, `mair_sr_x2`, `hyenadna_tiny_1k`, `sashimi_sc09`, ...: built with `options`, then
    loaded); or a family whose checkpoints carry their sizes (`hyenadna`, `sashimi`). options: the family
    converter's (SaShiMi: `dt_transform`) and, when the model is built here, the model's. weights_key: the
    entry of a container checkpoint to take (e.g. "params_ema", "model_ema"). Every key and shape must fit,
    except a classifier head (Vim, HyenaDNA) that the checkpoint lacks or has in another size: the model
    keeps its own, as initialised (with a warning when the checkpoint's head goes unused).
    A model built here is in train mode, as `create_model` builds it; call `.eval()` for inference.
    """
    _load_domains()
    built_here = not isinstance(name_or_model, nn.Module)
    fmt = _format_of_name(name_or_model) if built_here else _format_of_model(name_or_model)
    convert_options = {key: options.pop(key) for key in fmt.convert_options if key in options}
    if options and not built_here:
        raise TypeError(f"load_official: {', '.join(sorted(options))} only apply when it builds the model, "
                        f"not to a given {type(name_or_model).__name__}")
    state = read_state_dict(path, weights_key)
    try:
        model = _build_for(fmt, state, name_or_model, options) if built_here else name_or_model
        converted = fmt.convert(state, fmt.config_of(model), **convert_options)
    except CheckpointError as error:  # the converters say what is wrong; the file is named here
        raise CheckpointError(f"{path}: {error}") from None
    if not built_here:
        described = f"this {type(model).__name__}"
    elif options:
        described = f"{name_or_model} ({', '.join(f'{k}={v!r}' for k, v in options.items())})"
    else:
        described = name_or_model
    _load_strictly(model, converted, str(path), described, fmt.head)
    return model
