"""Sampling over the recurrent-step protocol: `sample_next`'s rule, and `sample` through a MambaLM's step
against sampling from its full forward recomputed at every position."""
import pytest
import torch

from ssmkit.core.generation import sample, sample_next
from ssmkit.core.mamba import MambaLM


def test_sample_next_top_p_and_temperature():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 4000))
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next(logits, 1.0, 0.7, g), minlength=4)
    assert counts[2] == 0 and counts[3] == 0 and abs(counts[0] / 4000 - 0.5 / 0.8) < 0.03
    counts = torch.bincount(sample_next(logits, 1.0, 1.0, g), minlength=4)
    assert abs(counts[3] / 4000 - 0.05) < 0.015
    assert (sample_next(logits[:3], 0.0, 1.0, g) == 0).all()
    sharp = torch.bincount(sample_next(logits, 0.25, 1.0, g), minlength=4)
    assert sharp[0] > 3400  # 0.5^4 / (0.5^4 + 0.3^4 + ...) ≈ 0.88
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, 1.0, 0.0, g)


def _sample_by_recomputing_forward(lm, prompt, length, temperature, top_p, seed):
    """The oracle: the full forward over the prefix for every new token, the same draws from one generator."""
    generator = torch.Generator().manual_seed(seed)
    tokens, log_likelihood = prompt, torch.zeros(prompt.shape[0], dtype=torch.float64)
    while tokens.shape[1] < length:
        logits = lm(tokens)[:, -1]
        token = sample_next(logits, temperature, top_p, generator)
        log_likelihood += torch.log_softmax(logits.double(), -1).gather(-1, token[:, None]).squeeze(-1)
        tokens = torch.cat([tokens, token[:, None]], 1)
    return tokens, log_likelihood


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return MambaLM(vocab_size=11, d_model=16, n_layer=2, d_state=4).double().eval()


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 1.0), (0.7, 0.9)])
def test_sampling_a_mamba_lm_through_its_step_equals_recomputing_the_forward(lm, temperature, top_p):
    prompt = torch.randint(0, 11, (3, 4))
    out = sample(lm, prompt, 24, temperature, top_p, seed=5)
    tokens, log_likelihood = _sample_by_recomputing_forward(lm, prompt, 24, temperature, top_p, seed=5)
    assert out.tokens.shape == (3, 24) and torch.equal(out.tokens[:, :4], prompt)
    assert torch.equal(out.tokens, tokens)
    torch.testing.assert_close(out.log_likelihood, log_likelihood, rtol=1e-10, atol=1e-10)


def test_sample_seeds_and_bad_arguments(lm):
    prompt = torch.zeros(2, 1, dtype=torch.long)
    a, b, c = (sample(lm, prompt, 16, seed=s).tokens for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(sample(lm, prompt, 1).tokens, prompt)  # nothing to sample
    with pytest.raises(ValueError, match=r"prompt token ids of shape \(batch, P >= 1\), got \(2,\)"):
        sample(lm, prompt[:, 0], 4)
    with pytest.raises(ValueError, match="shorter than the prompt"):
        sample(lm, torch.zeros(2, 5, dtype=torch.long), 4)
