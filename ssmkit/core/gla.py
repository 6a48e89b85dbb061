"""Gated linear attention (GLA), the recurrence behind ViG, in fla's time-major layout.

Per batch element and head, with a K×V state S and a log-space forget gate gk_t <= 0 per key dim:

    S_t = diag(exp(gk_t)) S_{t-1} + k_tᵀ v_t          o_t = scale · q_t S_t

q, k, gk: (batch, T, heads, K); v: (batch, T, heads, V); o: (batch, T, heads, V). As in fla
(`naive_recurrent_gla`, `chunk_gla`), scale defaults to K^-1/2 and multiplies q; the state is
(batch, heads, K, V) and kept in fp32 (fp64 for fp64 inputs). `reverse=True` runs the same recurrence
from the last position to the first (S_t built from S_{t+1}), i.e. flip ∘ gla ∘ flip along T.

Backends: "ref" (a loop over time, the oracle) and "chunked" (the default): the sequence is cut into
chunks of `chunk_size` (each padded to a power of two with steps that change nothing); inside a chunk
the outputs are matmuls, and a K×V state is passed from chunk to chunk in a short loop.
Stability: every exponential has an argument <= 0, so strong decays underflow to zero (their true
value) and never overflow, unlike the factorisation q·exp(b) / k·exp(-b) with b the gate cumsum. With
b local to the chunk, the state terms use exp(b_t) and exp(b_last - b_j). The intra-chunk part
Σ_{j<=t} (q_t ⊙ exp(b_t - b_j))·k_j v_j uses secondary chunking applied recursively: at block sizes
m = 1, 2, 4, …, the right half of every block of 2m positions receives from its left half through
r = b at the end of the left half, as (q ⊙ exp(b - r)) (k ⊙ exp(r - b))ᵀ v; the j = t terms need no
decay. That is log2(chunk) matmul levels and no (T, chunk, K) pairwise tensor. Gradients come from
autograd through the same expressions. A Triton kernel belongs to ssmkit.kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ssmkit.util import compute_dtype

__all__ = ["gla", "gla_step", "GLA_BACKENDS"]

GLA_BACKENDS = ("ref", "chunked")


def _shape(t) -> tuple:
    return tuple(t.shape)


def _check_gla_args(q, k, v, gk, initial_state, chunk_size, backend):
    for name, t in (("q", q), ("k", k), ("v", v), ("gk", gk)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"gla: {name} must be a floating-point tensor")
    if q.dim() != 4:
        raise ValueError(f"gla: q has shape {_shape(q)}; expected (batch, T, heads, K)")
    batch, T, heads, K = q.shape
    if T == 0:
        raise ValueError(f"gla: q has shape {_shape(q)} with T = 0; the sequence needs at least one step")
    for name, t in (("k", k), ("gk", gk)):
        if t.shape != q.shape:
            raise ValueError(f"gla: {name} has shape {_shape(t)}; expected (batch, T, heads, K) = "
                             f"{_shape(q)}, the shape of q")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"gla: v has shape {_shape(v)}; expected (batch, T, heads, V) = "
                         f"({batch}, {T}, {heads}, V) to match q {_shape(q)}")
    if initial_state is not None and _shape(initial_state) != (batch, heads, K, v.shape[-1]):
        raise ValueError(f"gla: initial_state has shape {_shape(initial_state)}; expected "
                         f"(batch, heads, K, V) = {(batch, heads, K, v.shape[-1])}")
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"gla: chunk_size must be a positive integer, got {chunk_size!r}")
    if backend not in (None,) + GLA_BACKENDS:
        raise ValueError(f"gla: unknown backend {backend!r}; choose one of {GLA_BACKENDS} or None")


def gla(q, k, v, gk, scale=None, initial_state=None, output_final_state=False, reverse=False, chunk_size=64,
        backend=None):
    """Gated linear attention; see the module docstring for the recurrence and layouts.

    initial_state: (batch, heads, K, V), the state before the first step (before position T-1 when
    `reverse`). backend: "ref", "chunked" or None (= "chunked"). Returns o (dtype of v), or
    (o, final_state) with final_state (batch, heads, K, V) fp32 (fp64 for fp64 inputs), differentiable.
    """
    _check_gla_args(q, k, v, gk, initial_state, chunk_size, backend)
    cd = compute_dtype(q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    seq = [t.to(cd).transpose(1, 2) for t in (q, k, v, gk)]  # (batch, heads, T, ·)
    if reverse:
        seq = [t.flip(2) for t in seq]
    q_, k_, v_, g_ = seq
    h0 = None if initial_state is None else initial_state.to(cd)
    if backend == "ref":
        o, state = _gla_ref(q_ * scale, k_, v_, g_, h0)
    else:
        o, state = _gla_chunked(q_ * scale, k_, v_, g_, h0, int(chunk_size))
    if reverse:
        o = o.flip(2)
    o = o.transpose(1, 2).to(v.dtype)
    return (o, state) if output_final_state else o


def gla_step(state, q, k, v, gk, scale=None):
    """One GLA step: q, k, gk (batch, heads, K), v (batch, heads, V); updates `state` (batch, heads, K, V)
    in place, as `gla` with `initial_state=state` on a length-1 sequence would, and returns o (dtype of v)."""
    if q.dim() != 3:
        raise ValueError(f"gla_step: q has shape {_shape(q)}; expected (batch, heads, K)")
    for name, t in (("k", k), ("gk", gk)):
        if t.shape != q.shape:
            raise ValueError(f"gla_step: {name} has shape {_shape(t)}; expected (batch, heads, K) = "
                             f"{_shape(q)}")
    if v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"gla_step: v has shape {_shape(v)}; expected (batch, heads, V) = "
                         f"({q.shape[0]}, {q.shape[1]}, V)")
    if _shape(state) != _shape(q) + (v.shape[-1],):
        raise ValueError(f"gla_step: state has shape {_shape(state)}; expected (batch, heads, K, V) = "
                         f"{_shape(q) + (v.shape[-1],)}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    sd = state.dtype
    state.mul_(gk.to(sd).exp().unsqueeze(-1)).add_(k.to(sd).unsqueeze(-1) * v.to(sd).unsqueeze(-2))
    o = torch.einsum("bhk,bhkv->bhv", q.to(sd) * scale, state)
    return o.to(v.dtype)


def _gla_ref(q, k, v, g, h0):
    """The recurrence as a loop over time; inputs (batch, heads, T, ·), q already scaled."""
    batch, heads, T, K = q.shape
    state = q.new_zeros(batch, heads, K, v.shape[-1]) if h0 is None else h0
    out = []
    for t in range(T):
        state = g[:, :, t].exp().unsqueeze(-1) * state + k[:, :, t].unsqueeze(-1) * v[:, :, t].unsqueeze(-2)
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], state))
    return torch.stack(out, dim=2), state


def _intra_chunk(q, k, v, b):
    """Σ_{j<=t} (q_t ⊙ exp(b_t - b_j))·k_j v_j within chunks (..., P, ·), P a power of two, b the local
    gate cumsum. Recursive halving: each block of 2m positions adds what its right half receives from
    its left half, through r = b at the end of the left half (every exponent <= 0)."""
    P, K, V = q.shape[-2], q.shape[-1], v.shape[-1]
    o = (q * k).sum(-1, keepdim=True) * v  # j = t
    m = 1
    while m < P:
        shape = q.shape[:-2] + (P // (2 * m), 2, m)
        qb, kb, vb, bb = (t.reshape(*shape, t.shape[-1]) for t in (q, k, v, b))
        r = bb[..., 0, -1:, :]
        q_right = qb[..., 1, :, :] * (bb[..., 1, :, :] - r).exp()
        k_left = kb[..., 0, :, :] * (r - bb[..., 0, :, :]).exp()
        if m * (K + V) <= 2 * K * V:  # (m x m) attention block, else via the (K x V) block state
            o_right = (q_right @ k_left.transpose(-1, -2)) @ vb[..., 0, :, :]
        else:
            o_right = q_right @ (k_left.transpose(-1, -2) @ vb[..., 0, :, :])
        o.view(*shape, V)[..., 1, :, :] += o_right
        m *= 2
    return o


def _pad_rows(t, n):
    """Append n zero rows along dim -2 (no copy when n = 0)."""
    return F.pad(t, (0, 0, 0, n)) if n else t


def _gla_chunked(q, k, v, g, h0, chunk_size):
    """Chunked GLA on (batch, heads, T, ·) inputs, q already scaled: matmuls inside chunks, a loop over
    chunks that passes the K×V state. Steps with k = v = 0 and gk = 0 change nothing, so the sequence is
    padded with them to whole chunks, and each chunk to a power of two (their outputs are dropped)."""
    batch, heads, T, K = q.shape
    V = v.shape[-1]
    C = min(chunk_size, T)
    N = -(-T // C)
    P = 1 << (C - 1).bit_length()
    q, k, v, g = (_pad_rows(_pad_rows(t, N * C - T).reshape(batch, heads, N, C, t.shape[-1]), P - C)
                  for t in (q, k, v, g))
    b = g.cumsum(-2)  # gate cumsum local to each chunk, <= 0 and non-increasing
    b_last = b[..., -1, :]  # (batch, heads, N, K)
    o = _intra_chunk(q, k, v, b)  # (batch, heads, N, P, V)
    chunk_update = ((b_last.unsqueeze(-2) - b).exp() * k).transpose(-1, -2) @ v  # (batch, heads, N, K, V)
    decay = b_last.exp().unsqueeze(-1)
    state = q.new_zeros(batch, heads, K, V) if h0 is None else h0
    before = []
    for n in range(N):
        before.append(state)
        state = decay[:, :, n] * state + chunk_update[:, :, n]
    o = o + (q * b.exp()) @ torch.stack(before, dim=2)
    return o[..., :C, :].reshape(batch, heads, N * C, V)[:, :, :T], state
