"""SaShiMi: a multi-resolution S4 network over raw waveforms, autoregressive over 8-bit samples.

Three resolutions (L, L/4, L/16 with pooling x4 and widths H, 2H, 4H): causal down-pooling, a centre
stack, and up-pooling stages, each stage a stack of [S4 block, feed-forward block] residual pairs
(pre-LayerNorm, or with `norm="scalar"` the scalar norm of the official checkpoints). The S4 block is
S4 -> GELU -> Linear(H, 2H) -> GLU; the feed-forward block is Linear(H, 2H) -> GELU -> Linear(2H, H).
Up-pooling shifts the coarse sequence right by one coarse step before spreading it over the fine steps,
so fine output t only sees fine inputs <= t.

Every module follows the recurrent-step protocol of `ssmkit.core.generation` (`init_state(batch)`,
`step(x, state) -> (y, state)`), and `step` runs the very functions `forward` runs (one sample at a
time, the pools buffering), so `SashimiLM.step` costs O(1) per generated sample.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssmkit.core.s4 import S4Conv
from ssmkit.registry import register_model

__all__ = ["SashimiConfig", "S4Block", "FeedForward", "ScalarNorm", "Residual", "Stage", "DownPool", "UpPool",
           "Sashimi", "SashimiLM", "sashimi_sc09", "sashimi_small"]


@dataclass
class SashimiConfig:
    """Sizes of a SaShiMi language model over `n_classes` quantised sample values."""

    d_model: int = 64
    n_layers: int = 8  # [S4, FF] pairs per stage
    pool: tuple[int, ...] = (4, 4)
    expand: int = 2
    ff: int = 2
    d_state: int = 64
    kernel: str = "dplr"  # 'dplr' (S4, Hurwitz) or 's4d'
    n_ssm: int | None = 1  # state matrices shared over channels (None: one per channel)
    glu: bool = True
    dropout: float = 0.0
    n_classes: int = 256
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    norm: str = "layer"  # residual pre-norm: 'layer' (LayerNorm) or 'scalar' (ScalarNorm, official checkpoints)

    def __post_init__(self):
        self.pool = tuple(self.pool)
        if self.norm not in ("layer", "scalar"):
            raise ValueError(f"norm must be 'layer' or 'scalar', got {self.norm!r}")
        if any(p < 1 for p in self.pool) or self.d_model < 1 or self.n_layers < 0 or self.expand < 1:
            raise ValueError(f"invalid SashimiConfig {self}")


class S4Block(nn.Module):
    """S4 over channels-last input, then GELU and Linear(H, 2H)+GLU (or Linear(H, H))."""

    def __init__(self, d_model: int, cfg: SashimiConfig):
        super().__init__()
        self.s4 = S4Conv(d_model, cfg.d_state, kernel=cfg.kernel, n_ssm=cfg.n_ssm, dt_min=cfg.dt_min,
                         dt_max=cfg.dt_max)
        self.glu = cfg.glu
        self.output_linear = nn.Linear(d_model, 2 * d_model if cfg.glu else d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def _head(self, y: torch.Tensor) -> torch.Tensor:
        y = self.output_linear(self.dropout(F.gelu(y)))
        return F.glu(y, dim=-1) if self.glu else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._head(self.s4(x.transpose(1, 2)).transpose(1, 2))

    def init_state(self, batch: int, *, device=None, dtype=None):
        return self.s4.init_state(batch, device=device, dtype=dtype)

    def step(self, x: torch.Tensor, state):
        y, state = self.s4.step(x, state)
        return self._head(y), state


class FeedForward(nn.Module):
    """Linear(H, ff·H) -> GELU -> Linear(ff·H, H), position-wise (stateless)."""

    def __init__(self, d_model: int, cfg: SashimiConfig):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, cfg.ff * d_model), nn.GELU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.ff * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def init_state(self, batch: int, *, device=None, dtype=None):
        return None

    def step(self, x: torch.Tensor, state):
        return self.net(x), state


class ScalarNorm(nn.Module):
    """y = (s/σ)·(x − μ + m) with μ, σ the mean and population std over the channels (last dim), no eps,
    and two learned scalars m, s: the residual norm of the official SaShiMi checkpoints."""

    def __init__(self):
        super().__init__()
        self.m = nn.Parameter(torch.zeros(1))
        self.s = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        std, mean = torch.std_mean(x, dim=-1, correction=0, keepdim=True)
        return self.s / std * (x - mean + self.m)


class Residual(nn.Module):
    """x + layer(norm(x)) (pre-norm); norm 'layer' is a LayerNorm, 'scalar' a ScalarNorm."""

    def __init__(self, d_model: int, layer: nn.Module, norm: str = "layer"):
        super().__init__()
        self.norm = nn.LayerNorm(d_model) if norm == "layer" else ScalarNorm()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer(self.norm(x))

    def init_state(self, batch: int, *, device=None, dtype=None):
        return self.layer.init_state(batch, device=device, dtype=dtype)

    def step(self, x: torch.Tensor, state):
        y, state = self.layer.step(self.norm(x), state)
        return x + y, state


class Stage(nn.ModuleList):
    """One resolution's stack of [S4, feed-forward] residual pairs, with a residual around the stack."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for layer in self:
            y = layer(y)
        return y + x

    def init_state(self, batch: int, *, device=None, dtype=None) -> list:
        return [layer.init_state(batch, device=device, dtype=dtype) for layer in self]

    def step(self, x: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        y, new_state = x, []
        for layer, layer_state in zip(self, state):
            y, layer_state = layer.step(y, layer_state)
            new_state.append(layer_state)
        return y + x, new_state


class DownPool(nn.Module):
    """Groups `pool` consecutive steps and maps them to one coarse step of width expand·H."""

    def __init__(self, d_model: int, expand: int, pool: int):
        super().__init__()
        self.pool = pool
        self.linear = nn.Linear(d_model * pool, d_model * expand)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, h = x.shape
        return self.linear(x.reshape(b, length // self.pool, self.pool * h))

    def init_state(self, batch: int, *, device=None, dtype=None) -> list:
        """The buffer of fine inputs, empty."""
        return []

    def step(self, x: torch.Tensor, state: list):
        """Buffer x; after `pool` inputs return the coarse step (else None) and an emptied buffer."""
        state = [*state, x]
        if len(state) < self.pool:
            return None, state
        return self.linear(torch.cat(state, -1)), []


class UpPool(nn.Module):
    """Maps a coarse step to `pool` fine steps of width H/expand, delayed by one coarse step (causality)."""

    def __init__(self, d_model: int, expand: int, pool: int):
        super().__init__()
        self.pool, self.d_out = pool, d_model // expand
        self.linear = nn.Linear(d_model, self.d_out * pool)

    def spread(self, x: torch.Tensor) -> torch.Tensor:
        """Coarse steps (..., H) -> their `pool` fine outputs (..., pool, H/expand), before the delay."""
        return self.linear(x).unflatten(-1, (self.pool, self.d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, coarse, _ = x.shape
        # shift right by one coarse step: fine 4j.. see coarse j-1
        y = F.pad(self.spread(x[:, :-1]), (0, 0, 0, 0, 1, 0))
        return y.reshape(b, coarse * self.pool, self.d_out)

    def init_state(self, batch: int, *, device=None, dtype=None) -> tuple[torch.Tensor, int]:
        """A queue of `pool` fine outputs (the zeros of the left pad) and the read position."""
        weight = self.linear.weight
        return torch.zeros(batch, self.pool, self.d_out, device=weight.device if device is None else device,
                           dtype=weight.dtype if dtype is None else dtype), 0

    def step(self, x: torch.Tensor | None, state):
        """Pop the next fine output; when the queue is used up, refill it from the new coarse step x."""
        queue, position = state
        out = queue[:, position]
        position += 1
        if x is not None:
            if position != self.pool:
                raise RuntimeError("UpPool.step got a coarse input before its queue was used up")
            queue, position = self.spread(x), 0
        return out, (queue, position)


def _stage(d_model: int, cfg: SashimiConfig) -> Stage:
    layers = []
    for _ in range(cfg.n_layers):
        layers += [Residual(d_model, S4Block(d_model, cfg), cfg.norm),
                   Residual(d_model, FeedForward(d_model, cfg), cfg.norm)]
    return Stage(layers)


class Sashimi(nn.Module):
    """The SaShiMi backbone over (batch, L, H) with L divisible by prod(pool); output (batch, L, H)."""

    def __init__(self, cfg: SashimiConfig):
        super().__init__()
        self.config = cfg
        widths = [cfg.d_model]
        for _ in cfg.pool:
            widths.append(widths[-1] * cfg.expand)
        self.down = nn.ModuleList(DownPool(widths[i], cfg.expand, p) for i, p in enumerate(cfg.pool))
        self.center = _stage(widths[-1], cfg)
        self.up = nn.ModuleList(UpPool(widths[i + 1], cfg.expand, p) for i, p in reversed(list(enumerate(cfg.pool))))
        self.up_stages = nn.ModuleList(_stage(widths[i], cfg) for i in reversed(range(len(cfg.pool))))
        self.norm = nn.LayerNorm(cfg.d_model)

    @property
    def total_pool(self) -> int:
        total = 1
        for p in self.config.pool:
            total *= p
        return total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.config.d_model or x.shape[1] % self.total_pool:
            raise ValueError(f"Sashimi expects (batch, length divisible by {self.total_pool}, {self.config.d_model}), "
                             f"got {tuple(x.shape)}")
        skips = [x]
        for pool in self.down:
            x = pool(x)
            skips.append(x)
        x = self.center(skips.pop())
        for pool, stage in zip(self.up, self.up_stages):
            x = stage(pool(x) + skips.pop())
        return self.norm(x)

    def init_state(self, batch: int, *, device=None, dtype=None) -> dict:
        """Per level: the down-pool's buffer, the up-pool's queue and the stages' states."""
        kw = dict(device=device, dtype=dtype)
        return {"down": [p.init_state(batch, **kw) for p in self.down],
                "up": [p.init_state(batch, **kw) for p in self.up],
                "center": self.center.init_state(batch, **kw),
                "up_stages": [stage.init_state(batch, **kw) for stage in self.up_stages]}

    def step(self, x: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """One fine step x (batch, H) -> (batch, H). Coarse levels run only on the steps where their
        down-pool completes a group; the up-pools replay their queues in between."""
        down, up, center, up_stages = list(state["down"]), list(state["up"]), state["center"], list(state["up_stages"])
        skips = [x]
        for i, pool in enumerate(self.down):
            x, down[i] = pool.step(x, down[i])
            if x is None:
                break
            skips.append(x)
        reached = len(skips) - 1  # deepest level computed at this step
        n_levels = len(self.down)
        y = None
        if reached == n_levels:
            y, center = self.center.step(skips[-1], center)
        for k, (pool, stage) in enumerate(zip(self.up, self.up_stages)):
            level = n_levels - 1 - k  # the level this up-pool outputs
            if level <= reached:
                out, up[k] = pool.step(y, up[k])
                y, up_stages[k] = stage.step(out + skips[level], up_stages[k])
        return self.norm(y), {"down": down, "up": up, "center": center, "up_stages": up_stages}


class SashimiLM(nn.Module):
    """Token embedding -> SaShiMi -> logits over `n_classes` sample values. Input token t is the
    sample before target t (the data pipeline shifts), so logits t model sample t given samples < t."""

    def __init__(self, cfg: SashimiConfig | None = None, **overrides):
        super().__init__()
        cfg = SashimiConfig(**{**asdict(cfg or SashimiConfig()), **overrides})
        self.config = cfg
        self.embedding = nn.Embedding(cfg.n_classes, cfg.d_model)
        self.backbone = Sashimi(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.n_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (batch, L) int -> logits (batch, L, n_classes)."""
        return self.head(self.backbone(self.embedding(tokens)))

    def init_state(self, batch: int, *, device=None, dtype=None) -> dict:
        return self.backbone.init_state(batch, device=device, dtype=dtype)

    def step(self, tokens: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """tokens (batch,) -> (logits (batch, n_classes), state)."""
        y, state = self.backbone.step(self.embedding(tokens), state)
        return self.head(y), state


@register_model
def sashimi_sc09(**overrides) -> SashimiLM:
    """The paper's unconditional SC09 model: H=64, 8 layers per stage, pools 4x4, S4 (DPLR, LegS, tied
    state, N=64) with GLU: 4.76M parameters."""
    return SashimiLM(SashimiConfig(), **overrides)


@register_model
def sashimi_small(**overrides) -> SashimiLM:
    """A CPU-sized SaShiMi: H=32, 2 layers per stage, S4D (N=16, one state matrix per channel)."""
    return SashimiLM(SashimiConfig(d_model=32, n_layers=2, d_state=16, kernel="s4d", n_ssm=None), **overrides)
