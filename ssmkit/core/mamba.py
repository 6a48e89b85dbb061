"""The Mamba-1 mixer, its second-branch variants (bidirectional, sequence-reordered) and the Mamba / Mamba-2 LM.

`Mamba` uses mamba_ssm's parameter names, shapes and initialisation, so a mamba_ssm `Mamba` state dict
loads unchanged. With `branch_order` it gains a second set of direction parameters under Vision Mamba's
names (`conv1d_b`, `x_proj_b`, `dt_proj_b`, `A_b_log`, `D_b`) that scans the sequence in another order:
`"flip"` gives Vim's "bimamba v2" mixer, `StridedOrder(R)` gives MambaMIL's SR-Mamba mixer, and the
vision package passes its own 2-D scan orders as `SequenceOrder` subclasses, per call when the order
depends on the input (`forward(x, branch_order=...)`). All the math goes through `ssmkit.core.scan`
(`selective_scan` for sequences, `selective_state_update` for one-step generation). The causal modules
follow the recurrent-step protocol of `ssmkit.core.generation` (`init_state`, `step`).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssmkit.core.layers import DropPath, RMSNorm, causal_conv1d, causal_conv1d_step, inverse_softplus_dt
from ssmkit.core.lm_checkpoints import load_pretrained_lm
from ssmkit.core.mamba2 import Mamba2
from ssmkit.core.scan import selective_scan, selective_state_update
from ssmkit.registry import register_model

__all__ = [
    "SequenceOrder",
    "FlipOrder",
    "StridedOrder",
    "MambaState",
    "Mamba",
    "add_ssm_parameters",
    "MambaBlock",
    "MambaLM",
]


# ----------------------------------------------------------------------------------------------------
# Sequence orders for the second branch


class SequenceOrder:
    """A reordering of a length-L sequence, used by the second branch of `Mamba`.

    Subclasses implement only `index(length, device)`: a 1-D LongTensor `idx` such that the reordered
    sequence is `padded[idx]`, where `padded` is the sequence followed by zeros. Entries >= `length` read
    a zero (padding), so `len(idx)` may exceed `length`; the entries < `length` must be a permutation of
    0..length-1. `gather` and `scatter` apply the order and undo it (dropping the padded positions); the
    checked indices are cached per (length, device), keeping the most recent `cache_size` lengths.
    """

    cache_size = 64

    def index(self, length: int, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def _indices(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(gather index with padding entries clamped to `length`, inverse index of length `length`)."""
        cache = self.__dict__.setdefault("_index_cache", OrderedDict())
        key = (length, torch.device(device))
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        idx = self.index(length, device).to(device=device, dtype=torch.long)
        real = torch.nonzero(idx < length).squeeze(1) if idx.dim() == 1 else idx.new_empty(0)
        if (
            real.numel() != length
            or bool((idx < 0).any())
            or not torch.equal(idx[real].sort().values, torch.arange(length, device=device))
        ):
            raise ValueError(
                f"{self!r}.index({length}) must be a 1-D index whose entries < {length} are a permutation "
                f"of 0..{length - 1}; got {idx.tolist() if idx.numel() <= 32 else tuple(idx.shape)}"
            )
        inverse = torch.empty(length, dtype=torch.long, device=device)
        inverse[idx[real]] = real
        cache[key] = (idx.clamp(max=length), inverse)
        if len(cache) > self.cache_size:
            cache.popitem(last=False)
        return cache[key]

    def gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Reorder `x` along `dim`; positions past the end of the sequence are zeros."""
        length = x.shape[dim]
        idx, _ = self._indices(length, x.device)
        pad_shape = list(x.shape)
        pad_shape[dim] = 1
        padded = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
        return padded.index_select(dim, idx)

    def scatter(self, y: torch.Tensor, length: int, dim: int = -1) -> torch.Tensor:
        """Undo `gather`: return the `length` original positions of a reordered `y` in their old order."""
        _, inverse = self._indices(length, y.device)
        return y.index_select(dim, inverse)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FlipOrder(SequenceOrder):
    """The reversed sequence (Vision Mamba's backward direction, MambaMIL's BiMamba)."""

    def index(self, length: int, device: torch.device) -> torch.Tensor:
        return torch.arange(length - 1, -1, -1, device=device)


class StridedOrder(SequenceOrder):
    """MambaMIL's SR-Mamba order: pad L to a multiple of `rate` R, then read every R-th position.

    The padded sequence is viewed as a (ceil(L/R), R) grid filled row by row and read column by column,
    so positions R apart become neighbours: L=7, R=3 gives 0,3,6,1,4,7,2,5,8 (7 and 8 are zero padding).
    """

    def __init__(self, rate: int):
        if int(rate) != rate or rate < 1:
            raise ValueError(f"StridedOrder rate must be a positive integer, got {rate!r}")
        self.rate = int(rate)

    def index(self, length: int, device: torch.device) -> torch.Tensor:
        rows = -(-length // self.rate)
        return torch.arange(rows * self.rate, device=device).view(rows, self.rate).t().reshape(-1)

    def __repr__(self) -> str:
        return f"StridedOrder(rate={self.rate})"


def _sequence_order(order: SequenceOrder | str) -> SequenceOrder:
    """`"flip"` or a `SequenceOrder` as a `SequenceOrder`."""
    if order == "flip":
        return FlipOrder()
    if not isinstance(order, SequenceOrder):
        raise ValueError(f"branch_order must be None, 'flip' or a SequenceOrder, got {order!r}")
    return order


# ----------------------------------------------------------------------------------------------------
# The mixer


@dataclass
class MambaState:
    """Recurrent state of one `Mamba` mixer: the last `d_conv` conv inputs and the SSM state."""

    conv_state: torch.Tensor  # (batch, d_inner, d_conv)
    ssm_state: torch.Tensor  # (batch, d_inner, d_state), float32 (float64 for fp64 models)


# parameter names of the first and the second direction (mamba_ssm / Vision Mamba)
_FWD = ("conv1d", "x_proj", "dt_proj", "A_log", "D")
_BWD = ("conv1d_b", "x_proj_b", "dt_proj_b", "A_b_log", "D_b")


def add_ssm_parameters(module: nn.Module, names, d_inner: int, d_state: int, dt_rank: int, *, dt_min: float,
                       dt_max: float, dt_init: str, dt_scale: float, dt_init_floor: float, factory: dict) -> None:
    """Create one scan direction's x_proj, dt_proj, A_log and D on `module` under `names`, initialised
    as mamba_ssm does: dt_proj.bias = inverse softplus of dt drawn log-uniformly in [dt_min, dt_max]
    (floored), A_log = log(1..N) (S4D-real), D = 1; A_log and D fp32 and out of weight decay."""
    x_name, dt_name, a_name, d_name = names
    setattr(module, x_name, nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False, **factory))
    dt_proj = nn.Linear(dt_rank, d_inner, bias=True, **factory)
    std = dt_rank ** -0.5 * dt_scale
    with torch.no_grad():
        if dt_init == "constant":
            nn.init.constant_(dt_proj.weight, std)
        else:
            nn.init.uniform_(dt_proj.weight, -std, std)
        dt_proj.bias.copy_(inverse_softplus_dt(d_inner, dt_min, dt_max, dt_init_floor, **factory))
    dt_proj.bias._no_reinit = True
    setattr(module, dt_name, dt_proj)
    a_log = torch.arange(1, d_state + 1, dtype=torch.float32, device=factory["device"]).log().repeat(d_inner, 1)
    a_log = nn.Parameter(a_log)
    a_log._no_weight_decay = True
    setattr(module, a_name, a_log)
    d = nn.Parameter(torch.ones(d_inner, dtype=torch.float32, device=factory["device"]))
    d._no_weight_decay = True
    setattr(module, d_name, d)


class Mamba(nn.Module):
    """Mamba-1 selective-SSM mixer: (batch, L, d_model) -> (batch, L, d_model).

    in_proj -> (x, z); x -> causal depthwise conv + SiLU -> x_proj -> (dt, B, C); dt_proj weight on dt
    (its bias goes to the scan as `delta_bias` with softplus); y = selective_scan(x, dt, A=-exp(A_log),
    B, C, D, z) -> out_proj. Names, shapes and init follow mamba_ssm's `Mamba`.

    `branch_order` (None, `"flip"` or a `SequenceOrder`) adds a second direction with its own
    conv/x_proj/dt_proj/A/D (`*_b` names) that runs over the reordered x and z (zero padded where the
    order asks for padding); its output, put back in sequence order, is added to the first branch's
    before `out_proj`, halved when `divide_out` (Vision Mamba's `if_divide_out`, on in its released
    models; MambaMIL's SR/Bi mixers use the plain sum, `divide_out=False`). The order given here is the
    default; `forward(x, branch_order=...)` scans one call in another (e.g. the patch grid of this input).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        branch_order: SequenceOrder | str | None = None,
        divide_out: bool = True,
        backend: str | None = None,
        layer_idx: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        self.branch_order = None if branch_order is None else _sequence_order(branch_order)
        self.divide_out = divide_out
        self.backend = backend
        self.layer_idx = layer_idx

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        init = dict(dt_min=dt_min, dt_max=dt_max, dt_init=dt_init, dt_scale=dt_scale,
                    dt_init_floor=dt_init_floor, conv_bias=conv_bias, factory=factory)
        self._build_direction(_FWD, **init)
        if branch_order is not None:
            self._build_direction(_BWD, **init)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def _build_direction(self, names, *, conv_bias, factory, **init):
        """Create one direction's conv1d, x_proj, dt_proj, A_log, D under `names`, with mamba_ssm's init."""
        e = self.d_inner
        setattr(self, names[0], nn.Conv1d(e, e, self.d_conv, groups=e, padding=self.d_conv - 1,
                                          bias=conv_bias, **factory))
        add_ssm_parameters(self, names[1:], e, self.d_state, self.dt_rank, factory=factory, **init)

    def _scan_direction(self, x: torch.Tensor, z: torch.Tensor, names, reverse: bool = False) -> torch.Tensor:
        """One direction over x, z (batch, d_inner, L): conv + SiLU, x_proj, dt_proj weight, gated scan.
        reverse: the direction run over the flipped sequence, computed in place (anti-causal conv, scan
        from the end) with its output in the original order."""
        conv, x_proj, dt_proj, a_log, d = (getattr(self, name) for name in names)
        x = F.silu(causal_conv1d(x, conv.weight, conv.bias, reverse=reverse))
        dt, b, c = x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ dt_proj.weight.t()).transpose(1, 2)
        return selective_scan(
            x, delta, -torch.exp(a_log.float()), b.transpose(1, 2), c.transpose(1, 2),
            D=d.float(), z=z, delta_bias=dt_proj.bias.float(), delta_softplus=True, reverse=reverse,
            backend=self.backend,
        )

    def forward(self, x: torch.Tensor, branch_order: SequenceOrder | str | None = None) -> torch.Tensor:
        """x (batch, L, d_model) -> (batch, L, d_model); `branch_order` (`"flip"` or a `SequenceOrder`)
        scans the second branch in that order for this call instead of the constructor's."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"Mamba expects input of shape (batch, length, {self.d_model}), got {tuple(x.shape)}"
            )
        order = self.branch_order
        if branch_order is not None:
            if order is None:
                raise ValueError(f"Mamba.forward got branch_order={branch_order!r}, but this mixer has no second "
                                 "branch (construct it with branch_order=...)")
            order = _sequence_order(branch_order)
        xs, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)
        y = self._scan_direction(xs, z, _FWD)
        if isinstance(order, FlipOrder):  # no reordering needed: the flipped direction is a reverse scan
            y = y + self._scan_direction(xs, z, _BWD, reverse=True)
        elif order is not None:
            y = y + order.scatter(self._scan_direction(order.gather(xs), order.gather(z), _BWD), xs.shape[-1])
        if order is not None and self.divide_out:
            y = y * 0.5
        return self.out_proj(y.transpose(1, 2))

    def _check_causal(self) -> None:
        if self.branch_order is not None:
            raise RuntimeError(
                f"Mamba has no recurrent step: its second branch scans in {self.branch_order!r} order and "
                "sees later tokens; run forward() on the whole sequence instead"
            )

    def init_state(self, batch: int, *, device=None, dtype=None) -> MambaState:
        """The zero state. The conv state takes `dtype` (default: the conv weight's dtype); the SSM state
        is fp32, or fp64 for an fp64 model, so that `step` matches `forward` in either."""
        self._check_causal()
        weight = self.conv1d.weight
        device = weight.device if device is None else device
        return MambaState(
            conv_state=torch.zeros(batch, self.d_inner, self.d_conv, device=device,
                                   dtype=weight.dtype if dtype is None else dtype),
            ssm_state=torch.zeros(batch, self.d_inner, self.d_state, device=device,
                                  dtype=torch.promote_types(self.dt_proj.weight.dtype, torch.float32)),
        )

    def step(self, x_t: torch.Tensor, state: MambaState) -> tuple[torch.Tensor, MambaState]:
        """One token x_t (batch, d_model) or (batch, 1, d_model) -> (y of the same shape, state). Both
        tensors of `state` are updated in place (as mamba_ssm's decode step does) and `state` is returned."""
        self._check_causal()
        if not (x_t.dim() == 2 or (x_t.dim() == 3 and x_t.shape[1] == 1)) or x_t.shape[-1] != self.d_model:
            raise ValueError(
                f"Mamba.step expects one token of shape (batch, {self.d_model}) or "
                f"(batch, 1, {self.d_model}), got {tuple(x_t.shape)}"
            )
        x, z = self.in_proj(x_t.reshape(x_t.shape[0], self.d_model)).chunk(2, dim=-1)
        x = F.silu(causal_conv1d_step(state.conv_state, x, self.conv1d.weight, self.conv1d.bias)).to(z.dtype)
        dt, b, c = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        y = selective_state_update(
            state.ssm_state, x, F.linear(dt, self.dt_proj.weight), -torch.exp(self.A_log.float()), b, c,
            D=self.D.float(), z=z, dt_bias=self.dt_proj.bias.float(), dt_softplus=True, backend=self.backend,
        )
        return self.out_proj(y).reshape(x_t.shape), state


# ----------------------------------------------------------------------------------------------------
# Residual block and language model


def _make_norm(norm: str, d: int, eps: float, device=None, dtype=None) -> nn.Module:
    if norm == "rms":
        return RMSNorm(d, eps=eps, device=device, dtype=dtype)
    if norm == "layer":
        return nn.LayerNorm(d, eps=eps, device=device, dtype=dtype)
    raise ValueError(f"norm must be 'rms' or 'layer', got {norm!r}")


class MambaBlock(nn.Module):
    """mamba_ssm/Vim `Block`: Add -> Norm -> Mixer, carrying the residual stream separately.

    `forward(hidden, residual)` returns `(mixer(norm(residual')), residual')` with
    residual' = drop_path(hidden) + residual (or hidden for the first block), kept in at least fp32
    when `residual_in_fp32` (half-precision activations, full-precision residual stream). The mixer
    is `Mamba(d_model, **mixer_kwargs)` unless a ready-made module is given.
    """

    def __init__(
        self,
        d_model: int,
        mixer: nn.Module | None = None,
        norm: str = "rms",
        eps: float = 1e-5,
        drop_path: float = 0.0,
        residual_in_fp32: bool = True,
        device=None,
        dtype=None,
        **mixer_kwargs,
    ):
        super().__init__()
        if mixer is not None and mixer_kwargs:
            raise TypeError(f"mixer keyword arguments {sorted(mixer_kwargs)} given with a ready-made mixer")
        self.mixer = Mamba(d_model, device=device, dtype=dtype, **mixer_kwargs) if mixer is None else mixer
        self.norm = _make_norm(norm, d_model, eps, device, dtype)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.residual_in_fp32 = residual_in_fp32

    def _add_norm(self, hidden: torch.Tensor, residual: torch.Tensor | None):
        residual = hidden if residual is None else self.drop_path(hidden) + residual
        normed = self.norm(residual.to(self.norm.weight.dtype))
        if self.residual_in_fp32:
            residual = residual.to(torch.promote_types(residual.dtype, torch.float32))
        return normed, residual

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None = None,
                branch_order: SequenceOrder | str | None = None):
        """`branch_order` goes to the mixer: its second branch's order for this call."""
        normed, residual = self._add_norm(hidden, residual)
        mixed = self.mixer(normed) if branch_order is None else self.mixer(normed, branch_order=branch_order)
        return mixed, residual

    def init_state(self, batch: int, *, device=None, dtype=None):
        """The mixer's zero state."""
        return self.mixer.init_state(batch, device=device, dtype=dtype)

    def step(self, x, state):
        """One token of `forward`: x and y are (hidden, residual) pairs of (batch, d_model) tensors, as
        forward takes and returns them (residual None before the first block)."""
        normed, residual = self._add_norm(*x)
        mixed, state = self.mixer.step(normed, state)
        return (mixed, residual), state


def _init_weights(module: nn.Module, n_layer: int, initializer_range: float = 0.02) -> None:
    """mamba_ssm's `_init_weights` (one residual per layer): zero Linear biases unless marked
    `_no_reinit`, N(0, 0.02) embeddings, out_proj re-drawn (kaiming-uniform) and scaled by
    1/sqrt(n_layer) so the prenorm residual stream does not grow with depth."""
    if isinstance(module, nn.Linear):
        if module.bias is not None and not getattr(module.bias, "_no_reinit", False):
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=initializer_range)
    for name, p in module.named_parameters():
        if name == "out_proj.weight":
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            with torch.no_grad():
                p /= math.sqrt(n_layer)


