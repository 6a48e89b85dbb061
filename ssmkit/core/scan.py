"""The 1-D selective scan (Mamba's S6) and its one-step update for generation.

    dt  = softplus(delta + delta_bias) if delta_softplus else delta + delta_bias
    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t          (per channel d and state n)
    y_t = sum_n C_t[n] h_t[n] + D * u_t ;   y *= silu(z)  when z is given

Same layouts and semantics as mamba_ssm's `selective_scan_fn`, plus `initial_state`, a differentiable
last state, `reverse` and packed sequences (`seq_idx`). Four backends compute the same function:
"ref" (a plain loop over time, the oracle), "chunked" (parallel pure PyTorch), "cpu" (fused C kernels
compiled at first use, the CPU default where a C compiler is found) and "triton" (GPU kernels); the
last two live in ssmkit.kernels. The state and all accumulation are fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from einops import rearrange

from ssmkit.util import compute_dtype, shape_error

__all__ = ["selective_scan", "selective_state_update", "linear_scan", "BACKENDS"]

BACKENDS = ("ref", "chunked", "cpu", "triton")


# ----------------------------------------------------------------------------------------------
# argument checks


def _check_float(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise ValueError(f"selective_scan: {name} must be a floating-point tensor, got dtype {t.dtype}")


def _normalize_bc(name: str, X: torch.Tensor, batch: int, dim: int, d_state: int, length: int) -> torch.Tensor:
    """Return B or C as (batch, groups, d_state, length); time-invariant (dim, d_state) becomes groups=dim."""
    _check_float(name, X)
    expected = (f"(batch, d_state, length) = ({batch}, {d_state}, {length}), "
                f"(batch, groups, d_state, length) = ({batch}, G, {d_state}, {length}) "
                f"or time-invariant (dim, d_state) = ({dim}, {d_state})")
    if X.dim() == 2:
        if tuple(X.shape) != (dim, d_state):
            raise shape_error("selective_scan", name, X, expected)
        return X.unsqueeze(0).unsqueeze(-1).expand(batch, dim, d_state, length)
    if X.dim() == 3:
        X = X.unsqueeze(1)
    if X.dim() != 4 or X.shape[0] != batch or X.shape[2] != d_state or X.shape[3] != length:
        raise shape_error("selective_scan", name, X, expected)
    if dim % X.shape[1] != 0:
        raise ValueError(f"selective_scan: {name} has {X.shape[1]} groups, which does not divide dim={dim}")
    return X


def _check_vector(name: str, v: torch.Tensor | None, dim: int) -> None:
    if v is not None:
        _check_float(name, v)
        if tuple(v.shape) != (dim,):
            raise shape_error("selective_scan", name, v, f"(dim,) = ({dim},)")


def _check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx):
    for name, t in (("u", u), ("delta", delta), ("A", A)):
        _check_float(name, t)
    if u.dim() != 3:
        raise shape_error("selective_scan", "u", u, "(batch, dim, length)")
    batch, dim, length = u.shape
    if length == 0:
        raise ValueError("selective_scan: u has length 0; the sequence must have at least one step")
    if tuple(delta.shape) != tuple(u.shape):
        raise shape_error("selective_scan", "delta", delta, f"(batch, dim, length) = {tuple(u.shape)}, the shape of u")
    if A.dim() != 2 or A.shape[0] != dim:
        raise shape_error("selective_scan", "A", A, f"(dim, d_state) = ({dim}, N)")
    if A.is_complex():
        raise ValueError("selective_scan: complex A is not supported; pass a real A (e.g. -exp(A_log))")
    d_state = A.shape[1]
    B = _normalize_bc("B", B, batch, dim, d_state, length)
    C = _normalize_bc("C", C, batch, dim, d_state, length)
    _check_vector("D", D, dim)
    _check_vector("delta_bias", delta_bias, dim)
    if z is not None:
        _check_float("z", z)
        if tuple(z.shape) != tuple(u.shape):
            raise shape_error("selective_scan", "z", z, f"(batch, dim, length) = {tuple(u.shape)}, the shape of u")
    if initial_state is not None:
        _check_float("initial_state", initial_state)
        if tuple(initial_state.shape) != (batch, dim, d_state):
            raise shape_error("selective_scan",
                              "initial_state", initial_state, f"(batch, dim, d_state) = ({batch}, {dim}, {d_state})")
    if seq_idx is not None:
        if seq_idx.is_floating_point() or seq_idx.is_complex() or seq_idx.dtype == torch.bool:
            raise ValueError(f"selective_scan: seq_idx must be an integer tensor, got dtype {seq_idx.dtype}")
        if tuple(seq_idx.shape) != (batch, length):
            raise shape_error("selective_scan", "seq_idx", seq_idx, f"(batch, length) = ({batch}, {length})")
    return B, C


# ----------------------------------------------------------------------------------------------
# backend choice


def _pick_backend(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    name = backend or os.environ.get("SSMKIT_BACKEND") or None
    if name is None:  # the Triton kernels compute in fp32, so fp64 stays on the PyTorch path
        if device.type == "cuda":
            return "triton" if dtype != torch.float64 and _triton_ready(device) else "chunked"
        return "cpu" if device.type == "cpu" and _cpu_ready() else "chunked"
    if name not in BACKENDS:
        raise ValueError(f"selective_scan: unknown backend {name!r}; choose one of {BACKENDS}")
    if name == "triton" and not _triton_ready(device):
        raise RuntimeError(f"selective_scan: the triton backend is not available for device {device} "
                           "(needs a CUDA device and the triton package, or TRITON_INTERPRET=1 for CPU tests)")
    if name == "cpu" and not (device.type == "cpu" and _cpu_ready()):
        raise RuntimeError(f"selective_scan: the cpu backend is not available for device {device} "
                           "(needs CPU tensors and a C compiler: $CC or cc)")
    return name


def _cpu_ready() -> bool:
    from ssmkit.kernels.cpu import available

    return available()


def _triton_ready(device: torch.device) -> bool:
    try:
        from ssmkit.kernels import triton_available
    except ImportError:
        return False
    return triton_available(device)


def reset_gate(seq_idx: torch.Tensor, reverse: bool, dtype: torch.dtype) -> torch.Tensor:
    """keep[b, t] = 0 where position t starts a new packed sequence (in scan order), else 1, in `dtype`
    (bool for a mask); shared with the SSD scan."""
    keep = torch.ones(seq_idx.shape, dtype=dtype, device=seq_idx.device)
    same = (seq_idx[:, 1:] == seq_idx[:, :-1]).to(dtype)
    if reverse:
        keep[:, :-1] = same
    else:
        keep[:, 1:] = same
    return keep


# ----------------------------------------------------------------------------------------------
# public API


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, initial_state=None, reverse=False, seq_idx=None, backend=None):
    """Selective scan over (batch, dim, length) inputs; see the module docstring for the recurrence.

    A: (dim, d_state) real. B, C: (batch, d_state, length), grouped (batch, groups, d_state, length)
    or time-invariant (dim, d_state). D, delta_bias: (dim,). initial_state: (batch, dim, d_state).
    reverse: scan from the last position to the first. seq_idx: (batch, length) ints; the state resets
    where it changes (packed variable-length sequences). backend: "ref", "chunked", "triton" or None
    (fastest available: "triton" on CUDA, "cpu" on CPU, else "chunked"; the SSMKIT_BACKEND environment
    variable overrides None).
    Returns y (dtype of u), or (y, last_state) with last_state (batch, dim, d_state), differentiable,
    in fp32 (fp64 when u is fp64).
    """
    B, C = _check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
    name = _pick_backend(backend, u.device, u.dtype)
    cd = compute_dtype(u)
    if name == "cpu":
        from ssmkit.kernels.cpu import selective_scan_cpu

        y, last = selective_scan_cpu(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, reverse,
                                     seq_idx, cd)
        y = y.to(u.dtype)
    elif name == "triton":
        from ssmkit.kernels.selective_scan import selective_scan_triton

        y, last = selective_scan_triton(u, delta, A.to(cd), B, C, _opt(D, cd), z, _opt(delta_bias, cd),
                                        delta_softplus, _opt(initial_state, cd), reverse, seq_idx)
    else:
        dt = delta.to(cd)
        if delta_bias is not None:
            dt = dt + delta_bias.to(cd)[:, None]
        if delta_softplus:
            dt = F.softplus(dt)
        keep = None if seq_idx is None else reset_gate(seq_idx, reverse, cd)
        groups = math.lcm(B.shape[1], C.shape[1])  # one grouping for both (e.g. B shared, C per channel)
        B, C = (X if X.shape[1] == groups else X.repeat_interleave(groups // X.shape[1], dim=1) for X in (B, C))
        scan = _scan_ref if name == "ref" else chunked_scan
        y, last = scan(u.to(cd), dt, A.to(cd), B.to(cd), C.to(cd), _opt(initial_state, cd), keep, reverse)
        if D is not None:
            y = y + D.to(cd)[:, None] * u.to(cd)
        if z is not None:
            y = y * F.silu(z.to(cd))
        y = y.to(u.dtype)
    return (y, last) if return_last_state else y


def _opt(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, *,
                           backend=None):
    """One step of the scan for generation: updates `state` (batch, dim, d_state) in place, returns y.

    x, dt, z: (batch, dim). A: (dim, d_state). B, C: (batch, d_state) or (batch, groups, d_state).
    D, dt_bias: (dim,). Returns y (batch, dim) in the dtype of x; equal to one position of
    `selective_scan` continued from `state`. backend: "triton" and "cpu" run the fused kernels; "ref"
    and "chunked" the PyTorch code below (fp32, or fp64 when the state or x is fp64).
    """
    for name, t in (("state", state), ("x", x), ("dt", dt), ("A", A)):
        _check_float(name, t)
    if state.dim() != 3:
        raise shape_error("selective_scan", "state", state, "(batch, dim, d_state)")
    batch, dim, d_state = state.shape
    for name, t in (("x", x), ("dt", dt), ("z", z)):
        if t is not None and tuple(t.shape) != (batch, dim):
            raise shape_error("selective_scan", name, t, f"(batch, dim) = ({batch}, {dim})")
    if tuple(A.shape) != (dim, d_state):
        raise shape_error("selective_scan", "A", A, f"(dim, d_state) = ({dim}, {d_state})")
    groups = []
    for name, t in (("B", B), ("C", C)):
        _check_float(name, t)
        t = t.unsqueeze(1) if t.dim() == 2 else t
        if t.dim() != 3 or t.shape[0] != batch or t.shape[2] != d_state or dim % t.shape[1] != 0:
            raise shape_error("selective_scan", name, t, f"(batch, d_state) = ({batch}, {d_state}) or "
                              f"(batch, groups, d_state) with groups dividing dim={dim}")
        groups.append(t)
    B, C = groups
    _check_vector("D", D, dim)
    _check_vector("dt_bias", dt_bias, dim)
    name = _pick_backend(backend, state.device, x.dtype)
    if name == "triton":
        from ssmkit.kernels.selective_scan import selective_state_update_triton

        return selective_state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    if name == "cpu":
        from ssmkit.kernels.cpu import selective_state_update_cpu

        return selective_state_update_cpu(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    cd = compute_dtype(state, x)
    step = dt.to(cd)
    if dt_bias is not None:
        step = step + dt_bias.to(cd)
    if dt_softplus:
        step = F.softplus(step)
    Bd = B.to(cd).repeat_interleave(dim // B.shape[1], dim=1)
    Cd = C.to(cd).repeat_interleave(dim // C.shape[1], dim=1)
    xs = x.to(cd)
    new = state.to(cd) * torch.exp(step[..., None] * A.to(cd)) + (step * xs)[..., None] * Bd
    state.copy_(new)
    y = (new * Cd).sum(-1)
    if D is not None:
        y = y + D.to(cd) * xs
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# first-order linear scan (the engine of the 2-D and ConvSSM scans)


def linear_scan(a, b, initial_state=None, *, dim=-1, reverse=False, chunk_size=None):
    """h_t = a_t · h_{t-1} + b_t along `dim` (h_{-1} = initial_state or 0); returns all h.

    b: any shape; a: broadcastable to b (e.g. constant over time); initial_state: b's shape without
    `dim`. Real or complex (a and b are promoted to one dtype). reverse: h_t = a_t · h_{t+1} + b_t.
    Parallel over time by chunks of about sqrt(L) steps: one loop over the positions in a chunk runs
    all chunks at once, a second loop carries states across chunks (~2·sqrt(L) vectorised steps).
    Backward is the same scan run the other way (the adjoint of a linear recurrence), so autograd
    keeps only a and h — O(size of b) memory; double backward is not supported.
    """
    dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = torch.broadcast_to(a.to(dtype), b.shape), b.to(dtype)
    dim = dim % b.dim()
    if initial_state is not None:
        expected = b.shape[:dim] + b.shape[dim + 1:]
        if initial_state.shape != expected:
            raise ValueError(f"linear_scan: initial_state has shape {tuple(initial_state.shape)}; "
                             f"expected {tuple(expected)} (b's shape {tuple(b.shape)} without dim {dim})")
        initial_state = initial_state.to(dtype)
    a, b = a.movedim(dim, 0), b.movedim(dim, 0)
    if reverse:
        a, b = a.flip(0), b.flip(0)
    T = chunk_size or max(1, round(math.sqrt(b.shape[0])))
    h = _LinearScan.apply(a, b, initial_state, T)
    return (h.flip(0) if reverse else h).movedim(0, dim)


def _scan_forward(a, b, h0, T):
    """The forward recurrence along dim 0 by chunks of T; no autograd."""
    L, rest = b.shape[0], b.shape[1:]
    nc = -(-L // T)
    pad = nc * T - L
    if pad:
        a = torch.cat([a, a.new_ones(pad, *rest)])
        b = torch.cat([b, b.new_zeros(pad, *rest)])
    a, b = a.reshape(nc, T, *rest), b.reshape(nc, T, *rest)
    h, p = torch.empty_like(b), torch.empty_like(a)  # chunk-local states and running decay products
    h[:, 0], p[:, 0] = b[:, 0], a[:, 0]
    for t in range(1, T):
        torch.addcmul(b[:, t], a[:, t], h[:, t - 1], out=h[:, t])
        torch.mul(a[:, t], p[:, t - 1], out=p[:, t])
    s = h0
    for c in range(nc):  # add the true entering state to each chunk; its last row is then exact
        if s is not None:
            h[c].addcmul_(p[c], s)
        s = h[c, -1]
    return h.reshape(nc * T, *rest)[:L]


class _LinearScan(torch.autograd.Function):
    # PyTorch's complex convention: for out = a·h, grad_a = grad_out·conj(h), grad_h = grad_out·conj(a).
    @staticmethod
    def forward(ctx, a, b, h0, T):
        h = _scan_forward(a, b, h0, T)
        ctx.save_for_backward(a, h, h0)
        ctx.T = T
        return h

    @staticmethod
    def backward(ctx, dh):
        a, h, h0 = ctx.saved_tensors
        # adjoint G_t = dh_t + conj(a_{t+1}) G_{t+1}: a reverse scan with the decays shifted by one
        a_next = torch.cat([a[1:], a.new_zeros(1, *a.shape[1:])]).conj()
        G = _scan_forward(a_next.flip(0), dh.flip(0), None, ctx.T).flip(0)
        first = torch.zeros_like(h[:1]) if h0 is None else h0.unsqueeze(0)
        da = G * torch.cat([first, h[:-1]]).conj()
        dh0 = None if h0 is None else G[0] * a[0].conj()
        return da, G, dh0, None


# ----------------------------------------------------------------------------------------------
# "ref": the oracle — a plain loop over time, differentiated by autograd


def _scan_ref(u, dt, A, B, C, h0, keep, reverse):
    """y_t = C_t . h_t with h_t = keep_t * exp(dt_t A) h_prev + dt_t B_t u_t; returns (y, h_last)."""
    batch, dim, length = u.shape
    G, N = B.shape[1], A.shape[1]
    grouped = (batch, G, dim // G, length)  # channel d belongs to group d // (dim / G)
    us, dts = u.reshape(grouped).unbind(-1), dt.reshape(grouped).unbind(-1)
    Bs, Cs = B.unsqueeze(2).unbind(-1), C.unsqueeze(2).unbind(-1)  # (batch, G, 1, N) per step
    keeps = None if keep is None else keep[:, None, None, None].unbind(-1)
    A = A.reshape(G, dim // G, N)
    h = u.new_zeros(batch, G, dim // G, N) if h0 is None else h0.reshape(batch, G, dim // G, N)
    ys = [None] * length
    for t in (reversed(range(length)) if reverse else range(length)):
        a = torch.exp(dts[t][..., None] * A)
        if keeps is not None:
            a = a * keeps[t]
        h = a * h + (dts[t] * us[t])[..., None] * Bs[t]
        ys[t] = (h * Cs[t]).sum(-1)
    return torch.stack(ys, dim=-1).reshape(batch, dim, length), h.reshape(batch, dim, N)


# ----------------------------------------------------------------------------------------------
# "chunked": parallel pure PyTorch
#
# The length is cut into nc chunks of T steps. A loop over the T positions advances all nc chunks at
# once (state shape (batch, groups, dim/groups, nc, N)), a short loop over chunks carries the states
# between them, and a second loop over T produces the outputs. That is about 2*sqrt(L) Python steps,
# each a few vectorised ops, and it only multiplies decays (never divides by them), so it is as stable
# as the sequential loop. Backward recomputes the states from the saved chunk-start states and runs
# the adjoint recurrence the same way.


def chunked_scan(u, dt, A, B, C, h0=None, keep=None, reverse=False, chunk_size=None):
    """Pure scan y_t = C_t . h_t (no D, no gate) by the chunked method; returns (y, h_last).

    u, dt: (batch, dim, L); A: (dim, N); B, C: (batch, G, N, L); h0: (batch, dim, N) or None;
    keep: (batch, L) reset gate or None. All tensors share one float dtype.
    """
    length = u.shape[-1]
    # about 0.75 sqrt(L) steps per chunk balances the two loops over T against the carry loop over
    # chunks (measured on CPU at L = 1024 and 2048; powers of two such as 32 ran slower there)
    T = chunk_size or max(1, min(256, round(0.75 * math.sqrt(length))))
    return _ChunkedScan.apply(u, dt, A, B, C, h0, keep, reverse, T)


class _Layout:
    """Reshapes (batch, dim, L) tensors into the per-step layout (T, batch, G, nc, dim/G) and back.

    The state is (batch, G, nc, dim/G, N): contractions over N (outputs) and over the channels of a
    group (gradients of B and C) are then batched matrix products.
    """

    def __init__(self, u: torch.Tensor, groups: int, T: int, reverse: bool):
        self.batch, self.dim, self.length = u.shape
        self.G, self.Dg, self.T = groups, self.dim // groups, T
        self.nc = math.ceil(self.length / T)
        self.pad = self.nc * T - self.length
        steps, chunks = list(range(T)), list(range(self.nc))
        self.steps = steps[::-1] if reverse else steps  # positions within a chunk, in scan order
        self.chunks = chunks[::-1] if reverse else chunks

    def seq(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, self.pad))
        return rearrange(x, "b (g d) (c t) -> t b g c d", g=self.G, t=self.T).contiguous()

    def unseq(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(x, "t b g c d -> b (g d) (c t)")[..., : self.length]

    def bc(self, X: torch.Tensor) -> torch.Tensor:
        X = F.pad(X, (0, self.pad))
        return rearrange(X, "b g n (c t) -> t b g c 1 n", t=self.T).contiguous()

    def unbc(self, X: torch.Tensor) -> torch.Tensor:
        return rearrange(X, "t b g c 1 n -> b g n (c t)")[..., : self.length]

    def gate(self, keep: torch.Tensor) -> torch.Tensor:
        keep = F.pad(keep, (0, self.pad), value=1.0)
        return rearrange(keep, "b (c t) -> t b 1 c 1 1", t=self.T)

    def chunk_decay(self, dt_s, A_v, keep_s) -> torch.Tensor:
        """Product of the decays over each chunk: (b, G, nc, Dg, N)."""
        P = torch.exp(dt_s.sum(0).unsqueeze(-1) * A_v)
        return P if keep_s is None else P * keep_s.prod(0)


class _Decay:
    """exp(dt_t * A) (times the reset gate) at one position, written into one reused buffer.

    Computing it per step, rather than once for all positions, keeps every temporary at
    1/T of the (batch, dim, L, N) size; fresh allocations of that full size cost more than the exp.
    """

    def __init__(self, dt_s, A_v, keep_s, state_shape):
        self.dt_s, self.A_v, self.keep_s = dt_s, A_v, keep_s
        self.buf = dt_s.new_empty(state_shape)

    def __call__(self, t: int) -> torch.Tensor:
        a = torch.mul(self.dt_s[t].unsqueeze(-1), self.A_v, out=self.buf).exp_()
        return a if self.keep_s is None else a.mul_(self.keep_s[t])


class _ChunkedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, dt, A, B, C, h0, keep, reverse, T):
        lay = _Layout(u, B.shape[1], T, reverse)
        b, G, Dg, nc, N = lay.batch, lay.G, lay.Dg, lay.nc, A.shape[1]
        dt_s, dtu_s = lay.seq(dt), lay.seq(dt * u)
        B_s, C_s = lay.bc(B), lay.bc(C)
        A_v = A.view(G, 1, Dg, N)
        keep_s = None if keep is None else lay.gate(keep)
        decay = _Decay(dt_s, A_v, keep_s, (b, G, nc, Dg, N))

        # pass 1: each chunk's end state when it starts from zero
        h = u.new_zeros(b, G, nc, Dg, N)
        for t in lay.steps:
            h.mul_(decay(t)).addcmul_(dtu_s[t].unsqueeze(-1), B_s[t])
        # carry the true states across chunks
        P = lay.chunk_decay(dt_s, A_v, keep_s)
        starts = torch.empty_like(h)
        s = u.new_zeros(b, G, Dg, N) if h0 is None else h0.reshape(b, G, Dg, N)
        for c in lay.chunks:
            starts[:, :, c] = s
            s = P[:, :, c] * s + h[:, :, c]
        last = s.reshape(b, lay.dim, N)
        # pass 2: outputs, every chunk starting from its true state
        h.copy_(starts)
        y_s = u.new_empty(T, b, G, nc, Dg, 1)
        for t in lay.steps:
            h.mul_(decay(t)).addcmul_(dtu_s[t].unsqueeze(-1), B_s[t])
            torch.matmul(h, C_s[t].mT, out=y_s[t])
        ctx.save_for_backward(u, dt, A, B, C, keep, starts)
        ctx.has_h0 = h0 is not None
        ctx.reverse, ctx.T = reverse, T
        return lay.unseq(y_s.squeeze(-1)), last

    @staticmethod
    def backward(ctx, dy, dlast):
        u, dt, A, B, C, keep, starts = ctx.saved_tensors
        lay = _Layout(u, B.shape[1], ctx.T, ctx.reverse)
        b, G, Dg, nc, N, T = lay.batch, lay.G, lay.Dg, lay.nc, A.shape[1], ctx.T
        u_s, dt_s = lay.seq(u), lay.seq(dt)
        dtu_s = dt_s * u_s
        B_s, C_s = lay.bc(B), lay.bc(C)
        dy_s = lay.seq(dy).unsqueeze(-1)  # (T, b, G, nc, Dg, 1)
        A_v = A.view(G, 1, Dg, N)
        keep_s = None if keep is None else lay.gate(keep)
        decay = _Decay(dt_s, A_v, keep_s, starts.shape)

        # recompute every state h_t; dC_t = sum over the group's channels of dy_t h_t
        hs = u.new_empty(T, *starts.shape)
        h = starts
        for t in lay.steps:
            h = torch.mul(h, decay(t), out=hs[t]).addcmul_(dtu_s[t].unsqueeze(-1), B_s[t])
        dC_s = dy_s.mT @ hs

        # adjoint g_t = dL/dh_t runs backwards: g_t = C_t dy_t + a_next g_next. First per chunk from zero ...
        ga = torch.zeros_like(starts)
        for t in reversed(lay.steps):
            ga = torch.addcmul(ga, C_s[t], dy_s[t]).mul_(decay(t))
        # ... then carried across chunks: r = dL/d(state entering the chunk)
        P = lay.chunk_decay(dt_s, A_v, keep_s)
        right = torch.empty_like(starts)  # adjoint arriving at each chunk's end from the later chunks
        r = u.new_zeros(b, G, Dg, N) if dlast is None else dlast.reshape(b, G, Dg, N)
        for c in reversed(lay.chunks):
            right[:, :, c] = r
            r = ga[:, :, c] + P[:, :, c] * r
        dh0 = r.reshape(b, lay.dim, N) if ctx.has_h0 else None

        # final pass, position by position: q_t = dL/d(dt_t A) = g_t a_t h_prev overwrites hs[t]
        s_s = torch.empty_like(dy_s)  # sum_n g_t B_t
        dB_s = u.new_empty(T, b, G, nc, 1, N)
        qA = torch.empty_like(dt_s)
        dA = torch.zeros_like(starts)
        first, prev = lay.steps[0], (1 if ctx.reverse else -1)
        ga = right
        for t in reversed(lay.steps):
            g = torch.addcmul(ga, C_s[t], dy_s[t])
            a = decay(t)
            h_prev = starts if t == first else hs[t + prev]
            q = torch.mul(h_prev, a, out=hs[t]).mul_(g)
            torch.matmul(g, B_s[t].mT, out=s_s[t])
            torch.matmul(dtu_s[t].unsqueeze(-2), g, out=dB_s[t])
            ga = g.mul_(a)
            torch.sum(q * A_v, dim=-1, out=qA[t])
            dA.addcmul_(q, dt_s[t].unsqueeze(-1))
        s_s = s_s.squeeze(-1)
        return (lay.unseq(dt_s * s_s), lay.unseq(qA + u_s * s_s), dA.sum((0, 2)).reshape(lay.dim, N),
                lay.unbc(dB_s), lay.unbc(dC_s), dh0, None, None, None)
