"""The one training loop of every application, single-process or DistributedDataParallel.

An `Application` (ssmkit/apps/application.py) says *what* to train; `Runner` owns *how*: data order,
AdamW with a warm-up + cosine schedule, gradient accumulation and clipping, bf16 autocast on CUDA, an
optional EMA of the weights, evaluation and best-checkpoint selection, atomic resumable checkpoints in
the run folder (ssmkit/apps/run_folder.py), logs, a progress bar and curve plots.

Under `torchrun` the processes (ssmkit/apps/distributed.py) join a process group when a run starts;
only rank 0 writes files and prints, and metrics are reduced over all ranks. `batch_size` is the
global batch of one optimizer step, so a run gives the same result on any number of processes.
`--resume` continues a run from its newest checkpoint bit for bit, and refuses options that would
make it another run.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm import tqdm

from ssmkit.apps.application import (Application, Command, RunContext, RunSpec, check_same_data, eval_config,
                                     load_run)
from ssmkit.apps.distributed import Processes
from ssmkit.apps.report import MetricLog, plot_curves
from ssmkit.apps.run_folder import RunFolder, load_weights, save_weights
from ssmkit.errors import RunError
from ssmkit.util import derive_seed

__all__ = ["Runner", "RunResult", "evaluate_run", "train_and_eval", "parameter_groups", "warmup_cosine", "EpochBatches",
           "seed_everything"]

# parameters that never get weight decay, by name (SSM dynamics); models may also mark more
NO_WEIGHT_DECAY_NAMES = frozenset({"A_log", "D"})
# options that may differ on --resume: they change neither the weights nor the recorded results
# (`steps` may also grow: the run continues to the new total)
RESUME_NEUTRAL = frozenset({"resume", "overwrite", "num_workers", "log_every", "checkpoint_every", "keep_checkpoints"})


@dataclass
class RunResult:
    """What `Runner.train` / `evaluate_run` produced."""

    out_dir: Path
    step: int
    metrics: dict[str, float]  # of the last evaluation ({} without an eval set)
    best: dict[str, Any] | None  # {"metric", "value", "step"} of best.safetensors
    wall_s: float
    plots: list[Path]
    model: nn.Module | None = None  # the trained (or evaluated) model, in eval mode
    meta: dict[str, Any] | None = None


# ----------------------------------------------------------------------------------------------
# Building blocks


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


def model_signature(app: Application, model: nn.Module) -> dict[str, Any]:
    """Identity of a model for resume checks: application, class, parameter names and shapes."""
    return {"app": app.name, "model": type(model).__name__,
            "params": {k: list(v.shape) for k, v in model.state_dict().items()}}


def _signature_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    if (saved["app"], saved["model"]) != (current["app"], current["model"]):
        return f"it holds {saved['app']}/{saved['model']}, this run builds {current['app']}/{current['model']}"
    a, b = saved["params"], current["params"]
    for name in sorted(set(a) | set(b)):
        if a.get(name) != b.get(name):
            return f"parameter {name} has shape {a.get(name)} there and {b.get(name)} in this run's model"
    return None


def _changed_options(saved: dict[str, Any], cfg) -> list[str]:
    """The options of `cfg` that differ from a checkpoint's saved configuration, as `--name a (run: b)`."""
    out = []
    for f in dataclasses.fields(cfg):
        if f.name in RESUME_NEUTRAL or f.name not in saved or f.name == "steps" and cfg.steps >= saved["steps"]:
            continue
        value = getattr(cfg, f.name)
        if value != saved[f.name]:
            out.append(f"--{f.name.replace('_', '-')} {value!r} (the run's: {saved[f.name]!r})")
    return out


