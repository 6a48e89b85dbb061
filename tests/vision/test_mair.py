"""MaIR: published sizes, the mixer against a per-sequence reference, SSA semantics, any image size,
and official checkpoints through the key mapping."""
import math

import pytest
import torch
import torch.nn.functional as F

import ssmkit
from ssmkit.core.scan import selective_scan
from ssmkit.errors import CheckpointError
from ssmkit.vision.mair import VMM, MaIR, convert_official_mair
from ssmkit.vision.scan_orders import cross4, mair4

TINY = dict(embed_dim=8, depths=(1, 2), d_state=2, ssm_ratio=1.5, mlp_ratio=2.0, scan_len=4, drop_path_rate=0.0)


@pytest.mark.parametrize("name, expected", [
    ("mair_sr_x2", 19_444_247),  # paper: 19.4M
    ("mair_light_sr_x2", 1_354_680),  # paper: ~1.3M (MaIR-S)
    ("mair_tiny_sr_x2", 877_752),  # paper: < 900K (MaIR-T)
    ("mair_denoise", 14_089_035),
])
def test_published_parameter_counts(name, expected):
    model = ssmkit.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_registry_lists_every_config():
    names = ssmkit.list_models("mair_*")
    for scale in (2, 3, 4):
        assert {f"mair_sr_x{scale}", f"mair_light_sr_x{scale}", f"mair_tiny_sr_x{scale}"} <= set(names)
    assert "mair_denoise" in names


def _reference_vmm(vmm: VMM, x: torch.Tensor, shift: int, stripe: int, orders=None) -> torch.Tensor:
    """The mixer written per sequence: for each of the four orders, permute, scan with that sequence's
    own parameters, permute back; weight with SSA computed from the official channel shuffle; sum."""
    b, h, w, _ = x.shape
    e, n, r = vmm.d_inner, vmm.d_state, vmm.dt_rank
    xs, z = vmm.in_proj(x).chunk(2, dim=-1)
    xs = F.silu(vmm.conv2d(xs.permute(0, 3, 1, 2))).flatten(2)  # (b, e, L) raster
    outs = []
    for k, order in enumerate(orders or mair4(stripe, shift)):
        perm, inv = order.perm(h, w), order.inverse(h, w)
        seq = xs[..., perm]
        dbl = torch.einsum("bel,ce->bcl", seq, vmm.x_proj_weight[k])
        dt, bb, cc = dbl.split([r, n, n], dim=1)
        dt = torch.einsum("brl,er->bel", dt, vmm.dt_projs_weight[k])
        y = selective_scan(seq, dt, -torch.exp(vmm.A_logs[k * e:(k + 1) * e]), bb, cc, D=vmm.Ds[k * e:(k + 1) * e],
                           delta_bias=vmm.dt_projs_bias[k], delta_softplus=True, backend="ref")
        outs.append(y[..., inv])
    stacked = torch.cat(outs, 1).view(b, 4 * e, h, w)  # official layout: sequence-major channels
    if vmm.ssa is None:
        y = stacked.view(b, 4, e, h, w).sum(1).permute(0, 2, 3, 1)
        return vmm.out_proj(vmm.out_norm(y) * F.silu(z))
    # official ShuffleAttn(group = d_inner): shuffle, pool, grouped 1x1 conv, sigmoid, shuffle back
    shuffled = stacked.reshape(b, 4, e, h, w).permute(0, 2, 1, 3, 4).reshape(b, 4 * e, h, w)
    gate = torch.sigmoid(vmm.ssa.proj(shuffled.mean((2, 3), keepdim=True)))
    gate = gate.reshape(b, e, 4, 1, 1).permute(0, 2, 1, 3, 4).reshape(b, 4 * e, 1, 1)
    y = (stacked * gate).view(b, 4, e, h, w).sum(1).permute(0, 2, 3, 1)
    return vmm.out_proj(vmm.out_norm(y) * F.silu(z))


