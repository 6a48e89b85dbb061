"""Long causal convolution by FFT, the O(L log L) core of Hyena, and its plain O(L^2) reference.

`fft_causal_conv(u, k, D)` computes y_t = sum_{s<=t} k_{t-s} u_s + D u_t for every channel. Both
signals are zero-padded to 2L before the FFT, so the circular convolution the FFT computes equals
the linear (causal) one. The work is done in float32 (or float64 for float64 input) whatever the
input dtype, on the input's device (torch.fft uses cuFFT on a GPU), and the result comes back in the
input dtype.

Memory: the channels are processed in chunks so that one chunk's spectra stay under
`max_chunk_bytes`, and the backward pass (a custom autograd function) recomputes the spectra from u
and k instead of keeping them, so a 1M-token sequence needs only a few L-sized buffers per chunk.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ssmkit.util import compute_dtype

__all__ = ["fft_causal_conv", "direct_causal_conv"]

# spectra of one channel chunk in flight: (batch, chunk, L + 1) complex values, a few copies
DEFAULT_CHUNK_BYTES = 256 * 2**20


def _check(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor | None) -> None:
    if u.ndim != 3:
        raise ValueError(f"causal conv: u must be (batch, channels, length), got shape {tuple(u.shape)}")
    if k.ndim != 2 or k.shape != u.shape[1:]:
        raise ValueError(f"causal conv: k must be (channels, length) = {tuple(u.shape[1:])} to match u, "
                         f"got shape {tuple(k.shape)}")
    if D is not None and D.shape != (u.shape[1],):
        raise ValueError(f"causal conv: D must be (channels,) = ({u.shape[1]},), got shape {tuple(D.shape)}")


def _chunks(batch: int, channels: int, length: int, max_bytes: int) -> list[slice]:
    """Channel slices whose complex spectra (batch x chunk x (L+1) x 8 bytes, ~4 live) fit `max_bytes`."""
    per_channel = 4 * batch * (length + 1) * 8
    size = max(1, min(channels, max_bytes // max(per_channel, 1)))
    return [slice(c, min(c + size, channels)) for c in range(0, channels, size)]


def _spectral_product(a: torch.Tensor, b: torch.Tensor, length: int, conjugate: bool) -> torch.Tensor:
    """irfft(rfft(a) * rfft(b) [conjugated]) over n = 2L, first L outputs: causal convolution of a and b,
    or with `conjugate` their correlation sum_{t>=s} a_t b_{t-s} (the transpose of the convolution)."""
    n = 2 * length
    fb = torch.fft.rfft(b, n=n)
    if conjugate:
        fb = fb.conj()
    return torch.fft.irfft(torch.fft.rfft(a, n=n) * fb, n=n)[..., :length]


class _FFTConv(torch.autograd.Function):
    """y = causal_conv(u, k) chunked over channels; backward recomputes spectra instead of storing them."""

    @staticmethod
    def forward(ctx, u, k, max_bytes):
        B, H, L = u.shape
        dtype = compute_dtype(u)
        y = torch.empty(B, H, L, dtype=dtype, device=u.device)
        for c in _chunks(B, H, L, max_bytes):
            y[:, c] = _spectral_product(u[:, c].to(dtype), k[c].to(dtype), L, conjugate=False)
        ctx.save_for_backward(u, k)
        ctx.max_bytes = max_bytes
        return y

    @staticmethod
    def backward(ctx, grad_y):
        u, k = ctx.saved_tensors
        B, H, L = u.shape
        dtype = compute_dtype(u)
        grad_u = torch.empty(B, H, L, dtype=dtype, device=u.device) if ctx.needs_input_grad[0] else None
        grad_k = torch.empty(H, L, dtype=dtype, device=u.device) if ctx.needs_input_grad[1] else None
        for c in _chunks(B, H, L, ctx.max_bytes):
            g = grad_y[:, c].to(dtype)
            if grad_u is not None:  # dL/du_s = sum_{t>=s} g_t k_{t-s}
                grad_u[:, c] = _spectral_product(g, k[c].to(dtype), L, conjugate=True)
            if grad_k is not None:  # dL/dk_j = sum_b sum_t g_t u_{t-j}
                grad_k[c] = _spectral_product(g, u[:, c].to(dtype), L, conjugate=True).sum(0)
        return (None if grad_u is None else grad_u.to(u.dtype),
                None if grad_k is None else grad_k.to(k.dtype), None)


def fft_causal_conv(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor | None = None, *,
                    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """Causal long convolution y_t = sum_{s<=t} k[:, t-s] u[:, s] + D u_t by FFT (padded to 2L).

    u: (batch, channels, L); k: (channels, L), one filter per channel; D: (channels,) skip term or None.
    Returns y shaped like u, in u's dtype (computed in float32, or float64 for float64 input).
    """
    _check(u, k, D)
    y = _FFTConv.apply(u, k, max_chunk_bytes)
    if D is not None:
        y = y + u.to(y.dtype) * D.to(y.dtype)[:, None]
    return y.to(u.dtype)


def direct_causal_conv(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor | None = None) -> torch.Tensor:
    """The same convolution as `fft_causal_conv`, summed directly in O(L^2): the reference for tests."""
    _check(u, k, D)
    L = u.shape[-1]
    windows = F.pad(u, (L - 1, 0)).unfold(-1, L, 1)  # (B, H, L, L): windows[..., t, j] = u[t - (L-1) + j]
    y = (windows * k.flip(-1)[None, :, None, :]).sum(-1)
    if D is not None:
        y = y + u * D[:, None]
    return y
