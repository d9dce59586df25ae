"""Progressive distillation (Salimans & Ho 2022, algorithm 2) of a text-conditioned latent U-Net.

Each round trains a student, initialised from its teacher and read as a v-prediction model, to
match two deterministic DDIM steps of the teacher with one of its own; the next round's teacher
is that student, so the steps halve per round (e.g. 64 -> 32 -> ... -> 4). Classifier-free
guidance is distilled as Meng et al. 2023 do, at one fixed scale: the first teacher is the
guided model (one [uncond; cond] pass combined as uncond + w (cond - uncond)); students are
plain conditional models that already carry that guidance, so later teachers run unguided.

Grids: the student of N steps visits SD's `trailing` timesteps (round(T - k T / N) - 1, always
starting at T - 1) and steps finally to alpha_bar[0], exactly what
`sample_ddim(..., steps=N, spacing="trailing")` does; the grid of 2N steps contains the grid of
N at every other point, so the teacher's two steps start and end where the student's one does.

Randomness (data rows, timesteps, noise) is drawn from a generator seeded by (seed, global
step), and checkpoints (ldm.train.state: atomic directories) hold student, teacher and the
optimizer, so a resumed run continues exactly as the uninterrupted one.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.diffusion.schedule import Schedule
from ldm.diffusion.timesteps import spaced_timesteps
from ldm.prediction import PredictionType, combine_guidance, to_x0_eps
from ldm.train.loop import step_seed
from ldm.train.state import ResumeError, find_checkpoint, load_state, save_state, split_prefix

log = logging.getLogger(__name__)

# (generator, batch size) -> (clean latents x0 [B,C,H,W], contexts [B,L,D])
DataFn = Callable[[torch.Generator, int], tuple[Tensor, Tensor]]
RoundEnd = Callable[[int, nn.Module], None]  # (student steps, student) at the end of a round


LR_DECAYS = ("linear", "constant")


@dataclass
class DistillConfig:
    """A progressive distillation run; guidance_scale is the first teacher's fixed CFG scale."""
    teacher_steps: int = 64
    final_steps: int = 4
    iterations: int = 1000          # optimizer steps per round
    batch_size: int = 32
    lr: float = 1e-4
    guidance_scale: float = 1.0
    # "linear": the learning rate falls from lr to 0 within each round, so the student handed to
    # the next round (and shipped) is a settled one, not a point on a noisy constant-rate path.
    lr_decay: str = "linear"
    seed: int = 0
    checkpoint_every: int = 250
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        n = self.teacher_steps
        if self.final_steps < 1 or n <= self.final_steps or n % self.final_steps \
                or (n // self.final_steps) & (n // self.final_steps - 1):
            raise ValueError(f"teacher_steps {n} must be final_steps {self.final_steps} times a "
                             "power of two (> 1): each round halves the steps")
        for name in ("iterations", "batch_size", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or not self.guidance_scale >= 0:
            raise ValueError("need lr > 0 and guidance_scale >= 0")
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay must be one of {', '.join(LR_DECAYS)}, got {self.lr_decay!r}")

    def lr_at(self, k: int) -> float:
        """The learning rate of step k (0-based) of a round."""
        if self.lr_decay == "linear":
            return self.lr * (1.0 - k / self.iterations)
        return self.lr

    def student_steps(self) -> list[int]:
        """The student's steps per round: teacher_steps / 2, / 4, ..., final_steps."""
        steps, out = self.teacher_steps, []
        while steps > self.final_steps:
            steps //= 2
            out.append(steps)
        return out


def grid_levels(schedule: Schedule, steps: int) -> tuple[Tensor, Tensor]:
    """(timesteps [steps] int64 descending, alpha_bar [steps + 1] float64) of the trailing DDIM
    grid, the last alpha_bar being alpha_bar[0] where sample_ddim's last step lands."""
    t = spaced_timesteps(schedule.num_timesteps, steps, "trailing")
    abar = schedule.alphas_cumprod
    return t, torch.cat([abar[t], abar[:1]])


def teacher_plan(schedule: Schedule, student_steps: int) -> tuple[Tensor, Tensor, Tensor]:
    """(student timesteps [N], teacher midpoint timesteps [N], alpha_bar [N, 3] at start, middle, end)."""
    t_s, abar_s = grid_levels(schedule, student_steps)
    t_t, abar_t = grid_levels(schedule, 2 * student_steps)
    if not torch.equal(t_t[0::2], t_s):
        raise ValueError(f"the {2 * student_steps}-step grid does not contain the "
                         f"{student_steps}-step grid")
    abar = torch.stack([abar_t[0:-1:2], abar_t[1::2], abar_t[2::2]], dim=1)
    assert torch.equal(abar[:, 0], abar_s[:-1]) and torch.equal(abar[:, 2], abar_s[1:])
    return t_s, t_t[1::2], abar


def _col(v: Tensor, like: Tensor) -> Tensor:
    return v.to(like.device, torch.float32)[:, None, None, None]


class Distiller:
    """Runs every round of a DistillConfig over `data`, checkpointing under `out`."""

    def __init__(self, unet: nn.Module, schedule: Schedule, teacher_type: PredictionType,
                 uncond: Tensor, data: DataFn, config: DistillConfig, out: Path,
                 resume: str | Path | None = None, on_round_end: RoundEnd | None = None) -> None:
        self.config, self.schedule, self.data, self.out = config, schedule, data, Path(out)
        self.teacher_type, self.uncond, self.on_round_end = teacher_type, uncond, on_round_end
        self.rounds = config.student_steps()
        self.total = len(self.rounds) * config.iterations
        self.student = copy.deepcopy(unet).float().train().requires_grad_(True)
        self.teacher = copy.deepcopy(unet).float().eval().requires_grad_(False)
        self.optimizer = self._optimizer()
        self.step = 0
        if resume is not None:
            self._load(find_checkpoint(resume))

    def _optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.student.parameters(), lr=self.config.lr)

    def _load(self, directory: Path) -> None:
        weights, trainer = load_state(directory)
        saved = trainer.get("distill_config")
        if saved is not None:  # a checkpoint without lr_decay comes from a constant-rate run
            saved = {"lr_decay": "constant", **saved}
        if saved != asdict(self.config):
            raise ResumeError(f"{directory} was written by a run with another distillation config")
        try:
            self.student.load_state_dict(split_prefix(weights, "student"), strict=True)
            self.teacher.load_state_dict(split_prefix(weights, "teacher"), strict=True)
            self.optimizer.load_state_dict(trainer["optimizer"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise ResumeError(f"{directory} does not fit this model ({str(err)[:200]})") from None
        self.step = int(trainer["step"])

    def save(self) -> Path:
        """One atomic training checkpoint at the current global step."""
        weights = {f"student.{k}": v for k, v in self.student.state_dict().items()}
        weights.update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
        trainer = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                   "distill_config": asdict(self.config)}
        return save_state(self.out, self.step, weights, trainer, self.config.keep_checkpoints)

    def teacher_x0(self, z: Tensor, t: Tensor, context: Tensor, round_index: int) -> Tensor:
        """The teacher's denoised estimate; the first round's teacher is the guided model."""
        a, s = (_col(v, z) for v in self.levels(t))
        if round_index == 0 and self.config.guidance_scale != 1.0:
            uncond = self.uncond.expand_as(context)
            out = self.teacher(torch.cat([z, z]), torch.cat([t, t]), torch.cat([uncond, context]))
            out = combine_guidance(out, self.config.guidance_scale)
            kind = self.teacher_type
        else:
            out = self.teacher(z, t, context)
            kind = self.teacher_type if round_index == 0 else PredictionType.V
        return to_x0_eps(z, out, a, s, kind)[0]

    def levels(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(a, s) [B] float64 of integer timesteps."""
        abar = self.schedule.alphas_cumprod[t.cpu()]
        return abar.sqrt(), (1 - abar).sqrt()

    def targets(self, x0: Tensor, context: Tensor, round_index: int,
                generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(z_t, t, x_tilde, weight): the student's input, its timestep, the target that makes
        one DDIM step land where the teacher's two do, and max(SNR_t, 1) (algorithm 2)."""
        steps = self.rounds[round_index]
        t_s, t_mid, abar = teacher_plan(self.schedule, steps)
        i = torch.randint(0, steps, (x0.shape[0],), generator=generator)
        a0, a1, a2 = (_col(abar[i, k].sqrt(), x0) for k in range(3))     # start, middle, end
        s0, s1, s2 = (_col((1 - abar[i, k]).sqrt(), x0) for k in range(3))
        eps = torch.randn(x0.shape, generator=generator)
        z = a0 * x0 + s0 * eps
        with torch.no_grad():  # two DDIM (eta = 0) teacher steps: z' = a' x + (s' / s)(z - a x)
            x_hat = self.teacher_x0(z, t_s[i], context, round_index)
            z1 = a1 * x_hat + (s1 / s0) * (z - a0 * x_hat)
            x_hat = self.teacher_x0(z1, t_mid[i], context, round_index)
            z2 = a2 * x_hat + (s2 / s1) * (z1 - a1 * x_hat)
        # The x whose single DDIM step from z reaches z2: (z2 - (s2/s0) z) / (a2 - (s2/s0) a0)
        ratio = s2 / s0
        x_tilde = (z2 - ratio * z) / (a2 - ratio * a0)
        weight = torch.clamp(a0 ** 2 / s0 ** 2, min=1.0)                      # truncated SNR
        return z, t_s[i], x_tilde, weight

    def student_x0(self, z: Tensor, t: Tensor, context: Tensor) -> Tensor:
        """The student's denoised estimate, read as v-prediction."""
        a, s = (_col(v, z) for v in self.levels(t))
        return to_x0_eps(z, self.student(z, t, context), a, s, PredictionType.V)[0]

    def loss(self, x0: Tensor, context: Tensor, round_index: int,
             generator: torch.Generator) -> Tensor:
        """max(SNR, 1) |x_tilde - x_student(z_t)|^2, averaged."""
        z, t, x_tilde, weight = self.targets(x0, context, round_index, generator)
        return (weight * (self.student_x0(z, t, context) - x_tilde) ** 2).mean()

    def _begin_round(self, round_index: int) -> None:
        """The previous student becomes the teacher; a fresh optimizer for the new student."""
        if round_index > 0:
            self.teacher.load_state_dict(self.student.state_dict())
        self.optimizer = self._optimizer()
        log.info("round %d: %d -> %d steps", round_index, 2 * self.rounds[round_index],
                 self.rounds[round_index])

    def fit(self, stop_at: int | None = None, report: Callable[[int, float], None] | None = None) -> None:
        """Train to the end (or to global step `stop_at`, checkpointing there)."""
        end = self.total if stop_at is None else min(stop_at, self.total)
        iters = self.config.iterations
        while self.step < end:
            round_index, k = divmod(self.step, iters)
            if k == 0:
                self._begin_round(round_index)
            generator = torch.Generator().manual_seed(step_seed(self.config.seed, self.step))
            x0, context = self.data(generator, self.config.batch_size)
            for group in self.optimizer.param_groups:
                group["lr"] = self.config.lr_at(k)
            loss = self.loss(x0.float(), context.float(), round_index, generator)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"distillation loss became {loss.item()} at step "
                                         f"{self.step}; the last good checkpoint is kept")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step += 1
            if report is not None:
                report(self.step, loss.item())
            round_done = self.step % iters == 0
            if self.step % self.config.checkpoint_every == 0 or round_done or self.step == end:
                self.save()
            if round_done and self.on_round_end is not None:
                self.on_round_end(self.rounds[round_index], self.student)

    @torch.no_grad()
    def one_step_error(self, x0: Tensor, context: Tensor, round_index: int, seed: int = 0) -> float:
        """Mean squared distance between the student's one step and the teacher's two (x space)."""
        generator = torch.Generator().manual_seed(seed)
        z, t, x_tilde, _ = self.targets(x0.float(), context.float(), round_index, generator)
        return ((self.student_x0(z, t, context.float()) - x_tilde) ** 2).mean().item()
