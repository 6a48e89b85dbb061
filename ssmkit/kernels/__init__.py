"""Fast implementations of the ops defined in `ssmkit.core` (Triton for GPUs, compiled C for CPUs; same
signatures, same results within tolerance). `ssmkit.core` picks a backend at call time; nothing above
`core` imports this package.

Importing this package is cheap: Triton itself is only imported by the kernel modules.
"""
from __future__ import annotations

import importlib.util
import os

__all__ = ["triton_available", "interpreting", "deterministic", "as_time_invariant"]

# looked up once (cheap: finds the package without importing it); also keeps importlib out of
# torch.compile traces of code that asks for the backend
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, used by the tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available(device) -> bool:
    """True when the Triton kernels can run on `device`: triton imports and the device is CUDA, or
    TRITON_INTERPRET=1 is set (then CPU tensors run in Triton's interpreter, for testing)."""
    if not _HAS_TRITON:
        return False
    dtype = getattr(device, "type", None) or str(device).split(":")[0]
    if dtype == "cuda":
        return True
    return dtype == "cpu" and interpreting()


def deterministic() -> bool:
    """Deterministic mode: SSMKIT_DETERMINISTIC=1 or torch.are_deterministic_algorithms_enabled().
    The kernels then avoid atomics (bitwise-equal gradients run to run)."""
    if os.environ.get("SSMKIT_DETERMINISTIC", "0") not in ("", "0"):
        return True
    import torch

    return torch.are_deterministic_algorithms_enabled()


def as_time_invariant(X, dim: int, N: int):
    """A (batch, dim, N, L) stride-0 expansion of a (dim, N) tensor (how core passes time-invariant
    B/C) -> that (dim, N) tensor, so the kernels read it once and autograd reaches it directly;
    anything else is returned as it is."""
    if (X.dim() == 4 and X.shape[1] == dim and (X.stride(0) == 0 or X.shape[0] == 1)
            and (X.stride(3) == 0 or X.shape[3] == 1)):
        base = X._base
        if (base is not None and base.dim() == 2 and tuple(base.shape) == (dim, N)
                and base.data_ptr() == X.data_ptr() and base.stride() == (X.stride(1), X.stride(2))):
            return base
    return X
