"""Official checkpoint layouts (built state dicts): Lightning weights.ckpt and -hf safetensors, loaded by
`ssmkit.load_official` by family, by registered name and into a model."""
import collections
import dataclasses
import os

import pytest
import torch
from safetensors.torch import save_file

from ssmkit.errors import CheckpointError
from ssmkit.genomics.checkpoints import convert_official_hyenadna, official_hyenadna_config
from ssmkit.genomics.hyenadna import HyenaDNAConfig, HyenaDNALM
from ssmkit.registry import load_official

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
    loaded = load_official("hyenadna", tmp_path)
    assert not marker.exists(), "unpickling ran code from the checkpoint"
    assert isinstance(loaded, HyenaDNALM) and loaded.config == CFG  # sizes from the shapes, the layout's shift 0.0
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids), model(ids))


def test_hf_safetensors_loads_with_shift_005_and_shared_freq(tmp_path, reference):
    model, ids = reference
    save_file(hf_state(model), str(tmp_path / "model.safetensors"))
    loaded = load_official("hyenadna", tmp_path, modulation_shift=0.0)  # the same shift as the reference model
    mixer = loaded.backbone.layers[1].mixer.filter_fn.implicit_filter
    assert mixer[3].freq is mixer[1].freq
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids), model(ids))
    default = load_official("hyenadna", tmp_path / "model.safetensors")
    assert default.config.modulation_shift == 0.05
    assert default.backbone.layers[0].mixer.filter_fn.modulation.shift == 0.05


def test_convert_and_config_are_pure_functions_of_the_official_state(reference):
    model, _ = reference
    state = hf_state(model)
    config = official_hyenadna_config(state)
    assert config == dataclasses.replace(CFG, modulation_shift=0.05)
    converted = convert_official_hyenadna(state, config)
    assert converted.keys() == backbone_keys(model).keys()  # every Sin copy; the tied LM head left out
    assert torch.equal(converted["backbone.layers.0.mixer.filter_fn.implicit_filter.5.freq"],
                       state["hyena.backbone.layers.0.mixer.filter_fn.implicit_filter.1.freq"])
    HyenaDNALM(config).backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in converted.items()})


def test_load_official_by_registered_name_and_by_model(tmp_path):
    torch.manual_seed(1)
    published = HyenaDNALM(HyenaDNAConfig()).eval()  # the hyenadna_tiny_1k sizes
    torch.save({"state_dict": lightning_state(published)}, tmp_path / "weights.ckpt")
    ids = torch.randint(7, 12, (2, 40))
    named = load_official("hyenadna_tiny_1k", tmp_path).eval()
    into = load_official(HyenaDNALM(HyenaDNAConfig()), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(named(ids), published(ids))
        torch.testing.assert_close(into(ids), published(ids))


def test_classifier_loads_a_fine_tuned_decoder(tmp_path, reference):
    model, ids = reference
    state = lightning_state(model)
    state["decoder.0.output_transform.weight"] = torch.randn(3, 8)
    state["decoder.0.output_transform.bias"] = torch.randn(3)
    torch.save({"state_dict": state}, tmp_path / "weights.ckpt")
    clf = load_official("hyenadna", tmp_path / "weights.ckpt", n_classes=3)
    torch.testing.assert_close(clf.head.weight, state["decoder.0.output_transform.weight"])
    with pytest.warns(UserWarning, match=r"weights\.ckpt: the checkpoint's head\.bias \(3,\), head\.weight \(3, 8\) "
                                         r"do not fit hyenadna \(n_classes=5\) \(head\.bias \(5,\), head\.weight "
                                         r"\(5, 8\)\); it keeps its own, as initialised"):
        fresh = load_official("hyenadna", tmp_path / "weights.ckpt", n_classes=5)
    torch.testing.assert_close(fresh.backbone.ln_f.weight, model.backbone.ln_f.weight)


def _one_line_error(call, path, pattern):
    with pytest.raises(CheckpointError, match=pattern) as error:
        call()
    assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value)


def test_mismatched_config_names_the_keys(tmp_path, reference):
    model, _ = reference
    torch.save({"state_dict": lightning_state(model)}, tmp_path / "weights.ckpt")
    wrong_lmax = HyenaDNAConfig(d_model=8, n_layer=2, d_inner=16, l_max=1026, filter_order=16)
    _one_line_error(lambda: load_official(HyenaDNALM(wrong_lmax), tmp_path), tmp_path,
                    r"does not fit this HyenaDNALM: shape mismatches .*pos_emb.* \(1, 34, 5\) vs \(1, 1026, 5\)")
    deeper = HyenaDNAConfig(d_model=8, n_layer=3, d_inner=16, l_max=34, filter_order=16)
    _one_line_error(lambda: load_official(HyenaDNALM(deeper), tmp_path), tmp_path,
                    r"missing keys: backbone\.layers\.2\.")
    _one_line_error(lambda: load_official("hyenadna_tiny_1k", tmp_path), tmp_path,
                    r"does not fit hyenadna_tiny_1k: shape mismatches .*\(16, 8\) vs \(16, 128\)")
    state = lightning_state(model)
    state["model.backbone.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "extra.ckpt")
    _one_line_error(lambda: load_official(HyenaDNALM(CFG), tmp_path / "extra.ckpt"), tmp_path / "extra.ckpt",
                    r"unexpected keys: backbone\.extra\.weight$")


def test_unreadable_and_foreign_files_are_refused(tmp_path):
    _one_line_error(lambda: load_official("hyenadna", tmp_path), tmp_path, "no weights.ckpt, model.safetensors")
    (tmp_path / "weights.ckpt").write_text("not a checkpoint")
    _one_line_error(lambda: load_official("hyenadna", tmp_path), tmp_path / "weights.ckpt",
                    "not a readable PyTorch checkpoint")
    save_file({"encoder.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    _one_line_error(lambda: load_official("hyenadna", tmp_path / "other.safetensors"), tmp_path / "other.safetensors",
                    "no HyenaDNA backbone keys")
