"""`ssmkit classify`: train / eval / predict through the CLI on the embedded digits, any timm model,
local pretrained weights, and the demo section."""
import json
import re

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import ssmkit.apps.cli as cli
from ssmkit.apps.classify import application, build_classifier
from ssmkit.errors import ConfigError
from ssmkit.vision.augment import mix_batch
from ssmkit.vision.data import load_digits_split

SMALL = ["--model", "vim_micro", "--model-kwargs", "embed_dim=32,depth=1"]


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def _digit_pngs(folder, n=6):
    folder.mkdir()
    _, test = load_digits_split(seed=0)
    paths = []
    for i in range(n):
        x, y = test.raw(i)
        path = folder / f"digit{i}_label{y}.png"
        Image.fromarray((x[0].numpy() * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def test_train_eval_predict_on_digits(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["classify", "train", *SMALL, "--out-dir", str(run), "--steps", "60", "--batch-size", "32",
                     "--lr", "1e-2", "--warmup-steps", "5", "--eval-every", "30", "--log-every", "30"]) == 0
    out = capsys.readouterr().out
    accuracy = float(re.findall(r"eval at step 60: accuracy ([\d.]+)", out)[-1])
    assert accuracy > 0.5, out  # chance is 0.1
    meta = json.loads((run / "run.json").read_text())
    assert meta == {"classes": [str(i) for i in range(10)], "channels": 1}
    assert {"best.safetensors", "model.safetensors", "config.toml", "run.json"} <= {p.name for p in run.iterdir()}
    # eval reads the run's model and data options from the run folder: nothing to repeat
    assert cli.main(["classify", "eval", "--out-dir", str(run)]) == 0
    assert "held-out images of digits" in capsys.readouterr().out
    record = json.loads((run / "eval.json").read_text())
    assert record["accuracy"] > 0.5 and 0 < record["nll"] < 2.3 and record["top5"] >= record["accuracy"]
    assert record["data"].endswith("held-out images of digits")
    # predict: top-k classes with probabilities from the run's class list
    pngs = _digit_pngs(tmp_path / "pngs")
    capsys.readouterr()
    assert cli.main(["classify", "predict", "--out-dir", str(run), "--images", str(tmp_path / "pngs"),
                     "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(pngs)
    right = 0
    for line in lines:
        m = re.fullmatch(r"(.+label(\d)\.png): (\d) ([\d.]+), (\d) ([\d.]+), (\d) ([\d.]+)", line)
        assert m, line
        probs = [float(m.group(i)) for i in (4, 6, 8)]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001
        right += m.group(2) == m.group(3)
    assert right >= len(pngs) // 2
    # a broken image: error naming it, or skipped
    (tmp_path / "pngs" / "bad.png").write_bytes(b"not a png")
    assert cli.main(["classify", "predict", "--out-dir", str(run), "--images", str(tmp_path / "pngs")]) == 1
    assert "bad.png" in capsys.readouterr().err
    assert cli.main(["classify", "predict", "--out-dir", str(run), "--images", str(tmp_path / "pngs"),
                     "--on-bad-image", "skip"]) == 0
    assert "bad.png: skipped" in capsys.readouterr().out


@pytest.mark.parametrize("name, size", [("vim_tiny", (192, 24)), ("vim_small", (384, 24)), ("vig_small", (384, 12))])
def test_registered_names_build_the_published_sizes(name, size):
    model = build_classifier(name, 10, 1, 32, {"patch_size": 16})
    width = model.embed_dim
    depth = len(model.layers) if hasattr(model, "layers") else len(model.blocks)
    assert (width, depth) == size and model.num_classes == 10


def test_any_timm_model_with_its_own_defaults_and_local_pretrained_weights(tmp_path, capsys):
    deit = build_classifier("deit_tiny_patch16_224", 10, 1, 32, {})
    assert deit.embed_dim == 192 and len(deit.blocks) == 12  # its own defaults, not ssmkit's CPU sizes
    assert build_classifier("resnet10t", 4, 3, 16, {}).fc.out_features == 4  # a CNN: no img_size
    # weights of an ImageNet-shaped resnet in a local file: a new 10-class head, a first conv for 1 channel
    source = timm.create_model("resnet10t", num_classes=1000)
    save_file(source.state_dict(), tmp_path / "resnet10t.safetensors")
    run = tmp_path / "run"
    assert cli.main(["classify", "train", "--model", "resnet10t", "--pretrained", str(tmp_path / "resnet10t.safetensors"),
                     "--out-dir", str(run), "--steps", "2", "--batch-size", "8", "--warmup-steps", "1",
                     "--eval-size", "20"]) == 0
    trained = load_file(run / "model.safetensors")
    assert trained["fc.weight"].shape == (10, 512) and trained["conv1.0.weight"].shape[1] == 1
    assert cli.main(["classify", "train", "--model", "resnet10t", "--pretrained", str(tmp_path / "nope.pth"),
                     "--out-dir", str(tmp_path / "r2")]) == 1
    assert "nope.pth does not exist" in capsys.readouterr().err
    (tmp_path / "junk.pth").write_bytes(b"junk")
    assert cli.main(["classify", "train", "--model", "resnet10t", "--pretrained", str(tmp_path / "junk.pth"),
                     "--out-dir", str(tmp_path / "r3")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "junk.pth does not fit resnet10t" in err[0]


def test_clear_errors(tmp_path, capsys):
    assert cli.main(["classify", "train", "--data", str(tmp_path / "nope"), "--out-dir", str(tmp_path / "r")]) == 1
    assert "not 'digits', 'fashion-mnist' or an existing folder" in capsys.readouterr().err
    assert cli.main(["classify", "train", "--model", "no_such_model_xyz", "--out-dir", str(tmp_path / "r")]) == 2
    assert "unknown model 'no_such_model_xyz'" in capsys.readouterr().err
    assert cli.main(["classify", "train", "--model", "vim_micro", "--img-size", "18", "--out-dir",
                     str(tmp_path / "r")]) == 2
    assert "multiple" in capsys.readouterr().err
    assert cli.main(["classify", "predict", "--out-dir", str(tmp_path / "none"), "--images", "x.png"]) == 1
    assert "holds no ssmkit run" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="key=value"):
        cli.build_config(application.train_config, {"model_kwargs": "num_heads"})


def test_train_on_an_image_folder_with_a_bad_file(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for c, name in enumerate(["dark", "light"]):
        (tmp_path / "f" / name).mkdir(parents=True)
        for i in range(8):
            img = rng.integers(0, 100, (12, 10, 3)) + 150 * c
            Image.fromarray(img.astype(np.uint8)).save(tmp_path / "f" / name / f"{i}.png")
    (tmp_path / "f" / "light" / "cut.png").write_bytes((tmp_path / "f" / "light" / "0.png").read_bytes()[:60])
    argv = ["classify", "train", "--data", str(tmp_path / "f"), *SMALL, "--img-size", "8", "--steps", "6",
            "--batch-size", "4", "--warmup-steps", "1", "--lr", "1e-2", "--out-dir", str(tmp_path / "run"),
            "--mixup", "0.2", "--cutmix", "1.0"]
    assert cli.main(argv) == 1
    assert "cut.png" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="cut.png"):
        assert cli.main([*argv, "--on-bad-image", "skip"]) == 0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["classes"] == ["dark", "light"]
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().strip().splitlines()[-1])
    assert record["split"] == "eval" and "top5" not in record  # two classes: no top-5
    # eval on other data with other classes is refused: the numbers would mean nothing
    assert cli.main(["classify", "eval", "--out-dir", str(tmp_path / "run"), "--data", "digits"]) == 1
    assert "have classes" in capsys.readouterr().err


def test_resume_continues_exactly(tmp_path, monkeypatch):
    """Augmentation draws depend on (seed, epoch, index) and mixup on the checkpointed RNG: a run killed
    after a checkpoint and resumed ends with the same weights as an uninterrupted one."""
    common = ["classify", "train", "--model", "vim_micro", "--model-kwargs", "embed_dim=8,depth=1", "--batch-size",
              "16", "--warmup-steps", "1", "--eval-every", "0", "--checkpoint-every", "3", "--mixup", "0.3", "--cutmix",
              "1.0", "--steps", "6"]
    assert cli.main([*common, "--out-dir", str(tmp_path / "full")]) == 0
    original, calls = application.train_loss, []

    def dies_at_step_5(model, batch, ctx):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(model, batch, ctx)

    monkeypatch.setattr(application, "train_loss", dies_at_step_5)
    assert cli.main([*common, "--out-dir", str(tmp_path / "part")]) == 130
    monkeypatch.setattr(application, "train_loss", original)
    assert cli.main([*common, "--out-dir", str(tmp_path / "part"), "--resume"]) == 0
    full, part = (load_file(tmp_path / name / "model.safetensors") for name in ("full", "part"))
    assert full.keys() == part.keys() and all(torch.equal(full[k], part[k]) for k in full)


def test_mixup_and_cutmix_batches():
    torch.manual_seed(0)
    x = torch.arange(4 * 16, dtype=torch.float).view(4, 1, 4, 4)
    y = torch.arange(4)
    mixed, y1, y2, lam = mix_batch(x, y, mixup=0.4, cutmix=0.0)
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0)) and torch.equal(y2, y.flip(0))
    mixed, _, _, lam = mix_batch(x, y, mixup=0.0, cutmix=1.0)
    from_self = (mixed == x).float().mean().item()
    assert abs(from_self - lam) < 1e-6  # lam is the share of pixels kept


def test_demo_smoke_section_renders(tmp_path):
    section = application.demo(tmp_path, smoke=True)
    names = {p.name for p in section.images}
    assert {"loss.png", "accuracy.png", "confusion.png", "predictions.png"} <= names
    assert all(p.is_file() and p.stat().st_size > 1000 for p in section.images)
    assert "top-1 accuracy" in section.metrics and section.tables[0].rows
