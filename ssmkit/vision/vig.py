"""ViG (hustvl/ViG, AAAI 2025): a plain vision backbone of bidirectional gated linear attention blocks.

    patch_embed.proj   overlapping conv stem: Conv2d(in, D/2, k=s+1, stride s=patch/2, pad 1) -> LayerNorm2d
                       -> SiLU -> Conv2d(D/2, D, 3, stride 2, pad 1) -> LayerNorm2d      (stride = patch)
    pos_embed          (1, M, D), resized bicubically on the fly to the actual grid (no class token)
    blocks.{i}         x + DP(BiGLA(RMSNorm(x))), then x + DP(SwiGLU(RMSNorm(x)))
    norm, head         RMSNorm, global average pool over the tokens, Linear

The mixer (`BiGLA`): local = act(depthwise 3×3 conv of the token map) (the 2-D locality injection);
q, k, v = Linear(local) with key dim D/2 and value dim D, **shared by both directions**; a low-rank
gate projection gives each direction its own decay gates (`gk_fwd`, `gk_bwd`: logsigmoid / 16, so
exp(gk) in (0, 1)); `ssmkit.core.gla` runs the forward scan and the reversed scan, o = (o_f + o_b) / 2;
then o = RMSNorm_head(o)·g + RMSNorm_head(local)·(1 − g) with g = sigmoid(Linear(local)) (the gated
locality branch), an optional SiLU (ViG-T), and the output projection.

Configs (`vig_tiny|small|base`, timm `ssmkit_vig_*`): D = 192/384/768, heads 3/6/12, depth 12,
SwiGLU hidden 512/1024/2048; ≈5.83M / 22.6M / 89M parameters at 224² with a 1000-class head.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from ssmkit.core.gla import gla
from ssmkit.core.layers import DropPath, LayerNorm2d, RMSNorm, SwiGLU, drop_path_rates
from ssmkit.registry import register_model as ssmkit_register_model
from ssmkit.vision.timm_models import default_cfg_for, register_timm_family
from ssmkit.vision.vim import _to_2tuple, check_image_size

__all__ = ["ViG", "BiGLA", "VIG_CONFIGS", "vig_tiny", "vig_small", "vig_base"]


class ConvStem(nn.Module):
    """ViG's overlapping two-conv patch embedding with total stride `patch_size` (even)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if patch_size < 2 or patch_size % 2:
            raise ValueError(f"ViG's conv stem needs an even patch size >= 2, got {patch_size}")
        s = patch_size // 2
        k = s + 1 if s > 1 else 3
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, kernel_size=k, stride=s, padding=1),
            LayerNorm2d(embed_dim // 2),
            nn.SiLU(),
            nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1),
            LayerNorm2d(embed_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class BiGLA(nn.Module):
    """Bidirectional gated linear attention with direction-wise gates and 2-D gated locality injection.

    Input and output (B, L, D) with L = H·W in raster order; `forward(x, grid)` with grid = (H, W).
    Shared by both directions: `in_proj` (depthwise 3×3 conv), `qkv_proj`, `gk_proj` (the low-rank
    down projection of the gates), `g_proj`, the norms and `o_proj`. Per direction: `gk_fwd`, `gk_bwd`.
    """

    def __init__(self, dim: int, num_heads: int, expand_k: float = 0.5, expand_v: float = 1.0,
                 gate_low_rank_dim: int = 16, gate_logit_normalizer: float = 16.0, act_in_conv: bool = True,
                 out_act: bool = False, norm_eps: float = 1e-5, backend: str | None = None):
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.key_dim, self.value_dim = int(dim * expand_k), int(dim * expand_v)
        if self.value_dim != dim:
            raise ValueError("BiGLA's locality gate mixes the value output with the conv branch, so expand_v must be 1")
        if self.key_dim % num_heads or self.value_dim % num_heads:
            raise ValueError(f"key dim {self.key_dim} and value dim {self.value_dim} must be divisible by "
                             f"num_heads={num_heads}")
        self.head_k, self.head_v = self.key_dim // num_heads, self.value_dim // num_heads
        self.gate_logit_normalizer = gate_logit_normalizer
        self.backend = backend
        self.in_proj = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
        self.in_act = nn.SiLU() if act_in_conv else nn.Identity()
        self.qkv_proj = nn.Linear(dim, 2 * self.key_dim + self.value_dim, bias=False)
        self.gk_proj = nn.Linear(dim, gate_low_rank_dim, bias=False)
        self.gk_fwd = nn.Linear(gate_low_rank_dim, self.key_dim, bias=True)
        self.gk_bwd = nn.Linear(gate_low_rank_dim, self.key_dim, bias=True)
        self.g_proj = nn.Linear(dim, self.value_dim, bias=True)
        self.g_norm = RMSNorm(self.head_v, eps=norm_eps)
        self.l_norm = RMSNorm(self.head_v, eps=norm_eps)
        self.out_act = nn.SiLU() if out_act else nn.Identity()
        self.o_proj = nn.Linear(self.value_dim, dim, bias=False)
        gain = 2 ** -2.5
        for w in (self.in_proj.weight, self.qkv_proj.weight, self.gk_proj.weight, self.gk_fwd.weight,
                  self.gk_bwd.weight, self.g_proj.weight, self.o_proj.weight):
            nn.init.xavier_uniform_(w, gain=gain)
        for b in (self.gk_fwd.bias, self.gk_bwd.bias, self.g_proj.bias):
            nn.init.zeros_(b)

    def local(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The locality branch: act(depthwise 3×3 conv) of the token map, (B, L, D)."""
        b, length, d = x.shape
        x2d = x.transpose(1, 2).reshape(b, d, *grid)
        return self.in_act(self.in_proj(x2d)).flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, length, _ = x.shape
        h = self.num_heads
        local = self.local(x, grid)
        q, k, v = self.qkv_proj(local).split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q, k = q.view(b, length, h, self.head_k), k.view(b, length, h, self.head_k)
        v = v.view(b, length, h, self.head_v)
        low = self.gk_proj(local)
        gates = []
        for proj in (self.gk_fwd, self.gk_bwd):
            gates.append((F.logsigmoid(proj(low)) / self.gate_logit_normalizer).view(b, length, h, self.head_k))
        o = (gla(q, k, v, gates[0], backend=self.backend)
             + gla(q, k, v, gates[1], reverse=True, backend=self.backend)) / 2
        g = torch.sigmoid(self.g_proj(local)).view(b, length, h, self.head_v)
        loc = self.l_norm(local.view(b, length, h, self.head_v))
        o = self.g_norm(o) * g + loc * (1 - g)
        return self.o_proj(self.out_act(o.reshape(b, length, self.value_dim)))


class ViGBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, drop_path: float = 0.0, mlp_hidden: int | None = None,
                 norm_eps: float = 1e-6, **attn_kwargs):
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps=norm_eps)
        self.attn = BiGLA(dim, num_heads, **attn_kwargs)
        self.mlp_norm = RMSNorm(dim, eps=norm_eps)
        self.mlp = SwiGLU(dim, mlp_hidden)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.attn_norm(x), grid))
        return x + self.drop_path(self.mlp(self.mlp_norm(x)))


class ViG(nn.Module):
    """Plain ViG classifier with the full timm model interface (see the module docstring)."""

    first_conv = "patch_embed.proj.0"

    def __init__(
        self,
        img_size=224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_hidden: int | None = None,
        act_in_conv: bool = True,
        out_act: bool = False,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        norm_eps: float = 1e-6,
        backend: str | None = None,
        **kwargs,
    ):
        super().__init__()
        if kwargs:
            raise TypeError(f"ViG got unexpected arguments {sorted(kwargs)}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.img_size = _to_2tuple(img_size)
        self.patch_size = int(patch_size)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.grid_size = check_image_size(*self.img_size, self.patch_size, "ViG")
        self.patch_embed = ConvStem(self.patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            ViGBlock(embed_dim, num_heads, drop_path=dpr[i], mlp_hidden=mlp_hidden, norm_eps=norm_eps,
                     act_in_conv=act_in_conv, out_act=out_act, backend=backend)
            for i in range(depth)
        )
        self.norm = RMSNorm(embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=embed_dim, reduction=self.patch_size, module=f"blocks.{i}")
                             for i in range(depth)]
        trunc_normal_(self.pos_embed, std=0.02)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        self.pretrained_cfg = self.default_cfg = default_cfg_for(self, paper_ids="arXiv:2405.18425")

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^pos_embed|^patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """The (1, H·W, D) position embedding resized bicubically to `grid` (unchanged at the native grid)."""
        if tuple(grid) == self.grid_size:
            return self.pos_embed
        pe = self.pos_embed.reshape(1, *self.grid_size, -1).permute(0, 3, 1, 2)
        pe = F.interpolate(pe.float(), size=tuple(grid), mode="bicubic", align_corners=False)
        return pe.to(self.pos_embed.dtype).flatten(2).transpose(1, 2)

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images -> (B, M, D) patch tokens in raster order with position embeddings, and the patch grid."""
        if x.dim() != 4:
            raise ValueError(f"ViG expects images of shape (batch, {self.in_chans}, H, W), got {tuple(x.shape)}")
        grid = check_image_size(x.shape[-2], x.shape[-1], self.patch_size, "ViG")
        x = self.patch_embed(x)
        if tuple(x.shape[-2:]) != grid:
            raise ValueError(f"ViG: stem produced a {tuple(x.shape[-2:])} grid for a {grid} patch grid")
        x = x.flatten(2).transpose(1, 2)
        return self.pos_drop(x + self.pos_embed_for(grid).to(x.dtype)), grid

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, M, D) tokens in raster order after the final norm."""
        x, grid = self._tokens(x)
        for blk in self.blocks:
            x = blk(x, grid)
        return self.norm(x)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's intermediate-feature interface (what `features_only=True` calls): the tokens after the
        blocks in `indices` (last n for an int, all for None) as (B, D, h, w) maps (`NCHW`) or (B, h·w, D)
        (`NLC`); `norm` applies the final norm to each. Returns the list, or (final features, list) unless
        `intermediates_only`."""
        from timm.models._features import feature_take_indices

        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        x, grid = self._tokens(x)
        n_blocks = max_index + 1 if stop_early or intermediates_only else len(self.blocks)
        intermediates = []
        for i, blk in enumerate(self.blocks[:n_blocks]):
            x = blk(x, grid)
            if i in take:
                y = self.norm(x) if norm else x
                intermediates.append(y.transpose(1, 2).reshape(y.shape[0], -1, *grid) if output_fmt == "NCHW" else y)
        return intermediates if intermediates_only else (self.norm(x), intermediates)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last of `indices` (and the final norm / the head when asked); returns
        the absolute indices kept, as timm's feature wrapper expects."""
        from timm.models._features import feature_take_indices

        take, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------------------------------
# Configs and registration

VIG_CONFIGS: dict[str, dict[str, Any]] = {
    "vig_tiny": dict(embed_dim=192, depth=12, num_heads=3, act_in_conv=True, out_act=True, patch_size=16,
                     img_size=224),
    "vig_small": dict(embed_dim=384, depth=12, num_heads=6, act_in_conv=False, out_act=False, patch_size=16,
                      img_size=224),
    "vig_base": dict(embed_dim=768, depth=12, num_heads=12, act_in_conv=False, out_act=False, patch_size=16,
                     img_size=224),
}


def _build(name: str, overrides: dict) -> ViG:
    cfg = {**VIG_CONFIGS[name], **overrides}
    if "embed_dim" in overrides and "num_heads" not in overrides:
        # keep the head width of the config (64 value channels per head) for a smaller embed_dim
        heads = max(1, cfg["embed_dim"] // 64)
        while heads > 1 and (cfg["embed_dim"] % heads or (cfg["embed_dim"] // 2) % heads):
            heads -= 1
        cfg["num_heads"] = heads
    return ViG(**cfg)


@ssmkit_register_model
def vig_tiny(**overrides) -> ViG:
    """ViG-T: D 192, 3 heads, 12 blocks, ≈5.83M parameters at 224² (paper: 6M, 77.2% IN-1k)."""
    return _build("vig_tiny", overrides)


@ssmkit_register_model
def vig_small(**overrides) -> ViG:
    """ViG-S: D 384, 6 heads, 12 blocks, ≈22.6M parameters at 224² (paper: 23M, 81.7% IN-1k)."""
    return _build("vig_small", overrides)


@ssmkit_register_model
def vig_base(**overrides) -> ViG:
    """ViG-B: D 768, 12 heads, 12 blocks, ≈89M parameters at 224² (paper: 89M, 82.6% IN-1k)."""
    return _build("vig_base", overrides)


register_timm_family(VIG_CONFIGS, _build, first_conv="patch_embed.proj.0", paper_ids="arXiv:2405.18425")
