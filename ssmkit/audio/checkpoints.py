"""Load the official SaShiMi checkpoints (state-spaces/s4, V4 `src/` layout, e.g. `sashimi_sc09.pt`).

The official model is the same network as `SashimiLM` (same block order, pre-norm residuals, pools and
up-pool shift); its weights differ only in how they are stored, and each difference is undone here:
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
Sizes are inferred from the shapes. Files are read with `torch.load(weights_only=True)`: a raw state dict
(`.pt`) or a Lightning checkpoint whose "state_dict" holds one (keys "model.", "encoder.", "decoder.").
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F

from ssmkit.audio.sashimi import SashimiConfig, SashimiLM
from ssmkit.errors import CheckpointError

__all__ = ["read_official_state_dict", "convert_official_sashimi", "load_official_sashimi"]

DT_TRANSFORMS = {"softplus": F.softplus, "exp": torch.exp}


def read_official_state_dict(source: str | Path | dict) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, name for messages) from a state dict, a `.pt` state dict file or a Lightning `.ckpt`."""
    if isinstance(source, dict):
        state, name = source, "<state dict>"
    else:
        name = str(source)
        if not Path(source).is_file():
            raise CheckpointError(f"{name}: no such file")
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unreadable pickle ends here with its reason
            raise CheckpointError(f"{name}: not a tensors-only torch file ({error.__class__.__name__}: "
                                  f"{str(error).splitlines()[0] if str(error) else ''}); a Lightning .ckpt that "
                                  f"pickles its config must have its state_dict saved on its own first") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{name}: not a state dict of tensors")
    if any(".kernel.kernel." in k or k.endswith("log_dt") for k in state):
        raise CheckpointError(f"{name}: a V3 (or older) layout; convert it with the official "
                              f"checkpoints/convert_v3_to_v4.py and load it with dt_transform='exp'")
    return state, name


class _Keys:
    """Hands out the official tensors once each, so that missing, misshapen and unused keys are reported."""

    def __init__(self, state: dict[str, torch.Tensor], name: str):
        self.state, self.name, self.used = state, name, set()

    def has(self, key: str) -> bool:
        return key in self.state

    def get(self, key: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if key not in self.state:
            raise CheckpointError(f"{self.name}: missing key {key!r}")
        self.used.add(key)
        value = self.state[key].detach()
        value = value.double() if value.is_floating_point() else value
        if shape is None or tuple(value.shape) == tuple(shape):
            return value
        # the official code keeps singleton dims (channels, rank, tied dt) that ssmkit does not
        if [d for d in value.shape if d != 1] == [d for d in shape if d != 1]:
            return value.reshape(shape)
        raise CheckpointError(f"{self.name}: key {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)} "
                              f"(up to singleton dims)")

    def check_all_used(self) -> None:
        unused = sorted(set(self.state) - self.used)
        if unused:
            raise CheckpointError(f"{self.name}: unexpected keys {unused[:8]}{' ...' if len(unused) > 8 else ''}")


def _count(keys: _Keys, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in keys.state if (m := regex.fullmatch(k))})


def _single(keys: _Keys, pattern: str, what: str) -> str:
    found = [k for k in keys.state if re.fullmatch(pattern, k)]
    if len(found) != 1:
        raise CheckpointError(f"{keys.name}: expected one {what} key matching {pattern!r}, found {found}")
    return found[0]


