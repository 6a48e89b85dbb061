"""The Hyena operator: gated long convolutions with implicitly parameterized filters.

Order N (HyenaDNA uses 2): the input is projected to (N+1)·d channels, mixed locally by a short causal
depthwise convolution and split into gates x_0..x_{N-1} and a value v. Then, for each of the N-1 long
filters k_i, v <- fft_conv(v * x_{N-i}, k_i) + bias_i * (v * x_{N-i}), and the output is
out_proj(v * x_0).

The long filters are not stored: `HyenaFilter` evaluates a small MLP with sine activations on
positional features of each position (time and 2 Fourier bands of the position over `l_max`) and
multiplies the result by an exponential decay whose rate differs per channel. Because the
positional features depend on `l_max`, the filter of a model is tied to its `l_max`: the operator
refuses longer inputs instead of truncating them.

Parameter and buffer names follow the HyenaDNA code (`in_proj`, `short_filter`, `filter_fn.bias`,
`filter_fn.pos_emb.z`, `filter_fn.implicit_filter.<i>`, `filter_fn.modulation.deltas`, `out_proj`),
so official state dicts load after their prefix is stripped.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssmkit.core.fftconv import fft_causal_conv

__all__ = ["Sin", "PositionalFeatures", "ExponentialModulation", "HyenaFilter", "HyenaOperator"]


class Sin(nn.Module):
    """sin(freq * x) with a trainable frequency per feature (initialised to `w`)."""

    def __init__(self, dim: int, w: float = 10.0):
        super().__init__()
        self.freq = nn.Parameter(torch.full((1, dim), float(w)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class PositionalFeatures(nn.Module):
    """Features z (1, l_max, emb_dim) = [t, cos(f w), -sin(f w)] of each position and its time t in [0, 1].

    t = linspace(0, 1, l_max), w = 2 pi j / l_max, and f takes (emb_dim - 1) / 2 values from 1e-4 to
    bands - 1. Both are persistent buffers (official checkpoints carry them; `load_state_dict` checks them).
    """

    def __init__(self, emb_dim: int, l_max: int):
        super().__init__()
        if emb_dim < 3 or emb_dim % 2 == 0:
            raise ValueError(f"emb_dim must be odd and at least 3 (time + sin/cos pairs), got {emb_dim}")
        self.l_max = l_max
        bands = (emb_dim - 1) // 2
        t = torch.linspace(0, 1, l_max, dtype=torch.float64)[None, :, None]
        w = 2 * math.pi * torch.arange(l_max, dtype=torch.float64)[None, :, None] / l_max
        f = torch.linspace(1e-4, bands - 1, bands, dtype=torch.float64)[None, None]
        z = torch.cat([t, torch.cos(f * w), -torch.sin(f * w)], dim=-1)
        self.register_buffer("z", z.float())
        self.register_buffer("t", t.float())

    def forward(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.z[:, :length], self.t[:, :length]


class ExponentialModulation(nn.Module):
    """h * (exp(-t |delta_c|) + shift): channel c decays to `target` at a fraction of the sequence between
    `fast_decay_pct` and `slow_decay_pct`. `shift` is 0.0 in HyenaDNA's training code and 0.05 in its
    standalone and Hugging Face code (see ssmkit.genomics.checkpoints)."""

    def __init__(self, channels: int, fast_decay_pct: float = 0.3, slow_decay_pct: float = 1.5,
                 target: float = 1e-2, shift: float = 0.0, modulate: bool = True):
        super().__init__()
        self.shift, self.modulate = shift, modulate
        max_decay, min_decay = math.log(target) / fast_decay_pct, math.log(target) / slow_decay_pct
        self.register_buffer("deltas", torch.linspace(min_decay, max_decay, channels)[None, None])

    def forward(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if not self.modulate:
            return h
        return h * (torch.exp(-t * self.deltas.abs()) + self.shift)


class HyenaFilter(nn.Module):
    """The implicit long filters: `filter(L)` gives (channels, L) from an MLP over positional features.

    MLP: Linear(emb_dim, width), Sin, then `num_inner_mlps` x [Linear(width, width), Sin], then
    Linear(width, channels, no bias). One `Sin` instance (one `freq`) is shared by every activation,
    as in HyenaDNA. `bias` (channels,) is the per-channel skip term D of the FFT convolution.
    """

    def __init__(self, channels: int, l_max: int, emb_dim: int = 5, width: int = 64, num_inner_mlps: int = 2,
                 w: float = 10.0, **modulation):
        super().__init__()
        self.channels = channels
        self.pos_emb = PositionalFeatures(emb_dim, l_max)
        sin = Sin(width, w)
        layers: list[nn.Module] = [nn.Linear(emb_dim, width), sin]
        for _ in range(num_inner_mlps):
            layers += [nn.Linear(width, width), sin]
        layers.append(nn.Linear(width, channels, bias=False))
        self.implicit_filter = nn.Sequential(*layers)
        self.modulation = ExponentialModulation(channels, **modulation)
        self.bias = nn.Parameter(torch.randn(channels))

    def filter(self, length: int) -> torch.Tensor:
        """The filters for the first `length` positions, (channels, length)."""
        z, t = self.pos_emb(length)
        h = self.modulation(t, self.implicit_filter(z))
        return h[0].transpose(0, 1)


class HyenaOperator(nn.Module):
    """Hyena mixer of order `order` on (batch, L, d_model) inputs with L <= `l_max` (see module docstring)."""

    def __init__(self, d_model: int, l_max: int, order: int = 2, filter_order: int = 64, emb_dim: int = 5,
                 short_filter_order: int = 3, num_inner_mlps: int = 2, w: float = 10.0, dropout: float = 0.0,
                 modulation_shift: float = 0.0, modulate: bool = True):
        super().__init__()
        if order < 2:
            raise ValueError(f"Hyena order must be at least 2 (one long convolution), got {order}")
        self.d_model, self.l_max, self.order = d_model, l_max, order
        inner = (order + 1) * d_model
        self.in_proj = nn.Linear(d_model, inner)
        self.out_proj = nn.Linear(d_model, d_model)
        self.short_filter = nn.Conv1d(inner, inner, short_filter_order, padding=short_filter_order - 1, groups=inner)
        self.filter_fn = HyenaFilter(d_model * (order - 1), l_max, emb_dim, filter_order, num_inner_mlps, w,
                                     shift=modulation_shift, modulate=modulate)
        self.dropout = nn.Dropout(dropout)

    def _short_conv(self, x: torch.Tensor) -> torch.Tensor:
        """The causal depthwise convolution of `short_filter`, as a sum of K shifted products: on CPU this
        beats oneDNN's depthwise kernel, which also rebuilds itself for every new sequence length."""
        weight, K, L = self.short_filter.weight[:, 0], self.short_filter.kernel_size[0], x.shape[-1]
        padded = F.pad(x, (K - 1, 0))
        out = self.short_filter.bias[:, None] + weight[:, K - 1, None] * x
        for j in range(K - 1):
            out = out + weight[:, j, None] * padded[..., j:j + L]
        return out

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        if u.ndim != 3 or u.shape[-1] != self.d_model:
            raise ValueError(f"HyenaOperator expects (batch, length, {self.d_model}), got {tuple(u.shape)}")
        L = u.shape[1]
        if L > self.l_max:
            raise ValueError(f"sequence length {L} exceeds this Hyena operator's l_max {self.l_max}; the implicit "
                             f"filter is defined for l_max positions only (build the model with a larger l_max)")
        uc = self._short_conv(self.in_proj(u).transpose(1, 2))
        *gates, v = uc.split(self.d_model, dim=1)
        k = self.filter_fn.filter(L).view(self.order - 1, self.d_model, L)
        D = self.filter_fn.bias.view(self.order - 1, self.d_model)
        for i, gate in enumerate(reversed(gates[1:])):
            v = fft_causal_conv(self.dropout(v * gate), k[i], D[i])
        return self.out_proj((v * gates[0]).transpose(1, 2))
