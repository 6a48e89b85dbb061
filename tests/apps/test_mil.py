"""`ssmkit mil`: k-fold train and eval through the shared runner, survival, leakage refusal, extract,
heatmap, clear errors, and the demo section."""
import json

import numpy as np
import pytest
import tifffile
import torch

import ssmkit
import ssmkit.apps.cli as cli
from ssmkit.apps.mil import application, draw_scores
from ssmkit.errors import ConfigError
from ssmkit.medical.data import make_synthetic_bags, write_splits
from ssmkit.medical.metrics import classification_metrics

TINY = ["--synthetic-cases", "16", "--synthetic-dim", "8", "--model-kwargs", "d_model=8,n_layers=1", "--epochs", "1",
        "--lr", "1e-3"]


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cli, "APPLICATIONS", ("ssmkit.apps.mil",))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Bags of a few instances: intra-op threads only add overhead (and stall on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cli_kfold_train_then_eval(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli.main(["mil", "train", *TINY, "--k", "2", "--out-dir", out]) == 0
    for fold in (0, 1):  # each fold's run holds the same deterministic synthetic data
        assert (tmp_path / "run" / f"fold_{fold}" / "synthetic" / "slides.csv").is_file()
    trained = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert set(trained) == {"0", "1"} and {"auc", "balanced_acc", "f1", "loss"} == set(trained["0"])
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*") if "synthetic" in str(p))
    assert cli.main(["mil", "eval", "--out-dir", out]) == 0  # the run's own sizes, folds and data
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*") if "synthetic" in str(p)) == before
    evaluated = json.loads((tmp_path / "run" / "eval_summary.json").read_text())
    for fold in ("0", "1"):  # eval reloads best.safetensors: the same numbers as the end of training
        assert evaluated[fold]["loss"] == pytest.approx(trained[fold]["loss"], rel=1e-5)
    text = capsys.readouterr().out
    assert "mean ± std" in text and "fold" in text


def test_survival_task_reports_cindex(tmp_path):
    cfg_args = [*TINY, "--task", "survival", "--k", "2", "--fold", "1", "--model", "abmil", "--model-kwargs",
                "d_model=8", "--out-dir", str(tmp_path)]
    assert cli.main(["mil", "train", *cfg_args]) == 0
    metrics = json.loads((tmp_path / "train_summary.json").read_text())["1"]
    assert set(metrics) == {"c_index", "loss"} and 0 <= metrics["c_index"] <= 1


def test_leaky_splits_are_refused_unless_allowed(tmp_path, capsys):
    data = tmp_path / "bags"
    make_synthetic_bags(data, n_cases=8, dim=4, min_instances=4, max_instances=6, seed=0)
    # patient_003 has two slides: one in train, one in val
    write_splits(data / "splits", [{"train": ["patient_000_slide0", "patient_001_slide0", "patient_003_slide0"],
                                    "val": ["patient_002_slide0", "patient_003_slide1", "patient_004_slide0"],
                                    "test": []}])
    args = ["mil", "train", "--data-dir", str(data), "--split-dir", str(data / "splits"), "--k", "1",
            "--model", "meanmil", "--model-kwargs", "d_model=4", "--epochs", "1", "--out-dir", str(tmp_path / "run")]
    assert cli.main(args) == 1
    assert "patient_003" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="LEAKAGE"):
        assert cli.main([*args, "--allow-leakage", "--overwrite"]) == 0


def _one_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ssmkit: error: "), err
    return err[0]


def test_bad_data_errors_name_the_problem_before_training(tmp_path, capsys):
    data = tmp_path / "bags"
    make_synthetic_bags(data, n_cases=6, dim=4, min_instances=4, max_instances=6, seed=0)
    (data / "h5_files").rename(data / "no_h5")  # read the .pt bags
    base = ["mil", "train", "--data-dir", str(data), "--k", "2", "--epochs", "1", "--out-dir", str(tmp_path / "r")]
    assert cli.main([*base, "--in-dim", "1024"]) == 1
    assert "feature width 4, not --in-dim 1024" in _one_line(capsys)
    pt = data / "pt_files"
    bad = {"patient_003_slide0": torch.zeros(5, 7), "patient_004_slide0": torch.zeros(2, 5, 4),
           "patient_005_slide0": {"features": torch.zeros(5, 4)}}
    for name, value in bad.items():
        original = (pt / f"{name}.pt").read_bytes()
        torch.save(value, pt / f"{name}.pt")
        assert cli.main(base) == 1
        line = _one_line(capsys)
        assert f"{name}.pt" in line and not (tmp_path / "r" / "fold_0" / "metrics.jsonl").exists(), line
        (pt / f"{name}.pt").write_bytes(original)
    (pt / "patient_000_slide0.pt").write_bytes(b"not a torch file")
    assert cli.main(base) == 1
    assert "patient_000_slide0.pt is not a readable .pt feature bag" in _one_line(capsys)
    # the first bag the odd one: the message names it, not a good bag
    torch.save(torch.zeros(5, 9), pt / "patient_000_slide0.pt")
    assert cli.main(base) == 1
    assert "patient_000_slide0.pt: feature width 9, not 4, the width of the other" in _one_line(capsys)
    (pt / "patient_000_slide0.pt").unlink()
    assert cli.main(base) == 1
    assert "slide patient_000_slide0 is listed in the CSV but has no bag" in _one_line(capsys)
    assert cli.main(["mil", "train", "--data-dir", str(tmp_path / "nothing")]) == 1
    assert "--data-dir" in _one_line(capsys)


def test_extract_refuses_an_unknown_backbone_and_garbage_weights(tmp_path, capsys):
    assert cli.main(["mil", "extract", "--backbone", "resnet_51", "--random-init", "--out", str(tmp_path / "f")]) == 2
    assert "--backbone 'resnet_51' is not a timm model" in _one_line(capsys)
    (tmp_path / "w.pth").write_bytes(b"garbage")
    assert cli.main(["mil", "extract", "--backbone", "resnet10t", "--weights", str(tmp_path / "w.pth"),
                     "--out", str(tmp_path / "f")]) == 1
    assert "w.pth do not fit timm's resnet10t" in _one_line(capsys)
    assert not (tmp_path / "f").exists()


def write_slide(path):
    img = np.full((384, 512, 3), 235, np.uint8)
    img[:, :256] = (170, 60, 140)
    img[::7, :256, 0] = 90
    tifffile.imwrite(path, img, tile=(64, 64), photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")


def test_extract_and_heatmap(tmp_path, capsys):
    slides = tmp_path / "slides"
    slides.mkdir()
    write_slide(slides / "s1.tif")
    common = ["--backbone", "resnet10t", "--random-init", "--image-size", "32", "--patch-size", "128",
              "--out", str(tmp_path / "feats")]
    assert cli.main(["mil", "extract", "--slide-dir", str(slides), *common]) == 0
    feats = tmp_path / "feats"
    assert (feats / "h5_files" / "s1.h5").is_file() and (feats / "pt_files" / "s1.pt").is_file()
    (tmp_path / "slides.csv").write_text("case_id,slide_id\np1,s1\np2,s2\n")
    assert cli.main(["mil", "extract", "--slide-dir", str(slides), "--csv", str(tmp_path / "slides.csv"), *common]) == 1
    assert "1 slide(s) listed in" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["mil", "extract", "--slide-dir", str(tmp_path / "empty"), *common]) == 1
    assert "holds no slides" in capsys.readouterr().err
    assert cli.main(["mil", "extract", "--slide-dir", str(slides), "--backbone", "resnet10t",
                     "--out", str(tmp_path / "f2")]) == 2
    assert "--random-init" in capsys.readouterr().err

    model = ssmkit.create_model("abmil", in_dim=512, d_model=8).eval()
    png = draw_scores(model, "abmil", str(slides / "s1.tif"), str(feats), tmp_path / "heat.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ConfigError, match="no per-instance scores"):
        draw_scores(ssmkit.create_model("transmil_lite", in_dim=512, d_model=8, heads=2), "transmil_lite",
                    str(slides / "s1.tif"), str(feats), tmp_path / "heat.png")


def test_heatmap_command_uses_a_trained_fold(tmp_path, capsys):
    slides = tmp_path / "slides"
    slides.mkdir()
    write_slide(slides / "s1.tif")
    feats = tmp_path / "feats"
    assert cli.main(["mil", "extract", "--slide-dir", str(slides), "--backbone", "resnet10t", "--random-init",
                     "--image-size", "32", "--patch-size", "64", "--out", str(feats)]) == 0
    (feats / "slides.csv").write_text("case_id,slide_id,label\n" + "".join(
        f"p{i},s{i},{'ab'[i % 2]}\n" for i in range(4)))
    for i in range(4):
        for kind in ("h5_files", "pt_files"):
            ext = kind[:-6]
            (feats / kind / f"s{i}.{ext}").write_bytes((feats / kind / f"s1.{ext}").read_bytes())
    out = str(tmp_path / "run")
    assert cli.main(["mil", "train", "--data-dir", str(feats), "--k", "2", "--fold", "0", "--model", "abmil",
                     "--model-kwargs", "d_model=8", "--epochs", "1", "--out-dir", out]) == 0
    assert cli.main(["mil", "heatmap", "--out-dir", out, "--slide", str(slides / "s1.tif")]) == 0
    assert (tmp_path / "run" / "heatmap_s1.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_smoke(tmp_path):
    section = application.demo(tmp_path, smoke=True)
    assert section.status == "ok" and 0 <= section.metrics["AUC mambamil"] <= 1
    assert all(p.is_file() for p in section.images) and section.tables[0].rows


def test_classification_metrics():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    prob, label = rng.dirichlet([1, 1], 40), rng.integers(0, 2, 40)
    m = classification_metrics(prob, label)
    assert m["auc"] == pytest.approx(roc_auc_score(label, prob[:, 1]))
    perfect = classification_metrics(np.eye(3)[[0, 1, 2, 2]] * 0.9 + 0.1 / 3, np.array([0, 1, 2, 2]))
    assert perfect == {"auc": 1.0, "balanced_acc": 1.0, "f1": 1.0}
    assert np.isnan(classification_metrics(prob, np.zeros(40, int))["auc"])
