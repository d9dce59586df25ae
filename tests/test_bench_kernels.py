"""scripts/bench_kernels.py runs end to end on tiny shapes and prints every table (no timing is
asserted: the numbers are whatever this machine gives)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
