"""timm's `features_only=True` and `forward_intermediates` for the ssmkit classifiers (Vim and ViG)."""
import pytest
import timm
import torch

import ssmkit.vision  # noqa: F401  (registers the ssmkit_* models with timm)

SMALL = dict(depth=4, embed_dim=32, img_size=32, patch_size=8)


@pytest.mark.parametrize("name", ["ssmkit_vim_tiny", "ssmkit_vig_tiny"])
def test_features_only_gives_maps_of_the_chosen_layers(name):
    torch.manual_seed(0)
    net = timm.create_model(name, features_only=True, out_indices=(1, 3), **SMALL).eval()
    assert net.feature_info.channels() == [32, 32] and net.feature_info.reduction() == [8, 8]
    x = torch.randn(2, 3, 32, 48)  # another size than the model's: a 4 x 6 patch grid
    maps = net(x)
    assert [tuple(m.shape) for m in maps] == [(2, 32, 4, 6)] * 2
    assert not torch.allclose(maps[0], maps[1])
    maps[1].sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["ssmkit_vim_tiny", "ssmkit_vig_tiny"])
def test_intermediates_match_forward_features_and_pruning(name):
    torch.manual_seed(0)
    model = timm.create_model(name, **SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        final, (last,) = model.forward_intermediates(x, indices=[3], norm=True, output_fmt="NLC")
        last_two = model.forward_intermediates(x, indices=2, output_fmt="NCHW", intermediates_only=True)
        first_two = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    assert torch.equal(final, tokens)
    if name == "ssmkit_vim_tiny":  # the middle class token is not a patch
        mid = (tokens.shape[1] - 1) // 2
        tokens = torch.cat([tokens[:, :mid], tokens[:, mid + 1:]], dim=1)
    torch.testing.assert_close(last, tokens)
    assert [tuple(m.shape) for m in last_two] == [(2, 32, 4, 4)] * 2
    torch.testing.assert_close(last_two[1].flatten(2).transpose(1, 2), model.forward_intermediates(
        x, indices=[3], output_fmt="NLC", intermediates_only=True)[0])
    kept = model.prune_intermediate_layers([0, 1], prune_norm=True)
    assert kept == [0, 1] and model.num_classes == 0
    with torch.no_grad():
        pruned = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    for a, b in zip(pruned, first_two):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")
