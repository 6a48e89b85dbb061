"""2-D selective scan and linear_scan: every backend against an independent fp64 oracle, and Mamba2D."""
import pytest
import torch
import torch.nn.functional as F

from ssmkit.core.scan import selective_scan
from ssmkit.core.scan import linear_scan
from ssmkit.core.scan2d import Mamba2D, selective_scan_2d

f64 = torch.float64
BACKENDS = ["ref", "chunked", "cpu"]
DIRECTION_SETS = [("tl",), ("tr",), ("bl",), ("br",), ("tl", "tr", "bl", "br")]


def oracle(u, delta, A, B, C, D, delta_bias, directions):
    """Closed form: h[i,j] = Σ over i'<=i, j'<=j of B̄x[i',j'] times the decays along the path
    right along row i' from j' to j, then down column j from i' to i. Other corners by flipping."""
    dt = F.softplus(delta + delta_bias[:, None, None])
    batch, dim, H, W = u.shape
    G = B.shape[1]
    grp = torch.arange(dim) // (dim // G)
    a = torch.exp(dt[:, :, None] * A[None, :, :, None, None])  # (b, d, N, H, W)
    x = (dt * u)[:, :, None] * B[:, grp]
    Cd = C[:, grp]
    y = D[:, None, None] * u
    for direction in directions:
        flips = [k for k, flip in ((-2, direction[0] == "b"), (-1, direction[1] == "r")) if flip]
        af, xf, cf = (t.flip(flips) if flips else t for t in (a, x, Cd))
        out = torch.zeros(batch, dim, H, W, dtype=f64)
        for i in range(H):
            for j in range(W):
                h = 0
                for i2 in range(i + 1):
                    for j2 in range(j + 1):
                        w = torch.ones_like(af[..., 0, 0])
                        for k in range(j2 + 1, j + 1):
                            w = w * af[..., i2, k]
                        for m in range(i2 + 1, i + 1):
                            w = w * af[..., m, j]
                        h = h + w * xf[..., i2, j2]
                out[..., i, j] = (h * cf[..., i, j]).sum(2)
        y = y + (out.flip(flips) if flips else out)
    return y


