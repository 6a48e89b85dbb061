"""Tests of ssmkit.core.mamba: mamba_ssm-compatible names/init, step == forward, second branches, LM."""
import math

import pytest
import torch
import torch.nn.functional as F

from ssmkit.core.mamba import (
    FlipOrder,
    Mamba,
    MambaBlock,
    MambaLM,
    MambaState,
    SequenceOrder,
    StridedOrder,
)
from ssmkit.core.layers import RMSNorm, causal_conv1d
from ssmkit.core.scan import selective_scan

D_MODEL, N_STATE = 16, 4  # d_inner 32, dt_rank 1


def _expected_shapes(d_model=D_MODEL, d_state=N_STATE, d_conv=4, expand=2, suffixes=("",)):
    e, r = expand * d_model, math.ceil(d_model / 16)
    shapes = {"in_proj.weight": (2 * e, d_model), "out_proj.weight": (d_model, e)}
    for sfx in suffixes:
        a_log = "A_log" if sfx == "" else "A_b_log"
        shapes.update({
            f"conv1d{sfx}.weight": (e, 1, d_conv), f"conv1d{sfx}.bias": (e,),
            f"x_proj{sfx}.weight": (r + 2 * d_state, e),
            f"dt_proj{sfx}.weight": (e, r), f"dt_proj{sfx}.bias": (e,),
            a_log: (e, d_state), f"D{sfx}": (e,),
        })
    return shapes


def _branch_by_hand(m, x, z, sfx):
    """One direction of the mixer written out from the module's submodules (x, z: (batch, d_inner, L))."""
    conv, x_proj, dt_proj = (getattr(m, n + sfx) for n in ("conv1d", "x_proj", "dt_proj"))
    a_log, d = getattr(m, "A_log" if sfx == "" else "A_b_log"), getattr(m, "D" + sfx)
    length = x.shape[-1]
    x = F.silu(F.conv1d(x, conv.weight, conv.bias, padding=m.d_conv - 1, groups=m.d_inner)[..., :length])
    dbc = torch.einsum("bel,ke->bkl", x, x_proj.weight)
    dt, b, c = dbc.split([m.dt_rank, m.d_state, m.d_state], dim=1)
    delta = torch.einsum("brl,er->bel", dt, dt_proj.weight)
    return selective_scan(x, delta, -torch.exp(a_log), b, c, D=d, z=z, delta_bias=dt_proj.bias,
                          delta_softplus=True, backend="ref")


def _xz(m, x):
    xz = torch.einsum("bld,kd->bkl", x, m.in_proj.weight)
    return xz.chunk(2, dim=1)


def _out(m, y):
    return torch.einsum("bel,de->bld", y, m.out_proj.weight)


# ------------------------------------------------------------------------------------------------
# parameters and initialisation


@pytest.mark.parametrize("branch", [None, "flip"])
def test_parameter_names_shapes_and_flags(branch):
    m = Mamba(D_MODEL, d_state=N_STATE, branch_order=branch, dtype=torch.float64)
    suffixes = ("",) if branch is None else ("", "_b")
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert got == _expected_shapes(suffixes=suffixes)
    for sfx in suffixes:
        a_log, d = getattr(m, "A_log" if sfx == "" else "A_b_log"), getattr(m, "D" + sfx)
        assert a_log.dtype == d.dtype == torch.float32  # fp32 whatever the module dtype
        assert a_log._no_weight_decay and d._no_weight_decay
        assert getattr(m, "dt_proj" + sfx).bias._no_reinit
        assert getattr(m, "dt_proj" + sfx).weight.dtype == torch.float64


