"""Autoregressive sampling from a `SashimiLM`: O(1) recurrent generation and the naive baseline.

`generate` runs the model as a recurrence and feeds each sampled token back, so one new sample costs
the same at any position. `naive_generate` recomputes the whole prefix with the
convolution-mode forward for every new sample (O(L log L) each); it exists to check `generate` and to
measure the speed-up. Both draw their random numbers in the same order from one seeded generator, so
on the same model and seed they return the same tokens.

The recurrent path does not call `SashimiLM.step` (the reference, tested equal to `forward`): `Stepper`
precomputes once what does not depend on the input (each S4 layer's Ā = diag(d) − u vᵀ, B̄ and C folded
into two small real matrices per channel, so a layer step is a few products and sums in real arithmetic)
and runs each resolution's stage as one function, which `compile=True` hands to torch.compile (inductor's
C++ backend), one graph per stage and batch size.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn

from ssmkit.audio.data import MU_LAW_ZERO
from ssmkit.audio.sashimi import S4Block, SashimiLM
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
    one uniform draw per row (temperature 0: argmax, no draw)."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.double() / temperature, -1)
    sorted_probs, order = probs.sort(-1, descending=True)
    cumulative = sorted_probs.cumsum(-1)
    keep = cumulative - sorted_probs < top_p  # the first class is always kept
    sorted_probs = sorted_probs * keep
    cumulative = sorted_probs.cumsum(-1)
    u = torch.rand(logits.shape[0], 1, generator=generator, dtype=torch.float64).to(logits.device)
    index = torch.searchsorted(cumulative, u * cumulative[:, -1:]).clamp_max(logits.shape[-1] - 1)
    return order.gather(-1, index).squeeze(-1)


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
    if prime.numel() and (prime.min() < 0 or prime.max() >= model.cfg.n_classes):
        raise ValueError(f"prime tokens must lie in [0, {model.cfg.n_classes})")
    return prime.to(device=device, dtype=torch.long)


class _S4Recurrence(nn.Module):
    """One S4 layer's step in real arithmetic on a state (batch, H, 2n) = [Re x | Im x] of the layer's n
    complex modes (N/2 for S4D, N for S4's DPLR): r = read · x gives vᵀx (re, im) and the output's state term 2·Re(C Ā x); the new state is
    d ⊙ x (a 2x2 rotation-scaling per mode) + [vᵀx, u_t] · write (the −u vᵀx and B̄ u_t terms); the output
    adds (2·Re(C B̄) + D) u_t. Products and sums over the state, no batched matmul: tiny bmm calls cost far
    more than their arithmetic, and torch.compile fuses the sums into the update. Built in float64 from
    `recurrence()`, stored in the layer's dtype."""

    def __init__(self, layer: S4Conv):
        super().__init__()
        with torch.no_grad():
            kernel = layer.kernel
            d, u, v, b = (None if t is None else t.detach().to(torch.complex128) for t in kernel.recurrence())
            c = kernel.output().detach().to(torch.complex128)
            rows = lambda z: torch.cat([z.real, z.imag], -1)  # noqa: E731  (H, n) complex -> (H, 2n) real
            out = 2 * (c * d)  # 2·Re(Σ C d x) reads Re x with 2·Re(C d) and Im x with −2·Im(C d)
            read, write = [], [rows(b)]
            if u is not None:  # w = vᵀx: Re w = Re v·Re x − Im v·Im x, Im w = Im v·Re x + Re v·Im x
                w_re, w_im = rows(v.conj()), rows(1j * v.conj())
                gamma = 2 * (c * u).sum(-1, keepdim=True)  # output term −2·Re(Σ C u · w)
                read = [w_re, w_im]
                out_read = rows(out.conj()) - gamma.real * w_re + gamma.imag * w_im
                write = [rows(-u), rows(-1j * u), rows(b)]
            else:
                out_read = rows(out.conj())
            dtype = layer.D.dtype
            self.register_buffer("read", torch.stack([*read, out_read], 1).to(dtype))  # (H, 2r + 1, 2n)
            self.register_buffer("write", torch.stack(write, 1).to(dtype))  # (H, 2r + 1, 2n)
            self.register_buffer("same", torch.cat([d.real, d.real], -1).to(dtype))  # (H, 2n)
            self.register_buffer("swap", torch.cat([-d.imag, d.imag], -1).to(dtype))
            self.register_buffer("direct", (2 * (c * b).sum(-1).real + layer.D.detach().double()).to(dtype))
        self.half = d.shape[-1]

    def default_state(self, batch: int) -> torch.Tensor:
        return self.read.new_zeros(batch, self.read.shape[0], self.read.shape[-1])

    def forward(self, u: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u (batch, H), state (batch, H, N) -> y (batch, H), new state."""
        r = (state[:, :, None] * self.read).sum(-1)  # (batch, H, 2r + 1)
        y = r[..., -1] + self.direct * u
        coef = torch.cat([r[..., :-1], u[..., None]], -1)
        state = state * self.same + state.roll(self.half, -1) * self.swap + (coef[..., None] * self.write).sum(-2)
        return y, state


class _StageStep(nn.Module):
    """One resolution's stack of [S4, feed-forward] residual pairs for one step: x (+ skip) -> stage(x) + x,
    then the final norm and head for the full-resolution stage (logits). Shares the model's modules."""

    def __init__(self, layers: nn.ModuleList, final: nn.Module | None = None):
        super().__init__()
        self.layers = layers
        self.s4 = nn.ModuleList(_S4Recurrence(r.layer.s4) for r in layers if isinstance(r.layer, S4Block))
        self.final = final

    def default_state(self, batch: int) -> list[torch.Tensor]:
        return [s4.default_state(batch) for s4 in self.s4]

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, states: list[torch.Tensor]):
        if skip is not None:
            x = x + skip
        stage_input, new_states = x, []
        for residual in self.layers:
            z = residual.norm(x)
            if isinstance(residual.layer, S4Block):
                y, state = self.s4[len(new_states)](z, states[len(new_states)])
                new_states.append(state)
                x = x + residual.layer._head(y)
            else:
                x = x + residual.layer.net(z)
        x = x + stage_input
        return (x if self.final is None else self.final(x)), new_states


# inductor on CPU: weights frozen into the graph (prepacked), small matmuls by its C++ GEMM template, which
# avoids a library call per tiny matmul (2-3x faster steps at batch 1 than the default options)
_COMPILE_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
_compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(batch, weights): stages}