def make_inputs(H, W, batch=2, dim=4, N=3, groups=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=f64)  # noqa: E731
    return dict(u=r(batch, dim, H, W), delta=r(batch, dim, H, W) * 0.5, A=-torch.rand(dim, N, generator=g, dtype=f64),
                B=r(batch, groups, N, H, W), C=r(batch, groups, N, H, W), D=r(dim), delta_bias=r(dim) * 0.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("directions", DIRECTION_SETS, ids="+".join)
@pytest.mark.parametrize("hw", [(3, 5), (1, 4), (4, 1)])
def test_matches_oracle_forward_and_grads(backend, directions, hw):
    ins = {k: v.requires_grad_() for k, v in make_inputs(*hw).items()}
    y = selective_scan_2d(**ins, delta_softplus=True, directions=directions, backend=backend)
    y_ref = oracle(**ins, directions=directions)
    torch.testing.assert_close(y, y_ref)
    w = torch.randn_like(y)
    grads = torch.autograd.grad((y * w).sum(), list(ins.values()))
    grads_ref = torch.autograd.grad((y_ref * w).sum(), list(ins.values()))
    for name, g, gr in zip(ins, grads, grads_ref):
        torch.testing.assert_close(g, gr, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_grid_equals_1d_scan(backend):
    ins = make_inputs(1, 7, dim=4, groups=2)
    y = selective_scan_2d(**ins, delta_softplus=True, backend=backend)
    y1 = selective_scan(ins["u"][:, :, 0], ins["delta"][:, :, 0], ins["A"], ins["B"][..., 0, :], ins["C"][..., 0, :],
                        ins["D"], delta_bias=ins["delta_bias"], delta_softplus=True, backend="ref")
    torch.testing.assert_close(y[:, :, 0], y1)


def test_fp32_input_keeps_dtype_and_agrees():
    ins = {k: v.float() for k, v in make_inputs(5, 6).items()}
    y = selective_scan_2d(**ins, directions=("tl", "br"))
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, selective_scan_2d(**ins, directions=("tl", "br"), backend="ref"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    ins = make_inputs(2, 3, batch=1, dim=2, N=2, groups=1)
    args = [ins[k].requires_grad_() for k in ("u", "delta", "A", "B", "C", "D")]
    fn = lambda *a: selective_scan_2d(*a, delta_softplus=True, directions=("tl", "br"), backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("change, pattern", [
    (dict(u=torch.zeros(2, 4, 3)), r"u has shape \(2, 4, 3\); expected \(batch, dim, H, W\)"),
    (dict(delta=torch.zeros(2, 4, 3, 4)), r"delta has shape \(2, 4, 3, 4\); expected \(2, 4, 3, 5\)"),
    (dict(A=torch.zeros(3, 3)), r"A has shape \(3, 3\); expected \(dim, d_state\) = \(4, N\)"),
    (dict(B=torch.zeros(2, 2, 3, 5, 3)), r"B has shape \(2, 2, 3, 5, 3\); expected .*\(2, G, 3, 3, 5\)"),
    (dict(C=torch.zeros(2, 3, 3, 3, 5)), r"C has shape \(2, 3, 3, 3, 5\); .*G dividing dim=4"),
    (dict(D=torch.zeros(5)), r"D has shape \(5,\); expected \(dim,\) = \(4,\)"),
    (dict(directions=("tl", "up")), r"directions \('tl', 'up'\)"),
    (dict(backend="cuda"), r"unknown backend .cuda."),
])
def test_bad_input_names_argument_and_shape(change, pattern):
    ins = {k: v.float() for k, v in make_inputs(3, 5).items()}
    backend = change.pop("backend", None)
    directions = change.pop("directions", ("tl",))
    ins.update(change)
    with pytest.raises(ValueError, match=pattern):
        selective_scan_2d(**ins, directions=directions, backend=backend)


# ----------------------------------------------------------------------------------------------
# linear_scan


def loop_scan(a, b, h0, reverse):
    a = a.expand_as(b)
    h, out = (torch.zeros_like(b[..., 0]) if h0 is None else h0), [None] * b.shape[-1]
    for t in (reversed(range(b.shape[-1])) if reverse else range(b.shape[-1])):
        h = a[..., t] * h + b[..., t]
        out[t] = h
    return torch.stack(out, -1)


@pytest.mark.parametrize("dtype", [f64, torch.complex128])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("L, chunk", [(1, None), (7, 3), (12, 4), (12, None)])
def test_linear_scan_matches_loop(dtype, reverse, L, chunk):
    a = torch.rand(3, 2, L, dtype=dtype) * 0.9
    b, h0 = torch.randn(3, 2, L, dtype=dtype), torch.randn(3, 2, dtype=dtype)
    torch.testing.assert_close(linear_scan(a, b, h0, reverse=reverse, chunk_size=chunk), loop_scan(a, b, h0, reverse))


def test_linear_scan_other_dim_and_broadcast_decay():
    a, b = torch.rand(4, 1, dtype=f64), torch.randn(2, 4, 5, dtype=f64)
    got = linear_scan(a, b, dim=1, chunk_size=2)  # scan over the 4-long dim 1, decay constant along dim 2
    torch.testing.assert_close(got, loop_scan(a.t(), b.transpose(1, 2), None, False).transpose(1, 2))


@pytest.mark.parametrize("reverse", [False, True])
def test_linear_scan_gradcheck_complex_and_broadcast(reverse):
    a = (torch.rand(2, 1, dtype=torch.complex128) * 0.8).requires_grad_()  # constant over time
    b = torch.randn(2, 3, 5, dtype=torch.complex128, requires_grad=True)
    h0 = torch.randn(2, 3, dtype=torch.complex128, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, h0: linear_scan(a[..., None], b, h0, reverse=reverse,
                                                                 chunk_size=2), (a, b, h0))


def test_linear_scan_bad_initial_state():
    with pytest.raises(ValueError, match=r"initial_state has shape \(3,\); expected \(2,\)"):
        linear_scan(torch.rand(2, 5), torch.randn(2, 5), torch.zeros(3))


# ----------------------------------------------------------------------------------------------
# Mamba2D


def test_mamba2d_shapes_and_backward():
    torch.manual_seed(0)
    m = Mamba2D(8, d_state=4)
    x = torch.randn(2, 5, 3, 8, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert x.grad.shape == x.shape and all(p.grad is not None for p in m.parameters())
    assert {n for n, _ in m.named_parameters()} >= {"in_proj.weight", "conv2d.weight", "x_proj.weight",
                                                    "dt_proj.weight", "dt_proj.bias", "A_log", "D",
                                                    "out_proj.weight"}
    torch.testing.assert_close(m(x.flatten(1, 2), hw=(5, 3)), y.flatten(1, 2))


def test_mamba2d_uses_2d_structure():
    """Transposing the image does not commute with the mixer: it is not a function of the pixel set."""
    torch.manual_seed(0)
    m = Mamba2D(8, d_state=4)
    x = torch.randn(1, 4, 4, 8)
    y, yt = m(x), m(x.transpose(1, 2)).transpose(1, 2)
    assert (y - yt).abs().max() > 1e-3


def test_mamba2d_bad_input():
    m = Mamba2D(8, d_state=4)
    with pytest.raises(ValueError, match=r"got \(2, 15, 8\) with hw=\(4, 4\)"):
        m(torch.randn(2, 15, 8), hw=(4, 4))
    with pytest.raises(ValueError, match="d_conv must be odd"):
        Mamba2D(8, d_conv=4)
