"""Vision Mamba: published sizes, timm interface, bidirectional mixer, middle-cls pos-embed resizing,
official checkpoints, scan orders."""
import argparse
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import ssmkit
from ssmkit.errors import CheckpointError, ConfigError
from ssmkit.vision.vim import MidClsGridOrder, VisionMamba, convert_official_vim, resize_pos_embed_mid_cls

SMALL = dict(img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=2, num_classes=5)
CFG_KEYS = ("first_conv", "classifier", "mean", "std", "input_size", "pool_size", "crop_pct", "interpolation",
            "num_classes")


def small(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    return ssmkit.create_model("vim_tiny", **{**SMALL, **kw})


# -- published sizes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, count, paper_m", [
    ("vim_tiny", 7_148_008, 7.1), ("vim_small", 25_796_584, 25.8), ("vim_base", 97_598_440, 97.6)])
def test_parameter_counts_match_paper(name, count, paper_m):
    with torch.device("meta"):
        model = ssmkit.create_model(name)
    n = sum(p.numel() for p in model.parameters())
    assert n == count
    assert round(n / 1e6, 1) == paper_m
    assert model.pos_embed.shape[1] == 197 and len(model.layers) == 24
    mixer = model.layers[0].mixer
    assert (mixer.d_state, mixer.expand, mixer.divide_out) == (16, 2, True)


def test_hydra_mixer_variant():
    from ssmkit.core.hydra import Hydra

    with torch.device("meta"):
        model = ssmkit.create_model("vim_hydra_tiny")
    assert sum(p.numel() for p in model.parameters()) == 6_193_048
    mixer = model.layers[0].mixer
    assert isinstance(mixer, Hydra) and (mixer.nheads, mixer.headdim, mixer.d_state, mixer.d_conv) == (6, 64, 16, 7)
    torch.manual_seed(0)
    small_hydra = small(mixer="hydra", headdim=16)
    x = torch.randn(2, 1, 32, 32)
    small_hydra(x).sum().backward()
    assert all(p.grad is not None for p in small_hydra.parameters())
    # every output sees every patch: the class token's logits move when the first patch changes
    x2 = x.clone()
    x2[:, :, :8, :8] += 1.0
    with torch.no_grad():
        assert not torch.allclose(small_hydra(x), small_hydra(x2))
    with pytest.raises(ValueError, match="scan_order 'snake' needs the 'mamba' mixer"):
        small(mixer="hydra", scan_order="snake")
    with pytest.raises(ValueError, match="mixer must be 'mamba' or 'hydra'"):
        small(mixer="mamba3")


def test_timm_create_model_every_registered_name():
    import ssmkit.vision  # noqa: F401  (registers in timm)

    names = timm.list_models("ssmkit_vim*")
    assert set(names) == {"ssmkit_vim_micro", "ssmkit_vim_tiny", "ssmkit_vim_small", "ssmkit_vim_base",
                          "ssmkit_vim_hydra_tiny"}
    for name in names:
        model = timm.create_model(name, num_classes=10, img_size=32, patch_size=8, embed_dim=32, depth=1)
        assert isinstance(model, VisionMamba) and model.num_classes == 10
        for key in CFG_KEYS:
            assert key in model.pretrained_cfg and key in model.default_cfg
        assert model.pretrained_cfg["first_conv"] == "patch_embed.proj"
        assert dict(model.named_modules())[model.pretrained_cfg["first_conv"]] is model.patch_embed.proj
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with torch.device("meta"):
        full = timm.create_model("ssmkit_vim_small")
    assert sum(p.numel() for p in full.parameters()) == 25_796_584


def test_ssmkit_registry_and_app_call():
    assert {"vim_tiny", "vim_small", "vim_base"} <= set(ssmkit.list_models("vim_*"))
    model = ssmkit.create_model("vim_tiny", img_size=32, patch_size=4, in_chans=1, embed_dim=64, depth=4,
                                num_classes=10)
    assert model.grid_size == (8, 8) and model.num_features == model.head_hidden_size == 64
    for key in CFG_KEYS:
        assert key in model.pretrained_cfg
    assert model.pretrained_cfg["input_size"] == (1, 32, 32) and model.pretrained_cfg["num_classes"] == 10


