"""S4/S4D: kernels vs references and closed forms, FFT conv vs direct, step == conv, Hurwitz stability."""
import math

import pytest
import torch

from ssmkit.core.s4 import DPLRKernel, S4Conv, S4DKernel, hippo_legs_nplr, kernel_reference

f64 = torch.float64


def _kernel(kind, seed=0, **kw):
    torch.manual_seed(seed)
    if kind == "dplr":
        return DPLRKernel(3, 8, **kw).double()
    return S4DKernel(3, 8, **kw).double()


def _assert_same_grads(actual, actual_module, expected, expected_module, **tolerance):
    """The gradients of one random projection of `actual` and of `expected` w.r.t. their modules' parameters agree."""
    w = torch.randn_like(expected)
    for a, e in zip(torch.autograd.grad((actual * w).sum(), list(actual_module.parameters())),
                    torch.autograd.grad((expected * w).sum(), list(expected_module.parameters()))):
        torch.testing.assert_close(a, e, **tolerance)


CASES = [("s4d", dict(init="lin", disc="zoh")), ("s4d", dict(init="inv", disc="bilinear")),
         ("s4d", dict(init="lin", disc="zoh", n_ssm=1)), ("dplr", dict()), ("dplr", dict(n_ssm=None))]


@pytest.mark.parametrize("kind,kw", CASES)
@pytest.mark.parametrize("length", [1, 10, 17])
def test_kernel_equals_powers_of_the_state_matrix_forward_and_backward(kind, kw, length):
    k = _kernel(kind, **kw)
    with torch.no_grad():  # larger steps than the init so that the kernel decays visibly within L
        k.log_dt.uniform_(math.log(0.05), math.log(0.5))
    fast, ref = k(length), kernel_reference(k, length)
    torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-11)
    _assert_same_grads(fast, k, ref, k, rtol=1e-8, atol=1e-10)


def test_s4d_kernel_of_constant_parameters_equals_the_closed_form():
    """One mode with Λ = −a − ib, B = 1, C = c: K_l = 2·Re(c (e^{ΔΛ} − 1)/Λ · e^{ΔΛ l}) (ZOH) and
    2·Re(c Δ/(1 − ΔΛ/2) ((1 + ΔΛ/2)/(1 − ΔΛ/2))^l) (bilinear), written out in real arithmetic."""
    a, b, dt, c = 0.3, 2.0, 0.1, complex(0.7, -0.4)
    lam = complex(-a, -b)
    for disc in ("zoh", "bilinear"):
        k = S4DKernel(1, 2, disc=disc).double()
        with torch.no_grad():
            k.log_A_real.fill_(math.log(a))
            k.A_imag.fill_(b)
            k.log_dt.fill_(math.log(dt))
            k.C.copy_(torch.tensor([[[c.real, c.imag]]], dtype=f64))
        got = k(12)[0]
        expected = []
        for l in range(12):
            if disc == "zoh":
                value = c * (complex(math.exp(-a * dt) * math.cos(b * dt), -math.exp(-a * dt) * math.sin(b * dt)) - 1) / lam
                decay, phase = math.exp(-a * dt * l), -b * dt * l
                value *= complex(decay * math.cos(phase), decay * math.sin(phase))
            else:
                ratio = (1 + dt * lam / 2) / (1 - dt * lam / 2)
                value = c * dt / (1 - dt * lam / 2) * ratio ** l
            expected.append(2 * value.real)
        torch.testing.assert_close(got, torch.tensor(expected, dtype=f64), rtol=1e-12, atol=1e-14)


def test_dplr_without_low_rank_term_is_the_bilinear_s4d():
    torch.manual_seed(0)
    dplr, diag = DPLRKernel(2, 6, n_ssm=None).double(), S4DKernel(2, 6, disc="bilinear").double()
    with torch.no_grad():
        dplr.P.zero_()
        for name in ("log_A_real", "A_imag", "log_dt", "C", "B"):
            getattr(diag, name).copy_(getattr(dplr, name))
    torch.testing.assert_close(dplr(20), diag(20))


