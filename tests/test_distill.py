"""Progressive distillation: nested grids, the two-step target, a round that learns, exact resume."""
from __future__ import annotations

import pytest
import torch

from ldm.config import DiffusionConfig
from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.samplers import sample_ddim
from ldm.diffusion.schedule import make_schedule
from ldm.prediction import PredictionType
from ldm.train.distill import DistillConfig, Distiller, teacher_plan
from ldm.train.state import ResumeError


class TinyDenoiser(torch.nn.Module):
    """A small network (x, t, context) -> output: a per-timestep gain on a 1x1 convolution of x
    plus a context bias. Initialised as the exact eps of N(0, I) data (eps = s_t x_t), so the
    teacher is meaningful and a student can match its two steps quickly."""

    def __init__(self, schedule) -> None:
        super().__init__()
        self.gain = torch.nn.Embedding(schedule.num_timesteps, 1)
        self.gain.weight.data = schedule.sqrt_one_minus_alphas_cumprod.float()[:, None].clone()
        self.mix = torch.nn.Conv2d(4, 4, 1)
        torch.nn.init.eye_(self.mix.weight[:, :, 0, 0])
        torch.nn.init.zeros_(self.mix.bias)
        self.bias = torch.nn.Linear(8, 4)

    def forward(self, x, t, context):
        gain = self.gain(t.long())[:, :, None, None]                   # [B, 1, 1, 1]
        return gain * self.mix(x) + 0.1 * self.bias(context.mean(1))[:, :, None, None]


SCHEDULE = make_schedule(DiffusionConfig())


def _data():
    """A pool of 16 latents [4, 4, 4] and two contexts [1, 3, 8]; rows drawn by the generator."""
    gen = torch.Generator().manual_seed(9)
    pool, contexts = torch.randn(16, 4, 4, 4, generator=gen), torch.randn(2, 3, 8, generator=gen)

    def data(generator, batch):
        i = torch.randint(0, 16, (batch,), generator=generator)
        return pool[i], contexts[i % 2]
    return data, pool, contexts[torch.arange(16) % 2]


def _distiller(tmp_path, resume=None, **overrides):
    torch.manual_seed(0)
    data, _, _ = _data()
    fields = dict(teacher_steps=8, final_steps=2, iterations=6, batch_size=8, lr=1e-2,
                  guidance_scale=3.0, checkpoint_every=3, seed=1) | overrides
    uncond = torch.zeros(1, 3, 8)
    return Distiller(TinyDenoiser(SCHEDULE), SCHEDULE, PredictionType.EPS, uncond, data,
                     DistillConfig(**fields), tmp_path, resume=resume)


def test_config_checks_and_rounds():
    assert DistillConfig(teacher_steps=64, final_steps=4).student_steps() == [32, 16, 8, 4]
    for bad in (dict(teacher_steps=48, final_steps=4), dict(teacher_steps=4, final_steps=4),
                dict(iterations=0), dict(lr_decay="cosine")):
        with pytest.raises(ValueError):
            DistillConfig(**bad)


def test_learning_rate_falls_to_zero_within_each_round(tmp_path):
    d = _distiller(tmp_path, iterations=4, checkpoint_every=100, lr=1e-2)
    seen = []
    d.fit(report=lambda step, loss: seen.append(d.optimizer.param_groups[0]["lr"]))
    assert seen == pytest.approx([1e-2, 7.5e-3, 5e-3, 2.5e-3] * 2)
    flat = DistillConfig(teacher_steps=8, final_steps=2, iterations=4, lr=1e-2, lr_decay="constant")
    assert [flat.lr_at(k) for k in range(4)] == [1e-2] * 4


