"""Restoration benchmark: MaIR's mixer vs a MambaIR-style 4-way cross-scan mixer, and short CPU training.

1. Forward time and peak memory of one mixer (`ssmkit.vision.mair.VMM`) at equal width on H x W feature
   maps (the token grid of an H x W image: MaIR does not downsample): MaIR (four nested S-shaped
   sequences, Sequence Shuffle Attention) vs the peer design (VMamba/MambaIR SS2D: raster and
   column-major flattenings and their reversals, summed). Each measurement runs in its own process
   (CPU peak = high-water RSS above the inputs; CUDA peak = max_memory_allocated).
2. PSNR gain over the baseline (MATLAB bicubic x2 / the sigma-25 noisy input) reached by the default
   `ssmkit restore` model trained for a wall-clock budget on the embedded photographs.

    python bench/restore.py                                  # 256 and 512, 20 minutes of training each
    python bench/restore.py --sizes 256,512,1024 --train-minutes 5 --tasks sr
    python bench/restore.py --train-minutes 0                # mixers only

Prints Markdown tables and writes JSON (default bench/results/restore.json).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from _measure import run_worker

MIXERS = {"mair_nss_ssa": dict(scan="nss", ssa=True), "mambair_cross4": dict(scan="cross4", ssa=False)}


def measure_mixer(label: str, size: int, width: int, d_state: int, expand: float, device: str, repeats: int) -> dict:
    """One mixer at one size, in this process: forward ms (median over `repeats`) and peak MiB."""
    import torch

    from ssmkit.vision.mair import VMM

    torch.manual_seed(0)
    mixer = VMM(width, d_state=d_state, expand=expand, **MIXERS[label]).to(device).eval()
    x = torch.randn(1, size, size, width, device=device)
    with torch.no_grad():
        r = measure_forward(lambda t: mixer(t, 0, 8), x, device, repeats)
    params = sum(p.numel() for p in mixer.parameters())
    return dict(mixer=label, size=size, width=width, params=params, **r)


def measure_forward(fn, x, device: str, repeats: int) -> dict:
    """Forward-only timing and peak memory (inference of a whole image is what restorers do)."""
    import statistics

    import torch

    from _measure import peak_rss_bytes, reset_peak_rss, rss_bytes

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_bytes()
        reset_peak_rss()
    fn(x)
    sync()
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes()) - base
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        sync()
        times.append(time.perf_counter() - t0)
    return dict(fwd_ms=statistics.median(times) * 1e3, peak_mb=max(peak, 0) / 2**20, threads=torch.get_num_threads())


def train_for(task: str, minutes: float, seed: int = 0) -> dict:
    """Train the default `ssmkit restore` model for a wall-clock budget; PSNR of model and baseline."""
    import torch
    from torch.utils.data import DataLoader

    from ssmkit.apps.application import RunContext
    from ssmkit.apps.restore import RestoreTrain, application, border

    model_name = "mair_micro_sr_x2" if task == "sr" else "mair_micro_denoise"
    cfg = RestoreTrain(task=task, model=model_name, sigma=25.0, seed=seed, train_size=10**6)
    cfg.validate()
    torch.manual_seed(seed)
    spec = application.setup(cfg)
    train, evals, ctx = spec.train, spec.eval, RunContext(cfg, spec.meta)
    model = application.build_model(ctx)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=0.0)
    loader = iter(DataLoader(train, batch_size=cfg.batch_size, shuffle=False, collate_fn=application.collate))
    start, steps = time.perf_counter(), 0
    model.train()
    while time.perf_counter() - start < minutes * 60:
        loss = application.train_loss(model, next(loader), ctx)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
    wall = time.perf_counter() - start
    model.eval()
    outputs: dict[str, list] = {}
    with torch.no_grad():
        for i in range(len(evals)):
            for k, v in application.eval_step(model, application.collate([evals[i]]), ctx).items():
                outputs.setdefault(k, []).append(v)
    metrics = application.compute_metrics({k: torch.cat(v) for k, v in outputs.items()}, ctx)
    from ssmkit.vision.metrics import metric_name

    return dict(task=task, minutes=minutes, steps=steps, wall_s=wall,
                metric=metric_name("psnr", border(cfg), cfg.y_channel), params=sum(p.numel() for p in model.parameters()),
                **metrics)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="256,512", help="feature-map sizes (comma-separated)")
    p.add_argument("--width", type=int, default=60, help="mixer width C (60: the light MaIR models)")
    p.add_argument("--d-state", type=int, default=1, help="SSM state size (MaIR-T: 1; MaIR-S: 16)")
    p.add_argument("--expand", type=float, default=1.1, help="SSM expansion (MaIR-T: 1.1; MaIR-S: 1.4)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--train-minutes", type=float, default=20.0)
    p.add_argument("--tasks", default="sr,denoise")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "restore.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, *rest = args.child.split(":")
        if kind == "mixer":
            label, size = rest
            r = measure_mixer(label, int(size), args.width, args.d_state, args.expand, args.device, args.repeats)
        else:
            r = train_for(rest[0], args.train_minutes)
        print(json.dumps(r), flush=True)
        return

    results, training = [], []
    base = [sys.executable, __file__, "--width", str(args.width), "--d-state", str(args.d_state), "--expand",
            str(args.expand), "--repeats", str(args.repeats), "--device", args.device,
            "--train-minutes", str(args.train_minutes)]
    for size in (int(s) for s in args.sizes.split(",")):
        for label in MIXERS:
            try:
                results.append(dict(status="ok", **run_worker(base + ["--child", f"mixer:{label}:{size}"])))
            except RuntimeError as e:
                results.append(dict(status=f"skipped: {e}", mixer=label, size=size))
    if args.train_minutes > 0:
        for task in args.tasks.split(","):
            training.append(run_worker(base + ["--child", f"train:{task}"]))

    ok = {(r["mixer"], r["size"]): r for r in results if r["status"] == "ok"}
    lines = ["| size | mixer | params | forward ms | peak MiB | time vs cross4 |", "|---|---|---|---|---|---|"]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['size']}² | {r['mixer']} | | | | {r['status']} |")
            continue
        peer = ok.get(("mambair_cross4", r["size"]))
        ratio = f"{r['fwd_ms'] / peer['fwd_ms']:.2f}x" if peer else ""
        lines.append(f"| {r['size']}² | {r['mixer']} | {r['params']:,} | {r['fwd_ms']:.0f} | "
                     f"{r['peak_mb']:.0f} | {ratio} |")
    print("\n".join(lines))
    if training:
        print("\n| task | metric | minutes | steps | model | baseline | gain dB |\n|---|---|---|---|---|---|---|")
        for t in training:
            print(f"| {t['task']} | {t['metric']} | {t['minutes']:g} | {t['steps']} | {t['psnr']:.2f} | "
                  f"{t['baseline_psnr']:.2f} | {t['psnr_gain']:+.2f} |")
    meta = dict(platform=platform.platform(), python=platform.python_version(), device=args.device,
                width=args.width, d_state=args.d_state, expand=args.expand, sizes=args.sizes)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "mixers": results, "training": training}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
