"""Triton selective scan and state update vs the sequential reference of ssmkit.core.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py) on tiny
shapes with small chunk sizes, so every boundary (segment, chunk, padding, reverse padding) is crossed.
With a GPU the same tests run compiled kernels, and the `gpu`-marked tests add real sizes, fp16/bf16,
64K-long sequences, determinism and torch.compile.
"""
from __future__ import annotations

import pytest
import torch

from ssmkit.core.scan import selective_scan, selective_state_update
from ssmkit.kernels import as_time_invariant, triton_available

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")

if not triton_available(DEV):
    pytest.skip("triton kernels unavailable here (no CUDA device and TRITON_INTERPRET unset)",
                allow_module_level=True)

from ssmkit.kernels import selective_scan as ks  # noqa: E402  (after the availability check)

if not CUDA and not ks._seq_fwd_kernel.__class__.__name__.startswith("Interpreted"):
    pytest.skip("ssmkit.kernels.selective_scan was imported before TRITON_INTERPRET=1 was set; "
                "run the kernel tests in their own pytest process", allow_module_level=True)


# small chunks so that short sequences cross every boundary; BD = 32 channels per program; the length
# split into time-parallel parts (n_par) or walked by one program (SEQ1_CFG)
SEQ_CFG = dict(impl="seq", seg=8, fwd_chunk=4, bwd_chunk=2, num_warps=1, bwd_num_warps=1, n_par=2, bwd_n_par=3)
SEQ1_CFG = dict(impl="seq", seg=16, fwd_chunk=8, bwd_chunk=4, num_warps=1, bwd_num_warps=1, n_par=1)
ASSOC_CFG = dict(impl="assoc", chunk=16, block_d=2, bwd_block_d=2)


# ----------------------------------------------------------------------------------------------------
# helpers


def make_inputs(batch, dim, L, N, G=1, *, bc="var", z=True, D=True, bias=True, h0=True, seq=False,
                dtype=torch.float32, device=DEV, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rn(*s):
        return torch.randn(*s, generator=g)

    u = rn(batch, dim, L)
    delta = 0.5 * torch.rand(batch, dim, L, generator=g) - (0.2 if bias else 0.0)
    A = -(0.5 + torch.rand(dim, N, generator=g))
    if bc == "var":
        B, C = rn(batch, G, N, L), rn(batch, G, N, L)
        if G == 0:
            B, C = rn(batch, N, L), rn(batch, N, L)
    elif bc == "const":
        B, C = rn(dim, N), rn(dim, N)
    else:  # "mixed": time-varying B (3-D), time-invariant C
        B, C = rn(batch, N, L), rn(dim, N)
    x = dict(u=u, delta=delta, A=A, B=B, C=C,
             D=rn(dim) if D else None,
             z=rn(batch, dim, L) if z else None,
             delta_bias=0.5 * torch.rand(dim, generator=g) if bias else None,
             initial_state=rn(batch, dim, N) if h0 else None)
    low = {"u", "delta", "z"} | ({"B", "C"} if bc == "var" else set())
    x = {k: (None if v is None else v.to(device=device, dtype=dtype if k in low else torch.float32))
         for k, v in x.items()}
    if seq:
        breaks = torch.rand(batch, L, generator=g) < 0.15
        breaks[:, 0] = False
        x["seq_idx"] = breaks.long().cumsum(1).to(device)
    else:
        x["seq_idx"] = None
    return x


def run(x, backend, *, softplus=True, reverse=False, cast=None, grads=True, seed=1):
    """Forward (y, last) and, if grads, the gradients of <y, gy> + <last, gl> w.r.t. every input."""
    names = [k for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state") if x[k] is not None]
    ins = {k: v for k, v in x.items()}
    for k in names:
        t = x[k].detach()
        if cast is not None:
            t = t.to(cast)
        ins[k] = t.clone().requires_grad_(grads)
    y, last = selective_scan(ins["u"], ins["delta"], ins["A"], ins["B"], ins["C"], ins["D"], ins["z"],
                             ins["delta_bias"], softplus, True, initial_state=ins["initial_state"],
                             reverse=reverse, seq_idx=x["seq_idx"], backend=backend)
    if not grads:
        return y.detach(), last.detach(), {}
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g).to(y.device, y.dtype)
    gl = torch.randn(last.shape, generator=g).to(last.device, last.dtype)
    loss = (y * gy).sum() + (last * gl).sum()
    got = torch.autograd.grad(loss, [ins[k] for k in names])
    return y.detach(), last.detach(), dict(zip(names, got))


def check(name, got, ref, rtol, atol):
    got, ref = got.double(), ref.double().to(got.device)
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - ref).abs()
    bound = atol + rtol * ref.abs()
    assert bool((err <= bound).all()), (
        f"{name}: max abs err {err.max().item():.3e} (max |ref| {ref.abs().max().item():.3e}, "
        f"worst ratio {(err / bound).max().item():.2f})")


