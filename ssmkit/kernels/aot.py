"""Compile the Triton kernels for a CUDA architecture on a machine without a GPU.

`compile_only(arch)` swaps Triton's active driver for one that reports the requested target and turns
every kernel launch into a compile: the host code runs as usual (on CPU tensors), each launch is
specialised exactly as on the GPU (dtypes, 16-byte alignment, constexprs, num_warps, maxnreg) and
lowered to a cubin with Triton's bundled ptxas, and nothing is executed. Used by the suite to catch
kernels that run in the interpreter but do not compile, and from the command line to report
registers, spills and shared memory of every default launch plan:

    python -m ssmkit.kernels.aot --arch 90 --arch 80 [--json out.json]
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

__all__ = ["compile_only", "Compiled", "compile_default_plans"]


@dataclass
class Compiled:
    """One compiled launch: kernel name, its specialisation, the resources ptxas reports and static
    counts of the PTX instructions that bound the scans (warp shuffles, exp2 on the MUFU, atomics);
    loops that are not unrolled count once."""
    name: str
    constexprs: dict
    num_warps: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    local_bytes: int
    shuffles: int
    exp2: int
    atomics: int


class _TargetOnlyDriver:
    """The few driver calls the launch path makes before compiling; nothing can be launched."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")


def _resources(ptx: str, capability: int, arch: str) -> dict:
    """Register, spill, local and shared-memory figures of one PTX module, from `ptxas -v`."""
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(capability).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    log = out.stderr + out.stdout

    def grab(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return dict(registers=grab(r"Used (\d+) registers"), spill_stores=grab(r"(\d+) bytes spill stores"),
                spill_loads=grab(r"(\d+) bytes spill loads"), shared_bytes=grab(r"(\d+) bytes smem"),
                local_bytes=grab(r"(\d+) bytes stack frame"), shuffles=len(re.findall(r"\bshfl\.sync", ptx)),
                exp2=len(re.findall(r"\bex2\.approx", ptx)), atomics=len(re.findall(r"\b(?:atom|red)\.", ptx)))


@contextlib.contextmanager
def compile_only(capability: int = 90):
    """Within the block, kernel launches compile for sm_<capability> and record a `Compiled` each.

    Yields the list the records are appended to. Outputs of the host code are meaningless (nothing
    runs); the point is that every launch the host code makes is compiled with its real arguments.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_only needs the compiler: unset TRITON_INTERPRET before importing ssmkit.kernels")
    target = GPUTarget("cuda", capability, 32)
    arch = f"sm_{capability}a" if capability == 90 else f"sm_{capability}"
    records: list[Compiled] = []
    original = JITFunction._do_compile

    def compile_and_skip(self, key, signature, device, constexprs, options, attrs, warmup):
        src = self.ASTSource(self, signature, constexprs, attrs)
        kernel = triton.compile(src, target=target, options=options.__dict__)
        named = {self.arg_names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
        records.append(Compiled(name=self.fn.__name__, constexprs=named, num_warps=options.num_warps,
                                **_resources(kernel.asm["ptx"], capability, arch)))
        touched.add(self)
        return None  # the launch path returns without running anything

    touched: set[JITFunction] = set()
    previous = driver._active  # None until a real driver was needed; the default raises without a GPU
    driver.set_active(_TargetOnlyDriver(target))
    JITFunction._do_compile = compile_and_skip
    try:
        yield records
    finally:
        JITFunction._do_compile = original
        driver._active = previous
        for fn in touched:  # their binders were built for the pretend target
            fn.device_caches.clear()


def _scan_case(batch, dim, L, N, dtype, groups=1, invariant=False, reverse=False, seq=False, h0=False, z=True):
    """Forward and backward of the 1-D scan on CPU tensors of the given shape (compiled, not run)."""
    import torch

    from ssmkit.kernels.selective_scan import selective_scan_triton
    g = torch.Generator().manual_seed(0)

    def r(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(dt).requires_grad_()

    if invariant:
        B, C = r(dim, N, dt=torch.float32), r(dim, N, dt=torch.float32)
        B, C = (X[None, :, :, None].expand(batch, dim, N, L) for X in (B, C))
    else:
        B, C = r(batch, groups, N, L), r(batch, groups, N, L)
    seq_idx = (torch.arange(L) * 3 // L).expand(batch, L).to(torch.int32).contiguous() if seq else None
    y, last = selective_scan_triton(
        r(batch, dim, L), r(batch, dim, L), r(dim, N, dt=torch.float32), B, C, r(dim, dt=torch.float32),
        r(batch, dim, L) if z else None, r(dim, dt=torch.float32), True,
        r(batch, dim, N, dt=torch.float32) if h0 else None, reverse, seq_idx)
    (y.float().sum() + last.sum()).backward()


def _step_case(batch, dim, N, dtype):
    import torch

    from ssmkit.kernels.selective_scan import selective_state_update_triton
    f = lambda *s, dt=dtype: torch.randn(*s).to(dt)  # noqa: E731
    selective_state_update_triton(f(batch, dim, N, dt=torch.float32), f(batch, dim), f(batch, dim),
                                  -torch.rand(dim, N), f(batch, N), f(batch, N), f(dim, dt=torch.float32),
                                  f(batch, dim), f(dim, dt=torch.float32), True)


def _scan2d_case(batch, dim, H, W, N, right_to_left, bottom_up):
    import torch

    from ssmkit.kernels.scan2d import scan2d_triton
    r = lambda *s: torch.randn(*s).requires_grad_()  # noqa: E731
    y = scan2d_triton(r(batch, dim, H, W), r(batch, dim, H, W), r(dim, N), r(batch, 1, N, H, W),
                      r(batch, 1, N, H, W), right_to_left, bottom_up)
    y.sum().backward()


def _cases():
    """(label, thunk) for every default launch plan the kernels have: the benchmark shapes of the 1-D
    scan (lengths cut to keep the host side cheap: the plan does not depend on L), its variants, the
    decode step and the 2-D scan."""
    import torch

    bf16, f32 = torch.bfloat16, torch.float32
    yield "scan bf16 (8,1536,L,16) grouped B/C, z, D", lambda: _scan_case(8, 1536, 512, 16, bf16)
    yield "scan fp16 (8,1536,L,16)", lambda: _scan_case(8, 1536, 512, 16, torch.float16)
    yield "scan fp32 (8,1536,L,16) reverse, seq_idx, h0", lambda: _scan_case(8, 1536, 512, 16, f32, reverse=True,
                                                                             seq=True, h0=True)
    yield "scan fp32 time-invariant B/C, no z", lambda: _scan_case(2, 256, 256, 16, f32, invariant=True, z=False)
    yield "scan bf16 (64,192,L,1)", lambda: _scan_case(64, 192, 512, 1, bf16)
    yield "scan fp32 groups of 24 channels (assoc)", lambda: _scan_case(2, 48, 256, 16, f32, groups=2)

    def deterministic_case():
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            _scan_case(8, 1536, 512, 16, bf16)
        finally:
            torch.use_deterministic_algorithms(previous)

    yield "scan bf16 deterministic", deterministic_case
    yield "step batch 1", lambda: _step_case(1, 1536, 16, bf16)
    yield "step batch 64", lambda: _step_case(64, 1536, 16, bf16)
    yield "scan2d fp32 (8,192,56,56,16) tl", lambda: _scan2d_case(8, 192, 56, 56, 16, False, False)
    yield "scan2d fp32 (8,192,56,56,16) br", lambda: _scan2d_case(8, 192, 56, 56, 16, True, True)


def compile_default_plans(capability: int = 90) -> list[tuple[str, Compiled]]:
    """Compile every launch of every case for sm_<capability>; returns (case label, record) pairs."""
    out = []
    for label, run in _cases():
        with compile_only(capability) as records:
            run()
        if not records:
            raise RuntimeError(f"{label}: no kernel was launched")
        out += [(label, rec) for rec in records]
    return out


def main(argv=None) -> None:
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Compile ssmkit's Triton kernels for a CUDA architecture without a "
                                             "GPU and print registers, spills and shared memory per launch.")
    ap.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (H100), 80 (A100); "
                                                              "repeatable (default 90)")
    ap.add_argument("--json", help="also write the table as JSON to this path")
    args = ap.parse_args(argv)
    rows = []
    print("| arch | case | kernel | warps | registers | spill bytes (st/ld) | shared bytes | shfl | ex2 | atomics |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for cap in args.arch or [90]:
        for label, rec in compile_default_plans(cap):
            rows.append(dict(arch=cap, case=label, **rec.__dict__))
            print(f"| sm_{cap} | {label} | {rec.name} | {rec.num_warps} | {rec.registers} | "
                  f"{rec.spill_stores}/{rec.spill_loads} | {rec.shared_bytes} | {rec.shuffles} | {rec.exp2} | "
                  f"{rec.atomics} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)


if __name__ == "__main__":
    main()
