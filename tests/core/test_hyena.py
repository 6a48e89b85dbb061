"""FFT causal convolution and the Hyena operator against plain O(L^2) references, forward and backward."""
import math

import pytest
import torch

from ssmkit.core.fftconv import direct_causal_conv, fft_causal_conv
from ssmkit.core.hyena import HyenaOperator, PositionalFeatures


def loop_conv(u, k, D):
    """The causal convolution as the double sum it is defined by."""
    B, H, L = u.shape
    y = torch.zeros_like(u)
    for t in range(L):
        for s in range(t + 1):
            y[..., t] += k[:, t - s] * u[..., s]
    return y + u * D[:, None]


@pytest.mark.parametrize("L", [1, 2, 3, 7, 64])
def test_fft_conv_matches_direct_sum(L):
    g = torch.Generator().manual_seed(L)
    u, k, D = torch.randn(2, 3, L, generator=g), torch.randn(3, L, generator=g), torch.randn(3, generator=g)
    ref = loop_conv(u, k, D) if L <= 7 else direct_causal_conv(u, k, D)
    torch.testing.assert_close(fft_causal_conv(u, k, D), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(direct_causal_conv(u, k, D), ref, rtol=1e-5, atol=1e-5)


def test_fft_conv_gradients_gradcheck_and_chunking():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, 5, 9, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(5, 9, dtype=torch.float64, generator=g, requires_grad=True)
    D = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    # one channel per chunk exercises the chunked forward and backward
    assert torch.autograd.gradcheck(lambda *a: fft_causal_conv(*a, max_chunk_bytes=1), (u, k, D))
    y = fft_causal_conv(u, k, D, max_chunk_bytes=1)
    w = torch.randn_like(y)
    grads = torch.autograd.grad((y * w).sum(), (u, k, D))
    ref = torch.autograd.grad((direct_causal_conv(u, k, D) * w).sum(), (u, k, D))
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)


def test_fft_conv_half_input_computes_in_fp32_and_is_causal():
    u, k = torch.randn(1, 4, 32), torch.randn(4, 32)
    y16 = fft_causal_conv(u.bfloat16(), k.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), direct_causal_conv(u.bfloat16().float(), k.bfloat16().float()),
                               rtol=2e-2, atol=5e-2)
    u2 = u.clone()
    u2[..., 20] += 1.0
    diff = (fft_causal_conv(u2, k) - fft_causal_conv(u, k)).abs().amax((0, 1))
    assert diff[:20].max() < 1e-5 and diff[20:].max() > 1e-3


def test_fft_conv_rejects_bad_shapes():
    with pytest.raises(ValueError, match="k must be"):
        fft_causal_conv(torch.randn(1, 3, 8), torch.randn(3, 7))
    with pytest.raises(ValueError, match="batch, channels, length"):
        fft_causal_conv(torch.randn(3, 8), torch.randn(3, 8))


def reference_hyena(op: HyenaOperator, u: torch.Tensor) -> torch.Tensor:
    """The operator recomputed from its parameters with plain ops: explicit short conv, direct long conv."""
    L, d = u.shape[1], op.d_model
    x = op.in_proj(u).transpose(1, 2)
    w, b = op.short_filter.weight[:, 0], op.short_filter.bias
    K = w.shape[-1]
    xp = torch.nn.functional.pad(x, (K - 1, 0))
    x = sum(w[:, j, None] * xp[..., j:j + L] for j in range(K)) + b[:, None]
    gates, v = [x[:, i * d:(i + 1) * d] for i in range(op.order)], x[:, op.order * d:]
    f = op.filter_fn
    h, t = f.pos_emb.z[0, :L], f.pos_emb.t[0, :L]  # closed forms checked in test_positional_features...
    for layer in f.implicit_filter:
        h = torch.sin(layer.freq * h) if hasattr(layer, "freq") else layer(h)
    h = h * (torch.exp(-t * f.modulation.deltas[0].abs()) + f.modulation.shift)
    for i in range(op.order - 1):
        k = h[:, i * d:(i + 1) * d].T
        v = direct_causal_conv(v * gates[op.order - 1 - i], k, f.bias[i * d:(i + 1) * d])
    return op.out_proj((v * gates[0]).transpose(1, 2))


@pytest.mark.parametrize("order", [2, 3])
def test_operator_matches_plain_reference_forward_and_backward(order):
    torch.manual_seed(order)
    op = HyenaOperator(8, l_max=20, order=order, filter_order=16, modulation_shift=0.05).double()
    u = torch.randn(2, 13, 8, dtype=torch.float64, requires_grad=True)
    y, ref = op(u), reference_hyena(op, u)
    torch.testing.assert_close(y, ref)
    w = torch.randn_like(y)
    params = [u, *op.parameters()]
    grads = torch.autograd.grad((y * w).sum(), params)
    ref_grads = torch.autograd.grad((ref * w).sum(), params)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_operator_gradcheck_tiny():
    torch.manual_seed(0)
    op = HyenaOperator(2, l_max=6, filter_order=4, num_inner_mlps=1).double()
    u = torch.randn(1, 5, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(op, (u,))


def test_operator_is_causal_and_refuses_inputs_past_l_max():
    torch.manual_seed(0)
    op = HyenaOperator(8, l_max=32, filter_order=8)
    u = torch.randn(1, 32, 8)
    u2 = u.clone()
    u2[:, 17] += 1
    diff = (op(u2) - op(u)).abs().amax((0, 2))
    assert diff[:17].max() < 1e-6 and diff[17:].max() > 1e-4
    with pytest.raises(ValueError, match="exceeds this Hyena operator's l_max 32"):
        op(torch.randn(1, 33, 8))


def test_positional_features_and_decay_buffers():
    pe = PositionalFeatures(5, 10)
    j = torch.arange(10.0)
    torch.testing.assert_close(pe.t[0, :, 0], torch.linspace(0, 1, 10))
    torch.testing.assert_close(pe.z[0, :, 3], -torch.sin(1e-4 * 2 * math.pi * j / 10))
    torch.testing.assert_close(pe.z[0, :, 2], torch.cos(2 * math.pi * j / 10))
    op = HyenaOperator(4, l_max=16, filter_order=8)
    deltas = op.filter_fn.modulation.deltas.flatten()
    assert deltas[0].item() == pytest.approx(math.log(0.01) / 1.5)
    assert deltas[-1].item() == pytest.approx(math.log(0.01) / 0.3)
    # the filter of the first L positions does not depend on L, but does depend on l_max
    torch.testing.assert_close(op.filter_fn.filter(16)[:, :5], op.filter_fn.filter(5))
    torch.manual_seed(0)
    a = HyenaOperator(4, l_max=16, filter_order=8)
    torch.manual_seed(0)
    b = HyenaOperator(4, l_max=64, filter_order=8)
    assert not torch.allclose(a.filter_fn.filter(8), b.filter_fn.filter(8))


def test_short_conv_equals_the_causal_depthwise_conv1d():
    torch.manual_seed(0)
    op = HyenaOperator(4, l_max=16, filter_order=8, short_filter_order=4).double()
    x = torch.randn(2, 12, 11, dtype=torch.float64, requires_grad=True)
    ours, ref = op._short_conv(x), op.short_filter(x)[..., :11]
    torch.testing.assert_close(ours, ref)
    w = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad((ours * w).sum(), (x, op.short_filter.weight)),
                    torch.autograd.grad((ref * w).sum(), (x, op.short_filter.weight))):
        torch.testing.assert_close(a, b)
