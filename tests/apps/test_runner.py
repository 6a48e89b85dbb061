"""The shared runner: optimisation details, checkpoints, exact resume, atomic saves and clear errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

import ssmkit.apps.run_folder as run_folder_mod
from ssmkit.apps.application import RunContext, eval_config
from ssmkit.apps.config import ConfigError, build_config
from ssmkit.apps.run_folder import atomic_write, load_weights
from ssmkit.apps.runner import EpochBatches, Runner, evaluate_run, parameter_groups, warmup_cosine
from ssmkit.errors import CheckpointError, RunError
from tinyapp import TinyApp, TinyConfig

TINYAPP = Path(__file__).with_name("tinyapp.py")


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TINY_KILL_AT_CALL"):
        monkeypatch.delenv(name, raising=False)


def train(out_dir, **kw):
    return Runner(TinyApp(), TinyConfig(out_dir=str(out_dir), **kw)).train()


def tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def assert_same_weights(a, b):
    (ta, ma), (tb, mb) = tensors(a), tensors(b)
    assert ma == mb and ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def records(path, split):
    """The logged records of a run without wall-clock fields."""
    out = []
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        if r["split"] == split:
            out.append({k: v for k, v in r.items() if k not in ("samples_per_s", "elapsed_s")})
    return out


# ----------------------------------------------------------------------------------------------
# building blocks


def test_parameter_groups_keep_norms_biases_and_ssm_parameters_out_of_weight_decay():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.A_log = nn.Parameter(torch.zeros(4, 2))
            self.D = nn.Parameter(torch.ones(4))
            self.marked = nn.Parameter(torch.zeros(3, 3))
            self.marked._no_weight_decay = True
            self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
            self.frozen = nn.Parameter(torch.zeros(2, 2), requires_grad=False)

        def no_weight_decay(self):
            return {"pos_embed"}

    model = Model()
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [id(p) for p in decay["params"]] == [id(model.proj.weight)]
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in no_decay["params"]) == [
        "A_log", "D", "marked", "norm.bias", "norm.weight", "pos_embed", "proj.bias"]


def test_warmup_cosine_schedule():
    f = warmup_cosine(total_steps=110, warmup_steps=10, min_ratio=0.1)
    assert [round(f(s), 4) for s in (0, 4, 9)] == [round(1 / 11, 4), round(5 / 11, 4), round(10 / 11, 4)]
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_epoch_batches_split_the_same_global_batches_over_ranks_and_accumulation():
    def global_batches(world, accum, start=0):
        per_rank = [list(EpochBatches(50, 12, seed=3, epoch=1, start=start, rank=r, world=world, accum=accum))
                    for r in range(world)]
        steps = []
        for s in range(len(per_rank[0]) // accum):
            steps.append(sorted(i for a in range(accum) for r in range(world) for i in per_rank[r][s * accum + a]))
        return steps

    single = global_batches(1, 1)
    assert len(single) == 4 and len({i for b in single for i in b}) == 48  # 50 // 12 steps, no repeats
    assert global_batches(2, 1) == single == global_batches(2, 3) == global_batches(3, 2)
    assert global_batches(2, 2, start=3) == single[3:]
    other_epoch = list(EpochBatches(50, 12, seed=3, epoch=2, start=0, rank=0, world=1, accum=1))
    assert other_epoch != list(EpochBatches(50, 12, seed=3, epoch=1, start=0, rank=0, world=1, accum=1))


# ----------------------------------------------------------------------------------------------
# training, logs, checkpoints


def test_training_writes_logs_plots_checkpoints_and_best(tmp_path):
    result = train(tmp_path, steps=24, eval_every=6, lr=3e-2, keep_checkpoints=2)
    assert result.step == 24
    losses = [r["loss"] for r in records(tmp_path / "metrics.jsonl", "train")]
    assert len(losses) == 24 and sum(losses[-4:]) < 0.5 * sum(losses[:4])
    evals = records(tmp_path / "metrics.jsonl", "eval")
    assert [r["step"] for r in evals] == [6, 12, 18, 24]
    assert result.metrics == {k: v for k, v in evals[-1].items() if k in ("mse", "mae")}
    best = min(evals, key=lambda r: r["mse"])
    assert result.best == {"metric": "mse", "value": best["mse"], "step": best["step"]}
    assert tensors(tmp_path / "best.safetensors")[1]["step"] == str(best["step"])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000020", "step_00000024"]
    assert {p.name for p in result.plots} == {"loss.png", "mse.png", "mae.png"}
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in result.plots)
    assert (tmp_path / "train_log.csv").read_text().splitlines()[0] == \
        "step,epoch,loss,lr,grad_norm,samples_per_s,elapsed_s"
    assert (tmp_path / "eval_log.csv").read_text().splitlines()[0] == "step,mse,mae"
    assert "steps = 24" in (tmp_path / "config.toml").read_text()

    evaluated = evaluate_run(TinyApp(), eval_config(TinyApp())(out_dir=str(tmp_path)))
    assert evaluated.metrics["mse"] == pytest.approx(best["mse"], rel=1e-5)
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["step"] == best["step"] and record["data"] == "32 eval samples" and record["samples"] == 32
    assert json.loads((tmp_path / "run.json").read_text()) == {"inputs": 4}


def test_epochs_option_sets_the_step_count(tmp_path):
    assert train(tmp_path, epochs=2.5, batch_size=16).step == 10  # 64 samples / 16 = 4 steps per epoch


@pytest.mark.parametrize("extra", [dict(), dict(grad_accum=2, ema_decay=0.9, dropout=0.2)])
def test_resume_after_a_crash_gives_identical_weights(tmp_path, extra):
    """In-process: a crash (an exception at a micro-step after the step-4 checkpoint) then --resume."""
    cfg = dict(steps=10, eval_every=3, **extra)
    train(tmp_path / "straight", **cfg)

    class Crash(Exception):
        pass

    class CrashingApp(TinyApp):
        n = 0

        def train_loss(self, model, batch, ctx):
            CrashingApp.n += 1
            if CrashingApp.n == 6 * cfg.get("grad_accum", 1):
                raise Crash
            return super().train_loss(model, batch, ctx)

    with pytest.raises(Crash):
        Runner(CrashingApp(), TinyConfig(out_dir=str(tmp_path / "resumed"), **cfg)).train()
    assert len(records(tmp_path / "resumed" / "metrics.jsonl", "train")) == 5
    train(tmp_path / "resumed", resume=True, **cfg)
    for name in ["model.safetensors", "best.safetensors"] + (["model_ema.safetensors"] if extra else []):
        assert_same_weights(tmp_path / "straight" / name, tmp_path / "resumed" / name)
    for split in ("train", "eval"):
        assert records(tmp_path / "straight" / "metrics.jsonl", split) == \
            records(tmp_path / "resumed" / "metrics.jsonl", split)


def test_kill_and_resume_in_a_subprocess_gives_identical_weights(tmp_path):
    """A real SIGKILL in the middle of step 7 of 12 (checkpoints every 4 steps), then --resume."""
    args = ["--steps", "12", "--grad-accum", "2", "--dropout", "0.1", "--ema-decay", "0.8", "--eval-every", "3"]

    def run(out, *extra, kill_at=None):
        env = dict(os.environ, TINY_KILL_AT_CALL=str(kill_at or 0))
        return subprocess.Popen([sys.executable, str(TINYAPP), "--out-dir", str(out), *args, *extra], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    straight, killed = run(tmp_path / "a"), run(tmp_path / "b", kill_at=13)  # call 13 = step 7, micro 1
    out_a, _ = straight.communicate(timeout=120)
    out_b, _ = killed.communicate(timeout=120)
    assert straight.returncode == 0, out_a
    assert killed.returncode == -9, out_b
    assert [p.name for p in (tmp_path / "b" / "checkpoints").iterdir()] == ["step_00000004"]
    assert "step 6/12" in out_b and "step 7/12" not in out_b
    resumed = run(tmp_path / "b", "--resume")
    out_c, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, out_c
    assert "resumed from" in out_c and "step_00000004 at step 4/12" in out_c
    for name in ("model.safetensors", "model_ema.safetensors", "best.safetensors"):
        assert_same_weights(tmp_path / "a" / name, tmp_path / "b" / name)
    state_a = torch.load(tmp_path / "a/checkpoints/step_00000012/state.pt", weights_only=True)
    state_b = torch.load(tmp_path / "b/checkpoints/step_00000012/state.pt", weights_only=True)
    for k, v in state_a["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg_sq"], state_b["optimizer"]["state"][k]["exp_avg_sq"])
    assert records(tmp_path / "a/metrics.jsonl", "train") == records(tmp_path / "b/metrics.jsonl", "train")


def test_a_crash_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    real_save = run_folder_mod.save_model
    calls = []

    def failing_save(model, filename, metadata=None):
        calls.append(filename)
        if "step_00000008" in filename:  # the second checkpoint: write half a file, then crash
            Path(filename).write_bytes(b"\x00" * 10)
            raise OSError("disk full")
        real_save(model, filename, metadata=metadata)

    monkeypatch.setattr(run_folder_mod, "save_model", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train(tmp_path, steps=10, checkpoint_every=4)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step_00000004"]  # no half-written folder, the old one intact
    load_weights(TinyApp().build_model(RunContext(TinyConfig(), {})),
                 tmp_path / "checkpoints/step_00000004/model.safetensors")
    monkeypatch.setattr(run_folder_mod, "save_model", real_save)
    assert train(tmp_path, steps=10, checkpoint_every=4, resume=True).step == 10


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "best.safetensors"
    path.write_text("old")

    def crash(tmp):
        tmp.write_text("half")
        raise OSError("crash")

    with pytest.raises(OSError):
        atomic_write(path, crash)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors"]


# ----------------------------------------------------------------------------------------------
# clear errors


def test_refuses_a_folder_with_another_runs_checkpoints(tmp_path):
    train(tmp_path, steps=4)
    with pytest.raises(RunError, match=f"{tmp_path} already holds the checkpoints of another run.*--resume.*"
                                        "--overwrite"):
        train(tmp_path, steps=4)
    result = train(tmp_path, steps=6, overwrite=True, lr=0.5)
    assert result.step == 6
    assert [r["step"] for r in records(tmp_path / "metrics.jsonl", "train")] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000006"]


def test_refuses_to_resume_another_models_checkpoint(tmp_path):
    train(tmp_path, steps=4, width=16)
    with pytest.raises(RunError, match=r"cannot resume from .*step_00000004: it belongs to another model "
                                       r"\(parameter net.0.bias has shape \[16\] there and \[8\]"):
        train(tmp_path, steps=8, width=8, resume=True)
    with pytest.raises(RunError, match=r"with --batch-size 8 \(the run's: 16\)"):
        train(tmp_path, steps=4, batch_size=8, resume=True)
    with pytest.raises(CheckpointError, match="model.safetensors does not fit this TinyNet"):
        load_weights(TinyApp().build_model(RunContext(TinyConfig(width=8), {})), tmp_path / "model.safetensors")


def test_resume_refuses_options_that_change_the_run(tmp_path, capsys):
    """--resume continues the same run: a changed learning rate or fewer steps are refused, naming the
    option, before anything is trained or written; options that change nothing recorded may differ, and
    more steps train further."""
    train(tmp_path, steps=8, checkpoint_every=4)
    config = (tmp_path / "config.toml").read_text()
    with pytest.raises(RunError, match=r"cannot resume from .*step_00000008 with --lr 0.5 \(the run's: 0.01\)"):
        train(tmp_path, steps=8, lr=0.5, resume=True)
    with pytest.raises(RunError, match=r"--steps 6 \(the run's: 8\)"):
        train(tmp_path, steps=6, resume=True)
    assert (tmp_path / "config.toml").read_text() == config  # still records the run as it was
    assert train(tmp_path, steps=8, resume=True, log_every=3, keep_checkpoints=2).step == 8
    capsys.readouterr()
    assert train(tmp_path, steps=12, resume=True).step == 12
    assert "continuing to 12 steps (the run had 8)" in capsys.readouterr().out
    assert "steps = 12" in (tmp_path / "config.toml").read_text()


def test_nan_and_infinite_options_are_refused():
    with pytest.raises(ConfigError, match="lr must be a finite number, got nan"):
        build_config(TinyConfig, {"lr": float("nan")})
    with pytest.raises(ConfigError, match="weight_decay must be a finite number, got inf"):
        build_config(TinyConfig, {"weight_decay": float("inf")})


def test_resume_without_a_checkpoint_starts_a_new_run(tmp_path, capsys):
    assert train(tmp_path, steps=2, resume=True).step == 2
    assert "starting a new run" in capsys.readouterr().out


def test_batch_larger_than_the_dataset(tmp_path):
    with pytest.raises(RunError, match=r"batch_size 100 is larger than the training set of tiny \(64 samples\)"):
        train(tmp_path, batch_size=100)
    with pytest.raises(RunError, match="must be divisible by processes x grad_accum = 1 x 3"):
        train(tmp_path, batch_size=16, grad_accum=3)


def test_unknown_best_metric(tmp_path):
    with pytest.raises(RunError, match="--best-metric 'acc' is not a metric of tiny; choose from mse, mae"):
        train(tmp_path, best_metric="acc")


def test_nan_loss_is_reported_with_the_step(tmp_path):
    class Diverging(TinyApp):
        def train_loss(self, model, batch, ctx):
            return super().train_loss(model, batch, ctx) * float("nan")

    with pytest.raises(RunError, match="training loss of tiny became nan at step 1"):
        Runner(Diverging(), TinyConfig(out_dir=str(tmp_path), steps=3)).train()
