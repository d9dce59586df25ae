"""scripts/eval_shapes.py: the accuracy table, the --dataset mode, and the generation loop."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.data.shapes import CAPTION_TEMPLATES, COLORS, HELD_OUT_TRIPLES, SHAPES, ShapeSpec, render

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "eval_shapes.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("eval_shapes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summarise_counts_each_attribute():
    ev = _load_script()
    truth = [("red", "circle", "blue"), ("red", "triangle", "blue"), ("green", "square", "white")]
    pred = [("red", "circle", "blue"), ("red", "square", "blue"), ("green", "square", "black")]
    s = ev.summarise(truth, pred)
    assert s["color"] == 100.0
    assert s["shape"] == pytest.approx(200 / 3) and s["background"] == pytest.approx(200 / 3)
    assert s["all"] == pytest.approx(100 / 3)
    assert s["held_out_all"] == 0.0 and s["held_out_count"] == 1     # (red, triangle, blue) is held out


def test_dataset_mode_scores_100_percent(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--dataset", "--num", "400", "--seed", "3",
                          "--outdir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert summary["count"] == 400 and summary["held_out_count"] > 0
    for key in ("color", "shape", "background", "all", "held_out_all"):
        assert summary[key] == 100.0, key
    assert "all three" in out.stdout and (tmp_path / "grid.png").is_file()


class _PerfectPipe:
    """Stands in for ldm's pipeline: 'generates' the true image for the canonical caption."""

    def __init__(self, broken_shape: str | None = None) -> None:
        self.calls: list[tuple[str, int]] = []
        self.broken_shape = broken_shape

    def txt2img(self, prompt, height, width, seed, num_images, **options):
        self.calls.append((prompt, seed))
        words = prompt.split()
        color, shape, background = words[1], words[2], words[5]
        assert prompt == CAPTION_TEMPLATES[0].format(color=color, shape=shape, background=background)
        if shape == self.broken_shape:
            shape = "circle" if shape != "circle" else "square"
        spec = ShapeSpec(color, shape, background, x0=10.0, y0=12.0, side=0.5 * width)
        return [Image.fromarray(render(spec, width))]


@pytest.mark.parametrize("broken", [None, "triangle"])
def test_generation_loop_with_a_stub_pipeline(tmp_path, monkeypatch, broken):
    import ldm

    ev = _load_script()
    pipe = _PerfectPipe(broken_shape=broken)
    monkeypatch.setattr(ldm, "load_pipeline", lambda path, **kw: pipe, raising=False)
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"stub")
    assert ev.main(["--ckpt", str(ckpt), "--seed", "100", "--outdir", str(tmp_path / "out")]) == 0
    assert len(pipe.calls) == 168 and len({p for p, _ in pipe.calls}) == 168
    assert [s for _, s in pipe.calls] == list(range(100, 268))       # fixed seeds: seed + index
    summary = json.loads((tmp_path / "out" / "results.json").read_text())["summary"]
    if broken is None:
        assert summary["all"] == 100.0 and summary["held_out_all"] == 100.0
    else:
        assert summary["shape"] == pytest.approx(200 / 3) and summary["color"] == 100.0
        assert summary["held_out_all"] == pytest.approx(100 * 5 / 8)   # 3 held-out triangles
    grid = Image.open(tmp_path / "out" / "grid.png")
    assert grid.size == (len(COLORS) * 68 + 4, len(COLORS) * len(SHAPES) * 68 + 4)
    # A misread cell gets a red frame; the first row is (red, circle), the second (red, square).
    frame = np.asarray(grid)[4 + 2 * 68 - 2, 4 + 68 + 10]          # top frame of (red, triangle, green)
    assert (tuple(frame) == (255, 0, 0)) == (broken == "triangle")
    assert len(HELD_OUT_TRIPLES) == summary["held_out_count"]


def test_missing_checkpoint_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--ckpt", str(tmp_path / "nope.safetensors")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and "checkpoint not found" in out.stderr and "Traceback" not in out.stderr
