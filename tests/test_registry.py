"""The model registry: registration, lookup, listing and the error for an unknown name."""
import pytest
import torch.nn as nn

import ssmkit
from ssmkit import registry


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
