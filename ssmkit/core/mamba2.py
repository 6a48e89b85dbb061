"""The Mamba-2 mixer: mamba_ssm's `Mamba2` (names, shapes, initialisation) on `ssmkit.core.ssd`.

One `in_proj` packs [z0, x0, z, xBC, dt] (z0/x0: an optional gated MLP beside the SSM when
d_ssm < d_inner); a depthwise causal conv + SiLU runs over xBC = [x, B, C]; SSD with one scalar decay
per head (A = -exp(A_log), dt = softplus(dt + dt_bias) clamped to dt_limit) and the skip D; a gated
RMSNorm normalised per group of d_ssm / ngroups channels (or silu(z) gating inside the scan without
it); `out_proj`. A mamba_ssm `Mamba2` state dict loads with `load_state_dict(strict=True)`. `step`
follows the recurrent-step protocol of `ssmkit.core.generation` and equals `forward` token by token
(dt_limit included).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssmkit.core.layers import RMSNormGated, causal_conv1d, causal_conv1d_step, inverse_softplus_dt
from ssmkit.core.ssd import ssd_scan, ssd_state_update

__all__ = ["Mamba2", "Mamba2State"]


@dataclass
class Mamba2State:
    """Recurrent state of one `Mamba2` mixer: the last `d_conv` inputs of the conv and the SSD state."""

    conv_state: torch.Tensor  # (batch, conv_dim, d_conv)
    ssm_state: torch.Tensor  # (batch, nheads, headdim, d_state), fp32 (fp64 for fp64 models)


class Mamba2(nn.Module):
    """Mamba-2 (SSD) mixer: (batch, L, d_model) -> (batch, L, d_model), mamba_ssm's constructor keywords."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        conv_init: float | None = None,
        expand: int = 2,
        headdim: int = 64,
        d_ssm: int | None = None,
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1, 16),
        D_has_hdim: bool = False,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, float("inf")),
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
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.d_ssm = self.d_inner if d_ssm is None else d_ssm
        if self.d_ssm % headdim:
            raise ValueError(f"Mamba2: d_ssm={self.d_ssm} is not a multiple of headdim={headdim}")
        self.headdim, self.nheads, self.ngroups = headdim, self.d_ssm // headdim, ngroups
        if self.nheads % ngroups:
            raise ValueError(f"Mamba2: ngroups={ngroups} does not divide the {self.nheads} heads")
        self.D_has_hdim, self.rmsnorm, self.norm_before_gate = D_has_hdim, rmsnorm, norm_before_gate
        self.dt_limit, self.chunk_size, self.layer_idx, self.backend = tuple(dt_limit), chunk_size, layer_idx, backend

        self.d_mlp = self.d_inner - self.d_ssm
        d_in_proj = 2 * self.d_inner + 2 * ngroups * d_state + self.nheads
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=bias, **factory)
        self.conv_dim = self.d_ssm + 2 * ngroups * d_state
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1,
                                bias=conv_bias, **factory)
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)
        self.dt_bias = nn.Parameter(inverse_softplus_dt(self.nheads, dt_min, dt_max, dt_init_floor, device))
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_ssm if D_has_hdim else self.nheads, device=device))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        if rmsnorm:
            self.norm = RMSNormGated(self.d_ssm, eps=1e-5, norm_before_gate=norm_before_gate,
                                     group_size=self.d_ssm // ngroups, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def _split(self, zxbcdt: torch.Tensor):
        return zxbcdt.split([self.d_mlp, self.d_mlp, self.d_ssm, self.conv_dim, self.nheads], dim=-1)

    def _ssd_args(self):
        D = self.D.float()
        return dict(A=-torch.exp(self.A_log.float()), D=D.view(self.nheads, self.headdim) if self.D_has_hdim else D,
                    dt_bias=self.dt_bias.float(), dt_softplus=True, dt_limit=self.dt_limit)

    def _output(self, y: torch.Tensor, z: torch.Tensor, z0: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        if self.rmsnorm:
            y = self.norm(y, z)
        if self.d_mlp > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y)

    def forward(self, u: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """u (batch, L, d_model) -> (batch, L, d_model). seq_idx (batch, L): packed sequences, each mixed
        as if it were alone (the conv and the scan both restart at each one)."""
        if u.dim() != 3 or u.shape[-1] != self.d_model:
            raise ValueError(f"Mamba2 expects input of shape (batch, length, {self.d_model}), got {tuple(u.shape)}")
        z0, x0, z, xBC, dt = self._split(self.in_proj(u))
        xBC = F.silu(causal_conv1d(xBC.transpose(1, 2), self.conv1d.weight, self.conv1d.bias,
                                   seq_idx=seq_idx)).transpose(1, 2)
        x, B, C = xBC.split([self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        heads = (self.nheads, self.headdim)
        y = ssd_scan(x.unflatten(-1, heads), dt, B=B.unflatten(-1, (self.ngroups, self.d_state)),
                     C=C.unflatten(-1, (self.ngroups, self.d_state)), z=None if self.rmsnorm else z.unflatten(-1, heads),
                     chunk_size=self.chunk_size, seq_idx=seq_idx, backend=self.backend, **self._ssd_args())
        return self._output(y.flatten(-2), z, z0, x0)

    def init_state(self, batch: int, *, device=None, dtype=None) -> Mamba2State:
        """The zero state: the conv state in `dtype` (default: the conv weight's), the SSD state in fp32
        (fp64 for an fp64 model)."""
        weight = self.conv1d.weight
        device = weight.device if device is None else device
        return Mamba2State(
            conv_state=torch.zeros(batch, self.conv_dim, self.d_conv, device=device,
                                   dtype=weight.dtype if dtype is None else dtype),
            ssm_state=torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device,
                                  dtype=torch.promote_types(weight.dtype, torch.float32)),
        )

    def step(self, u_t: torch.Tensor, state: Mamba2State) -> tuple[torch.Tensor, Mamba2State]:
        """One token u_t (batch, d_model) or (batch, 1, d_model) -> (y of the same shape, state); both
        tensors of `state` are updated in place and `state` is returned."""
        if not (u_t.dim() == 2 or (u_t.dim() == 3 and u_t.shape[1] == 1)) or u_t.shape[-1] != self.d_model:
            raise ValueError(f"Mamba2.step expects one token of shape (batch, {self.d_model}) or "
                             f"(batch, 1, {self.d_model}), got {tuple(u_t.shape)}")
        z0, x0, z, xBC, dt = self._split(self.in_proj(u_t.reshape(u_t.shape[0], self.d_model)))
        xBC = causal_conv1d_step(state.conv_state, xBC, self.conv1d.weight, self.conv1d.bias)
        x, B, C = F.silu(xBC).to(z.dtype).split([self.d_ssm, self.ngroups * self.d_state,
                                                 self.ngroups * self.d_state], dim=-1)
        heads = (self.nheads, self.headdim)
        y = ssd_state_update(state.ssm_state, x.unflatten(-1, heads), dt, B=B.unflatten(-1, (self.ngroups, -1)),
                             C=C.unflatten(-1, (self.ngroups, -1)), z=None if self.rmsnorm else z.unflatten(-1, heads),
                             **self._ssd_args())
        return self._output(y.flatten(-2), z, z0, x0).reshape(u_t.shape), state
