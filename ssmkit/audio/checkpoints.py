"""Official SaShiMi checkpoints (state-spaces/s4, V4 `src/` layout, e.g. `sashimi_sc09.pt`) as ssmkit weights.

    ssmkit.load_official("sashimi", "sashimi_sc09.pt")                  # sizes from the checkpoint
    ssmkit.load_official("sashimi", path, dt_transform="exp")            # a V3 checkpoint converted to V4

The official model is the same network as `SashimiLM` (same block order, pre-norm residuals, pools and
up-pool shift); its weights differ only in how they are stored, and `convert_official_sashimi` undoes each
difference:
- residual norms are scalar (`norm.norm.m`, `norm.norm.s`: `ScalarNorm`, config norm="scalar") or a
  LayerNorm (`norm.norm.ln.*`); the final `model.norm` is always a LayerNorm;
- pools are weight-normed (`weight_g`, `weight_v`: W = g·v/‖v‖ per output row) and order the down-pool's
  input columns and the up-pool's output rows as (channel, sample) where ssmkit uses (sample, channel);
- the S4 kernel stores dt as `inv_dt` under a transform (softplus in the V4 configs, exp for V3 checkpoints
  converted by `convert_v3_to_v4.py`; the keys cannot tell which, hence `dt_transform`), Λ as
  `A_real` = log(−Re Λ) and `A_imag` = −Im Λ (ssmkit's log_A_real, A_imag), B, P, C, D with leading
  singleton dims, and C as C̃ = C(I − Āᴸ) for L = the buffer `l_kernel` (0: C itself), so
  C = C̃(I − Āᴸ)⁻¹ is solved in float64 with the full-state Ā of `DPLRKernel.discrete()`. The official
  output is Re([C, C̄]·x), ssmkit's 2·Re([C, C̄]/2·x): the same C.
Sizes are inferred from the shapes (`official_sashimi_config`). The files are a raw state dict (`.pt`) or a
Lightning checkpoint whose "state_dict" holds one (keys "model.", "encoder.", "decoder.").
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssmkit.audio.sashimi import SashimiConfig, SashimiLM
from ssmkit.core.s4 import DPLRKernel
from ssmkit.errors import CheckpointError
from ssmkit.registry import create_model, register_official

__all__ = ["DT_TRANSFORMS", "official_sashimi_config", "convert_official_sashimi"]

DT_TRANSFORMS = {"softplus": F.softplus, "exp": torch.exp}


def _check_v4(state: dict[str, torch.Tensor]) -> None:
    if any(".kernel.kernel." in k or k.endswith("log_dt") for k in state):
        raise CheckpointError("a V3 (or older) layout; convert it with the official checkpoints/convert_v3_to_v4.py "
                              "and load it with dt_transform='exp'")


def _check_state_sharing(n_ssm: int, width: int) -> None:
    if 1 < n_ssm < width:
        # the official code gives channel h the state matrix h mod n_ssm, ssmkit h div (H/n_ssm)
        raise CheckpointError(f"n_ssm = {n_ssm} (neither 1 nor one per channel) assigns state matrices to "
                              f"channels in an order ssmkit does not implement")


class _Keys:
    """Hands out the official tensors once each, so that missing, misshapen and unused keys are reported."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state, self.used = state, set()

    def has(self, key: str) -> bool:
        return key in self.state

    def get(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in self.state:
            raise CheckpointError(f"missing key {key!r}")
        self.used.add(key)
        value = self.state[key].detach()
        value = value.double() if value.is_floating_point() else value
        if tuple(value.shape) == tuple(shape):
            return value
        # the official code keeps singleton dims (channels, rank, tied dt) that ssmkit does not
        if [d for d in value.shape if d != 1] == [d for d in shape if d != 1]:
            return value.reshape(shape)
        raise CheckpointError(f"key {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)} "
                              f"(up to singleton dims)")

    def check_all_used(self) -> None:
        unused = sorted(set(self.state) - self.used)
        if unused:
            raise CheckpointError(f"unexpected keys {unused[:8]}{' ...' if len(unused) > 8 else ''}")


def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in state if (m := regex.fullmatch(k))})