def test_optional_biases_and_explicit_rank():
    m = Mamba(40, d_state=8, d_conv=3, expand=1.5, dt_rank=5, bias=True, conv_bias=False)
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert got == {
        "A_log": (60, 8), "D": (60,), "in_proj.weight": (120, 40), "in_proj.bias": (120,),
        "conv1d.weight": (60, 1, 3), "x_proj.weight": (21, 60), "dt_proj.weight": (60, 5),
        "dt_proj.bias": (60,), "out_proj.weight": (40, 60), "out_proj.bias": (40,),
    }
    assert Mamba(40).dt_rank == 3  # "auto" = ceil(40 / 16)


@pytest.mark.parametrize("branch", [None, StridedOrder(2)])
def test_initialisation_ranges(branch):
    torch.manual_seed(0)
    dt_min, dt_max, scale = 0.002, 0.05, 0.7
    m = Mamba(64, d_state=N_STATE, dt_min=dt_min, dt_max=dt_max, dt_scale=scale, branch_order=branch)
    for sfx in ("",) if branch is None else ("", "_b"):
        dt_proj = getattr(m, "dt_proj" + sfx)
        dt = F.softplus(dt_proj.bias.double())
        assert dt.min() >= dt_min * (1 - 1e-5) and dt.max() <= dt_max * (1 + 1e-5)
        assert dt.max() / dt.min() > 5  # log-uniform over the range, not a constant
        bound = m.dt_rank ** -0.5 * scale
        assert dt_proj.weight.abs().max() <= bound and dt_proj.weight.abs().max() > 0.5 * bound
        a_log = getattr(m, "A_log" if sfx == "" else "A_b_log")
        torch.testing.assert_close(a_log, torch.log(torch.arange(1.0, N_STATE + 1)).expand(128, N_STATE))
        torch.testing.assert_close(getattr(m, "D" + sfx), torch.ones(128))


def test_dt_floor_and_constant_init():
    m = Mamba(D_MODEL, dt_min=1e-6, dt_max=2e-4, dt_init_floor=1e-4, dt_init="constant")
    assert F.softplus(m.dt_proj.bias.double()).min() >= 1e-4 * (1 - 1e-5)
    torch.testing.assert_close(m.dt_proj.weight, torch.full_like(m.dt_proj.weight, m.dt_rank ** -0.5))
    with pytest.raises(ValueError, match="dt_init"):
        Mamba(D_MODEL, dt_init="normal")


# ------------------------------------------------------------------------------------------------
# forward against an independent construction, and against mambapy


def test_forward_matches_hand_construction():
    torch.manual_seed(1)
    m = Mamba(D_MODEL, d_state=N_STATE, dtype=torch.float64)
    x = torch.randn(2, 9, D_MODEL, dtype=torch.float64)
    xs, z = _xz(m, x)
    torch.testing.assert_close(m(x), _out(m, _branch_by_hand(m, xs, z, "")), rtol=1e-10, atol=1e-10)


def test_mambapy_oracle():
    mambapy = pytest.importorskip("mambapy.mamba")
    torch.manual_seed(2)
    ours = Mamba(D_MODEL, d_state=N_STATE)
    theirs = mambapy.MambaBlock(mambapy.MambaConfig(d_model=D_MODEL, n_layers=1, d_state=N_STATE,
                                                    expand_factor=2, d_conv=4))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 11, D_MODEL)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# one-step generation


def _step_through(module, xs, state):
    """Outputs of `module.step` over xs[:, t] from `state`, the state passed on from step to step."""
    ys = []
    for t in range(xs.shape[1]):
        y, state = module.step(xs[:, t], state)
        ys.append(y)
    return torch.stack(ys, dim=1)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("backend", [None, "ref"])
@pytest.mark.parametrize("biases", [False, True])
def test_step_matches_forward(dtype, tol, backend, biases):
    torch.manual_seed(3)
    m = Mamba(D_MODEL, d_state=N_STATE, backend=backend, bias=biases, conv_bias=not biases, dtype=dtype)
    x = torch.randn(3, 10, D_MODEL, dtype=dtype)
    state = m.init_state(3)
    assert isinstance(state, MambaState)
    assert state.conv_state.shape == (3, 32, 4) and state.ssm_state.shape == (3, 32, N_STATE)
    assert state.conv_state.dtype == dtype
    assert state.ssm_state.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(_step_through(m, x, state), m(x), rtol=tol, atol=tol)
        y3, _ = m.step(x[:, :1], m.init_state(3))  # (batch, 1, d_model) keeps its rank
    assert y3.shape == (3, 1, D_MODEL)


