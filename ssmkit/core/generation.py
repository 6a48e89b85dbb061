"""The recurrent-step protocol and autoregressive sampling over it.

Every module with a recurrent form (Mamba, MambaBlock, MambaLM, S4Conv, the SaShiMi modules, ConvS5)
offers the same two methods, equal to its parallel `forward` position by position:

- `init_state(batch, *, device=None, dtype=None) -> state`: the state before the first position. It
  also holds whatever `step` needs from the current parameters (S4's discretised step coefficients), so
  a state always belongs to the weights it was started with; after a weight update, start a new one.
- `step(x, state) -> (y, new_state)`: one position. Callers always continue with the returned state;
  a module may update tensors of the given state in place to save copies (Mamba does, and says so),
  so a state passed to `step` is not to be reused.

`sample` runs any model whose step maps token ids (batch,) to logits (batch, vocab); `sample_next`
draws one token per row of logits and is the one sampling rule of the package.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Generation", "sample_next", "sample"]


@dataclass
class Generation:
    """Sampled tokens (batch, length) including the prompt, and each sequence's log-likelihood (nats,
    summed over the sampled positions under the model's distribution before temperature and top-p)."""

    tokens: torch.Tensor
    log_likelihood: torch.Tensor


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row of logits (batch, classes): softmax(logits / temperature) restricted to the
    smallest set of most likely classes whose probability reaches top_p, sampled by inverse CDF with
    one uniform draw per row (temperature 0: argmax, no draw). With top_p = 1 nothing is cut, and the
    CDF runs over the classes in their own order, so no sort is needed."""
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


@torch.no_grad()
def sample(model, prompt: torch.Tensor, length: int, temperature: float = 1.0, top_p: float = 1.0,
           seed: int | None = None) -> Generation:
    """Continue `prompt` (batch, P) token ids, P >= 1, to `length` tokens through `model.step`: the step
    on token t gives the logits of token t + 1, which is sampled by `sample_next` once t + 1 >= P. Random
    numbers come from one CPU generator seeded with `seed` (None: a fresh random seed). Runs the model as
    it is: call `eval()` first to turn dropout off."""
    if prompt.ndim != 2 or prompt.shape[1] < 1 or prompt.dtype != torch.long:
        raise ValueError(f"sample expects prompt token ids of shape (batch, P >= 1), got {tuple(prompt.shape)} "
                         f"{prompt.dtype}")
    batch, prompt_length = prompt.shape
    if length < prompt_length:
        raise ValueError(f"sample: length {length} is shorter than the prompt ({prompt_length} tokens)")
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    tokens = torch.empty(batch, length, dtype=torch.long, device=prompt.device)
    tokens[:, :prompt_length] = prompt
    log_likelihood = torch.zeros(batch, dtype=torch.float64, device=prompt.device)
    state = model.init_state(batch, device=prompt.device)
    for t in range(length - 1):
        logits, state = model.step(tokens[:, t], state)
        if t + 1 >= prompt_length:
            tokens[:, t + 1] = sample_next(logits, temperature, top_p, generator)
            log_likelihood += torch.log_softmax(logits.double(), -1).gather(-1, tokens[:, t + 1, None]).squeeze(-1)
    return Generation(tokens, log_likelihood)