def test_legs_nplr_diagonalises_the_normal_part_of_hippo_legs():
    """LegS = S − p pᵀ with p = √(n + 1/2); S is rebuilt from the kept eigenpairs and their conjugates,
    and B, P are q = √(2n + 1) and p in that eigenbasis."""
    n = 8
    lam, p, b = hippo_legs_nplr(n)
    q = torch.sqrt(2 * torch.arange(n, dtype=f64) + 1)
    legs = -(torch.tril(q[:, None] * q[None, :], -1) + torch.diag(torch.arange(n, dtype=f64) + 1))
    S = legs + (q / math.sqrt(2))[:, None] * (q / math.sqrt(2))[None, :]
    assert lam.shape == (n // 2,) and torch.allclose(lam.real, torch.full_like(lam.real, -0.5))
    assert (lam.imag < 0).all()
    # eigenvectors of the normal S from (S + 1/2)/i being Hermitian: recover them and check everything
    mu, V = torch.linalg.eigh(-1j * (S + 0.5 * torch.eye(n, dtype=f64)).to(torch.complex128))
    Vk = V[:, mu < 0]
    rebuilt = Vk @ torch.diag(lam) @ Vk.mH + Vk.conj() @ torch.diag(lam.conj()) @ Vk.T
    torch.testing.assert_close(rebuilt.real, S, atol=1e-10, rtol=0)
    vb, vp = Vk.mH @ q.to(torch.complex128), Vk.mH @ (q / math.sqrt(2)).to(torch.complex128)
    # eigenvectors are defined up to a phase each: compare phase-free quantities
    torch.testing.assert_close(vb.abs(), b.abs())
    torch.testing.assert_close(vb * vp.conj(), b * p.conj())


@pytest.mark.parametrize("kind", ["s4d", "dplr"])
def test_s4conv_gradcheck_through_the_kernel(kind):
    torch.manual_seed(0)
    layer = S4Conv(2, 4, kernel=kind).double()
    u = torch.randn(1, 2, 8, dtype=f64, requires_grad=True)
    params = [p for p in layer.parameters()]
    assert torch.autograd.gradcheck(lambda x, *ps: layer(x), (u, *params), atol=1e-6)


def _step_all(layer, u):
    state, ys = layer.init_state(u.shape[0]), []
    for t in range(u.shape[-1]):
        y, state = layer.step(u[..., t], state)
        ys.append(y)
    return torch.stack(ys, -1)


@pytest.mark.parametrize("kernel,kw", [("s4d", dict(disc="zoh")), ("s4d", dict(disc="bilinear", init="inv")),
                                       ("dplr", dict())])
def test_step_equals_convolution(kernel, kw):
    torch.manual_seed(1)
    layer = S4Conv(4, 16, kernel=kernel, **kw)
    u = torch.randn(2, 4, 300)
    with torch.no_grad():
        torch.testing.assert_close(_step_all(layer, u), layer(u), rtol=0, atol=1e-5)  # fp32
        layer.double()
        torch.testing.assert_close(_step_all(layer, u.double()), layer(u.double()), rtol=0, atol=1e-11)


@pytest.mark.parametrize("kernel", ["s4d", "dplr"])
def test_a_state_carries_the_weights_it_was_started_with(kernel):
    """init_state takes the step coefficients from the current weights: a state started after an update
    steps like the updated forward, one started before it keeps the old weights' recurrence."""
    torch.manual_seed(2)
    layer = S4Conv(2, 4, kernel=kernel).double()
    u = torch.randn(1, 2, 5, dtype=f64)
    with torch.no_grad():
        before, old_state = layer(u), layer.init_state(1)
        layer.kernel.log_dt.add_(0.5)
        torch.testing.assert_close(_step_all(layer, u), layer(u))
        ys = []
        for t in range(u.shape[-1]):
            y, old_state = layer.step(u[..., t], old_state)
            ys.append(y)
        torch.testing.assert_close(torch.stack(ys, -1), before)
        assert not torch.allclose(layer(u), before)


def test_step_state_shapes_dtype_and_bad_input():
    layer = S4Conv(3, 8, kernel="dplr")
    state = layer.init_state(2, dtype=f64)
    assert state.x.shape == (2, 3, 2, 4) and state.x.dtype == f64  # the N/2 stored modes, [Re; Im]
    assert state.coefficients.read.shape == (3, 2, 2, 4) and state.coefficients.direct.dtype == f64
    assert S4Conv(3, 8).init_state(1).coefficients.low_rank is None  # S4D: no rank-1 term
    with pytest.raises(ValueError, match=r"S4Conv.step expects \(batch, 3\), got \(2, 4\)"):
        layer.step(torch.randn(2, 4), layer.init_state(2))


def test_hurwitz_eigenvalues_stay_stable_after_training_steps():
    torch.manual_seed(0)
    layer = S4Conv(4, 8, kernel="dplr", n_ssm=2)
    opt = torch.optim.Adam(layer.parameters(), lr=0.3)  # large updates
    u = torch.randn(2, 4, 32)
    for _ in range(5):
        opt.zero_grad()
        (layer(u) ** 2).mean().neg().backward()  # pushes towards larger outputs, i.e. slower decay
        opt.step()
    A = layer.kernel.state_matrix().detach()
    assert torch.isfinite(A).all() and layer.kernel.log_A_real.detach().std() > 0  # it moved
    assert torch.linalg.eigvals(A).real.max() < 0
    assert torch.linalg.eigvalsh(A + A.mH).max() < 0
    dA, _, _ = layer.kernel.discrete()
    assert torch.linalg.eigvals(dA.detach()).abs().max() < 1
    s4d = S4DKernel(4, 8)
    with torch.no_grad():
        s4d.log_A_real.fill_(-30.0)  # even a vanishing real part stays negative
    assert s4d.state_eigenvalues().real.max() < 0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="d_state must be even"):
        S4DKernel(2, 5)
    with pytest.raises(ValueError, match="n_ssm"):
        S4DKernel(4, 4, n_ssm=3)
    with pytest.raises(ValueError, match="init"):
        S4DKernel(2, 4, init="legs")
    with pytest.raises(ValueError, match="kernel must be"):
        S4Conv(2, 4, kernel="dss")
    with pytest.raises(ValueError, match=r"expects \(batch, 2, length\)"):
        S4Conv(2, 4)(torch.randn(1, 3, 8))


