"""The vision classifiers in timm: one registration path for every family.

`register_timm_family(configs, build, ...)` adds a timm entry point `ssmkit_<name>` for each published
configuration, built by the family's own `build(name, overrides)` through timm's `build_model_with_cfg`
(so `pretrained`, `pretrained_cfg_overlay=dict(file=...)`, `features_only` and `out_indices` behave as
for timm's own models), with a `pretrained_cfg` that carries no weights (nothing is downloaded).
"""
from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models import register_model as timm_register_model

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "timm_cfg", "default_cfg_for", "register_timm_family"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# timm looks up `default_cfgs` in the module of each entry point while registering it
default_cfgs: dict[str, Any] = {}


def timm_cfg(*, first_conv: str, paper_ids: str, num_classes: int = 1000, input_size=(3, 224, 224),
             crop_pct: float = 0.875) -> dict[str, Any]:
    """A timm `pretrained_cfg` dict without weights (url and file empty); the defaults describe the
    ImageNet configurations."""
    return {
        "url": "",
        "num_classes": num_classes,
        "input_size": tuple(input_size),
        "pool_size": None,
        "crop_pct": crop_pct,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "first_conv": first_conv,
        "classifier": "head",
        "license": "apache-2.0",
        "paper_ids": paper_ids,
    }


def default_cfg_for(model: nn.Module, *, paper_ids: str) -> dict[str, Any]:
    """The timm `pretrained_cfg` describing `model` as built (its classes, channels and image size)."""
    return timm_cfg(first_conv=model.first_conv, paper_ids=paper_ids, num_classes=model.num_classes,
                    input_size=(model.in_chans, *model.img_size))


def register_timm_family(configs, build: Callable[[str, dict], nn.Module], *, first_conv: str, paper_ids: str,
                         pretrained_filter_fn: Callable | None = None) -> None:
    """Register `ssmkit_<name>` in timm for every name of `configs`; `build(name, overrides)` makes the
    model and `pretrained_filter_fn(state_dict, model)` converts a weights file given to timm."""
    default_cfgs.update(generate_default_cfgs(
        {f"ssmkit_{name}": timm_cfg(first_conv=first_conv, paper_ids=paper_ids) for name in configs}))
    for name in configs:
        def entry(pretrained: bool = False, *, _name: str = name, **kwargs) -> nn.Module:
            out_indices = kwargs.pop("out_indices", 3)
            return build_model_with_cfg(lambda **kw: build(_name, kw), f"ssmkit_{_name}", pretrained,
                                        pretrained_filter_fn=pretrained_filter_fn,
                                        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)

        entry.__name__ = entry.__qualname__ = f"ssmkit_{name}"
        entry.__doc__ = f"timm entry point of ssmkit's `{name}` (see ssmkit.create_model)."
        timm_register_model(entry)
