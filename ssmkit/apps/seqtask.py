"""`ssmkit seq`: the selective-copy task of the Mamba paper, learned by a small Mamba language model.

Each sequence is a context of `context` positions, all blank except `n_data` data tokens at random
places, followed by `n_data` marker tokens. At the i-th marker the model must output the i-th data
token: it has to pick the data out of the blanks (content-dependent, what an LTI SSM cannot do) and
reproduce it in order. Samples are a pure function of (seed, split, epoch, index), so runs are
reproducible and the training set is fresh every epoch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ssmkit.apps.application import Application, Command, RunContext, RunSpec, build_registered
from ssmkit.apps.config import (ConfigError, DeviceOptions, EvalOptions, ModelOptions, RunOptions, SeedOptions,
                                TrainOptions, compose, option)
from ssmkit.apps.report import ReportSection, Table
from ssmkit.apps.runner import Runner, train_and_eval
from ssmkit.util import derive_seed

__all__ = ["SeqTask", "SeqTrain", "SelectiveCopy", "SelectiveCopyApp", "application"]

BLANK, MARKER, FIRST_SYMBOL = 0, 1, 2
_TRAIN, _EVAL = 0, 1


@dataclass
class SeqTask:
    """The selective-copy task: where the data tokens hide and how many sequences there are."""

    title = "task"
    context: int = option(32, "positions the data tokens are scattered among (blanks elsewhere)")
    n_data: int = option(4, "data tokens to find and copy, in order")
    n_symbols: int = option(8, "size of the data alphabet")
    train_size: int = option(6400, "training sequences per epoch (freshly drawn every epoch)")
    eval_size: int = option(1024, "held-out sequences to evaluate on")

    def check(self) -> None:
        for name in ("context", "n_data", "n_symbols", "train_size", "eval_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n_data > self.context:
            raise ConfigError(f"n_data ({self.n_data}) cannot exceed context ({self.context})")


SeqTrain = compose("SeqTrain", RunOptions, SeedOptions, SeqTask, ModelOptions, TrainOptions, EvalOptions,
                   DeviceOptions, defaults=dict(
    model="mamba_lm_tiny", steps=500, batch_size=64, lr=1e-2, warmup_steps=50, weight_decay=0.1, eval_every=100,
    eval_batch_size=256, log_every=50), doc="`ssmkit seq train`: the task, the model and the training.")


class SelectiveCopy(Dataset):
    """Selective-copy sequences: item i is (tokens (context + n_data,), targets (n_data,))."""

    def __init__(self, size: int, context: int, n_data: int, n_symbols: int, seed: int, split: int):
        self.size, self.context, self.n_data, self.n_symbols = size, context, n_data, n_symbols
        self.seed, self.split, self.epoch = seed, split, 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the sequences of `epoch` (the runner calls this before each training epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.split, self.epoch, index))
        positions = torch.randperm(self.context, generator=g)[: self.n_data].sort().values
        data = torch.randint(FIRST_SYMBOL, FIRST_SYMBOL + self.n_symbols, (self.n_data,), generator=g)
        tokens = torch.full((self.context + self.n_data,), BLANK, dtype=torch.long)
        tokens[positions] = data
        tokens[self.context:] = MARKER
        return tokens, data


def render(tokens: torch.Tensor) -> str:
    """Tokens as text: `.` blank, `>` marker, data symbols as letters A, B, ..."""
    return "".join("." if t == BLANK else ">" if t == MARKER else chr(ord("A") + t - FIRST_SYMBOL)
                   for t in tokens.tolist())


class SelectiveCopyApp(Application):
    """Train and evaluate a Mamba language model on selective copy; metrics are per-token and per-sequence
    accuracy."""

    name = "seq"
    help = "selective-copy sequence task with a small Mamba LM (the Mamba paper's synthetic task)"
    train_config = SeqTrain
    data_groups = (SeqTask,)
    metrics = {"accuracy": "max", "sequence_accuracy": "max", "loss": "min"}
    meta_must_match = ("vocab_size",)

    def setup(self, cfg) -> RunSpec:
        shape = (cfg.context, cfg.n_data, cfg.n_symbols, cfg.seed)
        return RunSpec(SelectiveCopy(cfg.train_size, *shape, _TRAIN), SelectiveCopy(cfg.eval_size, *shape, _EVAL),
                       {"vocab_size": FIRST_SYMBOL + cfg.n_symbols},
                       f"{cfg.eval_size} held-out selective-copy sequences (context {cfg.context}, {cfg.n_data} data "
                       f"tokens of {cfg.n_symbols} symbols, seed {cfg.seed})")

    def build_model(self, ctx: RunContext):
        return build_registered(ctx.cfg, vocab_size=ctx.meta["vocab_size"])

    @staticmethod
    def _answer_logits(model, tokens: torch.Tensor, n_data: int) -> torch.Tensor:
        return model(tokens)[:, -n_data:].float()

    def train_loss(self, model, batch, ctx: RunContext) -> torch.Tensor:
        tokens, data = batch
        logits = self._answer_logits(model, tokens, data.shape[1])
        return F.cross_entropy(logits.flatten(0, 1), data.flatten())

    def eval_step(self, model, batch, ctx: RunContext) -> dict[str, torch.Tensor]:
        tokens, data = batch
        logits = self._answer_logits(model, tokens, data.shape[1])
        correct = logits.argmax(-1) == data
        loss = F.cross_entropy(logits.transpose(1, 2), data, reduction="none").mean(1)
        return {"accuracy": correct.float().mean(1), "sequence_accuracy": correct.all(1).float(), "loss": loss}

    def commands(self) -> list[Command]:
        return train_and_eval(self)

    def demo(self, out_dir: Path, smoke: bool) -> ReportSection:
        sizes = dict(context=16, n_data=2, n_symbols=4, train_size=256, eval_size=64, steps=12, batch_size=16,
                     model_kwargs="d_model=16,n_layer=1", warmup_steps=2, eval_every=6, log_every=4) if smoke else {}
        cfg = SeqTrain(out_dir=str(out_dir / self.name), overwrite=True, **sizes)
        cfg.validate()
        runner = Runner(self, cfg)
        run = runner.train()
        model = run.model.cpu()
        eval_set = self.setup(cfg).eval
        tokens, data = (torch.stack(x) for x in zip(*(eval_set[i] for i in range(8))))
        with torch.no_grad():
            predicted = self._answer_logits(model, tokens, cfg.n_data).argmax(-1)
        rows = [[render(t[: cfg.context]), render(d), render(p), "yes" if torch.equal(d, p) else "no"]
                for t, d, p in zip(tokens, data, predicted)]
        n_params = sum(p.numel() for p in model.parameters())
        text = (
            f"A {len(model.layers)}-layer `MambaLM` (`{cfg.model}`, d_model {model.embedding.embedding_dim}, "
            f"d_state {model.layers[0].mixer.d_state}, {n_params:,} parameters) learns the selective-copy task "
            f"of the Mamba paper: {cfg.n_data} data tokens from an alphabet of {cfg.n_symbols} are scattered at random among {cfg.context} blank positions, followed "
            f"by {cfg.n_data} markers; at the i-th marker the model must emit the i-th data token. Finding the "
            f"data among the blanks needs the input-dependent (selective) state update that distinguishes "
            f"Mamba from time-invariant SSMs.\n\n"
            f"Trained for {run.step} AdamW steps of {cfg.batch_size} freshly drawn sequences on {runner.device.type} "
            f"(seed {cfg.seed}), evaluated on {cfg.eval_size} held-out sequences. Run folder: "
            f"`{run.out_dir}` (resumable checkpoints, logs, curves)."
        )
        metrics = {"token accuracy": f"{run.metrics['accuracy']:.2%}",
                   "sequence accuracy": f"{run.metrics['sequence_accuracy']:.2%}",
                   "eval loss (nats/token)": run.metrics["loss"], "train steps": run.step,
                   "training time (s)": round(run.wall_s, 1)}
        runner.say(f"selective copy: token accuracy {run.metrics['accuracy']:.4f}, "
                   f"sequence accuracy {run.metrics['sequence_accuracy']:.4f}")
        table = Table("Held-out samples (. blank, letters are data; the model answers at the markers)",
                      ["context", "target", "model output", "all correct"], rows)
        return ReportSection("Selective copy with Mamba (ssmkit seq)", text, metrics, images=run.plots,
                             tables=[table])


application = SelectiveCopyApp()
