"""What the loop steps with: the per-epoch sampler (resumable mid-epoch), the training loader,
the optimiser and the learning-rate schedule (warm-up, then cosine or steps)."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Sampler

from hpa_scc.config import Config
from hpa_scc.data.instances import collate


class EpochSampler(Sampler[int]):
    """This rank's share of a per-epoch shuffle, optionally skipping the first ``skip`` items.

    The permutation depends only on (seed, epoch), so a resumed epoch replays the same order
    and skips exactly the samples already trained on. Padded by wrapping so every rank gets
    the same number of samples (as DistributedSampler does).
    """

    def __init__(self, n: int, *, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        self.n, self.seed, self.rank, self.world_size, self.shuffle = n, seed, rank, world_size, shuffle
        self.epoch, self.skip = 0, 0
        self.per_rank = math.ceil(n / world_size)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        order += order[: self.per_rank * self.world_size - self.n]
        return order[self.rank:: self.world_size][self.skip:]

    def __iter__(self):
        return iter(self._indices())

    def __len__(self) -> int:
        return max(self.per_rank - self.skip, 0)


def lr_lambda(cfg: Config, iters_per_epoch: int):
    """Multiplier of the base lr at optimizer step ``it``: linear warm-up, then cosine or steps."""
    total = max(cfg.train.max_epochs * iters_per_epoch, 1)
    warmup, factor = cfg.optim.warmup_iters, cfg.optim.warmup_factor
    milestones = [m * iters_per_epoch for m in cfg.optim.step_milestones]

    def multiplier(it: int) -> float:
        scale = 1.0
        if it < warmup:
            scale = factor + (1 - factor) * it / warmup
        if cfg.optim.schedule == "cosine":
            return scale * 0.5 * (1 + math.cos(math.pi * min(it, total) / total))
        return scale * cfg.optim.step_gamma ** sum(it >= m for m in milestones)

    return multiplier


def make_loader(dataset, batch_size: int, workers: int, device: torch.device, sampler=None,
                collate_fn=collate) -> DataLoader:
    """The training DataLoader: pinned memory on CUDA (async copies), workers kept alive across
    epochs (no re-spawn per epoch) and four batches prefetched per worker."""
    kw = {"collate_fn": collate_fn, "num_workers": workers, "pin_memory": device.type == "cuda",
          "persistent_workers": workers > 0}
    if workers > 0:
        kw["prefetch_factor"] = 4
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **kw)


def build_optimizer(cfg: Config, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"  # one kernel for the whole update instead of several per tensor
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay,
                               fused=fused or None)
    return torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=fused or None)
