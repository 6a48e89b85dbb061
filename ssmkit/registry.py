"""The model registry: every domain registers its published configurations here by name.

`create_model(name, **overrides)` builds a registered model; `list_models(pattern)` lists names.
The core and the domains register with `@register_model` when imported; the registry imports them on
first use, so `ssmkit.create_model("vim_tiny")` works without importing `ssmkit.vision` by hand.
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
from typing import Callable

import torch.nn as nn

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
