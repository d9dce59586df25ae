"""scripts/evaluate.py end to end on tiny folders (shapes features), and its bad-input lines."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import load_script
from ldm.data.shapes import ShapesDataset, caption, render
from ldm.eval.shapes_features import FEATURE_DIM

evaluate = load_script("evaluate")
ENOUGH = FEATURE_DIM + 4  # FID needs FEATURE_DIM + 1 images per set


def write_shapes(folder: Path, num: int, seed: int, size: int = 64, sizes: tuple[int, ...] = ()) -> Path:
    """num shapes PNGs (+ captions); image i is resized to sizes[i % len(sizes)] when given."""
    folder.mkdir(parents=True, exist_ok=True)
    dataset = ShapesDataset(num, seed=seed, size=size)
    for i in range(num):
        spec, _ = dataset.spec(i)
        image = Image.fromarray(render(spec, size))
        if sizes:
            side = sizes[i % len(sizes)]
            image = image.resize((side, side), Image.BILINEAR)
        image.save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(caption(spec) + "\n")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A real and a fake folder of shapes images from different seeds."""
    root = tmp_path_factory.mktemp("sets")
    return write_shapes(root / "real", ENOUGH, seed=11), write_shapes(root / "fake", ENOUGH, seed=12)


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of evaluate.py with `argv`."""
    try:
        code = evaluate.main(argv)
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_error(code: int, err: str, *words: str) -> None:
    """Exit 2 and one 'evaluate.py: error: ...' line holding every word."""
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluate.py: error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_folders_end_to_end(folders, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("LDM_INCEPTION_WEIGHTS", raising=False)
    real, fake = folders
    out_json = tmp_path / "results.json"
    code, out, err = run(["--real", str(real), "--fake", str(fake), "--out", str(out_json),
                          "--kid-subsets", "10"], capsys)
    assert code == 0, err
    assert "shapes feature network" in out  # the note: no Inception weights given
    for name in ("shapes-FID", "shapes-KID", "shapes-IS", "shapes-precision", "shapes-recall"):
        assert name in out
    result = json.loads(out_json.read_text())
    m = result["metrics"]
    assert result["features"] == "shapes" and result["num_real"] == result["num_fake"] == ENOUGH
    assert m["shapes-FID"] > 0 and m["shapes-KID_stderr"] > 0
    assert 1.0 <= m["shapes-IS"] <= 168 and 0 <= m["shapes-precision"] <= 1 and 0 <= m["shapes-recall"] <= 1
    assert "FID" not in m  # shapes features are never reported as FID


def test_identical_folders(folders, capsys) -> None:
    real, _ = folders
    code, out, err = run(["--real", str(real), "--fake", str(real), "--features", "shapes",
                          "--kid-subsets", "5", "--out", str(real.parent / "same.json")], capsys)
    assert code == 0, err
    m = json.loads((real.parent / "same.json").read_text())["metrics"]
    assert m["shapes-FID"] == pytest.approx(0.0, abs=1e-6)
    assert m["shapes-precision"] == 1.0 and m["shapes-recall"] == 1.0


def test_mixed_sizes_are_resized(tmp_path, folders, capsys) -> None:
    real, _ = folders
    mixed = write_shapes(tmp_path / "mixed", ENOUGH, seed=13, sizes=(64, 48, 96))
    code, out, err = run(["--real", str(real), "--fake", str(mixed), "--kid-subsets", "5"], capsys)
    assert code == 0, err
    assert "note: images of 3 sizes" in out and "resized to 64x64" in out


@pytest.mark.parametrize("case, words", [
    ("missing", ["--fake", "not found"]),
    ("empty", ["--fake", "no images"]),
    ("few", ["shapes-FID", f"at least {FEATURE_DIM + 1} images", "and 3 fake"]),
    ("inception", ["weights-inception-2015-12-05", "github.com/toshas/torch-fidelity/releases",
                   "--inception-weights"]),
    ("inception_file", ["Inception weights not found", "nope.pth"]),
    ("corrupt_inception", ["cannot read Inception weights"]),
    ("clip", ["--clip-score needs --clip-model"]),
    ("no_mode", ["--real DIR and --fake DIR"]),
    ("bad_n", ["--n must be >= 1"]),
    ("prompts", ["prompts file not found"]),
    ("ckpt", ["checkpoint not found"]),
])
def test_bad_input(case: str, words: list[str], folders, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("LDM_INCEPTION_WEIGHTS", raising=False)
    real, fake = folders
    out_json = tmp_path / "out.json"
    base = ["--real", str(real), "--out", str(out_json)]
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "p.txt").write_text("a red circle on a blue background\n")
    argv = {
        "missing": base + ["--fake", str(tmp_path / "nowhere")],
        "empty": base + ["--fake", str(tmp_path / "empty")],
        "few": base + ["--fake", str(write_shapes(tmp_path / "few", 3, seed=1))],
        "inception": base + ["--fake", str(fake), "--features", "inception"],
        "inception_file": base + ["--fake", str(fake), "--inception-weights", str(tmp_path / "nope.pth")],
        "corrupt_inception": base + ["--fake", str(fake), "--inception-weights", str(tmp_path / "bad.pth")],
        "clip": base + ["--fake", str(fake), "--clip-score"],
        "no_mode": ["--real", str(real)],
        "bad_n": base + ["--ckpt", "default", "--prompts", str(tmp_path / "p.txt"), "--n", "0"],
        "prompts": base + ["--ckpt", "default", "--prompts", str(tmp_path / "none.txt")],
        "ckpt": base + ["--ckpt", str(tmp_path / "none.safetensors"), "--prompts", str(tmp_path / "p.txt")],
    }[case]
    code, out, err = run(argv, capsys)
    assert_error(code, err, *words)
    assert not out_json.exists()


@pytest.mark.slow
def test_generate_then_score(folders, tmp_path, capsys) -> None:
    real, _ = folders
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background\na green square on a white background\n")
    saved = tmp_path / "generated"
    code, out, err = run(["--real", str(real), "--ckpt", "default", "--prompts", str(prompts),
                          "--n", str(FEATURE_DIM + 1), "--steps", "1", "--guidance-scale", "1",
                          "--batch", str(FEATURE_DIM + 1),
                          "--kid-subsets", "5", "--save-fake", str(saved),
                          "--out", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    assert f"generated {FEATURE_DIM + 1} images" in out
    assert len(list(saved.glob("*.png"))) == FEATURE_DIM + 1
    assert (saved / "000001.txt").read_text().strip() == "a green square on a white background"
    assert json.loads((tmp_path / "r.json").read_text())["num_fake"] == FEATURE_DIM + 1


def test_clip_score_column(folders, tmp_path, capsys) -> None:
    import open_clip
    import torch

    from test_eval_features import TINY_CLIP

    real, fake = folders
    config = tmp_path / "tiny-cli-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    torch.save(open_clip.create_model("tiny-cli-clip").state_dict(), tmp_path / "clip.pt")
    code, out, err = run(["--real", str(real), "--fake", str(fake), "--kid-subsets", "5", "--clip-score",
                          "--clip-model", str(config), "--clip-weights", str(tmp_path / "clip.pt"),
                          "--out", str(tmp_path / "c.json")], capsys)
    assert code == 0, err
    assert "CLIP score" in out
    assert 0 <= json.loads((tmp_path / "c.json").read_text())["metrics"]["CLIP score"] <= 100
