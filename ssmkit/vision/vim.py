"""Vision Mamba (Vim, hustvl/Vim, ICML 2024): a plain stack of bidirectional Mamba blocks over patches.

Layout (names match the official checkpoints, so `convert_official_vim` renames nothing;
`ssmkit.load_official("vim_tiny", path)`, or with a model in place of the name, loads them):

    patch_embed.proj   Conv2d(in_chans, D, patch, stride=patch)            -> (B, M, D), M = H·W
    cls_token          (1, 1, D), spliced into the sequence at index M // 2 (the "middle class token")
    pos_embed          (1, M + 1, D), added after the splice (the cls entry lives at index M // 2)
    layers.{i}         `MambaBlock` (Add -> RMSNorm -> mixer, residual stream in fp32) whose mixer is
                       the "bimamba v2" `Mamba(branch_order="flip", divide_out=True)`: in_proj/out_proj
                       shared, conv1d/x_proj/dt_proj/A_log/D per direction (`*_b` for the second one)
    norm_f             final add + RMSNorm
    head               Linear(D, num_classes) on the hidden state at the class-token position

Other image sizes: the position embedding is resized on the fly around the middle class token
(`resize_pos_embed_mid_cls`): the class entry is taken out, the patch grid is resized bicubically, and
the class entry goes back in at the new M' // 2 (the official fine-tuning script resizes the wrong
entry). `scan_order` picks the second branch's order: the default is the reversed sequence (Vim);
any single-order name of `ssmkit.vision.scan_orders.get_scan_order` scans the patch grid in that order
instead (the class token stays in the middle of that sequence). `mixer="hydra"` (`vim_hydra_tiny`) puts
Hydra's bidirectional SSD mixer (`ssmkit.core.hydra`, `headdim`, conv width 7) in every block instead.

Configs (`vim_tiny|small|base`, timm: `ssmkit_vim_tiny|small|base`) follow the paper: D = 192/384/768,
depth 24, d_state 16, expand 2, patch 16, middle class token, divide_out, 7.15M / 25.80M / 97.6M
parameters at 224² with a 1000-class head.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed, trunc_normal_

from ssmkit.checkpoints import unwrap_state_dict
from ssmkit.core.hydra import Hydra
from ssmkit.core.layers import DropPath, RMSNorm, drop_path_rates
from ssmkit.core.mamba import MambaBlock, SequenceOrder
from ssmkit.errors import CheckpointError
from ssmkit.registry import register_model as ssmkit_register_model
from ssmkit.registry import register_official
from ssmkit.vision.scan_orders import GridOrder, GridSequenceOrder, get_scan_order
from ssmkit.vision.timm_models import default_cfg_for, register_timm_family

__all__ = [
    "VisionMamba",
    "MidClsGridOrder",
    "resize_pos_embed_mid_cls",
    "convert_official_vim",
    "checkpoint_filter_fn",
    "VIM_CONFIGS",
    "vim_tiny",
    "vim_small",
    "vim_base",
    "vim_micro",
    "vim_hydra_tiny",
]


def check_image_size(h: int, w: int, patch_size: int, model: str) -> tuple[int, int]:
    """The patch grid of an h×w image; ValueError unless both sides are positive multiples of the patch."""
    if h < patch_size or w < patch_size or h % patch_size or w % patch_size:
        raise ValueError(
            f"{model}: image size {h}x{w} is not usable with patch size {patch_size}; both sides must be "
            f"positive multiples of {patch_size}"
        )
    return h // patch_size, w // patch_size


def _to_2tuple(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


# ----------------------------------------------------------------------------------------------------
# Middle class token helpers


def resize_pos_embed_mid_cls(pos_embed: torch.Tensor, old_grid, new_grid, mode: str = "bicubic") -> torch.Tensor:
    """Resize a (1, M + 1, D) position embedding whose class entry sits at index M // 2.

    The class entry is taken out, the remaining M entries are resized as an old_grid image to new_grid
    (bicubic, align_corners=False), and the class entry is put back at index M' // 2 of the new
    sequence. At the same grid the input is returned unchanged.
    """
    oh, ow = _to_2tuple(old_grid)
    nh, nw = _to_2tuple(new_grid)
    m = oh * ow
    if pos_embed.dim() != 3 or pos_embed.shape[1] != m + 1:
        raise ValueError(f"pos_embed of shape {tuple(pos_embed.shape)} does not hold a {oh}x{ow} grid plus "
                         f"one class token (expected (1, {m + 1}, D))")
    if (oh, ow) == (nh, nw):
        return pos_embed
    tp = m // 2
    cls = pos_embed[:, tp:tp + 1]
    grid = torch.cat([pos_embed[:, :tp], pos_embed[:, tp + 1:]], dim=1)
    d = grid.shape[-1]
    grid = grid.reshape(grid.shape[0], oh, ow, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(nh, nw), mode=mode, align_corners=False).to(pos_embed.dtype)
    grid = grid.flatten(2).transpose(1, 2)
    ntp = (nh * nw) // 2
    return torch.cat([grid[:, :ntp], cls, grid[:, ntp:]], dim=1)


class MidClsGridOrder(SequenceOrder):
    """A grid order for the second branch of a sequence with the class token at index M // 2.

    The sequence is the raster-flattened H×W patch grid with the class token spliced in at M // 2
    (length M + 1). The branch visits the patches in `order` (through `GridSequenceOrder`) and the
    class token at position M // 2 of its own sequence, i.e. in the middle, as Vim's flipped branch does.
    """

    def __init__(self, order: GridOrder, H: int, W: int):
        self.grid = GridSequenceOrder(order, H, W)
        self.H, self.W = int(H), int(W)

    def index(self, length: int, device: torch.device) -> torch.Tensor:
        m = self.H * self.W
        if length != m + 1:
            raise ValueError(f"{self!r} expects {m} patches plus one class token (length {m + 1}), "
                             f"got length {length}")
        tp = m // 2
        patches = self.grid.index(m, device)
        patches = patches + (patches >= tp).long()  # grid index -> sequence position (cls at tp)
        cls = torch.full((1,), tp, dtype=torch.long, device=device)
        return torch.cat([patches[:tp], cls, patches[tp:]])

    def __repr__(self) -> str:
        return f"MidClsGridOrder({self.grid.order!r}, H={self.H}, W={self.W})"


def _resolve_scan_order(scan_order) -> GridOrder | None:
    """None for Vim's flipped second branch, else the single GridOrder the second branch scans."""
    if scan_order is None or scan_order in ("flip", "bidirectional"):
        return None
    if isinstance(scan_order, GridOrder):
        return scan_order
    if isinstance(scan_order, str):
        orders = get_scan_order(scan_order)
        if len(orders) != 1:
            raise ValueError(f"scan_order {scan_order!r} gives {len(orders)} orders; Vim's second branch takes "
                             "one (use a single-order name such as 'column' or 'snake', or 'flip')")
        return orders[0]
    raise ValueError(f"scan_order must be 'flip', a scan-order name or a GridOrder, got {scan_order!r}")