@pytest.mark.parametrize("shift", [0, 2])
def test_vmm_matches_per_sequence_reference_forward_and_backward(shift):
    torch.manual_seed(0)
    vmm = VMM(6, d_state=2, expand=1.5, backend="chunked").double()
    with torch.no_grad():
        vmm.ssa.proj.weight.normal_()  # make the SSA weights differ per sequence
    x = torch.randn(2, 5, 7, 6, dtype=torch.float64, requires_grad=True)
    fast = vmm(x, shift, 4)
    ref = _reference_vmm(vmm, x, shift, 4)
    assert torch.allclose(fast, ref, atol=1e-10)
    g = torch.randn_like(fast)
    grads_fast = torch.autograd.grad((fast * g).sum(), [x, vmm.A_logs, vmm.x_proj_weight, vmm.ssa.proj.weight])
    grads_ref = torch.autograd.grad((ref * g).sum(), [x, vmm.A_logs, vmm.x_proj_weight, vmm.ssa.proj.weight])
    for a, b in zip(grads_fast, grads_ref):
        assert torch.allclose(a, b, atol=1e-9)


def test_cross_scan_peer_matches_its_reference():
    torch.manual_seed(2)
    vmm = VMM(6, d_state=2, expand=1.0, scan="cross4", ssa=False).double()
    x = torch.randn(1, 4, 5, 6, dtype=torch.float64)
    assert torch.allclose(vmm(x, 0, 4), _reference_vmm(vmm, x, 0, 4, orders=cross4()), atol=1e-10)
    with pytest.raises(ValueError, match="scan must be"):
        VMM(6, scan="zigzag")


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_interp_init_starts_as_bilinear_upsampling(scale):
    model = MaIR(upscale=scale, interp_init=True, **TINY).eval()
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        bilinear = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        inner = (slice(None), slice(None), slice(scale, -scale), slice(scale, -scale))  # zero padding at the edges
        assert torch.allclose(model(x)[inner], bilinear[inner], atol=1e-5)
    denoiser = MaIR(upscale=1, upsampler="", interp_init=True, **TINY).eval()
    with torch.no_grad():
        assert torch.allclose(denoiser(x), x, atol=1e-6)
    with pytest.raises(ValueError, match="interp_init needs"):
        MaIR(upscale=2, upsampler="pixelshuffle", interp_init=True, **TINY)


