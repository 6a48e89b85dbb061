"""A tiny regression application for the runner tests; also a script for subprocess and torchrun runs.

    python tinyapp.py --out-dir DIR --steps 8 ...        (same flags as `ssmkit <app> train`)

With TINY_KILL_AT_CALL=N in the environment the process SIGKILLs itself at the N-th call of
`train_loss`: a real crash in the middle of training, for the resume test.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from ssmkit.apps.application import Application, RunSpec
from ssmkit.apps.config import (DeviceOptions, EvalOptions, RunOptions, SeedOptions, TrainOptions, add_arguments,
                                build_config, compose, option)
from ssmkit.apps.runner import Runner


@dataclass
class TinyOptions:
    title = "tiny"
    n_train: int = option(64, "training samples")
    n_eval: int = option(32, "eval samples")
    width: int = option(16, "hidden width")
    dropout: float = option(0.0, "dropout probability (uses the RNG during training)")


TinyConfig = compose("TinyConfig", RunOptions, SeedOptions, TinyOptions, TrainOptions, EvalOptions, DeviceOptions,
                     defaults=dict(steps=8, batch_size=16, lr=1e-2, warmup_steps=2, log_every=1, checkpoint_every=4,
                                   device="cpu"))


class TinyNet(nn.Module):
    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, width), nn.LayerNorm(width), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(width, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)


def make_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([0.5, -0.5, 0.25, 0.75]) + 0.05 * torch.randn(n, generator=g)
    return TensorDataset(x, y)


class TinyApp(Application):
    name = "tiny"
    help = "tiny regression for tests"
    train_config = TinyConfig
    data_groups = (TinyOptions,)
    metrics = {"mse": "min", "mae": "min"}
    calls = 0

    def setup(self, cfg):
        return RunSpec(make_data(cfg.n_train, 1), make_data(cfg.n_eval, 2), {"inputs": 4}, f"{cfg.n_eval} eval samples")

    def build_model(self, ctx):
        return TinyNet(ctx.cfg.width, ctx.cfg.dropout)

    def train_loss(self, model, batch, ctx):
        TinyApp.calls += 1
        if TinyApp.calls == int(os.environ.get("TINY_KILL_AT_CALL", 0)):
            os.kill(os.getpid(), signal.SIGKILL)
        x, y = batch
        return (model(x) - y).pow(2).mean()

    def eval_step(self, model, batch, ctx):
        x, y = batch
        err = model(x) - y
        return {"mse": err.pow(2), "mae": err.abs()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, TinyConfig)
    cfg = build_config(TinyConfig, parser.parse_args(argv))
    try:
        Runner(TinyApp(), cfg).train()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
