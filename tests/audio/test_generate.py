"""Generation: cached recurrence == naive recompute on the same draws; priming, top-p, temperature."""
import pytest
import torch

from ssmkit.audio.data import MU_LAW_ZERO
from ssmkit.audio.generate import Stepper, generate, naive_generate
from ssmkit.audio.sashimi import SashimiLM
from ssmkit.core.generation import sample


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


def test_generation_is_core_sampling_over_the_fast_stepper(model):
    """`generate` samples through core's `sample` from the start token: the same loop over the model's
    reference step gives the same tokens and log-likelihoods."""
    prime = torch.randint(0, 256, (2, 5))
    fast = generate(model, 2, 20, 0.9, 0.95, seed=2, prime=prime)
    reference = sample(model, torch.cat([torch.full((2, 1), MU_LAW_ZERO), prime], 1), 21, 0.9, 0.95, seed=2)
    assert torch.equal(fast.tokens, reference.tokens[:, 1:])
    torch.testing.assert_close(fast.log_likelihood, reference.log_likelihood)


def _stepped_logits(stepper, tokens, state=None):
    """Logits (batch, L, n_classes) of stepping `stepper` (a `SashimiLM` or a `Stepper`) through tokens."""
    state = stepper.init_state(tokens.shape[0]) if state is None else state
    logits = []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            out, state = stepper.step(tokens[:, t], state)
            logits.append(out)
    return torch.stack(logits, 1)


@pytest.mark.parametrize("kernel,n_ssm,pool", [("dplr", 1, (4, 4)), ("dplr", None, (4, 4)), ("s4d", None, (4, 4)),
                                               ("dplr", 1, (2, 3, 2)), ("s4d", None, ())])
def test_fast_stepper_equals_the_reference_step_in_fp32(kernel, n_ssm, pool):
    """The folded real-arithmetic recurrence gives the logits of `SashimiLM.step` (tested == forward)
    to 1e-5 in fp32, over 64 steps (every pooling phase, the centre several times), for S4 and S4D, for
    two to four resolutions and for none (the centre alone)."""
    torch.manual_seed(0)
    model = SashimiLM(d_model=8, n_layers=2, d_state=8, kernel=kernel, n_ssm=n_ssm, pool=pool).eval()
    tokens = torch.randint(0, 256, (3, 64))
    fast = _stepped_logits(Stepper(model), tokens)
    reference = _stepped_logits(model, tokens)
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-5)


def test_compiled_generation_equals_eager_and_follows_weight_updates():
    torch.manual_seed(0)
    model = SashimiLM(d_model=4, n_layers=1, d_state=4, kernel="dplr", pool=(4,)).eval()  # two stages to compile
    tokens = torch.randint(0, 256, (2, 32))
    eager = _stepped_logits(Stepper(model), tokens)
    torch.testing.assert_close(_stepped_logits(Stepper(model, compile=True), tokens), eager, rtol=0, atol=1e-5)
    with torch.no_grad():
        model.head.bias.add_(1.0)  # compiled graphs hold frozen weights: a change must rebuild them
    torch.testing.assert_close(_stepped_logits(Stepper(model, compile=True), tokens),
                               _stepped_logits(Stepper(model), tokens), rtol=0, atol=1e-5)
    assert not torch.allclose(_stepped_logits(Stepper(model), tokens), eager)


def test_compiled_stepper_does_not_recompile_while_stepping():
    """Graphs are made for the batch, strides and thread count a `Stepper` state is started with: strided
    token slices (as `generate` passes them) and a changed torch thread count must not trigger a compile
    mid-generation."""
    torch.manual_seed(0)
    model = SashimiLM(d_model=4, n_layers=1, d_state=4, kernel="dplr", pool=(2,)).eval()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        step = Stepper(model, compile=True)
        state = step.init_state(1)
        torch.set_num_threads(2)
        tokens = torch.randint(0, 256, (1, 16))
        with torch.compiler.set_stance("fail_on_recompile"):
            _stepped_logits(step, tokens, state)
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


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="prime must be"):
        generate(model, 2, 4, prime=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"prime tokens must lie in \[0, 256\)"):
        generate(model, 1, 4, prime=torch.tensor([300]))
    with pytest.raises(ValueError, match="at least 1"):
        generate(model, 0, 4)
