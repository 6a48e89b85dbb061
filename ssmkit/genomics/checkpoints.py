"""Load official HyenaDNA weights from a local path, in either published layout.

Layouts (detected from the files and the keys):
  lightning  `weights.ckpt` of the original `LongSafari/hyenadna-*-seqlen` repos: a PyTorch-Lightning
             pickle whose `state_dict` has keys `model.backbone.…` and `model.lm_head.weight` (tied), with
             `.layer` after `mixer`/`mlp` when trained with gradient checkpointing. It also pickles
             OmegaConf configs and loop state, so it is read with a restricted unpickler that rebuilds
             tensors and turns every other object into an inert placeholder: nothing in the file runs.
  hf         `model.safetensors` of the `…-seqlen-hf` repos: keys `hyena.backbone.…`, an untied
             `lm_head.weight`, and the Sin frequency stored once (`implicit_filter.1.freq`).
A plain ssmkit state dict (keys `backbone.…`) loads too.

Modulation shift: the Lightning weights come with the training code, which adds shift 0.0 to the
filter decay; the -hf weights come with the Hugging Face modelling code, which adds 0.05. Each layout
gets the shift of the code it ships with (`DEFAULT_SHIFT`); pass `shift=` to choose the other. (Both
repos hold the same trained weights; which value reproduces the published perplexity is not settled
without the real files, so the choice is explicit and recorded in the returned info.)

The model configuration (d_model, n_layer, d_inner, l_max, filter sizes) is inferred from the tensor
shapes, since the original config.json files are not reliable (an early tiny-1k config said d_model 256).
"""
from __future__ import annotations

import pickle
import re
import types
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file

from ssmkit.errors import CheckpointError
from ssmkit.genomics.hyenadna import HyenaDNAConfig, build_hyenadna

__all__ = ["DEFAULT_SHIFT", "read_state_dict", "convert_state_dict", "infer_config",
           "load_hyenadna"]

DEFAULT_SHIFT = {"lightning": 0.0, "hf": 0.05, "ssmkit": 0.0}


# ----------------------------------------------------------------------------------------------
# Restricted unpickling of Lightning checkpoints

_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    **{("torch", name): getattr(torch, name) for name in ("float32", "float16", "bfloat16", "float64", "int64")},
}


class _Inert:
    """Placeholder for any pickled object other than tensors: accepts every construction step, does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Inert()

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        return _Inert


_restricted_pickle = types.SimpleNamespace(Unpickler=_RestrictedUnpickler, load=None, __name__="restricted_pickle")


def _read_lightning(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", pickle_module=_restricted_pickle, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: holds no state_dict of tensors")
    return dict(state)


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(raw state dict, layout) of a checkpoint file or of a folder holding `weights.ckpt`,
    `model.safetensors` or `pytorch_model.bin`."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ("weights.ckpt", "model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
        if not found:
            raise CheckpointError(f"{path}: no weights.ckpt, model.safetensors or pytorch_model.bin in this folder")
        path = found[0]
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file does not exist")
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    else:
        state = _read_lightning(path)
    keys = list(state)
    if any(k.startswith("hyena.backbone.") for k in keys):
        layout = "hf"
    elif any(k.startswith("model.backbone.") for k in keys):
        layout = "lightning"
    elif any(k.startswith("backbone.") for k in keys):
        layout = "ssmkit"
    else:
        raise CheckpointError(f"{path}: no HyenaDNA backbone keys (expected model.backbone.*, hyena.backbone.* "
                              f"or backbone.*; first keys: {', '.join(keys[:3])})")
    return state, layout


# ----------------------------------------------------------------------------------------------
# Key mapping

_FREQ = re.compile(r"(.*implicit_filter\.)(\d+)\.freq$")


def convert_state_dict(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Official keys -> ssmkit keys: prefix `model.`/`hyena.` stripped, checkpointing `.layer` removed,
    metrics/encoder keys dropped, `decoder.0.output_transform` -> `head`, the shared Sin frequency
    present at every activation, `lm_head.weight` dropped (the ssmkit LM head is tied; an untied one that
    differs from the embedding gives a warning)."""
    prefix = {"lightning": "model.", "hf": "hyena.", "ssmkit": ""}[layout]
    out: dict[str, torch.Tensor] = {}
    head = None
    for key, value in state.items():
        if key.startswith("torchmetrics") or key.startswith("encoder."):
            continue
        if key.startswith("decoder.0.output_transform."):
            out["head." + key.rsplit(".", 1)[1]] = value
            continue
        if key in ("lm_head.weight", f"{prefix}lm_head.weight"):
            head = value
            continue
        if not key.startswith(prefix):
            continue
        key = key[len(prefix):]
        key = key.replace(".mixer.layer.", ".mixer.").replace(".mlp.layer.", ".mlp.")
        out[key] = value
    # the Sin module is shared by every activation of the implicit MLP: fill in the missing copies
    freqs: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for key in list(out):
        m = _FREQ.match(key)
        if m:
            freqs.setdefault(m.group(1), []).append((int(m.group(2)), out[key]))
    for stem, found in freqs.items():
        for _, value in found[1:]:
            if not torch.equal(value, found[0][1]):
                raise CheckpointError(f"{stem}*.freq differ between activations; ssmkit shares one Sin frequency")
        linears = sorted({int(k[len(stem):].split(".")[0]) for k in out if k.startswith(stem) and k.endswith("weight")})
        for position in range(1, linears[-1], 2):
            out.setdefault(f"{stem}{position}.freq", found[0][1])
    embedding = out.get("backbone.embeddings.word_embeddings.weight")
    if embedding is None and head is not None:  # safetensors keeps one name of tied tensors
        out["backbone.embeddings.word_embeddings.weight"] = head
    elif head is not None and not torch.allclose(head, embedding):
        warnings.warn("the checkpoint's lm_head.weight differs from its embedding; ssmkit ties them and uses "
                      "the embedding", stacklevel=2)
    return out


