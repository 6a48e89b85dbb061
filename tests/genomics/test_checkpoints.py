"""Official checkpoint layouts (built state dicts): Lightning weights.ckpt and -hf safetensors."""
import collections
import os

import pytest
import torch
from safetensors.torch import save_file

from ssmkit.errors import CheckpointError
from ssmkit.genomics.checkpoints import load_hyenadna
from ssmkit.genomics.hyenadna import HyenaDNAConfig, HyenaDNALM

CFG = HyenaDNAConfig(d_model=8, n_layer=2, d_inner=16, l_max=34, filter_order=16)


class OmegaConfLike:
    """Stands in for the OmegaConf objects a Lightning checkpoint pickles next to its weights."""

    def __init__(self):
        self.content = {"model": {"d_model": 8}}


class RunsCode:
    """A pickled object whose unpickling would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = HyenaDNALM(CFG).eval()
    # make the three Sin activations' frequency and the head distinct from their initial values
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.mixer.filter_fn.implicit_filter[1].freq.uniform_(5, 15)
    ids = torch.randint(7, 12, (2, 33))
    return model, ids


def backbone_keys(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith("backbone.")}


def lightning_state(model, checkpointing=False):
    state = {}
    for key, value in backbone_keys(model).items():
        if checkpointing:
            key = key.replace(".mixer.", ".mixer.layer.").replace(".mlp.", ".mlp.layer.")
        state["model." + key] = value
    state["model.lm_head.weight"] = model.lm_head.weight.detach().clone()
    return state


def hf_state(model, shift_freq=True):
    state = {}
    for key, value in backbone_keys(model).items():
        if key.endswith(("implicit_filter.3.freq", "implicit_filter.5.freq")):
            continue  # the -hf files store the shared frequency once
        state["hyena." + key] = value.contiguous()
    state["lm_head.weight"] = model.lm_head.weight.detach().clone()
    return state


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lightning_checkpoint_loads_with_a_restricted_unpickler(tmp_path, reference, checkpointing):
    model, ids = reference
    marker = tmp_path / "ran"
    torch.save({"state_dict": lightning_state(model, checkpointing), "hyper_parameters": OmegaConfLike(),
                "loops": collections.defaultdict(list), "payload": RunsCode(marker), "epoch": 3},
               tmp_path / "weights.ckpt")
    loaded, info = load_hyenadna(tmp_path)
    assert not marker.exists(), "unpickling ran code from the checkpoint"
    assert info["layout"] == "lightning" and info["shift"] == 0.0
    assert (info["config"].d_model, info["config"].n_layer, info["config"].l_max) == (8, 2, 34)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids), model(ids))


def test_hf_safetensors_loads_with_shift_005_and_shared_freq(tmp_path, reference):
    model, ids = reference
    save_file(hf_state(model), str(tmp_path / "model.safetensors"))
    loaded, info = load_hyenadna(tmp_path, shift=0.0)  # the same shift as the reference model
    assert info["layout"] == "hf"
    mixer = loaded.backbone.layers[1].mixer.filter_fn.implicit_filter
    assert mixer[3].freq is mixer[1].freq
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids), model(ids))
    default, info = load_hyenadna(tmp_path / "model.safetensors")
    assert info["shift"] == 0.05 and default.backbone.layers[0].mixer.filter_fn.modulation.shift == 0.05


def test_classifier_loads_a_fine_tuned_decoder(tmp_path, reference):
    model, ids = reference
    state = lightning_state(model)
    state["decoder.0.output_transform.weight"] = torch.randn(3, 8)
    state["decoder.0.output_transform.bias"] = torch.randn(3)
    torch.save({"state_dict": state}, tmp_path / "weights.ckpt")
    clf, info = load_hyenadna(tmp_path / "weights.ckpt", n_classes=3)
    torch.testing.assert_close(clf.head.weight, state["decoder.0.output_transform.weight"])
    assert info["fresh"] == []
    _, info = load_hyenadna(tmp_path / "weights.ckpt", n_classes=5)
    assert info["fresh"] == ["head.bias", "head.weight"]


def test_mismatched_config_names_the_keys(tmp_path, reference):
    model, _ = reference
    torch.save({"state_dict": lightning_state(model)}, tmp_path / "weights.ckpt")
    wrong_lmax = HyenaDNAConfig(d_model=8, n_layer=2, d_inner=16, l_max=1026, filter_order=16)
    with pytest.raises(CheckpointError, match=r"shape mismatches .*pos_emb.* \(1, 34, 5\) vs \(1, 1026, 5\)"):
        load_hyenadna(tmp_path, config=wrong_lmax)
    deeper = HyenaDNAConfig(d_model=8, n_layer=3, d_inner=16, l_max=34, filter_order=16)
    with pytest.raises(CheckpointError, match=r"missing keys: backbone\.layers\.2\."):
        load_hyenadna(tmp_path, config=deeper)
    state = lightning_state(model)
    state["model.backbone.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "extra.ckpt")
    with pytest.raises(CheckpointError, match=r"unexpected keys: backbone\.extra\.weight"):
        load_hyenadna(tmp_path / "extra.ckpt", config=CFG)


def test_unreadable_and_foreign_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no weights.ckpt, model.safetensors"):
        load_hyenadna(tmp_path)
    (tmp_path / "weights.ckpt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_hyenadna(tmp_path)
    save_file({"encoder.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="no HyenaDNA backbone keys"):
        load_hyenadna(tmp_path / "other.safetensors")
