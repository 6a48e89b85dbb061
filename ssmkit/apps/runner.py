"""The one training loop of every application, single-process or DistributedDataParallel.

An application (a subclass of `Application`) says *what* to train: its configuration dataclass, model,
datasets, loss on a batch and evaluation metrics. `Runner` owns *how*: data order, AdamW with a
warm-up + cosine schedule, gradient accumulation and clipping, bf16 autocast on CUDA, an optional
EMA of the weights, evaluation and best-checkpoint selection, atomic resumable checkpoints, logs,
a progress bar and curve plots.

Launched by `torchrun` (the `WORLD_SIZE` variable is set) the runner joins the process group (gloo
on CPU, NCCL on CUDA) and wraps the model in DistributedDataParallel; only rank 0 writes files and
prints, and metrics are reduced over all ranks. `batch_size` is the global batch of one optimizer
step, so a run gives the same result on any number of processes.

Run folder (`out_dir`):
    config.toml                    the resolved configuration, less --resume/--overwrite (`--config`)
    checkpoints/step_00000100/     model.safetensors [+ ema.safetensors] + state.pt (optimizer,
                                   scheduler, step, data-order position, RNG states of every rank)
    best.safetensors               weights with the best `best_metric` so far (EMA weights with EMA)
    model.safetensors              final weights [+ model_ema.safetensors]
    metrics.jsonl, train_log.csv, eval_log.csv, plots/*.png
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import random
import shutil
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, default_collate
from tqdm import tqdm

from ssmkit.apps.config import TrainConfig, option, to_toml
from ssmkit.apps.report import MetricLog, ReportSection, plot_curves

__all__ = [
    "Application",
    "Command",
    "RunError",
    "RunResult",
    "Runner",
    "TrainConfig",
    "eval_config",
    "load_weights",
    "parameter_groups",
]

# parameters that never get weight decay, by name (SSM dynamics); models may also mark more
NO_WEIGHT_DECAY_NAMES = frozenset({"A_log", "D"})
# what --overwrite removes (plots/*.png and checkpoints/step_* besides)
_RUN_FILES = ("best.safetensors", "model.safetensors", "model_ema.safetensors", "metrics.jsonl",
              "train_log.csv", "eval_log.csv", "config.toml", "eval.json")
_CHECKPOINT_FORMAT = 1


class RunError(RuntimeError):
    """A run that cannot go on as asked; the message names the path or value and the problem."""


# ----------------------------------------------------------------------------------------------
# The application interface


@dataclass
class Command:
    """One `ssmkit <application> <name>` subcommand: flags come from `config`, then `run(cfg)` runs."""

    name: str
    help: str
    config: type
    run: Callable[[Any], Any]


class Application(ABC):
    """What a domain implements to train, evaluate and demo a model with the shared runner.

    Class attributes:
        name     the CLI subcommand (`ssmkit <name> train`) and the default run folder `runs/<name>`
        help     one line for `ssmkit --help`
        config   the configuration dataclass, a subclass of `TrainConfig` (its defaults are the
                 application's defaults; override inherited fields by redeclaring them)
        metrics  eval metric name -> "max" or "min" (which direction is better); the first one
                 selects `best.safetensors` unless `--best-metric` names another

    The runner calls `build_datasets` and `build_model` once per run, then `train_loss` on every
    micro-batch and `eval_step` on every eval batch; `compute_metrics` turns the eval outputs of
    the whole eval set (gathered from all processes) into numbers.
    """

    name: str = ""
    help: str = ""
    config: type[TrainConfig] = TrainConfig
    metrics: dict[str, str] = {}

    @abstractmethod
    def build_model(self, cfg) -> nn.Module:
        """The model, on CPU in fp32 (the runner moves it and picks the precision)."""

    @abstractmethod
    def build_datasets(self, cfg) -> tuple[Dataset, Dataset | None]:
        """(train, eval) map-style datasets; eval may be None. A dataset with a `set_epoch(epoch)`
        method is told each epoch before it is read (to draw fresh random samples reproducibly)."""

    @abstractmethod
    def train_loss(self, model: nn.Module, batch) -> torch.Tensor:
        """The scalar loss of one batch (a mean over its samples). `model` may be wrapped in
        DistributedDataParallel: call it, do not reach into its attributes."""

    @abstractmethod
    def eval_step(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        """Per-sample outputs of one eval batch: each value has the batch as its first dimension."""

    def compute_metrics(self, outputs: dict[str, torch.Tensor]) -> dict[str, float]:
        """Metrics of the whole eval set from the concatenated `eval_step` outputs (in dataset order).
        The default is the mean of every output; override for AUC, c-index and other non-means."""
        return {key: value.double().mean().item() for key, value in outputs.items()}

    def collate(self, samples: list) -> Any:
        """Make a batch of a list of dataset items."""
        return default_collate(samples)

    def commands(self) -> list[Command]:
        """The subcommands; extend with `super().commands() + [Command(...)]` for predict, generate..."""
        return [
            Command("train", f"train {self.name} (resumable; torchrun for several processes)",
                    self.config, lambda cfg: Runner(self, cfg).train()),
            Command("eval", f"evaluate {self.name} weights on the eval set",
                    eval_config(self.config), lambda cfg: Runner(self, cfg).evaluate(cfg.weights)),
        ]

    def demo(self, out_dir: Path, smoke: bool) -> ReportSection | None:
        """Train and show this application on its embedded data for `ssmkit demo`, writing its runs
        under `out_dir / self.name`; `smoke` asks for a seconds-long version (the test suite runs it).
        None: the application has no demo section."""
        return None


@functools.cache
def eval_config(cls: type) -> type:
    """`cls` plus a `weights` field: the configuration of an application's `eval` command."""
    return dataclasses.make_dataclass(
        f"{cls.__name__}Eval",
        [("weights", str, option("", "weights to evaluate (empty: out_dir/best.safetensors, "
                                     "else out_dir/model.safetensors)"))],
        bases=(cls,),
    )


@dataclass
class RunResult:
    """What `Runner.train` / `Runner.evaluate` produced."""

    out_dir: Path
    step: int
    metrics: dict[str, float]  # of the last evaluation ({} without an eval set)
    best: dict[str, Any] | None  # {"metric", "value", "step"} of best.safetensors
    wall_s: float
    plots: list[Path]


# ----------------------------------------------------------------------------------------------
# Building blocks


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers (e.g. seed, epoch): no collisions like seed+epoch."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states, as tensors and plain values (loadable with weights_only=True)."""
    version, keys, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, list(keys), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay for weight matrices; none for norms, biases (ndim < 2), the SSM parameters
    `A_log` and `D`, parameters marked `_no_weight_decay = True`, and names in the model's
    timm-style `no_weight_decay()` set."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim < 2 or leaf in NO_WEIGHT_DECAY_NAMES or getattr(p, "_no_weight_decay", False) or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear from 0 to 1 over `warmup_steps`, then cosine down to `min_ratio` at the end."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class EpochBatches(Sampler):
    """This process's micro-batches of one epoch, from optimizer step `start` on.

    The epoch's order is a permutation drawn from (seed, epoch) alone; optimizer step s takes the
    global batch perm[s*B:(s+1)*B], which is cut into `accum` x `world` micro-batches, one per
    (accumulation step, rank). Any world size and accumulation thus sees the same global batches,
    and a resumed run picks up at (epoch, start). A trailing partial global batch is skipped (the
    next epoch's permutation differs), so every step has exactly B samples.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int,
                 rank: int, world: int, accum: int):
        self.n, self.batch_size, self.seed, self.epoch, self.start = n, batch_size, seed, epoch, start
        self.rank, self.world, self.accum = rank, world, accum
        self.micro = batch_size // (world * accum)
        self.steps = n // batch_size

    def __len__(self) -> int:
        return (self.steps - self.start) * self.accum

    def __iter__(self):
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        perm = torch.randperm(self.n, generator=g)
        for step in range(self.start, self.steps):
            for a in range(self.accum):
                offset = step * self.batch_size + (a * self.world + self.rank) * self.micro
                yield perm[offset:offset + self.micro].tolist()


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, fsync it, then rename it over `path`:
    a crash leaves either the old file or the new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def model_signature(app: Application, model: nn.Module) -> dict[str, Any]:
    """Identity of a model for resume checks: application, class, parameter names and shapes."""
    return {"app": app.name, "model": type(model).__name__,
            "params": {k: list(v.shape) for k, v in model.state_dict().items()}}


def load_weights(model: nn.Module, path: str | Path, device: torch.device | str = "cpu") -> None:
    """Load a safetensors file written by the runner (or any matching one) into `model`, with a
    clear RunError when it is missing or holds another model's weights."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"weights file {path} does not exist")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("model", type(model).__name__) != type(model).__name__:
        raise RunError(f"{path} holds weights of {meta.get('ssmkit_app', '?')}/{meta['model']}, "
                       f"not of {type(model).__name__}")
    try:
        load_model(model, str(path), device=str(device))
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        raise RunError(f"{path} does not fit this {type(model).__name__}: {' '.join(lines[:3])[:400]}") from None


def _read_state(checkpoint: Path) -> dict[str, Any]:
    """The state.pt of a checkpoint folder, or a RunError saying why it cannot be used."""
    try:
        state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise RunError(f"cannot read checkpoint {checkpoint}: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or state.get("format") != _CHECKPOINT_FORMAT:
        raise RunError(f"{checkpoint} is not a checkpoint of this ssmkit version (format "
                       f"{state.get('format') if isinstance(state, dict) else '?'}, expected {_CHECKPOINT_FORMAT})")
    return state


def _signature_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    if (saved["app"], saved["model"]) != (current["app"], current["model"]):
        return f"it holds {saved['app']}/{saved['model']}, this run builds {current['app']}/{current['model']}"
    a, b = saved["params"], current["params"]
    for name in sorted(set(a) | set(b)):
        if a.get(name) != b.get(name):
            return f"parameter {name} has shape {a.get(name)} there and {b.get(name)} in this run's model"
    return None


class _Window:
    """Training loss and timing since the last log line (the loss stays on the device until then)."""

    def __init__(self, step: int, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.first_step, self.run_start = step, time.perf_counter()
        self.reset()

    def reset(self) -> None:
        self.loss.zero_()
        self.steps, self.start = 0, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.loss += loss
        self.steps += 1

    def mean_loss(self, world: int) -> float:
        """Mean loss per step over the window and all ranks (a collective when world > 1)."""
        stats = torch.stack([self.loss, torch.tensor(float(self.steps), device=self.loss.device)])
        if world > 1:
            dist.all_reduce(stats)
        return (stats[0] / stats[1]).item()

    def eta(self, step: int, total: int) -> float:
        """Seconds left at the mean step time of this process so far."""
        return (time.perf_counter() - self.run_start) / max(1, step - self.first_step) * (total - step)


# ----------------------------------------------------------------------------------------------
# The runner


class Runner:
    """Trains or evaluates one `Application` with one configuration (see the module docstring).

    After `train()`, `runner.model` holds the trained model (unwrapped, on the training device) and
    `runner.ema` its EMA copy or None; after `evaluate()`, `runner.model` holds the evaluated weights.
    """

    def __init__(self, app: Application, cfg: TrainConfig):
        self.app, self.cfg = app, cfg
        self.out_dir = Path(cfg.out_dir or f"runs/{app.name}")
        if "WORLD_SIZE" in os.environ:
            self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ["WORLD_SIZE"])
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
        else:
            self.rank, self.world, local_rank = 0, 1, 0
        cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        if cuda and not torch.cuda.is_available():
            raise RunError("--device cuda was asked for, but torch sees no CUDA device")
        self.device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", device_id=self.device if cuda else None)
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
        self.autocast = functools.partial(torch.autocast, self.device.type, dtype=torch.bfloat16,
                                          enabled=use_bf16)
        self.main = self.rank == 0
        self._bar: tqdm | None = None

    # -- small helpers -------------------------------------------------------------------------

    def say(self, message: str) -> None:
        """Print a log line on rank 0 (above the progress bar when there is one)."""
        if not self.main:
            return
        if self._bar is not None and not self._bar.disable:
            self._bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def _broadcast(self, obj):
        """`obj` of rank 0, on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _on_main(self, fn: Callable[[], Any]):
        """Run `fn` on rank 0 only and give its result to every rank; when it fails, every rank
        raises (rank 0 its own exception, the others a RunError naming it) instead of hanging."""
        result, error, failure = None, None, None
        if self.main:
            try:
                result = fn()
            except Exception as e:
                failure, error = e, str(e) if isinstance(e, RunError) else f"rank 0 failed: {type(e).__name__}: {e}"
        result, error = self._broadcast((result, error))
        if failure is not None:
            raise failure
        if error is not None:
            raise RunError(error)
        return result

    def _datasets(self) -> tuple[Dataset, Dataset | None]:
        seed_everything(self.cfg.seed)
        return self.app.build_datasets(self.cfg)

    def _model(self) -> nn.Module:
        seed_everything(self.cfg.seed)
        return self.app.build_model(self.cfg).to(self.device)

    def _best_metric(self) -> str | None:
        name = self.cfg.best_metric or next(iter(self.app.metrics), None)
        if name is not None and name not in self.app.metrics:
            raise RunError(f"--best-metric {name!r} is not a metric of {self.app.name}; "
                           f"choose from {', '.join(self.app.metrics) or 'none'}")
        return name

    def _micro_batch(self, n_train: int) -> int:
        cfg, parts = self.cfg, self.world * self.cfg.grad_accum
        if cfg.batch_size > n_train:
            raise RunError(f"batch_size {cfg.batch_size} is larger than the training set of {self.app.name} "
                           f"({n_train} samples); lower --batch-size")
        if cfg.batch_size % parts:
            raise RunError(f"batch_size {cfg.batch_size} must be divisible by processes x grad_accum "
                           f"= {self.world} x {cfg.grad_accum}")
        return cfg.batch_size // parts

    # -- checkpoints -----------------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint folder of the run in `out_dir`, if any."""
        found = sorted(self.checkpoint_dir.glob("step_*")) if self.checkpoint_dir.is_dir() else []
        return found[-1] if found else None

    def _prepare_out_dir(self, signature: dict[str, Any]) -> Path | None:
        """Rank 0: check `out_dir` against --resume/--overwrite; returns the checkpoint to resume from."""
        cfg, out = self.cfg, self.out_dir
        latest = self.latest_checkpoint()
        if cfg.resume and latest is not None:
            state = _read_state(latest)
            problem = _signature_mismatch(state["signature"], signature)
            if problem:
                raise RunError(f"cannot resume from {latest}: it belongs to another model ({problem})")
            saved_b, saved_n = state["config"]["batch_size"], state["n_train"]
            if (saved_b, saved_n) != (cfg.batch_size, self._n_train):
                raise RunError(f"cannot resume from {latest}: it was trained with batch_size {saved_b} on "
                               f"{saved_n} samples, this run has {cfg.batch_size} on {self._n_train}")
            return latest
        existing = [out / name for name in ("best.safetensors", "model.safetensors") if (out / name).exists()]
        if (latest is not None or existing) and not (cfg.overwrite or cfg.resume):
            raise RunError(f"{out} already holds the checkpoints of another run ({latest or existing[0]}); pass "
                           f"--resume to continue it, --overwrite to replace it, or choose another --out-dir")
        if cfg.overwrite or cfg.resume:
            for path in [*self.checkpoint_dir.glob("step_*"), *self.checkpoint_dir.glob(".step_*.tmp")]:
                shutil.rmtree(path)
            for path in [*(out / name for name in _RUN_FILES), *(out / "plots").glob("*.png")]:
                path.unlink(missing_ok=True)
        if cfg.resume:
            self.say(f"no checkpoint in {self.checkpoint_dir}: starting a new run")
        return None

    def _save_checkpoint(self, state: dict[str, Any]) -> None:
        """Write checkpoint `step_<step>` atomically: a temporary folder, fsynced, renamed into place;
        then drop all but the newest `keep_checkpoints`. Every rank calls it (RNG states are gathered)."""
        rng = [_rng_state(self.device)]
        if self.world > 1:
            rng = [None] * self.world
            dist.all_gather_object(rng, _rng_state(self.device))
        if not self.main:
            return
        state = dict(state, rng=rng)
        final = self.checkpoint_dir / f"step_{state['step']:08d}"
        tmp = self.checkpoint_dir / f".{final.name}.tmp"
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            meta = self._weights_metadata(state["step"])
            save_model(self.model, str(tmp / "model.safetensors"), metadata=meta)
            if self.ema is not None:
                save_model(self.ema, str(tmp / "ema.safetensors"), metadata=meta)
            torch.save(state, tmp / "state.pt")
            for f in tmp.iterdir():
                _fsync_file(f)
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(self.checkpoint_dir)
        for old in sorted(self.checkpoint_dir.glob("step_*"))[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old)

    def _weights_metadata(self, step: int, **extra: Any) -> dict[str, str]:
        return {"ssmkit_app": self.app.name, "model": type(self.model).__name__, "step": str(step),
                **{k: str(v) for k, v in extra.items()}}

    def _save_weights(self, module: nn.Module, path: Path, **extra: Any) -> None:
        """Rank 0: weights of `module` to `path` (safetensors), atomically."""
        meta = self._weights_metadata(self.step, **extra)
        atomic_write(path, lambda tmp: save_model(module, str(tmp), metadata=meta))

    # -- evaluation ------------------------------------------------------------------------------

    def _evaluate(self, model: nn.Module, eval_set: Dataset, batch_size: int) -> dict[str, float]:
        """Metrics of `model` on `eval_set`: each rank runs a contiguous shard, outputs are gathered
        in dataset order, every rank computes the same metrics."""
        n = len(eval_set)
        shard = range(n * self.rank // self.world, n * (self.rank + 1) // self.world)
        loader = DataLoader(Subset(eval_set, shard), batch_size=batch_size, shuffle=False,
                            collate_fn=self.app.collate, num_workers=self.cfg.num_workers)
        chunks: dict[str, list[torch.Tensor]] = {}
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for batch in loader:
                with self.autocast():
                    out = self.app.eval_step(model, _to_device(batch, self.device))
                for key, value in out.items():
                    value = value.detach().cpu()
                    chunks.setdefault(key, []).append(value.float() if value.is_floating_point() else value)
        model.train(was_training)
        parts = [chunks]
        if self.world > 1:
            parts = [None] * self.world
            dist.all_gather_object(parts, chunks)
        keys = [k for part in parts for k in part]
        outputs = {k: torch.cat([t for part in parts for t in part.get(k, [])]) for k in dict.fromkeys(keys)}
        return self.app.compute_metrics(outputs)

    def evaluate(self, weights: str = "") -> RunResult:
        """Evaluate saved weights (default: out_dir/best.safetensors, else model.safetensors); prints
        the metrics and writes them to out_dir/eval.json."""
        start = time.perf_counter()
        _, eval_set = self._datasets()
        if eval_set is None:
            raise RunError(f"{self.app.name} has no eval set to evaluate on")
        self.model = self._model()
        if weights:
            path = Path(weights)
        else:
            best = self.out_dir / "best.safetensors"
            path = best if best.exists() else self.out_dir / "model.safetensors"
        load_weights(self.model, path, self.device)
        with safe_open(str(path), "pt") as f:
            self.step = int((f.metadata() or {}).get("step", 0))
        batch = self.cfg.eval_batch_size or max(1, self.cfg.batch_size // self.cfg.grad_accum)
        metrics = self._evaluate(self.model, eval_set, batch)
        self.say(f"{self.app.name} eval of {path}: " + _format_metrics(metrics))
        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            record = {"weights": str(path), "step": self.step, **metrics}
            atomic_write(self.out_dir / "eval.json",
                         lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
        return RunResult(self.out_dir, self.step, metrics, None, time.perf_counter() - start, [])

    # -- training --------------------------------------------------------------------------------

    def train(self) -> RunResult:
        """Train to the configured number of steps, resuming from `out_dir` with --resume."""
        cfg, app = self.cfg, self.app
        start_time = time.perf_counter()
        train_set, eval_set = self._datasets()
        self._n_train = len(train_set)
        micro = self._micro_batch(self._n_train)
        steps_per_epoch = self._n_train // cfg.batch_size
        total = max(1, round(cfg.epochs * steps_per_epoch)) if cfg.epochs > 0 else cfg.steps
        eval_batch = cfg.eval_batch_size or micro
        best_metric = self._best_metric()

        self.model = self._model()
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if cfg.ema_decay > 0 else None
        self.optimizer = torch.optim.AdamW(parameter_groups(self.model, cfg.weight_decay), lr=cfg.lr,
                                           betas=(cfg.beta1, cfg.beta2))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(total, cfg.warmup_steps, cfg.min_lr_ratio))
        signature = model_signature(app, self.model)
        resume_from = self._on_main(lambda: self._prepare_out_dir(signature))
        self.step, self.best, self.last_eval = 0, None, {"step": -1, "metrics": {}}
        if resume_from is not None:
            self._resume(resume_from, total)
        else:
            seed_everything(derive_seed(cfg.seed, self.rank))

        self.log = MetricLog(self.out_dir, keep_until=self.step) if self.main else None
        if self.main:
            # resume/overwrite act on one invocation: a rerun with this file must not overwrite by itself
            text = to_toml(cfg, exclude=("resume", "overwrite"))
            atomic_write(self.out_dir / "config.toml", lambda tmp: tmp.write_text(text))
        ddp = self.model
        if self.world > 1:
            ddp = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                          else None)
        n_params = sum(p.numel() for p in self.model.parameters())
        self.say(f"{app.name}: {type(self.model).__name__} with {n_params:,} parameters, {total} steps of "
                 f"{cfg.batch_size} samples ({self.world} process{'es' if self.world > 1 else ''} x "
                 f"{cfg.grad_accum} micro-batch{'es' if cfg.grad_accum > 1 else ''} of {micro}) on "
                 f"{self.device.type}, {self._n_train} training samples, run folder {self.out_dir}")

        def checkpoint_state() -> dict[str, Any]:
            return {"format": _CHECKPOINT_FORMAT, "signature": signature, "config": dataclasses.asdict(cfg),
                    "step": self.step, "epoch": self.step // steps_per_epoch,
                    "step_in_epoch": self.step % steps_per_epoch, "n_train": self._n_train,
                    "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "best": self.best, "last_eval": self.last_eval, "world_size": self.world}

        self._bar = tqdm(total=total, initial=self.step, unit="step", dynamic_ncols=True, file=sys.stdout,
                         disable=None if self.main else True, desc=app.name)
        window = _Window(self.step, self.device)
        try:
            while self.step < total:
                epoch, position = divmod(self.step, steps_per_epoch)
                if hasattr(train_set, "set_epoch"):
                    train_set.set_epoch(epoch)
                sampler = EpochBatches(self._n_train, cfg.batch_size, cfg.seed, epoch, position,
                                       self.rank, self.world, cfg.grad_accum)
                loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=app.collate,
                                    num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda",
                                    generator=torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, 1)))
                batches = iter(loader)
                for _ in range(position, min(steps_per_epoch, position + total - self.step)):
                    loss, grad_norm = self._train_step(ddp, batches)
                    self.step += 1
                    window.add(loss)
                    self._bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == total:
                        self._log_window(window, grad_norm, total, steps_per_epoch, start_time)
                    if eval_set is not None and (
                            (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == total):
                        self._eval_and_select(eval_set, eval_batch, best_metric)
                    if self.step % cfg.checkpoint_every == 0 or self.step == total:
                        self._save_checkpoint(checkpoint_state())
        finally:
            self._bar.close()
            self._bar = None

        plots = []
        if self.main:
            self._save_weights(self.model, self.out_dir / "model.safetensors")
            if self.ema is not None:
                self._save_weights(self.ema, self.out_dir / "model_ema.safetensors")
            plots = plot_curves(self.log.records, self.out_dir / "plots", title=app.name)
        if self.world > 1:
            dist.barrier()
        wall = time.perf_counter() - start_time
        metrics = self.last_eval["metrics"]
        self.say(f"{app.name}: done, {self.step} steps in {_duration(wall)}; "
                 + (f"final {_format_metrics(metrics)}" if metrics else "no eval set"))
        return RunResult(self.out_dir, self.step, metrics, self.best, wall, plots)

    def _resume(self, checkpoint: Path, total: int) -> None:
        """Load model, EMA, optimizer, scheduler, progress and this rank's RNG states from `checkpoint`."""
        payload = self._on_main(lambda: self._read_checkpoint(checkpoint))
        state = payload["state"]
        self.model.load_state_dict(payload["model"])
        if self.ema is not None:
            self.ema.load_state_dict(payload["ema"] if payload["ema"] is not None else payload["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.best, self.last_eval = state["step"], state["best"], state["last_eval"]
        if len(state["rng"]) == self.world:
            _set_rng_state(state["rng"][self.rank], self.device)
        else:
            self.say(f"note: {checkpoint} was written by {len(state['rng'])} processes, this run has "
                     f"{self.world}; random draws after the resume differ from the original run")
            seed_everything(derive_seed(self.cfg.seed, self.rank, self.step))
        self.say(f"{self.app.name}: resumed from {checkpoint} at step {self.step}/{total}")

    def _log_window(self, window: _Window, grad_norm: torch.Tensor, total: int, steps_per_epoch: int,
                    start_time: float) -> None:
        """Reduce the training loss since the last log over all ranks; print it and log it."""
        mean_loss = window.mean_loss(self.world)
        if not math.isfinite(mean_loss):
            raise RunError(f"the training loss of {self.app.name} became {mean_loss} at step {self.step}; "
                           "lower --lr or check the data")
        now = time.perf_counter()
        record = {"split": "train", "step": self.step, "epoch": self.step / steps_per_epoch, "loss": mean_loss,
                  "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm.item(),
                  "samples_per_s": window.steps * self.cfg.batch_size / (now - window.start),
                  "elapsed_s": now - start_time}
        eta = window.eta(self.step, total)
        self.say(f"{self.app.name} step {self.step}/{total} | loss {mean_loss:.4f} | lr {record['lr']:.2e} | "
                 f"{record['samples_per_s']:.0f} samples/s | eta {_duration(eta)}")
        self._bar.set_postfix(loss=f"{mean_loss:.4f}", samples_per_s=f"{record['samples_per_s']:.0f}", refresh=False)
        if self.log is not None:
            self.log.append(record)
        window.reset()

    def _eval_and_select(self, eval_set: Dataset, batch_size: int, best_metric: str | None) -> None:
        """Evaluate (the EMA weights when there are), log, and keep best.safetensors up to date."""
        metrics = self._evaluate(self.ema or self.model, eval_set, batch_size)
        self.last_eval = {"step": self.step, "metrics": metrics}
        self.say(f"{self.app.name} eval at step {self.step}: {_format_metrics(metrics)}")
        if self.log is not None:
            self.log.append({"split": "eval", "step": self.step, **metrics})
        self.best = self._update_best(self.best, best_metric, metrics)

    def _train_step(self, ddp: nn.Module, batches) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over `grad_accum` micro-batches; returns (mean loss, gradient norm) as
        tensors, so that the device is only waited for at log steps."""
        cfg = self.cfg
        self.model.train()
        total = torch.zeros((), device=self.device)
        for a in range(cfg.grad_accum):
            batch = _to_device(next(batches), self.device)
            sync = a == cfg.grad_accum - 1 or self.world == 1
            with contextlib.nullcontext() if sync else ddp.no_sync():
                with self.autocast():
                    loss = self.app.train_loss(ddp, batch)
                (loss / cfg.grad_accum).backward()
            total += loss.detach().float()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self._update_ema()
        return total / cfg.grad_accum, grad_norm

    def _update_ema(self) -> None:
        """EMA of the weights, with the decay warmed up as (1 + step) / (10 + step) early on."""
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters()):
                e.lerp_(p.detach(), 1 - decay)
            for e, b in zip(self.ema.buffers(), self.model.buffers()):
                e.copy_(b)

    def _update_best(self, best, metric: str | None, metrics: dict[str, float]):
        """Keep best.safetensors on the best value of `metric` so far; returns the new best record."""
        if metric is None:
            return best
        if metric not in metrics:
            raise RunError(f"{self.app.name}'s compute_metrics returned no {metric!r} "
                           f"(it returned {', '.join(metrics) or 'nothing'})")
        value = metrics[metric]
        sign = 1 if self.app.metrics[metric] == "max" else -1
        if math.isnan(value) or (best is not None and sign * value <= sign * best["value"]):
            return best
        if self.main:
            self._save_weights(self.ema or self.model, self.out_dir / "best.safetensors",
                               metric=metric, value=value)
        return {"metric": metric, "value": value, "step": self.step}

    def _read_checkpoint(self, path: Path) -> dict[str, Any]:
        """Rank 0: the tensors and state of checkpoint folder `path`, to broadcast to every rank."""
        state = _read_state(path)
        load_weights(self.model, path / "model.safetensors", self.device)
        model = {k: v.cpu() for k, v in self.model.state_dict().items()}
        ema = None
        if self.ema is not None and (path / "ema.safetensors").exists():
            load_weights(self.ema, path / "ema.safetensors", self.device)
            ema = {k: v.cpu() for k, v in self.ema.state_dict().items()}
        return {"state": state, "model": model, "ema": ema}


def _format_metrics(metrics: dict[str, float]) -> str:
    return " | ".join(f"{k} {v:.4g}" for k, v in metrics.items())


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
