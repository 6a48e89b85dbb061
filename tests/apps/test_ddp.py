"""Two CPU processes under torchrun (gloo) train like one process with the same global batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssmkit.apps.runner import Runner
from tinyapp import TinyApp, TinyConfig

TINYAPP = Path(__file__).with_name("tinyapp.py")
TORCHRUN = Path(sys.executable).with_name("torchrun")
ARGS = dict(steps=6, batch_size=16, grad_accum=1, eval_every=3, checkpoint_every=3, lr=3e-2, log_every=1)


@pytest.mark.skipif(not TORCHRUN.exists(), reason=f"no torchrun next to {sys.executable}")
def test_two_process_torchrun_matches_one_process(tmp_path, monkeypatch):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in ARGS.items()]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", str(TINYAPP), "--out-dir", str(tmp_path / "ddp"),
         *flags],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(2 processes x 1 micro-batch of 8)" in proc.stdout
    assert proc.stdout.count("tiny step 6/6") == 1  # rank 0 alone prints

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    single = Runner(TinyApp(), TinyConfig(out_dir=str(tmp_path / "single"), **ARGS)).train()

    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    # only rank 0 wrote: the same files, each record once
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*"))  # noqa: E731
    assert files(ddp_dir) == files(single_dir)
    ddp_log = [json.loads(x) for x in (ddp_dir / "metrics.jsonl").read_text().splitlines()]
    single_log = [json.loads(x) for x in (single_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["split"], r["step"]) for r in ddp_log] == [(r["split"], r["step"]) for r in single_log]
    train_losses = [r["loss"] for r in ddp_log if r["split"] == "train"]
    assert train_losses[-1] < 0.5 * train_losses[0]
    for a, b in zip(ddp_log, single_log):
        for key in ("loss", "mse", "mae", "grad_norm"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4), (a, b)
    ddp_w, single_w = load_file(ddp_dir / "model.safetensors"), load_file(single_dir / "model.safetensors")
    for key in single_w:
        torch.testing.assert_close(ddp_w[key], single_w[key], rtol=1e-4, atol=1e-5)
    assert single.metrics["mse"] == pytest.approx(ddp_log[-1]["mse"], rel=1e-4)

    # a 2-process resume continues the 2-process run to more steps
    proc = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", str(TINYAPP), "--out-dir", str(ddp_dir),
         *flags, "--steps=8", "--resume"],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resumed from" in proc.stdout and "tiny step 8/8" in proc.stdout
