"""Moving digits data, the ConvS5 next-frame predictor (causality, step == scan, rollout) and frame SSIM."""
import numpy as np
import pytest
import torch

import ssmkit
from ssmkit.errors import DataError
from ssmkit.vision.convs5 import ConvS5Config, ConvS5Predictor, convs5_moving_digits_tiny
from ssmkit.vision.data import write_idx
from ssmkit.vision.metrics import frame_ssim
from ssmkit.vision.moving_digits import MovingDigits, load_digit_images


@pytest.fixture(scope="module")
def images():
    return load_digit_images(10)


# ----------------------------------------------------------------------------------------------
# data


def test_moving_digits_deterministic_in_range_and_digits_inside(images):
    ds = MovingDigits(8, seq_len=10, frame_size=32, n_digits=2, digit_size=10, seed=3, images=images)
    a, b = ds[5], MovingDigits(8, seq_len=10, frame_size=32, n_digits=2, digit_size=10, seed=3, images=images)[5]
    assert a.shape == (10, 1, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and torch.equal(ds[5], a)
    assert not torch.equal(ds[4], a)
    assert not torch.equal(MovingDigits(8, seq_len=10, frame_size=32, digit_size=10, seed=4, images=images)[5], a)
    assert a.min() >= 0 and a.max() <= 1 and a.max() > 0.5
    for i in range(len(ds)):
        which, pos = ds.trajectories(i)
        assert pos.min() >= 0 and pos.max() <= 32 - 10
        # every digit is drawn whole: its mass is in every frame (max-composited, so at least the largest digit's)
        frames = ds[i]
        masses = ds.images[torch.from_numpy(which)].sum((1, 2))
        assert (frames.sum((1, 2, 3)) >= masses.max() - 1e-4).all()
        # the digits move (speed >= 1 px/frame) and bounce instead of leaving
        assert (np.abs(np.diff(pos, axis=1)).sum(-1) > 0).any()
    with pytest.raises(IndexError):
        ds[8]


def test_train_and_eval_splits_use_disjoint_images_and_digits_are_upsampled(images):
    assert images.shape[1:] == (10, 10) and images.min() >= 0 and images.max() <= 1
    train = MovingDigits(4, images=images, digit_size=10, split=0)
    evals = MovingDigits(4, images=images, digit_size=10, split=1)
    assert len(train.images) + len(evals.images) == len(images)
    assert torch.equal(torch.cat([train.images, evals.images]), images)


def test_fashion_digits_from_idx_files(tmp_path):
    """Fashion-MNIST digits come through the one IDX reader: exact at their own size, resized otherwise."""
    data = (np.arange(2 * 4 * 4) * 7 % 256).astype(np.uint8).reshape(2, 4, 4)
    write_idx(tmp_path / "train-images-idx3-ubyte", data)
    torch.testing.assert_close(load_digit_images(4, "auto", tmp_path), torch.from_numpy(data).float() / 255.0)
    assert load_digit_images(6, "fashion", tmp_path).shape == (2, 6, 6)
    (tmp_path / "labels").mkdir()
    write_idx(tmp_path / "labels" / "train-images-idx3-ubyte", data[:, 0])
    with pytest.raises(DataError, match=r"holds an array of shape \(2, 4\), not \(n, rows, cols\)"):
        load_digit_images(6, "fashion", tmp_path / "labels")
    with pytest.raises(DataError, match="no Fashion-MNIST IDX file"):
        load_digit_images(6, "fashion", tmp_path / "missing")


# ----------------------------------------------------------------------------------------------
# model


def tiny(**kw):
    torch.manual_seed(0)
    return ConvS5Predictor(ConvS5Config(d_model=8, ssm_size=4, n_layers=2, downsample=1, **kw)).double().eval()


def test_shapes_and_registry():
    m = tiny()
    x = torch.rand(2, 5, 1, 16, 16, dtype=torch.float64)
    y = m(x)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert m(x, logits=True).shape == x.shape
    with pytest.raises(ValueError, match="divisible"):
        m(torch.rand(1, 2, 1, 15, 15, dtype=torch.float64))
    assert {"convs5_moving_digits", "convs5_moving_digits_tiny"} <= set(ssmkit.list_models("convs5*"))
    small = ssmkit.create_model("convs5_moving_digits_tiny")
    assert isinstance(small, ConvS5Predictor) and small.config.d_model == 32
    # the published size: d_model 256, 8 layers, P = 128, 64x64 -> 16x16 latent (built lazily: only its config)
    big = ssmkit.create_model("convs5_moving_digits", d_model=16, n_layers=1)
    assert big.config.ssm_size == 128 and big.config.downsample == 2


@pytest.mark.parametrize("selective", [False, True])
def test_causal_in_time(selective):
    m = tiny(selective=selective)
    x = torch.rand(1, 6, 1, 16, 16, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 3:] = torch.rand_like(x2[:, 3:])
    y, y2 = m(x), m(x2)
    torch.testing.assert_close(y[:, :3], y2[:, :3], rtol=0, atol=1e-12)
    assert not torch.allclose(y[:, 3:], y2[:, 3:])


@pytest.mark.parametrize("selective", [False, True])
def test_steps_equal_teacher_forced_forward(selective):
    m = tiny(selective=selective)
    x = torch.rand(2, 7, 1, 16, 16, dtype=torch.float64)
    full, last = m.condition(x)
    states, outs = m.init_state(2, dtype=torch.float64), []
    for t in range(7):
        out, states = m.step(x[:, t], states)
        outs.append(out)
    torch.testing.assert_close(torch.stack(outs, 1), full, rtol=1e-9, atol=1e-10)
    for a, b in zip(states, last):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    # condition on a prefix in parallel, then step through the rest: the same predictions
    pre, states = m.condition(x[:, :4])
    rest = []
    for t in range(4, 7):
        out, states = m.step(x[:, t], states)
        rest.append(out)
    torch.testing.assert_close(torch.cat([pre, torch.stack(rest, 1)], 1), full, rtol=1e-9, atol=1e-10)
    # and continuing the parallel scan from the prefix's states gives them too
    cont, _ = m.condition(x[:, 4:], m.condition(x[:, :4])[1])
    torch.testing.assert_close(cont, full[:, 4:], rtol=1e-9, atol=1e-10)
    # the zero state of init_state also starts the parallel scan
    torch.testing.assert_close(m.condition(x, m.init_state(2, dtype=torch.float64))[0], full, rtol=0, atol=0)


def test_autoregressive_rollout_feeds_predictions_back():
    m = tiny()
    ctx = torch.rand(2, 3, 1, 16, 16, dtype=torch.float64)
    out = m.rollout(ctx, 4)
    assert out.shape == (2, 4, 1, 16, 16) and torch.isfinite(out).all()
    # the same as re-running the whole growing sequence through the parallel forward
    seq = ctx
    for t in range(4):
        nxt = m(seq)[:, -1:]
        torch.testing.assert_close(out[:, t:t + 1], nxt, rtol=1e-9, atol=1e-10)
        seq = torch.cat([seq, nxt], 1)


def test_trains_in_float32():
    torch.manual_seed(0)
    m = convs5_moving_digits_tiny(d_model=8, ssm_size=4, n_layers=1)
    x = torch.rand(2, 4, 1, 16, 16)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(m(x[:, :-1], logits=True), x[:, 1:])
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------
# SSIM


def test_frame_ssim_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 4, 1, 20, 20, generator=g)
    s = frame_ssim(x, x)
    assert s.shape == (3, 4)
    torch.testing.assert_close(s, torch.ones(3, 4))
    noisy = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    very = (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    a, b = frame_ssim(noisy, x), frame_ssim(very, x)
    assert (a < 1).all() and (b < a).all()
    torch.testing.assert_close(frame_ssim(x, noisy), a)  # symmetric
    # a constant shift of a flat image: luminance term only, (2μxμy + c1) / (μx² + μy² + c1)
    flat, shifted = torch.full((1, 12, 12), 0.5), torch.full((1, 12, 12), 0.7)
    expected = (2 * 0.5 * 0.7 + 1e-4) / (0.25 + 0.49 + 1e-4)
    torch.testing.assert_close(frame_ssim(flat, shifted), torch.tensor(expected))
    assert frame_ssim(torch.rand(2, 1, 6, 6), torch.rand(2, 1, 6, 6)).shape == (2,)  # window shrinks to fit
