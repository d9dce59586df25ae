"""The shapes dataset: determinism, exclusions, geometry, captions, and the pixel classifier."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.shapes import (
    CAPTION_TEMPLATES, COLORS, HELD_OUT_TRIPLES, MARGIN, PALETTE, SHAPES, ShapeSpec,
    ShapesDataset, all_triples, allowed_triples, caption, coverage, crop_box, render, write_folder,
)
from ldm.data.shapes_classifier import classify

ROOT = Path(__file__).resolve().parents[1]


def test_palette_and_triples_are_the_specified_ones():
    assert PALETTE["red"] == (220, 40, 40) and PALETTE["black"] == (25, 25, 25)
    assert len(COLORS) == 8 and SHAPES == ("circle", "square", "triangle")
    triples = all_triples()
    assert len(triples) == len(set(triples)) == 168
    assert all(c != b for c, _, b in triples)
    assert len(set(HELD_OUT_TRIPLES)) == 8 and set(HELD_OUT_TRIPLES) <= set(triples)


def test_same_seed_same_items_other_seed_other_items():
    a, b = ShapesDataset(16, seed=3), ShapesDataset(16, seed=3)
    c = ShapesDataset(16, seed=4)
    for i in range(16):
        assert torch.equal(a[i]["image"], b[i]["image"]) and a[i]["caption"] == b[i]["caption"]
    assert any(a.spec(i) != c.spec(i) for i in range(16))
    # Items do not depend on access order or on the dataset length.
    assert ShapesDataset(100, seed=3).spec(7) == a.spec(7)


def test_same_images_in_a_fresh_interpreter():
    code = ("from ldm.data.shapes import ShapesDataset; d = ShapesDataset(5, seed=11); "
            "print([d.spec(i) for i in range(5)])")
    runs = [subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                           text=True, check=True, env={"PYTHONHASHSEED": str(s), "PYTHONPATH": str(ROOT)}
                           ).stdout for s in (1, 2)]
    assert runs[0] == runs[1] and "ShapeSpec" in runs[0]


def test_exclusion_is_honoured():
    exclude = list(HELD_OUT_TRIPLES) + [("red", "circle", "blue")]
    ds = ShapesDataset(3000, seed=0, exclude=exclude)
    seen = {ds.spec(i)[0].triple for i in range(len(ds))}
    assert not seen & set(exclude)
    assert len(seen) == 168 - 9          # every allowed triple still occurs
    assert allowed_triples(exclude) == ds.triples


def test_exclusion_rejects_unknown_names():
    with pytest.raises(ValueError, match="shape must be one of"):
        ShapesDataset(4, exclude=[("red", "hexagon", "blue")])
    with pytest.raises(ValueError, match="colours must be one of"):
        allowed_triples([("pink", "circle", "blue")])


@pytest.mark.parametrize("size", [64, 48])
def test_geometry_constraints(size):
    ds = ShapesDataset(400, seed=5, size=size)
    for i in range(len(ds)):
        spec, _ = ds.spec(i)
        assert 0.4 * size <= spec.side <= 0.7 * size
        assert spec.x0 >= MARGIN and spec.y0 >= MARGIN
        assert spec.x0 + spec.side <= size - MARGIN and spec.y0 + spec.side <= size - MARGIN
        alpha = coverage(spec, size)
        # Nothing is drawn within the margin: the 2-pixel border ring is pure background.
        ring = np.ones_like(alpha, dtype=bool)
        ring[2:-2, 2:-2] = False
        assert alpha[ring].max() == 0.0


@pytest.mark.parametrize("shape,area", [("circle", math.pi / 4), ("square", 1.0), ("triangle", 0.5)])
def test_rendered_area_matches_the_shape(shape, area):
    spec = ShapeSpec("red", shape, "blue", x0=10.3, y0=12.7, side=30.0)
    alpha = coverage(spec, 64)
    assert alpha.sum() == pytest.approx(area * 30.0 ** 2, rel=0.01)
    assert 0 < ((alpha > 0) & (alpha < 1)).sum()           # anti-aliased edge pixels exist


def test_triangle_is_upright_and_as_wide_as_tall():
    spec = ShapeSpec("red", "triangle", "blue", x0=10.0, y0=10.0, side=40.0)
    alpha = coverage(spec, 64)
    widths = alpha.sum(1)
    assert widths[11] < 3 and widths[48] > 36                # apex at the top, base at the bottom
    assert alpha[10:50].sum(0)[10:50].max() == pytest.approx(40, abs=1.0)


def test_render_uses_palette_colours_exactly():
    spec = ShapeSpec("purple", "square", "yellow", x0=8.0, y0=8.0, side=32.0)
    img = render(spec, 64)
    assert tuple(img[0, 0]) == PALETTE["yellow"] and tuple(img[24, 24]) == PALETTE["purple"]


def test_dataset_item_format():
    item = ShapesDataset(2, seed=0, size=32)[1]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    color, shape, background = item["triple"]
    assert color in item["caption"] and shape in item["caption"] and background in item["caption"]


def test_captions_include_canonical_and_paraphrases():
    assert caption(("red", "circle", "blue")) == "a red circle on a blue background"
    ds = ShapesDataset(200, seed=1)
    templates = {ds.spec(i)[1] for i in range(len(ds))}
    assert templates == set(range(len(CAPTION_TEMPLATES)))
    assert {ShapesDataset(50, seed=1, paraphrase=False).spec(i)[1] for i in range(50)} == {0}


def test_classifier_reads_every_dataset_image_right():
    # Over every triple (held-out ones included) at random sizes and positions: 100% required.
    ds = ShapesDataset(1500, seed=9)
    wrong = []
    for i in range(len(ds)):
        spec, _ = ds.spec(i)
        got = classify(render(spec, ds.size)).triple
        if got != spec.triple:
            wrong.append((spec, got))
    assert not wrong, wrong[:3]


def test_classifier_extreme_sizes_and_other_resolution():
    for shape in SHAPES:
        for side in (0.4, 0.7):
            for size in (64, 32, 96):
                spec = ShapeSpec("orange", shape, "white", 2.0, size - 2.0 - side * size, side * size)
                assert classify(render(spec, size)).triple == spec.triple, (shape, side, size)


def test_classifier_rejects_wrong_inputs_and_blank_images():
    with pytest.raises(ValueError, match="RGB"):
        classify(np.zeros((8, 8), dtype=np.uint8))
    blank = np.tile(np.asarray(PALETTE["green"], dtype=np.uint8), (64, 64, 1))
    assert classify(blank).shape == "none"


def test_write_folder_and_cli(tmp_path):
    ds = ShapesDataset(5, seed=2, size=32)
    assert write_folder(tmp_path / "a", ds, progress=False) == 5
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files[:2] == ["000000.png", "000000.txt"] and len(files) == 10
    img = np.asarray(Image.open(tmp_path / "a" / "000003.png").convert("RGB"))
    assert np.array_equal(img, render(ds.spec(3)[0], 32))
    assert (tmp_path / "a" / "000003.txt").read_text().strip() == ds[3]["caption"]

    # Crops: a window of the same rendered image, at a position fixed by (seed, index).
    write_folder(tmp_path / "crops", ds, progress=False, crop=16)
    crops = [np.asarray(Image.open(tmp_path / "crops" / f"00000{i}.png").convert("RGB")) for i in range(5)]
    assert {c.shape for c in crops} == {(16, 16, 3)}
    boxes = {crop_box(ds, i, 16) for i in range(5)}
    assert len(boxes) > 1 and all(0 <= v <= 16 for box in boxes for v in box)
    top, left = crop_box(ds, 3, 16)
    assert np.array_equal(crops[3], render(ds.spec(3)[0], 32)[top:top + 16, left:left + 16])
    with pytest.raises(ValueError, match="crop must be"):
        write_folder(tmp_path / "bad", ds, progress=False, crop=33)
    assert not (tmp_path / "bad").exists()

    script = [sys.executable, str(ROOT / "scripts" / "make_shapes.py")]
    ok = subprocess.run(script + ["--out", str(tmp_path / "b"), "--num", "3", "--quiet"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and len(list((tmp_path / "b").glob("*.png"))) == 3
    again = subprocess.run(script + ["--out", str(tmp_path / "b"), "--num", "3"], capture_output=True, text=True)
    assert again.returncode != 0 and "not empty" in again.stderr and "Traceback" not in again.stderr
    bad = subprocess.run(script + ["--out", str(tmp_path / "c"), "--exclude", "red,blob,blue"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "shape must be one of" in bad.stderr and not (tmp_path / "c").exists()
