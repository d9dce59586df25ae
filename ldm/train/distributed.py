"""torchrun / torch.distributed helpers: one process per device, NCCL on GPUs, Gloo on CPUs."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes checkpoints, logs and images."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when gradients must be averaged across processes."""
        return self.world_size > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> this rank's GPU if there is one, else the CPU."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from ldm.config import ConfigError
        raise ConfigError("run.device=cuda but no CUDA device is available; use run.device=cpu or auto")
    return torch.device("cuda", local_rank)


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join the torchrun job described by RANK/WORLD_SIZE/LOCAL_RANK (read here, not at import)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(device=pick_device(device_name))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank, world_size, local_rank, device)


def shutdown(info: DistInfo) -> None:
    """Leave the process group (so torchrun sees a clean exit)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean over ranks (a no-op in a single process)."""
    if info.enabled:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        tensor /= info.world_size
    return tensor


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True if `flag` holds on any rank (e.g. a NaN seen on one rank stops all)."""
    if not info.enabled:
        return flag
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def barrier(info: DistInfo) -> None:
    """Wait for every rank (e.g. until rank 0 has written a checkpoint)."""
    if info.enabled:
        dist.barrier()


def wrap_ddp(module: nn.Module, info: DistInfo, find_unused: bool = False) -> DistributedDataParallel | None:
    """DistributedDataParallel over `module`'s trainable weights when distributed (else None):
    gradients are averaged in buckets while the backward still runs.

    The caller keeps `module` itself for state dicts (no "module." prefix), EMA and sampling;
    only the training forward goes through the wrapper. find_unused: some trainable weights
    may get no gradient in a step (costs a graph walk per step).
    """
    if not info.enabled:
        return None
    return DistributedDataParallel(
        module, device_ids=[info.device] if info.device.type == "cuda" else None,
        # nothing like BatchNorm statistics to keep in step, and the weights start equal
        broadcast_buffers=False, find_unused_parameters=find_unused,
        gradient_as_bucket_view=True)  # the grads live in the buckets: no second copy
