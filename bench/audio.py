"""SaShiMi benchmark: training samples/s at a 1-second window, and generation samples/s of the O(1)
recurrence against the naive baseline that recomputes the whole prefix for every new sample.

Training: forward + backward of the language model on `--batch` windows of `--window` samples
(`measure_fwd_bwd`: median of `--repeats`); samples/s = batch * window / time.
Generation: `ssmkit.audio.generate.generate` for `--gen-steps` samples at each batch size (aggregate
samples/s = batch * steps / time, setup included); naive: one full forward over a `--prefix`-sample
prefix per new sample (samples/s = batch / time of that forward), the cost every naive step has at that
position. The reference implementation reaches about 244-506 samples/s at batch 1 and 1,500 at batch 16
on a 2-core CPU for the 8-layer model (research note); real time is 16,000 samples/s.

    python bench/audio.py                                   # sashimi_sc09 on CPU
    python bench/audio.py --model sashimi_small --batches 1,16,256 --device cuda

Prints a Markdown table and writes JSON (default bench/results/audio.json).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import measure_fwd_bwd  # noqa: E402

import ssmkit  # noqa: E402
from ssmkit.audio.generate import generate  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sashimi_sc09", help="registered model name")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--window", type=int, default=16000, help="training window (samples)")
    parser.add_argument("--batch", type=int, default=1, help="training batch")
    parser.add_argument("--batches", default="1,16,256", help="generation batch sizes")
    parser.add_argument("--gen-steps", type=int, default=256, help="samples generated per measurement")
    parser.add_argument("--prefix", type=int, default=1024, help="prefix length of the naive baseline")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "audio.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    model = ssmkit.create_model(args.model).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    rows = []
    tokens = torch.randint(0, 256, (args.batch, args.window), device=args.device)
    train = measure_fwd_bwd(model, (tokens,), args.device, repeats=args.repeats, warmup=1)
    rows.append({"what": f"training fwd+bwd, window {args.window}, batch {args.batch}",
                 "samples_per_s": args.batch * args.window / (train["fwd_bwd_ms"] / 1e3),
                 "peak_mb": train["peak_mb"]})
    model.eval()
    for batch in (int(b) for b in args.batches.split(",")):
        generate(model, batch, 16)  # warm-up
        _sync(args.device)
        start = time.perf_counter()
        generate(model, batch, args.gen_steps, seed=1)
        _sync(args.device)
        recurrent = batch * args.gen_steps / (time.perf_counter() - start)
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
        naive = batch / statistics.median(times)
        rows.append({"what": f"generation, batch {batch}", "samples_per_s": recurrent,
                     "naive_samples_per_s": naive, "speedup": recurrent / naive, "real_time_factor": recurrent / 16000})

    result = {"model": args.model, "parameters": n_params, "device": args.device, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "gen_steps": args.gen_steps, "naive_prefix": args.prefix, "rows": rows}
    print(f"{args.model} ({n_params:,} parameters) on {args.device}, {torch.get_num_threads()} threads\n")
    print("| measurement | samples/s | naive (prefix %d) samples/s | speed-up | x real time |" % args.prefix)
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['samples_per_s']:,.0f} | {r.get('naive_samples_per_s', float('nan')):,.1f} | "
              f"{r.get('speedup', float('nan')):,.1f} | {r.get('real_time_factor', float('nan')):.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
