"""Checkpoints: ``last.pt`` (resume), ``best.pt`` (best validation), ``epoch_NNNN.pt``.

Rank 0 writes each through a temporary file and a rename, so a job killed mid-write leaves the
previous checkpoint intact. Resume looks for exactly ``RUN_DIR/last.pt``: the name the trainer
writes is the name it reads (a test kills a run and resumes it through this path).
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import numpy as np
import torch

from hpa_scc.utils.fileio import atomic_path

LAST = "last.pt"
BEST = "best.pt"
# Written by rank 0 after it saved last.pt on a stop signal; the batch script reads it (a launcher
# such as torchrun may exit 1 although the workers saved and exited 75).
PREEMPTED_FILE = "preempted.json"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel (its state dict has no 'module.' prefix)."""
    return model.module if hasattr(model, "module") else model


def weights_digest(model: torch.nn.Module) -> str:
    """A short hash of the model's parameters: equal on every rank of a correct DDP run. (Buffers
    are left out: BatchNorm running statistics are each rank's own after its last forward.)"""
    digest = hashlib.sha1()
    for name, tensor in sorted(unwrap(model).named_parameters()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def rng_state() -> dict:
    """This process's generators; with CUDA also its current GPU's (proposal sampling runs there)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    with atomic_path(path, ".pt") as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many kinds for a damaged file
        raise OSError(f"cannot load checkpoint {path}: {exc}; delete it to start over, or point to another") from None