@pytest.mark.parametrize("steps", [1, 2, 4, 16, 32, 250])
def test_grids_nest(steps):
    schedule = make_schedule(DiffusionConfig())
    t_s, t_mid, abar = teacher_plan(schedule, steps)
    assert t_s[0] == 999 and (t_s > t_mid).all()
    assert (abar[:, 0] < abar[:, 1]).all() and (abar[:, 1] < abar[:, 2]).all()
    assert abar[-1, 2] == schedule.alphas_cumprod[0]


@pytest.mark.parametrize("round_index", [0, 1])
def test_target_makes_one_ddim_step_land_on_the_teachers_two(tmp_path, round_index):
    """With the student returning x_tilde, one DDIM step from z_t equals two teacher steps
    (the guided eps teacher in the first round, the unguided v student after)."""
    d = _distiller(tmp_path)
    _, pool, contexts = _data()
    gen = torch.Generator().manual_seed(0)
    z, t, x_tilde, _ = d.targets(pool[:6], contexts[:6], round_index, gen)
    t_s, t_mid, abar = teacher_plan(SCHEDULE, d.rounds[round_index])
    i = [int((t_s == v).nonzero()) for v in t]
    a, s = abar[i].sqrt().float(), (1 - abar[i]).sqrt().float()
    col = lambda v: v[:, None, None, None]  # noqa: E731
    one = col(a[:, 2]) * x_tilde + col(s[:, 2] / s[:, 0]) * (z - col(a[:, 0]) * x_tilde)
    with torch.no_grad():
        x1 = d.teacher_x0(z, t, contexts[:6], round_index)
        z1 = col(a[:, 1]) * x1 + col(s[:, 1] / s[:, 0]) * (z - col(a[:, 0]) * x1)
        x2 = d.teacher_x0(z1, t_mid[i], contexts[:6], round_index)
        two = col(a[:, 2]) * x2 + col(s[:, 2] / s[:, 1]) * (z1 - col(a[:, 1]) * x2)
    torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-4)


def test_a_round_lowers_the_one_step_error(tmp_path):
    d = _distiller(tmp_path, iterations=60, checkpoint_every=60, teacher_steps=4)
    _, pool, contexts = _data()
    before = d.one_step_error(pool, contexts, 0, seed=123)
    d.fit()
    after = d.one_step_error(pool, contexts, 0, seed=123)
    assert after < 0.5 * before, (before, after)
    assert (tmp_path / "checkpoints" / "step-0000060").is_dir()


def test_resume_continues_exactly(tmp_path):
    whole = _distiller(tmp_path / "whole")
    whole.fit()                                     # 2 rounds x 6 steps, through a round change
    part = _distiller(tmp_path / "part")
    part.fit(stop_at=9)                             # stops inside the second round
    resumed = _distiller(tmp_path / "part", resume=tmp_path / "part")
    assert resumed.step == 9
    resumed.fit()
    for (name, a), b in zip(whole.student.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(whole.teacher.state_dict().values(), resumed.teacher.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ResumeError):
        _distiller(tmp_path / "other", resume=tmp_path / "part", lr=5e-4)


def test_distilled_student_in_the_ddim_sampler_matches_the_teachers_two_steps(tmp_path):
    """After a round, the student's N-step trailing DDIM run lands near the teacher's 2N-step run."""
    d = _distiller(tmp_path, iterations=80, checkpoint_every=80, teacher_steps=4,
                   guidance_scale=1.0)
    _, _, contexts = _data()
    x_T = torch.randn(16, 4, 4, 4, generator=torch.Generator().manual_seed(2))

    def run(net, kind, steps):
        denoiser = Denoiser(lambda x, t: net(x, t, contexts), kind)
        with torch.no_grad():
            return sample_ddim(denoiser, x_T, SCHEDULE, steps, spacing="trailing")
    teacher = run(d.teacher, PredictionType.EPS, 4)
    before = (run(d.student, PredictionType.V, 2) - teacher).pow(2).mean()
    d.fit()
    after = (run(d.student, PredictionType.V, 2) - teacher).pow(2).mean()
    assert after < 0.5 * before, (before, after)
