"""The MIL baselines MambaMIL is compared with, under MambaMIL's interface (see `ssmkit.medical.mambamil`).

- `InstancePoolMIL` (`meanmil` / `maxmil`): an instance classifier, then the mean or max of the
  instance logits over the bag.
- `ABMIL`: Ilse et al.'s attention MIL, gated (tanh x sigmoid) by default.
- `TransMILLite`: TransMIL's layout (class token, bag padded to a square by repeating its first
  instances, attention layer, PPEG position convs on the token grid, attention layer) with exact
  multi-head attention (`scaled_dot_product_attention`) in place of the Nystrom approximation, so
  its cost is quadratic in the bag length.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ssmkit.medical.mambamil import attention_mlp, attention_pool, check_bag

__all__ = ["InstancePoolMIL", "ABMIL", "TransMILLite"]


def _embed(in_dim: int, d_model: int, dropout: float) -> nn.Sequential:
    """Linear -> ReLU (-> Dropout): the baselines' instance embedding."""
    layers = [nn.Linear(in_dim, d_model), nn.ReLU()]
    return nn.Sequential(*layers, nn.Dropout(dropout)) if dropout > 0 else nn.Sequential(*layers)


class InstancePoolMIL(nn.Module):
    """Classify every instance (in_dim -> d_model -> ReLU -> n_classes), then pool the instance logits.

    `pool` "mean" or "max"; `scores` are the instance logits of the last class (the positive class
    of a binary task), which is what drives the max."""

    def __init__(self, in_dim: int = 1024, n_classes: int = 2, pool: str = "mean", d_model: int = 512,
                 dropout: float = 0.25):
        super().__init__()
        if pool not in ("mean", "max"):
            raise ValueError(f"pool must be 'mean' or 'max', got {pool!r}")
        self.in_dim, self.n_classes, self.pool = in_dim, n_classes, pool
        self.instance = _embed(in_dim, d_model, dropout)
        self.classifier = nn.Linear(d_model, n_classes)

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        h = self.instance(check_bag(features, self.in_dim, f"{self.pool}mil"))
        logits = self.classifier(h)  # (1, N, C)
        pooled = logits.mean(1) if self.pool == "mean" else logits.max(1).values
        return {"logits": pooled, "scores": logits[0, :, -1], "embedding": h.mean(1)}


class ABMIL(nn.Module):
    """Attention-based MIL (Ilse et al. 2018): embed, attention weights, weighted sum, linear head.

    `gated=True`: a_i = softmax(w . (tanh(V h_i) * sigmoid(U h_i))); False: the tanh-only attention."""

    def __init__(self, in_dim: int = 1024, n_classes: int = 2, d_model: int = 512, hidden: int = 128,
                 gated: bool = True, dropout: float = 0.25):
        super().__init__()
        self.in_dim, self.n_classes, self.gated = in_dim, n_classes, gated
        self.embed = _embed(in_dim, d_model, dropout)
        if gated:
            self.attention_v = nn.Sequential(nn.Linear(d_model, hidden), nn.Tanh())
            self.attention_u = nn.Sequential(nn.Linear(d_model, hidden), nn.Sigmoid())
            self.attention_w = nn.Linear(hidden, 1)
        else:
            self.attention = attention_mlp(d_model, hidden)
        self.classifier = nn.Linear(d_model, n_classes)

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        h = self.embed(check_bag(features, self.in_dim, "ABMIL"))
        if self.gated:
            raw = self.attention_w(self.attention_v(h) * self.attention_u(h))
        else:
            raw = self.attention(h)
        bag, weights = attention_pool(h, raw.squeeze(-1))
        return {"logits": self.classifier(bag), "scores": weights, "embedding": bag}


class _AttentionLayer(nn.Module):
    """Pre-norm multi-head self-attention with a residual: x + Attn(LayerNorm(x))."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(self.norm(x)), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return x + self.out(rearrange(y, "b h n d -> b n (h d)"))


class _PPEG(nn.Module):
    """TransMIL's pyramid position encoding: identity + depthwise 7x7, 5x5 and 3x3 convs on the token grid."""

    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, tokens: torch.Tensor, side: int) -> torch.Tensor:
        grid = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return grid.flatten(2).transpose(1, 2)


class TransMILLite(nn.Module):
    """TransMIL with exact attention: embed, pad to a square grid, [CLS] + attention, PPEG, attention, head.

    The bag of N instances is padded to side^2 tokens (side = ceil(sqrt(N))) by repeating its first
    instances, as TransMIL does; PPEG mixes neighbours on that side x side grid of the instance order.
    Exact attention costs O(N^2) time, so bags of 10^5 instances are slow on CPU (see bench/mil.py)."""

    def __init__(self, in_dim: int = 1024, n_classes: int = 2, d_model: int = 512, heads: int = 8,
                 dropout: float = 0.1, embed_dropout: float = 0.0):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} must be divisible by heads {heads}")
        self.in_dim, self.n_classes = in_dim, n_classes
        self.embed = _embed(in_dim, d_model, embed_dropout)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d_model))
        self.layer1 = _AttentionLayer(d_model, heads, dropout)
        self.ppeg = _PPEG(d_model)
        self.layer2 = _AttentionLayer(d_model, heads, dropout)
        self.norm = nn.LayerNorm(d_model)
        self.classifier = nn.Linear(d_model, n_classes)

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        h = self.embed(check_bag(features, self.in_dim, "TransMILLite"))
        n = h.shape[1]
        side = math.ceil(math.sqrt(n))
        h = torch.cat([h, h[:, : side * side - n]], dim=1)  # side^2 - n < n: one repeat is enough
        x = self.layer1(torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1))
        x = torch.cat([x[:, :1], self.ppeg(x[:, 1:], side)], dim=1)
        bag = self.norm(self.layer2(x))[:, 0]
        return {"logits": self.classifier(bag), "scores": None, "embedding": bag}
