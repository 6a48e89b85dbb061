"""The published Mamba / Mamba-2 language models (`MambaLM.from_pretrained`), from a local folder.

Two layouts are in use. mamba_ssm's (`state-spaces/mamba-130m`, `mamba2-780m`, ...): config.json with
d_model, n_layer, vocab_size (unpadded), pad_vocab_size_multiple, ssm_cfg ({"layer": "Mamba2", ...} or
Mamba-1 keywords), rms_norm, residual_in_fp32, tie_embeddings, and pytorch_model.bin with keys
`backbone.embedding.weight`, `backbone.layers.{i}.{norm,mixer}.*`, `backbone.norm_f.weight`, `lm_head.weight`.
HF transformers' (`MambaForCausalLM`, `Mamba2ForCausalLM`): config.json with model_type, hidden_size,
num_hidden_layers, state_size, vocab_size (padded), ... and model.safetensors (or shards, or
pytorch_model.bin) with `backbone.embeddings.weight` and the same mixer keys. Non-finite floats in
config.json are read as JSON's bare `Infinity`, transformers' `{"__float__": "Infinity"}` or a string.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ssmkit.checkpoints import read_state_dict
from ssmkit.errors import CheckpointError

__all__ = ["read_lm_config", "lm_options", "load_pretrained_lm"]

_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_SHARD_INDEX = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _decode_floats(obj: dict) -> object:
    if set(obj) == {"__float__"}:
        return float(obj["__float__"])
    return obj


def read_lm_config(folder: str | Path) -> dict:
    """config.json of a checkpoint folder, with transformers' encoded non-finite floats decoded."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json in this folder (a Mamba checkpoint folder has config.json "
                              "and its weights)")
    try:
        return json.loads(path.read_text(), object_hook=_decode_floats)
    except (json.JSONDecodeError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable JSON file ({error})") from None


def _limit(value, source: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise CheckpointError(f"{source}: time_step_limit / dt_limit must be two numbers, got {value!r}") from None
    return (low, high)


def _is_hf(config: dict) -> bool:
    return "model_type" in config or "hidden_size" in config


def lm_options(config: dict, source: str = "config.json") -> dict:
    """`MambaLM` keyword arguments for a config.json of either layout."""
    if _is_hf(config):
        return _hf_options(config, source)
    try:
        ssm_cfg = dict(config.get("ssm_cfg") or {})
        layer = ssm_cfg.pop("layer", "Mamba1")
        options = dict(vocab_size=config["vocab_size"], d_model=config["d_model"], n_layer=config["n_layer"],
                       pad_vocab_multiple=config.get("pad_vocab_size_multiple", 8),
                       tie_embeddings=config.get("tie_embeddings", True),
                       norm="rms" if config.get("rms_norm", True) else "layer",
                       residual_in_fp32=config.get("residual_in_fp32", True))
    except KeyError as missing:
        raise CheckpointError(f"{source}: no {missing} field (mamba_ssm's MambaConfig layout)") from None
    if config.get("d_intermediate", 0) or config.get("attn_layer_idx"):
        raise CheckpointError(f"{source}: MLP (d_intermediate) and attention layers (attn_layer_idx) are not "
                              "supported; only pure Mamba / Mamba-2 stacks load")
    if layer not in ("Mamba1", "Mamba2"):
        raise CheckpointError(f"{source}: ssm_cfg.layer {layer!r} is not supported (Mamba1 or Mamba2)")
    if "dt_limit" in ssm_cfg:
        ssm_cfg["dt_limit"] = _limit(ssm_cfg["dt_limit"], source)
    return {**options, "mixer": "mamba2" if layer == "Mamba2" else "mamba", **ssm_cfg}


def _hf_options(config: dict, source: str) -> dict:
    kind = config.get("model_type") or ("mamba2" if "num_heads" in config else "mamba")
    try:
        options = dict(vocab_size=config["vocab_size"], d_model=config["hidden_size"],
                       n_layer=config["num_hidden_layers"], pad_vocab_multiple=1, d_state=config["state_size"],
                       d_conv=config.get("conv_kernel", 4), expand=config.get("expand", 2),
                       bias=config.get("use_bias", False), conv_bias=config.get("use_conv_bias", True),
                       eps=config.get("layer_norm_epsilon", 1e-5),
                       residual_in_fp32=config.get("residual_in_fp32", True))
        if kind == "mamba":
            rank = config.get("time_step_rank", "auto")
            return {**options, "mixer": "mamba", "tie_embeddings": config.get("tie_word_embeddings", True),
                    "dt_rank": rank if rank == "auto" else int(rank)}
        if kind != "mamba2":
            raise CheckpointError(f"{source}: model_type {kind!r} is not a Mamba model (mamba or mamba2)")
        return {**options, "mixer": "mamba2", "tie_embeddings": config.get("tie_word_embeddings", False),
                "headdim": config["head_dim"], "d_ssm": config["num_heads"] * config["head_dim"],
                "ngroups": config.get("n_groups", 1), "chunk_size": config.get("chunk_size"),
                "dt_limit": _limit(config.get("time_step_limit", (0.0, math.inf)), source)}
    except KeyError as missing:
        raise CheckpointError(f"{source}: no {missing} field (transformers' {kind} configuration)") from None


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in _SHARD_INDEX:
        index = folder / name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as error:
                raise CheckpointError(f"{index}: not a shard index with a weight_map ({error})") from None
            state = {}
            for shard in shards:
                state.update(read_state_dict(folder / shard))
            return state
    for name in _WEIGHTS:
        if (folder / name).is_file():
            return read_state_dict(folder / name)
    raise CheckpointError(f"{folder}: no {', '.join(_WEIGHTS)} (or a shard index) in this folder")


def _convert(state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """mamba_ssm / transformers keys -> MambaLM keys."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("backbone.")
        if key in ("embeddings.weight", "embedding.weight"):
            key = "embedding.weight"
        out[key] = value
    if tied and "lm_head.weight" not in out and "embedding.weight" in out:
        out["lm_head.weight"] = out["embedding.weight"]  # transformers leaves the tied head out of its files
    return out


def load_pretrained_lm(model_class, folder: str | Path, *, device=None, dtype=None):
    """`MambaLM.from_pretrained`: build the `model_class` (MambaLM) its config.json describes and load its
    weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (give the folder holding config.json and the weights)")
    options = lm_options(read_lm_config(folder), str(folder / "config.json"))
    try:
        model = model_class(**options, device=device)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{folder / 'config.json'}: {error}") from None
    state = _convert(_read_weights(folder), options["tie_embeddings"])
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{folder}: the weights do not fit the configured model "
                              f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items() if state[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{folder}: shapes differ from config.json's model: {'; '.join(wrong[:3])}")
    model.load_state_dict(state)
    if dtype is not None:
        model.to(dtype)
    return model.eval()
