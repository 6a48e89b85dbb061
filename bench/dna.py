"""HyenaDNA benchmark: tokens/s and peak memory of HyenaDNA vs a same-width causal Transformer.

For each sequence length, forward (no grad) and forward+backward of one sequence (batch 1) are timed for
HyenaDNA-tiny (d_model 128, 2 layers, d_inner 512; its l_max set to the length) and for a Transformer of
the same width and depth (pre-norm blocks, 4 heads, causal `scaled_dot_product_attention`, the same
GELU MLP and tied embedding). Each measurement runs in a fresh subprocess (so the CPU peak memory, the
high-water RSS above the model and inputs, belongs to it alone) under a time limit; a run past the limit
or out of memory is reported as skipped with the reason. Lengths listed in --forward-only are timed
without backward.

    python bench/dna.py                                    # CPU: 1k and 32k, 160k forward only
    python bench/dna.py --lengths 1024,32768,163840 --forward-only 1048576 --device cuda

Prints a Markdown table with the HyenaDNA / Transformer speed ratio beside the paper's claim (160x faster
than FlashAttention at 1M tokens, forward+backward on an A100) and writes JSON (bench/results/dna.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from _measure import measure_fwd_bwd

CLAIM = "HyenaDNA paper: 160x faster than FlashAttention at 1M tokens (fwd+bwd, A100)"


def build(model: str, length: int, d_model: int, n_layer: int):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    if model == "hyenadna":
        import ssmkit

        return ssmkit.create_model("hyenadna_tiny_1k", d_model=d_model, n_layer=n_layer, d_inner=4 * d_model,
                                   l_max=length, embed_dropout=0.0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
            self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
            self.fc1, self.fc2 = nn.Linear(d_model, 4 * d_model), nn.Linear(4 * d_model, d_model)

        def forward(self, x):
            B, L, _ = x.shape
            q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, 4, d_model // 4).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(a.transpose(1, 2).reshape(B, L, d_model))
            return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))

    class Transformer(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(16, d_model)
            self.blocks = nn.ModuleList(Block() for _ in range(n_layer))
            self.norm = nn.LayerNorm(d_model)

        def forward(self, ids):
            x = self.emb(ids)
            for block in self.blocks:
                x = block(x)
            return self.norm(x) @ self.emb.weight.T

    torch.manual_seed(0)
    return Transformer()


def _forward_only(model, ids, device: str, repeats: int) -> dict:
    """Peak memory and median/best time (ms) of a no-grad forward (for lengths too long to train on here)."""
    import statistics
    import time

    import torch

    from _measure import peak_rss_bytes, reset_peak_rss, rss_bytes

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
        reset_peak_rss()
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(ids)
            sync()
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else max(peak_rss_bytes() - base, 0)
    return dict(fwd_ms=statistics.median(times) * 1e3, fwd_min_ms=min(times) * 1e3, peak_mb=peak / 2**20,
                threads=torch.get_num_threads())


def worker(args) -> None:
    import torch

    model = build(args.model, args.length, args.d_model, args.n_layer).to(args.device)
    ids = torch.randint(7, 11, (1, args.length), device=args.device)
    if args.mode == "fwd":
        row = _forward_only(model, ids, args.device, args.repeats)
    else:
        row = measure_fwd_bwd(lambda x: model(x).float(), (ids,), args.device, args.repeats, warmup=1)
        model.zero_grad(set_to_none=True)
    row.update(model=args.model, length=args.length, mode=args.mode,
               params=sum(p.numel() for p in model.parameters()))
    print(json.dumps(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,32768", help="lengths timed forward and forward+backward")
    parser.add_argument("--forward-only", default="163840", help="lengths timed forward only (empty: none)")
    parser.add_argument("--models", default="hyenadna,transformer")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per measurement before it is skipped")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "dna.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    plan = [(n, "fwd+bwd") for n in args.lengths.split(",") if n] + \
           [(n, "fwd") for n in args.forward_only.split(",") if n]
    rows = []
    for length, mode in plan:
        for model in args.models.split(","):
            cmd = [sys.executable, __file__, "--worker", "--model", model, "--length", length, "--mode", mode,
                   "--d-model", str(args.d_model), "--n-layer", str(args.n_layer), "--device", args.device,
                   "--repeats", str(args.repeats if int(length) <= 32768 else 1)]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                if out.returncode != 0:
                    raise RuntimeError((out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1])
                row = json.loads(out.stdout.strip().splitlines()[-1])
            except (subprocess.TimeoutExpired, RuntimeError) as e:
                reason = f"over {args.timeout:.0f} s" if isinstance(e, subprocess.TimeoutExpired) else str(e)[:120]
                row = dict(model=model, length=int(length), mode=mode, skipped=reason)
            key = "fwd_bwd_ms" if mode == "fwd+bwd" else "fwd_ms"
            if key in row:
                row["tokens_per_s"] = int(length) / (row[key] / 1e3)
            rows.append(row)
            print(json.dumps(row), flush=True)

    lines = [f"HyenaDNA (d_model {args.d_model}, {args.n_layer} layers) vs a same-width SDPA Transformer, batch 1, "
             f"{args.device} ({platform.machine()}, {os.cpu_count()} cores)", "",
             "| length | mode | model | ms | tokens/s | peak MiB | Hyena speed-up |", "|---|---|---|---|---|---|---|"]
    for length, mode in plan:
        found = {r["model"]: r for r in rows if r["length"] == int(length) and r["mode"] == mode}
        hy, tf = found.get("hyenadna", {}), found.get("transformer", {})
        ratio = f"{hy['tokens_per_s'] / tf['tokens_per_s']:.2f}x" if "tokens_per_s" in hy and "tokens_per_s" in tf \
            else "-"
        for name, r in found.items():
            ms = r.get("fwd_bwd_ms" if mode == "fwd+bwd" else "fwd_ms")
            lines.append(f"| {length} | {mode} | {name} | {f'{ms:.0f}' if ms else r.get('skipped')} | "
                         f"{r.get('tokens_per_s', 0):.0f} | {r.get('peak_mb', float('nan')):.0f} | "
                         f"{ratio if name == 'hyenadna' else ''} |")
    lines += ["", CLAIM]
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "claim": CLAIM, "d_model": args.d_model,
                                          "n_layer": args.n_layer, "device": args.device}, indent=2) + "\n")


if __name__ == "__main__":
    main()
