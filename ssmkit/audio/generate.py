"""Autoregressive sampling from a `SashimiLM`: O(1) recurrent generation and the naive baseline.

`generate` runs the model as a recurrence through `ssmkit.core.generation.sample`, feeding each sampled
token back, so one new sample costs the same at any position. `naive_generate` recomputes the whole prefix
with the convolution-mode forward for every new sample (O(L log L) each); it exists to check `generate`
and to measure the speed-up. Both draw their random numbers in the same order from one seeded generator
(core's `sample_next`), so on the same model and seed they return the same tokens.

`generate` steps with `Stepper`, `SashimiLM.step` (the reference, tested equal to `forward`) rearranged
for speed: each resolution's step (its input: the embedding or the down-pool; its `Stage.step`; its
output: the head or the up-pool's `spread`) is one function with the S4 step coefficients held as
constants, which `compile=True` hands to torch.compile (inductor's C++ backend), one graph per resolution
and batch size.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from unittest import mock

import torch
import torch.nn as nn

from ssmkit.audio.data import MU_LAW_ZERO
from ssmkit.audio.sashimi import SashimiLM, Stage, UpPool
from ssmkit.core.generation import Generation, sample, sample_next
from ssmkit.core.s4 import S4State, S4StepCoefficients

__all__ = ["Generation", "Stepper", "StepperState", "generate", "generation_threads", "naive_generate"]


def _check(model: SashimiLM, batch: int, length: int, prime: torch.Tensor | None) -> torch.Tensor:
    if batch < 1 or length < 1:
        raise ValueError(f"batch and length must be at least 1, got {batch}, {length}")
    device = next(model.parameters()).device
    if prime is None:
        return torch.empty(batch, 0, dtype=torch.long, device=device)
    if prime.ndim == 1:
        prime = prime.expand(batch, -1)
    if prime.shape[0] != batch or prime.shape[1] > length:
        raise ValueError(f"prime must be (length <= {length}) or ({batch}, length <= {length}), got {tuple(prime.shape)}")
    if prime.numel() and (prime.min() < 0 or prime.max() >= model.config.n_classes):
        raise ValueError(f"prime tokens must lie in [0, {model.config.n_classes})")
    return prime.to(device=device, dtype=torch.long)


def _stage_of(model: SashimiLM, level: int) -> Stage:
    """The stage of resolution `level` (0: the finest, len(pool): the centre)."""
    n = len(model.config.pool)
    return model.backbone.center if level == n else model.backbone.up_stages[n - 1 - level]


class _LevelStep(nn.Module):
    """One step of one resolution, as `Sashimi.step` runs it: the level's input x (level 0: the tokens,
    embedded; coarser levels: the `pool` inputs buffered at the finer level, down-pooled), plus the up-pool
    output from the coarser level (none at the centre), through the level's `Stage`; then the final norm
    and head (level 0: logits), or the up-pool's `spread` to the finer level's next `pool` inputs, a
    (batch, pool, H_finer) queue. Returns (output, x, new modes): the finer level buffers x for the next
    coarse step. Shares the model's modules.

    The stage's S4 layers' step coefficients (`S4Conv.init_state`, from the current weights) are fixed for
    the whole generation, so they are held here as buffers, which a compiled graph freezes as constants,
    and only their modes (`S4State.x`; None for the stateless feed-forward layers) flow in and out."""

    def __init__(self, entry: nn.Module, stage: Stage, output: nn.Module):
        super().__init__()
        self.entry, self.stage, self.output = entry, stage, output
        with torch.no_grad():
            state = stage.init_state(1)
        self.s4_layers = [i for i, layer_state in enumerate(state) if isinstance(layer_state, S4State)]
        for i in self.s4_layers:
            for name, value in state[i].coefficients._asdict().items():
                self.register_buffer(f"s4_{i}_{name}", value)

    def _stage_state(self, modes: list) -> list:
        state = list(modes)
        for i in self.s4_layers:
            fields = (getattr(self, f"s4_{i}_{name}") for name in S4StepCoefficients._fields)
            state[i] = S4State(modes[i], S4StepCoefficients(*fields))
        return state

    def forward(self, inputs: torch.Tensor | list[torch.Tensor], upsampled: torch.Tensor | None, modes: list):
        x = self.entry(inputs) if isinstance(self.entry, nn.Embedding) else self.entry(torch.stack(inputs, 1))[:, 0]
        y, state = self.stage.step(x if upsampled is None else x + upsampled, self._stage_state(modes))
        modes = [layer_state.x if isinstance(layer_state, S4State) else None for layer_state in state]
        return (self.output.spread(y) if isinstance(self.output, UpPool) else self.output(y)), x, modes


# inductor on CPU: weights frozen into the graph (prepacked), small matmuls by its C++ GEMM template, which
# avoids a library call per tiny matmul (faster steps at batch 1 than the default options)
_COMPILE_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
_compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(batch, threads, weights): levels}


def _level_steps(model: SashimiLM, batch: int, compile: bool) -> list:
    """Level l's step for l = 0 .. len(pool) (the last is the centre); with `compile`, compiled now (one
    graph per level and batch) and kept for later calls while the weights are unchanged."""
    backbone = model.backbone
    n = len(backbone.config.pool)

    def build():
        return [_LevelStep(model.embedding if level == 0 else backbone.down[level - 1], _stage_of(model, level),
                           nn.Sequential(backbone.norm, model.head) if level == 0 else backbone.up[n - level])
                for level in range(n + 1)]

    if not compile:
        return build()
    # graphs are made for one thread count (dynamo guards on it): the key holds it, `StepperState` keeps it
    weights = tuple((p.data_ptr(), p._version) for p in model.parameters())
    cache = _compiled.setdefault(model, {})
    for key in [k for k in cache if k[2] != weights]:
        del cache[key]
    key = (batch, torch.get_num_threads(), weights)
    if key not in cache:
        from torch._inductor import select_algorithm  # imported on first compile only: it is slow to import

        levels = build()
        compiled = [torch.compile(level, dynamic=False, fullgraph=True) for level in levels]
        # every level of every batch size is one more graph of the same code: allow them all; and keep the
        # autotuner's timing tables (inductor prints them to stderr, with no config switch) off the console
        with torch._dynamo.config.patch(recompile_limit=1 << 16), torch._inductor.config.patch(_COMPILE_OPTIONS), \
                mock.patch.object(select_algorithm, "PRINT_AUTOTUNE", False), torch.no_grad():
            for level, fn in enumerate(compiled):
                fn(*_example_inputs(model, batch, level))
        cache[key] = compiled
    return cache[key]


def _modes(model: SashimiLM, batch: int, level: int) -> list:
    """Zero modes of level `level`'s stage (see `_LevelStep`)."""
    return [layer_state.x if isinstance(layer_state, S4State) else None
            for layer_state in _stage_of(model, level).init_state(batch)]