def infer_config(state: dict[str, torch.Tensor], **overrides) -> HyenaDNAConfig:
    """The HyenaDNAConfig of an ssmkit-keyed state dict, from its tensor shapes."""
    try:
        emb = state["backbone.embeddings.word_embeddings.weight"]
        n_layer = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("backbone.layers."))
        p = "backbone.layers.0."
        z = state[p + "mixer.filter_fn.pos_emb.z"]
        first = state[p + "mixer.filter_fn.implicit_filter.0.weight"]
        n_linear = sum(1 for k in state if k.startswith(p + "mixer.filter_fn.implicit_filter.") and k.endswith("weight"))
        in_proj = state[p + "mixer.in_proj.weight"]
        fields = dict(d_model=emb.shape[1], n_layer=n_layer, d_inner=state[p + "mlp.fc1.weight"].shape[0],
                      l_max=z.shape[1], emb_dim=z.shape[2], filter_order=first.shape[0],
                      num_inner_mlps=n_linear - 2, order=in_proj.shape[0] // emb.shape[1] - 1,
                      short_filter_order=state[p + "mixer.short_filter.weight"].shape[-1])
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"cannot infer the HyenaDNA configuration: missing or malformed key {e}") from None
    return HyenaDNAConfig(**{**fields, **overrides})


def load_hyenadna(path: str | Path, config: HyenaDNAConfig | None = None, n_classes: int = 0,
                  pooling: str = "mean", shift: float | None = None) -> tuple[torch.nn.Module, dict]:
    """(model, info) from official or ssmkit weights at `path` (file or folder).

    `config`: the expected configuration (default: inferred from the shapes); a checkpoint that does not
    fit it raises CheckpointError naming the missing, unexpected and mis-shaped keys. `n_classes` > 0
    builds a classifier (its head is loaded when the checkpoint has a fine-tuned `decoder` of that size,
    else freshly initialised). `shift`: the modulation shift (default: the layout's, see DEFAULT_SHIFT).
    info: layout, shift, config, and the names of freshly initialised parameters.
    """
    raw, layout = read_state_dict(path)
    state = convert_state_dict(raw, layout)
    shift = DEFAULT_SHIFT[layout] if shift is None else shift
    cfg = infer_config(state, modulation_shift=shift) if config is None else config
    model = build_hyenadna(cfg, n_classes, pooling)
    expected = model.state_dict()
    if "lm_head.weight" in expected:
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    head = {k: v for k, v in state.items() if k.startswith("head.")}
    body = {k: v for k, v in state.items() if not k.startswith("head.")}
    fresh = []
    if n_classes and head and all(k in expected and expected[k].shape == v.shape for k, v in head.items()):
        body.update(head)
    elif n_classes:
        fresh = sorted(k for k in expected if k.startswith("head."))
    wanted = {k for k in expected if k not in fresh}
    missing, unexpected = sorted(wanted - set(body)), sorted(set(body) - wanted)
    shapes = sorted(f"{k} {tuple(body[k].shape)} vs {tuple(expected[k].shape)}" for k in wanted & set(body)
                    if body[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        parts = [f"missing keys: {', '.join(missing[:6])}{' …' if len(missing) > 6 else ''}" if missing else "",
                 f"unexpected keys: {', '.join(unexpected[:6])}{' …' if len(unexpected) > 6 else ''}" if unexpected else "",
                 f"shape mismatches (checkpoint vs model): {'; '.join(shapes[:4])}" if shapes else ""]
        raise CheckpointError(f"{path} ({layout} layout) does not fit HyenaDNA(d_model={cfg.d_model}, "
                              f"n_layer={cfg.n_layer}, l_max={cfg.l_max}): " + "; ".join(p for p in parts if p))
    model.load_state_dict(body, strict=False)
    return model, {"layout": layout, "shift": shift, "config": cfg, "fresh": fresh}
