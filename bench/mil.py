"""MIL benchmark: train-step time and peak memory against bag length for MambaMIL, ABMIL and TransMIL-lite.

One train step = forward and backward of one bag of N feature vectors (in_dim 1024, as CLAM's ResNet-50
features); the optimizer step is left out (its cost depends on the parameters, not on N). Each
measurement runs in a fresh subprocess so the CPU peak memory (high-water RSS of one forward + backward
above the model and the bag) belongs to it alone; on CUDA the peak is torch.cuda.max_memory_allocated.
A cell that fails or runs past --timeout is reported as skipped with the reason (TransMIL-lite's exact
attention is quadratic in N).

    python bench/mil.py                                   # CPU: N = 1k, 10k, 100k at width 512
    python bench/mil.py --lengths 1000,10000 --width 128 --repeats 2
    python bench/mil.py --device cuda

Prints a Markdown table and writes JSON (default bench/results/mil.json).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

from _measure import measure_fwd_bwd

MODELS = ("mambamil", "abmil", "transmil_lite")


def measure(model_name: str, length: int, width: int, device: str, repeats: int, warmup: int,
            threads: int) -> dict:
    """Forward and train-step (forward + backward) times in seconds and peak memory (MiB) at one bag length."""
    import torch

    import ssmkit

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = ssmkit.create_model(model_name, in_dim=1024, n_classes=2, d_model=width).to(device).train()
    bag = torch.randn(length, 1024, device=device)
    m = measure_fwd_bwd(lambda x: model(x)["logits"], (bag,), device, repeats, warmup)
    return {"model": model_name, "length": length, "width": width, "device": device, "status": "ok",
            "s_forward": m["fwd_ms"] / 1e3, "s_per_step": m["fwd_bwd_ms"] / 1e3, "peak_mib": m["peak_mb"],
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "repeats": repeats, "threads": m["threads"]}


def _child(args) -> None:
    if args.device == "cpu" and args.mem_limit_gb > 0:  # fail with an error, not by the OOM killer
        import resource

        limit = int(args.mem_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        result = measure(args.child_model, args.child_length, args.width, args.device, args.repeats, args.warmup,
                         args.threads)
    except Exception as e:  # noqa: BLE001 - every failure becomes a skipped cell
        result = {"model": args.child_model, "length": args.child_length, "width": args.width,
                  "device": args.device, "status": f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    print("RESULT " + json.dumps(result), flush=True)


def _run_one(args, model_name: str, length: int) -> dict:
    repeats = args.repeats if length < 10_000 else 1
    warmup = args.warmup if length < 10_000 else 0
    cmd = [sys.executable, __file__, "--child-model", model_name, "--child-length", str(length), "--width",
           str(args.width), "--device", args.device, "--repeats", str(repeats), "--warmup", str(warmup),
           "--mem-limit-gb", str(args.mem_limit_gb), "--threads", str(args.threads)]
    skipped = {"model": model_name, "length": length, "width": args.width, "device": args.device}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**skipped, "status": f"skipped: over the {args.timeout:.0f} s limit (--timeout)"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr.strip().splitlines() or ["no output (killed for memory?)"])[-1][:160]
    return {**skipped, "status": f"skipped: exit {proc.returncode}: {tail}"}


def table(results: list[dict]) -> str:
    lines = ["| model | bag length | width | s / forward | s / train step | peak MiB | params (M) | status |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['length']} | {r['width']} | | | | | {r['status']} |")
        else:
            lines.append(f"| {r['model']} | {r['length']} | {r['width']} | {r['s_forward']:.3f} | "
                         f"{r['s_per_step']:.3f} | {r['peak_mib']:.0f} | {r['params_m']:.2f} | ok |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--lengths", default="1000,10000,100000", help="bag lengths (instances)")
    p.add_argument("--width", type=int, default=512, help="model width d_model (published: 512)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--repeats", type=int, default=3, help="timed runs (1 from 10k instances on)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared machine)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per measurement before it is skipped")
    p.add_argument("--mem-limit-gb", type=float, default=8.0, help="CPU address-space limit per measurement (0: none)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "mil.json"))
    p.add_argument("--child-model", help=argparse.SUPPRESS)
    p.add_argument("--child-length", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_model:
        _child(args)
        return
    results = []
    for length in (int(n) for n in args.lengths.split(",")):
        for name in args.models.split(","):
            results.append(_run_one(args, name, length))
            print(table(results[-1:]).splitlines()[-1], flush=True)
    print(table(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.machine(), "python": platform.python_version(),
                               "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
