"""Mamba-2's state-space duality (SSD): the selective scan with one scalar decay per head.

Per head h, with state S (headdim, d_state):

    dt  = clamp(softplus(dt + dt_bias) if dt_softplus else dt + dt_bias, *dt_limit)
    S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t B_tᵀ
    y_t = S_t C_t + D * x_t ;   y *= silu(z)  when z is given

Layouts of mamba_ssm's `mamba_chunk_scan_combined`: x, z (batch, L, heads, headdim); dt (batch, L, heads);
A (heads,) negative; B, C (batch, L, groups, d_state) with heads divisible by groups; D (heads,) or
(heads, headdim); states (batch, heads, headdim, d_state) in fp32 (fp64 for fp64 inputs). Because the
decay is a scalar per head, the scan is a product of matrices chunk by chunk, so the "chunked" backend
runs on matrix multiplications: inside a chunk of Q positions y = (L ∘ C Bᵀ) (dt x) with the decays
L[t, s] = exp(dt_{s+1} A + ... + dt_t A) built from segment sums (a masked cumulative sum, never a
difference of cumulative sums, so no precision is lost and nothing overflows); across chunks a short
loop carries the states. "ref" is a plain loop over time, the oracle.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from einops import rearrange

from ssmkit.util import compute_dtype, shape_error

__all__ = ["ssd_scan", "ssd_state_update", "BACKENDS"]

BACKENDS = ("ref", "chunked")
NO_LIMIT = (0.0, math.inf)


# ----------------------------------------------------------------------------------------------
# argument checks


def _check_float(name: str, t: torch.Tensor | None) -> None:
    if t is not None and not t.is_floating_point():
        raise ValueError(f"ssd_scan: {name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_shape(name: str, t: torch.Tensor | None, expected: tuple[int, ...], text: str) -> None:
    if t is not None and tuple(t.shape) != expected:
        raise shape_error("ssd_scan", name, t, f"{text} = {expected}")


def _check_bc(name: str, X: torch.Tensor, lead: tuple[int, ...], heads: int, text: str) -> None:
    _check_float(name, X)
    if X.dim() != len(lead) + 2 or tuple(X.shape[: len(lead)]) != lead:
        raise shape_error("ssd_scan", name, X, f"{text}, leading dimensions {lead}")
    if heads % X.shape[-2] != 0:
        raise ValueError(f"ssd_scan: {name} has {X.shape[-2]} groups, which does not divide heads={heads}")


def _check_common(x, dt, A, B, C, D, z, dt_bias, lead, text_lead):
    for name, t in (("x", x), ("dt", dt), ("A", A), ("D", D), ("z", z), ("dt_bias", dt_bias)):
        _check_float(name, t)
    heads, headdim = x.shape[-2:]
    _check_shape("dt", dt, (*lead, heads), f"({text_lead}, heads)")
    _check_shape("A", A, (heads,), "(heads,)")
    _check_shape("dt_bias", dt_bias, (heads,), "(heads,)")
    _check_shape("z", z, tuple(x.shape), "the shape of x")
    if D is not None and tuple(D.shape) not in ((heads,), (heads, headdim)):
        raise shape_error("ssd_scan", "D", D, f"(heads,) = ({heads},) or (heads, headdim) = ({heads}, {headdim})")
    _check_bc("B", B, lead, heads, f"({text_lead}, groups, d_state)")
    _check_bc("C", C, lead, heads, f"({text_lead}, groups, d_state)")
    if tuple(B.shape) != tuple(C.shape):
        raise ValueError(f"ssd_scan: B has shape {tuple(B.shape)} and C {tuple(C.shape)}; they must match")


def _check_scan_args(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, chunk_size):
    if x.dim() != 4:
        raise shape_error("ssd_scan", "x", x, "(batch, length, heads, headdim)")
    batch, length, heads, headdim = x.shape
    if length == 0:
        raise ValueError("ssd_scan: x has length 0; the sequence must have at least one step")
    _check_common(x, dt, A, B, C, D, z, dt_bias, (batch, length), "batch, length")
    _check_float("initial_state", initial_state)
    _check_shape("initial_state", initial_state, (batch, heads, headdim, B.shape[-1]),
                 "(batch, heads, headdim, d_state)")
    if seq_idx is not None:
        if seq_idx.is_floating_point() or seq_idx.is_complex() or seq_idx.dtype == torch.bool:
            raise ValueError(f"ssd_scan: seq_idx must be an integer tensor, got dtype {seq_idx.dtype}")
        _check_shape("seq_idx", seq_idx, (batch, length), "(batch, length)")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"ssd_scan: chunk_size must be a positive integer, got {chunk_size!r}")


def _pick_backend(backend: str | None) -> str:
    """`backend`, else SSMKIT_BACKEND when it names one of this op's backends, else "chunked"."""
    if backend is None:
        env = os.environ.get("SSMKIT_BACKEND")
        return env if env in BACKENDS else "chunked"
    if backend not in BACKENDS:
        raise ValueError(f"ssd_scan: unknown backend {backend!r}; choose one of {BACKENDS}")
    return backend