_BLOCK_OPTIONS = ("norm", "eps", "drop_path", "residual_in_fp32")


def _mixer_class(mixer: str):
    if mixer == "mamba":
        return Mamba
    if mixer == "mamba2":
        return Mamba2
    raise ValueError(f"mixer must be 'mamba' or 'mamba2', got {mixer!r}")


class MambaLM(nn.Module):
    """A causal Mamba language model (mamba_ssm's `MambaLMHeadModel` layout), Mamba-1 or Mamba-2.

    embedding -> n_layer `MambaBlock`s -> final add + `norm_f` -> `lm_head` (tied to the embedding by
    default). mixer: "mamba" (`Mamba`) or "mamba2" (`ssmkit.core.mamba2.Mamba2`); d_state None takes the
    mixer's default (16 / 128). The vocabulary is padded to a multiple of `pad_vocab_multiple`; logits
    are cropped back to `vocab_size`. Keyword arguments `norm`, `eps`, `drop_path` and
    `residual_in_fp32` go to every `MambaBlock`, the rest to every mixer. `from_pretrained` loads the
    published checkpoints.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_layer: int,
        d_state: int | None = None,
        d_conv: int = 4,
        expand: float = 2,
        pad_vocab_multiple: int = 8,
        tie_embeddings: bool = True,
        mixer: str = "mamba",
        **kwargs,
    ):
        super().__init__()
        self.vocab_size, self.mixer = vocab_size, mixer
        padded_vocab = -(-vocab_size // pad_vocab_multiple) * pad_vocab_multiple
        factory = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        block_kwargs = {k: kwargs.pop(k) for k in _BLOCK_OPTIONS if k in kwargs}
        mixer_cls = _mixer_class(mixer)
        if d_state is not None:
            kwargs["d_state"] = d_state
        self.embedding = nn.Embedding(padded_vocab, d_model, **factory)
        self.layers = nn.ModuleList(
            MambaBlock(d_model, mixer=mixer_cls(d_model, d_conv=d_conv, expand=expand, layer_idx=i, **kwargs),
                       **block_kwargs, **factory)
            for i in range(n_layer)
        )
        self.norm_f = _make_norm(block_kwargs.get("norm", "rms"), d_model, block_kwargs.get("eps", 1e-5), **factory)
        self.lm_head = nn.Linear(d_model, padded_vocab, bias=False, **factory)
        self.apply(lambda m: _init_weights(m, n_layer))
        if tie_embeddings:
            self.lm_head.weight = self.embedding.weight

    @classmethod
    def from_pretrained(cls, folder, *, device=None, dtype=None) -> "MambaLM":
        """A published Mamba or Mamba-2 language model from a local folder, in either layout:
        mamba_ssm's (`state-spaces/mamba-*`, `mamba2-*`: config.json with d_model, n_layer, ssm_cfg, ...
        + pytorch_model.bin) or HF transformers' (`MambaForCausalLM` / `Mamba2ForCausalLM`: config.json
        + model.safetensors, sharded or not). Read without running code from the files; in eval mode."""
        return load_pretrained_lm(cls, folder, device=device, dtype=dtype)

    def _head(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        residual = hidden if residual is None else hidden + residual
        return self.lm_head(self.norm_f(residual.to(self.norm_f.weight.dtype)))[..., : self.vocab_size]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (batch, L) -> logits (batch, L, vocab_size)."""
        if input_ids.dim() != 2:
            raise ValueError(
                f"MambaLM expects input_ids of shape (batch, length), got {tuple(input_ids.shape)}"
            )
        hidden, residual = self.embedding(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        return self._head(hidden, residual)

    def init_state(self, batch: int, *, device=None, dtype=None) -> list[MambaState]:
        """One zero `MambaState` per layer."""
        return [layer.init_state(batch, device=device, dtype=dtype) for layer in self.layers]

    def step(self, token_ids: torch.Tensor, state: list[MambaState]) -> tuple[torch.Tensor, list[MambaState]]:
        """token_ids (batch,) -> (next-token logits (batch, vocab_size), state); the layers' states are
        updated in place (see `Mamba.step`). `ssmkit.core.generation.sample(lm, prompt, length)` samples."""
        if token_ids.dim() != 1:
            raise ValueError(
                f"MambaLM.step expects token_ids of shape (batch,), got {tuple(token_ids.shape)}"
            )
        streams, new_state = (self.embedding(token_ids), None), []
        for layer, layer_state in zip(self.layers, state):
            streams, layer_state = layer.step(streams, layer_state)
            new_state.append(layer_state)
        return self._head(*streams), new_state


@register_model
def mamba_lm_tiny(vocab_size: int = 16, **overrides) -> MambaLM:
    """ssmkit's small Mamba LM for synthetic tasks (`ssmkit seq`): d_model 64, 2 layers, d_state 16."""
    return MambaLM(vocab_size, **{"d_model": 64, "n_layer": 2, "d_state": 16, **overrides})


@register_model
def mamba2_lm_tiny(vocab_size: int = 16, **overrides) -> MambaLM:
    """The same small LM on Mamba-2 mixers: d_model 64, 2 layers, d_state 16, 8 heads of 16 channels."""
    return MambaLM(vocab_size, **{"d_model": 64, "n_layer": 2, "d_state": 16, "mixer": "mamba2", "headdim": 16,
                                  **overrides})
