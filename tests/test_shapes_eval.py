"""scripts/eval_shapes.py: the accuracy table, the --dataset mode, and the generation loop."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.data.shapes import CAPTION_TEMPLATES, COLORS, HELD_OUT_TRIPLES, SHAPES, ShapeSpec, render
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "eval_shapes.py"


def _load_script():
    return load_script("eval_shapes")


def test_summarise_counts_each_attribute():
    ev = _load_script()
    truth = [("red", "circle", "blue"), ("red", "triangle", "blue"), ("green", "square", "white")]
    pred = [("red", "circle", "blue"), ("red", "square", "blue"), ("green", "square", "black")]
    s = ev.summarise(truth, pred)
    assert s["color"] == 100.0
    assert s["shape"] == pytest.approx(200 / 3) and s["background"] == pytest.approx(200 / 3)
    assert s["all"] == pytest.approx(100 / 3)
    assert s["held_out_all"] == 0.0 and s["held_out_count"] == 1     # (red, triangle, blue) is held out
    assert s["swap"] == 0.0


def test_swap_rate_counts_exchanged_colours_only():
    ev = _load_script()
    truth = [("red", "circle", "blue")] * 4
    pred = [("blue", "circle", "red"), ("blue", "square", "red"), ("blue", "circle", "blue"),
            ("red", "circle", "blue")]
    s = ev.summarise(truth, pred)
    assert s["swap"] == 50.0 and s["color"] == 25.0    # a swap counts whatever the shape


def test_dataset_mode_scores_100_percent(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--dataset", "--num", "400", "--seed", "3",
                          "--outdir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert summary["count"] == 400 and summary["held_out_count"] > 0
    for key in ("color", "shape", "background", "all", "held_out_all"):
        assert summary[key] == 100.0, key
    assert "all three" in out.stdout and (tmp_path / "grid.png").is_file()


def _fake_generate(broken_shape: str | None, calls: list):
    """Stands in for generate_images: 'generates' the true image of each canonical caption."""
    def generate(pipe, prompts, first_seed, args, triple=None):
        calls.append((list(prompts), first_seed))
        out = []
        for prompt in prompts:
            words = prompt.split()
            color, shape, background = words[1], words[2], words[5]
            assert prompt == CAPTION_TEMPLATES[0].format(color=color, shape=shape, background=background)
            if shape == broken_shape:
                shape = "circle" if shape != "circle" else "square"
            out.append(render(ShapeSpec(color, shape, background, x0=10.0, y0=12.0, side=0.5 * args.size), args.size))
        return out
    return generate


def _stub_checkpoint(tmp_path, monkeypatch) -> str:
    """A checkpoint path whose 'pipeline' is never used (generate_images is replaced)."""
    import ldm
    monkeypatch.setattr(ldm, "load_pipeline", lambda path, **kw: object(), raising=False)
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"stub")
    return str(ckpt)


def _script_with(tmp_path, monkeypatch, generate) -> tuple:
    """The script with `generate` in place of generate_images, and a stub checkpoint for it."""
    ev = _load_script()
    monkeypatch.setattr(ev, "generate_images", generate)
    return ev, _stub_checkpoint(tmp_path, monkeypatch)


@pytest.mark.parametrize("broken", [None, "triangle"])
def test_generation_loop(tmp_path, monkeypatch, broken):
    calls: list = []
    ev, ckpt = _script_with(tmp_path, monkeypatch, _fake_generate(broken, calls))
    assert ev.main(["--ckpt", ckpt, "--seed", "100", "--batch", "50", "--outdir", str(tmp_path / "out")]) == 0
    prompts = [p for batch, _ in calls for p in batch]
    assert len(prompts) == 3 * 168 and len(set(prompts)) == 168   # three seeds per triple by default
    # fixed seeds: seed + index + 1000 * repeat, so the three repeats never share a seed
    assert [first for _, first in calls] == [100, 150, 200, 250, 1100, 1150, 1200, 1250,
                                             2100, 2150, 2200, 2250]
    seeds = [first + k for batch, first in calls for k in range(len(batch))]
    assert len(set(seeds)) == 3 * 168
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    summary = results["summary"]
    assert summary["count"] == 3 * 168 and len(results["predictions"]) == 3 * 168
    from ldm.cpu import cpu_info  # --precision auto, recorded as what ran
    assert results["args"]["precision"] == ("bf16" if cpu_info().native_bf16 else "fp32")
    if broken is None:
        assert summary["all"] == 100.0 and summary["held_out_all"] == 100.0
    else:
        assert summary["shape"] == pytest.approx(200 / 3) and summary["color"] == 100.0
        assert summary["held_out_all"] == pytest.approx(100 * 5 / 8)   # 3 held-out triangles
    assert summary["swap"] == 0.0
    grid = Image.open(tmp_path / "out" / "grid.png")
    assert grid.size == (len(COLORS) * 68 + 4, len(COLORS) * len(SHAPES) * 68 + 4)
    # A misread cell gets a red frame; rows go (red, circle), (red, square), (red, triangle), ...
    frame = np.asarray(grid)[4 + 2 * 68 - 2, 4 + 68 + 10]          # top frame of (red, triangle, green)
    assert (tuple(frame) == (255, 0, 0)) == (broken == "triangle")
    assert 3 * len(HELD_OUT_TRIPLES) == summary["held_out_count"]


def test_one_seed_is_one_image_per_triple(tmp_path, monkeypatch):
    calls: list = []
    ev, ckpt = _script_with(tmp_path, monkeypatch, _fake_generate(None, calls))
    assert ev.main(["--ckpt", ckpt, "--seeds", "1", "--batch", "84",
                    "--outdir", str(tmp_path / "out")]) == 0
    assert [first for _, first in calls] == [0, 84]


def test_bad_seeds_is_one_line():
    out = subprocess.run([sys.executable, str(SCRIPT), "--seeds", "0"], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode != 0 and "--seeds must be >= 1" in out.stderr
    assert "Traceback" not in out.stderr


def test_batched_generation_equals_txt2img_one_by_one():
    from ldm.inference import SamplingOptions, txt2img
    from ldm.pipeline import Pipeline
    from test_shapes_export import _tiny_config

    ev = _load_script()
    pipe = Pipeline.from_config(_tiny_config(), seed=3)
    args = ev.parse_args(["--steps", "3", "--scale", "3", "--size", "16"])
    prompts = ["a red circle on a blue background", "a green square on a white background"]
    batched = ev.generate_images(pipe, prompts, 7, args)
    for k, prompt in enumerate(prompts):
        options = SamplingOptions(prompt=prompt, height=16, width=16, steps=3, sampler="ddim",
                                  guidance_scale=3.0, seed=7 + k)
        (single,) = txt2img(pipe, options)
        assert np.abs(np.asarray(single, dtype=int) - batched[k].astype(int)).max() <= 1


def test_missing_checkpoint_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--ckpt", str(tmp_path / "nope.safetensors")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and "checkpoint not found" in out.stderr and "Traceback" not in out.stderr


def test_classifier_mode_guides_each_triple_alone(tmp_path, monkeypatch):
    calls: list = []
    fake = _fake_generate(None, calls)
    guided: list = []

    def generate(pipe, prompts, first_seed, args, triple=None):
        guided.append(triple)
        return fake(pipe, prompts, first_seed, args, triple)
    ev, ckpt = _script_with(tmp_path, monkeypatch, generate)
    assert ev.main(["--ckpt", ckpt, "--seeds", "2", "--limit", "12", "--classifier", "c.st",
                    "--outdir", str(tmp_path / "out")]) == 0
    assert len(calls) == 24 and all(len(batch) == 1 for batch, _ in calls)
    assert [tuple(caption.split()[i] for i in (1, 2, 5)) for (caption,), _ in calls] == guided
    assert len(set(guided)) == 12


def test_pairs_keep_the_confusable_triples_in_both_orders(tmp_path, monkeypatch):
    calls: list = []
    ev, ckpt = _script_with(tmp_path, monkeypatch, _fake_generate(None, calls))
    assert ev.main(["--ckpt", ckpt, "--seeds", "2", "--pairs", "green-blue, black-green",
                    "--outdir", str(tmp_path / "out")]) == 0
    triples = {tuple(p.split()[i] for i in (1, 2, 5)) for batch, _ in calls for p in batch}
    expected = {(a, s, b) for a, b in [("green", "blue"), ("blue", "green"), ("green", "black"),
                                       ("black", "green")] for s in SHAPES}
    assert triples == expected
    summary = json.loads((tmp_path / "out" / "results.json").read_text())["summary"]
    assert summary["count"] == 2 * 12
    assert summary["held_out_all"] is None and summary["held_out_count"] == 0   # none among them


@pytest.mark.parametrize("bad", ["green-green", "green", "green-teal", "red-blue-green"])
def test_bad_pairs_are_one_line(bad):
    out = subprocess.run([sys.executable, str(SCRIPT), "--pairs", bad], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode != 0 and "--pairs" in out.stderr and "Traceback" not in out.stderr


def test_template_words_the_prompts(tmp_path, monkeypatch):
    prompts: list = []

    def generate(pipe, batch, first_seed, args, triple=None):
        prompts.extend(batch)
        return [np.zeros((args.size, args.size, 3), np.uint8)] * len(batch)
    ev, ckpt = _script_with(tmp_path, monkeypatch, generate)
    assert ev.main(["--ckpt", ckpt, "--seeds", "1", "--pairs", "red-blue", "--template", "4",
                    "--outdir", str(tmp_path / "out")]) == 0
    assert "a blue background with a red circle" in prompts and len(prompts) == 6


def test_only_wrong_redoes_the_misses_with_their_own_seeds(tmp_path, monkeypatch):
    calls: list = []
    ev, ckpt = _script_with(tmp_path, monkeypatch, _fake_generate(None, calls))
    triples = [t for t in ev.all_triples() if {t[0], t[2]} == {"blue", "green"}]   # the script's order
    predictions = [{"truth": list(t), "predicted": list(t)} for _ in range(2) for t in triples]
    for n in (4, 6 + 1):                             # repeat 0, triple 4; repeat 1, triple 1
        color, shape, background = predictions[n]["truth"]
        predictions[n]["predicted"] = [background, shape, color]
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"predictions": predictions}))
    assert ev.main(["--ckpt", ckpt, "--seeds", "2", "--pairs", "blue-green", "--seed", "10",
                    "--only-wrong", str(earlier), "--outdir", str(tmp_path / "out")]) == 0
    assert calls == [([ev.caption(triples[4])], 10 + 4), ([ev.caption(triples[1])], 10 + 1 + 1000)]
    summary = json.loads((tmp_path / "out" / "results.json").read_text())["summary"]
    assert summary["count"] == 2 and summary["all"] == 100.0       # the fake draws them right
    # A results file of another run is refused in one line.
    assert ev.main(["--ckpt", ckpt, "--seeds", "1", "--pairs", "blue-green",
                    "--only-wrong", str(earlier), "--outdir", str(tmp_path / "out2")]) == 2