@pytest.mark.parametrize("kind,kw", CASES)
def test_recurrence_form_equals_the_discrete_system(kind, kw):
    """Ā = diag(d) − u vᵀ and B̄ from `recurrence` are the dense Ā, B̄ of `discrete`."""
    k = _kernel(kind, **kw)
    d, u, v, dB = k.recurrence()
    dA, dB_ref, _ = k.discrete()
    dense = torch.diag_embed(d) if u is None else torch.diag_embed(d) - u[:, :, None] * v[:, None, :]
    torch.testing.assert_close(dense, dA if dA.ndim == 3 else torch.diag_embed(dA), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dB, dB_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_ssm", [1, None])
def test_dplr_recurrence_is_conjugate_symmetric(n_ssm):
    """d, u, v, B̄ and the output row of the full DPLR state are [z, z̄] (stored half, then its conjugates),
    with the trained parameters perturbed: the property that lets generation carry only the stored half."""
    k = _kernel("dplr", n_ssm=n_ssm)
    with torch.no_grad():
        for p in k.parameters():
            p.add_(0.1 * torch.randn_like(p))
    n = k.d_state // 2
    for z in (*k.recurrence(), k.output()):
        torch.testing.assert_close(z[:, n:], z[:, :n].conj(), rtol=1e-12, atol=1e-12)


def test_chunked_cauchy_sums_equal_one_block_forward_and_backward():
    """The DPLR kernel with its Cauchy sums in recomputed blocks equals the single-block computation."""
    one, chunked = _kernel("dplr", n_ssm=None), _kernel("dplr", n_ssm=None)
    one.chunk, chunked.chunk = 0, 3
    k1, k2 = one(20), chunked(20)
    torch.testing.assert_close(k2, k1, rtol=1e-13, atol=1e-14)
    _assert_same_grads(k2, chunked, k1, one, rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="chunk must be"):
        DPLRKernel(2, 4, chunk=-1)


def test_dplr_init_is_hippo_legs():
    """S4's coupled DPLR form: diag([Λ, Λ̄]) − [P, P̄][P, P̄]ᴴ at init is HiPPO-LegS in another basis, so its
    eigenvalues are LegS's −1, −2, …, −N (the uncoupled half-state form has its slowest mode near −0.52)."""
    N = 8
    eig = torch.linalg.eigvals(DPLRKernel(1, N).state_matrix()[0].to(torch.complex128))
    slowest = torch.sort(eig.real, descending=True).values[:3]
    torch.testing.assert_close(slowest, torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64), rtol=0, atol=1e-3)
    torch.testing.assert_close(eig.imag, torch.zeros(N, dtype=torch.float64), rtol=0, atol=1e-3)