class _Window:
    """Training loss and timing since the last log line (the loss stays on the device until then)."""

    def __init__(self, step: int, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.first_step, self.run_start = step, time.perf_counter()
        self.steps, self.start = 0, self.run_start

    def reset(self) -> None:
        self.loss.zero_()
        self.steps, self.start = 0, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.loss += loss
        self.steps += 1

    def mean_loss(self, procs: Processes) -> float:
        """Mean loss per step over the window and all ranks (a collective when world > 1)."""
        stats = procs.all_reduce(torch.stack([self.loss, torch.tensor(float(self.steps), device=self.loss.device)]))
        return (stats[0] / stats[1]).item()

    def eta(self, step: int, total: int) -> float:
        """Seconds left at the mean step time of this process so far."""
        return (time.perf_counter() - self.run_start) / max(1, step - self.first_step) * (total - step)


# ----------------------------------------------------------------------------------------------
# The runner


class Runner:
    """Trains (or evaluates) one `Application` with one configuration (see the module docstring)."""

    def __init__(self, app: Application, cfg):
        self.app, self.cfg = app, cfg
        self.folder = RunFolder.of(cfg, app.name)
        self.procs = Processes.from_env(cfg.device)
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.procs.device.type == "cuda")
        self.autocast = functools.partial(torch.autocast, self.procs.device.type, dtype=torch.bfloat16,
                                          enabled=use_bf16)
        self._bar: tqdm | None = None
        # the training state (set up by train())
        self.model: nn.Module | None = None
        self.ema: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.step = 0
        self.best: dict[str, Any] | None = None
        self.last_eval: dict[str, Any] = {"step": -1, "metrics": {}}
        self.log: MetricLog | None = None

    @property
    def device(self) -> torch.device:
        return self.procs.device

    # -- small helpers -------------------------------------------------------------------------

    def say(self, message: str) -> None:
        """Print a log line on rank 0 (above the progress bar when there is one)."""
        if not self.procs.main:
            return
        if self._bar is not None and not self._bar.disable:
            self._bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def _setup(self) -> RunSpec:
        self.procs.on_main(lambda: self.app.prepare(self.cfg))
        seed_everything(self.cfg.seed)
        return self.app.setup(self.cfg)

    def _best_metric(self) -> str | None:
        name = self.cfg.best_metric or next(iter(self.app.metrics), None)
        if name is not None and name not in self.app.metrics:
            raise RunError(f"--best-metric {name!r} is not a metric of {self.app.name}; "
                           f"choose from {', '.join(self.app.metrics) or 'none'}")
        return name

    def _micro_batch(self, n_train: int) -> int:
        cfg, parts = self.cfg, self.procs.world * self.cfg.grad_accum
        if cfg.batch_size > n_train:
            raise RunError(f"batch_size {cfg.batch_size} is larger than the training set of {self.app.name} "
                           f"({n_train} samples); lower --batch-size")
        if cfg.batch_size % parts:
            raise RunError(f"batch_size {cfg.batch_size} must be divisible by processes x grad_accum "
                           f"= {self.procs.world} x {cfg.grad_accum}")
        return cfg.batch_size // parts

    # -- the run folder -------------------------------------------------------------------------

    def _prepare_folder(self, signature: dict[str, Any], n_train: int) -> Path | None:
        """Rank 0: check the run folder against --resume/--overwrite; returns the checkpoint to resume from."""
        cfg, folder = self.cfg, self.folder
        latest = folder.latest_checkpoint()
        if cfg.resume and latest is not None:
            state = folder.read_state(latest)
            problem = _signature_mismatch(state["signature"], signature)
            if problem:
                raise RunError(f"cannot resume from {latest}: it belongs to another model ({problem})")
            changed = _changed_options(state["config"], cfg)
            if changed:
                raise RunError(f"cannot resume from {latest} with {', '.join(changed)}: --resume continues the "
                               f"same run; start a new one with --overwrite or another --out-dir")
            if cfg.steps != state["config"]["steps"]:
                self.say(f"note: continuing to {cfg.steps} steps (the run had {state['config']['steps']}); the "
                         f"learning-rate schedule follows the new total from here")
            if state["n_train"] != n_train:
                raise RunError(f"cannot resume from {latest}: it was trained on {state['n_train']} samples, the "
                               f"data give {n_train} now")
            return latest
        existing = folder.has_run()
        if existing is not None and not (cfg.overwrite or cfg.resume):
            raise RunError(f"{folder} already holds the checkpoints of another run ({existing}); pass --resume to "
                           f"continue it, --overwrite to replace it, or choose another --out-dir")
        if cfg.overwrite or cfg.resume:
            folder.clear()
        if cfg.resume:
            self.say(f"no checkpoint in {folder.checkpoints}: starting a new run")
        return None

    def _save_checkpoint(self, state: dict[str, Any]) -> None:
        """Every rank gathers its RNG state; rank 0 writes checkpoint `step_<step>` atomically."""
        rng = self.procs.gather(_rng_state(self.device))
        if self.procs.main:
            weights = {"model.safetensors": self.model, **({"ema.safetensors": self.ema} if self.ema else {})}
            self.folder.save_checkpoint(dict(state, rng=rng), weights, self.cfg.keep_checkpoints)

    def _save_weights(self, module: nn.Module, path: Path, **extra: Any) -> None:
        save_weights(module, path, ssmkit_app=self.app.name, step=self.step, **extra)

    def _read_checkpoint(self, path: Path) -> dict[str, Any]:
        """Rank 0: the tensors and state of checkpoint folder `path`, to broadcast to every rank."""
        state = self.folder.read_state(path)
        load_weights(self.model, path / "model.safetensors", self.device)
        model = {k: v.cpu() for k, v in self.model.state_dict().items()}
        ema = None
        if self.ema is not None and (path / "ema.safetensors").exists():
            load_weights(self.ema, path / "ema.safetensors", self.device)
            ema = {k: v.cpu() for k, v in self.ema.state_dict().items()}
        return {"state": state, "model": model, "ema": ema}

    # -- evaluation ------------------------------------------------------------------------------

    def evaluate_model(self, model: nn.Module, eval_set: Dataset, batch_size: int,
                       ctx: RunContext) -> dict[str, float]:
        """Metrics of `model` on `eval_set`: each rank runs a contiguous shard, outputs are gathered
        in dataset order, every rank computes the same metrics."""
        procs = self.procs
        n = len(eval_set)
        shard = range(n * procs.rank // procs.world, n * (procs.rank + 1) // procs.world)
        loader = DataLoader(Subset(eval_set, shard), batch_size=batch_size, shuffle=False,
                            collate_fn=self.app.collate, num_workers=self.cfg.num_workers)
        chunks: dict[str, list[torch.Tensor]] = {}
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for batch in loader:
                with self.autocast():
                    out = self.app.eval_step(model, _to_device(batch, self.device), ctx)
                for key, value in out.items():
                    value = value.detach().cpu()
                    chunks.setdefault(key, []).append(value.float() if value.is_floating_point() else value)
        model.train(was_training)
        parts = procs.gather(chunks)
        keys = [k for part in parts for k in part]
        outputs = {k: torch.cat([t for part in parts for t in part.get(k, [])]) for k in dict.fromkeys(keys)}
        return self.app.compute_metrics(outputs, ctx)

    def _eval_and_select(self, eval_set: Dataset, batch_size: int, best_metric: str | None,
                         ctx: RunContext) -> None:
        """Evaluate (the EMA weights when there are), log, and keep best.safetensors up to date."""
        metrics = self.evaluate_model(self.ema or self.model, eval_set, batch_size, ctx)
        self.last_eval = {"step": self.step, "metrics": metrics}
        self.say(f"{self.app.name} eval at step {self.step}: {_format_metrics(metrics)}")
        if self.log is not None:
            self.log.append({"split": "eval", "step": self.step, **metrics})
        self.best = self._update_best(self.best, best_metric, metrics)

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
        if self.procs.main:
            self._save_weights(self.ema or self.model, self.folder.best, metric=metric, value=value)
        return {"metric": metric, "value": value, "step": self.step}

    # -- training --------------------------------------------------------------------------------

    def train(self) -> RunResult:
        """Train to the configured number of steps, resuming from the run folder with --resume."""
        cfg, app, procs = self.cfg, self.app, self.procs
        start_time = time.perf_counter()
        procs.join()
        spec = self._setup()
        if spec.train is None:
            raise RunError(f"{app.name} has no training data for this configuration")
        ctx = RunContext(cfg, spec.meta)
        n_train = len(spec.train)
        micro = self._micro_batch(n_train)
        steps_per_epoch = n_train // cfg.batch_size
        total = max(1, round(cfg.epochs * steps_per_epoch)) if cfg.epochs > 0 else cfg.steps
        eval_batch = cfg.eval_batch_size or micro
        best_metric = self._best_metric()

        seed_everything(cfg.seed)
        self.model = app.build_model(ctx).to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if cfg.ema_decay > 0 else None
        self.optimizer = torch.optim.AdamW(parameter_groups(self.model, cfg.weight_decay), lr=cfg.lr,
                                           betas=(cfg.beta1, cfg.beta2))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(total, cfg.warmup_steps, cfg.min_lr_ratio))
        signature = model_signature(app, self.model)
        resume_from = procs.on_main(lambda: self._prepare_folder(signature, n_train))
        if resume_from is not None:
            self._resume(resume_from, total)
        else:
            seed_everything(derive_seed(cfg.seed, procs.rank))

        if procs.main:
            self.log = MetricLog(self.folder.path, keep_until=self.step)
            self.folder.write_config(cfg)
            self.folder.write_meta(spec.meta)
        ddp = self.model
        if procs.world > 1:
            ddp = DistributedDataParallel(self.model, device_ids=[self.device.index]
                                          if self.device.type == "cuda" else None)
        n_params = sum(p.numel() for p in self.model.parameters())
        self.say(f"{app.name}: {type(self.model).__name__} with {n_params:,} parameters, {total} steps of "
                 f"{cfg.batch_size} samples ({procs.world} process{'es' if procs.world > 1 else ''} x "
                 f"{cfg.grad_accum} micro-batch{'es' if cfg.grad_accum > 1 else ''} of {micro}) on "
                 f"{self.device.type}, {n_train} training samples"
                 + (f", eval on {spec.eval_data}" if spec.eval is not None and spec.eval_data else "")
                 + f", run folder {self.folder}")

        def checkpoint_state() -> dict[str, Any]:
            return {"signature": signature, "config": dataclasses.asdict(cfg), "step": self.step,
                    "epoch": self.step // steps_per_epoch, "step_in_epoch": self.step % steps_per_epoch,
                    "n_train": n_train, "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "best": self.best, "last_eval": self.last_eval,
                    "world_size": procs.world}

        self._bar = tqdm(total=total, initial=self.step, unit="step", dynamic_ncols=True, file=sys.stdout,
                         disable=None if procs.main else True, desc=app.name)
        window = _Window(self.step, self.device)
        try:
            while self.step < total:
                epoch, position = divmod(self.step, steps_per_epoch)
                if hasattr(spec.train, "set_epoch"):
                    spec.train.set_epoch(epoch)
                sampler = EpochBatches(n_train, cfg.batch_size, cfg.seed, epoch, position, procs.rank, procs.world,
                                       cfg.grad_accum)
                loader = DataLoader(spec.train, batch_sampler=sampler, collate_fn=app.collate,
                                    num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda",
                                    generator=torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, 1)))
                batches = iter(loader)
                for _ in range(position, min(steps_per_epoch, position + total - self.step)):
                    loss, grad_norm = self._train_step(ddp, batches, ctx)
                    self.step += 1
                    window.add(loss)
                    self._bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == total:
                        self._log_window(window, grad_norm, total, steps_per_epoch, start_time)
                    if spec.eval is not None and (
                            (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == total):
                        self._eval_and_select(spec.eval, eval_batch, best_metric, ctx)
                    if self.step % cfg.checkpoint_every == 0 or self.step == total:
                        self._save_checkpoint(checkpoint_state())
        finally:
            self._bar.close()
            self._bar = None

        plots = []
        if procs.main:
            self._save_weights(self.model, self.folder.final)
            if self.ema is not None:
                self._save_weights(self.ema, self.folder.final_ema)
            plots = plot_curves(self.log.records, self.folder / "plots", title=app.name)
        procs.barrier()
        wall = time.perf_counter() - start_time
        metrics = self.last_eval["metrics"]
        self.say(f"{app.name}: done, {self.step} steps in {_duration(wall)}; "
                 + (f"final {_format_metrics(metrics)}" if metrics else "no eval set"))
        return RunResult(self.folder.path, self.step, metrics, self.best, wall, plots, model=self.model.eval(),
                         meta=spec.meta)

    def _resume(self, checkpoint: Path, total: int) -> None:
        """Load model, EMA, optimizer, scheduler, progress and this rank's RNG states from `checkpoint`."""
        payload = self.procs.on_main(lambda: self._read_checkpoint(checkpoint))
        state = payload["state"]
        self.model.load_state_dict(payload["model"])
        if self.ema is not None:
            self.ema.load_state_dict(payload["ema"] if payload["ema"] is not None else payload["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.best, self.last_eval = state["step"], state["best"], state["last_eval"]
        if len(state["rng"]) == self.procs.world:
            _set_rng_state(state["rng"][self.procs.rank], self.device)
        else:
            self.say(f"note: {checkpoint} was written by {len(state['rng'])} processes, this run has "
                     f"{self.procs.world}; random draws after the resume differ from the original run")
            seed_everything(derive_seed(self.cfg.seed, self.procs.rank, self.step))
        self.say(f"{self.app.name}: resumed from {checkpoint} at step {self.step}/{total}")

    def _log_window(self, window: _Window, grad_norm: torch.Tensor, total: int, steps_per_epoch: int,
                    start_time: float) -> None:
        """Reduce the training loss since the last log over all ranks; print it and log it."""
        mean_loss = window.mean_loss(self.procs)
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

    def _train_step(self, ddp: nn.Module, batches, ctx: RunContext) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over `grad_accum` micro-batches; returns (mean loss, gradient norm) as
        tensors, so that the device is only waited for at log steps."""
        cfg = self.cfg
        self.model.train()
        total = torch.zeros((), device=self.device)
        for a in range(cfg.grad_accum):
            batch = _to_device(next(batches), self.device)
            sync = a == cfg.grad_accum - 1 or self.procs.world == 1
            with contextlib.nullcontext() if sync else ddp.no_sync():
                with self.autocast():
                    loss = self.app.train_loss(ddp, batch, ctx)
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


def evaluate_run(app: Application, cfg) -> RunResult:
    """`<app> eval`: a trained run's weights on its eval data (or on the data options given), printed
    with what was scored and written to eval.json in the run folder."""
    start = time.perf_counter()
    run = load_run(app, cfg)
    runner = Runner(app, run.cfg)
    runner.procs.join()
    spec = runner._setup()
    if spec.eval is None:
        raise RunError(f"{app.name} has no eval set for the run in {run.folder}")
    check_same_data(app, run, spec)
    model = run.model.to(runner.device)
    batch = run.cfg.eval_batch_size or max(1, run.cfg.batch_size // run.cfg.grad_accum)
    metrics = runner.evaluate_model(model, spec.eval, batch, run.ctx)
    data = spec.eval_data or "its eval set"
    runner.say(f"{app.name} eval of {run.weights} (step {run.step}) on {data}, {len(spec.eval)} samples: "
               + _format_metrics(metrics))
    if runner.procs.main:
        run.folder.write_json("eval.json", {"weights": str(run.weights), "step": run.step, "data": data,
                                            "samples": len(spec.eval), **metrics})
    return RunResult(run.folder.path, run.step, metrics, None, time.perf_counter() - start, [],
                     model=run.model.cpu(), meta=run.meta)


def _format_metrics(metrics: dict[str, float]) -> str:
    return " | ".join(f"{k} {v:.4g}" for k, v in metrics.items())


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def train_and_eval(app: Application, train_name: str = "train", train_help: str = "") -> list[Command]:
    """The `train` (named `train_name`) and `eval` subcommands of `app`, both through the runner."""
    return [
        Command(train_name, train_help or f"train {app.name} (resumable; torchrun for several processes)",
                app.train_config, lambda cfg: Runner(app, cfg).train()),
        Command("eval", f"evaluate a {app.name} run's weights on its eval data (or on other data)", eval_config(app),
                lambda cfg: evaluate_run(app, cfg)),
    ]
