"""Tests of ssmkit.core.gla: chunked == ref == an independent fp64 loop (forward and gradients), reverse,
state continuation, one-step form, strong/weak decays, gradcheck and argument errors."""
import pytest
import torch
import torch.nn.functional as F

from ssmkit.core.gla import gla, gla_step

B, H, K, V = 2, 2, 8, 6


def _inputs(T, gate_scale=1.0, dtype=torch.float64, seed=0, with_state=True):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g, dtype=dtype)
    gk = F.logsigmoid(torch.randn(B, T, H, K, generator=g, dtype=dtype)) * gate_scale
    h0 = torch.randn(B, H, K, V, generator=g, dtype=dtype) if with_state else None
    return q, k, v, gk, h0


def _loop(q, k, v, gk, h0=None, scale=None):
    """S_t = diag(exp(gk_t)) S_{t-1} + k_tᵀ v_t, o_t = scale q_t S_t, in fp64, one (b, h) at a time."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, gk = (t.double() for t in (q, k, v, gk))
    outs, finals = [], []
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            S = torch.zeros(q.shape[3], v.shape[3], dtype=torch.float64) if h0 is None else h0[b, h].double()
            for t in range(q.shape[1]):
                S = torch.exp(gk[b, t, h])[:, None] * S + torch.outer(k[b, t, h], v[b, t, h])
                outs.append(scale * q[b, t, h] @ S)
            finals.append(S)
    batch, T, heads = q.shape[:3]
    o = torch.stack(outs).view(batch, heads, T, -1).transpose(1, 2)
    return o, torch.stack(finals).view(batch, heads, *finals[0].shape)


CASES = [(1, 64), (7, 4), (7, 64), (64, 64), (64, 16), (65, 64), (65, 24), (130, 64), (130, 32), (130, 20)]


@pytest.mark.parametrize("T,chunk", CASES, ids=[f"T{t}-c{c}" for t, c in CASES])
def test_matches_fp64_loop_forward_and_grads(T, chunk):
    inputs = [t.requires_grad_() for t in _inputs(T)]
    o_ref, s_ref = _loop(*inputs)
    go = torch.randn_like(o_ref)
    gs = torch.randn_like(s_ref)
    expect = torch.autograd.grad((o_ref * go).sum() + (s_ref * gs).sum(), inputs)
    for backend in ("ref", "chunked"):
        o, s = gla(*inputs[:4], initial_state=inputs[4], output_final_state=True, chunk_size=chunk,
                   backend=backend)
        torch.testing.assert_close(o, o_ref)
        torch.testing.assert_close(s, s_ref)
        got = torch.autograd.grad((o * go).sum() + (s * gs).sum(), inputs)
        for name, a, e in zip(("q", "k", "v", "gk", "initial_state"), got, expect):
            torch.testing.assert_close(a, e, msg=lambda m: f"{backend} d{name}: {m}")


@pytest.mark.parametrize("T,chunk", [(65, 16), (130, 64)])
def test_fp32_chunked_matches_loop(T, chunk):
    q, k, v, gk, h0 = _inputs(T, dtype=torch.float32)
    o, s = gla(q, k, v, gk, initial_state=h0, output_final_state=True, chunk_size=chunk)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    o_ref, s_ref = _loop(q, k, v, gk, h0)
    torch.testing.assert_close(o, o_ref.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s, s_ref.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gate_scale", [0.1, 1.0, 10.0])
def test_gate_scale_extremes_stay_finite_and_match(gate_scale):
    """Weak (0.1) to strong (10, per-step log decay around -7) forgetting, fp32, forward and grads."""
    inputs = _inputs(130, gate_scale)
    x32 = [t.float().requires_grad_() for t in inputs]
    x64 = [t.requires_grad_() for t in inputs]
    o, s = gla(*x32[:4], initial_state=x32[4], output_final_state=True, chunk_size=64)
    o_ref, s_ref = _loop(*x64)
    torch.testing.assert_close(o, o_ref.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s, s_ref.float(), rtol=1e-4, atol=1e-4)
    grads = torch.autograd.grad(o.sum() + s.sum(), x32)
    expect = torch.autograd.grad(o_ref.sum() + s_ref.sum(), x64)
    for name, a, e in zip(("q", "k", "v", "gk", "initial_state"), grads, expect):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, e.float(), rtol=1e-3, atol=1e-3, msg=lambda m: f"d{name}: {m}")


def test_very_strong_decay_does_not_overflow():
    """gk around -50 per step: exp(-cumsum) would overflow fp32 within two steps."""
    q, k, v, gk, _ = _inputs(64, gate_scale=1.0, dtype=torch.float32, with_state=False)
    gk = gk - 50.0
    o = gla(q, k, v, gk, chunk_size=64)
    torch.testing.assert_close(o, _loop(q, k, v, gk)[0].float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["ref", "chunked"])
def test_reverse_is_flip_gla_flip(backend):
    q, k, v, gk, h0 = _inputs(37)
    o, s = gla(q, k, v, gk, initial_state=h0, output_final_state=True, reverse=True, chunk_size=16,
               backend=backend)
    o_f, s_f = gla(*(t.flip(1) for t in (q, k, v, gk)), initial_state=h0, output_final_state=True,
                   chunk_size=16, backend=backend)
    torch.testing.assert_close(o, o_f.flip(1))
    torch.testing.assert_close(s, s_f)


@pytest.mark.parametrize("reverse", [False, True])
def test_initial_state_continuation(reverse):
    """Running two pieces with the state passed on equals one run over the whole sequence."""
    q, k, v, gk, h0 = _inputs(130)
    whole, s_whole = gla(q, k, v, gk, initial_state=h0, output_final_state=True, reverse=reverse)
    first, second = (slice(50, None), slice(None, 50)) if reverse else (slice(None, 50), slice(50, None))
    o1, s1 = gla(*(t[:, first] for t in (q, k, v, gk)), initial_state=h0, output_final_state=True,
                 reverse=reverse)
    o2, s2 = gla(*(t[:, second] for t in (q, k, v, gk)), initial_state=s1, output_final_state=True,
                 reverse=reverse)
    torch.testing.assert_close(whole[:, first], o1)
    torch.testing.assert_close(whole[:, second], o2)
    torch.testing.assert_close(s_whole, s2)


def test_steps_equal_full_sequence():
    q, k, v, gk, h0 = _inputs(20, dtype=torch.float32)
    o, s = gla(q, k, v, gk, initial_state=h0, output_final_state=True, scale=0.3)
    state = h0.clone()
    steps = torch.stack([gla_step(state, q[:, t], k[:, t], v[:, t], gk[:, t], scale=0.3)
                         for t in range(20)], dim=1)
    torch.testing.assert_close(steps, o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, s, rtol=1e-5, atol=1e-5)


def test_scale_default_is_inverse_sqrt_k():
    q, k, v, gk, _ = _inputs(9, with_state=False)
    torch.testing.assert_close(gla(q, k, v, gk), gla(q, k, v, gk, scale=K ** -0.5))
    torch.testing.assert_close(gla(q, k, v, gk, scale=1.0), gla(q * K ** 0.5, k, v, gk))


def test_gradcheck_tiny():
    """T = 11 in chunks of 10: padding, a state hand-off, and both intra-chunk paths (sub-chunks of 2)."""
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 11, 1, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 11, 1, 2, generator=g, dtype=torch.float64, requires_grad=True)
    gk = (F.logsigmoid(torch.randn(1, 11, 1, 3, generator=g, dtype=torch.float64)) * 2).requires_grad_()
    h0 = torch.randn(1, 1, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, gk, h0):
        return gla(q, k, v, gk, initial_state=h0, output_final_state=True, chunk_size=10)

    assert torch.autograd.gradcheck(f, (q, k, v, gk, h0))


def test_bad_arguments_name_the_argument_and_shapes():
    q, k, v, gk, h0 = _inputs(5)
    with pytest.raises(ValueError, match=r"q has shape \(5, 2, 8\)"):
        gla(q[0], k, v, gk)
    with pytest.raises(ValueError, match=r"k has shape \(2, 5, 2, 7\).*\(2, 5, 2, 8\)"):
        gla(q, k[..., :7], v, gk)
    with pytest.raises(ValueError, match=r"gk has shape \(2, 4, 2, 8\)"):
        gla(q, k, v, gk[:, :4])
    with pytest.raises(ValueError, match=r"v has shape \(2, 5, 3, 6\)"):
        gla(q, k, torch.zeros(2, 5, 3, 6, dtype=q.dtype), gk)
    with pytest.raises(ValueError, match=r"initial_state has shape \(2, 2, 6, 8\).*\(2, 2, 8, 6\)"):
        gla(q, k, v, gk, initial_state=h0.transpose(-1, -2))
    with pytest.raises(ValueError, match="chunk_size"):
        gla(q, k, v, gk, chunk_size=0)
    with pytest.raises(ValueError, match="backend 'triton'"):
        gla(q, k, v, gk, backend="triton")
    with pytest.raises(ValueError, match="T = 0"):
        gla(q[:, :0], k[:, :0], v[:, :0], gk[:, :0])
    with pytest.raises(ValueError, match=r"gla_step: state has shape \(2, 2, 8, 5\)"):
        gla_step(torch.zeros(2, 2, 8, 5), q[:, 0], k[:, 0], v[:, 0], gk[:, 0])
    with pytest.raises(ValueError, match=r"gla_step: v has shape"):
        gla_step(h0.clone(), q[:, 0], k[:, 0], v[:, 0, :1], gk[:, 0])