# -- forward / backward / timm interface ---------------------------------------------------------------

@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_forward_backward_two_sizes(size):
    model = small(drop_path_rate=0.1)
    model.train()
    x = torch.randn(2, 1, *size)
    out = model(x)
    assert out.shape == (2, 5)
    out.square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.cls_token.grad.abs().sum() > 0 and model.pos_embed.grad.abs().sum() > 0


def test_timm_interface():
    model = small().eval()
    x = torch.randn(2, 1, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 17, 32)
    pooled = model.forward_head(feats, pre_logits=True)
    assert pooled.shape == (2, model.num_features)
    torch.testing.assert_close(pooled, feats[:, 8])  # the middle class token (M // 2 = 8)
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    assert len(model.feature_info) == 2 and model.feature_info[-1]["num_chs"] == 32
    assert model.feature_info[0]["reduction"] == 8 and model.feature_info[0]["module"] == "layers.0"
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.get_classifier().out_features == 3
    model.reset_classifier(0, global_pool="avg")
    assert model(x).shape == (2, 32)
    torch.testing.assert_close(model(x), torch.cat([feats[:, :8], feats[:, 9:]], 1).mean(1))


@pytest.mark.parametrize("size", [(30, 32), (32, 20), (4, 32)])
def test_bad_image_size_raises(size):
    model = small()
    with pytest.raises(ValueError, match=rf"{size[0]}x{size[1]}.*patch size 8"):
        model(torch.randn(1, 1, *size))
    with pytest.raises(ValueError, match="patch size 8"):
        small(img_size=size)


# -- the bidirectional mixer -------------------------------------------------------------------------

_BWD = ("conv1d_b", "x_proj_b", "dt_proj_b", "A_b_log", "D_b")
_FWD = ("conv1d", "x_proj", "dt_proj", "A_log", "D")


def test_backward_direction_is_used():
    """With the second direction's parameters zeroed the model is causal in token order (the last patch
    cannot change earlier tokens); with them restored it is not."""
    model = small().eval()
    x = torch.randn(1, 1, 32, 32)
    x2 = x.clone()
    x2[..., 24:, 24:] += 1.0  # the last patch (raster position 15, sequence position 16)
    with torch.no_grad():
        a, b = model.forward_features(x), model.forward_features(x2)
        assert (a[:, :16] - b[:, :16]).abs().max() > 1e-4  # bidirectional: earlier tokens see it
        for layer in model.layers:
            mixer = layer.mixer
            mixer.x_proj_b.weight.zero_()
            mixer.D_b.zero_()
        a, b = model.forward_features(x), model.forward_features(x2)
    torch.testing.assert_close(a[:, :16], b[:, :16], rtol=0, atol=1e-6)
    assert (a[:, 16] - b[:, 16]).abs().max() > 1e-4


def test_mixer_flip_symmetry():
    """mixer(x) reversed == mixer with the directions swapped applied to reversed x."""
    model = small()
    mixer = model.layers[0].mixer
    swapped = copy.deepcopy(mixer)
    with torch.no_grad():
        for f, b in zip(_FWD, _BWD):
            for name, src in (("f", b), ("b", f)):
                dst = getattr(swapped, f if name == "f" else b)
                srcm = getattr(mixer, src)
                if isinstance(dst, torch.nn.Parameter):
                    dst.copy_(srcm)
                else:
                    dst.load_state_dict(srcm.state_dict())
    x = torch.randn(2, 17, 32)
    torch.testing.assert_close(swapped(x.flip(1)), mixer(x).flip(1), atol=1e-5, rtol=1e-4)
    assert (mixer(x.flip(1)) - mixer(x).flip(1)).abs().max() > 1e-4


# -- position embedding around the middle class token ----------------------------------------------

