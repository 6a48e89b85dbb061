"""Small helpers every layer uses: seeds derived from several integers, and shape errors that name the
argument, the shape it has and the shape it should have."""
from __future__ import annotations

import numpy as np

__all__ = ["derive_seed", "shape_error"]


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers (e.g. seed, epoch, index): unlike seed + epoch,
    different tuples never collide in practice."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def shape_error(op: str, name: str, got, expected: str) -> ValueError:
    """`ValueError("<op>: <name> has shape (..); expected <expected>")`; `got` is a tensor or a shape."""
    got = tuple(got.shape) if hasattr(got, "shape") else got
    return ValueError(f"{op}: {name} has shape {got}; expected {expected}")
