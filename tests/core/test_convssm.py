"""ConvS5: parallel scan vs sequential steps, vs an independent per-pixel SSM, state carry, init, bad input."""
import pytest
import torch

from ssmkit.core.convssm import ConvS5Layer, convssm_scan, convssm_step, hippo_n_init

f64, c128 = torch.float64, torch.complex128


def make_layer(selective, U=3, P=4, seed=0):
    torch.manual_seed(seed)
    m = ConvS5Layer(U, P, k_B=3, k_C=3, k_D=3, selective=selective).double()
    if selective:  # larger than the init so that Δ visibly varies over frames and pixels
        torch.nn.init.normal_(m.step_conv.weight, std=0.3)
    return m


@pytest.mark.parametrize("selective", [False, True])
def test_parallel_equals_step_loop_forward_and_grads(selective):
    m = make_layer(selective)
    u = torch.randn(2, 9, 3, 5, 4, dtype=f64, requires_grad=True)
    h0 = torch.randn(2, 4, 5, 4, dtype=c128, requires_grad=True)
    y, last = m(u, initial_state=h0)
    state, ys = h0, []
    for t in range(u.shape[1]):
        y_t, state = m.step(u[:, t], state)
        ys.append(y_t)
    y_seq = torch.stack(ys, 1)
    assert y.shape == u.shape and y.dtype == f64 and last.shape == (2, 4, 5, 4) and last.dtype == c128
    torch.testing.assert_close(y, y_seq)
    torch.testing.assert_close(last, state)
    w, wl = torch.randn_like(y), torch.randn_like(last)
    loss = lambda y, s: (y * w).sum() + (s * wl.conj()).real.sum()  # noqa: E731
    params = [u, h0] + list(m.parameters())
    g_par = torch.autograd.grad(loss(y, last), params)
    g_seq = torch.autograd.grad(loss(y_seq, state), params)
    for (name, _), a, b in zip([("u", 0), ("h0", 0)] + list(m.named_parameters()), g_par, g_seq):
        torch.testing.assert_close(a, b, msg=lambda msg: f"grad of {name}: {msg}")


def test_1x1_kernels_equal_per_pixel_diagonal_ssm():
    torch.manual_seed(1)
    batch, L, U, P, U_out, H, W = 2, 6, 3, 4, 2, 3, 5
    Lambda = torch.complex(-torch.rand(P, dtype=f64) - 0.1, torch.randn(P, dtype=f64))
    Bk = torch.randn(P, U, 1, 1, dtype=c128)
    Ck = torch.randn(U_out, P, 1, 1, dtype=c128)
    Dk = torch.randn(U_out, U, 1, 1, dtype=f64)
    log_step = torch.randn(P, dtype=f64) * 0.5 - 1
    u = torch.randn(batch, L, U, H, W, dtype=f64)
    y, last = convssm_scan(u, Lambda, Bk, Ck, log_step, Dk)
    # independently: every pixel is an S5 layer, x_t = Λ̄ x_{t-1} + B̄ u_t, y_t = 2 Re(C x_t) + D u_t
    step = torch.exp(log_step)
    lam_bar = torch.exp(Lambda * step)
    B_bar = ((lam_bar - 1) / Lambda)[:, None] * Bk[:, :, 0, 0]
    x = torch.zeros(batch, H, W, P, dtype=c128)
    for t in range(L):
        ut = u[:, t].permute(0, 2, 3, 1)  # (batch, H, W, U)
        x = lam_bar * x + ut.to(c128) @ B_bar.T
        yt = 2 * (x @ Ck[:, :, 0, 0].T).real + ut @ Dk[:, :, 0, 0].T
        torch.testing.assert_close(y[:, t], yt.permute(0, 3, 1, 2))
    torch.testing.assert_close(last, x.permute(0, 3, 1, 2))


@pytest.mark.parametrize("selective", [False, True])
def test_split_sequence_with_carried_state_equals_whole(selective):
    m = make_layer(selective)
    u = torch.randn(1, 11, 3, 4, 3, dtype=f64)
    with torch.no_grad():
        y, last = m(u)
        y1, s = m(u[:, :4])
        y2, last2 = m(u[:, 4:], initial_state=s)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)
    torch.testing.assert_close(last2, last)


@pytest.mark.parametrize("selective", [False, True])
def test_init_state_steps_like_the_scan_from_zeros(selective):
    """The zero state of init_state is (batch, P, 1, 1) and spreads over the frame at the first step."""
    m = make_layer(selective)
    u = torch.randn(2, 5, 3, 4, 3, dtype=f64)
    state = m.init_state(2)
    assert state.shape == (2, 4, 1, 1) and state.dtype == c128 and not state.any()
    assert ConvS5Layer(3, 4).init_state(1).dtype == torch.complex64
    with torch.no_grad():
        y, last = m(u)
        ys = []
        for t in range(u.shape[1]):
            y_t, state = m.step(u[:, t], state)
            ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), y)
    torch.testing.assert_close(state, last)


