"""Generation: cached recurrence == naive recompute on the same draws; priming, top-p, temperature."""
import pytest
import torch

from ssmkit.audio.generate import Stepper, generate, naive_generate, sample_next
from ssmkit.audio.sashimi import SashimiLM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SashimiLM(d_model=4, n_layers=1, d_state=4, kernel="s4d", n_ssm=None).double().eval()


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_cached_generation_equals_naive_recompute(model, temperature, top_p):
    fast = generate(model, 3, 40, temperature, top_p, seed=5)
    slow = naive_generate(model, 3, 40, temperature, top_p, seed=5)
    assert torch.equal(fast.tokens, slow.tokens)
    torch.testing.assert_close(fast.log_likelihood, slow.log_likelihood)


def _stepped_logits(model, tokens, step):
    with torch.no_grad():
        return torch.stack([step(tokens[:, t]) for t in range(tokens.shape[1])], 1)


def _reference_step(model, batch):
    model.setup_step()
    state = model.default_state(batch)

    def step(tokens):
        nonlocal state
        logits, state = model.step(tokens, state)
        return logits
    return step


@pytest.mark.parametrize("kernel,n_ssm,pool", [("dplr", 1, (4, 4)), ("dplr", None, (4, 4)), ("s4d", None, (4, 4)),
                                               ("dplr", 1, (2, 3, 2)), ("s4d", None, ())])
def test_fast_stepper_equals_the_reference_step_in_fp32(kernel, n_ssm, pool):
    """The folded real-arithmetic recurrence gives the logits of `SashimiLM.step` (tested == forward)
    to 1e-5 in fp32, over 64 steps (every pooling phase, the centre several times), for S4 and S4D, for
    two to four resolutions and for none (the centre alone)."""
    torch.manual_seed(0)
    model = SashimiLM(d_model=8, n_layers=2, d_state=8, kernel=kernel, n_ssm=n_ssm, pool=pool).eval()
    tokens = torch.randint(0, 256, (3, 64))
    fast = _stepped_logits(model, tokens, Stepper(model, 3))
    reference = _stepped_logits(model, tokens, _reference_step(model, 3))
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-5)


def test_compiled_generation_equals_eager_and_follows_weight_updates():
    torch.manual_seed(0)
    model = SashimiLM(d_model=4, n_layers=1, d_state=4, kernel="dplr", pool=(4,)).eval()  # two stages to compile
    tokens = torch.randint(0, 256, (2, 32))
    eager = _stepped_logits(model, tokens, Stepper(model, 2))
    torch.testing.assert_close(_stepped_logits(model, tokens, Stepper(model, 2, compile=True)), eager,
                               rtol=0, atol=1e-5)
    with torch.no_grad():
        model.head.bias.add_(1.0)  # compiled graphs hold frozen weights: a change must rebuild them
    torch.testing.assert_close(_stepped_logits(model, tokens, Stepper(model, 2, compile=True)),
                               _stepped_logits(model, tokens, Stepper(model, 2)), rtol=0, atol=1e-5)
    assert not torch.allclose(_stepped_logits(model, tokens, Stepper(model, 2)), eager)


def test_compiled_stepper_does_not_recompile_while_stepping():
    """Graphs are made for the batch, strides and thread count a `Stepper` steps with: strided token slices
    (as `generate` passes them) and a changed torch thread count must not trigger a compile mid-generation."""
    torch.manual_seed(0)
    model = SashimiLM(d_model=4, n_layers=1, d_state=4, kernel="dplr", pool=(2,)).eval()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        step = Stepper(model, 1, compile=True)
        torch.set_num_threads(2)
        tokens = torch.randint(0, 256, (1, 16))
        with torch.compiler.set_stance("fail_on_recompile"):
            _stepped_logits(model, tokens, step)
    finally:
        torch.set_num_threads(previous)


def test_priming_and_log_likelihood(model):
    prime = torch.randint(0, 256, (9,))
    out = generate(model, 2, 24, seed=1, prime=prime)
    assert torch.equal(out.tokens[:, :9], prime.expand(2, -1))
    assert torch.equal(out.tokens, naive_generate(model, 2, 24, seed=1, prime=prime).tokens)
    # the reported log-likelihood is that of the sampled continuation under one forward pass
    inputs = torch.cat([torch.full((2, 1), 128), out.tokens[:, :-1], torch.full((2, 8), 128)], 1)
    logp = torch.log_softmax(model(inputs)[:, :24].double(), -1).gather(-1, out.tokens[..., None])[..., 0]
    torch.testing.assert_close(out.log_likelihood, logp[:, 9:].sum(1))


def test_seed_reproduces_and_differs(model):
    a, b, c = (generate(model, 2, 16, seed=s).tokens for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)


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


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="prime must be"):
        generate(model, 2, 4, prime=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"prime tokens must lie in \[0, 256\)"):
        generate(model, 1, 4, prime=torch.tensor([300]))
    with pytest.raises(ValueError, match="at least 1"):
        generate(model, 0, 4)