def _step_sizes(dt, dt_bias, dt_softplus, dt_limit, cd):
    dt = dt.to(cd)
    if dt_bias is not None:
        dt = dt + dt_bias.to(cd)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != NO_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _skip_and_gate(y, x, D, z, cd):
    if D is not None:
        y = y + (D.to(cd)[:, None] if D.dim() == 1 else D.to(cd)) * x.to(cd)
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y


# ----------------------------------------------------------------------------------------------
# public API


def ssd_scan(x, dt, A, B, C, *, chunk_size=None, D=None, z=None, dt_bias=None, dt_softplus=False,
             dt_limit=NO_LIMIT, initial_state=None, seq_idx=None, reverse=False, return_final_state=False,
             backend=None):
    """SSD over (batch, length, heads, headdim) inputs; see the module docstring for the recurrence.

    initial_state: the state before the first position (before the last one with `reverse`).
    seq_idx: (batch, length) ints; the state resets wherever it changes (packed sequences).
    reverse: scan from the last position to the first, S_t = exp(dt_t A) S_{t+1} + dt_t x_t B_tᵀ.
    chunk_size: positions per chunk of the chunked backend (default 64). backend: "ref", "chunked" or
    None ("chunked"; SSMKIT_BACKEND overrides None when it names one of these).
    Returns y (dtype of x), or (y, final_state) with the differentiable state after the last position.
    """
    _check_scan_args(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, chunk_size)
    name = _pick_backend(backend)
    cd = compute_dtype(x, dt, B)
    step = _step_sizes(dt, dt_bias, dt_softplus, dt_limit, cd)
    keep = None if seq_idx is None else _reset_gate(seq_idx, reverse)
    h0 = None if initial_state is None else initial_state.to(cd)
    xs, Bs, Cs, As = x.to(cd), B.to(cd), C.to(cd), A.to(cd)
    if name == "ref":
        y, last = _ssd_ref(xs, step, As, Bs, Cs, h0, keep, reverse)
    else:
        y, last = _ssd_chunked(xs, step, As, Bs, Cs, h0, keep, reverse, chunk_size or 64)
    y = _skip_and_gate(y, x, D, z, cd).to(x.dtype)
    return (y, last) if return_final_state else y


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=NO_LIMIT):
    """One decode step: updates `state` (batch, heads, headdim, d_state) in place and returns y.

    x, z: (batch, heads, headdim); dt: (batch, heads); B, C: (batch, groups, d_state); the rest as in
    `ssd_scan`. Equal to one position of `ssd_scan` continued from `state`.
    """
    _check_float("state", state)
    if x.dim() != 3:
        raise shape_error("ssd_scan", "x", x, "(batch, heads, headdim)")
    _check_common(x, dt, A, B, C, D, z, dt_bias, (x.shape[0],), "batch")
    _check_shape("state", state, (*x.shape, B.shape[-1]), "(batch, heads, headdim, d_state)")
    cd = compute_dtype(state, x)
    step = _step_sizes(dt, dt_bias, dt_softplus, dt_limit, cd)
    heads_per_group = x.shape[1] // B.shape[1]
    Bh, Ch = (t.to(cd).repeat_interleave(heads_per_group, dim=1) for t in (B, C))
    decay = torch.exp(step * A.to(cd))[..., None, None]
    new = state.to(cd) * decay + (step[..., None] * x.to(cd))[..., None] * Bh[:, :, None, :]
    state.copy_(new)
    y = (new @ Ch[..., None]).squeeze(-1)
    return _skip_and_gate(y, x, D, z, cd).to(x.dtype)


def _reset_gate(seq_idx: torch.Tensor, reverse: bool) -> torch.Tensor:
    """keep[b, t] = False where the state arriving at t (in scan order) belongs to another sequence."""
    keep = torch.ones(seq_idx.shape, dtype=torch.bool, device=seq_idx.device)
    same = seq_idx[:, 1:] == seq_idx[:, :-1]
    if reverse:
        keep[:, :-1] = same
    else:
        keep[:, 1:] = same
    return keep


# ----------------------------------------------------------------------------------------------
# "ref": a plain loop over time, differentiated by autograd


