"""SSD (Mamba-2's scan) benchmark: forward and forward+backward time and peak memory, with the peers.

Measures ssmkit's `ssd_scan` backends ("ref", the loop, and "chunked") against HF transformers' Mamba-2
scan on its pure-PyTorch path (`mamba2_chunk_scan`, what `Mamba2ForCausalLM` runs without mamba_ssm's
CUDA kernels; `pip install -e '.[bench]'`) at its default chunk of 256, and against ssmkit's Mamba-1
selective scan ("cpu" and "chunked" backends) at the same total state size: dim = heads * headdim
channels of d_state states each, so every implementation updates the same number of states per
position. All with D, dt_bias and softplus, fp32. Each measurement runs in a fresh subprocess, so that
the CPU peak memory (high-water RSS above the inputs) belongs to it alone; HF's output is checked
against ssmkit's before it is timed.

    python bench/ssd.py                                    # (2, 2048, 24, 64, 128) and (1, 8192, 24, 64, 128)
    python bench/ssd.py --shapes 1,512,8,64,64 --repeats 3

Prints a Markdown table and writes JSON (default bench/results/ssd.json).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from _measure import measure_fwd_bwd, run_worker

DEFAULT_SHAPES = ["2,2048,24,64,128", "1,8192,24,64,128"]
IMPLS = ["ref", "chunked", "hf", "mamba1_cpu", "mamba1_chunked"]
HF_CHUNK = 256  # Mamba2Config.chunk_size


def _inputs(shape, device):
    import torch

    b, L, H, P, N = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, L, H, P, generator=g)
    dt = torch.randn(b, L, H, generator=g) * 0.5 - 2.0
    A = -torch.exp(torch.rand(H, generator=g) * 2.77)  # -U(1, 16) on a log scale, as Mamba-2 initialises
    B, C = torch.randn(b, L, 1, N, generator=g), torch.randn(b, L, 1, N, generator=g)
    D, dt_bias = torch.randn(H, generator=g), torch.randn(H, generator=g) * 0.1
    return [t.to(device).requires_grad_() for t in (x, dt, A, B, C, D, dt_bias)]


def _ssd_fn(impl):
    if impl == "hf":
        from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

        return lambda x, dt, A, B, C, D, dt_bias: mamba2_chunk_scan(x, dt, A, B, C, HF_CHUNK, D=D, dt_bias=dt_bias,
                                                                    dt_softplus=True)
    from ssmkit.core.ssd import ssd_scan

    return lambda x, dt, A, B, C, D, dt_bias: ssd_scan(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True,
                                                       backend=impl)


def _mamba1_fn(backend):
    """Mamba-1's scan on the same inputs laid out as (batch, heads * headdim, L) channels with A, dt, D
    and dt_bias repeated over each head's channels and one group of B and C."""
    import torch

    from ssmkit.core.scan import selective_scan

    def run(x, dt, A, B, C, D, dt_bias):
        b, L, H, P = x.shape
        N = B.shape[-1]
        u = x.reshape(b, L, H * P).transpose(1, 2)
        delta = dt.repeat_interleave(P, dim=2).transpose(1, 2)
        A1 = A.repeat_interleave(P)[:, None].expand(H * P, N)
        y = selective_scan(u, delta, A1, B.permute(0, 2, 3, 1), C.permute(0, 2, 3, 1), D=D.repeat_interleave(P),
                           delta_bias=dt_bias.repeat_interleave(P), delta_softplus=True, backend=backend)
        return y.transpose(1, 2).reshape(b, L, H, P)

    return run


def worker(impl: str, shape, repeats: int) -> dict:
    """One (implementation, shape) measurement in this process; returns a result row."""
    import torch

    fn = _mamba1_fn(impl.split("_")[1]) if impl.startswith("mamba1") else _ssd_fn(impl)
    args = _inputs(shape, "cpu")
    check = None
    if impl == "hf":
        with torch.no_grad():
            ours = _ssd_fn("chunked")(*args)
            check = float((fn(*args) - ours).abs().max() / ours.abs().max())
        if not check < 1e-4:
            raise RuntimeError(f"HF's output differs from ssmkit's by {check:.2e} (relative to its largest value)")
    row = measure_fwd_bwd(fn, args, "cpu", repeats, warmup=1)
    b, L, H, P, N = shape
    states = b * L * H * P * N
    return dict(impl=impl, shape=list(shape), device="cpu", **row, ns_per_state=row["fwd_bwd_ms"] * 1e6 / states,
                max_rel_diff_vs_chunked=check)


def _available(impl: str) -> str | None:
    if impl == "hf" and importlib.util.find_spec("transformers") is None:
        return "transformers not installed (pip install -e '.[bench]')"
    if impl == "mamba1_cpu":
        from ssmkit.kernels.cpu import available

        if not available():
            return "the compiled CPU kernels are not available (no C compiler)"
    return None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="batch,length,heads,headdim,d_state per shape")
    p.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS, help="implementations to measure")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--ref-max-length", type=int, default=2048, help="skip the loop ('ref') above this length")
    p.add_argument("--out", default="bench/results/ssd.json", help="JSON output path")
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "SHAPE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        impl, shape = a.worker
        print(json.dumps(worker(impl, tuple(int(v) for v in shape.split(",")), a.repeats)))
        return

    rows, skipped = [], []
    for shape in a.shapes:
        L = int(shape.split(",")[1])
        for impl in a.impls:
            reason = _available(impl)
            if impl == "ref" and L > a.ref_max_length:
                reason = f"length {L} > --ref-max-length"
            if reason:
                skipped.append(f"{impl} at {shape}: {reason}")
                continue
            try:
                rows.append(run_worker([sys.executable, __file__, "--worker", impl, shape, "--repeats", str(a.repeats)]))
            except RuntimeError as e:
                skipped.append(f"{impl} at {shape}: failed: {e}")
                continue
            print(f"measured {impl} at {shape}", file=sys.stderr)

    for r in rows:  # ratios against the peers at the same shape
        same = {x["impl"]: x for x in rows if x["shape"] == r["shape"]}
        for peer in ("hf", "mamba1_cpu", "ref"):
            if peer in same and peer != r["impl"]:
                r[f"speedup_vs_{peer}"] = same[peer]["fwd_bwd_ms"] / r["fwd_bwd_ms"]
                r[f"memory_vs_{peer}"] = r["peak_mb"] / same[peer]["peak_mb"] if same[peer]["peak_mb"] else None

    fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
    print(f"\nSSD scan, cpu, over (batch, length, heads, headdim, d_state), {rows[0]['threads'] if rows else '?'} "
          "threads; Mamba-1 at dim = heads * headdim\n")
    print("| shape | impl | fwd ms | fwd+bwd ms | ns per state update | peak MB | speed-up vs HF | memory vs HF | "
          "speed-up vs Mamba-1 cpu |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {tuple(r['shape'])} | {r['impl']} | {r['fwd_ms']:.0f} | {r['fwd_bwd_ms']:.0f} | "
              f"{r['ns_per_state']:.3f} | {r['peak_mb']:.0f} | {fmt(r.get('speedup_vs_hf'), '.2f')} | "
              f"{fmt(r.get('memory_vs_hf'), '.2f')} | {fmt(r.get('speedup_vs_mamba1_cpu'), '.2f')} |")
    for s in skipped:
        print(f"- skipped {s}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": "cpu", "hf_chunk_size": HF_CHUNK, "rows": rows, "skipped": skipped},
                              indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
