"""scripts/steps_grid.py: rows of (model, steps), bad rows refused with one line."""
from __future__ import annotations

import pytest
from conftest import load_script, tiny_pipeline
from PIL import Image

grid = load_script("steps_grid")


@pytest.mark.parametrize("text, match", [
    ("no-equals", "LABEL=CHECKPOINT@STEPS"), ("a=file", "LABEL=CHECKPOINT@STEPS"),
    ("a=file@0", "LABEL=CHECKPOINT@STEPS"), ("a=missing.safetensors@4", "not found"),
])
def test_bad_rows(text: str, match: str, capsys) -> None:
    assert grid.main(["--row", text, "--out", "never.png"]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1


def test_grid_of_two_rows(tmp_path) -> None:
    ckpt = tmp_path / "tiny.safetensors"
    tiny_pipeline().save(ckpt)
    out = tmp_path / "grid.png"
    assert grid.main(["--row", f"two={ckpt}@2", "--row", f"one={ckpt}@1",
                      "--prompt", "a red circle", "--prompt", "a blue square",
                      "--out", str(out)]) == 0
    sheet = Image.open(out)
    assert sheet.size == (grid.LABEL_WIDTH + 2 * 32, 2 * 32)  # tiny model: 32 px images
    assert not list(tmp_path.glob("*.tmp.png"))
