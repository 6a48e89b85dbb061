"""The model registry: registration, lookup, listing and the error for an unknown name; `load_official`'s
shared rules (tied parameters, converter options, a new classifier head, strict fit, name dispatch)."""
import warnings

import pytest
import torch
import torch.nn as nn

import ssmkit
from ssmkit import registry
from ssmkit.errors import CheckpointError, ConfigError


@pytest.fixture
def tiny_model():
    @ssmkit.register_model
    def test_registry_tiny(width: int = 4) -> nn.Module:
        return nn.Linear(width, width)

    yield test_registry_tiny
    registry._REGISTRY.pop("test_registry_tiny")


def test_create_and_list(tiny_model):
    assert "test_registry_tiny" in ssmkit.list_models("test_registry_*")
    assert ssmkit.create_model("test_registry_tiny").in_features == 4
    assert ssmkit.create_model("test_registry_tiny", width=7).in_features == 7
    assert ssmkit.list_models("no_such_family_*") == []


def test_duplicate_name_is_refused(tiny_model):
    with pytest.raises(ValueError, match="already registered"):
        ssmkit.register_model(lambda: nn.Identity(), name="test_registry_tiny")


def test_unknown_name_says_what_exists(tiny_model):
    with pytest.raises(KeyError, match=r"unknown model 'test_registry_huge'.*test_registry_tiny"):
        ssmkit.create_model("test_registry_huge")


# -- official checkpoints: the rules every family shares -------------------------------------------------

class TiedLM(nn.Module):
    """An embedding tied to the output layer, and a classifier head, like the families' models."""

    def __init__(self, width: int = 4, classes: int = 3):
        super().__init__()
        self.config = {"width": width}
        self.embed = nn.Embedding(5, width)
        self.out = nn.Linear(width, 5, bias=False)
        self.out.weight = self.embed.weight
        self.head = nn.Linear(width, classes)


@pytest.fixture
def official_family():
    def convert(state, config, scale: float = 1.0):
        return {k.removeprefix("official."): v * scale for k, v in state.items()}

    registry.register_official("testofficial", TiedLM, convert, convert_options=("scale",), head="head.")
    registry.register_model(lambda **kw: TiedLM(**kw), name="testofficial_small")
    yield
    registry._OFFICIAL.pop("testofficial")
    registry._REGISTRY.pop("testofficial_small")


def _save(tmp_path, model, drop=("out.weight",)):
    state = {f"official.{k}": v for k, v in model.state_dict().items() if k not in drop}
    torch.save(state, tmp_path / "ckpt.pt")
    return tmp_path / "ckpt.pt"


def test_load_official_ties_converts_and_keeps_a_new_head(tmp_path, official_family):
    source = TiedLM()
    path = _save(tmp_path, source)
    loaded = ssmkit.load_official(TiedLM(), path)  # the tied output layer needs no weights of its own
    assert torch.equal(loaded.out.weight, source.embed.weight) and loaded.out.weight is loaded.embed.weight
    assert torch.equal(loaded.head.weight, source.head.weight)
    doubled = ssmkit.load_official("testofficial_small", path, scale=2.0)
    assert torch.equal(doubled.embed.weight, 2 * source.embed.weight)
    wider = TiedLM(classes=7)
    head = wider.head.weight.clone()
    with pytest.warns(UserWarning, match=r"ckpt\.pt: the checkpoint's head\.bias \(3,\), head\.weight \(3, 4\) do "
                                         r"not fit this TiedLM \(head\.bias \(7,\), head\.weight \(7, 4\)\)"):
        ssmkit.load_official(wider, path)
    assert torch.equal(wider.head.weight, head) and torch.equal(wider.embed.weight, source.embed.weight)
    with warnings.catch_warnings():  # a checkpoint without a head: the new head is what was asked for
        warnings.simplefilter("error")
        backbone_only = _save(tmp_path, source, drop=("out.weight", "head.weight", "head.bias"))
        assert torch.equal(ssmkit.load_official("testofficial_small", backbone_only).embed.weight, source.embed.weight)


def test_load_official_refuses_what_does_not_fit(tmp_path, official_family):
    path = _save(tmp_path, TiedLM())
    with pytest.raises(CheckpointError, match=r"ckpt\.pt: does not fit testofficial_small \(width=6\): shape mis"
                                              r"matches \(checkpoint vs model\): embed\.weight \(5, 4\) vs \(5, 6\)"):
        ssmkit.load_official("testofficial_small", path, width=6)
    with pytest.raises(ConfigError, match="testofficial checkpoints do not carry their sizes: give a model name "
                                          r"\(testofficial_small\)"):
        ssmkit.load_official("testofficial", path)
    with pytest.raises(TypeError, match="width only apply when it builds the model"):
        ssmkit.load_official(TiedLM(), path, width=6)
    with pytest.raises(KeyError, match="no official checkpoint format for 'test_registry_tiny'"):
        ssmkit.load_official("test_registry_tiny", path)
    with pytest.raises(TypeError, match="no official checkpoint format converts for a Linear"):
        ssmkit.load_official(nn.Linear(2, 2), path)
    with pytest.raises(ValueError, match="already registered"):
        registry.register_official("testofficial", TiedLM, lambda state, config: state)
