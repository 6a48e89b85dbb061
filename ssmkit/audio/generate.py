"""Autoregressive sampling from a `SashimiLM`: O(1) recurrent generation and the naive baseline.

`generate` runs the model as a recurrence and feeds each sampled token back, so one new sample costs
the same at any position. `naive_generate` recomputes the whole prefix with the
convolution-mode forward for every new sample (O(L log L) each); it exists to check `generate` and to
measure the speed-up. Both draw their random numbers in the same order from one seeded generator, so
on the same model and seed they return the same tokens.

The recurrent path does not call `SashimiLM.step` (the reference, tested equal to `forward`): `Stepper`
precomputes once what does not depend on the input (each S4 layer's Ā = diag(d) − u vᵀ, B̄ and C folded
into a few real vectors per channel, over the N/2 stored modes only: S4's conjugate-symmetric state is
carried as its stored half) and runs each resolution's stage as one function, which `compile=True` hands
to torch.compile (inductor's C++ backend), one graph per stage and batch size.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from unittest import mock

import torch
import torch.nn as nn

from ssmkit.audio.data import MU_LAW_ZERO
from ssmkit.audio.sashimi import S4Block, SashimiLM, UpPool
from ssmkit.core.s4 import S4Conv

__all__ = ["Generation", "Stepper", "sample_next", "generate", "generation_threads", "naive_generate"]


@dataclass
class Generation:
    """Sampled tokens (batch, length) including the priming tokens, and each sequence's log-likelihood
    (nats, summed over the generated positions under the unmodified model distribution)."""

    tokens: torch.Tensor
    log_likelihood: torch.Tensor


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row of logits (batch, classes): softmax(logits / temperature) restricted to the
    smallest set of most likely classes whose probability reaches top_p, sampled by inverse CDF with
    one uniform draw per row (temperature 0: argmax, no draw). With top_p = 1 nothing is cut, and the
    CDF runs over the classes in their own order: no sort, a third of the cost per generated sample."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if temperature == 0:
        return logits.argmax(-1)
    probs, order = torch.softmax(logits.double() / temperature, -1), None
    if top_p < 1:
        probs, order = probs.sort(-1, descending=True)
        probs = probs * (probs.cumsum(-1) - probs < top_p)  # the first class is always kept
    cumulative = probs.cumsum(-1)
    u = torch.rand(logits.shape[0], 1, generator=generator, dtype=torch.float64).to(logits.device)
    index = torch.searchsorted(cumulative, u * cumulative[:, -1:]).clamp_max(logits.shape[-1] - 1)
    return (index if order is None else order.gather(-1, index)).squeeze(-1)


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


class _S4Recurrence(nn.Module):
    """One S4 layer's step in real arithmetic on a state (batch, H, 2, N/2) = [Re x; Im x] of the N/2 stored
    modes. For S4D those are the whole state (the conjugates are implied by y = 2·Re(C x)). S4's DPLR step
    runs on the full state [x, x̄], whose rank-1 term Ā = diag(d) − u vᵀ couples the halves; every vector of
    `recurrence()` is conjugate-symmetric ([z, z̄]), so for real inputs the state stays [x, x̄] and the half
    x is enough: vᵀ[x, x̄] = 2·Re(v_h x) =: s is real, x' = d_h x − u_h s + B̄_h u_t, y = 2·Re(C x') + D u_t.
    A step is r = read · x (s, and the output's state term), then x' = d ⊙ x (a 2x2 rotation-scaling per
    mode) + s·(−u_h) + u_t·B̄_h. Products and sums over the state, no batched matmul: tiny bmm calls cost far
    more than their arithmetic, and torch.compile fuses the sums into the update. Built in float64 from
    `recurrence()`, stored in the layer's dtype."""

    def __init__(self, layer: S4Conv):
        super().__init__()
        with torch.no_grad():
            kernel = layer.kernel
            d, u, v, b = (None if t is None else t.detach().to(torch.complex128) for t in kernel.recurrence())
            c = kernel.output().detach().to(torch.complex128)
            half = kernel.d_state // 2
            if u is not None:  # DPLR, full state [x, x̄]: keep the stored half; 2·Re(C_f x_f) = 2·Re(2 C_f,h x)
                d, u, v, b, c = d[:, :half], u[:, :half], v[:, :half], b[:, :half], 2 * c[:, :half]
            pairs = lambda z: torch.stack([z.real, z.imag], -2)  # noqa: E731  (H, n) complex -> (H, 2, n)
            out_read = pairs((2 * c * d).conj())  # 2·Re(Σ C d x): Re(z x) = Σ pairs(z̄) ⊙ [Re x, Im x]
            read = [out_read]
            dtype = layer.D.dtype
            if u is not None:
                s_read = pairs(2 * v.conj())  # s = 2·Re(Σ v x)
                read = [s_read, out_read - 2 * (c * u).sum(-1, keepdim=True).real[..., None] * s_read]  # −2·Re(Σ C u)·s
                self.register_buffer("low_rank", pairs(-u).to(dtype))
            else:
                self.low_rank = None
            self.register_buffer("read", torch.stack(read, 1).to(dtype))  # (H, 1 or 2, 2, n)
            self.register_buffer("b_bar", pairs(b).to(dtype))  # (H, 2, n)
            self.register_buffer("same", torch.stack([d.real, d.real], -2).to(dtype))  # (H, 2, n)
            self.register_buffer("swap", torch.stack([-d.imag, d.imag], -2).to(dtype))
            self.register_buffer("direct", (2 * (c * b).sum(-1).real + layer.D.detach().double()).to(dtype))

    def default_state(self, batch: int) -> torch.Tensor:
        return self.read.new_zeros(batch, *self.same.shape)

    def forward(self, u: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u (batch, H), state (batch, H, 2, n) -> y (batch, H), new state. The [Re, Im] flip (not a roll of
        one flat dimension) keeps every load contiguous, so inductor vectorises the update."""
        r = (state[:, :, None] * self.read).sum((-2, -1))  # (batch, H, 1 or 2)
        y = r[..., -1] + self.direct * u
        state = state * self.same + state.flip(-2) * self.swap + u[..., None, None] * self.b_bar
        if self.low_rank is not None:
            state = state + r[..., 0, None, None] * self.low_rank
        return y, state


class _StageStep(nn.Module):
    """One step of one resolution, as `Sashimi.forward` runs it: the level's input x (level 0: the tokens,
    embedded; coarser levels: the `pool` inputs buffered at the finer level, down-pooled), plus the up-pool
    output from the coarser level (none at the centre), through the stack of [S4, feed-forward] residual
    pairs with a residual around the stack; then the final norm and head (level 0: logits), or the up-pool
    to the finer level as its next `pool` inputs, a (batch, pool, H_finer) queue. Returns (output, x, new
    states): the finer level buffers x for the next coarse step. Shares the model's modules."""

    def __init__(self, layers: nn.ModuleList, entry: nn.Module, output: nn.Module):
        super().__init__()
        self.layers, self.entry, self.output = layers, entry, output
        self.s4 = nn.ModuleList(_S4Recurrence(r.layer.s4) for r in layers if isinstance(r.layer, S4Block))

    def default_state(self, batch: int) -> list[torch.Tensor]:
        return [s4.default_state(batch) for s4 in self.s4]

    def forward(self, inputs: torch.Tensor | list[torch.Tensor], upsampled: torch.Tensor | None,
                states: list[torch.Tensor]):
        x = self.entry(inputs) if isinstance(self.entry, nn.Embedding) else self.entry.linear(torch.cat(inputs, -1))
        h = x if upsampled is None else x + upsampled
        stage_input, new_states = h, []
        for residual in self.layers:
            z = residual.norm(h)
            if isinstance(residual.layer, S4Block):
                y, state = self.s4[len(new_states)](z, states[len(new_states)])
                new_states.append(state)
                h = h + residual.layer._head(y)
            else:
                h = h + residual.layer.net(z)
        h = h + stage_input
        if isinstance(self.output, UpPool):
            return self.output.linear(h).view(h.shape[0], self.output.pool, -1), x, new_states
        return self.output(h), x, new_states


# inductor on CPU: weights frozen into the graph (prepacked), small matmuls by its C++ GEMM template, which
# avoids a library call per tiny matmul (2-3x faster steps at batch 1 than the default options)
_COMPILE_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
_compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(batch, threads, weights): stages}


