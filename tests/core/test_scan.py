"""The 1-D selective scan: every backend against an independent fp64 loop, state algebra, bad input."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from ssmkit.core.scan import chunked_scan, reset_gate, selective_scan, selective_state_update

CPU_BACKENDS = ["ref", "chunked", "cpu"]
f64 = torch.float64


def oracle(u, delta, A, B, C, D=None, z=None, delta_bias=None, softplus=False, h0=None, reverse=False, seq_idx=None):
    """The recurrence written out once more, per batch row and time step, in fp64."""
    u, delta, A, B, C = (t.to(f64) for t in (u, delta, A, B, C))
    batch, dim, L = u.shape
    if B.dim() == 2:
        B = B[None, :, :, None].expand(batch, dim, B.shape[1], L)
    elif B.dim() == 3:
        B = B[:, None]
    if C.dim() == 2:
        C = C[None, :, :, None].expand(batch, dim, C.shape[1], L)
    elif C.dim() == 3:
        C = C[:, None]
    dt = delta + (0 if delta_bias is None else delta_bias.to(f64)[:, None])
    if softplus:
        dt = torch.where(dt <= 20, torch.log1p(torch.exp(dt)), dt)
    ys, lasts = torch.zeros(batch, dim, L, dtype=f64), []
    for b in range(batch):
        h = torch.zeros(dim, A.shape[1], dtype=f64) if h0 is None else h0[b].to(f64)
        order = range(L - 1, -1, -1) if reverse else range(L)
        prev = None
        for t in order:
            if seq_idx is not None and prev is not None and seq_idx[b, t] != seq_idx[b, prev]:
                h = torch.zeros_like(h)
            g_b, g_c = B.shape[1], C.shape[1]
            Bt = B[b, torch.arange(dim) // (dim // g_b), :, t]
            Ct = C[b, torch.arange(dim) // (dim // g_c), :, t]
            h = torch.exp(dt[b, :, t, None] * A) * h + (dt[b, :, t] * u[b, :, t])[:, None] * Bt
            ys[b, :, t] = (h * Ct).sum(-1)
            prev = t
        lasts.append(h)
    if D is not None:
        ys = ys + D.to(f64)[:, None] * u
    if z is not None:
        ys = ys * F.silu(z.to(f64))
    return ys, torch.stack(lasts)


def make_inputs(batch, dim, L, N, groups=1, dtype=torch.float32, seed=0, bc="var"):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    u = r(batch, dim, L)
    delta = 0.5 * torch.rand(batch, dim, L, generator=g, dtype=dtype) - 0.1
    A = -(0.5 + torch.rand(dim, N, generator=g, dtype=dtype))
    shape = (dim, N) if bc == "lti" else ((batch, N, L) if groups == 1 else (batch, groups, N, L))
    return dict(u=u, delta=delta, A=A, B=r(*shape), C=r(*shape), D=r(dim), z=r(batch, dim, L),
                delta_bias=0.3 * r(dim), h0=r(batch, dim, N))


def run(backend, x, use, softplus, reverse=False, seq_idx=None, grads=True):
    """Scan with the options in `use`; returns outputs and the gradients of a fixed random loss."""
    leaves = {k: v.clone().requires_grad_(grads) for k, v in x.items()}
    opt = {k: leaves[k] for k in ("D", "z", "delta_bias") if k in use}
    y, last = selective_scan(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], **opt,
                             delta_softplus=softplus, return_last_state=True, reverse=reverse, seq_idx=seq_idx,
                             initial_state=leaves["h0"] if "h0" in use else None, backend=backend)
    if not grads:
        return [y, last]
    w = torch.Generator().manual_seed(1)
    loss = (y.double() * torch.randn(y.shape, generator=w, dtype=f64)).sum() + \
        (last.double() * torch.randn(last.shape, generator=w, dtype=f64)).sum()
    loss.backward()
    used = ["u", "delta", "A", "B", "C"] + sorted(use)
    return [y, last] + [leaves[k].grad for k in used]


def oracle_run(x, use, softplus, reverse=False, seq_idx=None):
    x64 = {k: v.to(f64) for k, v in x.items()}
    leaves = {k: v.clone().requires_grad_() for k, v in x64.items()}
    opt = {k: leaves[k] for k in ("D", "z", "delta_bias") if k in use}
    y, last = oracle(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], **opt,
                     softplus=softplus, h0=leaves["h0"] if "h0" in use else None, reverse=reverse, seq_idx=seq_idx)
    w = torch.Generator().manual_seed(1)
    ((y * torch.randn(y.shape, generator=w, dtype=f64)).sum() + (last * torch.randn(last.shape, generator=w, dtype=f64)).sum()).backward()
    used = ["u", "delta", "A", "B", "C"] + sorted(use)
    return [y, last] + [leaves[k].grad for k in used]


def assert_close(got, want, rtol, atol, what=""):
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a.to(f64), b.to(f64), rtol=rtol, atol=atol, msg=lambda m: f"{what} item {i}: {m}")


OPTION_SETS = [frozenset(s) for s in ([], ["D"], ["z"], ["delta_bias"], ["D", "z", "delta_bias", "h0"])]
GRID = list(itertools.product([1, 7, 63, 64, 65], [1, 4, 16], [1, 2]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("L,N,groups", GRID)
def test_against_fp64_loop(backend, L, N, groups):
    # each grid point takes one option set and softplus flag in turn, so every combination of
    # option and (length, d_state, groups) axis value is covered without the full product
    k = GRID.index((L, N, groups))
    use, softplus = OPTION_SETS[k % len(OPTION_SETS)], bool(k % 2)
    x = make_inputs(2, 4, L, N, groups, dtype=f64, seed=k)
    assert_close(run(backend, x, use, softplus), oracle_run(x, use, softplus), 1e-9, 1e-9, f"{backend} {sorted(use)}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("use", [frozenset(s) for r in range(5) for s in itertools.combinations(["D", "z", "delta_bias", "h0"], r)])
def test_every_option_combination(backend, use):
    for softplus in (False, True):
        x = make_inputs(1, 4, 19, 4, 2, dtype=f64, seed=3)
        assert_close(run(backend, x, use, softplus), oracle_run(x, use, softplus), 1e-9, 1e-9)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_long_sequence_fp32(backend):
    x = make_inputs(1, 3, 1031, 16, 1, seed=5)
    use = frozenset(["D", "z", "delta_bias", "h0"])
    assert_close(run(backend, x, use, True), oracle_run(x, use, True), 1e-4, 2e-4, backend)


def test_time_invariant_bc():
    x = make_inputs(2, 4, 33, 4, bc="lti", dtype=f64)
    for backend in CPU_BACKENDS:
        assert_close(run(backend, x, frozenset(["D"]), True), oracle_run(x, frozenset(["D"]), True), 1e-9, 1e-9)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck(backend):
    x = make_inputs(1, 2, 6, 2, 2, dtype=f64, seed=7)
    seq = torch.tensor([[0, 0, 0, 1, 1, 2]])

    def f(u, delta, A, B, C, D, z, bias, h0):
        return selective_scan(u, delta, A, B, C, D, z, bias, True, True, initial_state=h0, seq_idx=seq, backend=backend)

    args = [x[k].clone().requires_grad_() for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0")]
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradcheck(lambda *a: f(*a)[0].flip(-1), args)


@pytest.mark.parametrize("chunk", [1, 2, 5, 16, 64])
@pytest.mark.parametrize("reverse", [False, True])
def test_chunk_size_does_not_change_the_result(chunk, reverse):
    x = make_inputs(2, 4, 37, 4, 2, dtype=f64)
    dt = F.softplus(x["delta"])
    seq_idx = (torch.arange(37) >= 11).long().expand(2, 37)
    want = oracle(x["u"], dt, x["A"], x["B"], x["C"], h0=x["h0"], reverse=reverse, seq_idx=seq_idx)
    keep = reset_gate(seq_idx, reverse, f64)
    got = chunked_scan(x["u"], dt, x["A"], x["B"], x["C"], x["h0"], keep, reverse, chunk_size=chunk)
    assert_close(got, want, 1e-10, 1e-10)


# ---------------------------------------------------------------------------------------------------
# state algebra


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_split_scan_with_initial_state_equals_whole(backend, reverse):
    x = make_inputs(2, 4, 50, 8, 2, dtype=f64)
    args = lambda s: [x[k][..., s] for k in ("u", "delta")] + [x["A"], x["B"][..., s], x["C"][..., s]]  # noqa: E731
    kw = dict(D=x["D"], delta_bias=x["delta_bias"], delta_softplus=True, return_last_state=True, reverse=reverse, backend=backend)
    y, last = selective_scan(*args(slice(None)), **kw)
    first, second = (slice(0, 21), slice(21, None)) if not reverse else (slice(21, None), slice(0, 21))
    y1, s1 = selective_scan(*args(first), **kw)
    y2, s2 = selective_scan(*args(second), initial_state=s1, **kw)
    parts = [y1, y2] if not reverse else [y2, y1]
    torch.testing.assert_close(torch.cat(parts, -1), y)
    torch.testing.assert_close(s2, last)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("groups", [1, 2])
def test_state_update_steps_equal_scan(groups, backend):
    x = make_inputs(2, 4, 23, 8, groups, dtype=f64)
    y, last = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True,
                             True, initial_state=x["h0"], backend="ref")
    state = x["h0"].clone()
    Bt = x["B"] if groups > 1 else x["B"][:, None]
    Ct = x["C"] if groups > 1 else x["C"][:, None]
    steps = [selective_state_update(state, x["u"][..., t], x["delta"][..., t], x["A"], Bt[..., t], Ct[..., t], x["D"],
                                    x["z"][..., t], x["delta_bias"], True, backend=backend) for t in range(23)]
    torch.testing.assert_close(torch.stack(steps, -1), y)
    torch.testing.assert_close(state, last)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_reverse_equals_flip_scan_flip(backend):
    x = make_inputs(2, 4, 40, 4, 2, dtype=f64)
    use = frozenset(["D", "z", "delta_bias", "h0"])
    flipped = {k: (v.flip(-1) if k in ("u", "delta", "z", "B", "C") else v) for k, v in x.items()}
    rev = run(backend, x, use, True, reverse=True)
    ref_leaves = {k: v.clone().requires_grad_() for k, v in flipped.items()}
    y, last = selective_scan(ref_leaves["u"], ref_leaves["delta"], ref_leaves["A"], ref_leaves["B"], ref_leaves["C"],
                             ref_leaves["D"], ref_leaves["z"], ref_leaves["delta_bias"], True, True,
                             initial_state=ref_leaves["h0"], backend=backend)
    torch.testing.assert_close(rev[0], y.flip(-1))
    torch.testing.assert_close(rev[1], last)
    w = torch.Generator().manual_seed(1)
    ((y.flip(-1) * torch.randn(y.shape, generator=w, dtype=f64)).sum() + (last * torch.randn(last.shape, generator=w, dtype=f64)).sum()).backward()
    for got, key in zip(rev[2:], ["u", "delta", "A", "B", "C", "D", "delta_bias", "h0", "z"]):
        want = ref_leaves[key].grad
        torch.testing.assert_close(got, want.flip(-1) if key in ("u", "delta", "z", "B", "C") else want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_packed_sequences_equal_separate_scans(backend, reverse):
    lengths = [5, 1, 13, 9]
    L = sum(lengths)
    x = make_inputs(1, 4, L, 4, 2, dtype=f64)
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    packed = run(backend, x, frozenset(["D", "z", "delta_bias"]), True, reverse=reverse, seq_idx=seq_idx, grads=False)[0]
    start = 0
    for n in lengths:
        s = slice(start, start + n)
        part = selective_scan(x["u"][..., s], x["delta"][..., s], x["A"], x["B"][..., s], x["C"][..., s], x["D"], x["z"][..., s],
                              x["delta_bias"], True, reverse=reverse, backend=backend)
        torch.testing.assert_close(packed[..., s], part)
        start += n


# ---------------------------------------------------------------------------------------------------
# dtypes, numerics, backends, bad input


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_output_dtype_and_fp32_state(dtype):
    x = make_inputs(2, 4, 30, 4)
    y, last = selective_scan(x["u"].to(dtype), x["delta"].to(dtype), x["A"], x["B"].to(dtype), x["C"].to(dtype),
                             x["D"], x["z"].to(dtype), return_last_state=True)
    assert y.dtype == dtype and last.dtype == torch.float32
    want = selective_scan(x["u"].to(dtype).float(), x["delta"].to(dtype).float(), x["A"], x["B"].to(dtype).float(),
                          x["C"].to(dtype).float(), x["D"], x["z"].to(dtype).float(), backend="ref")
    torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", ["chunked", "cpu"])
def test_extreme_values_stay_finite(backend):
    x = make_inputs(1, 4, 4096, 16)
    delta = torch.cat([torch.full((1, 2, 4096), 40.0), torch.full((1, 2, 4096), 1e-6)], 1)  # softplus > 20 branch; tiny steps
    A = x["A"] * 1e3  # exp(dt A) underflows to exactly 0
    leaves = [t.clone().requires_grad_() for t in (x["u"], delta, A, x["B"], x["C"])]
    y = selective_scan(*leaves, delta_softplus=True, backend=backend)
    y.sum().backward()
    assert torch.isfinite(y).all() and all(torch.isfinite(t.grad).all() for t in leaves)


def test_backend_choice(monkeypatch):
    x = make_inputs(1, 2, 5, 2)
    args = [x[k] for k in ("u", "delta", "A", "B", "C")]
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        selective_scan(*args, backend="fast")
    monkeypatch.setenv("SSMKIT_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        selective_scan(*args)
    monkeypatch.setenv("SSMKIT_BACKEND", "ref")
    torch.testing.assert_close(selective_scan(*args), selective_scan(*args, backend="chunked"))
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(RuntimeError, match="triton backend is not available"):
            selective_scan(*args, backend="triton")


@pytest.mark.parametrize("change,message", [
    (dict(u=torch.zeros(2, 4)), r"u has shape \(2, 4\); expected \(batch, dim, length\)"),
    (dict(delta=torch.zeros(2, 4, 9)), r"delta has shape \(2, 4, 9\); expected .* \(2, 4, 10\)"),
    (dict(A=torch.zeros(3, 8)), r"A has shape \(3, 8\); expected \(dim, d_state\) = \(4, N\)"),
    (dict(B=torch.zeros(2, 5, 10)), r"B has shape \(2, 1, 5, 10\); expected .*d_state.* = \(2, 8, 10\)"),
    (dict(C=torch.zeros(2, 8, 11)), r"C has shape \(2, 1, 8, 11\)"),
    (dict(B=torch.zeros(2, 3, 8, 10)), r"B has 3 groups, which does not divide dim=4"),
    (dict(D=torch.zeros(5)), r"D has shape \(5,\); expected \(dim,\) = \(4,\)"),
    (dict(u=torch.zeros(2, 4, 10, dtype=torch.int64)), r"u must be a floating-point tensor"),
    (dict(seq_idx=torch.zeros(2, 10)), r"seq_idx must be an integer tensor"),
    (dict(initial_state=torch.zeros(2, 4, 7)), r"initial_state has shape \(2, 4, 7\); expected .* \(2, 4, 8\)"),
])
def test_bad_input_names_argument_and_shapes(change, message):
    args = dict(u=torch.zeros(2, 4, 10), delta=torch.zeros(2, 4, 10), A=torch.zeros(4, 8), B=torch.zeros(2, 8, 10),
                C=torch.zeros(2, 8, 10), D=None, seq_idx=None, initial_state=None)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        selective_scan(**args)


def test_state_update_bad_input():
    with pytest.raises(ValueError, match=r"x has shape \(2, 3\); expected \(batch, dim\) = \(2, 4\)"):
        selective_state_update(torch.zeros(2, 4, 8), torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(4, 8),
                               torch.zeros(2, 8), torch.zeros(2, 8))


def test_matches_mambapy_pscan():
    """mambapy's Blelloch scan, an independent implementation, on the discretised inputs."""
    pscan = pytest.importorskip("mambapy.pscan").pscan
    x = make_inputs(2, 8, 50, 4)
    dt = F.softplus(x["delta"])
    dA = torch.exp(dt.transpose(1, 2)[..., None] * x["A"])
    BX = (dt * x["u"]).transpose(1, 2)[..., None] * x["B"].transpose(1, 2)[:, :, None]
    hs = pscan(dA, BX)
    want = (hs @ x["C"].transpose(1, 2)[..., None]).squeeze(-1).transpose(1, 2)
    for backend in CPU_BACKENDS:
        got = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], delta_softplus=True, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_b_and_c_with_different_groupings(backend):
    """B shared by all channels with C per channel (time-invariant), and B in 2 groups with C in 4."""
    g = torch.Generator().manual_seed(0)
    x = make_inputs(2, 8, 17, 4, dtype=f64)
    for B, C in [(x["B"], torch.randn(8, 4, generator=g, dtype=f64)),
                 (torch.randn(2, 2, 4, 17, generator=g, dtype=f64), torch.randn(2, 4, 4, 17, generator=g, dtype=f64))]:
        mixed = dict(x, B=B, C=C)
        assert_close(run(backend, mixed, frozenset(["D"]), True), oracle_run(mixed, frozenset(["D"]), True), 1e-9, 1e-9)
