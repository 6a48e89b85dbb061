"""HyenaDNA: a causal DNA language model of pre-norm Hyena blocks, with its published configurations.

Layers: token embedding (16 rows: 12 symbols padded to a multiple of 8, no positional embedding), then
`n_layer` blocks x <- x + Hyena(LN(x)); x <- x + MLP(LN(x)) (GELU-tanh MLP), then a final LayerNorm.
`HyenaDNALM` adds the LM head tied to the embedding; `HyenaDNAClassifier` adds a linear head on
pooled features (`pooling`: mean, last, first, explicit because the paper mean-pools and the official
Hugging Face head takes the last token) or on every token (`pooling="token"`).

Module names follow the official code (`backbone.embeddings.word_embeddings`, `backbone.layers.<i>.
mixer|norm1|norm2|mlp.fc1|mlp.fc2`, `backbone.ln_f`, `lm_head`), so official weights map onto them
(ssmkit.genomics.checkpoints). Registered configurations: hyenadna_tiny_1k (436,096 parameters),
hyenadna_tiny_1k_d256, hyenadna_small_32k, hyenadna_medium_160k, hyenadna_medium_450k, hyenadna_large_1m.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssmkit.core.hyena import HyenaOperator
from ssmkit.genomics.tokenizer import PAD, VOCAB_SIZE
from ssmkit.registry import register_model

__all__ = ["HyenaDNAConfig", "HyenaDNABackbone", "HyenaDNALM", "HyenaDNAClassifier", "PRESETS", "POOLINGS",
           "pool", "build_hyenadna"]

POOLINGS = ("mean", "last", "first", "token")


@dataclass
class HyenaDNAConfig:
    """Sizes and options of a HyenaDNA model (defaults: the tiny-1k model).

    `modulation_shift` is the constant added to the filter decay: 0.0 in the training code that
    produced the official weights, 0.05 in the official standalone and Hugging Face code (see
    ssmkit.genomics.checkpoints for which layout gets which).
    """

    d_model: int = 128
    n_layer: int = 2
    d_inner: int = 512
    l_max: int = 1026
    vocab_size: int = VOCAB_SIZE
    pad_vocab_size_multiple: int = 8
    order: int = 2
    filter_order: int = 64
    emb_dim: int = 5
    short_filter_order: int = 3
    num_inner_mlps: int = 2
    activation_freq: float = 10.0
    modulation_shift: float = 0.0
    embed_dropout: float = 0.1
    resid_dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5

    @property
    def padded_vocab(self) -> int:
        m = self.pad_vocab_size_multiple
        return math.ceil(self.vocab_size / m) * m


# name -> (d_model, n_layer, d_inner, l_max) of the published models (their official config.json files)
PRESETS = {
    "hyenadna_tiny_1k": (128, 2, 512, 1026),
    "hyenadna_tiny_1k_d256": (256, 2, 1024, 1026),
    "hyenadna_small_32k": (256, 4, 1024, 32770),
    "hyenadna_medium_160k": (256, 8, 1024, 160002),
    "hyenadna_medium_450k": (256, 8, 1024, 450002),
    "hyenadna_large_1m": (256, 8, 1024, 1000002),
}


class MLP(nn.Module):
    def __init__(self, d_model: int, d_inner: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_model, d_inner), nn.Linear(d_inner, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm residual block: x + Drop(Hyena(LN(x))), then + Drop(MLP(LN(x))); residual kept in fp32.
    `input_dropout` drops the block's input first: the embedding dropout of block 0 (0 for the others)."""

    def __init__(self, cfg: HyenaDNAConfig, input_dropout: float):
        super().__init__()
        self.mixer = HyenaOperator(cfg.d_model, cfg.l_max, cfg.order, cfg.filter_order, cfg.emb_dim,
                                   cfg.short_filter_order, cfg.num_inner_mlps, cfg.activation_freq,
                                   modulation_shift=cfg.modulation_shift)
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg.d_model, cfg.d_inner)
        self.drop_in, self.drop = nn.Dropout(input_dropout), nn.Dropout(cfg.resid_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop_in(x)
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        x = x + self.drop(self.mixer(self.norm1(x.to(self.norm1.weight.dtype)))).to(x.dtype)
        return x + self.drop(self.mlp(self.norm2(x.to(self.norm2.weight.dtype)))).to(x.dtype)


class Embeddings(nn.Module):
    def __init__(self, cfg: HyenaDNAConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.padded_vocab, cfg.d_model)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(ids)


class HyenaDNABackbone(nn.Module):
    """Token ids (B, L) -> features (B, L, d_model); embedding dropout applies to the first block's input."""

    def __init__(self, cfg: HyenaDNAConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Block(cfg, cfg.embed_dropout if i == 0 else 0.0)
                                    for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale the residual output projections
            if name.endswith(("mixer.out_proj.weight", "mlp.fc2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.ndim != 2:
            raise ValueError(f"HyenaDNA expects token ids (batch, length), got shape {tuple(ids.shape)}")
        if ids.shape[1] > self.config.l_max:
            raise ValueError(f"sequence of {ids.shape[1]} tokens is longer than this model's l_max "
                             f"{self.config.l_max}; crop or split it, or use a longer-context model")
        x = self.embeddings(ids)
        for layer in self.layers:
            x = layer(x)
        return self.ln_f(x.to(self.ln_f.weight.dtype))

    def no_weight_decay(self) -> set[str]:
        """The implicit-filter parameters (and the filter bias) train without weight decay, as in HyenaDNA."""
        return {n for n, _ in self.named_parameters() if ".filter_fn." in f".{n}"}


def pool(h: torch.Tensor, mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """Features of each sequence from per-token features h (B, L, d): mean over the real tokens, the last
    real token, the first real token, or h itself ("token"). `mask` (B, L) marks real tokens (left or right
    padding); None means no padding."""
    if pooling == "token":
        return h
    if mask is None:
        mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
    if pooling == "mean":
        m = mask.to(h.dtype)[..., None]
        return (h * m).sum(1) / m.sum(1).clamp_min(1)
    positions = torch.arange(h.shape[1], device=h.device).expand_as(mask)
    if pooling == "last":
        index = torch.where(mask, positions, -1).amax(1)
    elif pooling == "first":
        index = torch.where(mask, positions, h.shape[1]).amin(1)
    else:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return h[torch.arange(h.shape[0], device=h.device), index.clamp(0, h.shape[1] - 1)]


class HyenaDNALM(nn.Module):
    """HyenaDNA with the LM head (tied to the embedding): ids (B, L) -> next-token logits (B, L, 16)."""

    def __init__(self, cfg: HyenaDNAConfig):
        super().__init__()
        self.config = cfg
        self.backbone = HyenaDNABackbone(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab, bias=False)
        self.lm_head.weight = self.backbone.embeddings.word_embeddings.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.backbone(ids))

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (nats) of ids (B, L): predict ids[:, 1:] from ids[:, :-1]; [PAD] ignored."""
        logits = self(ids[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(), ignore_index=PAD)

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}


class HyenaDNAClassifier(nn.Module):
    """HyenaDNA backbone + Linear(d_model, n_classes) on pooled features (`pooling`, see `pool`).

    forward(ids, mask=None) -> (B, n_classes) logits, or (B, L, n_classes) with pooling="token".
    """

    def __init__(self, cfg: HyenaDNAConfig, n_classes: int, pooling: str = "mean"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if n_classes < 1:
            raise ValueError(f"n_classes must be at least 1, got {n_classes}")
        self.config, self.pooling = cfg, pooling
        self.backbone = HyenaDNABackbone(cfg)
        self.head = nn.Linear(cfg.d_model, n_classes)

    def features(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled backbone features (B, d_model), or per-token (B, L, d_model) with pooling="token"."""
        return pool(self.backbone(ids), mask, self.pooling)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.features(ids, mask))

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}


def build_hyenadna(cfg: HyenaDNAConfig, n_classes: int = 0, pooling: str = "mean") -> nn.Module:
    """The LM (n_classes=0) or a classifier with `n_classes` outputs and `pooling`."""
    return HyenaDNAClassifier(cfg, n_classes, pooling) if n_classes else HyenaDNALM(cfg)


def _register(name: str, sizes: tuple[int, int, int, int]) -> None:
    d_model, n_layer, d_inner, l_max = sizes

    def factory(n_classes: int = 0, pooling: str = "mean", **overrides) -> nn.Module:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(HyenaDNAConfig)}
        if unknown:
            raise TypeError(f"{name}: unknown option(s) {', '.join(sorted(unknown))}")
        cfg = HyenaDNAConfig(**{"d_model": d_model, "n_layer": n_layer, "d_inner": d_inner, "l_max": l_max,
                                **overrides})
        return build_hyenadna(cfg, n_classes, pooling)

    factory.__doc__ = (f"HyenaDNA {name}: d_model {d_model}, {n_layer} layers, d_inner {d_inner}, l_max {l_max}; "
                       "the LM, or a classifier with n_classes > 0 (pooling mean|last|first|token).")
    register_model(factory, name=name)


for _name, _sizes in PRESETS.items():
    _register(_name, _sizes)