def _example_inputs(model: SashimiLM, batch: int, level: int) -> tuple:
    """Zero inputs of level `level`'s step with the shapes and strides `Stepper` passes."""
    cfg, zeros = model.config, model.head.weight.new_zeros
    n = len(cfg.pool)
    if level == 0:
        inputs = torch.full((batch,), MU_LAW_ZERO, dtype=torch.long, device=model.head.weight.device)
    else:
        inputs = [zeros(batch, cfg.d_model * cfg.expand ** (level - 1)) for _ in range(cfg.pool[level - 1])]
    upsampled = None if level == n else model.backbone.up[n - 1 - level].init_state(batch)[0][:, 0]  # a queue slice
    return inputs, upsampled, _modes(model, batch, level)


@dataclass
class StepperState:
    """A `Stepper`'s state: the level steps it runs with (made for its batch size, the weights at
    `init_state` and `threads` torch threads), and per level l the modes of its stage's S4 layers; for
    l < len(pool) also the inputs buffered for level l + 1 and (queue, read position) of level l + 1's
    up-pooled outputs, as `Sashimi`'s down- and up-pools keep them."""

    levels: list
    threads: int
    modes: list
    buffers: list
    queues: list


class Stepper:
    """Fast O(1)-per-sample recurrence of a `SashimiLM` (eval mode; no gradients), with the protocol of
    `ssmkit.core.generation`: `init_state(batch)`, then `step(tokens (batch,), state) -> (logits (batch,
    n_classes), state)`. Level l of the U-Net runs every prod(pool[:l]) steps: it buffers its inputs for
    level l + 1 and replays a queue of level l + 1's up-pooled outputs, delayed by one coarse step, exactly
    as `Sashimi.step`. `init_state` builds the level steps for its batch size from the current weights; with
    `compile`, one torch.compile per level and batch size (reused while the weights stay), made for the
    current torch thread count, which `step` then runs with."""

    def __init__(self, model: SashimiLM, compile: bool = False):
        self.model, self.compile = model, compile
        self.pools = model.config.pool

    def init_state(self, batch: int, *, device=None, dtype=None) -> StepperState:
        """The zero state. The stepper runs in the model's dtype on its device; `device` and `dtype` may
        only name those."""
        model, weight = self.model, self.model.head.weight
        if (device is not None and torch.device(device) != weight.device) or dtype not in (None, weight.dtype):
            raise ValueError(f"Stepper runs on the model's device and dtype ({weight.device}, {weight.dtype}), "
                             f"got device={device}, dtype={dtype}")
        with torch.no_grad():
            levels = _level_steps(model, batch, self.compile)
            modes = [_modes(model, batch, level) for level in range(len(self.pools) + 1)]
            queues = [up.init_state(batch) for up in reversed(model.backbone.up)]
        return StepperState(levels, torch.get_num_threads(), modes, [[] for _ in self.pools], queues)

    def step(self, tokens: torch.Tensor, state: StepperState) -> tuple[torch.Tensor, StepperState]:
        # the strides and thread count the compiled graphs were made for (dynamo guards on both; a size-1
        # slice can be 'contiguous' with any stride)
        tokens = tokens.clone(memory_format=torch.contiguous_format)
        state = StepperState(state.levels, state.threads, list(state.modes), list(state.buffers), list(state.queues))
        threads = _threads(state.threads) if torch.get_num_threads() != state.threads else contextlib.nullcontext()
        with threads, torch.no_grad():
            return self._advance(0, tokens, state), state

    def _advance(self, level: int, inputs, state: StepperState) -> torch.Tensor:
        """One step of `level` (inputs: the tokens at level 0, else the finer level's `pool` buffered inputs),
        updating `state`: its output (the logits at level 0, else the up-pooled queue for the finer level)."""
        if level == len(self.pools):
            out, _, state.modes[level] = state.levels[level](inputs, None, state.modes[level])
            return out
        queue, position = state.queues[level]
        out, x, state.modes[level] = state.levels[level](inputs, queue[:, position], state.modes[level])
        buffer = [*state.buffers[level], x]
        if len(buffer) == self.pools[level]:
            state.queues[level], buffer = (self._advance(level + 1, buffer, state), 0), []
        else:
            state.queues[level] = (queue, position + 1)
        state.buffers[level] = buffer
        return out


