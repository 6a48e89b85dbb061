"""Triton 2-D selective scan vs the chunked PyTorch path of ssmkit.core.scan2d (itself tested against a
closed-form oracle in tests/core/test_scan2d.py), forward and backward.

Without a GPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py) on tiny
grids, with bands of K = ceil(sqrt(H)) rows so that band boundaries are crossed; with a GPU the `gpu` tests
add Vim-sized shapes.
"""
from __future__ import annotations

import pytest
import torch

from ssmkit.core.scan2d import selective_scan_2d
from ssmkit.kernels import triton_available

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")

if not triton_available(DEV):
    pytest.skip("triton kernels unavailable here (no CUDA device and TRITON_INTERPRET unset)",
                allow_module_level=True)


def make_inputs(batch, dim, H, W, N, groups, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    ins = dict(u=r(batch, dim, H, W), delta=r(batch, dim, H, W) * 0.5, A=-torch.rand(dim, N, generator=g) - 0.1,
               B=r(batch, groups, N, H, W), C=r(batch, groups, N, H, W), D=r(dim), delta_bias=r(dim) * 0.3)
    return {k: v.to(DEV).requires_grad_() for k, v in ins.items()}


def both(ins, directions):
    """Outputs and input gradients of the triton and chunked backends on the same random weighting."""
    out = {}
    for backend in ("triton", "chunked"):
        y = selective_scan_2d(**ins, delta_softplus=True, directions=directions, backend=backend)
        w = torch.sin(torch.arange(y.numel(), device=y.device, dtype=y.dtype)).view_as(y)
        out[backend] = (y, torch.autograd.grad((y * w).sum(), list(ins.values())))
    return out


@pytest.mark.parametrize("shape, directions", [
    ((1, 2, 5, 3, 3, 1), ("tl", "br")),     # H = 5: bands of 3 rows, the last one short
    ((2, 4, 4, 5, 4, 2), ("tr", "bl")),     # groups of 2 channels: dB, dC summed over a group
    ((1, 2, 1, 6, 2, 1), ("tl",)),          # one row: the row pass alone
    ((1, 2, 6, 1, 2, 2), ("br",)),          # one column: the column pass alone
])
def test_matches_chunked_forward_and_backward(shape, directions):
    ins = make_inputs(*shape)
    out = both(ins, directions)
    (y, grads), (y_ref, grads_ref) = out["triton"], out["chunked"]
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for name, g, g_ref in zip(ins, grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad of {name}: {m}")


def test_saves_no_full_state_for_backward():
    """Memory: nothing of the size batch·dim·d_state·H·W is kept for backward (the chunked path keeps several)."""
    batch, dim, H, W, N = 1, 2, 9, 4, 4
    ins = make_inputs(batch, dim, H, W, N, 1)
    full = batch * dim * N * H * W
    for backend, expect_full in (("triton", False), ("chunked", True)):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            selective_scan_2d(**ins, delta_softplus=True, backend=backend)
        assert (max(sizes) >= full) == expect_full, (backend, max(sizes), full)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_issue_size(dtype):
    ins = {k: v.detach().to(dtype if k in ("u", "delta", "B", "C") else torch.float32).requires_grad_()
           for k, v in make_inputs(8, 192, 56, 56, 16, 1).items()}
    out = both(ins, ("tl", "tr", "bl", "br"))
    (y, grads), (y_ref, grads_ref) = out["triton"], out["chunked"]
    tol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(y.float(), y_ref.float(), **tol)
    for g, g_ref in zip(grads, grads_ref):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.float(), g_ref.float(), rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)