# ----------------------------------------------------------------------------------------------------
# The model


class VisionMamba(nn.Module):
    """Vision Mamba classifier with the full timm model interface (see the module docstring)."""

    first_conv = "patch_embed.proj"

    def __init__(
        self,
        img_size=224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 24,
        d_state: int = 16,
        d_conv: int | None = None,
        expand: float = 2,
        mixer: str = "mamba",
        headdim: int = 64,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "token",
        scan_order: str | GridOrder | None = "flip",
        divide_out: bool = True,
        norm_eps: float = 1e-5,
        residual_in_fp32: bool = True,
        backend: str | None = None,
        **kwargs,
    ):
        super().__init__()
        if kwargs:
            raise TypeError(f"VisionMamba got unexpected arguments {sorted(kwargs)}")
        if global_pool not in ("token", "avg", ""):
            raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        self.img_size = _to_2tuple(img_size)
        self.patch_size = int(patch_size)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.grid_size = check_image_size(*self.img_size, self.patch_size, "VisionMamba")
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.scan_grid_order = _resolve_scan_order(scan_order)
        self.scan_order = "flip" if self.scan_grid_order is None else scan_order

        self.patch_embed = PatchEmbed(self.img_size, self.patch_size, in_chans, embed_dim, flatten=False,
                                      output_fmt="NCHW", strict_img_size=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)

        branch = "flip" if self.scan_grid_order is None else MidClsGridOrder(self.scan_grid_order, *self.grid_size)
        # Vim's stochastic depth: layer i drops the previous layer's output with inter_dpr[i], the final
        # add before norm_f uses the full rate
        dpr = drop_path_rates(drop_path_rate, depth)
        inter_dpr = [0.0] + dpr
        if mixer not in ("mamba", "hydra"):
            raise ValueError(f"mixer must be 'mamba' or 'hydra', got {mixer!r}")
        if mixer == "hydra" and self.scan_grid_order is not None:
            raise ValueError(f"scan_order {scan_order!r} needs the 'mamba' mixer: Hydra scans the sequence both ways")
        self.mixer = mixer
        block = dict(norm="rms", eps=norm_eps, residual_in_fp32=residual_in_fp32)
        conv = {} if d_conv is None else {"d_conv": d_conv}  # None: the mixer's own width (Mamba 4, Hydra 7)
        if mixer == "mamba":
            self.layers = nn.ModuleList(
                MambaBlock(embed_dim, **block, drop_path=inter_dpr[i], d_state=d_state, **conv, expand=expand,
                           branch_order=branch, divide_out=divide_out, backend=backend, layer_idx=i)
                for i in range(depth))
        else:
            self.layers = nn.ModuleList(
                MambaBlock(embed_dim, **block, drop_path=inter_dpr[i],
                           mixer=Hydra(embed_dim, d_state=d_state, **conv, expand=expand, headdim=headdim,
                                       backend=backend, layer_idx=i))
                for i in range(depth))
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm_f = RMSNorm(embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=embed_dim, reduction=self.patch_size, module=f"layers.{i}")
                             for i in range(depth)]
        self._grid_orders: dict[tuple[int, int], SequenceOrder] = {}
        self._init_weights(depth)
        self.pretrained_cfg = self.default_cfg = default_cfg_for(self, paper_ids="arXiv:2401.09417")

    def _init_weights(self, depth: int) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if name == "head":
                    trunc_normal_(m.weight, std=0.02)
                if m.bias is not None and not getattr(m.bias, "_no_reinit", False):
                    nn.init.zeros_(m.bias)
        # mamba_ssm's prenorm rescaling: out_proj (kaiming-uniform) / sqrt(n_layer)
        for layer in self.layers:
            w = layer.mixer.out_proj.weight
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            with torch.no_grad():
                w.div_(math.sqrt(max(depth, 1)))

    # -- timm interface ------------------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed", blocks=[(r"^layers\.(\d+)", None),
                                                                         (r"^norm_f", (99999,))])

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("token", "avg", ""):
                raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    # -- forward -------------------------------------------------------------------------------------

    def pos_embed_for(self, grid) -> torch.Tensor:
        """The (1, H·W + 1, D) position embedding for a patch grid, resized around the class token."""
        return resize_pos_embed_mid_cls(self.pos_embed, self.grid_size, grid)

    def _branch_order(self, grid: tuple[int, int]) -> SequenceOrder:
        order = self._grid_orders.get(grid)
        if order is None:
            order = self._grid_orders[grid] = MidClsGridOrder(self.scan_grid_order, *grid)
        return order

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images -> the (B, M + 1, D) input sequence (class token spliced in at M // 2) and the patch grid."""
        if x.dim() != 4:
            raise ValueError(f"VisionMamba expects images of shape (batch, {self.in_chans}, H, W), "
                             f"got {tuple(x.shape)}")
        grid = check_image_size(x.shape[-2], x.shape[-1], self.patch_size, "VisionMamba")
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        b, m, _ = x.shape
        tp = m // 2
        x = torch.cat([x[:, :tp], self.cls_token.expand(b, -1, -1).to(x.dtype), x[:, tp:]], dim=1)
        x = self.pos_drop(x + self.pos_embed_for(grid).to(x.dtype))
        return x, grid

    def _run_layers(self, x: torch.Tensor, grid: tuple[int, int], n_layers: int,
                    keep=()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the first `n_layers` layers over the tokens of a patch grid, the second branch in this grid's
        scan order; returns the final residual stream (hidden + residual, what norm_f normalises) and the
        streams after the layers whose index is in `keep`."""
        order = None if self.scan_grid_order is None else self._branch_order(grid)
        hidden, residual, kept = x, None, []
        for i, layer in enumerate(self.layers[:n_layers]):
            hidden, residual = layer(hidden, residual, branch_order=order)
            if i in keep:
                kept.append(hidden + residual)
        return (hidden if residual is None else self.drop_path(hidden) + residual), kept

    def _norm(self, stream: torch.Tensor) -> torch.Tensor:
        weight = getattr(self.norm_f, "weight", None)  # norm_f is an Identity after pruning
        return self.norm_f(stream if weight is None else stream.to(weight.dtype))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, M + 1, D) after norm_f; the class token is at index M // 2."""
        x, grid = self._tokens(x)
        return self._norm(self._run_layers(x, grid, len(self.layers))[0])

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's intermediate-feature interface (what `features_only=True` calls): the residual stream after
        the layers in `indices` (last n for an int, all for None), the class token removed, as (B, D, h, w)
        maps (`NCHW`) or (B, h·w, D) tokens (`NLC`); `norm` applies norm_f to each. Returns the list, or
        (final features, list) unless `intermediates_only`."""
        from timm.models._features import feature_take_indices

        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.layers), indices)
        x, grid = self._tokens(x)
        n_layers = max_index + 1 if stop_early or intermediates_only else len(self.layers)
        final, streams = self._run_layers(x, grid, n_layers, keep=set(take))
        intermediates = []
        for y in streams:
            y = self._norm(y) if norm else y
            tp = (y.shape[1] - 1) // 2
            y = torch.cat([y[:, :tp], y[:, tp + 1:]], dim=1)
            intermediates.append(y.transpose(1, 2).reshape(y.shape[0], -1, *grid) if output_fmt == "NCHW" else y)
        return intermediates if intermediates_only else (self._norm(final), intermediates)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the layers after the last of `indices` (and norm_f / the head when asked); returns the
        absolute indices kept, as timm's feature wrapper expects."""
        from timm.models._features import feature_take_indices

        take, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[:max_index + 1]
        if prune_norm:
            self.norm_f = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, M + 1, D) features -> logits, or the pooled (B, D) features when `pre_logits`."""
        if self.global_pool == "token":
            x = x[:, (x.shape[1] - 1) // 2]
        elif self.global_pool == "avg":
            tp = (x.shape[1] - 1) // 2
            x = torch.cat([x[:, :tp], x[:, tp + 1:]], dim=1).mean(1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------------------------------
# Official checkpoints


def convert_official_vim(state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Official Vim weights (hustvl/Vim `models_mamba.py`) -> the state dict of a VisionMamba built with the
    keyword arguments `config` (as in VIM_CONFIGS; its `img_size` and `patch_size` are used).

    The official names are this module's, so only the position embedding changes: one trained at another
    resolution is resized around the middle class token to config's patch grid.
    """
    grid = check_image_size(*_to_2tuple(config["img_size"]), int(config["patch_size"]), "VisionMamba")
    out = dict(state_dict)
    pos_embed = out.get("pos_embed")
    if pos_embed is not None and pos_embed.shape[1] != grid[0] * grid[1] + 1:
        m_old = pos_embed.shape[1] - 1
        side = math.isqrt(m_old)
        if side * side != m_old:
            raise CheckpointError(f"pos_embed of shape {tuple(pos_embed.shape)} is not a square grid plus one class "
                                  "token; resize it with resize_pos_embed_mid_cls")
        out["pos_embed"] = resize_pos_embed_mid_cls(pos_embed, (side, side), grid)
    return out


def _vim_config(model: VisionMamba) -> dict[str, Any]:
    """The keyword arguments of `model` that `convert_official_vim` uses."""
    return {"img_size": model.img_size, "patch_size": model.patch_size}


def checkpoint_filter_fn(state_dict: dict, model: VisionMamba) -> dict:
    """timm's `pretrained_filter_fn`: a checkpoint file as timm read it -> weights for `model`, through
    `convert_official_vim`; a head of another size is dropped, for timm to initialise a new one."""
    out = convert_official_vim(unwrap_state_dict(state_dict), _vim_config(model))
    head = model.head
    for name in ("head.weight", "head.bias"):
        param = getattr(head, name.split(".")[1], None) if isinstance(head, nn.Linear) else None
        if name in out and (param is None or out[name].shape != param.shape):
            del out[name]
    return out


register_official("vim", VisionMamba, convert_official_vim, config_of=_vim_config, head="head.")


# ----------------------------------------------------------------------------------------------------
# Configs and registration

VIM_CONFIGS: dict[str, dict[str, Any]] = {
    "vim_tiny": dict(embed_dim=192, depth=24, d_state=16, expand=2, patch_size=16, img_size=224),
    "vim_small": dict(embed_dim=384, depth=24, d_state=16, expand=2, patch_size=16, img_size=224),
    "vim_base": dict(embed_dim=768, depth=24, d_state=16, expand=2, patch_size=16, img_size=224),
    # an ssmkit variant for small images on CPU (the default of `ssmkit classify`): 4-pixel patches
    "vim_micro": dict(embed_dim=64, depth=2, d_state=16, expand=2, patch_size=4, img_size=16),
    # an ssmkit variant: Vim-Ti's sizes with Hydra's bidirectional SSD mixer in place of bimamba v2
    "vim_hydra_tiny": dict(embed_dim=192, depth=24, d_state=16, expand=2, patch_size=16, img_size=224,
                           mixer="hydra"),
}


def _build(name: str, overrides: dict) -> VisionMamba:
    return VisionMamba(**{**VIM_CONFIGS[name], **overrides})


@ssmkit_register_model
def vim_tiny(**overrides) -> VisionMamba:
    """Vim-Ti: D 192, 24 layers, 7.15M parameters at 224² (paper: 7M, 76.1% IN-1k)."""
    return _build("vim_tiny", overrides)


@ssmkit_register_model
def vim_micro(**overrides) -> VisionMamba:
    """ssmkit variant for small images (digits, Fashion-MNIST) on CPU: D 64, 2 layers, 4-pixel patches."""
    return _build("vim_micro", overrides)


@ssmkit_register_model
def vim_hydra_tiny(**overrides) -> VisionMamba:
    """ssmkit variant: Vim-Ti (D 192, 24 layers) with Hydra mixers (6 heads of 64, d_state 16, conv 7)."""
    return _build("vim_hydra_tiny", overrides)


@ssmkit_register_model
def vim_small(**overrides) -> VisionMamba:
    """Vim-S: D 384, 24 layers, 25.80M parameters at 224² (paper: 26M, 80.5% IN-1k)."""
    return _build("vim_small", overrides)


@ssmkit_register_model
def vim_base(**overrides) -> VisionMamba:
    """Vim-B: D 768, 24 layers, 97.6M parameters at 224² (paper: 98M, 81.9% IN-1k)."""
    return _build("vim_base", overrides)


register_timm_family(VIM_CONFIGS, _build, first_conv="patch_embed.proj", paper_ids="arXiv:2401.09417",
                     pretrained_filter_fn=checkpoint_filter_fn)
