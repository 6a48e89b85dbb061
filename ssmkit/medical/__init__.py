"""Pathology: MambaMIL and its baselines over whole-slide-image patch features, slide tiling and
feature extraction (`wsi`), CLAM-style feature bags and patient-grouped splits (`data`), and
discrete-time survival (`survival`).

Registered models (`ssmkit.create_model(name, in_dim=..., n_classes=...)`): `mambamil`, `mambamil_2d`,
`abmil`, `transmil_lite`, `meanmil`, `maxmil`. Defaults are the published configurations: in_dim 1024
(CLAM's truncated ResNet-50 features), width 512, 2 classes.
"""
from ssmkit.medical import models  # noqa: F401  (registers the models)
from ssmkit.medical.baselines import ABMIL, InstancePoolMIL, TransMILLite
from ssmkit.medical.mambamil import MambaMIL, MambaMIL2D

__all__ = ["MambaMIL", "MambaMIL2D", "ABMIL", "InstancePoolMIL", "TransMILLite"]
