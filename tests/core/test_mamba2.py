"""The Mamba-2 mixer: mamba_ssm's parameter layout, its computation written out, and step == forward."""
import pytest
import torch
import torch.nn.functional as F

from ssmkit.core.layers import RMSNormGated
from ssmkit.core.mamba2 import Mamba2
from ssmkit.core.ssd import ssd_scan


def test_parameter_names_and_shapes_are_mamba_ssm_s():
    m = Mamba2(d_model=64, d_state=16, headdim=16, ngroups=2, d_conv=4, expand=2)
    # d_inner 128, 8 heads; in_proj = 2*128 + 2*2*16 + 8 columns; conv over x, B, C
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {
        "dt_bias": (8,), "A_log": (8,), "D": (8,),
        "in_proj.weight": (328, 64),
        "conv1d.weight": (192, 1, 4), "conv1d.bias": (192,),
        "norm.weight": (128,),
        "out_proj.weight": (64, 128),
    }
    assert torch.all((-torch.exp(m.A_log) <= -1) & (-torch.exp(m.A_log) >= -16))
    dt = F.softplus(m.dt_bias)
    assert torch.all((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001))


def test_mamba_ssm_defaults_give_the_published_130m_layer_size():
    # mamba2-130m: d_model 768, d_state 128, headdim 64, expand 2 -> 24 heads
    m = Mamba2(d_model=768)
    assert m.nheads == 24 and m.in_proj.out_features == 2 * 1536 + 2 * 128 + 24
    assert sum(p.numel() for p in m.parameters()) == 768 * 3352 + 1792 * 5 + 24 * 3 + 1536 + 1536 * 768


def reference_forward(m: Mamba2, u: torch.Tensor) -> torch.Tensor:
    """The module's computation written out step by step with plain PyTorch ops and the loop scan."""
    b, L, _ = u.shape
    zxbcdt = m.in_proj(u)
    z0, x0, z, xBC, dt = zxbcdt.split([m.d_mlp, m.d_mlp, m.d_ssm, m.conv_dim, m.nheads], dim=-1)
    xBC = F.silu(m.conv1d(xBC.transpose(1, 2))[..., :L].transpose(1, 2))
    x, B, C = xBC.split([m.d_ssm, m.ngroups * m.d_state, m.ngroups * m.d_state], dim=-1)
    D = m.D.view(m.nheads, m.headdim) if m.D_has_hdim else m.D
    y = ssd_scan(x.reshape(b, L, m.nheads, m.headdim), dt, -torch.exp(m.A_log), B.reshape(b, L, m.ngroups, -1),
                 C.reshape(b, L, m.ngroups, -1), D=D, z=None if m.rmsnorm else z.reshape(b, L, m.nheads, -1),
                 dt_bias=m.dt_bias, dt_softplus=True, dt_limit=m.dt_limit, backend="ref").reshape(b, L, -1)
    if m.rmsnorm:
        g = m.d_ssm // m.ngroups
        yz = (y * F.silu(z)) if not m.norm_before_gate else y
        yz = yz.reshape(b, L, m.ngroups, g)
        y = (yz / torch.sqrt(yz.pow(2).mean(-1, keepdim=True) + 1e-5)).reshape(b, L, -1) * m.norm.weight
        if m.norm_before_gate:
            y = y * F.silu(z)
    if m.d_mlp:
        y = torch.cat([F.silu(z0) * x0, y], -1)
    return m.out_proj(y)


CONFIGS = [
    dict(),
    dict(ngroups=2, D_has_hdim=True),
    dict(rmsnorm=False),
    dict(norm_before_gate=True, dt_limit=(0.01, 0.05)),
    dict(d_ssm=32),  # a gated MLP beside the SSM
]


@pytest.mark.parametrize("config", CONFIGS)
def test_forward_matches_the_written_out_computation(config):
    torch.manual_seed(0)
    m = Mamba2(d_model=24, d_state=8, headdim=8, chunk_size=8, **config).double()
    with torch.no_grad():
        m.norm.weight.uniform_(0.5, 1.5) if m.rmsnorm else None
        m.D.uniform_(-1, 1)
    u = torch.randn(2, 21, 24, dtype=torch.float64)
    torch.testing.assert_close(m(u), reference_forward(m, u))


@pytest.mark.parametrize("config", CONFIGS)
def test_step_equals_forward(config):
    torch.manual_seed(1)
    m = Mamba2(d_model=24, d_state=8, headdim=8, chunk_size=8, **config).double()
    u = torch.randn(2, 13, 24, dtype=torch.float64)
    with torch.no_grad():
        full = m(u)
        state = m.init_state(2)
        steps = [m.step(u[:, t], state)[0] for t in range(13)]
    torch.testing.assert_close(torch.stack(steps, 1), full)


def test_packed_sequences_reset_the_scan_state():
    torch.manual_seed(2)
    m = Mamba2(d_model=16, d_state=4, headdim=8, chunk_size=8).double()
    u = torch.randn(1, 30, 16, dtype=torch.float64)
    seq_idx = torch.tensor([[0] * 11 + [1] * 2 + [2] * 17])  # one sequence shorter than the conv
    packed = m(u, seq_idx=seq_idx)
    torch.testing.assert_close(packed, torch.cat([m(u[:, :11]), m(u[:, 11:13]), m(u[:, 13:])], 1))


def test_grouped_gated_norm_normalises_each_group():
    norm = RMSNormGated(6, group_size=3)
    x = torch.tensor([[1.0, 1.0, 1.0, 2.0, 2.0, 2.0]])
    torch.testing.assert_close(norm(x), torch.ones(1, 6), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="group_size 4 does not divide the width 6"):
        RMSNormGated(6, group_size=4)


def test_bad_input_is_named():
    m = Mamba2(d_model=16, d_state=4, headdim=8)
    with pytest.raises(ValueError, match=r"Mamba2 expects input of shape \(batch, length, 16\), got \(2, 16\)"):
        m(torch.zeros(2, 16))
    with pytest.raises(ValueError, match="d_ssm=32 is not a multiple of headdim=12"):
        Mamba2(d_model=16, headdim=12)


def test_mamba2_language_model_steps_equal_forward():
    import ssmkit

    torch.manual_seed(3)
    lm = ssmkit.create_model("mamba2_lm_tiny", vocab_size=11).double().eval()
    assert sum(p.numel() for p in ssmkit.create_model("mamba2_lm_tiny").parameters()) == 57392
    ids = torch.randint(0, 11, (2, 9))
    with torch.no_grad():
        full = lm(ids)
        state = lm.init_state(2)
        steps = [lm.step(ids[:, t], state)[0] for t in range(9)]
    torch.testing.assert_close(torch.stack(steps, 1), full)

