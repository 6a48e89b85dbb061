"""Small Triton helpers shared by the selective-scan kernels."""
import triton
import triton.language as tl


@triton.jit
def _combine(a0, b0, a1, b1):
    # (a0, b0) then (a1, b1): h -> a1 (a0 h + b0) + b1
    return a0 * a1, a1 * b0 + b1


@triton.jit
def _softplus(x):
    # log1p(exp(x)) for x <= 20, x above (PyTorch's threshold); log1p via the (1+e)-1 correction
    e = tl.exp(tl.minimum(x, 20.0))
    one_e = 1.0 + e
    den = tl.where(one_e == 1.0, 1.0, one_e - 1.0)
    lp = tl.where(one_e == 1.0, e, tl.log(one_e) * (e / den))
    return tl.where(x <= 20.0, lp, x)


@triton.jit
def _softplus_grad(x):
    e = tl.exp(tl.minimum(x, 20.0))
    return tl.where(x <= 20.0, e / (1.0 + e), 1.0)


@triton.jit
def _dt(delta, bias, mask, SOFTPLUS: tl.constexpr):
    x = delta + bias
    if SOFTPLUS:
        x = _softplus(x)
    return tl.where(mask, x, 0.0)




@triton.jit
def _channel_block(A_ptr, bias_ptr, s_Ad, s_An, dim, N, BD: tl.constexpr, NP: tl.constexpr,
                   HAS_BIAS: tl.constexpr):
    """The prologue every scan program shares: its block of BD channels d (program axis 0), the state
    indices n padded to NP, their masks, A (fp32) and delta_bias (fp32, zeros when absent)."""
    d = tl.program_id(0) * BD + tl.arange(0, BD)
    dmask = d < dim
    n = tl.arange(0, NP)
    nmask = n < N
    dn_mask = dmask[:, None] & nmask[None, :]
    A = tl.load(A_ptr + d[:, None] * s_Ad + n[None, :] * s_An, mask=dn_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BD], dtype=tl.float32)
    return d, dmask, n, nmask, dn_mask, A, bias


@triton.jit
def _grad_row(g_ptr, pid_b, pid_d, d0, dpg, s_gb, s_gg, ATOMIC: tl.constexpr):
    """Where a program's dB or dC rows go: the rows of its group (shared, atomics) or, deterministic,
    its own rows that torch sums afterwards."""
    if ATOMIC:
        row = g_ptr + pid_b * s_gb + (d0 // dpg) * s_gg
    else:
        row = g_ptr + pid_b * s_gb + pid_d * s_gg
    return row
