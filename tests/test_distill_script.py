"""scripts/distill.py end to end on the tiny model: students (finished and mid-round) that
load and sample as they were trained."""
from __future__ import annotations

import pytest
from conftest import load_script, tiny_pipeline

import ldm
from ldm.inference import SamplingOptions, resolve

distill = load_script("distill")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    teacher = root / "teacher.safetensors"
    tiny_pipeline().save(teacher)
    out = root / "run"
    assert distill.main(["--ckpt", str(teacher), "--out", str(out), "--images", "8",
                         "--iterations", "2", "--batch", "2", "--teacher-steps", "4",
                         "--final-steps", "2", "--checkpoint-every", "1", "--threads", "1"]) == 0
    return teacher, out


def test_students_carry_their_sampling_config(run) -> None:
    _, out = run
    pipe = ldm.load_pipeline(out / "student-2steps.safetensors", prepare=False)
    d = pipe.config.diffusion
    assert (d.prediction_type, d.timestep_spacing, d.distilled_guidance) == ("v", "trailing", 7.5)
    assert resolve(SamplingOptions(prompt="a red circle", steps=2), pipe).guidance_scale == 1


def test_export_of_a_checkpoint(run) -> None:
    teacher, out = run
    checkpoint = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert distill.main(["--ckpt", str(teacher), "--out", str(out), "--export", str(checkpoint)]) == 0
    exported = out / f"student-2steps-step{int(checkpoint.name.split('-')[1])}.safetensors"
    pipe = ldm.load_pipeline(exported, prepare=False)
    assert pipe.config.diffusion.timestep_spacing == "trailing"


def test_export_of_a_missing_checkpoint(run, tmp_path, capsys) -> None:
    teacher, _ = run
    assert distill.main(["--ckpt", str(teacher), "--out", str(tmp_path),
                         "--export", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.startswith("error: cannot read checkpoint")


def test_a_student_distils_further_and_keeps_its_guidance(run, tmp_path, capsys) -> None:
    _, out = run
    student = out / "student-2steps.safetensors"
    assert distill.main(["--ckpt", str(student), "--out", str(tmp_path), "--images", "8",
                         "--iterations", "1", "--batch", "2", "--teacher-steps", "2",
                         "--final-steps", "1", "--threads", "1"]) == 0
    d = ldm.load_pipeline(tmp_path / "student-1steps.safetensors", prepare=False).config.diffusion
    assert (d.prediction_type, d.timestep_spacing, d.distilled_guidance) == ("v", "trailing", 7.5)
    assert distill.main(["--ckpt", str(student), "--out", str(tmp_path / "again"),
                         "--guidance-scale", "3", "--teacher-steps", "2", "--final-steps", "1"]) == 2
    assert "already carries guidance 7.5" in capsys.readouterr().err
