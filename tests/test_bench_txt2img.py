"""scripts/bench_txt2img.py on the default model: the table's parts and bad flags (no timing is
asserted: the numbers are whatever this machine gives)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_txt2img.py"
MODEL = ROOT / "ldm" / "assets" / "shapes.safetensors"


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--model", str(MODEL), *args],
                          capture_output=True, text=True, timeout=300)


def test_parts_of_one_run_add_up() -> None:
    run = bench("--steps", "2", "--no-autotune")
    assert run.returncode == 0, run.stderr
    header = run.stdout.splitlines()[1]
    assert ", cpu, torch, " in header and "peak RSS" in header
    seconds = {}
    for line in run.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 3 and cells[1] != "seconds":
            seconds[cells[0]] = float(cells[1])
    assert set(seconds) == {"total", "text encoder", "U-Net", "VAE decode", "outside networks"}
    parts = sum(v for k, v in seconds.items() if k != "total")
    assert parts == pytest.approx(seconds["total"], abs=2e-3)  # three-decimal rounding
    assert all(v >= 0 for k, v in seconds.items() if k != "outside networks")


@pytest.mark.parametrize("args, message", [
    (("--precision", "fp16"), "error: --precision fp16 is for --device cuda"),
    (("--device", "cuda", "--side", "both"), "error: --device cuda"),
])
def test_bad_flags_one_line(args: tuple[str, ...], message: str) -> None:
    if "cuda" in args and "--side" in args and not torch.cuda.is_available():
        message = "error: --device cuda: no CUDA GPU is available here"
    run = bench(*args)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines() == [run.stderr.strip()]  # one line, no traceback
    assert run.stderr.startswith(message)
