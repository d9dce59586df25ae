"""scripts/bench_kernels.py runs end to end on tiny shapes and prints every table (no timing is
asserted: the numbers are whatever this machine gives)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm._extension import fused_device_types
from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_kernels.py"


@pytest.mark.skipif("cpu" not in fused_device_types("group_norm_silu"), reason="ldm._C not built")
def test_bench_kernels_prints_all_tables():
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--shapes", "1x64x5x7",
         "--sampler-shapes", "1x4x8x8", "--attention-shapes", "1x2x33x17x40", "--repeats", "2",
         "--min-sample-ms", "0.1", "--dtypes", "bf16"],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    # the default CPU set-up restarts the script with glibc's tcache off (module docstring)
    assert " allocator=heap tcache=off " in run.stdout.splitlines()[0]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ")]
    assert any(r.startswith("| 1x64x5x7 | bf16 | nchw |") for r in rows)
    assert any(r.startswith("| 1x64x5x7 | bf16 | channels_last |") for r in rows)
    assert any(r.startswith("| 1x4x8x8 fp32 |") for r in rows)
    # 1x64x5x7 is neither a U-Net nor a VAE shape: only the backward and sampler targets apply
    assert any(r.startswith("| backward >= 1.5x eager autograd | ") and "/2 |" in r for r in rows)
    assert any(r.startswith("| sampler step >= 3x eager | ") and "/1 |" in r for r in rows)
    assert not any(r.startswith("| forward >= 2.5x") for r in rows)
    if "cpu" in fused_device_types("flash_attention"):
        assert any(r.startswith("| 1x2x33x17x40 |") for r in rows)


@pytest.mark.skipif("cpu" not in fused_device_types("group_norm_silu"), reason="ldm._C not built")
def test_bench_kernels_cold_cache_rotates_inputs():
    """--cache cold says how much it rotates through and still prints forward and backward."""
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--shapes", "2x32x4x4",
         "--sampler-shapes", "--attention-shapes", "--repeats", "2", "--min-sample-ms", "0.1",
         "--dtypes", "fp32", "--formats", "nchw", "--cache", "cold", "--cold-mib", "1",
         "--tcache"],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "cache=cold (inputs rotated through >= 1 MiB)" in run.stdout
    assert " tcache=on " in run.stdout.splitlines()[0]  # --tcache: no restart
    assert " huge_pages=" in run.stdout.splitlines()[0]
    row = next(line for line in run.stdout.splitlines() if line.startswith("| 2x32x4x4 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    values = [float(c.rstrip("%")) for c in cells[3:]]
    # times print in ms and bandwidths in GB/s to fixed decimals, so a ~5 us call on a busy
    # machine may show 0.00 ms or 0.0 GB/s for a 4 KB tensor: only the ratios (fwd x, bwd x),
    # time over time, must be positive
    assert len(cells) == 12 and all(v >= 0 for v in values)
    assert values[2] > 0 and values[8] > 0


def test_pool_size_fills_the_cold_budget():
    """Hot mode reuses one input; cold mode rotates enough inputs to exceed --cold-mib."""
    bench_kernels = load_script("bench_kernels")
    hot = bench_kernels.parse_args(["--cache", "hot"])
    cold = bench_kernels.parse_args(["--cache", "cold", "--cold-mib", "64"])
    shape = (2, 320, 64, 64)  # 10 MiB in fp32, 5 MiB in bf16
    assert bench_kernels.pool_size(hot, shape, torch.float32) == 1
    assert bench_kernels.pool_size(cold, shape, torch.float32) == 7
    assert bench_kernels.pool_size(cold, shape, torch.bfloat16) == 13
    assert bench_kernels.pool_size(cold, (1, 128, 512, 512), torch.float32) == 2


def test_target_rows_count_each_target_over_its_rows():
    """The targets summary counts met rows per target and skips targets with no rows."""
    bench_kernels = load_script("bench_kernels")
    row = lambda shape, dtype, fwd, pct, bwd: {"shape": shape, "dtype": dtype, "fwd_x": fwd,  # noqa: E731
                                               "pct_copy": pct, "bwd_x": bwd}
    norm = [row("2x320x64x64", "fp32", 2.4, 30.0, 1.6), row("2x640x32x32", "fp32", 2.6, 65.0, 1.4),
            row("2x320x64x64", "bf16", 3.0, 15.0, None), row("1x512x64x64", "fp32", 1.7, 40.0, 2.0),
            row("1x64x5x7", "fp32", 9.0, 99.0, 1.5)]
    table = {label: (met, span) for label, met, span in bench_kernels.target_rows(norm, [5.0, 2.0])}
    assert table["forward >= 2.5x eager, U-Net shapes, fp32"] == ("1/2", "2.40-2.60x")
    assert table["forward >= 2.5x eager, U-Net shapes, bf16"] == ("1/1", "3.00-3.00x")
    assert table["forward >= 1.8x eager, VAE shapes"] == ("0/1", "1.70-1.70x")
    assert table["fused forward >= 60% of copy GB/s, U-Net shapes"] == ("1/3", "15-65%")
    assert table["backward >= 1.5x eager autograd"] == ("3/4", "1.40-2.00x")  # None: not run
    assert table["sampler step >= 3x eager"] == ("1/2", "2.00-5.00x")
    assert bench_kernels.target_rows([], []) == []
