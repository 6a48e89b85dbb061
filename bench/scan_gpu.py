"""GPU benchmark of the selective scan: Triton kernels vs the chunked PyTorch backend (and mamba_ssm's
CUDA `selective_scan_fn` when it is importable), plus the one-step decode update.

    python bench/scan_gpu.py            # Markdown table on stdout, JSON in bench/results/scan_gpu.json
    python bench/scan_gpu.py --tune     # sweep launch configurations of the Triton kernels first
    python bench/scan_gpu.py --quick    # fewer shapes (smoke run)

Setting (Mamba-1 training call): u, delta, z, B, C in bf16, A = -(1..N) fp32, D and delta_bias fp32,
softplus on, B/C time-varying with one group. Times are medians of `triton.testing.do_bench`.
elements = batch * dim * L. Roofline: per element the forward must move
8 bytes (read u, delta, z; write y, 2 bytes each) and evaluate N exponentials and ~9N FLOPs; forward +
backward must move 22 bytes (+ read u, delta, z, dy; write du, ddelta, dz) and evaluate >= 2N
exponentials and ~27N FLOPs. The floor is the largest of bytes / measured copy bandwidth,
exps / MUFU rate (16 per clock per SM) and FLOPs / FP32 rate; "roofline" = floor / measured time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = [(8, 1536, 2048, 16), (8, 1536, 8192, 16), (64, 192, 3136, 1)]
DECODE = [(1, 1536, 16), (64, 1536, 16)]


def _gpu_rates():
    """(name, sms, clock Hz, fp32 FLOP/s, mufu exp/s) — datasheet-style numbers for the roofline."""
    p = torch.cuda.get_device_properties(0)
    name, sms = p.name, p.multi_processor_count
    clock = 1.98e9 if "H100" in name or "H200" in name else 1.41e9
    fp32 = sms * clock * 128 * 2  # 128 FP32 lanes per SM, FMA = 2 FLOPs
    mufu = sms * clock * 16
    return name, sms, clock, fp32, mufu


def measure_bandwidth():
    x = torch.empty(2**28, dtype=torch.float32, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    import triton.testing as tt

    ms = tt.do_bench(lambda: y.copy_(x), warmup=50, rep=200, return_mode="median")
    del x, y
    return 2 * 2**30 / (ms * 1e-3)


def make(batch, dim, L, N, dtype=torch.bfloat16, grad=True, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    u = torch.randn(batch, dim, L, device=dev, generator=g).to(dtype)
    delta = (0.1 * torch.randn(batch, dim, L, device=dev, generator=g)).to(dtype)
    z = torch.randn(batch, dim, L, device=dev, generator=g).to(dtype)
    B = torch.randn(batch, 1, N, L, device=dev, generator=g).to(dtype)
    C = torch.randn(batch, 1, N, L, device=dev, generator=g).to(dtype)
    A = -torch.arange(1, N + 1, device=dev, dtype=torch.float32).repeat(dim, 1)
    D = torch.ones(dim, device=dev)
    dt = torch.exp(torch.rand(dim, device=dev, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    bias = dt + torch.log(-torch.expm1(-dt))
    xs = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=bias)
    if grad:
        for k in xs:
            xs[k].requires_grad_(True)
    return xs


def runner(backend, xs, cfg=None):
    from ssmkit.core.scan import selective_scan

    if backend == "mamba_ssm":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        def f():
            return selective_scan_fn(xs["u"], xs["delta"], xs["A"], xs["B"], xs["C"], xs["D"], xs["z"],
                                     xs["delta_bias"], delta_softplus=True)
        return f
    from ssmkit.kernels.selective_scan import kernel_config

    def f():
        with kernel_config(**(cfg or {})):
            return selective_scan(xs["u"], xs["delta"], xs["A"], xs["B"], xs["C"], xs["D"], xs["z"],
                                  xs["delta_bias"], True, backend=backend)
    return f


def bench_one(backend, shape, cfg=None, rep=200, fwd_only=False):
    import triton.testing as tt

    batch, dim, L, N = shape
    torch.cuda.empty_cache()
    xs = make(batch, dim, L, N)
    f = runner(backend, xs, cfg)
    gy = torch.randn(batch, dim, L, device="cuda", dtype=torch.bfloat16)
    params = list(xs.values())

    def fwd():
        with torch.no_grad():
            return f()

    def fwdbwd():
        y = f()
        torch.autograd.grad(y, params, gy)

    res = {}
    res["fwd_ms"] = tt.do_bench(fwd, warmup=25, rep=rep, return_mode="median")
    if not fwd_only:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwdbwd()
        torch.cuda.synchronize()
        res["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        res["fwdbwd_ms"] = tt.do_bench(fwdbwd, warmup=25, rep=rep, return_mode="median")
    del xs, gy, params
    return res


def floor_ms(shape, bw, fp32, mufu, fwdbwd):
    batch, dim, L, N = shape
    el = batch * dim * L
    if fwdbwd:
        t = max(22 * el / bw, 2 * N * el / mufu, 27 * N * el / fp32)
    else:
        t = max(8 * el / bw, N * el / mufu, 9 * N * el / fp32)
    return t * 1e3


def bench_decode(batch, dim, N):
    import triton.testing as tt
    from ssmkit.core.scan import selective_state_update

    g = torch.Generator(device="cuda").manual_seed(0)
    state = torch.randn(batch, dim, N, device="cuda", generator=g)
    x = torch.randn(batch, dim, device="cuda", generator=g, dtype=torch.float32).bfloat16()
    dt = torch.randn(batch, dim, device="cuda", generator=g).bfloat16()
    A = -torch.rand(dim, N, device="cuda", generator=g) - 1
    B = torch.randn(batch, N, device="cuda", generator=g).bfloat16()
    C = torch.randn(batch, N, device="cuda", generator=g).bfloat16()
    D = torch.ones(dim, device="cuda")
    z = torch.randn(batch, dim, device="cuda", generator=g).bfloat16()
    bias = torch.rand(dim, device="cuda") - 4

    def tri():
        return selective_state_update(state, x, dt, A, B, C, D, z, bias, True)

    def torch_path():
        os.environ["SSMKIT_BACKEND"] = "chunked"
        try:
            return selective_state_update(state, x, dt, A, B, C, D, z, bias, True)
        finally:
            del os.environ["SSMKIT_BACKEND"]

    out = {}
    for name, fn in (("triton", tri), ("torch", torch_path)):
        out[name] = tt.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # us
        # CUDA-graph replay: the launch cost removed
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                fn()
            out[name + "_graph"] = tt.do_bench(graph.replay, warmup=25, rep=100, return_mode="median") * 1e3
        except Exception as e:  # noqa: BLE001
            out[name + "_graph"] = None
            out[name + "_graph_error"] = str(e)[:200]
    return out


TUNE_FWD = [dict(num_warps=w, n_par=q) for (w, q) in ((1, 4), (1, 8), (1, 16), (4, 8), (4, 16), (1, 1))]
TUNE_BWD = [dict(bwd_num_warps=w, bwd_n_par=q, bwd_chunk=t)
            for (w, q, t) in ((1, 4, 2), (1, 8, 2), (1, 16, 2), (2, 8, 2), (1, 8, 4), (1, 1, 2))]


def tune(shapes, log):
    import triton.testing as tt

    results = []
    for shape in shapes:
        batch, dim, L, N = shape
        xs = make(batch, dim, L, N)
        gy = torch.randn(batch, dim, L, device="cuda", dtype=torch.bfloat16)
        params = list(xs.values())
        for cfg in TUNE_FWD:
            t0 = time.time()
            try:
                f = runner("triton", xs, dict(impl="seq", **cfg))
                with torch.no_grad():
                    ms = tt.do_bench(lambda: f(), warmup=10, rep=50, return_mode="median")
            except Exception as e:  # noqa: BLE001
                ms, cfg = None, dict(cfg, error=str(e)[:200])
            results.append(dict(shape=shape, kind="fwd", cfg=cfg, ms=ms, wall_s=time.time() - t0))
            log(f"tune fwd {shape} {cfg} -> {ms}")
        for cfg in TUNE_BWD:
            t0 = time.time()
            try:
                f = runner("triton", xs, dict(impl="seq", **cfg))
                fn = lambda: torch.autograd.grad(f(), params, gy)  # noqa: E731
                ms = tt.do_bench(fn, warmup=10, rep=50, return_mode="median")
            except Exception as e:  # noqa: BLE001
                ms, cfg = None, dict(cfg, error=str(e)[:200])
            results.append(dict(shape=shape, kind="fwdbwd", cfg=cfg, ms=ms, wall_s=time.time() - t0))
            log(f"tune fwd+bwd {shape} {cfg} -> {ms}")
        try:  # the assoc kernels, for reference
            f = runner("triton", xs, dict(impl="assoc"))
            with torch.no_grad():
                ms = tt.do_bench(lambda: f(), warmup=10, rep=50, return_mode="median")
            ms2 = tt.do_bench(lambda: torch.autograd.grad(f(), params, gy), warmup=10, rep=50, return_mode="median")
            results.append(dict(shape=shape, kind="assoc", cfg={}, ms=ms, ms_fwdbwd=ms2))
            log(f"tune assoc {shape} fwd {ms} fwd+bwd {ms2}")
        except Exception as e:  # noqa: BLE001
            log(f"assoc failed: {e}")
        del xs, gy, params
        torch.cuda.empty_cache()
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-chunked", action="store_true")
    ap.add_argument("--tune-only", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scan_gpu.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/scan_gpu.py needs a CUDA device; nothing to measure on this machine.")
        return 0
    os.environ.pop("TRITON_INTERPRET", None)
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    name, sms, clock, fp32, mufu = _gpu_rates()
    bw = measure_bandwidth()
    log(f"device {name}: {sms} SMs; measured copy bandwidth {bw / 1e12:.2f} TB/s; "
        f"roofline rates FP32 {fp32 / 1e12:.0f} TFLOP/s, MUFU {mufu / 1e12:.2f} Texp/s (at {clock / 1e9:.2f} GHz)")
    try:
        import mamba_ssm  # noqa: F401
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401

        peer = "mamba_ssm"
    except Exception as e:  # noqa: BLE001
        peer = None
        log(f"peer mamba_ssm selective_scan_fn not importable ({type(e).__name__}: {str(e)[:120]}); "
            "ratios to the peer are omitted")
    shapes = SHAPES[:1] + SHAPES[2:] if args.quick else SHAPES
    out = dict(device=name, bandwidth_Bps=bw, fp32_flops=fp32, mufu_per_s=mufu, torch=torch.__version__,
               python=platform.python_version(), rows=[], decode=[], tune=None)
    if args.tune:
        out["tune"] = tune([SHAPES[0], SHAPES[2]], log)
        if args.tune_only:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(out, indent=1, default=str))
            return 0

    backends = ["triton", "triton-assoc"] + ([] if args.no_chunked else ["chunked"]) + ([peer] if peer else [])
    for shape in shapes:
        for be in backends:
            t0 = time.time()
            try:
                if be == "triton-assoc":
                    r = bench_one("triton", shape, cfg=dict(impl="assoc"), rep=100)
                else:
                    r = bench_one(be, shape, rep=200 if be != "chunked" else 30)
            except Exception as e:  # noqa: BLE001
                r = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
            r.update(backend=be, shape=shape, wall_s=time.time() - t0)
            if "fwd_ms" in r:
                el = shape[0] * shape[1] * shape[2]
                r["fwd_Gel_s"] = el / r["fwd_ms"] / 1e6
                r["fwd_roofline"] = floor_ms(shape, bw, fp32, mufu, False) / r["fwd_ms"]
                if "fwdbwd_ms" in r:
                    r["fwdbwd_Gel_s"] = el / r["fwdbwd_ms"] / 1e6
                    r["fwdbwd_roofline"] = floor_ms(shape, bw, fp32, mufu, True) / r["fwdbwd_ms"]
            out["rows"].append(r)
            log(f"{be} {shape}: {json.dumps({k: v for k, v in r.items() if k not in ('backend', 'shape')})}")
    # the ref backend only at a tiny shape
    try:
        tiny = (1, 64, 256, 16)
        r = bench_one("ref", tiny, rep=20)
        r.update(backend="ref", shape=tiny)
        out["rows"].append(r)
    except Exception as e:  # noqa: BLE001
        log(f"ref failed: {e}")
    for b, dim, N in DECODE:
        try:
            d = bench_decode(b, dim, N)
        except Exception as e:  # noqa: BLE001
            d = dict(error=str(e)[:200])
        d.update(batch=b, dim=dim, N=N)
        out["decode"].append(d)
        log(f"decode {b}x{dim}x{N}: {d}")

    # ---- Markdown table
    def row_for(be, shape):
        for r in out["rows"]:
            if r["backend"] == be and tuple(r["shape"]) == tuple(shape):
                return r
        return None

    md = ["", f"### Selective scan on {name} (bf16 I/O, z + D + delta_bias + softplus, G=1)", "",
          "| (batch, dim, L, N) | backend | fwd ms | fwd Gelem/s | fwd roofline | fwd+bwd ms | fwd+bwd Gelem/s "
          "| fwd+bwd roofline | peak MiB | fwd vs chunked | fwd+bwd vs chunked | fwd vs peer | fwd+bwd vs peer |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for shape in shapes + [(1, 64, 256, 16)]:
        ch = row_for("chunked", shape)
        pr = row_for(peer, shape) if peer else None
        for be in backends + ["ref"]:
            r = row_for(be, shape)
            if r is None:
                continue
            if "error" in r:
                md.append(f"| {tuple(shape)} | {be} | error: {r['error'][:60]} |" + " |" * 11)
                continue

            def f(k, fmt="{:.3f}"):
                v = r.get(k)
                return fmt.format(v) if v is not None else "-"

            def ratio(other, k):
                if other is None or other.get(k) is None or r.get(k) is None:
                    return "-"
                return f"{other[k] / r[k]:.2f}x"

            md.append(f"| {tuple(shape)} | {be} | {f('fwd_ms')} | {f('fwd_Gel_s', '{:.1f}')} | "
                      f"{f('fwd_roofline', '{:.0%}')} | {f('fwdbwd_ms')} | {f('fwdbwd_Gel_s', '{:.1f}')} | "
                      f"{f('fwdbwd_roofline', '{:.0%}')} | {f('peak_mib', '{:.0f}')} | {ratio(ch, 'fwd_ms')} | "
                      f"{ratio(ch, 'fwdbwd_ms')} | {ratio(pr, 'fwd_ms')} | {ratio(pr, 'fwdbwd_ms')} |")
    md += ["", "Ratios are speed-ups (other backend's time / this backend's time).", "",
           "### Decode step (selective_state_update, bf16 x/dt/z/B/C, fp32 state)", "",
           "| batch x dim x N | triton us | torch us | triton us (CUDA graph) | torch us (CUDA graph) | speed-up |",
           "|---|---|---|---|---|---|"]
    for d in out["decode"]:
        if "error" in d:
            md.append(f"| {d['batch']}x{d['dim']}x{d['N']} | error: {d['error'][:60]} | | | | |")
            continue
        g = lambda k: f"{d[k]:.1f}" if d.get(k) is not None else "-"  # noqa: E731
        sp = f"{d['torch'] / d['triton']:.1f}x" if d.get("triton") else "-"
        md.append(f"| {d['batch']}x{d['dim']}x{d['N']} | {g('triton')} | {g('torch')} | {g('triton_graph')} | "
                  f"{g('torch_graph')} | {sp} |")
    if not peer:
        md += ["", "Peer (mamba_ssm selective_scan_fn) not importable on this machine: not measured."]
    text = "\n".join(md)
    print(text)
    out["markdown"] = text
    out["log"] = lines
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
