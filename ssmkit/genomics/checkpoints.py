"""Official HyenaDNA weights, in either published layout, as ssmkit state dicts.

Layouts (told apart by the keys):
  lightning  `weights.ckpt` of the original `LongSafari/hyenadna-*-seqlen` repos: a PyTorch-Lightning
             checkpoint whose `state_dict` has keys `model.backbone.…` and `model.lm_head.weight` (tied), with
             `.layer` after `mixer`/`mlp` when trained with gradient checkpointing. It also pickles OmegaConf
             configs and loop state, which `ssmkit.checkpoints` reads without running them.
  hf         `model.safetensors` of the `…-seqlen-hf` repos: keys `hyena.backbone.…`, an untied
             `lm_head.weight`, and the Sin frequency stored once (`implicit_filter.1.freq`).
A plain ssmkit state dict (keys `backbone.…`) converts too.

    ssmkit.load_official("hyenadna", path)                  # sizes from the checkpoint (the LM)
    ssmkit.load_official("hyenadna", path, n_classes=2)     # a classifier on the official backbone
    ssmkit.load_official("hyenadna_tiny_1k", path)          # the registered sizes, which must fit

Modulation shift: the Lightning weights come with the training code, which adds shift 0.0 to the
filter decay; the -hf weights come with the Hugging Face modelling code, which adds 0.05. A model built
for a checkpoint gets the shift of the code its layout ships with (`DEFAULT_SHIFT`); pass
`modulation_shift=` to choose the other (both repos hold the same trained weights, and which value
reproduces the published perplexity is not settled without the real files, so the choice is explicit).

The model configuration (d_model, n_layer, d_inner, l_max, filter sizes) is inferred from the tensor
shapes (`official_hyenadna_config`), not from the repos' config.json, which is not reliable (an early
tiny-1k config said d_model 256).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from ssmkit.errors import CheckpointError
from ssmkit.genomics.hyenadna import HyenaDNAClassifier, HyenaDNAConfig, HyenaDNALM, build_hyenadna
from ssmkit.registry import create_model, register_official

__all__ = ["DEFAULT_SHIFT", "official_hyenadna_config", "convert_official_hyenadna"]

DEFAULT_SHIFT = {"lightning": 0.0, "hf": 0.05, "ssmkit": 0.0}
_PREFIX = {"lightning": "model.", "hf": "hyena.", "ssmkit": ""}
_EMBEDDING = "backbone.embeddings.word_embeddings.weight"


def _layout(state: dict[str, torch.Tensor]) -> str:
    keys = list(state)
    for layout in ("hf", "lightning", "ssmkit"):
        if any(k.startswith(_PREFIX[layout] + "backbone.") for k in keys):
            return layout
    raise CheckpointError(f"no HyenaDNA backbone keys (expected model.backbone.*, hyena.backbone.* or backbone.*; "
                          f"first keys: {', '.join(keys[:3])})")


def _renamed(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """(ssmkit-keyed tensors, the LM head or None): prefix stripped, checkpointing `.layer` removed,
    metrics/encoder keys dropped, `decoder.0.output_transform` -> `head`."""
    prefix = _PREFIX[_layout(state)]
    out: dict[str, torch.Tensor] = {}
    lm_head = None
    for key, value in state.items():
        if key.startswith("decoder.0.output_transform."):
            out["head." + key.rsplit(".", 1)[1]] = value
        elif key in ("lm_head.weight", f"{prefix}lm_head.weight"):
            lm_head = value
        elif key.startswith(prefix) and not key.startswith(("torchmetrics", "encoder.")):
            out[key[len(prefix):].replace(".mixer.layer.", ".mixer.").replace(".mlp.layer.", ".mlp.")] = value
    return out, lm_head


def convert_official_hyenadna(state_dict: dict[str, torch.Tensor], config: HyenaDNAConfig) -> dict[str, torch.Tensor]:
    """Official (or ssmkit) HyenaDNA weights -> the ssmkit state dict of a HyenaDNA model of `config`.

    Keys renamed (see `_renamed`); the Sin frequency, one module shared by every activation of the implicit
    MLP, given at each of config's activations (the -hf files store it once); the LM head left out, since
    ssmkit ties it to the embedding (which it fills in where safetensors kept only the head's name; an
    untied head that differs from the embedding gives a warning).
    """
    out, lm_head = _renamed(state_dict)
    sin_positions = range(1, 2 * config.num_inner_mlps + 2, 2)
    for layer in sorted({k.split(".mixer.")[0] for k in out if ".mixer.filter_fn.implicit_filter." in k}):
        stem = f"{layer}.mixer.filter_fn.implicit_filter."
        freqs = [out[f"{stem}{i}.freq"] for i in sin_positions if f"{stem}{i}.freq" in out]
        if not freqs:
            continue  # left for the strict load to name as missing
        if any(not torch.equal(f, freqs[0]) for f in freqs[1:]):
            raise CheckpointError(f"{stem}*.freq differ between activations; ssmkit shares one Sin frequency")
        for i in sin_positions:
            out.setdefault(f"{stem}{i}.freq", freqs[0])
    embedding = out.get(_EMBEDDING)
    if embedding is None and lm_head is not None:
        out[_EMBEDDING] = lm_head
    elif lm_head is not None and not torch.allclose(lm_head, embedding):
        warnings.warn("the checkpoint's lm_head.weight differs from its embedding; ssmkit ties them and uses "
                      "the embedding", stacklevel=2)
    return out


def official_hyenadna_config(state_dict: dict[str, torch.Tensor], **overrides) -> HyenaDNAConfig:
    """The HyenaDNAConfig of official (or ssmkit) HyenaDNA weights, from their tensor shapes; the modulation
    shift is the layout's (`DEFAULT_SHIFT`) unless `overrides` set it."""
    layout = _layout(state_dict)
    state, lm_head = _renamed(state_dict)
    try:
        emb = state.get(_EMBEDDING, lm_head)
        if emb is None:
            raise KeyError(_EMBEDDING)
        n_layer = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("backbone.layers."))
        p = "backbone.layers.0."
        z = state[p + "mixer.filter_fn.pos_emb.z"]
        first = state[p + "mixer.filter_fn.implicit_filter.0.weight"]
        n_linear = sum(1 for k in state if k.startswith(p + "mixer.filter_fn.implicit_filter.") and k.endswith("weight"))
        in_proj = state[p + "mixer.in_proj.weight"]
        fields = dict(d_model=emb.shape[1], n_layer=n_layer, d_inner=state[p + "mlp.fc1.weight"].shape[0],
                      l_max=z.shape[1], emb_dim=z.shape[2], filter_order=first.shape[0],
                      num_inner_mlps=n_linear - 2, order=in_proj.shape[0] // emb.shape[1] - 1,
                      short_filter_order=state[p + "mixer.short_filter.weight"].shape[-1],
                      modulation_shift=DEFAULT_SHIFT[layout])
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"cannot infer the HyenaDNA configuration: missing or malformed key {e}") from None
    return HyenaDNAConfig(**{**fields, **overrides})


def _build_for_checkpoint(state_dict: dict[str, torch.Tensor], name: str | None, n_classes: int = 0,
                          pooling: str = "mean", **overrides) -> nn.Module:
    """The LM (or a classifier of `n_classes`) that `ssmkit.load_official` loads: of the checkpoint's sizes
    for name None, else the registered `name`; with the layout's modulation shift unless overridden."""
    if name is None:
        return build_hyenadna(official_hyenadna_config(state_dict, **overrides), n_classes, pooling)
    overrides.setdefault("modulation_shift", DEFAULT_SHIFT[_layout(state_dict)])
    return create_model(name, n_classes=n_classes, pooling=pooling, **overrides)


register_official("hyenadna", (HyenaDNALM, HyenaDNAClassifier), convert_official_hyenadna,
                  build=_build_for_checkpoint, head="head.")
