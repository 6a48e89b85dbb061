"""SaShiMi benchmark: training speed and memory at a 1-second window, generation speed of the recurrent
paths against the reference implementation and the naive baseline, and the NLL reached in a CPU budget.

Training: forward + backward of the language model on `--batch` windows of `--window` samples
(`measure_fwd_bwd`: median of `--repeats`, peak memory); samples/s = batch * window / time.
Generation, per batch size: `generate` for `--gen-steps` samples with the eager `Stepper` and with
`compile=True` (the compile time is measured separately, on a first short call, and excluded from the
compiled figure); aggregate samples/s = batch * steps / time. Naive: one full forward over a
`--prefix`-sample prefix per new sample (samples/s = batch / time of that forward), the cost every naive
step has at that position. Ratios are to the reference implementation on a 2-core CPU for the 8-layer
model (measured with the state-spaces code's Python loop over `step`, 2 threads: 244-506 samples/s at
batch 1, 1,200-1,506 at batch 16); real time is 16,000 samples/s.
Generation figures are also given from CPU time (process CPU seconds / threads used), which a machine
shared with other jobs does not change much.

`--train-minutes M` also trains `ssmkit audio train`'s default CPU model (or the --train-* sizes) on the
spoken digits (`--data-dir`, default the embedded fixture) for M minutes: the cost of a step is
calibrated first as CPU time per torch thread (the wall time on an idle machine, so a busy machine gives
the same step count), and the validation NLL (bits/sample) is reported next to the unigram and 8-bit
uniform baselines.

    python bench/audio.py                                   # sashimi_sc09 on CPU: training + generation
    python bench/audio.py --no-speed --train-minutes 20     # NLL in 20 CPU minutes
    python bench/audio.py --model sashimi_small --batches 1,16,256 --device cuda

Prints Markdown tables and writes JSON (default bench/results/audio.json).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import measure_fwd_bwd  # noqa: E402

import ssmkit  # noqa: E402
from ssmkit.apps.application import RunContext  # noqa: E402
from ssmkit.apps.audio import AudioTrain, application  # noqa: E402
from ssmkit.apps.runner import Runner  # noqa: E402
from ssmkit.audio.generate import generate, generation_threads  # noqa: E402

REFERENCE = {1: (244, 506), 16: (1200, 1506)}  # samples/s of the reference code, 8-layer model, 2-core CPU
REAL_TIME = 16000


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, threads: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds per thread) of fn()."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, (time.process_time() - cpu) / threads


def generation_rows(model, args) -> list[dict]:
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        row = {"what": f"generation, batch {batch}", "batch": batch}
        for name, compile in (("eager", False), ("compiled", True)):
            if compile and not args.compile:
                continue
            start = time.perf_counter()
            generate(model, batch, 32, compile=compile)  # warm-up; for compile=True: compilation
            row[f"{name}_first_call_s"] = time.perf_counter() - start

            _sync(args.device)
            wall, cpu = _timed(lambda: generate(model, batch, args.gen_steps, seed=1, compile=compile),
                               generation_threads(args.device, batch, model.config.d_model))
            row[f"{name}_samples_per_s"] = batch * args.gen_steps / wall
            row[f"{name}_cpu_samples_per_s"] = batch * args.gen_steps / cpu
        prefix = torch.randint(0, 256, (batch, args.prefix), device=args.device)
        times = []
        with torch.no_grad():
            model(prefix)
            for _ in range(args.repeats):
                _sync(args.device)
                t0 = time.perf_counter()
                model(prefix)
                _sync(args.device)
                times.append(time.perf_counter() - t0)
        row["naive_samples_per_s"] = batch / statistics.median(times)
        rows.append(row)
    return rows


def seconds_per_step(cfg, steps: int) -> float:
    """Median CPU seconds per torch thread of one AdamW step on random windows (after two warm-up steps)."""
    torch.manual_seed(cfg.seed)
    model = application.build_model(RunContext(cfg, {}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, 256, (cfg.batch_size, cfg.window))
    times = []
    for i in range(steps + 2):
        t0 = time.process_time() / torch.get_num_threads()
        F.cross_entropy(model(tokens).transpose(1, 2), tokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.process_time() / torch.get_num_threads() - t0)
    return statistics.median(times)


def train_in_budget(args) -> dict:
    """Train for the CPU-time budget and return the validation NLL next to the baselines."""
    sizes = dict(model=args.train_model, model_kwargs=args.train_model_kwargs, window=args.train_window,
                 batch_size=args.train_batch, lr=args.train_lr)
    probe = AudioTrain(data_dir=args.data_dir, **sizes)
    step_s = seconds_per_step(probe, args.calibrate_steps)
    steps = max(1, int(args.train_minutes * 60 / step_s))
    print(f"training: {step_s:.3f} CPU s per step -> {steps} steps in {args.train_minutes:g} min", flush=True)
    cfg = AudioTrain(data_dir=args.data_dir, steps=steps, eval_windows=args.eval_windows,
                     warmup_steps=max(1, steps // 20), eval_every=0, log_every=max(1, steps // 20),
                     checkpoint_every=steps, overwrite=True, out_dir=args.train_runs, **sizes)
    cfg.validate()
    result = Runner(application, cfg).train()
    return {"model": sizes, "parameters": sum(p.numel() for p in result.model.parameters()),
            "data": args.data_dir or "embedded fixture", "eval_windows": args.eval_windows, "cpu_s_per_step": step_s, "steps": steps,
            "budget_minutes": args.train_minutes, "train_wall_minutes": result.wall_s / 60, **result.metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sashimi_sc09", help="registered model name")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True,
                        help="measure training and generation speed")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure generate(compile=True)")
    parser.add_argument("--window", type=int, default=16000, help="training window (samples)")
    parser.add_argument("--batch", type=int, default=1, help="training batch")
    parser.add_argument("--batches", default="1,16,256", help="generation batch sizes")
    parser.add_argument("--gen-steps", type=int, default=2048, help="samples generated per measurement")
    parser.add_argument("--prefix", type=int, default=1024, help="prefix length of the naive baseline")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--train-minutes", type=float, default=0.0, help="CPU-minute training budget (0: skip)")
    parser.add_argument("--data-dir", default="", help="WAV folder for the budgeted training (empty: the fixture)")
    defaults = AudioTrain()
    parser.add_argument("--train-model", default=defaults.model, help="registered model of the budgeted training")
    parser.add_argument("--train-model-kwargs", default="", help="its size overrides, e.g. 'd_model=32,kernel=\"dplr\"'")
    parser.add_argument("--train-window", type=int, default=defaults.window)
    parser.add_argument("--train-batch", type=int, default=defaults.batch_size)
    parser.add_argument("--train-lr", type=float, default=defaults.lr)
    parser.add_argument("--eval-windows", type=int, default=400, help="validation windows (evenly spaced; 0: all)")
    parser.add_argument("--calibrate-steps", type=int, default=4)
    parser.add_argument("--train-runs", default="runs/bench_audio", help="folder of the budgeted training run")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "audio.json"))
    args = parser.parse_args()

    result = {"device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.processor() or platform.machine()}
    if args.speed:
        torch.manual_seed(0)
        model = ssmkit.create_model(args.model).to(args.device)
        n_params = sum(p.numel() for p in model.parameters())
        tokens = torch.randint(0, 256, (args.batch, args.window), device=args.device)
        train = measure_fwd_bwd(model, (tokens,), args.device, repeats=args.repeats, warmup=1)
        model.eval()
        result.update(model=args.model, parameters=n_params, gen_steps=args.gen_steps, naive_prefix=args.prefix,
                      training={"window": args.window, "batch": args.batch,
                                "samples_per_s": args.batch * args.window / (train["fwd_bwd_ms"] / 1e3),
                                "peak_mb": train["peak_mb"]},
                      generation=generation_rows(model, args))
        print(f"{args.model} ({n_params:,} parameters) on {args.device}, {torch.get_num_threads()} threads\n")
        t = result["training"]
        print(f"training fwd+bwd, window {t['window']}, batch {t['batch']}: {t['samples_per_s']:,.0f} samples/s, "
              f"peak {t['peak_mb']:,.0f} MB\n")
        print("| batch | path | first call (s) | samples/s | from CPU time | x reference | x real time | x naive |")
        print("|---|---|---|---|---|---|---|---|")
        for r in result["generation"]:
            for name in ("eager", "compiled"):
                if f"{name}_samples_per_s" not in r:
                    continue
                rate = r[f"{name}_samples_per_s"]
                low, high = REFERENCE.get(r["batch"], (None, None))
                ref = f"{rate / high:.1f}-{rate / low:.1f}" if low and low != high else (
                    f"{rate / low:.1f}" if low else "-")
                print(f"| {r['batch']} | {name} | {r[f'{name}_first_call_s']:.1f} | {rate:,.0f} | "
                      f"{r[f'{name}_cpu_samples_per_s']:,.0f} | {ref} | {rate / REAL_TIME:.2f} | "
                      f"{rate / r['naive_samples_per_s']:,.0f} |")
    if args.train_minutes > 0:
        result["budget_training"] = b = train_in_budget(args)
        print(f"\nNLL after {b['steps']} steps ({b['budget_minutes']:g} CPU min, {b['train_wall_minutes']:.1f} wall "
              f"min, {b['parameters']:,} parameters): {b['nll_bits']:.3f} bits/sample; unigram "
              f"{b['unigram_bits']:.3f}, uniform {b['uniform_bits']:.0f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
