"""One process or many, and on which device: decided only here, from the launcher's environment.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE; ``srun`` sets SLURM_PROCID /
SLURM_NTASKS / SLURM_LOCALID / SLURM_NTASKS_PER_NODE (then MASTER_ADDR / MASTER_PORT must be
exported by the batch script). With none of them, training runs as a single process.
``launcher_env`` is the only reader of those variables and ``join_group`` the only place a
process group is made (both engines; ``train.dist_timeout_min`` bounds every collective).
A device setting is read by ``hpa_scc.utils.device`` alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # processes on this node

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return default


def launcher_env() -> DistInfo:
    """This process's place among the launcher's processes (one process when there is no launcher)."""
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    return DistInfo(rank=_env_int("RANK", "SLURM_PROCID", default=0), world_size=world,
                    local_rank=_env_int("LOCAL_RANK", "SLURM_LOCALID", default=0),
                    local_world_size=_env_int("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", default=world))


def join_group(info: DistInfo, device_kind: str, timeout_min: int) -> None:
    """Join the process group ``info`` describes, once: NCCL on CUDA, else gloo."""
    if info.distributed and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo", rank=info.rank,
                                world_size=info.world_size, timeout=timedelta(minutes=timeout_min))


def init_distributed(device: torch.device, timeout_min: int = 60) -> DistInfo:
    """Join the process group if the environment asks for one; NCCL on CUDA, else gloo.
    ``timeout_min`` bounds every collective (see train.dist_timeout_min)."""
    info = launcher_env()
    join_group(info, device.type, timeout_min)
    return info


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def collective_device(device: torch.device) -> torch.device:
    """Where a collective's tensor must live: NCCL reduces only CUDA tensors, gloo CPU ones."""
    return device if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")


def mean_across_ranks(values: dict[str, float], info: DistInfo, device: torch.device) -> dict[str, float]:
    """Average a dict of floats over all ranks (identity for one process); ``device`` is the
    rank's training device (the tensor goes there under NCCL)."""
    if not info.distributed or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=collective_device(device))
    dist.all_reduce(tensor)
    return {k: float(v) / info.world_size for k, v in zip(keys, tensor, strict=True)}


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` for one process)."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
