"""Building blocks that models of several domains share: norms (incl. Mamba-2's gated RMSNorm), the
SwiGLU feed-forward, stochastic depth, and what the Mamba mixers share: their depthwise causal
convolution (whole sequence and one step) and the initialisation of their step sizes."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["causal_conv1d", "causal_conv1d_step", "inverse_softplus_dt", "RMSNorm", "RMSNormGated", "LayerNorm2d", "SwiGLU", "DropPath", "drop_path_rates"]


class RMSNorm(nn.Module):
    """RMS normalisation over the last dim, computed in at least fp32 (mamba_ssm / Vim `RMSNorm`)."""

    def __init__(self, d: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(xf.dtype)
        return out.to(x.dtype)


class RMSNormGated(nn.Module):
    """Mamba-2's gated RMSNorm: RMSNorm(x * silu(z)) (or RMSNorm(x) * silu(z) with `norm_before_gate`),
    normalised over groups of `group_size` channels (default: all), computed in at least fp32."""

    def __init__(self, d: int, eps: float = 1e-5, norm_before_gate: bool = False, group_size: int | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.eps, self.norm_before_gate = eps, norm_before_gate
        self.group_size = d if group_size is None else group_size
        if d % self.group_size:
            raise ValueError(f"RMSNormGated: group_size {self.group_size} does not divide the width {d}")
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        cd = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(cd)
        gate = None if z is None else F.silu(z.to(cd))
        if gate is not None and not self.norm_before_gate:
            xf = xf * gate
        groups = xf.unflatten(-1, (-1, self.group_size))
        out = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        out = out * self.weight.to(cd)
        if gate is not None and self.norm_before_gate:
            out = out * gate
        return out.to(x.dtype)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class SwiGLU(nn.Module):
    """silu(gate) * up -> down, hidden size ⌈(8/3·dim)/256⌉·256 by default, no biases."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        if hidden is None:
            hidden = 256 * -(-int(dim * 4 * 2 / 3) // 256)
        self.hidden = hidden
        self.gate_proj = nn.Linear(dim, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch for a random `p` of the samples and scale the
    kept ones by 1 / (1 - p); the identity in eval mode."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """The usual stochastic-depth schedule: 0 at the first block rising linearly to `rate` at the last."""
    return [rate * i / (depth - 1) for i in range(depth)] if depth > 1 else [0.0] * depth


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  reverse: bool = False, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise causal convolution: y[:, d, t] = bias[d] + sum_k weight[d, k] x[:, d, t - (K-1) + k].

    x: (batch, dim, L), any strides; weight: (dim, 1, K) (an `nn.Conv1d(groups=dim)` weight) or (dim, K).
    reverse: anti-causal, y[:, d, t] = bias[d] + sum_k weight[d, k] x[:, d, t + (K-1) - k], i.e. the causal
    convolution of the flipped sequence, flipped back. seq_idx (batch, L): packed sequences; a tap that
    reads another sequence reads zero, as if each sequence were convolved alone. Written as K shifted
    multiply-adds over the channel-last (batch, L, dim) layout, which on CPU runs several times faster
    than a grouped conv1d with one channel per group; the result is a channel-last (batch, dim, L) view.
    """
    w = weight.reshape(weight.shape[0], -1).t().contiguous()  # (K, dim)
    K, L = w.shape[0], x.shape[-1]
    xp = F.pad(x.transpose(1, 2), (0, 0, 0, K - 1) if reverse else (0, 0, K - 1, 0))  # (batch, L + K - 1, dim)
    starts = [K - 1 - k for k in range(K)] if reverse else list(range(K))
    taps = [xp[:, s: s + L] for s in starts]
    if seq_idx is not None:
        padded = F.pad(seq_idx, (0, K - 1) if reverse else (K - 1, 0), value=-1)
        taps = [tap * (padded[:, s: s + L] == seq_idx)[..., None].to(tap.dtype) for tap, s in zip(taps, starts)]
    y = taps[0] * w[0] if bias is None else torch.addcmul(bias, taps[0], w[0])
    for k in range(1, K):
        y = y.addcmul_(taps[k], w[k])
    return y.transpose(1, 2)


def causal_conv1d_step(conv_state: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """One position of `causal_conv1d`: shifts the newest input x (batch, dim) into `conv_state`
    (batch, dim, K), in place, and returns the convolution at that position (batch, dim)."""
    conv_state.copy_(conv_state.roll(-1, dims=-1))
    conv_state[:, :, -1] = x
    y = (conv_state * weight.reshape(weight.shape[0], -1)).sum(-1)
    return y if bias is None else y + bias


def inverse_softplus_dt(n: int, dt_min: float, dt_max: float, dt_init_floor: float, device=None,
                        dtype=None) -> torch.Tensor:
    """mamba_ssm's step-size initialisation: n step sizes drawn log-uniformly in [dt_min, dt_max], floored at
    dt_init_floor, returned as the bias whose softplus they are (dt + log(1 - exp(-dt)))."""
    dt = torch.exp(torch.rand(n, device=device, dtype=dtype) * (math.log(dt_max) - math.log(dt_min))
                   + math.log(dt_min)).clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))
