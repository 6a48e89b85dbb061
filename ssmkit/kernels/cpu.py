"""Compiled CPU kernels: the 1-D selective scan, its decode step and one direction of the 2-D selective scan
(the "cpu" backend of ssmkit.core.scan and ssmkit.core.scan2d).

The C source (csrc/scan.c, csrc/scan_impl.h) is compiled at first use with the system C compiler
(`$CC`, default `cc`; -O3 -march=native -ffast-math -fopenmp) into a shared library cached per source,
compiler, flags and CPU under `$SSMKIT_CACHE_DIR` (default `~/.cache/ssmkit`), and called through
ctypes. Where it cannot be built, `available()` warns once and is False, and core uses "chunked".

Design (see the header of csrc/scan.c): work items of (batch row, block of cb channels), the states of a
block held in L1 and the loop over the N states vectorised; the forward saves the states entering every
K-block, (batch, dim, ceil(L/K), N), and the backward recomputes each block from them and runs the
adjoint backwards. dB/dC rows are summed per item and reduced over the items of a group in a fixed
order, as are the per-batch partials of dA, dD, delta_bias and time-invariant B/C: the results do not
depend on the thread count. The ops are `torch.library` custom ops with fake implementations and
autograd, so torch.compile keeps them as single nodes.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

from ssmkit.kernels import as_time_invariant
from ssmkit.util import compute_dtype

__all__ = ["available", "library", "selective_scan_cpu", "selective_state_update_cpu", "scan2d_cpu"]

_SRC = Path(__file__).with_name("csrc")
_SOURCES = ("scan.c", "scan_impl.h", "scan2d_impl.h")
_CFLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-std=c11")
_STATES_PER_ITEM = 256  # cb * N: the states one backward work item keeps in L1
_FWD_CHANNELS = 16      # channels per forward item: the forward vectorises over them
_K_STEPS = 64           # positions between the states saved for backward


# ----------------------------------------------------------------------------------------------------
# building and loading


def _cache_dir() -> Path:
    root = os.environ.get("SSMKIT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ssmkit"
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    """What -march=native depends on: the machine and the CPU's model and feature flags."""
    info = ""
    try:
        with open("/proc/cpuinfo") as f:
            info = "".join(line for line in f.read().split("\n\n")[0].splitlines(True)
                           if line.startswith(("model name", "flags", "Features", "CPU part")))
    except OSError:
        pass
    return platform.machine() + info


