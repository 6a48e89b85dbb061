"""The compiled CPU kernels ("cpu" backend): what the shared scan tests in tests/core/test_scan.py do not
cover — the layouts models pass, thread-count independence, the custom-op contract, the default
choice, and the fallback when no compiler is there. Their math is checked against the fp64 loop over
the whole option matrix in tests/core/test_scan.py (CPU_BACKENDS includes "cpu")."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ssmkit.core.scan import _pick_backend, selective_scan, selective_state_update
from ssmkit.kernels import cpu

f64 = torch.float64


def _mamba_like_inputs(batch=2, dim=32, L=150, N=16, dtype=torch.float32, seed=0):
    """The views `Mamba` passes: x and z halves of one channel-last projection (non-dense), delta
    channel-last, B and C slices of one (batch, L, 2N) projection (unit state stride)."""
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(batch, L, 2 * dim, generator=g, dtype=dtype)
    xz = proj.transpose(1, 2)
    u, z = xz[:, :dim], xz[:, dim:]
    delta = (0.3 * torch.rand(batch, L, dim, generator=g, dtype=dtype) - 0.1).transpose(1, 2)
    bc = torch.randn(batch, L, 2 * N, generator=g, dtype=dtype).transpose(1, 2)
    B, C = bc[:, :N], bc[:, N:]
    A = -(0.5 + torch.rand(dim, N, generator=g, dtype=dtype))
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=torch.randn(dim, generator=g, dtype=dtype), z=z,
                delta_bias=0.2 * torch.randn(dim, generator=g, dtype=dtype),
                initial_state=torch.randn(batch, dim, N, generator=g, dtype=dtype))


def _run(x, backend, reverse=False):
    """Outputs and all gradients; each leaf keeps the strides of its input (clone() would not)."""
    leaves = {k: torch.empty_strided(v.shape, v.stride(), dtype=v.dtype).copy_(v).requires_grad_()
              for k, v in x.items()}
    y, last = selective_scan(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], leaves["D"],
                             leaves["z"], leaves["delta_bias"], True, True, initial_state=leaves["initial_state"],
                             reverse=reverse, backend=backend)
    w = torch.Generator().manual_seed(3)
    ((y * torch.randn(y.shape, generator=w, dtype=y.dtype)).sum()
     + (last * torch.randn(last.shape, generator=w, dtype=last.dtype)).sum()).backward()
    return [y, last] + [leaves[k].grad for k in sorted(leaves)]


@pytest.mark.parametrize("reverse", [False, True])
def test_strided_model_layouts_match_the_reference(reverse):
    x = _mamba_like_inputs(dtype=f64)
    assert not x["u"].is_contiguous() and not x["z"].is_contiguous() and x["B"].stride(1) == 1
    got, want = _run(x, "cpu", reverse), _run(x, "ref", reverse)
    assert got[0].stride(1) == 1  # y is written channel-last
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"output {i}: {m}")


def test_strided_views_reach_the_kernel_without_copies():
    """The non-dense views keep their strides: the kernel reads them where they are."""
    x = _mamba_like_inputs()
    a = cpu._scan_args(x["u"], x["delta"], x["A"], x["B"].unsqueeze(1), x["C"].unsqueeze(1), x["D"], x["z"],
                       x["delta_bias"], None, None, True, False, True)
    assert tuple(a.su) == x["u"].stride() and tuple(a.sz) == x["z"].stride()
    assert a.u == x["u"].data_ptr() and a.z == x["z"].data_ptr()
    assert (a.sB[0], a.sB[2]) == (x["B"].stride(0), x["B"].stride(2)) and a.B == x["B"].data_ptr()


@pytest.mark.parametrize("shape,groups", [((2, 48, 300, 16), 1), ((1, 24, 200, 4), 3), ((2, 8, 70, 1), 8)])
def test_same_bits_with_one_and_two_threads_and_run_to_run(shape, groups):
    b, d, L, N = shape
    g = torch.Generator().manual_seed(1)
    x = dict(u=torch.randn(b, d, L, generator=g), delta=0.3 * torch.rand(b, d, L, generator=g),
             A=-(0.5 + torch.rand(d, N, generator=g)), B=torch.randn(b, groups, N, L, generator=g),
             C=torch.randn(b, groups, N, L, generator=g), D=torch.randn(d, generator=g),
             z=torch.randn(b, d, L, generator=g), delta_bias=torch.randn(d, generator=g),
             initial_state=torch.randn(b, d, N, generator=g))
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 2):
            torch.set_num_threads(n)
            results.append(_run(x, "cpu"))
    finally:
        torch.set_num_threads(threads)
    for run in results[1:]:
        for a, b_ in zip(results[0], run):
            assert torch.equal(a, b_)


def test_custom_ops_pass_opcheck():
    """Fake (meta) implementations, autograd registration and schema agree with the real kernels."""
    x = _mamba_like_inputs(batch=1, dim=8, L=20, N=4)
    B, C = (cpu._rows(t.unsqueeze(1)) for t in (x["B"], x["C"]))
    args = (x["u"].requires_grad_(), x["delta"], x["A"], B, C, x["D"], x["z"], x["delta_bias"],
            x["initial_state"], None, True, False, True)
    torch.library.opcheck(torch.ops.ssmkit.selective_scan_cpu_fwd.default, args)
    state = torch.randn(2, 8, 4)
    step = (state, torch.randn(2, 8), torch.rand(2, 8), x["A"], torch.randn(2, 1, 4), torch.randn(2, 2, 4),
            x["D"], torch.randn(2, 8), x["delta_bias"], True)
    torch.library.opcheck(torch.ops.ssmkit.selective_state_update_cpu.default, step)


@pytest.mark.parametrize("dtype", [torch.float32, f64, torch.bfloat16])
def test_state_update_matches_the_pytorch_step(dtype):
    g = torch.Generator().manual_seed(2)
    batch, dim, N = 3, 12, 5
    state = torch.randn(batch, dim, N, generator=g)
    args = (torch.randn(batch, dim, generator=g).to(dtype), torch.rand(batch, dim, generator=g).to(dtype),
            -torch.rand(dim, N, generator=g), torch.randn(batch, 2, N, generator=g).to(dtype),
            torch.randn(batch, 3, N, generator=g).to(dtype), torch.randn(dim, generator=g),
            torch.randn(batch, dim, generator=g).to(dtype), torch.randn(dim, generator=g), True)
    s_cpu, s_ref = state.clone(), state.clone()
    y_cpu = selective_state_update(s_cpu, *args, backend="cpu")
    y_ref = selective_state_update(s_ref, *args, backend="chunked")
    assert y_cpu.dtype == dtype
    torch.testing.assert_close(y_cpu, y_ref)
    torch.testing.assert_close(s_cpu, s_ref)


def test_cpu_is_the_default_on_cpu(monkeypatch):
    monkeypatch.delenv("SSMKIT_BACKEND", raising=False)
    assert _pick_backend(None, torch.device("cpu"), torch.float32) == "cpu"
    assert _pick_backend(None, torch.device("cpu"), f64) == "cpu"
    monkeypatch.setenv("SSMKIT_BACKEND", "chunked")
    assert _pick_backend(None, torch.device("cpu"), torch.float32) == "chunked"


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


_SCAN_TWICE = """
    import warnings, torch
    from ssmkit.core.scan import selective_scan
    warnings.simplefilter("always")
    u = torch.randn(1, 4, 9)
    A, B = -torch.rand(4, 3), torch.randn(1, 3, 9)
    for _ in range(2):
        y = selective_scan(u, u.abs(), A, B, B)
    torch.testing.assert_close(y, selective_scan(u, u.abs(), A, B, B, backend="ref"))
    print("ok")
"""


def test_without_a_compiler_the_scan_falls_back_and_says_so_once(tmp_path):
    r = _python(_SCAN_TWICE, {"CC": str(tmp_path / "no-such-compiler"), "SSMKIT_CACHE_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
    assert r.stderr.count("compiled CPU scan kernels are unavailable") == 1, r.stderr
    assert "using the 'chunked' PyTorch scan" in r.stderr


def test_the_build_is_reported_once_and_cached_across_processes(tmp_path):
    env = {"SSMKIT_CACHE_DIR": str(tmp_path)}
    first, second = _python(_SCAN_TWICE, env), _python(_SCAN_TWICE, env)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stderr.count("ssmkit: compiled the CPU scan kernels in") == 1, first.stderr
    assert "compiled" not in second.stderr
    assert len(list((tmp_path / "kernels").glob("scan-*.so"))) == 1


def test_explicit_cpu_backend_refuses_other_devices():
    with pytest.raises(RuntimeError, match="cpu backend is not available for device meta"):
        _pick_backend("cpu", torch.device("meta"), torch.float32)