def generate(model: SashimiLM, batch: int, length: int, temperature: float = 1.0, top_p: float = 1.0,
             seed: int = 0, prime: torch.Tensor | None = None, compile: bool = False) -> Generation:
    """`batch` sequences of `length` tokens, the first ones copied from `prime` (tokens (P,) or
    (batch, P)), the rest sampled one at a time through the recurrence (`Stepper`; `compile`: its levels
    compiled by torch.compile first, which pays off for long or many clips)."""
    prime = _check(model, batch, length, prime)
    start = torch.full((batch, 1), MU_LAW_ZERO, dtype=torch.long, device=prime.device)  # the input before sample 0
    with _threads(generation_threads(prime.device, batch, model.config.d_model)):
        out = sample(Stepper(model.eval(), compile), torch.cat([start, prime], 1), length + 1, temperature, top_p,
                     seed)
    return Generation(out.tokens[:, 1:], out.log_likelihood)


def generation_threads(device: torch.device | str, batch: int, d_model: int) -> int:
    """CPU threads `generate` uses: one while the step's tensors are tiny (then the per-op synchronisation
    of several threads costs more than the arithmetic), torch's setting from batch x width 1024 on."""
    if torch.device(device).type == "cpu" and batch * d_model < 1024:
        return 1
    return torch.get_num_threads()


@contextlib.contextmanager
def _threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def naive_generate(model: SashimiLM, batch: int, length: int, temperature: float = 1.0, top_p: float = 1.0,
                   seed: int = 0, prime: torch.Tensor | None = None) -> Generation:
    """The same sampling as `generate`, recomputing the full forward over the prefix for every sample."""
    prime = _check(model, batch, length, prime)
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    multiple = model.backbone.total_pool
    padded = -(-length // multiple) * multiple
    inputs = torch.full((batch, padded), MU_LAW_ZERO, dtype=torch.long, device=prime.device)
    inputs[:, 1:prime.shape[1] + 1] = prime[:, :padded - 1]
    tokens = torch.empty(batch, length, dtype=torch.long, device=prime.device)
    tokens[:, :prime.shape[1]] = prime
    log_likelihood = torch.zeros(batch, dtype=torch.float64, device=prime.device)
    for t in range(prime.shape[1], length):
        # causality: positions after t do not change logits t, so the prefix can be padded to a pool multiple
        window = -(-(t + 1) // multiple) * multiple
        logits = model(inputs[:, :window])[:, t]
        token = sample_next(logits, temperature, top_p, generator)
        log_likelihood += torch.log_softmax(logits.double(), -1).gather(-1, token[:, None]).squeeze(-1)
        tokens[:, t] = token
        if t + 1 < padded:
            inputs[:, t + 1] = token
    return Generation(tokens, log_likelihood)