def test_block_stack_step_matches_forward():
    torch.manual_seed(4)
    blocks = torch.nn.ModuleList(
        MambaBlock(D_MODEL, norm=norm, d_state=N_STATE, layer_idx=i, dtype=torch.float64)
        for i, norm in enumerate(["rms", "layer", "rms"])
    )
    x = torch.randn(2, 8, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        hidden, residual = x, None
        for blk in blocks:
            hidden, residual = blk(hidden, residual)
        states, streams = [blk.init_state(2) for blk in blocks], []
        for t in range(x.shape[1]):
            h_r = (x[:, t], None)
            for i, blk in enumerate(blocks):
                h_r, states[i] = blk.step(h_r, states[i])
            streams.append(h_r[0] + h_r[1])
        torch.testing.assert_close(torch.stack(streams, 1), hidden + residual, rtol=1e-10, atol=1e-10)


def test_block_is_add_norm_mixer():
    torch.manual_seed(5)
    blk = MambaBlock(D_MODEL, d_state=N_STATE, drop_path=0.3, dtype=torch.bfloat16).eval()
    assert type(blk.drop_path).__name__ == "DropPath" and isinstance(blk.norm, RMSNorm)
    hidden = torch.randn(2, 5, D_MODEL, dtype=torch.bfloat16)
    residual = torch.randn(2, 5, D_MODEL)
    out, res = blk(hidden, residual)
    assert res.dtype == torch.float32 and out.dtype == torch.bfloat16
    torch.testing.assert_close(res, hidden.float() + residual)
    torch.testing.assert_close(out, blk.mixer(blk.norm(res.bfloat16())))
    _, first = blk(hidden)  # first block: the residual is the input itself
    torch.testing.assert_close(first, hidden.float())
    custom = Mamba(D_MODEL, d_state=2)
    assert MambaBlock(D_MODEL, mixer=custom).mixer is custom
    with pytest.raises(TypeError):
        MambaBlock(D_MODEL, mixer=custom, d_state=2)
    with pytest.raises(ValueError, match="norm"):
        MambaBlock(D_MODEL, norm="batch")


def test_rmsnorm():
    norm = RMSNorm(6, eps=1e-5)
    assert list(norm.state_dict()) == ["weight"]
    x = torch.randn(3, 6)
    torch.testing.assert_close(norm(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))


def test_lm_step_matches_forward_and_init():
    torch.manual_seed(6)
    lm = MambaLM(vocab_size=13, d_model=D_MODEL, n_layer=2, d_state=N_STATE).double()
    assert lm.embedding.weight.shape == (16, D_MODEL)  # vocab padded to a multiple of 8
    assert lm.lm_head.weight is lm.embedding.weight
    assert len(lm.layers) == 2 and isinstance(lm.layers[0], MambaBlock)
    ids = torch.randint(0, 13, (2, 9))
    with torch.no_grad():
        logits = lm(ids)
        assert logits.shape == (2, 9, 13)
        stepped = _step_through(lm, ids, lm.init_state(2))
    torch.testing.assert_close(stepped, logits, rtol=1e-10, atol=1e-10)

    # mamba_ssm's _init_weights: embedding N(0, 0.02); out_proj kaiming-uniform / sqrt(n_layer);
    # the dt bias (marked _no_reinit) keeps its inverse-softplus init
    big = MambaLM(vocab_size=1000, d_model=64, n_layer=4, tie_embeddings=False)
    assert big.lm_head.weight is not big.embedding.weight
    assert abs(big.embedding.weight.std().item() - 0.02) < 0.002
    bound = 1 / math.sqrt(128) / math.sqrt(4)
    w = big.layers[0].mixer.out_proj.weight
    assert 0.9 * bound < w.abs().max() <= bound
    dt = F.softplus(big.layers[1].mixer.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)


# ------------------------------------------------------------------------------------------------
# the causal convolution


@pytest.mark.parametrize("reverse", [False, True])
def test_causal_conv1d_packed_sequences_equal_separate_ones(reverse):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 6, 12, generator=g, dtype=torch.float64)
    w, b = torch.randn(6, 1, 4, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    seq_idx = torch.tensor([[0] * 5 + [1] * 2 + [2] * 5])
    packed = causal_conv1d(x, w, b, reverse=reverse, seq_idx=seq_idx)
    parts = [causal_conv1d(x[..., a:z], w, b, reverse=reverse) for a, z in ((0, 5), (5, 7), (7, 12))]
    torch.testing.assert_close(packed, torch.cat(parts, -1))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_causal_conv1d_matches_grouped_conv1d(reverse, bias):
    g = torch.Generator().manual_seed(4)
    base = torch.randn(2, 9, 12, generator=g, dtype=torch.float64)
    w = torch.randn(6, 1, 4, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(6, generator=g, dtype=torch.float64).requires_grad_() if bias else None
    x = base.requires_grad_().transpose(1, 2)[:, :6]  # a non-contiguous (batch, dim, L) view, as in Mamba

    def grouped(x, w, b):  # causal on the (flipped) sequence, as a depthwise nn.Conv1d computes it
        x = x.flip(-1) if reverse else x
        y = F.conv1d(x, w, b, padding=3, groups=6)[..., :9]
        return y.flip(-1) if reverse else y

    got, want = causal_conv1d(x, w, b, reverse=reverse), grouped(x, w, b)
    torch.testing.assert_close(got, want)
    probe = torch.randn(want.shape, generator=g, dtype=torch.float64)
    inputs = [base, w] + ([b] if bias else [])
    for a, e in zip(torch.autograd.grad((got * probe).sum(), inputs), torch.autograd.grad((want * probe).sum(), inputs)):
        torch.testing.assert_close(a, e)


# ------------------------------------------------------------------------------------------------
# the second branch


@pytest.mark.parametrize("divide_out", [True, False])
def test_flip_branch_matches_hand_construction(divide_out):
    torch.manual_seed(7)
    m = Mamba(D_MODEL, d_state=N_STATE, branch_order="flip", divide_out=divide_out, dtype=torch.float64)
    assert isinstance(m.branch_order, FlipOrder)
    x = torch.randn(2, 7, D_MODEL, dtype=torch.float64)
    xs, z = _xz(m, x)
    y_f = _branch_by_hand(m, xs, z, "")
    y_b = _branch_by_hand(m, xs.flip(-1), z.flip(-1), "_b").flip(-1)
    y = (y_f + y_b) / 2 if divide_out else y_f + y_b
    torch.testing.assert_close(m(x), _out(m, y), rtol=1e-10, atol=1e-10)


def test_flip_branch_is_bidirectional():
    torch.manual_seed(8)
    m = Mamba(D_MODEL, d_state=N_STATE, branch_order="flip", dtype=torch.float64)
    x = torch.randn(2, 7, D_MODEL, dtype=torch.float64)
    # reversing the input equals reversing the output of the mixer with its directions swapped
    names = {"conv1d": "conv1d_b", "x_proj": "x_proj_b", "dt_proj": "dt_proj_b", "A_log": "A_b_log", "D": "D_b"}
    names.update({b: a for a, b in names.items()})
    swapped = Mamba(D_MODEL, d_state=N_STATE, branch_order="flip", dtype=torch.float64)
    swapped.load_state_dict({
        ".".join([names.get(k.split(".")[0], k.split(".")[0]), *k.split(".")[1:]]): v
        for k, v in m.state_dict().items()
    })
    torch.testing.assert_close(m(x.flip(1)), swapped(x).flip(1), rtol=1e-10, atol=1e-10)
    # the first output depends on the last token with the flip branch, and not without it
    x2 = x.clone()
    x2[:, -1] += 1.0
    assert (m(x2)[:, 0] - m(x)[:, 0]).abs().max() > 1e-6
    causal = Mamba(D_MODEL, d_state=N_STATE, dtype=torch.float64)
    torch.testing.assert_close(causal(x2)[:, :-1], causal(x)[:, :-1], rtol=0, atol=0)


def test_step_refuses_non_causal_branch():
    m = Mamba(D_MODEL, d_state=N_STATE, branch_order="flip")
    with pytest.raises(RuntimeError, match="no recurrent step"):
        m.init_state(2)
    with pytest.raises(RuntimeError, match="no recurrent step"):
        m.step(torch.randn(2, D_MODEL), Mamba(D_MODEL, d_state=N_STATE).init_state(2))


def test_branch_order_passed_per_call():
    """forward(x, branch_order=...) scans that call's second branch in the given order, as a mixer built
    with that order does, and leaves the built order in place; a mixer without a second branch refuses it."""
    torch.manual_seed(11)
    m = Mamba(D_MODEL, d_state=N_STATE, branch_order="flip", divide_out=False, dtype=torch.float64)
    strided = Mamba(D_MODEL, d_state=N_STATE, branch_order=StridedOrder(3), divide_out=False, dtype=torch.float64)
    strided.load_state_dict(m.state_dict())
    x = torch.randn(2, 7, D_MODEL, dtype=torch.float64)
    torch.testing.assert_close(m(x, branch_order=StridedOrder(3)), strided(x), rtol=0, atol=0)
    torch.testing.assert_close(strided(x, branch_order="flip"), m(x), rtol=0, atol=0)
    assert isinstance(m.branch_order, FlipOrder) and isinstance(strided.branch_order, StridedOrder)
    block = MambaBlock(D_MODEL, mixer=m).double()
    torch.testing.assert_close(block(x, branch_order=StridedOrder(3))[0], strided(block.norm(x)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="no second branch"):
        Mamba(D_MODEL, d_state=N_STATE)(x.float(), branch_order="flip")
    with pytest.raises(ValueError, match="branch_order must be"):
        m(x, branch_order="reverse")


def test_strided_order_indices():
    order = StridedOrder(3)
    assert order.index(7, torch.device("cpu")).tolist() == [0, 3, 6, 1, 4, 7, 2, 5, 8]
    assert order.index(6, torch.device("cpu")).tolist() == [0, 3, 1, 4, 2, 5]
    assert order.index(2, torch.device("cpu")).tolist() == [0, 1, 2]  # L < R: identity plus padding
    assert StridedOrder(1).index(5, torch.device("cpu")).tolist() == [0, 1, 2, 3, 4]
    assert FlipOrder().index(4, torch.device("cpu")).tolist() == [3, 2, 1, 0]
    x = torch.arange(1.0, 8.0).expand(2, 3, 7)  # values 1..7, so padding zeros are visible
    g = order.gather(x)
    assert g[0, 0].tolist() == [1, 4, 7, 2, 5, 0, 3, 6, 0]
    torch.testing.assert_close(order.scatter(g, 7), x)
    assert order._indices(7, torch.device("cpu")) is order._indices(7, torch.device("cpu"))  # cached
    with pytest.raises(ValueError):
        StridedOrder(0)


def test_custom_order_is_checked():
    class Broken(SequenceOrder):
        def index(self, length, device):
            return torch.zeros(length, dtype=torch.long, device=device)

    with pytest.raises(ValueError, match="permutation"):
        Broken().gather(torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match="branch_order"):
        Mamba(D_MODEL, branch_order="reverse")


@pytest.mark.parametrize("length", [7, 9, 2])
def test_strided_branch_matches_explicit_reordering(length):
    torch.manual_seed(9)
    rate = 3
    m = Mamba(D_MODEL, d_state=N_STATE, branch_order=StridedOrder(rate), divide_out=False,
              dtype=torch.float64)
    x = torch.randn(2, length, D_MODEL, dtype=torch.float64)
    xs, z = _xz(m, x)
    rows = -(-length // rate)
    padded = rows * rate
    idx = torch.arange(padded).view(rows, rate).t().reshape(-1)
    pad = (0, padded - length)
    y_r = _branch_by_hand(m, F.pad(xs, pad)[..., idx], F.pad(z, pad)[..., idx], "_b")
    y_b = torch.empty_like(y_r)
    y_b[..., idx] = y_r
    y = _branch_by_hand(m, xs, z, "") + y_b[..., :length]
    torch.testing.assert_close(m(x), _out(m, y), rtol=1e-10, atol=1e-10)


def test_rate_one_with_copied_parameters_doubles_the_forward_branch():
    torch.manual_seed(10)
    m = Mamba(D_MODEL, d_state=N_STATE, branch_order=StridedOrder(1), divide_out=False)
    with torch.no_grad():
        for a in ("conv1d", "x_proj", "dt_proj"):
            getattr(m, a + "_b").load_state_dict(getattr(m, a).state_dict())
        m.A_b_log.copy_(m.A_log)
        m.D_b.copy_(m.D)
    plain = Mamba(D_MODEL, d_state=N_STATE)
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if "_b" not in k})
    with torch.no_grad():
        plain.out_proj.weight.mul_(2)
    x = torch.randn(2, 6, D_MODEL)
    torch.testing.assert_close(m(x), plain(x), rtol=1e-5, atol=1e-5)


def test_branch_backward_reaches_both_directions():
    m = Mamba(D_MODEL, d_state=N_STATE, branch_order=StridedOrder(2))
    m(torch.randn(2, 5, D_MODEL)).square().mean().backward()
    for name in ("in_proj.weight", "conv1d.weight", "conv1d_b.weight", "x_proj_b.weight", "dt_proj_b.bias",
                 "A_log", "A_b_log", "D_b", "out_proj.weight"):
        grad = m.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


# ------------------------------------------------------------------------------------------------
# bad input


def test_bad_input_names_the_shape():
    m = Mamba(D_MODEL, d_state=N_STATE)
    with pytest.raises(ValueError, match=r"\(batch, length, 16\), got \(2, 5, 8\)"):
        m(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"\(5, 16\)"):
        m(torch.randn(5, D_MODEL))
    with pytest.raises(ValueError, match=r"\(2, 3, 16\)"):
        m.step(torch.randn(2, 3, D_MODEL), m.init_state(2))
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        MambaLM(10, D_MODEL, 1)(torch.zeros(2, 3, 4, dtype=torch.long))


@pytest.mark.gpu
def test_gpu_forward_step_and_gradients_match_cpu():
    """On CUDA the mixer runs the Triton scan (forward) and the Triton decode step (step): both agree
    with the CPU chunked path, and the gradients of forward agree too."""
    torch.manual_seed(0)
    cpu = MambaLM(vocab_size=11, d_model=64, n_layer=2)
    gpu = MambaLM(vocab_size=11, d_model=64, n_layer=2).cuda()
    gpu.load_state_dict(cpu.state_dict())
    ids = torch.randint(0, 11, (2, 40))
    want = cpu(ids)
    got = gpu(ids.cuda())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    want.square().mean().backward()
    got.square().mean().backward()
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-3, atol=1e-5, msg=name)
    with torch.no_grad():
        steps = _step_through(gpu, ids.cuda(), gpu.init_state(2))
    torch.testing.assert_close(steps.cpu(), want.detach(), rtol=1e-4, atol=1e-4)
