"""Every default launch plan of the Triton kernels compiles for the H100 (sm_90) and A100 (sm_80).

The rest of the suite runs the kernels in Triton's CPU interpreter, which accepts programs the GPU
compiler may reject (layouts, register limits, unsupported ops). Here each launch the host code makes
is lowered to a cubin with Triton's bundled ptxas, without a GPU (ssmkit.kernels.aot). It runs in a
subprocess because this session's conftest sets TRITON_INTERPRET=1 before the kernels are defined.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

KERNELS = {"_seq_fwd_kernel", "_seq_bwd_kernel", "_seq_bwd_local_kernel", "_pass_kernel", "_scan_fwd_kernel",
           "_scan_bwd_kernel", "_state_update_kernel", "_scan2d_fwd_kernel", "_scan2d_bwd_kernel"}


@pytest.mark.parametrize("arch", [90, 80])
def test_default_plans_compile_for_cuda(arch, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "resources.json"
    proc = subprocess.run([sys.executable, "-m", "ssmkit.kernels.aot", "--arch", str(arch), "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())
    assert {r["name"] for r in rows} == KERNELS
    assert all(0 < r["registers"] <= 255 for r in rows)