def test_vmm_gradcheck_float64():
    torch.manual_seed(1)
    vmm = VMM(2, d_state=2, expand=1.0, backend="chunked").double()
    x = torch.randn(1, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: vmm(t, 1, 2), (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("upsampler, scale", [("pixelshuffledirect", 2), ("pixelshuffle", 3), ("", 1)])
def test_any_image_size_pads_and_crops_back(upsampler, scale):
    torch.manual_seed(0)
    model = MaIR(upscale=scale, upsampler=upsampler, num_feat=8, **TINY).eval()
    x = torch.rand(2, 3, 13, 18)
    with torch.no_grad():
        y = model(x)
        assert y.shape == (2, 3, 13 * scale, 18 * scale)
        # the same as running the explicitly padded image and cropping
        padded = F.pad(x, (0, 2, 0, 3), mode="reflect")
        assert torch.allclose(y, model(padded)[..., : 13 * scale, : 18 * scale], atol=1e-6)
        assert model(x[:, :, :3, :3]).shape == (2, 3, 3 * scale, 3 * scale)  # smaller than the stripe
    with pytest.raises(ValueError, match=r"shape \(batch, 3, H, W\)"):
        model(torch.rand(1, 1, 8, 8))


def _official_state_dict(model: MaIR) -> dict:
    """A state dict under the official names (mair_arch.py) with the shapes of `model`, random values."""
    cfg = model.config
    c, e = cfg.embed_dim, int(cfg.ssm_ratio * cfg.embed_dim)
    n, r, k = cfg.d_state, math.ceil(cfg.embed_dim / 16), 4
    hidden = int(c * cfg.mlp_ratio)
    shapes = {"conv_first.weight": (c, 3, 3, 3), "conv_first.bias": (c,), "patch_embed.norm.weight": (c,),
              "patch_embed.norm.bias": (c,), "norm.weight": (c,), "norm.bias": (c,),
              "conv_after_body.weight": (c, c, 3, 3), "conv_after_body.bias": (c,),
              "upsample.0.weight": (3 * cfg.upscale ** 2, c, 3, 3), "upsample.0.bias": (3 * cfg.upscale ** 2,)}
    for i, depth in enumerate(cfg.depths):
        shapes[f"layers.{i}.conv.weight"] = (c, c, 3, 3)
        shapes[f"layers.{i}.conv.bias"] = (c,)
        for j in range(depth):
            p = f"layers.{i}.residual_group.blocks.{j}."
            a = p + "self_attention."
            shapes.update({
                p + "ln_1.weight": (c,), p + "ln_1.bias": (c,), p + "skip_scale": (c,), p + "skip_scale2": (c,),
                p + "ln_2.weight": (c,), p + "ln_2.bias": (c,), p + "conv_blk.fc1.weight": (hidden, c),
                p + "conv_blk.fc1.bias": (hidden,), p + "conv_blk.fc2.weight": (c, hidden),
                p + "conv_blk.fc2.bias": (c,),
                a + "in_proj.weight": (2 * e, c), a + "conv2d.weight": (e, 1, 3, 3), a + "conv2d.bias": (e,),
                a + "x_proj_weight": (k, r + 2 * n, e), a + "dt_projs_weight": (k, e, r), a + "dt_projs_bias": (k, e),
                a + "A_logs": (k * e, n), a + "Ds": (k * e,), a + "out_norm.weight": (e,), a + "out_norm.bias": (e,),
                a + "out_proj.weight": (c, e), a + "gating.gating.1.weight": (4 * e, 4, 1, 1),
                a + "gating.gating.1.bias": (4 * e,)})
    g = torch.Generator().manual_seed(0)
    return {key: torch.randn(shape, generator=g) for key, shape in shapes.items()}


def test_convert_official_mair_maps_every_name():
    model = MaIR(upscale=2, **TINY)
    official = _official_state_dict(model)
    converted = convert_official_mair(official, model.config)
    assert converted.keys() == model.state_dict().keys()
    assert torch.equal(converted["groups.1.blocks.1.mixer.ssa.proj.weight"],
                       official["layers.1.residual_group.blocks.1.self_attention.gating.gating.1.weight"])
    assert torch.equal(converted["groups.0.blocks.0.skip_scale1"], official["layers.0.residual_group.blocks.0.skip_scale"])
    assert torch.equal(converted["embed_norm.weight"], official["patch_embed.norm.weight"])
    model.load_state_dict(converted)  # strict: every shape fits too


def test_load_official_mair_by_model_and_by_name(tmp_path):
    model = MaIR(upscale=2, **TINY)
    official = _official_state_dict(model)
    path = tmp_path / "MaIR_x2.pth"
    ema = {k: v + 1 for k, v in official.items()}
    torch.save({"params": {f"module.{k}": v for k, v in official.items()}, "params_ema": ema}, path)
    assert ssmkit.load_official(model, path) is model
    assert torch.equal(model.state_dict()["norm.weight"], official["norm.weight"])
    ssmkit.load_official(model, path, weights_key="params_ema")
    assert torch.equal(model.state_dict()["norm.weight"], ema["norm.weight"])
    # by name at the published size
    micro = ssmkit.create_model("mair_micro_sr_x2")
    torch.save({"params": _official_state_dict(micro)}, tmp_path / "micro.pth")
    named = ssmkit.load_official("mair_micro_sr_x2", tmp_path / "micro.pth").eval()
    ssmkit.load_official(micro, tmp_path / "micro.pth")
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(named(x), micro.eval()(x), rtol=0, atol=0)


def _one_line_error(call, path, pattern):
    with pytest.raises(CheckpointError, match=pattern) as error:
        call()
    assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value)


def test_load_official_errors_name_the_file(tmp_path):
    official = _official_state_dict(MaIR(upscale=2, **TINY))
    path = tmp_path / "x4.pth"
    torch.save({"params": official}, path)
    _one_line_error(lambda: ssmkit.load_official(MaIR(upscale=4, **TINY), path), path,
                    r"does not fit this MaIR: shape mismatches \(checkpoint vs model\): upsample\.0\.bias \(12,\) vs "
                    r"\(48,\), upsample\.0\.weight \(12, 8, 3, 3\) vs \(48, 8, 3, 3\)$")
    _one_line_error(lambda: ssmkit.load_official(MaIR(upscale=2, **{**TINY, "depths": (1, 3)}), path), path,
                    r"does not fit this MaIR: missing keys: groups\.1\.blocks\.2\.")
    _one_line_error(lambda: ssmkit.load_official(MaIR(upscale=2, **TINY), path, weights_key="params_ema"), path,
                    r"no 'params_ema' entry \(entries params\)")
    _one_line_error(lambda: ssmkit.load_official("mair_sr_x2", tmp_path / "missing.pth"), tmp_path / "missing.pth",
                    "no such file")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    _one_line_error(lambda: ssmkit.load_official(MaIR(upscale=2, **TINY), tmp_path / "junk.pth"),
                    tmp_path / "junk.pth", "not a readable PyTorch checkpoint")