def _infer_config(keys: _Keys) -> SashimiConfig:
    """Sizes from the shapes: embedding (n_classes, H), pools (expand, pool), blocks (n_layers, ff, glu, N)."""
    embedding = keys.state[_single(keys, r"encoder\.\d+\.weight", "embedding")]
    n_classes, d_model = embedding.shape
    n_down = _count(keys, r"model\.d_layers\.(\d+)\.linear\.weight_v")
    pools, expand, width = [], None, d_model
    for i in range(n_down):
        out, cols = keys.state[f"model.d_layers.{i}.linear.weight_v"].shape
        if cols % width or out % width or (expand is not None and out // width != expand):
            raise CheckpointError(f"{keys.name}: model.d_layers.{i}.linear.weight_v has shape {(out, cols)}, "
                                  f"not (expand·{width}, pool·{width}) with one expand for every pool")
        pools.append(cols // width)
        expand, width = out // width, out
    n_center = _count(keys, r"model\.c_layers\.(\d+)\..*")
    if n_center % 2:
        raise CheckpointError(f"{keys.name}: {n_center} c_layers; ssmkit needs [S4, feed-forward] pairs (ff > 0)")
    if n_center == 0:
        raise CheckpointError(f"{keys.name}: no model.c_layers (S4 blocks) found")
    s4, ffn = "model.c_layers.0", "model.c_layers.1"
    for key in (f"{s4}.layer.layer.kernel.A_real", f"{s4}.layer.layer.kernel.P"):
        if key not in keys.state:
            raise CheckpointError(f"{keys.name}: missing key {key!r}; only the DPLR S4 (mode nplr) SaShiMi is "
                                  f"supported")
    for key in (f"{ffn}.layer.ff.0.0.weight", f"{s4}.layer.output_linear.0.weight"):
        if key not in keys.state:
            raise CheckpointError(f"{keys.name}: missing key {key!r}")
    n_ssm, half = keys.state[f"{s4}.layer.layer.kernel.A_real"].shape
    if 1 < n_ssm < width:
        # the official code gives channel h the state matrix h mod n_ssm, ssmkit h div (H/n_ssm)
        raise CheckpointError(f"{keys.name}: n_ssm = {n_ssm} (neither 1 nor one per channel) assigns state "
                              f"matrices to channels in an order ssmkit does not implement")
    return SashimiConfig(d_model=d_model, n_layers=n_center // 2, pool=tuple(pools), expand=expand or 1,
                         ff=keys.state[f"{ffn}.layer.ff.0.0.weight"].shape[0] // width, d_state=2 * half,
                         kernel="dplr", n_ssm=None if n_ssm == width > 1 else n_ssm,
                         glu=keys.state[f"{s4}.layer.output_linear.0.weight"].shape[0] == 2 * width,
                         n_classes=n_classes, norm="scalar" if f"{s4}.norm.norm.m" in keys.state else "layer")


def _weight_norm(keys: _Keys, prefix: str, shape: tuple[int, int]) -> torch.Tensor:
    """W = g·v/‖v‖ with the norm over each output row (torch weight_norm, dim 0)."""
    v = keys.get(f"{prefix}.weight_v", shape)
    g = keys.get(f"{prefix}.weight_g", (shape[0], 1))
    return g * v / v.norm(dim=1, keepdim=True)


def convert_official_sashimi(source: str | Path | dict, dt_transform: str = "softplus") -> SashimiLM:
    """The official checkpoint as a float64 SashimiLM (train mode); `load_official_sashimi` is the entry point."""
    if dt_transform not in DT_TRANSFORMS:
        raise ValueError(f"dt_transform must be one of {sorted(DT_TRANSFORMS)}, got {dt_transform!r}")
    state, name = read_official_state_dict(source)
    keys = _Keys(state, name)
    cfg = _infer_config(keys)
    model = SashimiLM(cfg).double()
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}

    def copy(dst: str, src: str) -> None:
        out[dst] = keys.get(src, target[dst].shape)

    copy("embedding.weight", _single(keys, r"encoder\.\d+\.weight", "embedding"))
    head = _single(keys, r"decoder\.\d+\.output_transform\.weight", "output head")[:-len(".weight")]
    copy("head.weight", f"{head}.weight")
    copy("head.bias", f"{head}.bias")
    copy("backbone.norm.weight", "model.norm.weight")
    copy("backbone.norm.bias", "model.norm.bias")

    backbone = model.backbone
    for i, pool in enumerate(backbone.down):
        width_out, width_in = pool.linear.weight.shape
        h = width_in // pool.pool
        w = _weight_norm(keys, f"model.d_layers.{i}.linear", (width_out, width_in))
        # official columns are (channel, sample); ssmkit's (sample, channel)
        out[f"backbone.down.{i}.linear.weight"] = w.reshape(width_out, h, pool.pool).transpose(1, 2).reshape(
            width_out, width_in)
        copy(f"backbone.down.{i}.linear.bias", f"model.d_layers.{i}.linear.bias")
    for k, pool in enumerate(backbone.up):
        rows, width_in = pool.linear.weight.shape
        w = _weight_norm(keys, f"model.u_layers.{k}.0.linear", (rows, width_in))
        b = keys.get(f"model.u_layers.{k}.0.linear.bias", (rows,))
        # official rows are (channel, sample); ssmkit's (sample, channel)
        out[f"backbone.up.{k}.linear.weight"] = w.reshape(pool.d_out, pool.pool, width_in).transpose(0, 1).reshape(
            rows, width_in)
        out[f"backbone.up.{k}.linear.bias"] = b.reshape(pool.d_out, pool.pool).T.reshape(rows)

    blocks = [(f"backbone.center.{j}", f"model.c_layers.{j}") for j in range(len(backbone.center))]
    for k, stage in enumerate(backbone.up_stages):
        blocks += [(f"backbone.up_stages.{k}.{j}", f"model.u_layers.{k}.{j + 1}") for j in range(len(stage))]
    l_kernels = {}
    for j, (dst, src) in enumerate(blocks):
        if cfg.norm == "scalar":
            copy(f"{dst}.norm.m", f"{src}.norm.norm.m")
            copy(f"{dst}.norm.s", f"{src}.norm.norm.s")
        else:
            ln = f"{src}.norm.norm.ln" if keys.has(f"{src}.norm.norm.ln.weight") else f"{src}.norm.norm"
            copy(f"{dst}.norm.weight", f"{ln}.weight")
            copy(f"{dst}.norm.bias", f"{ln}.bias")
        if j % 2:  # feed-forward block
            copy(f"{dst}.layer.net.0.weight", f"{src}.layer.ff.0.0.weight")
            copy(f"{dst}.layer.net.0.bias", f"{src}.layer.ff.0.0.bias")
            copy(f"{dst}.layer.net.3.weight", f"{src}.layer.ff.2.weight")
            copy(f"{dst}.layer.net.3.bias", f"{src}.layer.ff.2.bias")
            continue
        kernel, ours = f"{src}.layer.layer.kernel", f"{dst}.layer.s4.kernel"
        inv_dt = keys.get(f"{kernel}.inv_dt", target[f"{ours}.log_dt"].shape)
        out[f"{ours}.log_dt"] = torch.log(DT_TRANSFORMS[dt_transform](inv_dt))
        for mine, theirs in (("log_A_real", "A_real"), ("A_imag", "A_imag"), ("P", "P"), ("B", "B"), ("C", "C")):
            copy(f"{ours}.{mine}", f"{kernel}.{theirs}")
        l_kernels[ours] = int(keys.get(f"{kernel}.l_kernel", ()).item())
        copy(f"{dst}.layer.s4.D", f"{src}.layer.layer.D")
        copy(f"{dst}.layer.output_linear.weight", f"{src}.layer.output_linear.0.weight")
        copy(f"{dst}.layer.output_linear.bias", f"{src}.layer.output_linear.0.bias")
    keys.check_all_used()
    missing = sorted(set(target) - set(out))
    if missing:  # a mapping gap in this module, not in the file
        raise RuntimeError(f"convert_official_sashimi left ssmkit keys unset: {missing}")
    model.load_state_dict(out)

    with torch.no_grad():
        modules = dict(model.named_modules())
        for ours, length in l_kernels.items():
            if length > 0:  # stored C̃ = C(I − Āᴸ): solve for C
                kernel = modules[ours]
                dA = kernel.discrete()[0]
                c_tilde = torch.view_as_complex(kernel.C)
                c_full = torch.cat([c_tilde, c_tilde.conj()], -1)
                eye = torch.eye(dA.shape[-1], dtype=dA.dtype)
                c = torch.linalg.solve((eye - torch.linalg.matrix_power(dA, length)).transpose(-1, -2), c_full)
                kernel.C.copy_(torch.view_as_real(c[:, :c_tilde.shape[-1]].contiguous()))
    return model


def load_official_sashimi(source: str | Path | dict, dt_transform: str = "softplus",
                          dtype: torch.dtype = torch.float32) -> SashimiLM:
    """A SashimiLM in eval mode whose forward is the official model's on the same weights.

    source: a state dict, a `.pt` file holding one, or a Lightning `.ckpt`. dt_transform: 'softplus'
    (V4 configs, the default) or 'exp' (V3 checkpoints converted by the official convert_v3_to_v4.py)."""
    return convert_official_sashimi(source, dt_transform).to(dtype).eval()
