"""Official SaShiMi checkpoints: an official-layout state dict written here from an ssmkit model by an
independent inverse mapping (weight-norm split, (channel, sample) pool order, C̃ = C(I − Āᴸ), inv_dt under
both transforms, leading singleton dims) must load back to the same logits."""
import dataclasses
import json
import math

import pytest
import soundfile as sf
import torch

import ssmkit.apps.cli as cli
from ssmkit.audio.checkpoints import convert_official_sashimi, official_sashimi_config
from ssmkit.errors import CheckpointError
from ssmkit.audio.sashimi import SashimiLM, ScalarNorm
from ssmkit.registry import load_official


def _tiny(norm="scalar", n_ssm=1, seed=0):
    torch.manual_seed(seed)
    model = SashimiLM(d_model=4, n_layers=1, d_state=4, kernel="dplr", n_ssm=n_ssm, norm=norm).double()
    with torch.no_grad():  # move every parameter off its initial value (norm scalars, biases, ...)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _official(model, dt_transform="softplus", lengths=(12, 0)):
    """The state dict the official code would hold for `model` (keys of state-spaces/s4, V4 layout)."""
    out = {"encoder.0.weight": model.embedding.weight, "decoder.0.output_transform.weight": model.head.weight,
           "decoder.0.output_transform.bias": model.head.bias, "model.norm.weight": model.backbone.norm.weight,
           "model.norm.bias": model.backbone.norm.bias}

    def weight_norm(prefix, w):
        scale = torch.rand(w.shape[0], 1, dtype=w.dtype) + 0.5  # v is any positive multiple of each row
        out[f"{prefix}.weight_g"] = w.norm(dim=1, keepdim=True)
        out[f"{prefix}.weight_v"] = w * scale

    for i, pool in enumerate(model.backbone.down):
        w, p = pool.linear.weight, pool.pool
        h = w.shape[1] // p
        official = torch.empty_like(w)
        for c in range(h):
            for s in range(p):
                official[:, c * p + s] = w[:, s * h + c]  # official column (channel, sample)
        weight_norm(f"model.d_layers.{i}.linear", official)
        out[f"model.d_layers.{i}.linear.bias"] = pool.linear.bias
    for k, pool in enumerate(model.backbone.up):
        w, b, p, d = pool.linear.weight, pool.linear.bias, pool.pool, pool.d_out
        rows = [s * d + c for c in range(d) for s in range(p)]  # official row c·p + s holds ssmkit row s·d + c
        weight_norm(f"model.u_layers.{k}.0.linear", w[rows])
        out[f"model.u_layers.{k}.0.linear.bias"] = b[rows]

    blocks = [(layer, f"model.c_layers.{j}") for j, layer in enumerate(model.backbone.center)]
    for k, stage in enumerate(model.backbone.up_stages):
        blocks += [(layer, f"model.u_layers.{k}.{j + 1}") for j, layer in enumerate(stage)]
    for j, (block, key) in enumerate(blocks):
        if isinstance(block.norm, ScalarNorm):
            out[f"{key}.norm.norm.m"], out[f"{key}.norm.norm.s"] = block.norm.m, block.norm.s
        else:
            out[f"{key}.norm.norm.ln.weight"], out[f"{key}.norm.norm.ln.bias"] = block.norm.weight, block.norm.bias
        if j % 2:
            net = block.layer.net
            out.update({f"{key}.layer.ff.0.0.weight": net[0].weight, f"{key}.layer.ff.0.0.bias": net[0].bias,
                        f"{key}.layer.ff.2.weight": net[3].weight, f"{key}.layer.ff.2.bias": net[3].bias})
            continue
        s4, kernel = block.layer.s4, block.layer.s4.kernel
        dt = kernel.log_dt.exp()
        inv_dt = torch.log(torch.expm1(dt)) if dt_transform == "softplus" else torch.log(dt)
        length = lengths[(j // 2) % len(lengths)]
        c_full = kernel.output() * 2  # [C, C̄]
        if length:
            dA = kernel.discrete()[0]
            power = torch.eye(dA.shape[-1], dtype=dA.dtype).expand_as(dA)
            for _ in range(length):
                power = power @ dA
            c_full = c_full - torch.einsum("hn,hnm->hm", c_full, power)
        c_tilde = c_full[:, : kernel.d_state // 2]
        out.update({f"{key}.layer.layer.kernel.inv_dt": inv_dt[:, None],
                    f"{key}.layer.layer.kernel.A_real": kernel.log_A_real,
                    f"{key}.layer.layer.kernel.A_imag": kernel.A_imag,
                    f"{key}.layer.layer.kernel.B": kernel.B[None], f"{key}.layer.layer.kernel.P": kernel.P[None],
                    f"{key}.layer.layer.kernel.C": torch.view_as_real(c_tilde)[None],
                    f"{key}.layer.layer.kernel.l_kernel": torch.tensor(length),
                    f"{key}.layer.layer.D": s4.D[None],
                    f"{key}.layer.output_linear.0.weight": block.layer.output_linear.weight,
                    f"{key}.layer.output_linear.0.bias": block.layer.output_linear.bias})
    return {k: v.detach().clone() for k, v in out.items()}


def _converted(state, dt_transform="softplus"):
    """A float64 SashimiLM holding `state`, through the pure functions (strict load_state_dict)."""
    config = official_sashimi_config(state)
    model = SashimiLM(config).double()
    model.load_state_dict(convert_official_sashimi(state, config, dt_transform))
    return model.eval()


@pytest.mark.parametrize("dt_transform", ["softplus", "exp"])
@pytest.mark.parametrize("norm,n_ssm", [("scalar", 1), ("layer", None)])
def test_official_layout_loads_back_to_the_same_logits(dt_transform, norm, n_ssm):
    model = _tiny(norm, n_ssm)
    tokens = torch.randint(0, 256, (2, 32))
    state = _official(model, dt_transform)
    assert official_sashimi_config(state) == model.config
    with torch.no_grad():
        torch.testing.assert_close(_converted(state, dt_transform)(tokens), model(tokens), rtol=0, atol=1e-5)


def test_the_wrong_dt_transform_or_a_missing_c_correction_changes_the_logits():
    model = _tiny()
    tokens = torch.randint(0, 256, (1, 32))
    state = _official(model, "softplus")
    with torch.no_grad():
        reference = model(tokens)
        assert (_converted(state, "exp")(tokens) - reference).abs().max() > 1e-4  # test tolerance: 1e-5
        state["model.c_layers.0.layer.layer.kernel.l_kernel"] = torch.tensor(0)  # C̃ taken for C
        assert (_converted(state, "softplus")(tokens) - reference).abs().max() > 1e-4


def test_load_official_by_family_name_and_model_from_files(tmp_path):
    model = _tiny()
    state = _official(model)
    torch.save({k: v.float() for k, v in state.items()}, tmp_path / "sashimi.pt")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "last.ckpt")
    tokens = torch.randint(0, 256, (1, 16))
    sizes = dict(d_model=4, n_layers=1, d_state=4, norm="scalar")  # sashimi_sc09 at the tiny model's sizes
    with torch.no_grad():
        reference = model(tokens).float()
        for name in ("sashimi.pt", "last.ckpt"):
            loaded = load_official("sashimi", tmp_path / name)  # sizes from the checkpoint
            assert loaded.config == model.config and loaded.head.weight.dtype == torch.float32
            torch.testing.assert_close(loaded.eval()(tokens), reference, rtol=0, atol=1e-4)
        named = load_official("sashimi_sc09", tmp_path / "sashimi.pt", **sizes).eval()
        torch.testing.assert_close(named(tokens), reference, rtol=0, atol=1e-4)
        into = load_official(SashimiLM(model.config), tmp_path / "sashimi.pt", dt_transform="softplus").eval()
        torch.testing.assert_close(into(tokens), reference, rtol=0, atol=1e-4)


def test_bad_checkpoints_name_the_file_and_the_key(tmp_path):
    state = _official(_tiny())

    def refused(name, saved, pattern):
        if saved is not None:
            torch.save(saved, tmp_path / name)
        with pytest.raises(CheckpointError, match=pattern) as error:
            load_official("sashimi", tmp_path / name)
        assert str(error.value).startswith(f"{tmp_path / name}: ") and "\n" not in str(error.value)

    missing = dict(state)
    del missing["model.u_layers.1.1.layer.layer.kernel.P"]
    refused("missing.pt", missing, r"missing\.pt: missing key 'model\.u_layers\.1\.1\.layer\.layer\.kernel\.P'$")
    refused("wrong.pt", {**state, "model.c_layers.1.layer.ff.2.bias": torch.zeros(5)},
            r"wrong\.pt: key 'model\.c_layers\.1\.layer\.ff\.2\.bias' has shape \(5,\)")
    refused("extra.pt", {**state, "model.extra": torch.zeros(1)}, r"extra\.pt: unexpected keys \['model\.extra'\]$")
    refused("absent.pt", None, r"absent\.pt: no such file$")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    refused("junk.pt", None, r"junk\.pt: not a readable PyTorch checkpoint")
    refused("v3.pt", {"model.c_layers.0.layer.kernel.kernel.log_dt": torch.zeros(4)}, r"v3\.pt: a V3")
    torch.save(state, tmp_path / "sashimi.pt")  # scalar norms, loaded into a model with LayerNorms
    with pytest.raises(CheckpointError, match=r"sashimi\.pt: missing key 'model\.c_layers\.0\.norm\.norm\.weight'"):
        load_official(SashimiLM(dataclasses.replace(_tiny().config, norm="layer")), tmp_path / "sashimi.pt")


def test_channel_interleaved_state_sharing_is_refused():
    state = _official(_tiny(n_ssm=1))
    for key in [k for k in state if k.endswith(("A_real", "A_imag"))]:
        state[key] = state[key].repeat(2, 1)
    for key in [k for k in state if k.endswith((".B", ".P"))]:
        state[key] = state[key].repeat(1, 2, 1, 1)
    with pytest.raises(CheckpointError, match="n_ssm = 2"):
        official_sashimi_config(state)
    with pytest.raises(CheckpointError, match="n_ssm = 2"):
        convert_official_sashimi(state, dataclasses.replace(_tiny().config, n_ssm=2))


def test_scalar_norm_is_the_direct_formula():
    norm = ScalarNorm().double()
    with torch.no_grad():
        norm.m.fill_(0.3)
        norm.s.fill_(1.7)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    for row in x.reshape(-1, 6):
        mean = row.sum() / 6
        std = math.sqrt(((row - mean) ** 2).sum() / 6)  # population std, no eps
        torch.testing.assert_close(norm(row[None])[0], 1.7 / std * (row - mean + 0.3))


def test_cli_generate_and_score_run_an_official_checkpoint(tmp_path, monkeypatch, capsys):
    """`ssmkit audio generate|score --official FILE`: the file's model samples and scores (its sizes come from
    the file, not the size options); a bad file is a one-line error naming it; --weights with it is refused."""
    monkeypatch.setattr(cli, "APPLICATIONS", ("ssmkit.apps.audio",))
    model = _tiny()
    torch.save({k: v.float() for k, v in _official(model).items()}, tmp_path / "sashimi.pt")
    out = tmp_path / "gen"
    assert cli.main(["audio", "generate", "--official", str(tmp_path / "sashimi.pt"), "--n-samples", "2",
                     "--length", "32", "--output", str(out), "--out-dir", str(tmp_path)]) == 0
    record = json.loads((out / "generate.json").read_text())
    assert len(record["wavs"]) == 2 and sf.read(record["wavs"][0])[0].shape == (32,)
    wavs = tmp_path / "wavs"
    wavs.mkdir()
    sf.write(str(wavs / "a.wav"), torch.sin(torch.arange(400) / 5.0).numpy() * 0.3, 16000, subtype="PCM_16")
    assert cli.main(["audio", "score", "--official", str(tmp_path / "sashimi.pt"), "--score-dir", str(wavs),
                     "--out-dir", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "score.json").read_text())["weights"] == str(tmp_path / "sashimi.pt")

    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert cli.main(["audio", "score", "--official", str(tmp_path / "broken.pt"), "--score-dir", str(wavs)]) == 1
    assert "broken.pt" in capsys.readouterr().err
    assert cli.main(["audio", "score", "--official", str(tmp_path / "sashimi.pt"), "--weights", "w.safetensors",
                     "--score-dir", str(wavs)]) == 2