def test_pos_embed_resize_middle_cls():
    d = 6
    pe = torch.randn(1, 4 * 4 + 1, d)
    assert resize_pos_embed_mid_cls(pe, (4, 4), (4, 4)) is pe
    out = resize_pos_embed_mid_cls(pe, (4, 4), (6, 3))
    assert out.shape == (1, 19, d)
    torch.testing.assert_close(out[:, 18 // 2], pe[:, 8])  # class entry unchanged, in the new middle
    grid = torch.cat([pe[:, :8], pe[:, 9:]], 1).reshape(1, 4, 4, d).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(6, 3), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(torch.cat([out[:, :9], out[:, 10:]], 1), want)
    # odd new length: M' = 9 -> cls at 4
    out = resize_pos_embed_mid_cls(pe, (4, 4), (3, 3))
    torch.testing.assert_close(out[:, 4], pe[:, 8])


def test_model_uses_resized_pos_embed():
    model = small()
    torch.testing.assert_close(model.pos_embed_for((4, 4)), model.pos_embed)
    pe = model.pos_embed_for((5, 3))
    assert pe.shape == (1, 16, 32)
    torch.testing.assert_close(pe[:, 7], model.pos_embed[:, 8])


# -- official checkpoints ----------------------------------------------------------------------------

# the parameter names of hustvl/Vim `models_mamba.py` (bimamba v2 mixer, middle class token, final RMSNorm)
OFFICIAL_TOP = ["patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed", "norm_f.weight",
                "head.weight", "head.bias"]
OFFICIAL_MIXER = ["in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
                  "A_log", "D", "conv1d_b.weight", "conv1d_b.bias", "x_proj_b.weight", "dt_proj_b.weight",
                  "dt_proj_b.bias", "A_b_log", "D_b", "out_proj.weight"]


def official_names(depth):
    return OFFICIAL_TOP + [f"layers.{i}.{n}" for i in range(depth)
                           for n in [f"mixer.{m}" for m in OFFICIAL_MIXER] + ["norm.weight"]]


def _save_official(model, path, extra=None):
    """`model`'s weights as the official training script saves them: under "model" by the official names with
    DataParallel's `module.` prefix, beside the epoch and the run's arguments (which weights_only=True refuses)."""
    ours = model.state_dict()
    weights = {f"module.{name}": ours[name].clone() for name in official_names(len(model.layers))}
    torch.save({"model": {**weights, **(extra or {})}, "epoch": 299, "args": argparse.Namespace(lr=5e-4)}, path)
    return path


def test_official_names_cover_the_model():
    assert set(small().state_dict()) == set(official_names(2))


def test_convert_official_vim_resizes_the_position_embedding():
    src = small(seed=1)
    official = {name: value for name, value in src.state_dict().items()}
    out = convert_official_vim(official, {**SMALL, "img_size": 48})
    assert out.keys() == official.keys() and out["pos_embed"].shape == (1, 37, 32)
    torch.testing.assert_close(out["pos_embed"][:, 18], src.pos_embed[:, 8])  # the class entry, at the new middle
    assert convert_official_vim(official, SMALL)["pos_embed"] is official["pos_embed"]
    with pytest.raises(CheckpointError, match="not a square grid plus one class token"):
        convert_official_vim({"pos_embed": torch.zeros(1, 7, 32)}, SMALL)


def test_load_official_vim_by_model_and_by_name(tmp_path):
    src = small(seed=1).eval()
    path = _save_official(src, tmp_path / "vim.pth")
    dst = small(seed=2).eval()
    x = torch.randn(2, 1, 32, 32)
    assert (dst(x) - src(x)).abs().max() > 1e-3
    assert ssmkit.load_official(dst, path) is dst
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    named = ssmkit.load_official("vim_tiny", path, **SMALL).eval()
    torch.testing.assert_close(named(x), src(x), rtol=0, atol=0)
    # another resolution and head: pos_embed resized around the class token, the model's own head kept
    big = small(seed=4, img_size=48, num_classes=7).eval()
    head = big.head.weight.clone()
    with pytest.warns(UserWarning, match=r"vim\.pth: the checkpoint's head\.bias \(5,\), head\.weight \(5, 32\) do "
                                         r"not fit this VisionMamba \(head\.bias \(7,\), head\.weight \(7, 32\)\)"):
        ssmkit.load_official(big, path)
    assert torch.equal(big.head.weight, head)
    torch.testing.assert_close(big.pos_embed[:, 18], src.pos_embed[:, 8])
    torch.testing.assert_close(big.layers[1].mixer.A_b_log, src.layers[1].mixer.A_b_log)


def test_load_official_vim_errors_are_one_line_naming_the_file(tmp_path):
    path = _save_official(small(), tmp_path / "extra.pth", {"extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"extra\.pth: does not fit this VisionMamba: unexpected keys: "
                                              r"extra\.weight$"):
        ssmkit.load_official(small(), path)
    with pytest.raises(CheckpointError, match=r"extra\.pth: does not fit vim_tiny \(.*depth=3.*\): missing keys: "
                                              r"layers\.2\."):
        ssmkit.load_official("vim_tiny", path, **{**SMALL, "depth": 3})
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint") as error:
        ssmkit.load_official("vim_tiny", tmp_path / "junk.pth", **SMALL)
    assert str(error.value).startswith(f"{tmp_path / 'junk.pth'}: ") and "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=r"vim checkpoints do not carry their sizes: give a model name \(vim_base"):
        ssmkit.load_official("vim", path)


# -- scan orders -------------------------------------------------------------------------------------

def test_scan_order_reverse_equals_flip():
    """The flipped sequence with the class token in the middle (M even) is the reversed raster grid order."""
    ref = small().eval()
    rev = small(scan_order="reverse").eval()
    rev.load_state_dict(ref.state_dict())
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(rev(x), ref(x), atol=1e-5, rtol=1e-4)


def test_scan_order_grid():
    model = small(scan_order="column").eval()
    ref = small().eval()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 32, 32)
    out = model(x)
    assert torch.isfinite(out).all() and (out - ref(x)).abs().max() > 1e-5
    assert model(torch.randn(1, 1, 24, 40)).shape == (1, 5)  # other grid, its own order
    for bad in ("cross4", "nope"):
        with pytest.raises(ValueError):
            small(scan_order=bad)


def test_scan_order_of_the_grid_is_passed_per_call():
    """A forward at another grid scans the second branch in that grid's order, handed to the mixers at
    call time: the same as running the blocks with that order, and the mixers keep the order they were
    built with."""
    model = small(scan_order="column").eval()
    built = [layer.mixer.branch_order for layer in model.layers]
    x = torch.randn(2, 1, 24, 40)
    tokens, grid = model._tokens(x)

    def blocks_with(order):
        hidden, residual = tokens, None
        for layer in model.layers:
            hidden, residual = layer(hidden, residual, branch_order=order)
        return model.forward_head(model._norm(hidden + residual))

    out = model(x)
    torch.testing.assert_close(out, blocks_with(MidClsGridOrder(model.scan_grid_order, *grid)))
    assert (out - blocks_with("flip")).abs().max() > 1e-5  # the order matters
    assert all(layer.mixer.branch_order is b for layer, b in zip(model.layers, built))


def test_timm_pretrained_from_local_file(tmp_path):
    """timm's own loading path (pretrained=True with a local file) goes through checkpoint_filter_fn."""
    import ssmkit.vision  # noqa: F401

    src = small(seed=5, in_chans=3, num_classes=1000)
    path = tmp_path / "official.pth"
    torch.save({"model": src.state_dict()}, path)
    model = timm.create_model("ssmkit_vim_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              num_classes=10, img_size=48, patch_size=8, embed_dim=32, depth=2)
    torch.testing.assert_close(model.layers[1].mixer.D_b, src.layers[1].mixer.D_b)
    torch.testing.assert_close(model.pos_embed[:, 18], src.pos_embed[:, 8])
    assert model.head.out_features == 10
