"""MambaLM.from_pretrained on tiny random checkpoints written in the published layouts (and, where
transformers is installed, on checkpoints transformers itself saves, against its own logits)."""
import json

import pytest
import torch
from safetensors.torch import save_file

from ssmkit.core.mamba import MambaLM
from ssmkit.errors import CheckpointError

TOKENS = torch.tensor([[1, 5, 9, 2, 7, 7, 3, 0, 4, 8, 6, 1]])


def mamba_ssm_keys(model: MambaLM) -> dict:
    out = {}
    for key, value in model.state_dict().items():
        out[key if key == "lm_head.weight" else f"backbone.{key}"] = value.clone()
    return out


def hf_keys(model: MambaLM, tied: bool) -> dict:
    out = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            if not tied:
                out[key] = value.clone()
        else:
            out["backbone." + key.replace("embedding.weight", "embeddings.weight")] = value.clone()
    return out


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model.eval()(tokens)


@pytest.mark.parametrize("ssm_cfg,pad", [({}, 8), ({"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 2,
                                                    "chunk_size": 256}, 16)])
def test_mamba_ssm_layout(tmp_path, ssm_cfg, pad):
    torch.manual_seed(0)
    cfg = dict(ssm_cfg)
    mixer = "mamba2" if cfg.pop("layer", "Mamba1") == "Mamba2" else "mamba"
    ours = MambaLM(vocab_size=50, d_model=16, n_layer=2, pad_vocab_multiple=pad, mixer=mixer, **cfg)
    torch.save(mamba_ssm_keys(ours), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({
        "d_model": 16, "d_intermediate": 0, "n_layer": 2, "vocab_size": 50, "ssm_cfg": ssm_cfg, "attn_layer_idx": [],
        "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
        "pad_vocab_size_multiple": pad, "tie_embeddings": True}))
    loaded = MambaLM.from_pretrained(tmp_path)
    assert loaded.mixer == mixer and loaded.embedding.weight.shape[0] == (56 if pad == 8 else 64)
    assert logits(loaded).shape == (1, 12, 50)
    torch.testing.assert_close(logits(loaded), logits(ours))


@pytest.mark.parametrize("limit_text", ['[0.0, {"__float__": "Infinity"}]', "[0.0, Infinity]", '[0.0, "inf"]'])
def test_hf_mamba2_layout_with_each_encoding_of_infinity(tmp_path, limit_text):
    torch.manual_seed(1)
    ours = MambaLM(vocab_size=64, d_model=16, n_layer=2, pad_vocab_multiple=1, mixer="mamba2", d_state=8, headdim=8,
                   tie_embeddings=False)
    save_file(hf_keys(ours, tied=False), str(tmp_path / "model.safetensors"))
    config = {"architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", "hidden_size": 16,
              "num_hidden_layers": 2, "vocab_size": 64, "state_size": 8, "num_heads": 4, "head_dim": 8,
              "expand": 2, "conv_kernel": 4, "n_groups": 1, "chunk_size": 256, "use_bias": False,
              "use_conv_bias": True, "layer_norm_epsilon": 1e-5, "residual_in_fp32": True, "rms_norm": True,
              "tie_word_embeddings": False, "time_step_limit": "LIMIT"}
    (tmp_path / "config.json").write_text(json.dumps(config).replace('"LIMIT"', limit_text))
    loaded = MambaLM.from_pretrained(tmp_path)
    assert loaded.layers[0].mixer.dt_limit == (0.0, float("inf"))
    torch.testing.assert_close(logits(loaded), logits(ours))


def test_hf_mamba_layout_tied_head_left_out_of_the_file(tmp_path):
    torch.manual_seed(2)
    ours = MambaLM(vocab_size=56, d_model=16, n_layer=2, d_state=8, pad_vocab_multiple=1, dt_rank=3)
    save_file(hf_keys(ours, tied=True), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["MambaForCausalLM"], "model_type": "mamba", "hidden_size": 16, "num_hidden_layers": 2,
        "state_size": 8, "vocab_size": 56, "expand": 2, "conv_kernel": 4, "use_bias": False, "use_conv_bias": True,
        "time_step_rank": 3, "layer_norm_epsilon": 1e-5, "residual_in_fp32": True, "tie_word_embeddings": True}))
    loaded = MambaLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.embedding.weight
    torch.testing.assert_close(logits(loaded), logits(ours))


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_checkpoints_saved_by_transformers_give_its_logits(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    if kind == "mamba":
        config = transformers.MambaConfig(vocab_size=40, hidden_size=16, state_size=8, num_hidden_layers=2,
                                          time_step_rank=4)
        theirs = transformers.MambaForCausalLM(config)
    else:
        config = transformers.Mamba2Config(vocab_size=40, hidden_size=16, state_size=8, num_hidden_layers=2,
                                           num_heads=4, head_dim=8, n_groups=1, chunk_size=8)
        theirs = transformers.Mamba2ForCausalLM(config)
    with torch.no_grad():  # away from the zero/identity initial values, so every parameter matters
        for name, p in theirs.named_parameters():
            if name.endswith(("A_log", "D", "dt_bias")) or "norm" in name:
                p.uniform_(0.5, 1.5)
    theirs.eval().save_pretrained(tmp_path)
    ours = MambaLM.from_pretrained(tmp_path)
    with torch.no_grad():
        expected = theirs(TOKENS).logits
    torch.testing.assert_close(logits(ours), expected, rtol=1e-4, atol=1e-4)


def test_bad_folders_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json in this folder"):
        MambaLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 16, "n_layer": 2, "vocab_size": 50,
                                                      "attn_layer_idx": [1]}))
    with pytest.raises(CheckpointError, match="attention layers"):
        MambaLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 16, "n_layer": 2, "vocab_size": 50}))
    with pytest.raises(CheckpointError, match="no model.safetensors, pytorch_model.bin"):
        MambaLM.from_pretrained(tmp_path)
    torch.save(mamba_ssm_keys(MambaLM(vocab_size=50, d_model=8, n_layer=2)), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="shapes differ from config.json's model: embedding.weight"):
        MambaLM.from_pretrained(tmp_path)