def _single(state: dict[str, torch.Tensor], pattern: str, what: str) -> str:
    found = [k for k in state if re.fullmatch(pattern, k)]
    if len(found) != 1:
        raise CheckpointError(f"expected one {what} key matching {pattern!r}, found {found}")
    return found[0]


def official_sashimi_config(state_dict: dict[str, torch.Tensor], **overrides) -> SashimiConfig:
    """The SashimiConfig of an official SaShiMi state dict, from its shapes: embedding (n_classes, H), pools
    (expand, pool), blocks (n_layers, ff, glu, N, n_ssm) and the residual norm; `overrides` replace fields."""
    _check_v4(state_dict)
    state = state_dict
    n_classes, d_model = state[_single(state, r"encoder\.\d+\.weight", "embedding")].shape
    pools, expand, width = [], None, d_model
    for i in range(_count(state, r"model\.d_layers\.(\d+)\.linear\.weight_v")):
        out, cols = state[f"model.d_layers.{i}.linear.weight_v"].shape
        if cols % width or out % width or (expand is not None and out // width != expand):
            raise CheckpointError(f"model.d_layers.{i}.linear.weight_v has shape {(out, cols)}, not "
                                  f"(expand·{width}, pool·{width}) with one expand for every pool")
        pools.append(cols // width)
        expand, width = out // width, out
    n_center = _count(state, r"model\.c_layers\.(\d+)\..*")
    if n_center % 2:
        raise CheckpointError(f"{n_center} c_layers; ssmkit needs [S4, feed-forward] pairs (ff > 0)")
    if n_center == 0:
        raise CheckpointError("no model.c_layers (S4 blocks) found")
    s4, ffn = "model.c_layers.0", "model.c_layers.1"
    for key in (f"{s4}.layer.layer.kernel.A_real", f"{s4}.layer.layer.kernel.P"):
        if key not in state:
            raise CheckpointError(f"missing key {key!r}; only the DPLR S4 (mode nplr) SaShiMi is supported")
    for key in (f"{ffn}.layer.ff.0.0.weight", f"{s4}.layer.output_linear.0.weight"):
        if key not in state:
            raise CheckpointError(f"missing key {key!r}")
    n_ssm, half = state[f"{s4}.layer.layer.kernel.A_real"].shape
    _check_state_sharing(n_ssm, width)
    fields = dict(d_model=d_model, n_layers=n_center // 2, pool=tuple(pools), expand=expand or 1,
                  ff=state[f"{ffn}.layer.ff.0.0.weight"].shape[0] // width, d_state=2 * half, kernel="dplr",
                  n_ssm=None if n_ssm == width > 1 else n_ssm,
                  glu=state[f"{s4}.layer.output_linear.0.weight"].shape[0] == 2 * width, n_classes=n_classes,
                  norm="scalar" if f"{s4}.norm.norm.m" in state else "layer")
    return SashimiConfig(**{**fields, **overrides})


def _weight_norm(keys: _Keys, prefix: str, shape: tuple[int, int]) -> torch.Tensor:
    """W = g·v/‖v‖ with the norm over each output row (torch weight_norm, dim 0)."""
    v = keys.get(f"{prefix}.weight_v", shape)
    g = keys.get(f"{prefix}.weight_g", (shape[0], 1))
    return g * v / v.norm(dim=1, keepdim=True)


def _c_from_c_tilde(kernel_params: dict[str, torch.Tensor], width: int, config: SashimiConfig,
                    length: int) -> torch.Tensor:
    """C = C̃(I − Āᴸ)⁻¹ for the stored C̃ = C(I − Āᴸ), in float64, with Ā from the core's DPLR kernel (a
    single layer holding these parameters, so the discretisation is the one the model runs)."""
    kernel = DPLRKernel(width, config.d_state, n_ssm=config.n_ssm).double()
    kernel.load_state_dict(kernel_params)
    with torch.no_grad():
        dA = kernel.discrete()[0]
    c_tilde = torch.view_as_complex(kernel_params["C"].contiguous())
    c_full = torch.cat([c_tilde, c_tilde.conj()], -1)
    eye = torch.eye(dA.shape[-1], dtype=dA.dtype)
    c = torch.linalg.solve((eye - torch.linalg.matrix_power(dA, length)).transpose(-1, -2), c_full)
    return torch.view_as_real(c[:, :c_tilde.shape[-1]].contiguous())


def _convert_block(keys: _Keys, dst: str, src: str, width: int, is_s4: bool, config: SashimiConfig,
                   dt_transform: str) -> dict[str, torch.Tensor]:
    """One residual block (norm + S4 block or feed-forward) of `width` channels."""
    out = {}
    if config.norm == "scalar":
        out[f"{dst}.norm.m"] = keys.get(f"{src}.norm.norm.m", (1,))
        out[f"{dst}.norm.s"] = keys.get(f"{src}.norm.norm.s", (1,))
    else:
        ln = f"{src}.norm.norm.ln" if keys.has(f"{src}.norm.norm.ln.weight") else f"{src}.norm.norm"
        out[f"{dst}.norm.weight"] = keys.get(f"{ln}.weight", (width,))
        out[f"{dst}.norm.bias"] = keys.get(f"{ln}.bias", (width,))
    if not is_s4:
        hidden = config.ff * width
        out[f"{dst}.layer.net.0.weight"] = keys.get(f"{src}.layer.ff.0.0.weight", (hidden, width))
        out[f"{dst}.layer.net.0.bias"] = keys.get(f"{src}.layer.ff.0.0.bias", (hidden,))
        out[f"{dst}.layer.net.3.weight"] = keys.get(f"{src}.layer.ff.2.weight", (width, hidden))
        out[f"{dst}.layer.net.3.bias"] = keys.get(f"{src}.layer.ff.2.bias", (width,))
        return out
    n_ssm, half = width if config.n_ssm is None else config.n_ssm, config.d_state // 2
    _check_state_sharing(n_ssm, width)
    kernel = f"{src}.layer.layer.kernel"
    params = {"log_dt": torch.log(DT_TRANSFORMS[dt_transform](keys.get(f"{kernel}.inv_dt", (width,)))),
              "log_A_real": keys.get(f"{kernel}.A_real", (n_ssm, half)),
              "A_imag": keys.get(f"{kernel}.A_imag", (n_ssm, half)),
              "P": keys.get(f"{kernel}.P", (n_ssm, half, 2)),
              "B": keys.get(f"{kernel}.B", (n_ssm, half, 2)),
              "C": keys.get(f"{kernel}.C", (width, half, 2))}
    length = int(keys.get(f"{kernel}.l_kernel", ()).item())
    if length > 0:
        params["C"] = _c_from_c_tilde(params, width, config, length)
    out.update({f"{dst}.layer.s4.kernel.{name}": value for name, value in params.items()})
    out[f"{dst}.layer.s4.D"] = keys.get(f"{src}.layer.layer.D", (width,))
    rows = 2 * width if config.glu else width
    out[f"{dst}.layer.output_linear.weight"] = keys.get(f"{src}.layer.output_linear.0.weight", (rows, width))
    out[f"{dst}.layer.output_linear.bias"] = keys.get(f"{src}.layer.output_linear.0.bias", (rows,))
    return out


def convert_official_sashimi(state_dict: dict[str, torch.Tensor], config: SashimiConfig,
                             dt_transform: str = "softplus") -> dict[str, torch.Tensor]:
    """An official SaShiMi state dict -> the float64 state dict of a SashimiLM of `config` (see the module
    docstring). dt_transform: 'softplus' (V4 configs, the default) or 'exp' (V3 checkpoints converted by the
    official convert_v3_to_v4.py). Every official key must be used exactly once."""
    if dt_transform not in DT_TRANSFORMS:
        raise ValueError(f"dt_transform must be one of {sorted(DT_TRANSFORMS)}, got {dt_transform!r}")
    if config.kernel != "dplr":
        raise CheckpointError(f"the official SaShiMi checkpoints hold DPLR S4 kernels, not kernel={config.kernel!r}")
    _check_v4(state_dict)
    keys = _Keys(state_dict)
    d, n_classes = config.d_model, config.n_classes
    head = _single(state_dict, r"decoder\.\d+\.output_transform\.weight", "output head")[:-len(".weight")]
    out = {"embedding.weight": keys.get(_single(state_dict, r"encoder\.\d+\.weight", "embedding"), (n_classes, d)),
           "head.weight": keys.get(f"{head}.weight", (n_classes, d)),
           "head.bias": keys.get(f"{head}.bias", (n_classes,)),
           "backbone.norm.weight": keys.get("model.norm.weight", (d,)),
           "backbone.norm.bias": keys.get("model.norm.bias", (d,))}
    widths = [d]
    for _ in config.pool:
        widths.append(widths[-1] * config.expand)
    for i, pool in enumerate(config.pool):
        h, width_out = widths[i], widths[i + 1]
        w = _weight_norm(keys, f"model.d_layers.{i}.linear", (width_out, h * pool))
        # official columns are (channel, sample); ssmkit's (sample, channel)
        out[f"backbone.down.{i}.linear.weight"] = w.reshape(width_out, h, pool).transpose(1, 2).reshape(
            width_out, h * pool)
        out[f"backbone.down.{i}.linear.bias"] = keys.get(f"model.d_layers.{i}.linear.bias", (width_out,))
    levels = list(reversed(range(len(config.pool))))  # up-pool k outputs level levels[k], coarsest first
    for k, i in enumerate(levels):
        d_out, pool, width_in = widths[i], config.pool[i], widths[i + 1]
        rows = d_out * pool
        w = _weight_norm(keys, f"model.u_layers.{k}.0.linear", (rows, width_in))
        b = keys.get(f"model.u_layers.{k}.0.linear.bias", (rows,))
        # official rows are (channel, sample); ssmkit's (sample, channel)
        out[f"backbone.up.{k}.linear.weight"] = w.reshape(d_out, pool, width_in).transpose(0, 1).reshape(
            rows, width_in)
        out[f"backbone.up.{k}.linear.bias"] = b.reshape(d_out, pool).T.reshape(rows)
    n_blocks = 2 * config.n_layers  # [S4, feed-forward] pairs
    blocks = [(f"backbone.center.{j}", f"model.c_layers.{j}", widths[-1], j) for j in range(n_blocks)]
    for k, i in enumerate(levels):
        blocks += [(f"backbone.up_stages.{k}.{j}", f"model.u_layers.{k}.{j + 1}", widths[i], j)
                   for j in range(n_blocks)]
    for dst, src, width, j in blocks:
        out.update(_convert_block(keys, dst, src, width, j % 2 == 0, config, dt_transform))
    keys.check_all_used()
    return out


def _build_for_checkpoint(state_dict: dict[str, torch.Tensor], name: str | None, **overrides) -> nn.Module:
    """The SashimiLM that `ssmkit.load_official` loads: of the checkpoint's sizes for name None, else the
    registered `name`."""
    if name is None:
        return SashimiLM(official_sashimi_config(state_dict, **overrides))
    return create_model(name, **overrides)


register_official("sashimi", SashimiLM, convert_official_sashimi, build=_build_for_checkpoint,
                  convert_options=("dt_transform",))
