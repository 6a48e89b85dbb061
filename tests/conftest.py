"""Triton kernels run in Triton's CPU interpreter in this test session when no CUDA device is present.

TRITON_INTERPRET must be set before the @triton.jit kernels are defined (i.e. before
ssmkit.kernels.selective_scan is imported), so it is set here, at collection time. It only changes how
@triton.jit functions execute; code that never launches a Triton kernel is unaffected. With a CUDA
device the variable is left alone and the same tests run the compiled kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
