"""SSD (Mamba-2's scan): the chunked backend against the loop, and the properties the op promises."""
import math

import pytest
import torch

from ssmkit.core.scan import selective_scan
from ssmkit.core.ssd import ssd_scan, ssd_state_update


def make_inputs(batch=2, length=65, heads=4, headdim=3, groups=2, d_state=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_()

    return dict(
        x=rand(batch, length, heads, headdim),
        dt=(torch.rand(batch, length, heads, generator=g, dtype=dtype) * 0.5).requires_grad_(),
        A=(-torch.rand(heads, generator=g, dtype=dtype) * 2 - 0.1).requires_grad_(),
        B=rand(batch, length, groups, d_state, scale=0.5),
        C=rand(batch, length, groups, d_state, scale=0.5),
    )


def extras(inp, *, D=None, z=False, dt_bias=False, initial_state=False):
    batch, length, heads, headdim = inp["x"].shape
    g = torch.Generator().manual_seed(1)
    out = {}
    dtype = inp["x"].dtype
    if D == "head":
        out["D"] = torch.randn(heads, generator=g, dtype=dtype).requires_grad_()
    elif D == "channel":
        out["D"] = torch.randn(heads, headdim, generator=g, dtype=dtype).requires_grad_()
    if z:
        out["z"] = torch.randn(batch, length, heads, headdim, generator=g, dtype=dtype).requires_grad_()
    if dt_bias:
        out["dt_bias"] = (torch.randn(heads, generator=g, dtype=dtype) * 0.3).requires_grad_()
    if initial_state:
        out["initial_state"] = torch.randn(batch, heads, headdim, inp["B"].shape[-1], generator=g,
                                           dtype=dtype).requires_grad_()
    return out


def grads(out, tensors, seed=2):
    y, last = out
    g = torch.Generator().manual_seed(seed)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum() + (last * last.detach()).sum()
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def assert_close_all(a, b, tol=1e-9):
    for u, v in zip(a, b):
        if u is None or v is None:
            assert u is None and v is None
        else:
            torch.testing.assert_close(u, v, rtol=tol, atol=tol)


@pytest.mark.parametrize("length,chunk", [(1, 64), (63, 64), (64, 64), (65, 64), (200, 64), (200, 48), (65, 16)])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("reverse", [False, True])
def test_chunked_matches_ref_forward_and_backward(length, chunk, groups, reverse):
    inp = make_inputs(length=length, groups=groups)
    ext = extras(inp, D="head", z=True, dt_bias=True, initial_state=True)
    tensors = [*inp.values(), *ext.values()]
    kw = dict(dt_softplus=True, reverse=reverse, return_final_state=True, **ext)
    ref = ssd_scan(**inp, backend="ref", **kw)
    fast = ssd_scan(**inp, backend="chunked", chunk_size=chunk, **kw)
    assert_close_all(ref, fast)
    assert_close_all(grads(ref, tensors), grads(fast, tensors))


@pytest.mark.parametrize("options", [
    dict(),
    dict(D="channel"),
    dict(z=True),
    dict(dt_bias=True, dt_softplus=True, dt_limit=(0.1, 0.6)),
])
def test_options_match_ref(options):
    inp = make_inputs(length=70)
    opts = dict(options)
    softplus, limit = opts.pop("dt_softplus", False), opts.pop("dt_limit", (0.0, math.inf))
    ext = extras(inp, **opts)
    tensors = [*inp.values(), *ext.values()]
    kw = dict(dt_softplus=softplus, dt_limit=limit, return_final_state=True, **ext)
    ref = ssd_scan(**inp, backend="ref", **kw)
    fast = ssd_scan(**inp, backend="chunked", chunk_size=32, **kw)
    assert_close_all(ref, fast)
    assert_close_all(grads(ref, tensors), grads(fast, tensors))


def test_gradcheck_chunked_fp64():
    inp = make_inputs(batch=1, length=9, heads=2, headdim=2, groups=1, d_state=3)
    ext = extras(inp, D="head", z=True, dt_bias=True, initial_state=True)
    names = [*inp, *ext]

    def fn(*tensors):
        kw = dict(zip(names, tensors))
        return ssd_scan(**kw, chunk_size=4, dt_softplus=True, return_final_state=True, backend="chunked")

    assert torch.autograd.gradcheck(fn, [*inp.values(), *ext.values()])


@pytest.mark.parametrize("reverse", [False, True])
def test_split_equals_whole_with_initial_state(reverse):
    inp = make_inputs(length=90)
    y, last = ssd_scan(**inp, chunk_size=32, reverse=reverse, return_final_state=True)
    cut = 37
    first = {k: (v[:, cut:] if reverse else v[:, :cut]) if v.dim() > 1 else v for k, v in inp.items()}
    second = {k: (v[:, :cut] if reverse else v[:, cut:]) if v.dim() > 1 else v for k, v in inp.items()}
    y1, s1 = ssd_scan(**first, chunk_size=32, reverse=reverse, return_final_state=True)
    y2, s2 = ssd_scan(**second, chunk_size=32, reverse=reverse, initial_state=s1, return_final_state=True)
    whole = torch.cat([y2, y1] if reverse else [y1, y2], dim=1)
    torch.testing.assert_close(whole, y)
    torch.testing.assert_close(s2, last)


@pytest.mark.parametrize("backend", ["ref", "chunked"])
@pytest.mark.parametrize("reverse", [False, True])
def test_seq_idx_equals_separate_scans(backend, reverse):
    # boundaries inside a chunk, exactly at a chunk edge (32) and near the end
    bounds = [0, 13, 32, 70, 99, 100]
    inp = make_inputs(batch=1, length=100)
    seq_idx = torch.zeros(1, 100, dtype=torch.int32)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        seq_idx[:, a:b] = i
    y = ssd_scan(**inp, seq_idx=seq_idx, chunk_size=32, reverse=reverse, backend=backend)
    parts = [ssd_scan(**{k: v[:, a:b] if v.dim() > 1 else v for k, v in inp.items()}, reverse=reverse,
                      backend="ref") for a, b in zip(bounds[:-1], bounds[1:])]
    torch.testing.assert_close(y, torch.cat(parts, dim=1))
    tensors = list(inp.values())
    g_whole = torch.autograd.grad((y * y).sum(), tensors)
    g_parts = torch.autograd.grad(sum((p * p).sum() for p in parts), tensors)
    assert_close_all(g_whole, g_parts)


def test_reverse_equals_flipped_scan():
    inp = make_inputs(length=77)
    ext = extras(inp, D="head", z=True)
    flipped = {k: v.flip(1) if v.dim() > 2 else v for k, v in {**inp, **ext}.items()}
    y = ssd_scan(**inp, **ext, chunk_size=32, reverse=True)
    torch.testing.assert_close(y, ssd_scan(**flipped, chunk_size=32).flip(1))


def test_decode_steps_equal_one_scan():
    inp = make_inputs(length=12)
    ext = extras(inp, D="channel", z=True, dt_bias=True, initial_state=True)
    y, last = ssd_scan(**inp, **ext, dt_softplus=True, dt_limit=(0.0, 0.9), return_final_state=True)
    state = ext["initial_state"].detach().clone()
    with torch.no_grad():
        steps = [ssd_state_update(state, inp["x"][:, t], inp["dt"][:, t], inp["A"], inp["B"][:, t], inp["C"][:, t],
                                  D=ext["D"], z=ext["z"][:, t], dt_bias=ext["dt_bias"], dt_softplus=True,
                                  dt_limit=(0.0, 0.9)) for t in range(12)]
    torch.testing.assert_close(torch.stack(steps, 1), y.detach())
    torch.testing.assert_close(state, last.detach())


def test_equals_mamba1_scan_with_a_constant_over_states():
    inp = make_inputs(length=40, heads=4, headdim=3, groups=2, d_state=5)
    D = torch.randn(4, dtype=torch.float64)
    z = torch.randn(2, 40, 4, 3, dtype=torch.float64)
    y = ssd_scan(**inp, D=D, z=z, chunk_size=16)
    x, dt, A, B, C = (inp[k].detach() for k in ("x", "dt", "A", "B", "C"))
    b, L, H, P = x.shape
    u = x.reshape(b, L, H * P).transpose(1, 2)
    delta = dt.repeat_interleave(P, dim=2).transpose(1, 2)
    A1 = A.repeat_interleave(P)[:, None].expand(H * P, 5)
    y1 = selective_scan(u, delta, A1, B.permute(0, 2, 3, 1), C.permute(0, 2, 3, 1), D=D.repeat_interleave(P),
                        z=z.reshape(b, L, H * P).transpose(1, 2), backend="ref")
    torch.testing.assert_close(y.detach(), y1.transpose(1, 2).reshape(b, L, H, P))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_compute_in_fp32(dtype):
    inp = {k: v.detach() for k, v in make_inputs(length=40, dtype=torch.float32).items()}
    y, last = ssd_scan(**{k: v.to(dtype) for k, v in inp.items()}, return_final_state=True)
    assert y.dtype == dtype and last.dtype == torch.float32
    low = {k: v.to(dtype).float() for k, v in inp.items()}
    torch.testing.assert_close(y.float(), ssd_scan(**low, backend="ref"), rtol=2e-2, atol=2e-2)


def test_long_sequence_with_strong_decay_stays_finite():
    inp = {k: v.detach() for k, v in make_inputs(batch=1, length=600, dtype=torch.float32).items()}
    inp["dt"] = inp["dt"] * 40  # decays down to exp(-84) per step
    y, last = ssd_scan(**inp, chunk_size=256, return_final_state=True)
    ref, ref_last = ssd_scan(**inp, backend="ref", return_final_state=True)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last, ref_last, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("change,message", [
    (dict(x=torch.zeros(2, 10, 4)), "x has shape (2, 10, 4)"),
    (dict(dt=torch.zeros(2, 10, 3)), "dt has shape (2, 10, 3); expected (batch, length, heads) = (2, 10, 4)"),
    (dict(A=torch.zeros(4, 5)), "A has shape (4, 5)"),
    (dict(B=torch.zeros(2, 10, 3, 5), C=torch.zeros(2, 10, 3, 5)), "B has 3 groups, which does not divide heads=4"),
    (dict(C=torch.zeros(2, 10, 2, 6)), "B has shape (2, 10, 2, 5) and C (2, 10, 2, 6)"),
    (dict(D=torch.zeros(3)), "D has shape (3,)"),
    (dict(initial_state=torch.zeros(2, 4, 3, 4)), "initial_state has shape (2, 4, 3, 4)"),
    (dict(seq_idx=torch.zeros(2, 10)), "seq_idx must be an integer tensor"),
    (dict(x=torch.zeros(2, 0, 4, 3), dt=torch.zeros(2, 0, 4), B=torch.zeros(2, 0, 2, 5), C=torch.zeros(2, 0, 2, 5)),
     "x has length 0"),
    (dict(backend="triton"), "unknown backend 'triton'"),
])
def test_bad_arguments_name_the_argument(change, message):
    args = dict(x=torch.zeros(2, 10, 4, 3), dt=torch.zeros(2, 10, 4), A=-torch.ones(4), B=torch.zeros(2, 10, 2, 5),
                C=torch.zeros(2, 10, 2, 5))
    args.update(change)
    with pytest.raises(ValueError) as err:
        ssd_scan(**args)
    assert str(err.value).startswith("ssd_scan: ") and message in str(err.value)


def test_strided_inputs_give_the_same_result():
    inp = make_inputs(length=70)
    # the same values in permuted (dense, non-contiguous) and in gapped (sliced) layouts
    strided = {k: v.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() if v.dim() == 4 else v
               for k, v in inp.items()}
    strided["dt"] = torch.cat([inp["dt"].detach(), inp["dt"].detach()], -1)[..., :4].requires_grad_()
    ext = extras(inp, z=True, initial_state=True)
    y, last = ssd_scan(**inp, **ext, chunk_size=32, return_final_state=True)
    ys, lasts = ssd_scan(**strided, **ext, chunk_size=32, return_final_state=True)
    torch.testing.assert_close(ys, y)
    torch.testing.assert_close(lasts, last)
    g = torch.autograd.grad((y * y).sum() + last.sum(), list(inp.values()))
    gs = torch.autograd.grad((ys * ys).sum() + lasts.sum(), list(strided.values()))
    assert_close_all(g, gs)


@pytest.mark.gpu
def test_gpu_chunked_matches_cpu_at_mamba2_sizes():
    """The chunked SSD on CUDA (what Mamba2 runs there until a Triton SSD exists) with bf16 inputs and
    fp32 state, against the CPU computation on the same (bf16-rounded) values in fp32: forward and every
    gradient, compared by relative error norm."""
    inp = {k: v.detach() for k, v in make_inputs(batch=2, length=1000, heads=8, headdim=64, groups=1,
                                                  d_state=128, dtype=torch.float32).items()}
    args = {**inp, **{k: v.detach() for k, v in extras(inp, D="head", dt_bias=True).items()}}
    low = {k: v.to(torch.bfloat16) if v.dim() > 1 else v for k, v in args.items()}
    cpu = {k: v.float().clone().requires_grad_() for k, v in low.items()}
    gpu = {k: v.clone().cuda().requires_grad_() for k, v in low.items()}
    y, yg = ssd_scan(**cpu, dt_softplus=True), ssd_scan(**gpu, dt_softplus=True)
    assert yg.dtype == torch.bfloat16

    def rel(a, b):
        return float((a.detach().float().cpu() - b.detach()).norm() / b.detach().norm())

    assert rel(yg, y) < 1e-2
    probe = torch.randn(y.shape)
    (y * probe).sum().backward()
    (yg.float() * probe.cuda()).sum().backward()
    for name in args:
        assert rel(gpu[name].grad, cpu[name].grad) < 2e-2, name
