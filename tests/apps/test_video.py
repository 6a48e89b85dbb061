"""`ssmkit video`: training through the shared runner, eval against copy-last-frame, generate, demo."""
import json

import pytest
import torch

import ssmkit.apps.cli as cli
from ssmkit.apps.application import RunContext, eval_config
from ssmkit.apps.runner import Runner, evaluate_run
from ssmkit.apps.video import VideoGenerate, VideoTrain, application, rollout

TINY = dict(train_size=32, eval_size=8, steps=3, batch_size=4, model_kwargs="d_model=8,ssm_size=4,n_layers=1,downsample=1",
            seq_len=5, frame_size=16, digit_size=8, warmup_steps=1, log_every=1, eval_every=0, eval_batch_size=8)


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cli, "APPLICATIONS", ("ssmkit.apps.video",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("video")
    cfg = VideoTrain(out_dir=str(out), **TINY)
    cfg.validate()
    return cfg, Runner(application, cfg).train()


def test_train_runs_through_the_runner(trained):
    cfg, run = trained
    assert run.step == 3 and (run.out_dir / "model.safetensors").exists()
    assert set(run.metrics) == {"mse", "ssim", "baseline_mse", "baseline_ssim", "mse_ratio", "loss"}
    assert run.metrics["mse_ratio"] == pytest.approx(run.metrics["mse"] / run.metrics["baseline_mse"])
    assert 0 < run.metrics["baseline_mse"] < 1 and -1 <= run.metrics["ssim"] <= 1


def test_eval_reports_model_and_baseline(trained):
    cfg, run = trained
    result = evaluate_run(application, eval_config(application)(out_dir=cfg.out_dir))
    assert result.metrics["mse"] == pytest.approx(run.metrics["mse"], rel=1e-5)
    record = json.loads((run.out_dir / "eval.json").read_text())
    assert {"mse", "baseline_mse", "ssim", "baseline_ssim", "mse_ratio"} <= set(record)
    # the baseline really is copy-last-frame: recompute it on the eval set
    eval_set = application.setup(cfg).eval
    frames = torch.stack([eval_set[i] for i in range(len(eval_set))])
    baseline = (frames[:, :-1] - frames[:, 1:]).pow(2).mean().item()
    assert record["baseline_mse"] == pytest.approx(baseline, rel=1e-5)


def test_cli_train_eval_and_generate_write_the_strip(tmp_path, capsys):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()] + ["--out-dir", str(tmp_path)]
    assert cli.main(["video", "train", *flags, "--steps", "2", "--loss", "mse"]) == 0
    run = ["--out-dir", str(tmp_path)]
    assert cli.main(["video", "eval", *run]) == 0
    assert cli.main(["video", "generate", *run, "--context", "3", "--n-future", "4", "--n-samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "baseline_mse" in out and "video generate: 2 rollouts of 4 frames after 3" in out
    folder = tmp_path / "generate"
    assert (folder / "rollout.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (folder / "rollout.gif").read_bytes()[:6] in (b"GIF89a", b"GIF87a")
    metrics = json.loads((folder / "rollout.json").read_text())
    assert len(metrics["mse_per_frame"]) == 4 and len(metrics["baseline_mse_per_frame"]) == 4
    assert cli.main(["video", "generate", *run, "--n-samples", "99"]) == 2


def test_rollout_of_a_given_model(tmp_path):
    cfg = VideoTrain(**TINY)
    model = application.build_model(RunContext(cfg, {}))
    result = rollout(VideoGenerate(context=2, n_future=3, n_samples=2), model, cfg, tmp_path / "generate")
    assert result["n_future"] == 3 and (tmp_path / "generate" / "rollout.png").exists()


def test_demo_smoke_section_renders(tmp_path, capsys):
    assert cli.main(["demo", "--smoke", "--out-dir", str(tmp_path)]) == 0
    assert "video: next-frame mse" in capsys.readouterr().out
    page = (tmp_path / "index.html").read_text()
    md = (tmp_path / "report.md").read_text()
    assert "Next-frame prediction with ConvS5" in page and "MSE ratio model / baseline" in md
    assert "video/generate/rollout.png" in page and (tmp_path / "video/generate/rollout.png").is_file()
    assert "video/plots/loss.png" in page and "| horizon |" in md
