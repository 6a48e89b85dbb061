"""Fashion-MNIST under a fixed training budget: accuracy of Vim-tiny-, ViG-tiny- and DeiT-tiny-sized models.

Each model keeps its published tiny width and depth (D 192; 24 Vim layers, 12 ViG or DeiT blocks) on
28x28 images with 4x4 patches (49 tokens). Its training speed is calibrated first (median cost of a few
AdamW steps on random batches), the number of steps that fits the budget (`--minutes`) is derived from it,
and `ssmkit classify train` then trains that many steps on Debian's dataset-fashion-mnist
(`apt-get install dataset-fashion-mnist`) and evaluates on a fixed class-balanced subset of the test split.
Calibrating first keeps the learning-rate schedule whole (it needs the step count up front). The cost of a
step is its process CPU time divided by torch's thread count (`--clock cpu`, the default): the wall time
the step would take on an otherwise idle machine, so a machine shared with other jobs gives the same step
count; `--clock wall` uses wall time instead. The table also gives the wall time the training really took.

    python bench/fashion_mnist.py                          # 10 minutes per model on this machine
    python bench/fashion_mnist.py --minutes 1 --models vig_tiny --eval-size 1000

Prints a Markdown table and writes JSON (default bench/results/fashion_mnist.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ssmkit.apps.classify import ClassifyTrain, application, build_classifier
from ssmkit.apps.config import parse_kwargs
from ssmkit.apps.runner import Runner
from ssmkit.vision.data import FASHION_MNIST_DIR

MODELS = {  # label -> model name (ssmkit classifier or timm model) at its published tiny size
    "vim_tiny": "vim_tiny",
    "vig_tiny": "vig_tiny",
    "deit_tiny": "deit_tiny_patch16_224",
}


def config(args, label: str, steps: int):
    return ClassifyTrain(model=MODELS[label], model_kwargs="patch_size=4", img_size=28, data="fashion-mnist",
                         hflip=True, steps=steps, batch_size=args.batch_size, lr=args.lr,
                         warmup_steps=max(1, steps // 20), eval_every=0, eval_size=args.eval_size,
                         checkpoint_every=max(steps, 1), seed=args.seed, overwrite=True,
                         out_dir=str(Path(args.runs) / label))


def seconds_per_step(cfg, steps: int, clock: str) -> float:
    """Median cost of one AdamW step of `cfg.batch_size` random 28x28 images (after two warm-up steps):
    wall seconds, or CPU seconds per torch thread."""
    torch.manual_seed(cfg.seed)
    model = build_classifier(cfg.model, 10, 1, cfg.img_size, parse_kwargs(cfg.model_kwargs, "model_kwargs"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(cfg.batch_size, 1, 28, 28), torch.randint(0, 10, (cfg.batch_size,))
    now = time.perf_counter if clock == "wall" else (lambda: time.process_time() / torch.get_num_threads())
    times = []
    for i in range(steps + 2):
        t0 = now()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(now() - t0)
    return statistics.median(times)


def table(rows: list[dict]) -> str:
    lines = ["| model | parameters | calibrated samples/s | steps x batch | training wall (min) | "
             "test accuracy | test NLL |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['parameters'] / 1e6:.2f}M | {r['samples_per_s']:.1f} | "
                     f"{r['steps']} x {r['batch_size']} | {r['train_minutes']:.1f} | {100 * r['accuracy']:.2f}% | "
                     f"{r['nll']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--minutes", type=float, default=10.0, help="training budget per model")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (warm-up: 5%% of the steps)")
    p.add_argument("--eval-size", type=int, default=2000, help="class-balanced test images to evaluate on")
    p.add_argument("--calibrate-steps", type=int, default=4, help="timed steps that set the step count")
    p.add_argument("--clock", default="cpu", choices=("cpu", "wall"),
                   help="cost of a step: CPU time per thread (independent of other jobs) or wall time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default="runs/bench_fashion_mnist", help="folder of the training runs")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "fashion_mnist.json"))
    args = p.parse_args()
    if not Path(FASHION_MNIST_DIR).is_dir():
        p.error(f"{FASHION_MNIST_DIR} is missing: apt-get install dataset-fashion-mnist")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        p.error(f"unknown model {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    rows = []
    for label in models:
        step_s = seconds_per_step(config(args, label, 1), args.calibrate_steps, args.clock)
        steps = max(1, int(args.minutes * 60 / step_s))
        print(f"{label}: {args.batch_size / step_s:.1f} samples/s -> {steps} steps in {args.minutes:g} min", flush=True)
        cfg = config(args, label, steps)
        cfg.validate()
        result = Runner(application, cfg).train()
        rows.append(dict(model=label, parameters=sum(q.numel() for q in result.model.parameters()),
                         samples_per_s=args.batch_size / step_s, steps=steps, batch_size=args.batch_size,
                         train_minutes=result.wall_s / 60, accuracy=result.metrics["accuracy"],
                         nll=result.metrics["nll"]))
    print()
    print(table(rows))
    meta = {"machine": platform.machine(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "minutes": args.minutes, "clock": args.clock, "eval_size": args.eval_size}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