def _stage_steps(model: SashimiLM, batch: int, compile: bool) -> list:
    """Level l's stage step for l = 0 .. len(pool) (the last is the centre); with `compile`, compiled
    now (one graph per stage and batch) and kept for later calls while the weights are unchanged."""
    backbone = model.backbone
    n = len(backbone.config.pool)

    def build():
        return [_StageStep(backbone.center if level == n else backbone.up_stages[n - 1 - level],
                           model.embedding if level == 0 else backbone.down[level - 1],
                           nn.Sequential(backbone.norm, model.head) if level == 0 else backbone.up[n - level])
                for level in range(n + 1)]

    if not compile:
        return build()
    # graphs are made for one thread count (dynamo guards on it): the key holds it, `Stepper` keeps it
    weights = tuple((p.data_ptr(), p._version) for p in model.parameters())
    cache = _compiled.setdefault(model, {})
    for key in [k for k in cache if k[2] != weights]:
        del cache[key]
    key = (batch, torch.get_num_threads(), weights)
    if key not in cache:
        from torch._inductor import select_algorithm  # imported on first compile only: it is slow to import

        stages = build()
        compiled = [torch.compile(stage, dynamic=False, fullgraph=True) for stage in stages]
        # every stage of every batch size is one more graph of the same code: allow them all; and keep the
        # autotuner's timing tables (inductor prints them to stderr, with no config switch) off the console
        with torch._dynamo.config.patch(recompile_limit=1 << 16), torch._inductor.config.patch(_COMPILE_OPTIONS), \
                mock.patch.object(select_algorithm, "PRINT_AUTOTUNE", False), torch.no_grad():
            for level, (stage, fn) in enumerate(zip(stages, compiled)):
                fn(*_example_inputs(model, batch, level), stage.default_state(batch))
        cache[key] = compiled
    return cache[key]


