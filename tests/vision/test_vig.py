"""ViG: published sizes, timm interface, direction-wise gates, the gated locality branch."""
import copy

import pytest
import timm
import torch

import ssmkit
from ssmkit.vision.vig import BiGLA, ViG

SMALL = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_classes=5)
CFG_KEYS = ("first_conv", "classifier", "mean", "std", "input_size", "pool_size", "crop_pct", "interpolation",
            "num_classes")


def small(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    return ssmkit.create_model("vig_tiny", **{**SMALL, **kw})


# Counts computed from the official layer formulas (ViG-T ≈5.83M, S ≈22.6M, B ≈89M)
@pytest.mark.parametrize("name, count, note_m, heads", [
    ("vig_tiny", 5_834_536, 5.83, 3), ("vig_small", 22_615_144, 22.6, 6), ("vig_base", 89_022_184, 89.0, 12)])
def test_parameter_counts(name, count, note_m, heads):
    with torch.device("meta"):
        model = ssmkit.create_model(name)
    n = sum(p.numel() for p in model.parameters())
    assert n == count
    assert abs(n / 1e6 - note_m) < 0.05
    assert len(model.blocks) == 12 and model.blocks[0].attn.num_heads == heads
    assert model.pos_embed.shape == (1, 196, model.embed_dim)


def test_timm_create_model_every_registered_name():
    import ssmkit.vision  # noqa: F401

    names = timm.list_models("ssmkit_vig*")
    assert set(names) == {"ssmkit_vig_tiny", "ssmkit_vig_small", "ssmkit_vig_base"}
    for name in names:
        model = timm.create_model(name, num_classes=10, img_size=16, patch_size=4, embed_dim=32, depth=1)
        assert isinstance(model, ViG) and model.num_classes == 10
        for key in CFG_KEYS:
            assert key in model.pretrained_cfg and key in model.default_cfg
        assert dict(model.named_modules())[model.pretrained_cfg["first_conv"]] is model.patch_embed.proj[0]
        assert model(torch.randn(1, 3, 16, 16)).shape == (1, 10)
    with torch.device("meta"):
        full = timm.create_model("ssmkit_vig_tiny")
    assert sum(p.numel() for p in full.parameters()) == 5_834_536


@pytest.mark.parametrize("size", [(16, 16), (24, 12)])
def test_forward_backward_two_sizes(size):
    model = small(drop_path_rate=0.1).train()
    out = model(torch.randn(2, 1, *size))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_timm_interface():
    assert {"vig_tiny", "vig_small", "vig_base"} <= set(ssmkit.list_models("vig_*"))
    model = small().eval()
    x = torch.randn(2, 1, 16, 16)
    feats = model.forward_features(x)
    assert feats.shape == (2, 16, 32)
    pooled = model.forward_head(feats, pre_logits=True)
    assert pooled.shape == (2, model.num_features) and model.head_hidden_size == 32
    torch.testing.assert_close(pooled, feats.mean(1))
    assert "pos_embed" in model.no_weight_decay()
    assert len(model.feature_info) == 2 and model.feature_info[0] == dict(num_chs=32, reduction=4,
                                                                          module="blocks.0")
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, 32)
    for key in CFG_KEYS:
        assert key in model.pretrained_cfg
    assert model.pretrained_cfg["input_size"] == (1, 16, 16)


@pytest.mark.parametrize("size", [(18, 16), (16, 2)])
def test_bad_image_size_raises(size):
    with pytest.raises(ValueError, match=rf"{size[0]}x{size[1]}.*patch size 4"):
        small()(torch.randn(1, 1, *size))
    with pytest.raises(ValueError, match="even patch size"):
        small(patch_size=3, img_size=9)


# -- the mixer ---------------------------------------------------------------------------------------

def _mixer(seed=0):
    torch.manual_seed(seed)
    mixer = BiGLA(32, num_heads=2, act_in_conv=True, out_act=True)
    with torch.no_grad():  # non-trivial gates and biases, and q/k/v large enough to clear the norms' eps
        for p in (mixer.gk_fwd.bias, mixer.gk_bwd.bias, mixer.g_proj.bias):
            p.normal_()
        mixer.in_proj.weight.normal_(0, 0.5)
        mixer.qkv_proj.weight.normal_(0, 0.3)
    return mixer


def test_directions_differ_only_in_gates():
    mixer = _mixer()
    params = dict(mixer.named_parameters())
    fwd = {n for n in params if n.startswith("gk_fwd.")}
    bwd = {n for n in params if n.startswith("gk_bwd.")}
    assert fwd == {"gk_fwd.weight", "gk_fwd.bias"}
    assert [params[n].shape for n in sorted(fwd)] == [params[n.replace("fwd", "bwd")].shape for n in sorted(fwd)]
    assert params["gk_fwd.weight"].shape == (mixer.key_dim, 16)
    shared = set(params) - fwd - bwd
    assert {"in_proj.weight", "qkv_proj.weight", "gk_proj.weight", "g_proj.weight", "o_proj.weight"} <= shared
    # the math: reversing the sequence (= rotating the token map by 180°) with the gates swapped and the
    # 3x3 kernel rotated gives the reversed output; with identical gates the two directions would be
    # exchangeable, so the swap matters
    grid = (3, 4)
    x = torch.randn(2, 12, 32)
    swapped = copy.deepcopy(mixer)
    with torch.no_grad():
        swapped.gk_fwd.load_state_dict(mixer.gk_bwd.state_dict())
        swapped.gk_bwd.load_state_dict(mixer.gk_fwd.state_dict())
        swapped.in_proj.weight.copy_(mixer.in_proj.weight.flip(-1, -2))
    y = mixer(x, grid)
    torch.testing.assert_close(swapped(x.flip(1), grid), y.flip(1), atol=1e-5, rtol=1e-4)
    unswapped = copy.deepcopy(swapped)
    with torch.no_grad():
        unswapped.gk_fwd.load_state_dict(mixer.gk_fwd.state_dict())
        unswapped.gk_bwd.load_state_dict(mixer.gk_bwd.state_dict())
    assert (unswapped(x.flip(1), grid) - y.flip(1)).abs().max() > 1e-4


def test_locality_branch_is_used():
    mixer = _mixer()
    grid = (4, 4)
    x = torch.randn(2, 16, 32)
    y = mixer(x, grid)
    no_local = copy.deepcopy(mixer)
    with torch.no_grad():
        no_local.l_norm.weight.zero_()  # drop the gated RMSNorm(local)·(1 − g) term
    assert (no_local(x, grid) - y).abs().max() > 1e-3
    # the conv is 2-D: a token's vertical neighbour enters through the off-centre taps
    center_only = copy.deepcopy(mixer)
    with torch.no_grad():
        w = center_only.in_proj.weight
        keep = w[..., 1, 1].clone()
        w.zero_()
        w[..., 1, 1] = keep
    assert (center_only(x, grid) - y).abs().max() > 1e-3
