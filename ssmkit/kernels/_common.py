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