def _example_inputs(model: SashimiLM, batch: int, level: int) -> tuple:
    """Zero inputs of level `level`'s stage step with the shapes and strides `Stepper` passes."""
    cfg, zeros = model.config, model.head.weight.new_zeros
    if level == 0:
        inputs = torch.full((batch,), MU_LAW_ZERO, dtype=torch.long, device=model.head.weight.device)
    else:
        inputs = [zeros(batch, cfg.d_model * cfg.expand ** (level - 1)) for _ in range(cfg.pool[level - 1])]
    if level == len(cfg.pool):
        return inputs, None
    return inputs, zeros(batch, cfg.pool[level], cfg.d_model * cfg.expand ** level)[:, 0]  # a slice of a queue


class Stepper:
    """Fast O(1)-per-sample generation state of a `SashimiLM` (eval mode, weights fixed): call it with the
    tokens (batch,) of one step to get that step's logits (batch, n_classes). Level l of the U-Net runs
    every prod(pool[:l]) steps: level l buffers `pool` of its inputs for level l + 1 and replays a queue of
    `pool` up-pooled outputs of level l + 1 delayed by one coarse step, exactly as `Sashimi.step`. Build
    cost: one pass over the weights, plus, with `compile`, one torch.compile per stage and batch size
    (reused while the weights stay)."""

    def __init__(self, model: SashimiLM, batch: int, compile: bool = False):
        cfg = model.config
        self.pools, self.threads = cfg.pool, torch.get_num_threads()
        self.stages = _stage_steps(model, batch, compile)
        self.states = [stage.default_state(batch) for stage in self.stages]
        # queue l: the (batch, pool, H_l) inputs level l takes from level l + 1, zero for the first coarse step
        self.queues = [model.head.weight.new_zeros(batch, p, cfg.d_model * cfg.expand ** level)
                       for level, p in enumerate(self.pools)]
        self.buffers = [[] for _ in self.pools]
        self.time = [0] * len(self.pools)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        # the strides and thread count the compiled graphs were made for (dynamo guards on both; a size-1
        # slice can be 'contiguous' with any stride)
        tokens = tokens.clone(memory_format=torch.contiguous_format)
        threads = _threads(self.threads) if torch.get_num_threads() != self.threads else contextlib.nullcontext()
        with threads, torch.no_grad():
            return self._advance(0, tokens)

    def _advance(self, level: int, inputs) -> torch.Tensor:
        """One step of `level` (inputs: the tokens at level 0, else the finer level's `pool` buffered inputs):
        its output (the logits at level 0, else the up-pooled queue for the finer level)."""
        if level == len(self.pools):
            out, _, self.states[level] = self.stages[level](inputs, None, self.states[level])
            return out
        position = self.time[level] % self.pools[level]
        self.time[level] += 1
        out, x, self.states[level] = self.stages[level](inputs, self.queues[level][:, position], self.states[level])
        self.buffers[level].append(x)
        if len(self.buffers[level]) == self.pools[level]:
            self.queues[level] = self._advance(level + 1, self.buffers[level])
            self.buffers[level] = []
        return out


def generate(model: SashimiLM, batch: int, length: int, temperature: float = 1.0, top_p: float = 1.0,
             seed: int = 0, prime: torch.Tensor | None = None, compile: bool = False) -> Generation:
    """`batch` sequences of `length` tokens, the first ones copied from `prime` (tokens (P,) or
    (batch, P)), the rest sampled one at a time through the recurrence (`Stepper`; `compile`: its stages
    compiled by torch.compile first, which pays off for long or many clips)."""
    prime = _check(model, batch, length, prime)
    with _threads(generation_threads(prime.device, batch, model.config.d_model)), torch.no_grad():
        return _generate(model, batch, length, temperature, top_p, seed, prime, compile)


def generation_threads(device: torch.device | str, batch: int, d_model: int) -> int:
    """CPU threads `generate` uses: one while the step's tensors are tiny (batch 1: with several, the per-op
    synchronisation costs more than the arithmetic), torch's setting from batch x width 1024 on (2-core CPU,
    sashimi_sc09, compiled: batch 1 made 3,620 samples/s on 1 thread and 3,480 on 2; batch 16 12,400 on 1
    thread and 15,100 on 2)."""
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


def _generate(model, batch, length, temperature, top_p, seed, prime, compile) -> Generation:
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    step = Stepper(model, batch, compile)
    device = prime.device
    tokens = torch.empty(batch, length, dtype=torch.long, device=device)
    tokens[:, :prime.shape[1]] = prime
    log_likelihood = torch.zeros(batch, dtype=torch.float64, device=device)
    current = torch.full((batch,), MU_LAW_ZERO, dtype=torch.long, device=device)
    for t in range(length):
        logits = step(current)
        if t >= prime.shape[1]:
            tokens[:, t] = sample_next(logits, temperature, top_p, generator)
            log_likelihood += torch.log_softmax(logits.double(), -1).gather(-1, tokens[:, t:t + 1]).squeeze(-1)
        current = tokens[:, t]
    return Generation(tokens, log_likelihood)


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
