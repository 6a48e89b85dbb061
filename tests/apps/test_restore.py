"""`ssmkit restore`: training through the runner, baselines, test / run commands, bad input, demo."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import ssmkit
import ssmkit.apps.cli as cli
from ssmkit.apps.application import RunContext
from ssmkit.apps.restore import RestoreRun, RestoreTrain, _baseline, application, run
from ssmkit.apps.runner import Runner
from ssmkit.vision.metrics import psnr

TINY = dict(steps=2, batch_size=2, gt_patch=16, train_size=8, model_kwargs="embed_dim=8,depths=(1,),d_state=2",
            eval_crop=24, warmup_steps=1, log_every=1, eval_every=0)


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cli, "APPLICATIONS", ("ssmkit.apps.restore",))


def _flags(cfg: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in cfg.items()]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A GT folder of two small RGB photos (crops of the embedded images) and an odd-sized LQ file."""
    from ssmkit.vision.restoration import embedded_images

    root = tmp_path_factory.mktemp("restore_data")
    train, _ = embedded_images()
    (root / "gt").mkdir()
    for name in ("astronaut", "rocket"):
        arr = (train[name][:, 100:140, 100:136].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(root / "gt" / f"{name}.png")
    arr = (train["china"][:, :19, :27].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).save(root / "odd.png")
    return root


def test_a_few_steps_reduce_the_loss(images):
    cfg = RestoreTrain(**{**TINY, "model_kwargs": TINY["model_kwargs"] + ",interp_init=False"},
                       gt_dir=str(images / "gt"), eval_gt_dir=str(images / "gt"))
    torch.manual_seed(0)
    spec = application.setup(cfg)
    ctx = RunContext(cfg, spec.meta)
    model = application.build_model(ctx)
    batch = application.collate([spec.train[i] for i in range(4)])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = application.train_loss(model, batch, ctx)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_train_reports_model_and_bicubic_baseline(tmp_path, images):
    cfg = RestoreTrain(out_dir=str(tmp_path), **TINY, gt_dir=str(images / "gt"), eval_gt_dir=str(images / "gt"))
    cfg.validate()
    result = Runner(application, cfg).train()
    assert set(result.metrics) == set(application.metrics) and result.meta == {"scale": 2}
    # the baseline really is MATLAB bicubic of the LQ, scored on Y with a border of the scale
    eval_set = application.setup(cfg).eval
    values = [psnr(_baseline(eval_set[i]["lq"][None], 2), eval_set[i]["gt"][None], 2, True) for i in range(2)]
    assert result.metrics["baseline_psnr"] == pytest.approx(torch.cat(values).mean().item(), rel=1e-6)
    assert result.metrics["psnr_gain"] == pytest.approx(result.metrics["psnr"] - result.metrics["baseline_psnr"])


def test_denoising_beats_the_noisy_input(tmp_path):
    cfg = RestoreTrain(out_dir=str(tmp_path), task="denoise", sigma=25, model="mair_micro_denoise",
                       **{**TINY, "steps": 20, "train_size": 160, "batch_size": 8, "lr": 3e-3, "log_every": 10})
    cfg.validate()
    metrics = Runner(application, cfg).train().metrics
    assert metrics["psnr"] > metrics["baseline_psnr"] + 0.5, metrics


def test_super_resolution_beats_bicubic(tmp_path):
    """x2 SR with the default small model on the embedded photographs: 150 steps pass MATLAB bicubic on the
    held-out images (+0.6 dB with seed 0; ~10 s on an idle 2-core CPU)."""
    cfg = RestoreTrain(out_dir=str(tmp_path), task="sr", model="mair_micro_sr_x2", eval_every=0)
    cfg.validate()
    metrics = Runner(application, cfg).train().metrics
    assert metrics["psnr"] > metrics["baseline_psnr"] + 0.2, metrics


def test_cli_train_eval_test_and_run(tmp_path, images, capsys):
    flags = _flags({**TINY, "gt_dir": images / "gt", "eval_gt_dir": images / "gt", "out_dir": tmp_path})
    assert cli.main(["restore", "train", *flags]) == 0
    run_dir = ["--out-dir", str(tmp_path)]
    assert cli.main(["restore", "eval", *run_dir]) == 0
    assert cli.main(["restore", "test", *run_dir, "--tile", "8", "--tile-overlap", "4"]) == 0
    out = capsys.readouterr().out
    assert "PSNR (Y, crop 2)" in out and "astronaut" in out and "mean" in out
    result = json.loads((tmp_path / "test" / "results.json").read_text())
    assert [r["name"] for r in result["images"]] == ["astronaut", "rocket"] and result["baseline"] == "bicubic"
    assert (tmp_path / "test" / "astronaut.png").is_file()
    assert cli.main(["restore", "run", *run_dir, "--input", str(images / "odd.png"), "--tile", "10",
                     "--tile-overlap", "4"]) == 0
    with Image.open(tmp_path / "restored" / "odd.png") as im:
        assert im.size == (54, 38)


def test_test_scores_the_runs_own_eval_data_unless_told(tmp_path, images, capsys):
    """`restore test --out-dir R` scores R's eval folder (not the embedded photographs); data options given
    to `test` replace it."""
    flags = _flags({**TINY, "gt_dir": images / "gt", "eval_gt_dir": images / "gt", "out_dir": tmp_path})
    assert cli.main(["restore", "train", *flags]) == 0
    capsys.readouterr()
    assert cli.main(["restore", "test", "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "test" / "results.json").read_text())
    assert [r["name"] for r in result["images"]] == ["astronaut", "rocket"]
    assert str(images / "gt") in result["data"]
    assert cli.main(["restore", "test", "--out-dir", str(tmp_path), "--eval-gt-dir", "", "--eval-crop", "24",
                     "--output", str(tmp_path / "embedded")]) == 0
    result = json.loads((tmp_path / "embedded" / "results.json").read_text())
    assert len(result["images"]) == 3 and "embedded" in result["data"]


def test_run_tiled_equals_whole_when_the_tile_covers_the_image(tmp_path, images):
    flags = _flags({**TINY, "gt_dir": images / "gt", "eval_gt_dir": images / "gt", "out_dir": tmp_path})
    assert cli.main(["restore", "train", *flags]) == 0
    base = dict(out_dir=str(tmp_path), input=str(images / "odd.png"))
    whole = run(RestoreRun(**base, output=str(tmp_path / "a")))[0]
    tiled = run(RestoreRun(**base, output=str(tmp_path / "b"), tile=32))[0]
    assert np.array_equal(np.asarray(Image.open(whole)), np.asarray(Image.open(tiled)))


def test_bad_input_gives_clear_errors(tmp_path, images, capsys):
    (tmp_path / "empty").mkdir()
    base = _flags({**TINY, "out_dir": tmp_path / "run"})
    assert cli.main(["restore", "train", *base, "--gt-dir", str(tmp_path / "empty")]) == 1
    assert "holds no images" in capsys.readouterr().err
    assert cli.main(["restore", "train", *base, "--gt-dir", str(images / "gt"), "--gt-patch", "64"]) == 1
    assert "is smaller than the patch 64" in capsys.readouterr().err
    (tmp_path / "gray").mkdir()
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(tmp_path / "gray" / "flat.png")
    assert cli.main(["restore", "train", *base, "--gt-dir", str(tmp_path / "gray")]) == 1
    assert "holds grayscale images" in capsys.readouterr().err
    assert cli.main(["restore", "train", *base, "--model", "mair_nope"]) == 2
    assert cli.main(["restore", "train", *base, "--degradation", "sharpen2"]) == 2
    assert "unknown degradation" in capsys.readouterr().err
    assert cli.main(["restore", "train", *base, "--gt-patch", "15"]) == 2
    assert cli.main(["restore", "run", "--out-dir", str(tmp_path / "run"), "--input", str(tmp_path / "nothing.png"),
                     "--weights", str(tmp_path / "none.safetensors")]) == 1


# ssmkit name -> official MaIR name (mair_arch.py), applied in order
_TO_OFFICIAL = (("embed_norm.", "patch_embed.norm."), (".mixer.ssa.proj.", ".self_attention.gating.gating.1."),
                (".mixer.", ".self_attention."), (".mlp.", ".conv_blk."), (".norm1.", ".ln_1."), (".norm2.", ".ln_2."))


def _official_name(key: str) -> str:
    parts = key.split(".")
    if parts[0] == "groups":
        inner = "residual_group." if parts[2] == "blocks" else ""
        key = f"layers.{parts[1]}.{inner}{'.'.join(parts[2:])}"
    for ours, theirs in _TO_OFFICIAL:
        key = key.replace(ours, theirs)
    return key[: -len("skip_scale1")] + "skip_scale" if key.endswith("skip_scale1") else key


def test_official_weights_run_without_a_run(tmp_path, images, capsys):
    """`--official-weights` loads a BasicSR checkpoint of the official code into the configured model."""
    torch.manual_seed(0)
    kwargs = "embed_dim=8,depths=(1,),d_state=2"
    source = ssmkit.create_model("mair_micro_sr_x2", embed_dim=8, depths=(1,), d_state=2)
    path = tmp_path / "MaIR_x2.pth"
    torch.save({"params": {_official_name(k): v for k, v in source.state_dict().items()}}, path)
    cfg = RestoreRun(out_dir=str(tmp_path), model_kwargs=kwargs, official_weights=str(path), input="x")
    loaded = application.build_model(RunContext(cfg, {}))
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in loaded.state_dict().items())
    flags = ["--out-dir", str(tmp_path), "--model-kwargs", kwargs, "--input", str(images / "odd.png")]
    assert cli.main(["restore", "run", *flags, "--official-weights", str(path)]) == 0
    with Image.open(tmp_path / "restored" / "odd.png") as im:
        assert im.size == (54, 38)
    (tmp_path / "broken.pth").write_text("not a checkpoint")
    capsys.readouterr()
    assert cli.main(["restore", "run", *flags, "--official-weights", str(tmp_path / "broken.pth")]) == 1
    assert f"{tmp_path / 'broken.pth'}: not a readable PyTorch checkpoint" in capsys.readouterr().err


def test_demo_smoke_section_renders(tmp_path, capsys):
    assert cli.main(["demo", "--smoke", "--out-dir", str(tmp_path)]) == 0
    assert "restore: PSNR (Y, crop 2)" in capsys.readouterr().out
    page = (tmp_path / "index.html").read_text()
    assert "Image super-resolution x2 with MaIR" in page and "restore/comparison.png" in page
    assert (tmp_path / "restore" / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
