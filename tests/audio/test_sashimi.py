"""SaShiMi: causality around every pooling boundary (and its mutation check), step == forward, sizes."""
import pytest
import torch
import torch.nn.functional as F

import ssmkit
from ssmkit.audio.sashimi import Sashimi, SashimiConfig, SashimiLM, UpPool

f64 = torch.float64


def _backbone(kernel="s4d", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = SashimiConfig(d_model=4, n_layers=1, d_state=4, kernel=kernel, n_ssm=None, **kw)
    return Sashimi(cfg).double().eval()


def _leak(model, t0, length=64):
    """Largest change of outputs before t0 when inputs from t0 on are replaced by random vectors, and
    the change at t0 itself."""
    x = torch.randn(2, length, 4, dtype=f64)
    y = model(x)
    x2 = x.clone()
    x2[:, t0:] = torch.randn_like(x2[:, t0:])
    y2 = model(x2)
    return (y2[:, :t0] - y[:, :t0]).abs().max().item(), (y2[:, t0] - y[:, t0]).abs().max().item()


@pytest.mark.parametrize("t0", [1, 3, 4, 5, 15, 16, 17, 31, 32, 47, 48, 63])
def test_backbone_is_causal_around_every_pool_boundary(t0):
    before, at = _leak(_backbone(), t0)
    assert before < 1e-12 and at > 1e-6


def test_removing_the_up_pool_shift_breaks_causality(monkeypatch):
    """The mutation check: the same test fails without the one-step delay in UpPool."""
    def unshifted(self, x):
        b, coarse, _ = x.shape
        return self.linear(x).reshape(b, coarse * self.pool, self.d_out)

    monkeypatch.setattr(UpPool, "forward", unshifted)
    leaks = [_leak(_backbone(), t0)[0] for t0 in (1, 5, 17, 33)]
    assert max(leaks) > 1e-3


@pytest.mark.parametrize("kernel,glu", [("s4d", True), ("dplr", True), ("s4d", False)])
def test_step_equals_forward_for_the_language_model(kernel, glu):
    torch.manual_seed(0)
    model = SashimiLM(d_model=4, n_layers=1, d_state=4, kernel=kernel, glu=glu, n_ssm=None).double().eval()
    tokens = torch.randint(0, 256, (2, 48))
    with torch.no_grad():
        logits = model(tokens)
        state, steps = model.init_state(2), []
        for t in range(48):
            out, state = model.step(tokens[:, t], state)
            steps.append(out)
    torch.testing.assert_close(torch.stack(steps, 1), logits, rtol=0, atol=1e-10)


@pytest.mark.parametrize("norm", ["layer", "scalar"])
def test_step_equals_forward_in_fp32_and_after_a_weight_update(norm):
    torch.manual_seed(0)
    model = SashimiLM(d_model=8, n_layers=1, d_state=8, kernel="s4d", n_ssm=None, norm=norm)
    tokens = torch.randint(0, 256, (1, 32))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    F.cross_entropy(model(tokens).transpose(1, 2), tokens).backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        logits = model(tokens)
        state, steps = model.init_state(1), []
        for t in range(32):
            out, state = model.step(tokens[:, t], state)
            steps.append(out)
    torch.testing.assert_close(torch.stack(steps, 1), logits, rtol=1e-4, atol=1e-4)


def test_published_sizes_through_the_registry():
    sc09 = ssmkit.create_model("sashimi_sc09")
    assert sum(p.numel() for p in sc09.parameters()) == 4_764_160  # 4.76M: 8 layers, tied DPLR state, GLU
    assert sum(p.numel() for p in ssmkit.create_model("sashimi_sc09", glu=False).parameters()) == 4_072_448
    small = ssmkit.create_model("sashimi_small")
    assert small.config.kernel == "s4d" and sum(p.numel() for p in small.parameters()) < 500_000
    assert {"sashimi_sc09", "sashimi_small"} <= set(ssmkit.list_models("sashimi_*"))


def test_bad_input_is_refused():
    model = _backbone()
    with pytest.raises(ValueError, match="divisible by 16"):
        model(torch.randn(1, 20, 4, dtype=f64))
    with pytest.raises(ValueError, match="invalid SashimiConfig"):
        SashimiConfig(pool=(4, 0))
