"""Autoregressive sampling from a `SashimiLM`: O(1) recurrent generation and the naive baseline.

`generate` converts the model to its recurrence (`setup_step`) and feeds each sampled token back, so
one new sample costs the same at any position. `naive_generate` recomputes the whole prefix with the
convolution-mode forward for every new sample (O(L log L) each); it exists to check `generate` and to
measure the speed-up. Both draw their random numbers in the same order from one seeded generator, so
on the same model and seed they return the same tokens.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ssmkit.audio.data import MU_LAW_ZERO
from ssmkit.audio.sashimi import SashimiLM

__all__ = ["Generation", "sample_next", "generate", "naive_generate"]


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


@torch.no_grad()
def generate(model: SashimiLM, batch: int, length: int, temperature: float = 1.0, top_p: float = 1.0,
             seed: int = 0, prime: torch.Tensor | None = None) -> Generation:
    """`batch` sequences of `length` tokens, the first ones copied from `prime` (tokens (P,) or
    (batch, P)), the rest sampled one at a time through the recurrent step."""
    prime = _check(model, batch, length, prime)
    with _few_threads(prime.device, batch * model.cfg.d_model):
        return _generate(model, batch, length, temperature, top_p, seed, prime)


@contextlib.contextmanager
def _few_threads(device: torch.device, width: int):
    """One intra-op CPU thread while stepping small tensors: with several, the per-op synchronisation
    costs more than the arithmetic (10-20x slower steps on a busy 2-core machine)."""
    previous = torch.get_num_threads()
    if device.type == "cpu" and width < 16384:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _generate(model, batch, length, temperature, top_p, seed, prime) -> Generation:
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    model.setup_step()
    state = model.default_state(batch)
    device = prime.device
    tokens = torch.empty(batch, length, dtype=torch.long, device=device)
    tokens[:, :prime.shape[1]] = prime
    log_likelihood = torch.zeros(batch, dtype=torch.float64, device=device)
    current = torch.full((batch,), MU_LAW_ZERO, dtype=torch.long, device=device)
    for t in range(length):
        logits, state = model.step(current, state)
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