def _build(cc: str, out: Path) -> None:
    """Compile the kernels into `out` (atomically: a temporary file renamed into place)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        obj, lib = Path(tmp) / "scan.o", Path(tmp) / out.name
        # -ffast-math only when compiling: linking a shared library with it would set flush-to-zero
        # for the whole process (crtfastmath.o)
        steps = [[cc, *_CFLAGS, "-c", str(_SRC / "scan.c"), "-o", str(obj)],
                 [cc, "-shared", "-fopenmp", str(obj), "-o", str(lib), "-lm"]]
        for cmd in steps:
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[:2])} ... failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        os.replace(lib, out)


@functools.cache
def library() -> Optional[ctypes.CDLL]:
    """The compiled kernels, built on first use and cached across processes; None where they cannot be
    built or loaded (one warning says why)."""
    cc = os.environ.get("CC") or "cc"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
        key = hashlib.sha256("\0".join([*(p.read_text() for p in map(_SRC.joinpath, _SOURCES)), cc, version,
                                        *_CFLAGS, _cpu_signature()]).encode()).hexdigest()[:16]
        path = _cache_dir() / f"scan-{key}.so"
        if not path.exists():
            t0 = time.perf_counter()
            _build(cc, path)
            print(f"ssmkit: compiled the CPU scan kernels in {time.perf_counter() - t0:.1f} s ({path})",
                  file=sys.stderr)
        return ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        warnings.warn(f"ssmkit: the compiled CPU scan kernels are unavailable ({e}); "
                      "using the 'chunked' PyTorch scan", RuntimeWarning, stacklevel=2)
        return None


def available() -> bool:
    """True when the compiled CPU kernels can run (building them on the first call)."""
    return library() is not None


# ----------------------------------------------------------------------------------------------------
# argument blocks (mirror the C structs)

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_S3 = _I64 * 3
_S2 = _I64 * 2


class _ScanArgs(ctypes.Structure):
    _fields_ = ([(n, _I64) for n in ("batch", "dim", "L", "N", "cb", "K", "dpg_B", "dpg_C", "B_var", "C_var",
                                     "softplus", "reverse", "threads")]
                + [(n, _S3) for n in ("su", "sd", "sz", "sy", "sdy", "sdu", "sdd", "sdz", "sB", "sC")]
                + [(n, _PTR) for n in ("u", "delta", "A", "B", "C", "D", "z", "bias", "h0", "dy", "dlast", "seq",
                                       "y", "last", "ckpt", "du", "ddelta", "dz", "dA", "dD", "dbias", "dB", "dC",
                                       "dh0")])


_S4 = _I64 * 4


class _Scan2dArgs(ctypes.Structure):
    _fields_ = ([(n, _I64) for n in ("batch", "dim", "H", "W", "N", "cb", "K", "dpg_B", "dpg_C", "rtl", "bu",
                                     "threads")]
                + [(n, _S4) for n in ("su", "sdt", "sy", "sdy", "sdu", "sddt", "sB", "sC")]
                + [(n, _PTR) for n in ("u", "dt", "A", "B", "C", "dy", "y", "ckpt", "du", "ddt", "dA", "dB", "dC")])


class _StepArgs(ctypes.Structure):
    _fields_ = ([(n, _I64) for n in ("batch", "dim", "N", "dpg_B", "dpg_C", "softplus", "threads")]
                + [(n, _S2) for n in ("sh", "sx", "sdt", "sz", "sB", "sC")]
                + [(n, _PTR) for n in ("state", "x", "dt", "A", "B", "C", "D", "z", "bias", "y")])


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None or t.numel() == 0 else t.data_ptr()


def _strides(t: Optional[torch.Tensor], n: int):
    return tuple(t.stride()[:n]) if t is not None else (0,) * n


def _sfx(dtype: torch.dtype) -> str:
    return "f64" if dtype == torch.float64 else "f32"


def _call(name: str, args: ctypes.Structure, dtype: torch.dtype) -> None:
    getattr(library(), f"{name}_{_sfx(dtype)}")(ctypes.byref(args))


def _reduce(parts: torch.Tensor, out: torch.Tensor, rows: int, nparts: int) -> torch.Tensor:
    """out[r] = sum over j of parts[r, j], in order j = 0, 1, ... (parts and out contiguous)."""
    fn = getattr(library(), f"ssm_reduce_{_sfx(parts.dtype)}")
    fn(_PTR(parts.data_ptr()), _PTR(out.data_ptr()), _I64(rows), _I64(nparts), _I64(out.numel() // rows),
       _I64(torch.get_num_threads()))
    return out


# ----------------------------------------------------------------------------------------------------
# layouts


def _rows(X: torch.Tensor) -> torch.Tensor:
    """B or C with contiguous states: (batch, G, N, L) with unit N stride, or (dim, N) contiguous."""
    if X.dim() == 2:
        return X.contiguous()
    return X if X.stride(2) == 1 else X.transpose(2, 3).contiguous().transpose(2, 3)


def _bc_strides(X: torch.Tensor):
    return (X.stride(0), X.stride(1), X.stride(3)) if X.dim() == 4 else (0, X.stride(0), 0)


def _block(dim: int, groups, cap: int) -> int:
    """Channels per work item: the largest divisor of the channel count of every group in `groups` (the
    group counts of the B/C tensors that vary over positions) up to `cap`; a function of the shapes only,
    so results do not depend on the number of threads."""
    base = math.gcd(dim, *(dim // G for G in groups))
    return max(c for c in range(1, min(base, cap) + 1) if base % c == 0)


def _scan_args(u, delta, A, B, C, D, z, bias, h0, seq, softplus, reverse, forward: bool) -> _ScanArgs:
    batch, dim, L = u.shape
    N = A.shape[1]
    cap = _FWD_CHANNELS if forward else max(1, _STATES_PER_ITEM // N)
    a = _ScanArgs(batch=batch, dim=dim, L=L, N=N, cb=_block(dim, [X.shape[1] for X in (B, C) if X.dim() == 4], cap),
                  K=_K_STEPS,
                  dpg_B=dim // B.shape[1] if B.dim() == 4 else 1, dpg_C=dim // C.shape[1] if C.dim() == 4 else 1,
                  B_var=B.dim() == 4, C_var=C.dim() == 4, softplus=bool(softplus), reverse=bool(reverse),
                  threads=torch.get_num_threads(), su=_strides(u, 3), sd=_strides(delta, 3), sz=_strides(z, 3),
                  sB=_bc_strides(B), sC=_bc_strides(C))
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("bias", bias),
                    ("h0", h0), ("seq", seq)):
        setattr(a, name, _ptr(t))
    return a


# ----------------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op("ssmkit::selective_scan_cpu_fwd", mutates_args=())
def _fwd_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
            D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
            initial_state: Optional[torch.Tensor], seq_idx: Optional[torch.Tensor], delta_softplus: bool,
            reverse: bool, save_states: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, dim, L = u.shape
    N = A.shape[1]
    a = _scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, delta_softplus, reverse, True)
    y = u.new_empty(batch, L, dim).transpose(1, 2)  # channel-last: what the forward writes fastest, and what
    last = u.new_empty(batch, dim, N)                # Mamba's out_proj reads
    states = u.new_empty(batch, dim, -(-L // a.K) if save_states else 0, N)
    a.sy = _strides(y, 3)
    a.y, a.last, a.ckpt = y.data_ptr(), last.data_ptr(), _ptr(states)
    _call("ssm_fwd", a, u.dtype)
    return y, last, states


@_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, delta_softplus, reverse, save_states):
    batch, dim, L = u.shape
    N = A.shape[1]
    return (u.new_empty(batch, L, dim).transpose(1, 2), u.new_empty(batch, dim, N),
            u.new_empty(batch, dim, -(-L // _K_STEPS) if save_states else 0, N))


@torch.library.custom_op("ssmkit::selective_scan_cpu_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, dlast: Optional[torch.Tensor], u: torch.Tensor, delta: torch.Tensor,
            A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
            delta_bias: Optional[torch.Tensor], seq_idx: Optional[torch.Tensor], states: torch.Tensor,
            delta_softplus: bool, reverse: bool, need_dh0: bool) -> list[torch.Tensor]:
    batch, dim, L = u.shape
    N = A.shape[1]
    a = _scan_args(u, delta, A, B, C, D, z, delta_bias, None, seq_idx, delta_softplus, reverse, False)
    nblk = dim // a.cb
    e = lambda: u.new_empty(0)  # an absent gradient (a custom op cannot return None, nor one tensor twice)  # noqa: E731
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else e()
    dA_b = u.new_empty(batch, dim, N)
    dD_b = u.new_empty(batch, dim) if D is not None else e()
    dbias_b = u.new_empty(batch, dim) if delta_bias is not None else e()
    dB_p, dC_p = (u.new_empty(batch, nblk, L, N) if X.dim() == 4 else u.new_empty(batch, dim, N) for X in (B, C))
    dh0 = u.new_empty(batch, dim, N) if need_dh0 else e()
    a.sdy, a.sdu, a.sdd = _strides(dy, 3), _strides(du, 3), _strides(ddelta, 3)
    a.sdz = _strides(dz if z is not None else None, 3)
    for name, t in (("dy", dy), ("dlast", dlast), ("ckpt", states), ("du", du), ("ddelta", ddelta), ("dz", dz),
                    ("dA", dA_b), ("dD", dD_b), ("dbias", dbias_b), ("dB", dB_p), ("dC", dC_p), ("dh0", dh0)):
        setattr(a, name, _ptr(t))
    _call("ssm_bwd", a, u.dtype)

    def per_batch_sum(parts, shape):  # over the batch rows, in order
        return parts if parts.numel() == 0 else _reduce(parts, u.new_empty(shape), 1, batch)

    def bc_grad(parts, X):
        if X.dim() == 2:
            return per_batch_sum(parts, X.shape)
        G = X.shape[1]
        if nblk == G:
            return parts.transpose(2, 3)
        return _reduce(parts, u.new_empty(batch, G, L, N), batch * G, nblk // G).transpose(2, 3)

    return [du, ddelta, per_batch_sum(dA_b, (dim, N)), bc_grad(dB_p, B), bc_grad(dC_p, C),
            per_batch_sum(dD_b, (dim,)), dz, per_batch_sum(dbias_b, (dim,)), dh0]


@_bwd_op.register_fake
def _(dy, dlast, u, delta, A, B, C, D, z, delta_bias, seq_idx, states, delta_softplus, reverse, need_dh0):
    batch, dim, L = u.shape
    N = A.shape[1]
    like = lambda t: torch.empty_like(t) if t is not None else u.new_empty(0)  # noqa: E731
    return [torch.empty_like(u), torch.empty_like(delta), torch.empty_like(A), B.new_empty(B.shape),
            C.new_empty(C.shape), like(D), like(z), like(delta_bias),
            u.new_empty(batch, dim, N) if need_dh0 else u.new_empty(0)]


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, delta_softplus, reverse, save_states = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, seq_idx, output[2])
    ctx.flags = (delta_softplus, reverse, initial_state is not None)


def _backward(ctx, dy, dlast, dstates):
    u, delta, A, B, C, D, z, delta_bias, seq_idx, states = ctx.saved_tensors
    delta_softplus, reverse, has_h0 = ctx.flags
    if states.shape[2] == 0:
        raise RuntimeError("selective_scan (cpu): backward through a forward run without saved states "
                           "(it ran with gradients disabled)")
    dy = torch.zeros_like(u) if dy is None else dy.to(u.dtype)
    dlast = None if dlast is None else dlast.to(u.dtype).contiguous()
    du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = torch.ops.ssmkit.selective_scan_cpu_bwd(
        dy, dlast, u, delta, A, B, C, D, z, delta_bias, seq_idx, states, delta_softplus, reverse, has_h0)
    return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
            dbias if delta_bias is not None else None, dh0 if has_h0 else None, None, None, None, None)


torch.library.register_autograd("ssmkit::selective_scan_cpu_fwd", _backward, setup_context=_setup_context)


@torch.library.custom_op("ssmkit::selective_state_update_cpu", mutates_args=("state",))
def _step_op(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor],
             dt_softplus: bool) -> torch.Tensor:
    batch, dim, N = state.shape
    y = x.new_empty(batch, dim)
    a = _StepArgs(batch=batch, dim=dim, N=N, dpg_B=dim // B.shape[1], dpg_C=dim // C.shape[1],
                  softplus=bool(dt_softplus), threads=torch.get_num_threads() if batch * dim * N >= 1 << 16 else 1,
                  sh=_strides(state, 2), sx=_strides(x, 2), sdt=_strides(dt, 2), sz=_strides(z, 2),
                  sB=_strides(B, 2), sC=_strides(C, 2))
    for name, t in (("state", state), ("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("bias", dt_bias), ("y", y)):
        setattr(a, name, _ptr(t))
    _call("ssm_step", a, state.dtype)
    return y


@_step_op.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    return x.new_empty(state.shape[:2])


def _scan2d_args(dt, u, A, B, C, right_to_left, bottom_up) -> _Scan2dArgs:
    batch, dim, H, W = u.shape
    N = A.shape[1]
    a = _Scan2dArgs(batch=batch, dim=dim, H=H, W=W, N=N, cb=_block(dim, [B.shape[1], C.shape[1]], max(1, _STATES_PER_ITEM // N)),
                    K=max(1, math.isqrt(H - 1) + 1),
                    dpg_B=dim // B.shape[1], dpg_C=dim // C.shape[1], rtl=bool(right_to_left), bu=bool(bottom_up),
                    threads=torch.get_num_threads(), su=_strides(u, 4), sdt=_strides(dt, 4),
                    sB=(B.stride(0), B.stride(1), B.stride(3), B.stride(4)),
                    sC=(C.stride(0), C.stride(1), C.stride(3), C.stride(4)))
    for name, t in (("u", u), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        setattr(a, name, _ptr(t))
    return a


@torch.library.custom_op("ssmkit::scan2d_cpu_fwd", mutates_args=())
def _fwd2d_op(dt: torch.Tensor, u: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              right_to_left: bool, bottom_up: bool, save_states: bool) -> tuple[torch.Tensor, torch.Tensor]:
    batch, dim, H, W = u.shape
    a = _scan2d_args(dt, u, A, B, C, right_to_left, bottom_up)
    y = torch.empty_like(u)
    states = u.new_empty(batch, dim, -(-H // a.K) if save_states else 0, W, A.shape[1])
    a.sy, a.y, a.ckpt = _strides(y, 4), y.data_ptr(), _ptr(states)
    _call("scan2d_fwd", a, u.dtype)
    return y, states


@_fwd2d_op.register_fake
def _(dt, u, A, B, C, right_to_left, bottom_up, save_states):
    batch, dim, H, W = u.shape
    K = max(1, math.isqrt(H - 1) + 1)
    return torch.empty_like(u), u.new_empty(batch, dim, -(-H // K) if save_states else 0, W, A.shape[1])


@torch.library.custom_op("ssmkit::scan2d_cpu_bwd", mutates_args=())
def _bwd2d_op(dy: torch.Tensor, dt: torch.Tensor, u: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              states: torch.Tensor, right_to_left: bool, bottom_up: bool) -> list[torch.Tensor]:
    batch, dim, H, W = u.shape
    N = A.shape[1]
    a = _scan2d_args(dt, u, A, B, C, right_to_left, bottom_up)
    nblk = dim // a.cb
    ddt, du = torch.empty_like(dt), torch.empty_like(u)
    dA_b = u.new_empty(batch, dim, N)
    dB_p, dC_p = u.new_empty(batch, nblk, H, W, N), u.new_empty(batch, nblk, H, W, N)
    a.sdy, a.sddt, a.sdu = _strides(dy, 4), _strides(ddt, 4), _strides(du, 4)
    for name, t in (("dy", dy), ("ckpt", states), ("ddt", ddt), ("du", du), ("dA", dA_b), ("dB", dB_p), ("dC", dC_p)):
        setattr(a, name, _ptr(t))
    _call("scan2d_bwd", a, u.dtype)

    def group_sum(parts, G):  # (batch, nblk, H, W, N) -> (batch, G, N, H, W), blocks of a group in order
        if nblk != G:
            parts = _reduce(parts, u.new_empty(batch, G, H, W, N), batch * G, nblk // G)
        return parts.permute(0, 1, 4, 2, 3)

    return [ddt, du, _reduce(dA_b, u.new_empty(dim, N), 1, batch), group_sum(dB_p, B.shape[1]),
            group_sum(dC_p, C.shape[1])]


@_bwd2d_op.register_fake
def _(dy, dt, u, A, B, C, states, right_to_left, bottom_up):
    return [torch.empty_like(dt), torch.empty_like(u), torch.empty_like(A), B.new_empty(B.shape), C.new_empty(C.shape)]


def _setup_context_2d(ctx, inputs, output):
    dt, u, A, B, C, right_to_left, bottom_up, save_states = inputs
    ctx.save_for_backward(dt, u, A, B, C, output[1])
    ctx.flags = (right_to_left, bottom_up)


def _backward_2d(ctx, dy, dstates):
    dt, u, A, B, C, states = ctx.saved_tensors
    if states.shape[2] == 0:
        raise RuntimeError("selective_scan_2d (cpu): backward through a forward run without saved states "
                           "(it ran with gradients disabled)")
    ddt, du, dA, dB, dC = torch.ops.ssmkit.scan2d_cpu_bwd(dy.to(u.dtype), dt, u, A, B, C, states, *ctx.flags)
    return ddt, du, dA, dB, dC, None, None, None


torch.library.register_autograd("ssmkit::scan2d_cpu_fwd", _backward_2d, setup_context=_setup_context_2d)


# ----------------------------------------------------------------------------------------------------
# entry points (called by ssmkit.core.scan and ssmkit.core.scan2d)


def selective_scan_cpu(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, reverse, seq_idx, dtype):
    """The compiled scan in `dtype` (fp32 or fp64). u, delta, z: (batch, dim, L), any strides; B, C:
    (batch, G, N, L), or a stride-0 expansion of a time-invariant (dim, N) tensor (read once);
    seq_idx: (batch, L) ints. Returns (y (batch, dim, L) in `dtype`, last_state (batch, dim, N)), both
    differentiable."""
    dim, N = A.shape
    B, C = (_rows(as_time_invariant(X, dim, N).to(dtype)) for X in (B, C))
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    contig = lambda t: None if t is None else t.to(dtype).contiguous()  # noqa: E731
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (u, delta, A, B, C, D, z, delta_bias, initial_state))
    y, last, _ = torch.ops.ssmkit.selective_scan_cpu_fwd(
        cast(u), cast(delta), contig(A), B, C, contig(D), cast(z), contig(delta_bias), contig(initial_state),
        None if seq_idx is None else seq_idx.to(torch.int64).contiguous(), bool(delta_softplus), bool(reverse), save)
    return y, last


def selective_state_update_cpu(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """One decode step in place on `state` (batch, dim, N); B, C: (batch, G, N). Computes in the state's
    dtype when it is fp32 or fp64 and its states are contiguous (else on a copy written back)."""
    cd = compute_dtype(state, x)
    work = state if state.dtype == cd and state.stride(-1) == 1 else state.to(cd).contiguous()
    vec = lambda t: None if t is None else t.to(cd).contiguous()  # noqa: E731
    y = torch.ops.ssmkit.selective_state_update_cpu(work, x.to(cd), dt.to(cd), vec(A), B.to(cd).contiguous(),
                                                    C.to(cd).contiguous(), vec(D), None if z is None else z.to(cd),
                                                    vec(dt_bias), bool(dt_softplus))
    if work is not state:
        state.copy_(work)
    return y.to(x.dtype)


def scan2d_cpu(dt, u, A, B, C, right_to_left: bool, bottom_up: bool):
    """Σ_n C·h of one direction of the 2-D scan (the recurrence of `core.scan2d`), differentiable.
    dt, u: (batch, dim, H, W), any strides, dt already through bias and softplus; A: (dim, N); B, C:
    (batch, groups, N, H, W); all of one dtype (fp32 or fp64). Returns (batch, dim, H, W)."""
    B, C = (X if X.stride(2) == 1 else X.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3) for X in (B, C))
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (dt, u, A, B, C))
    y, _ = torch.ops.ssmkit.scan2d_cpu_fwd(dt, u, A.contiguous(), B, C, bool(right_to_left), bool(bottom_up), save)
    return y
