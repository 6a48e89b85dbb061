"""Vision classifier benchmark: images/s and peak memory of Vim-tiny, ViG-tiny and timm's DeiT-tiny.

For each model and image size, forward (inference, no grad) and forward+backward (training step
without the optimizer) are timed at the published tiny sizes (patch 16, D 192). Each measurement runs in
a fresh subprocess so the CPU peak memory (high-water RSS above the model and inputs) belongs to it
alone; on CUDA the peak is torch.cuda.max_memory_allocated. A model that cannot be built (not
importable yet, or out of memory) is reported as skipped with the reason.

    python bench/vision.py                                 # CPU: 224 and 512 (batch 1), 1024 and 1248 forward only
    python bench/vision.py --device cuda --sizes 224,512,1024,1248 --batch 8
    python bench/vision.py --sizes 224 --repeats 2 --models vim_tiny,deit_tiny

Prints a Markdown table with speed and memory ratios vs DeiT beside the papers' claims, and the share of
Vim-tiny's forward time spent in the selective scans at one size (--scan-share, from the PyTorch
profiler: self time of the ssmkit scan ops over the whole forward), and writes JSON (default
bench/results/vision.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from _measure import peak_rss_bytes, reset_peak_rss, rss_bytes

MODELS = {  # label -> (source, name)
    "vim_tiny": ("ssmkit", "vim_tiny"),
    "vig_tiny": ("ssmkit", "vig_tiny"),
    "deit_tiny": ("timm", "deit_tiny_patch16_224"),
}
CLAIMS = {
    "vim_tiny": "Vim: 2.8x faster than DeiT, 86.8% less GPU memory at 1248x1248 (batch inference)",
    "vig_tiny": "ViG-T: 4.8x faster than DeiT-T at 1024x1024, saving 90% GPU memory",
}


def _build(label: str, size: int):
    source, name = MODELS[label]
    kwargs = dict(img_size=size, num_classes=1000)
    if source == "ssmkit":
        import ssmkit

        if name not in ssmkit.list_models():
            raise ImportError(f"{name} is not in the ssmkit registry yet")
        return ssmkit.create_model(name, **kwargs)
    import timm

    return timm.create_model(name, pretrained=False, **kwargs)


def measure(label: str, size: int, batch: int, mode: str, device: str, repeats: int, warmup: int) -> dict:
    """One measurement in this process: seconds per batch (median), images/s, peak memory in MiB."""
    import torch

    torch.manual_seed(0)
    model = _build(label, size).to(device)
    model.train(mode == "fwd+bwd")
    x = torch.randn(batch, 3, size, size, device=device)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                model(x)
        else:
            model(x).float().sum().backward()
            model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    # the peak is taken over warm-up and timed steps above what model, gradients' absence and input hold:
    # after a warm-up the allocator keeps freed blocks, so a later baseline would hide the activations
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
        reset_peak_rss()
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() - base if device == "cuda" else max(0, peak_rss_bytes() - base))
    times.sort()
    median = times[len(times) // 2]
    return {"model": label, "size": size, "batch": batch, "mode": mode, "device": device, "status": "ok",
            "s_per_batch": median, "images_per_s": batch / median, "peak_mib": peak / 2**20,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "repeats": repeats}


def scan_share(size: int, repeats: int) -> dict:
    """Fraction of Vim-tiny's forward (batch 1, no grad) spent in the selective-scan ops, by the profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = _build("vim_tiny", size).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                model(x)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    scan = {e.key: e.self_cpu_time_total for e in events if "scan" in e.key and e.key.startswith("ssmkit::")}
    return {"size": size, "share": sum(scan.values()) / total, "ops": sorted(scan)}


