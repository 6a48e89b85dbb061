"""2-D scan and ConvSSM benchmark: forward+backward time and peak memory per backend, vs the VMamba peer.

Two families, each measured in a fresh subprocess (so the CPU peak RSS belongs to one measurement):

- scan2d at (batch, dim, H, W, d_state): `selective_scan_2d` over the four corner directions with
  backend "chunked", "cpu" (the compiled kernels; CPU only), "triton" (CUDA only) and "ref" (the cell-by-cell
  double loop, tiny sizes only), vs the peer
  "cross_scan": VMamba's way of scanning an image — `gather` the feature map in the four cross-scan
  orders (`get_scan_order("cross4")`), run one grouped 1-D `selective_scan` over the 4·dim sequences
  (B, C per direction as groups; the fastest 1-D backend of the device), `merge` back. Same inputs (u, delta, A, B, C, D) for both.
- convssm at (batch, frames, channels, H, W, P): `convssm_scan` (parallel over time) vs "step_loop",
  `convssm_step` frame after frame (the sequential form used for generation, and the oracle).

    python bench/scan2d.py                 # CPU-friendly sizes
    python bench/scan2d.py --full          # large sizes: (8, 192, 56, 56, 16) and (8, 16, 64, 32, 32, 64)
    python bench/scan2d.py --device cuda --full
    python bench/scan2d.py --train         # also: a short video-model training run vs copy-last-frame

Prints Markdown tables and writes JSON (default bench/results/scan2d.json).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _measure import measure_fwd_bwd, run_worker

SCAN2D_SMALL = ["1,4,8,8,4", "2,32,16,16,8", "2,64,28,28,16"]
SCAN2D_FULL = ["8,192,56,56,16"]
CONVSSM_SMALL = ["2,8,16,16,16,16", "2,16,32,32,32,32"]
CONVSSM_FULL = ["8,16,64,32,32,64"]
SCAN2D_IMPLS = ["ref", "chunked", "cpu", "triton", "cross_scan"]
CONVSSM_IMPLS = ["scan", "step_loop"]


def _scan2d_case(shape, impl, device):
    import torch

    from ssmkit.core.scan import selective_scan
    from ssmkit.core.scan2d import DIRECTIONS, selective_scan_2d
    from ssmkit.vision.scan_orders import gather, get_scan_order, merge

    b, d, H, W, N = shape
    g = torch.Generator().manual_seed(0)
    u, delta = torch.randn(b, d, H, W, generator=g), 0.1 * torch.rand(b, d, H, W, generator=g)
    A, D = -(0.5 + torch.rand(d, N, generator=g)), torch.randn(d, generator=g)
    B, C = torch.randn(b, N, H, W, generator=g), torch.randn(b, N, H, W, generator=g)
    args = [t.to(device).requires_grad_() for t in (u, delta, A, B, C, D)]
    if impl in ("ref", "chunked", "cpu", "triton"):
        def fn(u, delta, A, B, C, D):
            return selective_scan_2d(u, delta, A, B, C, D, directions=DIRECTIONS, backend=impl)
    else:
        orders = get_scan_order("cross4")
        K = len(orders)

        def fn(u, delta, A, B, C, D):  # VMamba: cross scan -> one grouped 1-D scan -> cross merge
            xs = gather(u, orders).reshape(b, K * d, H * W)
            dts = gather(delta, orders).reshape(b, K * d, H * W)
            Bs, Cs = gather(B, orders), gather(C, orders)  # (b, K, N, L): one group per direction
            y = selective_scan(xs, dts, A.repeat(K, 1), Bs, Cs, D.repeat(K))
            return merge(y.view(b, K, d, H * W), orders, (H, W))
    return fn, args, b * d * H * W


def _convssm_case(shape, impl, device):
    import torch

    from ssmkit.core.convssm import ConvS5Layer

    b, L, U, H, W, P = shape
    torch.manual_seed(0)
    layer = ConvS5Layer(U, P).to(device)
    u = torch.randn(b, L, U, H, W, device=device, requires_grad=True)
    if impl == "scan":
        def fn(u, *params):
            return layer(u)[0]
    else:
        def fn(u, *params):
            state, ys = layer.init_state(b), []
            for t in range(L):
                y, state = layer.step(u[:, t], state)
                ys.append(y)
            return torch.stack(ys, 1)
    return fn, [u, *layer.parameters()], b * L * U * H * W


def worker(family: str, impl: str, shape, device: str, repeats: int, threads: int = 0) -> dict:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    case = _scan2d_case if family == "scan2d" else _convssm_case
    fn, args, elements = case(shape, impl, device)
    row = measure_fwd_bwd(fn, args, device, repeats)
    return dict(family=family, impl=impl, shape=list(shape), device=device, **row,
                elements_per_s=elements / (row["fwd_bwd_ms"] / 1e3))


def train_benchmark(steps: int, out_dir: str) -> dict:
    """The `ssmkit video` default model and data for `steps` steps: next-frame metrics vs copy-last-frame."""
    from ssmkit.apps.runner import Runner
    from ssmkit.apps.video import VideoTrain, application

    cfg = VideoTrain(out_dir=out_dir, overwrite=True, eval_every=0, **({"steps": steps} if steps else {}))
    cfg.validate()
    run = Runner(application, cfg).train()
    mc = run.model.config
    return {"steps": run.step, "wall_s": run.wall_s, **run.metrics,
            "config": {**{k: getattr(cfg, k) for k in ("model", "frame_size", "seq_len", "n_digits", "digit_size",
                                                       "batch_size", "lr")},
                       **{k: getattr(mc, k) for k in ("d_model", "ssm_size", "n_layers")}}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scan2d-shapes", nargs="*", default=None, help="batch,dim,H,W,d_state per shape")
    p.add_argument("--convssm-shapes", nargs="*", default=None, help="batch,frames,channels,H,W,P per shape")
    p.add_argument("--full", action="store_true", help="the large sizes (GBs of memory on CPU)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    p.add_argument("--repeats", type=int, default=7, help="timed repetitions (median reported, min in the JSON)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per measurement (0: torch's default; 1 is steadier on a shared machine)")
    p.add_argument("--ref-max-cells", type=int, default=64, help="run the cell-by-cell 'ref' 2-D scan only up to H*W cells")
    p.add_argument("--train", action="store_true", help="also train the video model briefly and compare with copy-last")
    p.add_argument("--train-steps", type=int, default=0, help="steps of the --train run (0: the `ssmkit video` default)")
    p.add_argument("--train-out", default="runs/bench_video", help="run folder of the --train run")
    p.add_argument("--out", default="bench/results/scan2d.json", help="JSON output path")
    p.add_argument("--worker", nargs=3, metavar=("FAMILY", "IMPL", "SHAPE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        family, impl, shape = a.worker
        print(json.dumps(worker(family, impl, tuple(int(v) for v in shape.split(",")), a.device, a.repeats,
                                a.threads)))
        return

    scan2d = a.scan2d_shapes if a.scan2d_shapes is not None else (SCAN2D_FULL if a.full else SCAN2D_SMALL)
    convssm = a.convssm_shapes if a.convssm_shapes is not None else (CONVSSM_FULL if a.full else CONVSSM_SMALL)
    jobs = [("scan2d", i, s) for s in scan2d for i in SCAN2D_IMPLS] + [("convssm", i, s) for s in convssm
                                                                       for i in CONVSSM_IMPLS]
    rows, skipped = [], []
    for family, impl, shape in jobs:
        dims = [int(v) for v in shape.split(",")]
        if family == "scan2d" and impl == "ref" and dims[2] * dims[3] > a.ref_max_cells:
            skipped.append(f"{family} {impl} at {shape}: {dims[2] * dims[3]} cells > --ref-max-cells")
            continue
        if impl == "triton" and a.device != "cuda":
            continue  # Triton's CPU interpreter is for tests, not timings
        if impl == "cpu" and a.device != "cpu":
            continue
        cmd = [sys.executable, __file__, "--worker", family, impl, shape, "--device", a.device,
               "--repeats", str(a.repeats), "--threads", str(a.threads)]
        try:
            rows.append(run_worker(cmd))
        except RuntimeError as e:
            skipped.append(f"{family} {impl} at {shape}: failed: {e}")
            continue
        print(f"measured {family} {impl} at {shape}", file=sys.stderr)

    peers = {"scan2d": "cross_scan", "convssm": "step_loop"}
    for r in rows:
        same = {x["impl"]: x for x in rows if x["shape"] == r["shape"] and x["family"] == r["family"]}
        peer = same.get(peers[r["family"]])
        if peer is not None and peer is not r:
            r["speedup_vs_peer"] = peer["fwd_bwd_ms"] / r["fwd_bwd_ms"]
            r["memory_vs_peer"] = r["peak_mb"] / peer["peak_mb"] if peer["peak_mb"] else None

    fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
    titles = {"scan2d": "2-D selective scan, 4 directions, fwd+bwd over (batch, dim, H, W, d_state); peer: VMamba "
                        "cross scan (gather -> grouped 1-D selective_scan -> merge)",
              "convssm": "ConvS5 scan over time, fwd+bwd over (batch, frames, channels, H, W, P); peer: convssm_step loop"}
    for family in ("scan2d", "convssm"):
        fam = [r for r in rows if r["family"] == family]
        if not fam:
            continue
        print(f"\n{titles[family]} ({a.device}, {a.threads or 'default'} thread(s), median of {a.repeats})\n")
        print("| shape | impl | fwd ms | fwd+bwd ms | peak MB | elements/s | speed-up vs peer | memory vs peer |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for r in fam:
            print(f"| {tuple(r['shape'])} | {r['impl']} | {r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | {r['peak_mb']:.0f} | "
                  f"{r['elements_per_s']:.3g} | {fmt(r.get('speedup_vs_peer'), '.2f')} | "
                  f"{fmt(r.get('memory_vs_peer'), '.2f')} |")
    for s in skipped:
        print(f"- skipped {s}")
    result = {"device": a.device, "threads": a.threads, "rows": rows, "skipped": skipped}
    if a.train:
        t = train_benchmark(a.train_steps, a.train_out)
        result["train"] = t
        print(f"\nVideo model ({t['config']}), {t['steps']} steps in {t['wall_s']:.0f} s\n")
        print("| | next-frame MSE | SSIM |\n|---|---:|---:|")
        print(f"| ConvS5 | {t['mse']:.4f} | {t['ssim']:.3f} |")
        print(f"| copy last frame | {t['baseline_mse']:.4f} | {t['baseline_ssim']:.3f} |")
        print(f"\nMSE ratio model / copy-last: {t['mse_ratio']:.3f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
