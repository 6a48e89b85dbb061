"""Registry entries of the pathology MIL models (published defaults; keyword overrides replace them)."""
from __future__ import annotations

from ssmkit.medical.baselines import ABMIL, InstancePoolMIL, TransMILLite
from ssmkit.medical.mambamil import MambaMIL, MambaMIL2D
from ssmkit.registry import register_model

MIL_MODELS = ("mambamil", "mambamil_2d", "abmil", "transmil_lite", "meanmil", "maxmil")


@register_model
def mambamil(**overrides) -> MambaMIL:
    """MambaMIL as trained by the reference scripts: 2 SR-Mamba layers of width 512, rate 5, reference init."""
    return MambaMIL(**{"in_dim": 1024, "n_classes": 2, "n_layers": 2, "mixer": "sr", "rate": 5, **overrides})


@register_model
def mambamil_2d(**overrides) -> MambaMIL2D:
    """MambaMIL with 2-D selective-scan blocks over the patch grid (needs the bags' coords)."""
    return MambaMIL2D(**{"in_dim": 1024, "n_classes": 2, "n_layers": 2, **overrides})


@register_model
def abmil(**overrides) -> ABMIL:
    """Gated-attention ABMIL, width 512, attention 128, dropout 0.25."""
    return ABMIL(**{"in_dim": 1024, "n_classes": 2, "gated": True, **overrides})


@register_model
def transmil_lite(**overrides) -> TransMILLite:
    """TransMIL layout with exact attention: 8 heads, width 512."""
    return TransMILLite(**{"in_dim": 1024, "n_classes": 2, **overrides})


@register_model
def meanmil(**overrides) -> InstancePoolMIL:
    """Mean of instance logits."""
    return InstancePoolMIL(**{"in_dim": 1024, "n_classes": 2, "pool": "mean", **overrides})


@register_model
def maxmil(**overrides) -> InstancePoolMIL:
    """Max of instance logits."""
    return InstancePoolMIL(**{"in_dim": 1024, "n_classes": 2, "pool": "max", **overrides})