def _stage_steps(model: SashimiLM, batch: int, compile: bool) -> list:
    """Level l's stage step for l = 0 .. len(pool) (the last is the centre); with `compile`, compiled
    now (one graph per stage and batch) and kept for later calls while the weights are unchanged."""
    backbone = model.backbone
    n = len(backbone.cfg.pool)

    def build():
        final = nn.Sequential(backbone.norm, model.head)  # level 0 ends with the logits
        return [*(_StageStep(backbone.up_stages[n - 1 - level], final if level == 0 else None) for level in range(n)),
                _StageStep(backbone.center)]

    if not compile:
        return build()
    weights = tuple((p.data_ptr(), p._version) for p in model.parameters())
    cache = _compiled.setdefault(model, {})
    for key in [k for k in cache if k[1] != weights]:
        del cache[key]
    if (batch, weights) not in cache:
        stages = build()
        compiled = [torch.compile(stage, dynamic=False, fullgraph=True) for stage in stages]
        # every stage of every batch size is one more graph of the same code: allow them all
        with torch._dynamo.config.patch(recompile_limit=1 << 16), torch._inductor.config.patch(_COMPILE_OPTIONS), \
                torch.no_grad():
            for level, (stage, fn) in enumerate(zip(stages, compiled)):
                x, skip = (model.head.weight.new_zeros(batch, backbone.cfg.d_model * backbone.cfg.expand ** level)
                           for _ in range(2))
                fn(x, None if level == n else skip, stage.default_state(batch))
        cache[(batch, weights)] = compiled
    return cache[(batch, weights)]


