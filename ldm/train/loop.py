"""The training loop shared by both stages: accumulation, mixed precision, clipping, EMA,
gradient averaging across ranks, NaN stop, atomic checkpoints and exact resume.

A stage is a `Task` (ldm/train/vae.py, ldm/train/ldm.py): it owns its networks and losses
and says which parameters each optimizer trains; this loop owns everything else. Randomness
is re-derived from (seed, step) at every step and augmentations from the data position, so a
resumed run draws exactly the numbers the uninterrupted run would have drawn. Per-sample draws
(noise, timesteps) are made for the whole global batch on every rank and each rank keeps its
slice, so a run on N ranks sees the same numbers as a run on one.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.parallel import DistributedDataParallel

from ldm.config import ConfigError
from ldm.errors import LdmError
from ldm.train.config import EMAConfig, RunConfig
from ldm.train.distributed import DistInfo, any_rank
from ldm.train.ema import EMA
from ldm.train.report import MetricsLog, plot_curves
from ldm.train.state import ResumeError, find_checkpoint, load_state, save_state, split_prefix

log = logging.getLogger(__name__)

_BUCKET_ELEMENTS = 1 << 24  # all-reduce gradients in ~64 MB fp32 buckets


class TrainingDiverged(LdmError):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


@dataclass
class OptimGroup:
    """One optimizer with its schedule over a set of parameters (e.g. generator, discriminator)."""
    name: str
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    clip: float = 0.0
    # The DistributedDataParallel wrapper whose backward already averages these gradients
    # (overlapped with the backward); None: the loop all-reduces them after the micro-steps.
    ddp: DistributedDataParallel | None = None


class Task(Protocol):
    """What a training stage provides to the loop."""
    title: str
    export_name: str

    def modules(self) -> dict[str, nn.Module]: ...            # all checkpointed state
    def ema_target(self) -> nn.Module | None: ...              # what EMA averages
    def groups(self) -> list[OptimGroup]: ...
    def start(self, batch: Any, ctx: "StepContext") -> None: ...  # fresh run, first batch
    def micro_step(self, batch: Any, step: int, ctx: "StepContext") -> dict[str, Tensor]: ...
    def extra_state(self) -> dict[str, Any]: ...
    def load_extra_state(self, state: dict[str, Any]) -> None: ...
    def export(self, path: Path, ema: EMA | None) -> None: ...
    def log_images(self, directory: Path, step: int, ema: EMA | None) -> None: ...


@dataclass
class StepContext:
    """Per-process facilities a task uses inside a micro-step."""
    device: torch.device
    info: DistInfo
    precision: str
    accum: int
    generator: torch.Generator                 # on `device`: noise, timesteps, posterior samples
    cpu_generator: torch.Generator             # host-side draws (e.g. which captions to drop)
    scaler: torch.amp.GradScaler | None = None
    channels_last: bool = False

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on CPU/CUDA, fp16 on CUDA, nothing for fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def backward(self, loss: Tensor, params: list[nn.Parameter]) -> None:
        """Accumulate d(loss / accum)/d(params) only (other leaves' grads untouched)."""
        loss = loss / self.accum
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        torch.autograd.backward(loss, inputs=[p for p in params if p.requires_grad])

    def _global(self, draw: Callable[..., Tensor], local_shape: tuple[int, ...], **kwargs: Any) -> Tensor:
        """Draw for the global batch (same on every rank), keep this rank's rows."""
        n, rank = local_shape[0], self.info.rank
        full = draw((n * self.info.world_size, *local_shape[1:]), **kwargs)
        return full[rank * n:(rank + 1) * n]

    def randn(self, *local_shape: int) -> Tensor:
        """Standard normal noise for this rank's samples, on the device."""
        return self._global(torch.randn, local_shape, generator=self.generator, device=self.device)

    def randint(self, high: int, n: int) -> Tensor:
        """Integers in [0, high) for this rank's n samples (e.g. timesteps), on the device."""
        return self._global(lambda shape, **kw: torch.randint(0, high, shape, **kw), (n,),
                            generator=self.generator, device=self.device)

    def sample_posterior(self, posterior: Any) -> Tensor:
        """z = mean + std * noise from a DiagonalGaussian, with this step's global-batch noise."""
        return posterior.mean + posterior.std * self.randn(*posterior.mean.shape)

    def rand_cpu(self, n: int) -> Tensor:
        """Uniform [0, 1) numbers for this rank's n samples, on the host."""
        return self._global(torch.rand, (n,), generator=self.cpu_generator)

    def to_device(self, images: Tensor) -> Tensor:
        """Move a batch of images, in channels_last when the run asks for it."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return images.to(self.device, non_blocking=True).contiguous(memory_format=fmt)


def step_seed(seed: int, step: int) -> int:
    """The seed of the randomness of one step (noise, timesteps, dropout...)."""
    return (seed * 1_000_003 + step) % (2 ** 63)


def average_gradients(params: list[nn.Parameter], info: DistInfo) -> None:
    """All-reduce-mean the gradients over ranks in flat buckets (what DDP's reducer does)."""
    if not info.enabled:
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[Tensor] = []
    size = 0
    for i, p in enumerate(params):
        bucket.append(p.grad)
        size += p.numel()
        if size >= _BUCKET_ELEMENTS or i == len(params) - 1:
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat)
            flat /= info.world_size
            for grad, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                grad.copy_(reduced)
            bucket, size = [], 0


def broadcast_parameters(modules: dict[str, nn.Module], info: DistInfo) -> None:
    """Make every rank start from rank 0's weights and buffers."""
    if not info.enabled:
        return
    for module in modules.values():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


@dataclass
class Trainer:
    """Runs a Task for run.steps optimizer steps, writing under `out` (rank 0 only)."""
    task: Task
    run: RunConfig
    ema_config: EMAConfig
    info: DistInfo
    out: Path
    config_dict: dict[str, Any]
    batches_from: Callable[[int], Iterator[Any]]   # data position (micro-batches) -> iterator
    resume: str | None = None
    step: int = 0
    data_position: int = 0
    ema: EMA | None = None
    metrics: MetricsLog | None = None
    _window: dict[str, Tensor] = field(default_factory=dict)
    _window_steps: int = 0

    def __post_init__(self) -> None:
        device = self.info.device
        if self.run.precision == "fp16" and device.type != "cuda":
            raise ConfigError("run.precision=fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
        self.scaler = torch.amp.GradScaler("cuda") if self.run.precision == "fp16" else None
        self.ctx = StepContext(device, self.info, self.run.precision, self.run.grad_accum,
                               torch.Generator(device=device), torch.Generator(), self.scaler, self.run.channels_last)
        self.groups = self.task.groups()
        target = self.task.ema_target()
        if self.ema_config.enabled and target is not None:
            self.ema = EMA(target, self.ema_config.decay, self.ema_config.warmup)
        resume_step = None
        if self.resume:
            self._load(find_checkpoint(self.resume))
            resume_step = self.step
        broadcast_parameters(self.task.modules(), self.info)
        if self.info.is_main:
            self.metrics = MetricsLog(self.out / "metrics.jsonl", resume_step)

    # --- checkpoints -------------------------------------------------------------------
    def _weights(self) -> dict[str, Tensor]:
        tensors = {}
        for name, module in self.task.modules().items():
            tensors.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        return tensors

    def save(self) -> None:
        """Rank 0: training state (atomic directory) then the exported model file."""
        if not self.info.is_main:
            return
        trainer = {
            "step": self.step, "data_position": self.data_position,
            "optimizers": {g.name: g.optimizer.state_dict() for g in self.groups},
            "schedulers": {g.name: g.scheduler.state_dict() for g in self.groups},
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "task": self.task.extra_state(), "config": self.config_dict,
            "world_size": self.info.world_size,
        }
        save_state(self.out, self.step, self._weights(), trainer, self.run.keep_checkpoints)
        self.task.export(self.out / self.task.export_name, self.ema)
        if self.metrics is not None:
            plot_curves(self.metrics.rows, self.out / "loss_curves.png", self.task.title)

    def _load(self, directory: Path) -> None:
        weights, trainer = load_state(directory)
        try:
            self._restore(weights, trainer)
        except (RuntimeError, KeyError, ValueError) as err:
            detail = " ".join(str(err).split()) or type(err).__name__
            raise ResumeError(f"{directory} does not fit this run's config ({detail[:300]}); "
                              "resume without --config to reuse the run's own config") from None
        log.info("resumed from %s at step %d", directory, self.step)

    def _restore(self, weights: dict[str, Tensor], trainer: dict[str, Any]) -> None:
        for name, module in self.task.modules().items():
            module.load_state_dict(split_prefix(weights, name), strict=True)
        if self.ema is not None:
            self.ema.load_state_dict(split_prefix(weights, "ema"))
        for g in self.groups:
            g.optimizer.load_state_dict(trainer["optimizers"][g.name])
            g.scheduler.load_state_dict(trainer["schedulers"][g.name])
        if self.scaler is not None and trainer["scaler"]:
            self.scaler.load_state_dict(trainer["scaler"])
        self.task.load_extra_state(trainer["task"])
        self.step, self.data_position = int(trainer["step"]), int(trainer["data_position"])

    # --- one optimizer step --------------------------------------------------------------
    def _seed_step(self) -> None:
        seed = step_seed(self.run.seed, self.step)
        self.ctx.generator.manual_seed(seed)
        self.ctx.cpu_generator.manual_seed(seed)
        torch.manual_seed(seed)  # dropout and anything else using the global generator

    def _accumulating(self, more: bool) -> contextlib.AbstractContextManager:
        """While more micro-steps follow, DDP keeps gradients local (one all-reduce per step)."""
        stack = contextlib.ExitStack()
        if more:
            for g in self.groups:
                if g.ddp is not None:
                    stack.enter_context(g.ddp.no_sync())
        return stack

    def train_step(self, data: Iterator[Any]) -> dict[str, Tensor]:
        """Accumulate grad_accum micro-batches, average across ranks, clip, step, update EMA."""
        self._seed_step()
        for g in self.groups:
            g.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, Tensor] = {}
        for i in range(self.run.grad_accum):
            batch = next(data)
            self.data_position += 1
            with self._accumulating(i < self.run.grad_accum - 1):
                logs = self.task.micro_step(batch, self.step, self.ctx)
            for key, value in logs.items():
                totals[key] = totals.get(key, 0.0) + value.detach().float() / self.run.grad_accum
        for g in self.groups:
            if g.ddp is None:
                average_gradients(g.params, self.info)
            if self.scaler is not None:
                self.scaler.unscale_(g.optimizer)
            if g.clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(g.params, g.clip)
                totals[f"grad_norm_{g.name}"] = norm.detach().float()
            if self.scaler is not None:
                self.scaler.step(g.optimizer)
            else:
                g.optimizer.step()
            g.scheduler.step()
        if self.scaler is not None:
            self.scaler.update()
        self.step += 1
        every = self.ema_config.every
        if self.ema is not None and self.step > self.ema_config.start_step and self.step % every == 0:
            self.ema.update(self.task.ema_target(), every)
        return totals

    def _check_finite(self, logs: dict[str, Tensor]) -> None:
        bad = [k for k, v in logs.items() if k.startswith("loss") and not torch.isfinite(v).all()]
        if any_rank(bool(bad), self.info, self.info.device):
            raise TrainingDiverged(
                f"loss became NaN/inf at step {self.step} ({', '.join(bad) or 'on another rank'}); "
                f"stopped; the last good checkpoint is in {self.out / 'checkpoints'}")

    def _log(self, logs: dict[str, Tensor], rate: float, bar: Any) -> None:
        for key, value in logs.items():
            self._window[key] = self._window.get(key, 0.0) + value
        self._window_steps += 1
        if self.step % self.run.log_every and self.step != self.run.steps:
            return
        n, self._window_steps = self._window_steps, 0
        row = {"step": self.step, **{k: float(v) / n for k, v in self._window.items()},
               "lr": self.groups[0].scheduler.get_last_lr()[0], "steps_per_s": rate}
        self._window = {}
        if self.metrics is not None:
            self.metrics.append(row)
        if bar is not None:
            bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4g}", refresh=False)

    def fit(self) -> None:
        """Train until run.steps, checkpointing every run.checkpoint_every steps and at the end."""
        data = self.batches_from(self.data_position)
        if self.step == 0:
            first = next(data)
            self._seed_step()
            self.task.start(first, self.ctx)
            data = self.batches_from(self.data_position)  # the first batch is also trained on
        bar = None
        if self.info.is_main and self.run.progress:
            from tqdm import tqdm
            bar = tqdm(total=self.run.steps, initial=self.step, desc=self.task.title,
                       unit="step", dynamic_ncols=True)
        check_every = 1 if self.info.device.type == "cpu" else self.run.log_every
        last = time.perf_counter()
        rate = 0.0
        while self.step < self.run.steps:
            logs = self.train_step(data)
            now = time.perf_counter()
            rate = 0.9 * rate + 0.1 / max(now - last, 1e-9) if rate else 1.0 / max(now - last, 1e-9)
            last = now
            due = self.step % self.run.checkpoint_every == 0 or self.step == self.run.steps
            if due or self.step % check_every == 0:
                self._check_finite(logs)  # before any save: a NaN never reaches disk
            self._log(logs, rate, bar)
            if bar is not None:
                bar.update(1)
            if due:
                self.save()
            if (self.info.is_main and self.run.image_every
                    and (self.step % self.run.image_every == 0 or self.step == self.run.steps)):
                self.task.log_images(self.out / "images", self.step, self.ema)
        if bar is not None:
            bar.close()
