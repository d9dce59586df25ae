"""scripts/bench_kernels.py runs end to end on tiny shapes and prints every table (no timing is
asserted: the numbers are whatever this machine gives)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm._extension import fused_device_types

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_kernels.py"


@pytest.mark.skipif("cpu" not in fused_device_types("group_norm_silu"), reason="ldm._C not built")
def test_bench_kernels_prints_all_tables():
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--shapes", "1x64x5x7",
         "--sampler-shapes", "1x4x8x8", "--attention-shapes", "1x2x33x17x40", "--repeats", "2",
         "--min-sample-ms", "0.1", "--dtypes", "bf16"],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ")]
    assert any(r.startswith("| 1x64x5x7 | bf16 | nchw |") for r in rows)
    assert any(r.startswith("| 1x64x5x7 | bf16 | channels_last |") for r in rows)
    assert any(r.startswith("| 1x4x8x8 fp32 |") for r in rows)
    if "cpu" in fused_device_types("flash_attention"):
        assert any(r.startswith("| 1x2x33x17x40 |") for r in rows)


@pytest.mark.skipif("cpu" not in fused_device_types("group_norm_silu"), reason="ldm._C not built")
def test_bench_kernels_cold_cache_rotates_inputs():
    """--cache cold says how much it rotates through and still prints forward and backward."""
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--shapes", "2x32x4x4",
         "--sampler-shapes", "--attention-shapes", "--repeats", "2", "--min-sample-ms", "0.1",
         "--dtypes", "fp32", "--formats", "nchw", "--cache", "cold", "--cold-mib", "1"],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "cache=cold (inputs rotated through >= 1 MiB)" in run.stdout
    row = next(line for line in run.stdout.splitlines() if line.startswith("| 2x32x4x4 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 12 and all(float(c.rstrip("%")) > 0 for c in cells[3:])


def test_pool_size_fills_the_cold_budget():
    """Hot mode reuses one input; cold mode rotates enough inputs to exceed --cold-mib."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_kernels
    finally:
        sys.path.pop(0)
    hot = bench_kernels.parse_args(["--cache", "hot"])
    cold = bench_kernels.parse_args(["--cache", "cold", "--cold-mib", "64"])
    shape = (2, 320, 64, 64)  # 10 MiB in fp32, 5 MiB in bf16
    assert bench_kernels.pool_size(hot, shape, torch.float32) == 1
    assert bench_kernels.pool_size(cold, shape, torch.float32) == 7
    assert bench_kernels.pool_size(cold, shape, torch.bfloat16) == 13
    assert bench_kernels.pool_size(cold, (1, 128, 512, 512), torch.float32) == 2
