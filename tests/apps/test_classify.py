"""`ssmkit classify`: train / eval / predict through the CLI on the embedded digits, and the demo section."""
import json
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import ssmkit
import ssmkit.apps.cli as cli
from ssmkit.apps.classify import ClassifyConfig, application, build_classifier, mix_batch
from ssmkit.apps.config import ConfigError
from ssmkit.apps.runner import RunError
from ssmkit.vision.data import load_digits_split

TINY = "_test_tiny_patch_classifier"


class TinyPatchClassifier(nn.Module):
    """Patch embedding + GELU + linear on all patches: the Vim/ViG constructor signature, learns digits in seconds."""

    def __init__(self, num_classes=10, in_chans=3, img_size=32, patch_size=4, embed_dim=32, depth=1,
                 drop_path_rate=0.0, **kwargs):
        super().__init__()
        self.img_size = img_size
        self.embed = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.GELU(), nn.Conv2d(embed_dim, embed_dim, 1))
                                      for _ in range(depth)])
        self.head = nn.Linear(embed_dim * (img_size // patch_size) ** 2, num_classes)

    def forward(self, x):
        assert x.shape[-1] == self.img_size
        return self.head(self.blocks(self.embed(x)).flatten(1))


if TINY not in ssmkit.list_models():
    ssmkit.register_model(TinyPatchClassifier, name=TINY)

HAVE_VIM = "vim_tiny" in ssmkit.list_models()
VIM_SMALL = ["--model", "vim_tiny", "--img-size", "16", "--patch-size", "4", "--embed-dim", "16", "--depth", "1"]


@pytest.fixture(autouse=True)
def classify_in_cli(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    if "ssmkit.apps.classify" not in cli.APPLICATIONS:
        monkeypatch.setattr(cli, "APPLICATIONS", (*cli.APPLICATIONS, "ssmkit.apps.classify"))


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
    argv = ["--model", TINY, "--embed-dim", "32", "--depth", "1", "--out-dir", str(run)]
    assert cli.main(["classify", "train", *argv, "--steps", "60", "--batch-size", "32", "--lr", "1e-2",
                     "--warmup-steps", "5", "--eval-every", "30", "--log-every", "30"]) == 0
    out = capsys.readouterr().out
    accuracy = float(re.findall(r"eval at step 60: accuracy ([\d.]+)", out)[-1])
    assert accuracy > 0.5, out  # chance is 0.1
    assert json.loads((run / "classes.json").read_text())["classes"] == [str(i) for i in range(10)]
    assert {"best.safetensors", "model.safetensors", "config.toml"} <= {p.name for p in run.iterdir()}
    # eval reads the run's model options from config.toml: no need to repeat --model/--embed-dim
    assert cli.main(["classify", "eval", "--out-dir", str(run)]) == 0
    record = json.loads((run / "eval.json").read_text())
    assert record["accuracy"] > 0.5 and 0 < record["nll"] < 2.3 and record["top5"] >= record["accuracy"]
    # predict: top-k classes with probabilities from the saved class list
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


def test_clear_errors(tmp_path, capsys):
    assert cli.main(["classify", "train", "--patch-size", "32", "--img-size", "16"]) == 2
    assert "patch_size (32) is larger than img_size (16)" in capsys.readouterr().err
    assert cli.main(["classify", "train", "--data", str(tmp_path / "nope"), "--out-dir", str(tmp_path / "r")]) == 1
    assert "not 'digits', 'fashion-mnist' or an existing folder" in capsys.readouterr().err
    assert cli.main(["classify", "train", "--model", "no_such_model_xyz", "--out-dir", str(tmp_path / "r")]) == 1
    assert "unknown model 'no_such_model_xyz'" in capsys.readouterr().err
    assert cli.main(["classify", "train", "--patch-size", "12", "--img-size", "16", "--model", TINY,
                     "--out-dir", str(tmp_path / "r")]) == 1
    assert "smaller than one patch" in capsys.readouterr().err
    assert cli.main(["classify", "predict", "--out-dir", str(tmp_path / "none"), "--images", "x.png"]) == 1
    assert "classes.json does not exist" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="key=value"):
        ClassifyConfig(model_kwargs="num_heads").validate()


def test_train_on_an_image_folder_with_a_bad_file(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for c, name in enumerate(["dark", "light"]):
        (tmp_path / "f" / name).mkdir(parents=True)
        for i in range(8):
            img = rng.integers(0, 100, (12, 10, 3)) + 150 * c
            Image.fromarray(img.astype(np.uint8)).save(tmp_path / "f" / name / f"{i}.png")
    (tmp_path / "f" / "light" / "cut.png").write_bytes((tmp_path / "f" / "light" / "0.png").read_bytes()[:60])
    argv = ["classify", "train", "--data", str(tmp_path / "f"), "--model", TINY, "--img-size", "8", "--patch-size",
            "4", "--steps", "6", "--batch-size", "4", "--warmup-steps", "1", "--lr", "1e-2", "--out-dir",
            str(tmp_path / "run"), "--mixup", "0.2", "--cutmix", "1.0"]
    assert cli.main(argv) == 1
    assert "cut.png" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="cut.png"):
        assert cli.main([*argv, "--on-bad-image", "skip"]) == 0
    assert json.loads((tmp_path / "run" / "classes.json").read_text())["classes"] == ["dark", "light"]
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().strip().splitlines()[-1])
    assert record["split"] == "eval" and "top5" not in record  # two classes: no top-5


def test_resume_continues_exactly(tmp_path, monkeypatch):
    """Augmentation draws depend on (seed, epoch, index) and mixup on the checkpointed RNG: a run killed
    after a checkpoint and resumed ends with the same weights as an uninterrupted one."""
    from safetensors.torch import load_file

    common = ["classify", "train", "--model", TINY, "--embed-dim", "8", "--batch-size", "16", "--warmup-steps", "1",
              "--eval-every", "0", "--checkpoint-every", "3", "--mixup", "0.3", "--cutmix", "1.0", "--steps", "6"]
    assert cli.main([*common, "--out-dir", str(tmp_path / "full")]) == 0
    original, calls = application.train_loss, []

    def dies_at_step_5(model, batch):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(model, batch)

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


@pytest.mark.skipif(not HAVE_VIM, reason="ssmkit.vision.vim (vim_tiny) is not in the registry yet")
def test_vim_tiny_learns_digits(tmp_path, capsys):
    model = build_classifier("ssmkit_vim_tiny", 10, 1, 16, 4, 16, 1)
    assert type(model).__name__ == "VisionMamba" and model(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
    run = tmp_path / "vim"
    assert cli.main(["classify", "train", *VIM_SMALL, "--out-dir", str(run), "--steps", "40", "--batch-size", "32",
                     "--lr", "5e-3", "--warmup-steps", "4", "--eval-every", "0", "--log-every", "20"]) == 0
    record = json.loads((run / "metrics.jsonl").read_text().strip().splitlines()[-1])
    assert record["split"] == "eval" and record["accuracy"] > 0.3, record  # chance is 0.1


def test_demo_smoke_section_renders(tmp_path, monkeypatch):
    if not HAVE_VIM:
        monkeypatch.setattr(application, "demo_overrides", {"model": TINY, "lr": 1e-2})
    section = application.demo(tmp_path, smoke=True)
    names = {p.name for p in section.images}
    assert {"loss.png", "accuracy.png", "confusion.png", "predictions.png"} <= names
    assert all(p.is_file() and p.stat().st_size > 1000 for p in section.images)
    assert "top-1 accuracy" in section.metrics and section.tables[0].rows


def test_unknown_model_without_registry_entry_names_it():
    with pytest.raises(RunError, match="unknown model"):
        build_classifier("definitely_not_a_model", 10, 1, 16, 4, 16, 1)
