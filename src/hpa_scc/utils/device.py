"""The one reader of a device setting (``train.device``, predict's and refine's ``--device``):
``auto`` means CUDA when one is visible, else the CPU. torch is imported only when a device is
resolved: the config checks a name here without it."""

from __future__ import annotations

import re


def device_type(name: str) -> str:
    """'cuda' or 'cpu': what a device setting asks for (auto: CUDA when one is visible)."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if str(name).startswith("cuda") else "cpu"


DEVICES = ("auto", "cpu", "cuda", "cuda:N")


def is_device_name(name: str) -> bool:
    """Whether ``name`` is one of DEVICES (checked by the config too, before any run starts)."""
    return re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(name)) is not None


def pick_device(name: str, key: str = "train.device"):
    """The torch device ``name`` asks for (one of DEVICES; auto: cuda when one is visible), with a
    one-line error naming ``key`` (predict's and refine's --device read the same names)."""
    import torch

    if name == "auto":
        name = device_type(name)
    if not is_device_name(name):
        raise ValueError(f"{key}={name!r} is not a device here; choose one of {', '.join(DEVICES)}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"{key}={name} but no CUDA device is visible; use {key}=cpu or auto")
        index, count = int(name.partition(":")[2] or 0), torch.cuda.device_count()
        if index >= count:
            raise ValueError(f"{key}={name} but {count} CUDA device(s) are visible: use cuda:0 to cuda:{count - 1}")
    return torch.device(name)
