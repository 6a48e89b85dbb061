"""Triton kernels run in Triton's CPU interpreter in this test session when no CUDA device is present.

TRITON_INTERPRET must be set before the @triton.jit kernels are defined (i.e. before
ssmkit.kernels.selective_scan is imported), so it is set here, at collection time. It only changes how
@triton.jit functions execute; code that never launches a Triton kernel is unaffected. With a CUDA
device the variable is left alone and the same tests run the compiled kernels.

Tests marked `gpu` are skipped with the reason "needs a CUDA device" when there is none; on a GPU
machine `make test-gpu` (pytest -m gpu) runs exactly them.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
