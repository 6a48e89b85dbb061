"""Small helpers every layer uses: seeds derived from several integers, shape errors that name the
argument, the shape it has and the shape it should have, and the dtype the scans accumulate in."""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["derive_seed", "shape_error", "compute_dtype"]


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers (e.g. seed, epoch, index): unlike seed + epoch,
    different tuples never collide in practice."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def shape_error(op: str, name: str, got, expected: str) -> ValueError:
    """`ValueError("<op>: <name> has shape (..); expected <expected>")`; `got` is a tensor or a shape."""
    got = tuple(got.shape) if hasattr(got, "shape") else got
    return ValueError(f"{op}: {name} has shape {got}; expected {expected}")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype scans and convolutions accumulate in: fp64 when any input is fp64, else fp32 (so half
    and bfloat16 inputs never accumulate in their own precision)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
