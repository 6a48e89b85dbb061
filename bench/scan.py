"""Selective-scan benchmark: forward and forward+backward time and peak memory of every backend.

Compares ssmkit's backends ("ref", "chunked", and "triton" on CUDA) with the peer pure-PyTorch
scan of mambapy (`MambaBlock.selective_scan`: materialised (B, L, D, N) tensors + Blelloch pscan)
when it is installed, in one run. Each measurement runs in a fresh subprocess so that the CPU peak
memory (high-water RSS above the inputs) belongs to that measurement alone.

    python bench/scan.py                       # the issue's shapes on CPU
    python bench/scan.py --device cuda
    python bench/scan.py --shapes 2,256,1024,16 --repeats 3

Prints a Markdown table and writes JSON (default bench/results/scan.json).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _measure import measure_fwd_bwd, run_worker

DEFAULT_SHAPES = ["2,256,1024,16", "1,768,2048,16"]
IMPLS = ["ref", "chunked", "triton", "mambapy"]


def _inputs(shape, device, layout):
    import torch

    b, d, L, N = shape
    g = torch.Generator().manual_seed(0)
    u, delta = torch.randn(b, d, L, generator=g), 0.1 * torch.rand(b, d, L, generator=g)
    A, D = -(0.5 + torch.rand(d, N, generator=g)), torch.randn(d, generator=g)
    B, C = torch.randn(b, N, L, generator=g), torch.randn(b, N, L, generator=g)
    if layout == "mambapy":  # its native layout: (B, L, ED) and (B, L, N)
        u, delta, B, C = (t.transpose(1, 2).contiguous() for t in (u, delta, B, C))
    return [t.to(device).requires_grad_() for t in (u, delta, A, B, C, D)]


def _scan_fn(impl):
    import torch

    if impl == "mambapy":
        from mambapy.pscan import pscan

        def mambapy_scan(x, delta, A, B, C, D):  # the maths of mambapy.mamba.MambaBlock.selective_scan
            deltaA = torch.exp(delta.unsqueeze(-1) * A)
            BX = delta.unsqueeze(-1) * B.unsqueeze(2) * x.unsqueeze(-1)
            hs = pscan(deltaA, BX)
            return (hs @ C.unsqueeze(-1)).squeeze(3) + D * x

        return mambapy_scan
    from ssmkit.core.scan import selective_scan

    return lambda u, delta, A, B, C, D: selective_scan(u, delta, A, B, C, D, backend=impl)


def worker(impl: str, shape, device: str, repeats: int) -> dict:
    """One (implementation, shape) measurement in this process; returns a result row."""
    fn = _scan_fn(impl)
    args = _inputs(shape, device, "mambapy" if impl == "mambapy" else "ssmkit")
    row = measure_fwd_bwd(fn, args, device, repeats)
    b, d, L, N = shape
    return dict(impl=impl, shape=list(shape), device=device, **row, elements_per_s=b * d * L / (row["fwd_bwd_ms"] / 1e3))


def _available(impl: str, device: str) -> str | None:
    """None when `impl` can run on `device`, else the reason it is skipped."""
    import importlib.util

    if impl == "mambapy" and importlib.util.find_spec("mambapy") is None:
        return "mambapy not installed (pip install mambapy)"
    if impl == "triton":
        if device != "cuda":
            return "needs a CUDA device"
        if importlib.util.find_spec("ssmkit.kernels.selective_scan") is None:
            return "ssmkit.kernels.selective_scan missing"
    return None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="batch,dim,length,d_state per shape")
    p.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS, help="implementations to measure")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    p.add_argument("--repeats", type=int, default=7, help="timed repetitions (median reported)")
    p.add_argument("--ref-max-length", type=int, default=2048, help="skip the sequential 'ref' backend above this length")
    p.add_argument("--out", default="bench/results/scan.json", help="JSON output path")
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "SHAPE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        impl, shape = a.worker
        print(json.dumps(worker(impl, tuple(int(v) for v in shape.split(",")), a.device, a.repeats)))
        return

    rows, skipped = [], []
    for shape in a.shapes:
        L = int(shape.split(",")[2])
        for impl in a.impls:
            reason = _available(impl, a.device)
            if impl == "ref" and L > a.ref_max_length:
                reason = f"length {L} > --ref-max-length"
            if reason:
                skipped.append(f"{impl} at {shape}: {reason}")
                continue
            cmd = [sys.executable, __file__, "--worker", impl, shape, "--device", a.device, "--repeats", str(a.repeats)]
            try:
                rows.append(run_worker(cmd))
            except RuntimeError as e:
                skipped.append(f"{impl} at {shape}: failed: {e}")
                continue
            print(f"measured {impl} at {shape}", file=sys.stderr)

    for r in rows:  # ratios against the peer and against the reference at the same shape
        same = {x["impl"]: x for x in rows if x["shape"] == r["shape"]}
        for peer in ("mambapy", "ref"):
            if peer in same and peer != r["impl"]:
                r[f"speedup_vs_{peer}"] = same[peer]["fwd_bwd_ms"] / r["fwd_bwd_ms"]
                r[f"memory_vs_{peer}"] = r["peak_mb"] / same[peer]["peak_mb"] if same[peer]["peak_mb"] else None

    fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
    print(f"\nSelective scan, {a.device}, fwd+bwd over (batch, dim, length, d_state); ratios vs mambapy's pscan\n")
    print("| shape | impl | fwd ms | fwd+bwd ms | peak MB | elements/s | speed-up vs mambapy | memory vs mambapy | speed-up vs ref |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {tuple(r['shape'])} | {r['impl']} | {r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | {r['peak_mb']:.0f} | "
              f"{r['elements_per_s']:.3g} | {fmt(r.get('speedup_vs_mambapy'), '.2f')} | "
              f"{fmt(r.get('memory_vs_mambapy'), '.2f')} | {fmt(r.get('speedup_vs_ref'), '.1f')} |")
    for s in skipped:
        print(f"- skipped {s}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": a.device, "rows": rows, "skipped": skipped}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
