"""Hydra: the official module's parameter layout and its computation (written with flips, as the official
code does), checked direction by direction."""
import pytest
import torch
import torch.nn.functional as F

from ssmkit.core.hydra import Hydra
from ssmkit.core.ssd import ssd_scan


def test_parameter_names_and_shapes_are_the_official_ones():
    m = Hydra(d_model=32, d_state=8, headdim=16, ngroups=1)  # d_inner 64, 4 heads
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {
        "in_proj.weight": (2 * 64 + 4 * 8 + 2 * 4, 32),
        "conv1d.weight": (64 + 4 * 8, 1, 7), "conv1d.bias": (96,),
        "dt_bias": (4,), "A_log": (4,), "D": (4,),
        "fc_D.weight": (4, 64),
        "norm.weight": (64,),
        "out_proj.weight": (32, 64),
    }
    assert torch.equal(m.A_log, torch.zeros(4))
    assert "init_states" in Hydra(d_model=32, d_state=8, headdim=16, learnable_init_states=True).state_dict()


def official_forward(m: Hydra, u: torch.Tensor) -> torch.Tensor:
    """Hydra's reference path as the official module computes it: both directions stacked on the batch,
    the backward half flipped in time, one forward scan, the output rolled by one and zeroed at the start."""
    b, L, _ = u.shape
    h, p, gn = m.nheads, m.headdim, m.ngroups * m.d_state
    z, xBC, dt = m.in_proj(u).split([m.d_inner, m.conv_dim, 2 * h], dim=-1)
    dt = torch.cat([dt[..., :h], dt[..., h:].flip(1)], dim=0)
    dt = F.softplus(dt + m.dt_bias)
    xBC = F.silu(m.conv1d(xBC.transpose(1, 2)).transpose(1, 2))
    x, BC = xBC.split([m.d_inner, 4 * gn], dim=-1)
    x_og = x
    x = torch.cat([x, x.flip(1)], dim=0)
    BC = torch.cat([BC[..., :2 * gn], BC[..., 2 * gn:].flip(1)], dim=0)
    B, C = BC.split([gn, gn], dim=-1)
    y = ssd_scan(x.reshape(2 * b, L, h, p), dt, -torch.exp(m.A_log), B.reshape(2 * b, L, m.ngroups, -1),
                 C.reshape(2 * b, L, m.ngroups, -1), dt_limit=m.dt_limit, backend="ref").reshape(2 * b, L, -1)
    y = torch.roll(y, shifts=1, dims=1)
    y[:, 0, :] = 0.0
    y_fw, y_bw = y[:b], y[b:].flip(1)
    diag = x_og * F.linear(x_og, m.fc_D.weight, m.D).repeat_interleave(p, dim=-1)
    y = y_fw + y_bw + diag
    return m.out_proj(m.norm(y, z))


@pytest.mark.parametrize("config", [dict(), dict(ngroups=2, dt_limit=(0.01, 0.08)), dict(d_conv=3)])
def test_forward_matches_the_official_computation(config):
    torch.manual_seed(0)
    m = Hydra(d_model=16, d_state=4, headdim=8, chunk_size=8, **config).double()
    with torch.no_grad():
        m.A_log.uniform_(-1, 1)
        m.D.uniform_(-1, 1)
        m.norm.weight.uniform_(0.5, 1.5)
    u = torch.randn(2, 19, 16, dtype=torch.float64)
    torch.testing.assert_close(m(u), official_forward(m, u))


def test_directions_are_strictly_causal_strictly_anticausal_and_diagonal():
    torch.manual_seed(1)
    m = Hydra(d_model=16, d_state=4, headdim=8, d_conv=1).double()  # d_conv 1: no mixing before the scans
    u = torch.randn(1, 12, 16, dtype=torch.float64)
    t = 5
    parts = m.directions(u)[:3]
    u2 = u.clone()
    u2[:, t] += 1.0
    changed = [(a - b).abs().amax(-1)[0] > 1e-12 for a, b in zip(m.directions(u2)[:3], parts)]
    positions = torch.arange(12)
    assert torch.equal(changed[0], positions > t)  # the forward part sees only earlier positions
    assert torch.equal(changed[1], positions < t)  # the backward part only later ones
    assert torch.equal(changed[2], positions == t)  # the diagonal only its own


def test_bad_configuration_is_named():
    with pytest.raises(ValueError, match="d_conv must be odd"):
        Hydra(d_model=16, d_conv=4)
    with pytest.raises(ValueError, match=r"Hydra expects input of shape \(batch, length, 16\)"):
        Hydra(d_model=16, d_state=4, headdim=8)(torch.zeros(2, 5, 8))
