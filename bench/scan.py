"""Selective-scan benchmark: forward and forward+backward time and peak memory of every backend.

Compares ssmkit's backends ("ref", "chunked", "cpu" — the compiled kernels — and "triton" on CUDA)
with the peer pure-PyTorch scan of mambapy (`MambaBlock.selective_scan`: materialised (B, L, D, N)
tensors + Blelloch pscan) when it is installed, and on CPU with the hardware probe
(bench/scan_probe.c: the forward as a minimal C loop, states in registers, compiled with the same
flags as the "cpu" backend, on as many threads), in one run. Each measurement runs in a fresh
subprocess so that the CPU peak memory (high-water RSS above the inputs) belongs to it alone. The
"cpu" backend's first-use build is timed in a fresh cache folder.

    python bench/scan.py                       # (2, 256, 1024, 16) and (1, 768, 2048, 16) on CPU
    python bench/scan.py --device cuda
    python bench/scan.py --shapes 2,256,1024,16 --repeats 3

Prints a Markdown table and writes JSON (default bench/results/scan.json).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _measure import measure_fwd_bwd, run_worker

DEFAULT_SHAPES = ["2,256,1024,16", "1,768,2048,16"]
IMPLS = ["ref", "chunked", "cpu", "triton", "mambapy", "probe"]
PROBE = Path(__file__).with_name("scan_probe.c")


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


def _probe_fwd_ms(shape, repeats: int) -> float:
    """Median forward time of the compiled probe loop on the benchmark's inputs (fp32, no grad)."""
    import torch

    from ssmkit.kernels.cpu import _CFLAGS

    b, d, L, N = shape
    if N != 16:
        raise RuntimeError("the probe is written for d_state 16")
    with tempfile.TemporaryDirectory() as tmp:
        lib = Path(tmp) / "probe.so"
        subprocess.run(["cc", *_CFLAGS, "-shared", str(PROBE), "-o", str(lib), "-lm"], check=True)
        probe = ctypes.CDLL(str(lib)).probe_scan
    u, delta, A, B, C, D = (t.detach() for t in _inputs(shape, "cpu", "ssmkit"))
    Bt, Ct = (X.transpose(1, 2).contiguous() for X in (B, C))
    y = torch.empty_like(u)
    ptrs = [ctypes.c_void_p(t.data_ptr()) for t in (u, delta, A, Bt, Ct, D, y)]
    sizes = [ctypes.c_int64(v) for v in (b, d, L, torch.get_num_threads())]
    run = lambda: probe(*ptrs, *sizes)  # noqa: E731
    run(), run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    from ssmkit.core.scan import selective_scan

    if not torch.allclose(y, selective_scan(u, delta, A, B, C, D, backend="ref"), rtol=1e-3, atol=1e-3):
        raise RuntimeError("the probe's output differs from the reference scan")
    return sorted(times)[len(times) // 2] * 1e3


def build_seconds() -> float:
    """Time of the "cpu" backend's first-use build, in a fresh process and cache folder."""
    with tempfile.TemporaryDirectory() as tmp:
        code = ("import time; t = time.perf_counter(); from ssmkit.kernels import cpu; assert cpu.available(); "
                "print(time.perf_counter() - t)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "SSMKIT_CACHE_DIR": tmp})
    return float(out.stdout.strip().splitlines()[-1])


def worker(impl: str, shape, device: str, repeats: int) -> dict:
    """One (implementation, shape) measurement in this process; returns a result row."""
    import torch

    if impl == "probe":
        return dict(impl=impl, shape=list(shape), device=device, fwd_ms=_probe_fwd_ms(shape, repeats),
                    fwd_bwd_ms=None, peak_mb=None, threads=torch.get_num_threads())
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
    if impl in ("cpu", "probe") and device != "cpu":
        return "CPU only"
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

    for r in rows:  # ratios against the peer, the reference, chunked's memory and the probe at the same shape
        same = {x["impl"]: x for x in rows if x["shape"] == r["shape"]}
        if r["fwd_bwd_ms"] is None:
            continue
        for peer in ("mambapy", "ref"):
            if peer in same and peer != r["impl"]:
                r[f"speedup_vs_{peer}"] = same[peer]["fwd_bwd_ms"] / r["fwd_bwd_ms"]
        if "chunked" in same and same["chunked"]["peak_mb"]:
            r["memory_vs_chunked"] = r["peak_mb"] / same["chunked"]["peak_mb"]
        if "probe" in same:
            r["fwd_vs_probe"] = r["fwd_ms"] / same["probe"]["fwd_ms"]

    fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
    print(f"\nSelective scan, {a.device}, over (batch, dim, length, d_state), {rows[0]['threads'] if rows else '?'} "
          "threads; probe: the forward as a minimal compiled loop\n")
    print("| shape | impl | fwd ms | fwd+bwd ms | peak MB | fwd / probe | fwd+bwd speed-up vs mambapy | "
          "memory vs chunked | speed-up vs ref |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {tuple(r['shape'])} | {r['impl']} | {r['fwd_ms']:.1f} | {fmt(r['fwd_bwd_ms'], '.1f')} | "
              f"{fmt(r['peak_mb'], '.0f')} | {fmt(r.get('fwd_vs_probe'), '.2f')} | "
              f"{fmt(r.get('speedup_vs_mambapy'), '.1f')} | {fmt(r.get('memory_vs_chunked'), '.2f')} | "
              f"{fmt(r.get('speedup_vs_ref'), '.1f')} |")
    for s in skipped:
        print(f"- skipped {s}")
    build = build_seconds() if a.device == "cpu" and "cpu" in a.impls else None
    if build is not None:
        print(f"- the cpu backend's first-use build: {build:.1f} s (then cached)")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": a.device, "rows": rows, "skipped": skipped, "cpu_build_s": build}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
