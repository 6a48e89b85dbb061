"""The run folder: one owner for every file a run writes and every command that reads a run.

    config.toml                    the resolved training configuration (`--config` reads it back)
    run.json                       what the run learned from its data (classes, widths, ...), `RunSpec.meta`
    checkpoints/step_00000100/     model.safetensors [+ ema.safetensors] + state.pt (optimizer, scheduler,
                                   step, data-order position, RNG states of every rank)
    best.safetensors               weights with the best `best_metric` so far (EMA weights with EMA)
    model.safetensors              final weights [+ model_ema.safetensors]
    metrics.jsonl, train_log.csv, eval_log.csv, plots/*.png, eval.json

Every file is written atomically (a temporary file beside it, fsynced, renamed into place), so a crash
leaves the old file or the new one, never a torn one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from ssmkit.apps.config import read_toml, to_toml
from ssmkit.errors import CheckpointError, ConfigError, RunError

__all__ = ["RunFolder", "atomic_write", "load_weights", "save_weights", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = 1
# what --overwrite removes besides checkpoints/step_* and plots/*.png
_RUN_FILES = ("best.safetensors", "model.safetensors", "model_ema.safetensors", "metrics.jsonl",
              "train_log.csv", "eval_log.csv", "config.toml", "run.json", "eval.json")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def save_weights(model: nn.Module, path: Path, **metadata: Any) -> None:
    """`model`'s weights as safetensors at `path`, atomically, with string `metadata` (model class, step...)."""
    meta = {"model": type(model).__name__, **{k: str(v) for k, v in metadata.items()}}
    atomic_write(path, lambda tmp: save_model(model, str(tmp), metadata=meta))


def load_weights(model: nn.Module, path: str | Path, device: torch.device | str = "cpu") -> dict[str, str]:
    """Load a safetensors file written by ssmkit (or any matching one) into `model`; returns its metadata.
    A missing file or another model's weights give a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for torn or foreign files
        raise CheckpointError(f"{path} is not a safetensors weights file ({type(e).__name__}: {e})") from None
    if meta.get("model", type(model).__name__) != type(model).__name__:
        raise CheckpointError(f"{path} holds weights of {meta.get('ssmkit_app', '?')}/{meta['model']}, "
                              f"not of {type(model).__name__}")
    try:
        load_model(model, str(path), device=str(device))
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        raise CheckpointError(f"{path} does not fit this {type(model).__name__}: "
                              f"{' '.join(lines[:3])[:400]}") from None
    return meta


class RunFolder:
    """The files of one run: `RunFolder(out_dir or RunFolder.default(app_name))`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @staticmethod
    def default(app_name: str) -> Path:
        return Path("runs") / app_name

    @classmethod
    def of(cls, cfg: Any, app_name: str) -> "RunFolder":
        """The run folder of a configuration: its `out_dir`, else runs/<application>."""
        return cls(cfg.out_dir or cls.default(app_name))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    # -- weights ----------------------------------------------------------------------------------

    @property
    def best(self) -> Path:
        return self.path / "best.safetensors"

    @property
    def final(self) -> Path:
        return self.path / "model.safetensors"

    @property
    def final_ema(self) -> Path:
        return self.path / "model_ema.safetensors"

    def trained_weights(self, weights: str = "") -> Path:
        """`weights` when given, else the run's best weights, else its final weights."""
        if weights:
            return Path(weights)
        for path in (self.best, self.final):
            if path.is_file():
                return path
        raise RunError(f"{self.path} holds no trained weights (best.safetensors or model.safetensors); train a "
                       f"model there first, or pass --weights")

    # -- configuration and metadata ---------------------------------------------------------------

    @property
    def config_file(self) -> Path:
        return self.path / "config.toml"

    @property
    def meta_file(self) -> Path:
        return self.path / "run.json"

    def write_config(self, cfg: Any) -> None:
        # resume/overwrite act on one invocation: a rerun with this file must not overwrite by itself
        text = to_toml(cfg, exclude=("resume", "overwrite"))
        atomic_write(self.config_file, lambda tmp: tmp.write_text(text))

    def read_config(self, cls: type) -> dict[str, Any]:
        """The saved training configuration as values of `cls`; a RunError says what to do when there is none
        or it is from another version."""
        if not self.config_file.is_file():
            raise RunError(f"{self.path} holds no ssmkit run (no config.toml); train one there first or pass "
                           f"the run folder with --out-dir")
        try:
            return read_toml(self.config_file, cls)
        except ConfigError as e:
            raise RunError(f"{e} — the run was written by another ssmkit version: edit {self.config_file} to "
                           f"the current options (ssmkit ... train --help) or retrain") from None

    def write_meta(self, meta: dict[str, Any]) -> None:
        text = json.dumps(meta, indent=1) + "\n"
        atomic_write(self.meta_file, lambda tmp: tmp.write_text(text))

    def read_meta(self) -> dict[str, Any] | None:
        """What the run learned from its data, or None for a run folder written before run.json existed."""
        if not self.meta_file.is_file():
            return None
        return json.loads(self.meta_file.read_text())

    def write_json(self, name: str, record: dict[str, Any]) -> Path:
        path = self.path / name
        text = json.dumps(record, indent=2) + "\n"
        atomic_write(path, lambda tmp: tmp.write_text(text))
        return path

    # -- checkpoints ------------------------------------------------------------------------------

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint folder, if any."""
        found = sorted(self.checkpoints.glob("step_*")) if self.checkpoints.is_dir() else []
        return found[-1] if found else None

    def clear(self) -> None:
        """Remove the checkpoints, weights, logs and plots of a previous run (for --overwrite)."""
        for path in [*self.checkpoints.glob("step_*"), *self.checkpoints.glob(".step_*.tmp")]:
            shutil.rmtree(path)
        for path in [*(self.path / name for name in _RUN_FILES), *(self.path / "plots").glob("*.png")]:
            path.unlink(missing_ok=True)

    def has_run(self) -> Path | None:
        """A checkpoint or weights file of a run already here, if any."""
        return self.latest_checkpoint() or next((p for p in (self.best, self.final) if p.exists()), None)

    def save_checkpoint(self, state: dict[str, Any], weights: dict[str, nn.Module], keep: int) -> Path:
        """Write checkpoint `step_<step>`: the `weights` modules (file name -> module) and `state`, in a
        temporary folder, fsynced, renamed into place; then keep only the newest `keep` checkpoints."""
        final = self.checkpoints / f"step_{state['step']:08d}"
        tmp = self.checkpoints / f".{final.name}.tmp"
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            for name, module in weights.items():
                save_model(module, str(tmp / name), metadata={"model": type(module).__name__,
                                                              "step": str(state["step"])})
            torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp / "state.pt")
            for f in tmp.iterdir():
                _fsync(f)
            _fsync(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync(self.checkpoints)
        for old in sorted(self.checkpoints.glob("step_*"))[:-keep]:
            shutil.rmtree(old)
        return final

    @staticmethod
    def read_state(checkpoint: Path) -> dict[str, Any]:
        """The state.pt of a checkpoint folder, or a CheckpointError saying why it cannot be used."""
        try:
            state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot read checkpoint {checkpoint}: {type(e).__name__}: {e}") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{checkpoint} is not a checkpoint of this ssmkit version (format "
                                  f"{state.get('format') if isinstance(state, dict) else '?'}, expected {CHECKPOINT_FORMAT})")
        return state