def _child(args) -> None:
    if args.child_share:
        print("RESULT " + json.dumps(scan_share(args.child_share, args.repeats)), flush=True)
        return
    try:
        result = measure(args.child_model, args.child_size, args.batch, args.child_mode, args.device, args.repeats,
                         args.warmup)
    except Exception as e:  # noqa: BLE001 - report every failure as a skipped cell
        result = {"model": args.child_model, "size": args.child_size, "mode": args.child_mode, "batch": args.batch,
                  "device": args.device, "status": f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    print("RESULT " + json.dumps(result), flush=True)


def _run_one(args, label: str, size: int, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--child-model", label, "--child-size", str(size), "--child-mode", mode,
           "--batch", str(args.batch), "--device", args.device, "--repeats", str(_repeats(args, size)),
           "--warmup", str(args.warmup)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"model": label, "size": size, "mode": mode, "batch": args.batch, "device": args.device,
                "status": f"skipped: over the {args.timeout:.0f} s limit (--timeout)"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]
    return {"model": label, "size": size, "mode": mode, "batch": args.batch, "device": args.device,
            "status": f"skipped: exit {proc.returncode}: {tail}"}


def _repeats(args, size: int) -> int:
    return max(1, args.repeats // 2) if size >= 1024 else args.repeats


def table(results: list[dict]) -> str:
    ok = {(r["model"], r["size"], r["mode"]): r for r in results if r["status"] == "ok"}
    lines = ["| model | size | mode | batch | images/s | peak MiB | speed / DeiT | memory / DeiT | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['size']} | {r['mode']} | {r['batch']} | | | | | {r['status']} |")
            continue
        deit = ok.get(("deit_tiny", r["size"], r["mode"]))
        speed = mem = ""
        if deit and r["model"] != "deit_tiny":
            speed = f"{r['images_per_s'] / deit['images_per_s']:.2f}x"
            if deit["peak_mib"] > 0:
                mem = f"{r['peak_mib'] / deit['peak_mib']:.2f}x"
        lines.append(f"| {r['model']} | {r['size']} | {r['mode']} | {r['batch']} | {r['images_per_s']:.2f} | "
                     f"{r['peak_mib']:.0f} | {speed} | {mem} | ok |")
    lines.append("")
    lines.append("Ratios are this model / DeiT-tiny at the same size and mode (speed > 1: faster; memory < 1: "
                 "less). Papers' claims (GPU, their CUDA kernels): " + "; ".join(CLAIMS.values())
                 + " (memory ratios 0.13 and 0.10). On CPU the scans run on ssmkit's default CPU backend "
                 "(the compiled kernels where a C compiler is found).")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--sizes", default="224,512,1024,1248", help="image sizes (square)")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="fwd and/or fwd+bwd")
    p.add_argument("--skip", default="1024:fwd+bwd,1248:fwd+bwd",
                   help="size:mode cells to leave out (comma-separated; default keeps a CPU run to minutes)")
    p.add_argument("--scan-share", type=int, default=512,
                   help="image size at which to profile the scans' share of Vim-tiny's forward (0: skip)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (halved at 1024 and above)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--timeout", type=float, default=300, help="seconds per measurement before it is skipped")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "vision.json"))
    p.add_argument("--child-model", help=argparse.SUPPRESS)
    p.add_argument("--child-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-mode", help=argparse.SUPPRESS)
    p.add_argument("--child-share", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_model or args.child_share:
        _child(args)
        return
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        p.error(f"unknown model {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        for mode in (m.strip() for m in args.modes.split(",")):
            if f"{size}:{mode}" in skip:
                continue
            for label in models:
                r = _run_one(args, label, size, mode)
                print(f"{label} {size} {mode}: " + (f"{r['images_per_s']:.2f} images/s, {r['peak_mib']:.0f} MiB"
                                                    if r["status"] == "ok" else r["status"]), flush=True)
                results.append(r)
    share = None
    if args.scan_share and args.device == "cpu":
        proc = subprocess.run([sys.executable, __file__, "--child-share", str(args.scan_share), "--repeats",
                               str(args.repeats)], capture_output=True, text=True, timeout=args.timeout)
        share = next((json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
    print()
    print(table(results))
    if share:
        print(f"\nVim-tiny forward at {share['size']}x{share['size']}: {100 * share['share']:.0f}% of the time in "
              f"the selective scans ({', '.join(share['ops'])})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import torch

    meta = {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "device": args.device, "cuda_name": torch.cuda.get_device_name() if args.device == "cuda" else None}
    out.write_text(json.dumps({"meta": meta, "results": results, "scan_share": share, "claims": CLAIMS}, indent=1)
                   + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