def compare(x, cfg, *, softplus=True, reverse=False, rtol=1e-4, atol=1e-5, grad_scale=1.0):
    with ks.kernel_config(**cfg):
        y, last, g = run(x, "triton", softplus=softplus, reverse=reverse)
    yr, lr, gr = run(x, "ref", softplus=softplus, reverse=reverse, cast=torch.float64)
    check("y", y, yr, rtol, atol)
    check("last_state", last, lr, rtol, atol)
    for k in gr:
        scale = max(1.0, gr[k].abs().max().item())
        check(f"d{k}", g[k], gr[k], rtol * grad_scale, atol * grad_scale * scale)


# ----------------------------------------------------------------------------------------------------
# correctness vs the reference (interpreter on CPU, compiled on GPU)

CASES = {
    # name: (input kwargs, config, reverse, softplus)
    "seq-grouped-all": (dict(batch=2, dim=64, L=37, N=4, G=2, seq=True), SEQ_CFG, False, True),
    "seq-grouped-all-reverse": (dict(batch=2, dim=64, L=37, N=4, G=2, seq=True), SEQ_CFG, True, True),
    "seq-one-part-grouped-all": (dict(batch=2, dim=64, L=37, N=4, G=2, seq=True), SEQ1_CFG, False, True),
    "seq-one-part-reverse": (dict(batch=1, dim=32, L=37, N=4, G=1, seq=True), SEQ1_CFG, True, True),
    "seq-plain-N1": (dict(batch=1, dim=32, L=24, N=1, G=1, z=False, D=False, bias=False, h0=False), SEQ_CFG,
                     False, False),
    "seq-N16-reverse": (dict(batch=1, dim=32, L=21, N=16, G=0, z=False, h0=True), SEQ_CFG, True, False),
    "seq-time-invariant": (dict(batch=2, dim=8, L=19, N=3, bc="const", seq=True), SEQ_CFG, True, True),
    "assoc-grouped-all": (dict(batch=2, dim=4, L=37, N=4, G=2, seq=True), ASSOC_CFG, False, True),
    "assoc-grouped-all-reverse": (dict(batch=2, dim=4, L=37, N=4, G=2, seq=True), ASSOC_CFG, True, True),
    "assoc-N16-time-invariant": (dict(batch=1, dim=6, L=20, N=16, bc="const", z=False), ASSOC_CFG, False, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_scan_matches_reference(case):
    kw, cfg, reverse, softplus = CASES[case]
    x = make_inputs(**kw)
    compare(x, cfg, softplus=softplus, reverse=reverse)


def test_mixed_time_varying_B_time_invariant_C():
    """B (batch, N, L) with C (dim, N). The reference gets B repeated to one group per channel (its loop
    wants equal group counts for B and C); dB is summed back over the channels."""
    x = make_inputs(batch=1, dim=32, L=11, N=4, bc="mixed", h0=False)
    with ks.kernel_config(**SEQ_CFG):
        y, last, g = run(x, "triton")
    xr = dict(x)
    xr["B"] = x["B"][:, None].expand(-1, 32, -1, -1).contiguous()
    yr, lr, gr = run(xr, "ref", cast=torch.float64)
    gr["B"] = gr["B"].sum(1)
    check("y", y, yr, 1e-4, 1e-5)
    check("last_state", last, lr, 1e-4, 1e-5)
    for k in gr:
        check(f"d{k}", g[k], gr[k], 1e-4, 1e-5 * max(1.0, gr[k].abs().max().item()))


def test_default_plan_matches_reference():
    """The launch plan picked without overrides (seq kernels, real chunk sizes)."""
    x = make_inputs(batch=1, dim=32, L=70, N=8, G=1, seq=True)
    compare(x, {}, reverse=False)


def test_low_precision_inputs():
    """fp16/bf16 u, delta, z, B, C: fp32 state and accumulation, outputs in the input dtype."""
    for dtype, tol in ((torch.float16, 3e-3), (torch.bfloat16, 3e-2)):
        x = make_inputs(batch=1, dim=32, L=20, N=4, G=1, dtype=dtype, h0=False, seed=3)
        with ks.kernel_config(**SEQ_CFG):
            y, last, g = run(x, "triton")
        yr, lr, gr = run(x, "ref", cast=torch.float64)
        assert y.dtype == dtype and last.dtype == torch.float32
        assert g["u"].dtype == dtype and g["B"].dtype == dtype and g["A"].dtype == torch.float32
        check("y", y, yr, tol, tol)
        check("last_state", last, lr, tol, tol)
        for k in ("u", "delta", "z"):
            check(f"d{k}", g[k], gr[k], 2 * tol, 5 * tol * max(1.0, gr[k].abs().max().item()))


def test_split_scan_continues_with_initial_state():
    """scan(x[:k]) -> state s; scan(x[k:], initial_state=s) == scan(x)[k:] (both directions)."""
    x = make_inputs(batch=1, dim=32, L=29, N=4, G=1, h0=False, seq=False)
    k = 13
    with ks.kernel_config(**SEQ_CFG):
        full, last = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
                                    True, True, backend="triton")
        sl = lambda t, a, b: t[..., a:b]  # noqa: E731
        y1, s1 = selective_scan(sl(x["u"], 0, k), sl(x["delta"], 0, k), x["A"], sl(x["B"], 0, k),
                                sl(x["C"], 0, k), x["D"], sl(x["z"], 0, k), x["delta_bias"], True, True,
                                backend="triton")
        y2, s2 = selective_scan(sl(x["u"], k, None), sl(x["delta"], k, None), x["A"], sl(x["B"], k, None),
                                sl(x["C"], k, None), x["D"], sl(x["z"], k, None), x["delta_bias"], True, True,
                                initial_state=s1, backend="triton")
    torch.testing.assert_close(torch.cat([y1, y2], -1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2, last, rtol=1e-5, atol=1e-5)


def test_deterministic_mode_is_bitwise_reproducible(monkeypatch):
    x = make_inputs(batch=1, dim=64, L=21, N=4, G=1, z=False, seq=False, seed=5)
    with ks.kernel_config(**SEQ_CFG):
        _, _, g_atomic = run(x, "triton")
        monkeypatch.setenv("SSMKIT_DETERMINISTIC", "1")
        _, _, g1 = run(x, "triton")
        _, _, g2 = run(x, "triton")
    for k in g1:
        assert torch.equal(g1[k], g2[k]), f"d{k} differs between two deterministic runs"
        torch.testing.assert_close(g1[k], g_atomic[k], rtol=1e-5, atol=1e-5)


def test_time_invariant_expanded_view_is_read_once():
    """core passes a time-invariant (dim, N) B/C as a stride-0 (batch, dim, N, L) view: the kernels
    must see the (dim, N) tensor (no (batch, dim, N, L) gradient)."""
    Bc = torch.randn(32, 4, device=DEV)
    view = Bc.unsqueeze(0).unsqueeze(-1).expand(2, 32, 4, 9)
    assert as_time_invariant(view, 32, 4) is Bc
    dense = view.contiguous()
    assert as_time_invariant(dense, 32, 4) is dense


def test_state_update_matches_reference():
    g = torch.Generator().manual_seed(7)
    batch, dim, N = 2, 12, 5
    for G, z_on, sp in ((1, True, True), (3, False, False)):
        state = torch.randn(batch, dim, N, generator=g).to(DEV)
        x = torch.randn(batch, dim, generator=g).to(DEV)
        dt = (0.5 * torch.rand(batch, dim, generator=g) - 0.2).to(DEV)
        A = -(0.5 + torch.rand(dim, N, generator=g)).to(DEV)
        B = torch.randn(batch, G, N, generator=g).to(DEV)
        C = torch.randn(batch, G, N, generator=g).to(DEV)
        D = torch.randn(dim, generator=g).to(DEV)
        z = torch.randn(batch, dim, generator=g).to(DEV) if z_on else None
        bias = (0.5 * torch.rand(dim, generator=g)).to(DEV)
        # reference: one step of the sequential scan from `state`
        y_ref, s_ref = selective_scan(x[..., None].double(), dt[..., None].double(), A.double(),
                                      B[..., None].double(), C[..., None].double(), D.double(),
                                      None if z is None else z[..., None].double(), bias.double(), sp, True,
                                      initial_state=state.double(), backend="ref")
        st = state.clone()
        y = ks.selective_state_update_triton(st, x, dt, A, B, C, D, z, bias, sp)
        torch.testing.assert_close(y.double(), y_ref[..., 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(st.double(), s_ref, rtol=1e-5, atol=1e-5)
        if G == 1:  # (batch, N) B/C are accepted too
            st2 = state.clone()
            y2 = ks.selective_state_update_triton(st2, x, dt, A, B[:, 0], C[:, 0], D, z, bias, sp)
            torch.testing.assert_close(y2, y)


def test_custom_ops_trace_with_fake_tensors():
    """register_fake / register_autograd: the op runs under torch.compile (aot_eager) without graph breaks."""
    x = make_inputs(batch=1, dim=32, L=10, N=4, G=1, seq=False, h0=False, seed=9)

    def f(u, delta, A, B, C, D, z, bias):
        y, last = selective_scan(u, delta, A, B, C, D, z, bias, True, True, backend="triton")
        return y.sum() + last.square().sum()

    args = [x[k].clone().requires_grad_() for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    with ks.kernel_config(**SEQ_CFG):
        eager = torch.autograd.grad(f(*args), args)
        torch._dynamo.reset()
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        out = torch.autograd.grad(compiled(*args), args)
    for a, b in zip(out, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# GPU: real sizes, low precision, long sequences, determinism, torch.compile

# mamba_ssm's tolerances (tests/ops/test_selective_scan.py): (rtol, atol) per input dtype
TOL = {torch.float32: (6e-4, 2e-3), torch.float16: (3e-3, 5e-3), torch.bfloat16: (3e-2, 5e-2)}


def _gpu_compare(x, dtype, reverse=False, oracle="ref"):
    rtol, atol = TOL[dtype]
    y, last, g = run(x, "triton", reverse=reverse)
    yr, lr, gr = run(x, oracle, reverse=reverse, cast=torch.float64)
    check("y", y, yr, rtol, atol)
    check("last_state", last, lr, rtol, atol)
    # gradients: mamba's scaling (du x2, ddelta rtol x5 atol x10); sums over L (dA, dD, dbias, time-invariant
    # dB/dC) are checked relative to their magnitude
    for k in gr:
        r, a = rtol, atol
        if k == "u":
            a = 2 * atol
        elif k == "delta":
            r, a = 5 * rtol, 10 * atol
        if k in ("A", "D", "delta_bias", "B", "C"):  # sums over L or over the channels of a group
            a = a * max(1.0, gr[k].abs().max().item()) * 0.1
        check(f"d{k}", g[k], gr[k], r, a)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("L", [128, 1024, 4096])
@pytest.mark.parametrize("layout", ["seq", "assoc"])
def test_gpu_matches_reference(dtype, L, layout):
    torch.manual_seed(0)
    if layout == "seq":
        x = make_inputs(batch=2, dim=64, L=L, N=8, G=2, dtype=dtype, seq=True, seed=L)
    else:  # mamba_ssm's test shape: 4 channels, 2 groups -> the assoc kernels
        x = make_inputs(batch=2, dim=4, L=L, N=8, G=2, dtype=dtype, seq=True, seed=L)
    oracle = "ref" if L <= 128 else "chunked"  # chunked (fp64) is checked against ref in tests/core
    _gpu_compare(x, dtype, reverse=False, oracle=oracle)
    _gpu_compare(x, dtype, reverse=True, oracle=oracle)


@pytest.mark.gpu
@pytest.mark.parametrize("N", [1, 16, 64])
def test_gpu_state_sizes_and_time_invariant(N):
    x = make_inputs(batch=2, dim=256, L=777, N=N, G=1, seq=False, seed=N)
    _gpu_compare(x, torch.float32, oracle="chunked")
    x = make_inputs(batch=2, dim=96, L=300, N=N, bc="const", seed=N)
    _gpu_compare(x, torch.float32, reverse=True, oracle="chunked")


@pytest.mark.gpu
def test_gpu_assoc_reverse_scan_semantics():
    """The assoc backward needs a reverse associative scan; tl.flip and reverse=True must agree."""
    x = make_inputs(batch=2, dim=6, L=300, N=4, G=3, seq=True, seed=11)
    with ks.kernel_config(impl="assoc", rev_flip=False):
        _, _, g1 = run(x, "triton")
    with ks.kernel_config(impl="assoc", rev_flip=True):
        _, _, g2 = run(x, "triton")
    _, _, gr = run(x, "ref", cast=torch.float64)
    for k in gr:
        check(f"d{k} (reverse=True)", g1[k], gr[k], 1e-4, 1e-4 * max(1, gr[k].abs().max().item()))
        check(f"d{k} (flip)", g2[k], gr[k], 1e-4, 1e-4 * max(1, gr[k].abs().max().item()))


@pytest.mark.gpu
def test_gpu_long_sequence_bf16_finite():
    """L = 64K in bf16 (Mamba init: A = -(1..N), dt in [1e-3, 0.1]): no NaN/Inf forward or backward, and
    the output agrees with the fp32 chunked backend."""
    torch.manual_seed(0)
    batch, dim, L, N = 1, 128, 65536, 16
    dev = "cuda"
    u = torch.randn(batch, dim, L, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dt_init = torch.exp(torch.rand(dim, device=dev) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
                        + torch.log(torch.tensor(1e-3)))
    bias = (dt_init + torch.log(-torch.expm1(-dt_init))).requires_grad_()
    delta = (0.1 * torch.randn(batch, dim, L, device=dev)).to(torch.bfloat16).requires_grad_()
    A = (-torch.arange(1, N + 1, device=dev, dtype=torch.float32).repeat(dim, 1)).requires_grad_()
    B = torch.randn(batch, N, L, device=dev, dtype=torch.bfloat16, requires_grad=True)
    C = torch.randn(batch, N, L, device=dev, dtype=torch.bfloat16, requires_grad=True)
    D = torch.ones(dim, device=dev, requires_grad=True)
    z = torch.randn(batch, dim, L, device=dev, dtype=torch.bfloat16, requires_grad=True)
    y, last = selective_scan(u, delta, A, B, C, D, z, bias, True, True, backend="triton")
    (y.float().square().mean() + last.square().mean()).backward()
    for name, t in (("y", y), ("last", last), ("du", u.grad), ("ddelta", delta.grad), ("dA", A.grad),
                    ("dB", B.grad), ("dC", C.grad), ("dD", D.grad), ("dz", z.grad), ("dbias", bias.grad)):
        assert torch.isfinite(t.float()).all(), f"{name} has NaN/Inf at L=65536 bf16"
    with torch.no_grad():
        yc = selective_scan(u.float(), delta.float(), A, B.float(), C.float(), D, z.float(), bias, True,
                            backend="chunked")
    rel = (y.float() - yc).norm() / yc.norm()
    assert rel < 1e-2, f"relative error vs chunked fp32 {rel:.2e}"


@pytest.mark.gpu
def test_gpu_deterministic_bitwise(monkeypatch):
    x = make_inputs(batch=2, dim=256, L=4096, N=16, G=1, dtype=torch.bfloat16, seq=True, seed=2)
    monkeypatch.setenv("SSMKIT_DETERMINISTIC", "1")
    _, _, g1 = run(x, "triton")
    _, _, g2 = run(x, "triton")
    for k in g1:
        assert torch.equal(g1[k], g2[k]), f"d{k} not bitwise reproducible in deterministic mode"
    monkeypatch.setenv("SSMKIT_DETERMINISTIC", "0")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        _, _, g3 = run(x, "triton")
    finally:
        torch.use_deterministic_algorithms(False)
    for k in g1:
        assert torch.equal(g1[k], g3[k]), f"d{k}: torch deterministic mode should select the same kernels"


@pytest.mark.gpu
def test_gpu_torch_compile():
    x = make_inputs(batch=2, dim=128, L=512, N=16, G=1, dtype=torch.bfloat16, seed=4)

    def f(u, delta, A, B, C, D, z, bias):
        y, last = selective_scan(u, delta, A, B, C, D, z, bias, True, True, backend="triton")
        return y.float().square().mean() + last.square().mean()

    args = [x[k].clone().requires_grad_() for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    eager = torch.autograd.grad(f(*args), args)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    out = torch.autograd.grad(compiled(*args), args)
    for a, b in zip(out, eager):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_gpu_memory_is_linear_in_length():
    """Saved tensors are the inputs plus O(batch*dim*N*L/seg) states, never O(batch*dim*L*N)."""
    batch, dim, L, N = 2, 256, 8192, 64
    x = make_inputs(batch=batch, dim=dim, L=L, N=N, G=1, dtype=torch.bfloat16, h0=False, seed=6)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run(x, "triton")
    peak = torch.cuda.max_memory_allocated() - base
    full_states = batch * dim * L * N * 4
    assert peak < full_states / 4, f"peak {peak / 2**20:.0f} MiB vs (B,D,L,N) fp32 {full_states / 2**20:.0f} MiB"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim,N,G", [(2048, 16, 1), (2064, 32, 2), (4096, 64, 4)])
def test_gpu_state_update(dtype, dim, N, G):
    rtol, atol = {torch.float32: (3e-4, 1e-3), torch.float16: (5e-3, 1e-2), torch.bfloat16: (1e-2, 5e-2)}[dtype]
    torch.manual_seed(dim + N)
    batch = 2
    state = torch.randn(batch, dim, N, device="cuda", dtype=dtype)
    x = torch.randn(batch, dim, device="cuda", dtype=dtype)
    dt = torch.randn(batch, dim, device="cuda", dtype=dtype)
    bias = torch.rand(dim, device="cuda") - 4.0
    A = -torch.rand(dim, N, device="cuda") - 1.0
    B = torch.randn(batch, G, N, device="cuda")
    C = torch.randn(batch, G, N, device="cuda")
    D = torch.randn(dim, device="cuda")
    z = torch.randn(batch, dim, device="cuda", dtype=dtype)
    st = state.clone()
    y = selective_state_update(st, x, dt, A, B, C, D, z, bias, True)
    # reference in fp32 torch
    step = torch.nn.functional.softplus(dt.float() + bias)
    Bd = B.repeat_interleave(dim // G, 1)
    Cd = C.repeat_interleave(dim // G, 1)
    s_ref = state.float() * torch.exp(step[..., None] * A) + (step * x.float())[..., None] * Bd
    y_ref = ((s_ref * Cd).sum(-1) + D * x.float()) * torch.nn.functional.silu(z.float())
    torch.testing.assert_close(st.float(), s_ref.to(dtype).float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(y.float(), y_ref, rtol=rtol, atol=atol)