def test_gradcheck_scan():
    torch.manual_seed(2)
    P, U = 2, 1
    args = [torch.randn(1, 3, U, 3, 2, dtype=f64),
            torch.complex(-torch.rand(P, dtype=f64) - 0.2, torch.randn(P, dtype=f64)),
            torch.randn(P, U, 3, 3, dtype=c128), torch.randn(1, P, 1, 1, dtype=c128),
            torch.randn(P, dtype=f64) * 0.3 - 1, torch.randn(1, U, 1, 1, dtype=f64),
            torch.randn(1, P, 3, 2, dtype=c128)]
    args = [a.requires_grad_() for a in args]
    assert torch.autograd.gradcheck(lambda *a: convssm_scan(*a)[0], args)


def test_hippo_n_init():
    P = 8
    Lambda, V = hippo_n_init(P)
    assert Lambda.shape == (P,) and V.shape == (2 * P, P)
    assert (Lambda.real < 0).all()
    # together with their conjugates they are the whole spectrum of the normal HiPPO-LegS matrix
    n = torch.arange(2 * P, dtype=f64)
    q = torch.sqrt(2 * n + 1)
    A = torch.tril(-q[:, None] * q[None, :], -1) - torch.diag(n + 1)
    S = A + torch.sqrt(n + 0.5)[:, None] * torch.sqrt(n + 0.5)[None, :]
    spectrum = torch.linalg.eigvals(S)
    key = lambda z: z[torch.argsort(z.imag)]  # noqa: E731
    torch.testing.assert_close(key(torch.cat([Lambda, Lambda.conj()])), key(spectrum))
    torch.testing.assert_close(V.conj().T @ V, torch.eye(P, dtype=c128))
    m = ConvS5Layer(2, P)
    assert (m._params()[0].real < 0).all()


def _args(**change):
    P, U = 4, 3
    args = dict(u=torch.randn(2, 5, U, 6, 7), Lambda=torch.complex(-torch.ones(P), torch.ones(P)),
                B_kernel=torch.randn(P, U, 3, 3, dtype=torch.complex64),
                C_kernel=torch.randn(U, P, 3, 3, dtype=torch.complex64), log_step=torch.zeros(P),
                D_kernel=torch.randn(U, U, 1, 1), initial_state=None)
    args.update(change)
    return args


@pytest.mark.parametrize("change, pattern", [
    (dict(u=torch.randn(2, 3, 6, 7)), r"u has shape \(2, 3, 6, 7\); expected real \(batch, L, U, H, W\)"),
    (dict(Lambda=-torch.ones(4)), r"Lambda has shape \(4,\); expected complex \(P,\)"),
    (dict(B_kernel=torch.randn(4, 2, 3, 3, dtype=torch.complex64)),
     r"B_kernel has shape \(4, 2, 3, 3\); expected complex \(4, 3, k, k\)"),
    (dict(C_kernel=torch.randn(3, 4, 2, 2, dtype=torch.complex64)), r"C_kernel has shape \(3, 4, 2, 2\).*k odd"),
    (dict(D_kernel=torch.randn(2, 3, 1, 1)), r"D_kernel has shape \(2, 3, 1, 1\); expected real \(3, 3, k, k\)"),
    (dict(log_step=torch.zeros(2, 5, 4, 6)), r"log_step has shape \(2, 5, 4, 6\); expected \(P,\) = \(4,\), "
                                              r"or selective \(2, 5, 4, 6, 7\)"),
    (dict(initial_state=torch.zeros(2, 4, 6, 6, dtype=torch.complex64)),
     r"initial_state has shape \(2, 4, 6, 6\); expected complex \(2, 4, 6, 7\)"),
])
def test_bad_input_names_shapes(change, pattern):
    with pytest.raises(ValueError, match=pattern):
        convssm_scan(**_args(**change))


def test_bad_step_input_and_layer_kernel():
    a = _args()
    with pytest.raises(ValueError, match=r"state has shape \(2, 4, 6, 6\); expected complex \(2, 4, 6, 7\)"):
        convssm_step(torch.zeros(2, 4, 6, 6, dtype=torch.complex64), a["u"][:, 0], a["Lambda"], a["B_kernel"],
                     a["C_kernel"], a["log_step"])
    with pytest.raises(ValueError, match="k_B must be odd"):
        ConvS5Layer(3, 4, k_B=2)
