"""Hydra: the quasiseparable bidirectional mixer of goombalab/hydra, on `ssmkit.core.ssd`.

Hydra's sequence matrix is a quasiseparable matrix: a strictly causal SSD, a strictly anti-causal SSD and
a data-dependent diagonal. One `in_proj` gives z, xBC = [x, B_fw, C_fw, B_bw, C_bw] and [dt_fw, dt_bw];
a depthwise conv ("same" padding, not causal) + SiLU runs over xBC; the forward direction is an SSD
scan whose output is shifted one position later, the backward direction the same SSD scanned from the
end (a reverse scan, no flipped copies) shifted one position earlier, so neither holds the diagonal;
the diagonal is x * (D + fc_D(x)) per head. Both directions share x, A, dt_bias and D. Then the gated
RMSNorm (normalise, then gate) and `out_proj`. Constructor keywords and parameter names follow the
official `Hydra` module, so its state dicts load with `load_state_dict(strict=True)`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssmkit.core.layers import RMSNormGated, inverse_softplus_dt
from ssmkit.core.ssd import ssd_scan

__all__ = ["Hydra"]


class Hydra(nn.Module):
    """Bidirectional SSD mixer: (batch, L, d_model) -> (batch, L, d_model), each output sees every input."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        d_conv: int = 7,
        conv_init: float | None = None,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, float("inf")),
        learnable_init_states: bool = False,
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: int | None = None,
        layer_idx: int | None = None,
        backend: str | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if d_conv % 2 == 0:
            raise ValueError(f"Hydra: d_conv must be odd (a centred convolution), got {d_conv}")
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        if self.d_inner % headdim:
            raise ValueError(f"Hydra: d_inner={self.d_inner} is not a multiple of headdim={headdim}")
        self.headdim, self.nheads, self.ngroups = headdim, self.d_inner // headdim, ngroups
        if self.nheads % ngroups:
            raise ValueError(f"Hydra: ngroups={ngroups} does not divide the {self.nheads} heads")
        self.dt_limit, self.chunk_size, self.layer_idx, self.backend = tuple(dt_limit), chunk_size, layer_idx, backend

        gn = ngroups * d_state
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 4 * gn + 2 * self.nheads, bias=bias, **factory)
        self.conv_dim = self.d_inner + 4 * gn
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv // 2,
                                bias=conv_bias, **factory)
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)
        if learnable_init_states:
            self.init_states = nn.Parameter(torch.zeros(self.nheads, headdim, d_state, device=device))
            self.init_states._no_weight_decay = True
        else:
            self.init_states = None
        self.dt_bias = nn.Parameter(inverse_softplus_dt(self.nheads, dt_min, dt_max, dt_init_floor, device))
        self.A_log = nn.Parameter(torch.zeros(self.nheads, device=device))  # A = -1 for every head
        self.D = nn.Parameter(torch.ones(self.nheads, device=device))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.fc_D = nn.Linear(self.d_inner, self.nheads, bias=False, **factory)
        self.norm = RMSNormGated(self.d_inner, eps=1e-5, norm_before_gate=True, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def directions(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three parts of the sequence mix before the norm, each (batch, L, d_inner) — the strictly
        causal one, the strictly anti-causal one and the diagonal — and the gate z."""
        if u.dim() != 3 or u.shape[-1] != self.d_model:
            raise ValueError(f"Hydra expects input of shape (batch, length, {self.d_model}), got {tuple(u.shape)}")
        batch, length, _ = u.shape
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, 2 * self.nheads], dim=-1)
        xBC = F.silu(self.conv1d(xBC.transpose(1, 2)).transpose(1, 2))
        gn = self.ngroups * self.d_state
        x, B_fw, C_fw, B_bw, C_bw = xBC.split([self.d_inner, gn, gn, gn, gn], dim=-1)
        dt_fw, dt_bw = dt.split(self.nheads, dim=-1)
        xh = x.unflatten(-1, (self.nheads, self.headdim))
        h0 = None if self.init_states is None else self.init_states.expand(batch, *self.init_states.shape)
        common = dict(A=-torch.exp(self.A_log.float()), dt_bias=self.dt_bias.float(), dt_softplus=True,
                      dt_limit=self.dt_limit, initial_state=h0, chunk_size=self.chunk_size, backend=self.backend)
        groups = (self.ngroups, self.d_state)
        fw = ssd_scan(xh, dt_fw, B=B_fw.unflatten(-1, groups), C=C_fw.unflatten(-1, groups), **common).flatten(-2)
        bw = ssd_scan(xh, dt_bw, B=B_bw.unflatten(-1, groups), C=C_bw.unflatten(-1, groups), reverse=True,
                      **common).flatten(-2)
        causal = F.pad(fw[:, :-1], (0, 0, 1, 0))  # position t sees the forward state after t - 1
        anticausal = F.pad(bw[:, 1:], (0, 0, 0, 1))  # ... and the backward state after t + 1
        diagonal = x * F.linear(x, self.fc_D.weight, self.D.to(x.dtype)).repeat_interleave(self.headdim, dim=-1)
        return causal, anticausal, diagonal, z

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u (batch, L, d_model) -> (batch, L, d_model)."""
        causal, anticausal, diagonal, z = self.directions(u)
        return self.out_proj(self.norm(causal + anticausal + diagonal, z))
