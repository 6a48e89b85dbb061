"""Reading checkpoint files: the one reader behind every family's official weights (`ssmkit.load_official`).

A path is a weights file or a folder holding one of `WEIGHT_FILES`. `.safetensors` files are read with
safetensors; any other file with `torch.load(weights_only=True)` and, where that refuses a file because it
also pickles other objects (the OmegaConf configs of a Lightning `.ckpt`, the argparse namespace of a
training checkpoint), with a restricted unpickler that rebuilds tensors and turns every other object into
an inert placeholder, so nothing in the file runs. The state dict is then taken out of its container
(`CONTAINER_KEYS`, or the entry `weights_key` names) and DataParallel's `module.` prefix is dropped; every
other key stays as the file has it, since the families' converters own their key layouts (Lightning's
`model.` prefix sits beside `encoder.`/`decoder.` keys there, so it is not a prefix to strip blindly).
"""
from __future__ import annotations

import pickle
import types
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file

from ssmkit.errors import CheckpointError

__all__ = ["WEIGHT_FILES", "CONTAINER_KEYS", "read_state_dict", "unwrap_state_dict"]

# looked for, in this order, in a folder given as a checkpoint (Lightning, Hugging Face safetensors and bin)
WEIGHT_FILES = ("weights.ckpt", "model.safetensors", "pytorch_model.bin")
# entries that hold the weights in training checkpoints (Lightning, DeiT-style scripts, BasicSR), in this order
CONTAINER_KEYS = ("state_dict", "model", "params", "params_ema", "model_ema")

_TENSOR_GLOBALS = {
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
        return _TENSOR_GLOBALS.get((module, name), _Inert)


_restricted_pickle = types.SimpleNamespace(Unpickler=_RestrictedUnpickler, __name__="restricted_pickle",
                                           load=lambda file, **kwargs: _RestrictedUnpickler(file, **kwargs).load())


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


def _resolve(path: Path) -> Path:
    if path.is_dir():
        found = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
        if not found:
            raise CheckpointError(f"{path}: no {', '.join(WEIGHT_FILES)} in this folder")
        return found[0]
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    return path


def _load(path: Path):
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as error:  # noqa: BLE001 - safetensors reports a bad file in several error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(error)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - weights_only refuses other pickled objects; the restricted reader may not
        pass
    try:
        return torch.load(path, map_location="cpu", pickle_module=_restricted_pickle, weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unreadable file ends here with its reason
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_line(error)})") from None


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items())


def _entries(obj) -> str:
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}"
    names = [str(k) for k in obj][:6]
    return f"entries {', '.join(names)}{' ...' if len(obj) > 6 else ''}" if names else "no entries"


def unwrap_state_dict(obj, weights_key: str | None = None, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint `obj`: the entry `weights_key` when given, else the first
    of `CONTAINER_KEYS` present (repeatedly), else `obj` itself; `module.` prefixes dropped."""
    if weights_key is not None:
        if not isinstance(obj, dict) or not isinstance(obj.get(weights_key), dict):
            raise CheckpointError(f"{source}: no {weights_key!r} entry ({_entries(obj)})")
        obj = obj[weights_key]
    while isinstance(obj, dict) and not _is_state_dict(obj):
        inner = next((obj[key] for key in CONTAINER_KEYS if isinstance(obj.get(key), dict)), None)
        if inner is None:
            break
        obj = inner
    if not _is_state_dict(obj):
        raise CheckpointError(f"{source}: holds no state dict of tensors ({_entries(obj)})")
    return {key.removeprefix("module."): value for key, value in obj.items()}


def read_state_dict(path: str | Path, weights_key: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict of the checkpoint at `path` (a file, or a folder holding one of `WEIGHT_FILES`), read
    without running code from the file; raises CheckpointError naming the file for every problem."""
    file = _resolve(Path(path))
    return unwrap_state_dict(_load(file), weights_key, str(file))
