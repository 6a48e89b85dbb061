"""Timing and peak-memory helpers shared by the benchmark scripts (each measurement in its own process).

CPU peak memory is the process's high-water RSS (VmHWM, reset first) above the RSS before the measured
call; CUDA peak memory is torch.cuda.max_memory_allocated above the memory allocated before it.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import time


def rss_bytes() -> int:
    """Resident memory of this process now. torch's custom ops import torch._dynamo at their first call
    (about 100 MB of module code); it is loaded here, before any baseline, so it never counts as the
    memory of a measured call."""
    import torch._dynamo  # noqa: F401

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """High-water resident memory of this process since start or the last `reset_peak_rss`."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> None:
    try:  # writing 5 to clear_refs resets VmHWM (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def measure_fwd_bwd(fn, args, device: str, repeats: int, warmup: int = 2) -> dict:
    """Peak memory of one forward+backward of `fn(*args).sum()`, then median and best times (ms) of the
    forward (no grad) and of forward+backward over `repeats` runs after `warmup` runs (Triton
    compilation, the allocator settling on its first large frees)."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def fwd():
        with torch.no_grad():
            fn(*args)

    def fwd_bwd():
        fn(*args).sum().backward()
        for a in args:
            a.grad = None

    if device == "cuda":
        sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        sync()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = rss_bytes()
        reset_peak_rss()
        fwd_bwd()
        peak = max(peak_rss_bytes() - base, 0)

    def timed(f):
        for _ in range(warmup):
            f()
        sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            f()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3, min(times) * 1e3

    (fwd_ms, fwd_min), (total_ms, total_min) = timed(fwd), timed(fwd_bwd)
    return dict(fwd_ms=fwd_ms, fwd_bwd_ms=total_ms, fwd_min_ms=fwd_min, fwd_bwd_min_ms=total_min,
                peak_mb=peak / 2**20, threads=torch.get_num_threads())


def run_worker(cmd: list[str]) -> dict:
    """Run one measurement in a fresh process; `cmd` prints its result row as JSON on its last line.
    Raises RuntimeError with the worker's last error line when it fails."""
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError((out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])