def _ssd_ref(x, dt, A, B, C, h0, keep, reverse):
    batch, length, heads, headdim = x.shape
    per_group = heads // B.shape[2]
    Bh, Ch = (t.repeat_interleave(per_group, dim=2) for t in (B, C))  # (batch, L, heads, N)
    h = x.new_zeros(batch, heads, headdim, B.shape[-1]) if h0 is None else h0
    ys = [None] * length
    for t in (reversed(range(length)) if reverse else range(length)):
        a = torch.exp(dt[:, t] * A)
        if keep is not None:
            a = a * keep[:, t, None]
        h = a[..., None, None] * h + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        ys[t] = (h @ Ch[:, t, :, :, None]).squeeze(-1)
    return torch.stack(ys, dim=1), h


# ----------------------------------------------------------------------------------------------
# "chunked": matrix products inside chunks, a loop over chunks between them


def _segment_sums(a: torch.Tensor) -> torch.Tensor:
    """seg[..., t, s] = a[..., s+1] + ... + a[..., t] for s <= t, -inf above the diagonal.

    A cumulative sum of a masked copy, so each entry sums only its own terms (no difference of two
    long sums); -inf terms (resets) stay -inf without producing NaN.
    """
    Q = a.shape[-1]
    below = torch.ones(Q, Q, dtype=torch.bool, device=a.device).tril(-1)
    terms = a[..., :, None].expand(*a.shape, Q).masked_fill(~below, 0.0)  # [r, s] = a_r for r > s
    above = torch.ones(Q, Q, dtype=torch.bool, device=a.device).triu(1)
    return terms.cumsum(-2).masked_fill(above, -math.inf)


def _ssd_chunked(x, dt, A, B, C, h0, keep, reverse, Q):
    batch, length, heads, headdim = x.shape
    G, N = B.shape[2:]
    Q = min(Q, length)
    nc = -(-length // Q)
    pad = nc * Q - length
    dA = dt * A
    if keep is not None:
        dA = dA.masked_fill(~keep[..., None], -math.inf)
    if pad:  # padded positions: no input and no decay, so they change nothing
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt, dA = F.pad(dt, (0, 0, 0, pad)), F.pad(dA, (0, 0, 0, pad))
    x = rearrange(x, "b (c q) (g k) p -> b c q g k p", q=Q, g=G)
    B, C = (rearrange(t, "b (c q) g n -> b c q g n", q=Q) for t in (B, C))
    dt, dA = (rearrange(t, "b (c q) (g k) -> b g k c q", q=Q, g=G) for t in (dt, dA))

    if reverse:  # decays from s down to t < s: a_t ... a_{s-1}, the forward sums of a shifted by one, transposed
        seg = _segment_sums(F.pad(dA, (1, -1))).transpose(-1, -2)
        state_weight = seg[..., 0, :]  # decay from each position to the chunk's first
        entry_weight = seg[..., :, -1] + dA[..., -1:]  # decay from the chunk after to each position
    else:
        seg = _segment_sums(dA)
        state_weight = seg[..., -1, :]
        entry_weight = seg[..., :, 0] + dA[..., :1]
    dtx_weight = torch.exp(state_weight) * dt

    # inside each chunk: y_t = sum_s exp(seg[t, s]) (C_t . B_s) dt_s x_s
    CB = torch.einsum("bctgn,bcsgn->bgcts", C, B)
    scores = torch.exp(seg) * CB[:, :, None] * dt[..., None, :]
    y = torch.einsum("bgkcts,bcsgkp->bctgkp", scores, x)

    # each chunk's own end state, then the states carried across chunks
    local = torch.einsum("bgkcs,bcsgkp,bcsgn->bcgkpn", dtx_weight, x, B)
    chunk_decay = torch.exp(dA.sum(-1))[..., None, None].unbind(3)  # per chunk (b, g, k, 1, 1)
    local = local.unbind(1)  # one view per chunk, so that backward assembles their gradients once
    s = x.new_zeros(batch, G, heads // G, headdim, N) if h0 is None else h0.reshape(batch, G, -1, headdim, N)
    entering = [None] * nc
    for c in (reversed(range(nc)) if reverse else range(nc)):
        entering[c] = s
        s = chunk_decay[c] * s + local[c]
    entering = torch.stack(entering, dim=1)  # (b, c, g, k, p, n)
    y = y + torch.einsum("bctgn,bcgkpn->bctgkp", C, entering) * rearrange(
        torch.exp(entry_weight), "b g k c t -> b c t g k 1")
    y = rearrange(y, "b c t g k p -> b (c t) (g k) p")[:, :length]
    return y, s.reshape(batch, heads, headdim, N)
