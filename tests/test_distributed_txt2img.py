"""txt2img under torchrun: two Gloo ranks write exactly the files (names and bytes) that one
process writes, numbered after what the folder already holds."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import tiny_pipeline
from ldm.inference.distributed import Batch, free_numbers, global_batches, numbered
from ldm.inference.outputs import png_info, write_new_png

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "txt2img.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _seed_folder(outdir: Path) -> None:
    """Files already there: numbering continues after the largest sample and skips taken grids."""
    (outdir / "samples").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(outdir / "samples" / "00003.png")
    Image.new("RGB", (4, 4)).save(outdir / "grid-0001.png")


def test_free_numbers_are_what_write_new_png_picks(tmp_path):
    _seed_folder(tmp_path)
    expected = free_numbers(tmp_path, "grid-{:04d}.png", 3), free_numbers(tmp_path / "samples", "{:05d}.png", 2)
    image, info = Image.new("RGB", (2, 2)), png_info({})
    grids = [int(write_new_png(tmp_path, "grid-{:04d}.png", image, info).stem[5:]) for _ in range(3)]
    samples = [int(write_new_png(tmp_path / "samples", "{:05d}.png", image, info).stem) for _ in range(2)]
    assert (grids, samples) == expected
    assert grids == [0, 2, 3] and samples == [4, 5]


def test_numbers_follow_the_single_process_order(tmp_path):
    batches = global_batches(["a", "b"], 2, seed=10, batch_size=3)
    assert [(b.prompt, b.seed) for b in batches] == [("a", 10), ("a", 13), ("b", 16), ("b", 19)]
    plan = numbered(batches, 3, None, tmp_path / "samples", tmp_path)
    assert plan[1] == Batch("a", 13, {0: 3, 1: 4, 2: 5}, 1)
    only = numbered(batches, 3, 2, tmp_path / "samples", tmp_path)
    assert [b.sample_numbers for b in only] == [{2: 0}, {2: 1}, {2: 2}, {2: 3}]
    assert all(b.grid_number is None for b in only)


@pytest.mark.slow
def test_two_gloo_ranks_write_the_files_of_one_process(tmp_path):
    pipe = tiny_pipeline()
    ckpt = tmp_path / "tiny.safetensors"
    pipe.save(ckpt)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    # Same thread count and memory format on both sides: only then are pixels bit-identical.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    flags = ["--ckpt", str(ckpt), "--from-file", str(prompts), "--n_iter", "2", "--n_samples", "2",
             "--steps", "2", "--scale", "3", "--precision", "fp32", "--device", "cpu", "--no-autotune"]
    single, multi = tmp_path / "single", tmp_path / "multi"
    for outdir in (single, multi):
        _seed_folder(outdir)
    result = subprocess.run([sys.executable, str(SCRIPT), *flags, "--outdir", str(single)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    result = subprocess.run([*torchrun, str(SCRIPT), *flags, "--outdir", str(multi)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = _files(single)
    assert sorted(expected) == sorted([f"grid-{n:04d}.png" for n in range(5)]
                                      + [f"samples/{n:05d}.png" for n in range(3, 12)])
    got = _files(multi)
    assert sorted(got) == sorted(expected)
    assert [name for name in expected if got[name] != expected[name]] == []
    # each rank wrote its own batches: both report files, none of them the same
    reports = [line for line in result.stdout.splitlines() if line.startswith("wrote ")]
    assert len(reports) == 2 and all(not line.startswith("wrote 0 ") for line in reports)