class Stepper:
    """Fast O(1)-per-sample generation state of a `SashimiLM` (eval mode, weights fixed): call it with the
    tokens (batch,) of one step to get that step's logits (batch, n_classes). Level l of the U-Net runs
    every prod(pool[:l]) steps: its down-pool buffers `pool` inputs, its up-pool replays a queue of `pool`
    outputs delayed by one coarse step, exactly as `Sashimi.step`. Build cost: one pass over the weights,
    plus, with `compile`, one torch.compile per stage and batch size (reused while the weights stay)."""

    def __init__(self, model: SashimiLM, batch: int, compile: bool = False):
        backbone = model.backbone
        self.model, self.batch, self.pools = model, batch, backbone.cfg.pool
        n = len(self.pools)
        self.stages = _stage_steps(model, batch, compile)
        self.states = [stage.default_state(batch) for stage in self.stages]
        self.down = list(backbone.down)
        self.up = [backbone.up[n - 1 - level] for level in range(n)]
        self.buffers = [[] for _ in range(n)]
        self.queues = [self._queue(up.default_state(batch)[0]) for up in self.up]
        self.time = [0] * n

    @staticmethod
    def _queue(outputs: torch.Tensor) -> torch.Tensor:
        """Up-pool outputs (batch, pool, H) as (pool, batch, H) with standard strides, so that each step's
        slice has the strides the compiled graphs were made for (torch.compile guards on strides)."""
        queue = outputs.new_empty(outputs.shape[1], outputs.shape[0], outputs.shape[2])
        return queue.copy_(outputs.transpose(0, 1))

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._advance(0, self.model.embedding(tokens))

    def _advance(self, level: int, x: torch.Tensor) -> torch.Tensor:
        """One step of `level` with input x: its output (the logits at level 0)."""
        if level == len(self.pools):
            y, self.states[level] = self.stages[level](x, None, self.states[level])
            return y
        pool, position = self.pools[level], self.time[level] % self.pools[level]
        self.time[level] += 1
        out = self.queues[level][position]  # contiguous, as the compiled graphs expect
        self.buffers[level].append(x)
        if len(self.buffers[level]) == pool:
            coarse = self._advance(level + 1, self.down[level].linear(torch.cat(self.buffers[level], -1)))
            self.buffers[level] = []
            self.queues[level] = self._queue(self.up[level].linear(coarse).view(self.batch, pool, -1))
        y, self.states[level] = self.stages[level](out, x, self.states[level])
        return y


def generate(model: SashimiLM, batch: int, length: int, temperature: float = 1.0, top_p: float = 1.0,
             seed: int = 0, prime: torch.Tensor | None = None, compile: bool = False) -> Generation:
    """`batch` sequences of `length` tokens, the first ones copied from `prime` (tokens (P,) or
    (batch, P)), the rest sampled one at a time through the recurrence (`Stepper`; `compile`: its stages
    compiled by torch.compile first, which pays off for long or many clips)."""
    prime = _check(model, batch, length, prime)
    with _threads(generation_threads(prime.device, batch, model.cfg.d_model)), torch.no_grad():
        return _generate(model, batch, length, temperature, top_p, seed, prime, compile)


def generation_threads(device: torch.device | str, batch: int, d_model: int) -> int:
    """CPU threads `generate` uses: one while the step's tensors are tiny (batch 1: with several, the per-op
    synchronisation costs more than the arithmetic), torch's setting from batch x width 1024 on (2-core CPU,
    sashimi_sc09, batch 16: 2 threads gave 7,100 samples/s compiled and 4,100 eager, 1 thread 5,500 and 2,000)."""
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
