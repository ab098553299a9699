"""A run folder's own files: checkpoints (``last.pt`` for resume, ``best.pt``, ``epoch_NNNN.pt``),
``data.json`` (the data it trained on) and ``.lock`` (the process that writes it).

Rank 0 writes each checkpoint through a temporary file and a rename, so a job killed mid-write
leaves the previous checkpoint intact. Resume looks for exactly ``RUN_DIR/last.pt``: the name
the trainer writes is the name it reads (a test kills a run and resumes it through this path).

A checkpoint holds tensors and plain data only (dicts, lists, tuples, str, int, float, bool,
None; the random generators' states converted to those) and is read with
``torch.load(weights_only=True)``: a file holding any other object is refused, because unpickling
an arbitrary object can run code (a ``best.pt`` copied from elsewhere is a program otherwise).
Checkpoints of earlier versions kept numpy's generator state as a numpy array: the few numpy
globals that rebuild an array or a scalar are allowed, so they still load (they build data, never
call anything else).

The lock: ``.lock`` is created with O_CREAT|O_EXCL by the one process that trains in the folder
(rank 0), holding its host, PID, start time and SLURM job, and removed when the run ends. A
second start is refused while the holder lives; a lock whose holder is gone is taken over, with a
warning. "Gone": on this host, its PID is not running; on another host, it belongs to this SLURM
job (a requeued job restarts on any node, its predecessor is dead: SLURM runs a job once at a
time), or squeue no longer knows its SLURM job, or it was not refreshed for LOCK_STALE_S (the
holder touches it every LOCK_REFRESH_S while it trains).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from hpa_scc.utils.fileio import atomic_path, write_text_atomic

log = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.pt"
# Written by rank 0 after it saved last.pt on a stop signal; the batch script reads it (a launcher
# such as torchrun may exit 1 although the workers saved and exited 75).
PREEMPTED_FILE = "preempted.json"
DATA_FILE = "data.json"  # the digest of the COCO folds the run trains (and validates) on
LOCK_FILE = ".lock"
EPOCH_PATTERN = "epoch_*.pt"


def epoch_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}.pt"


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


# ----------------------------------------------------------------------------------------------
# Random generators, as plain data

def rng_state() -> dict:
    """This process's generators; with CUDA also its current GPU's (proposal sampling runs there).
    numpy's key array is kept as an int64 tensor (a numpy array would need pickle to load)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)  # an array: an earlier version's
    np.random.set_state((name, keys.astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Saving and loading

def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    with atomic_path(path, ".pt") as tmp:
        torch.save(state, tmp)


def _numpy_globals() -> list:
    """What rebuilds a numpy array, dtype or scalar, under numpy 2's and numpy 1's module names:
    the RNG state and figures of checkpoints written before they were stored as plain data."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray

    allowed = [np.ndarray, np.dtype]
    # numpy >= 1.25 pickles a dtype as an instance of its class (UInt32DType for the RNG keys)
    codes = ("?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8")
    allowed += [type(np.dtype(code)) for code in codes]
    for name in ("_reconstruct", "scalar"):
        function = getattr(multiarray, name)
        allowed += [(function, f"numpy.{core}.multiarray.{name}") for core in ("_core", "core")]
    return allowed


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A project checkpoint (``{"model": state_dict, ...}``), read as plain data only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint {path}")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only met an object it will not build
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f"it holds {found[1].rstrip('.')}" if found else str(exc).strip().splitlines()[0][:200]
        raise ValueError(f"{path} is not a plain-data checkpoint ({what}); it is not loaded, since unpickling it "
                         "could run code: load only files you trust, written by this project's train") from None
    except Exception as exc:  # torch raises many kinds for a damaged file ([Errno 22], EOFError, zip errors)
        detail = (str(exc).strip().splitlines() or [""])[0][:200]
        raise OSError(f"{path} is truncated or not a checkpoint ({type(exc).__name__}: {detail}); delete it to "
                      "start over, or point to another") from None


FAMILY_NAMES = {"maskrcnn": "Mask R-CNN", "cell": "cell model", "features": "features model"}


def checkpoint_model(state: dict) -> tuple[str | None, str | None]:
    """(family, backbone) a checkpoint was trained as: its own record, else its config's (older files)."""
    model = (state.get("config") or {}).get("model") or {}
    return state.get("family") or model.get("family"), model.get("backbone")


def check_model(state: dict, path: str | os.PathLike, family: str, backbone: str, fix: str) -> None:
    """Refuse the checkpoint ``state`` (from ``path``) unless it holds a ``family``/``backbone``
    model: one line naming both, and ``fix``, instead of torch's list of hundreds of key names."""
    saved_family, saved_backbone = checkpoint_model(state)
    if saved_family and saved_family != family:
        raise ValueError(f"{path} holds a {FAMILY_NAMES.get(saved_family, saved_family)} (family {saved_family}), "
                         f"this run is {family}: {fix}")
    if family != "features" and saved_backbone and backbone and saved_backbone != backbone:
        raise ValueError(f"{path} holds a {family} {saved_backbone} model, this run is {family} {backbone}: {fix}")


def load_model_state(model: torch.nn.Module, state: dict, path: str | os.PathLike, family: str, backbone: str,
                     fix: str) -> None:
    """``state["model"]`` into ``model`` (a ``family``/``backbone`` model) after ``check_model``; a
    state dict that still does not fit is named in one line too (counts and one example)."""
    check_model(state, path, family, backbone, fix)
    own, saved = model.state_dict(), state["model"]
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    sized_by_state = getattr(model, "STATE_SIZED", ())  # tables whose sizes the fit chose (boosted trees)
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in saved.items()
              if k in own and k not in sized_by_state and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        example = (shapes or unexpected or missing)[0]
        raise ValueError(f"{path} does not fit this {family} {backbone} model ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected, {len(shapes)} of another shape, e.g. {example}): {fix}")
    model.load_state_dict(saved)


# ----------------------------------------------------------------------------------------------
# The data a run trained on

def read_data_record(run_dir: str | os.PathLike) -> dict | None:
    """RUN_DIR/data.json ({"labels", "train": {fold: digest}, "val": ...}), None when absent."""
    path = Path(run_dir) / DATA_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:  # cut short: treated as absent, rewritten by this start
        return None


def write_data_record(run_dir: str | os.PathLike, record: dict) -> None:
    write_text_atomic(Path(run_dir) / DATA_FILE, json.dumps(record, sort_keys=True) + "\n")


def changed_folds(old: dict | None, new: dict) -> list[str]:
    """'fold0 (train)', 'fold1 (val)': the folds whose digest differs between two data records."""
    from hpa_scc.utils.provenance import changed

    old = old or {}
    return [f"{fold} ({part})" for part in ("train", "val")
            for fold in changed(old.get(part), new.get(part) or {})]


# ----------------------------------------------------------------------------------------------
# The run folder's lock

LOCK_REFRESH_S = 60  # how often the holder touches its lock while it trains
LOCK_STALE_S = 24 * 3600  # another host's lock untouched this long: its holder is gone
_UNREADABLE_GRACE_S = 600  # an empty/damaged lock this young may be one being written: held


class RunFolderLocked(RuntimeError):
    """Another process trains in this run folder."""


def _holder_text(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"host {holder.get('host')}, PID {holder.get('pid')}, since {holder.get('since')}{job}"


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _slurm_job_gone(job_id: str) -> bool:
    """True only when squeue answers that it does not know ``job_id`` (ended some minutes ago);
    False when there is no squeue or it does not answer (then the lock's age decides)."""
    squeue = shutil.which("squeue")
    if not squeue:
        return False
    try:
        out = subprocess.run([squeue, "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    if out.returncode == 0:
        return out.stdout.strip() == ""
    return "invalid job id" in (out.stderr + out.stdout).lower()


def _stale(holder: dict | None, path: Path) -> str | None:
    """Why the lock at ``path`` (its record ``holder``) belongs to no live run, or None if it may."""
    age = time.time() - path.stat().st_mtime
    if holder is None:
        return f"an unreadable lock {age / 60:.0f} min old" if age > _UNREADABLE_GRACE_S else None
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname():
        return None if isinstance(pid, int) and _pid_running(pid) else f"PID {pid} is not running on this host"
    job = os.environ.get("SLURM_JOB_ID")
    if job and str(holder.get("slurm_job_id")) == job:
        return f"an earlier run of this SLURM job ({job}), requeued"
    if holder.get("slurm_job_id") and _slurm_job_gone(holder["slurm_job_id"]):
        return f"SLURM job {holder['slurm_job_id']} has ended"
    if age > LOCK_STALE_S:
        return f"not refreshed for {age / 3600:.0f} h"
    return None


def _read_holder(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


class RunLock:
    """RUN_DIR/.lock for as long as one run trains there; see the module docstring for the rules."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.token = uuid.uuid4().hex
        self.held = False
        self._touched = 0.0

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                  "token": self.token}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = _read_holder(self.path)
                    why = _stale(holder, self.path)
                except FileNotFoundError:  # released meanwhile: try again
                    continue
                if why is None:
                    raise RunFolderLocked(
                        f"{self.run_dir} is in use by another training run ({_holder_text(holder or {})}); wait for "
                        f"it to end or use another train.run_dir (if no run uses the folder, delete {self.path})"
                    ) from None
                log.warning("taking over %s: %s (%s)", self.path, why, _holder_text(holder or {}))
                self._remove_if(holder)
                continue
            with os.fdopen(fd, "w") as fh:  # one small write: a reader sees the whole record or an empty file
                fh.write(json.dumps(record) + "\n")
            self.held, self._touched = True, time.monotonic()
            return self
        raise RunFolderLocked(f"{self.run_dir}: another start took {self.path} at the same moment; use another "
                              "train.run_dir")

    def _remove_if(self, holder: dict | None) -> None:
        """Remove the lock if it still holds ``holder``'s record (a start that took it over in the
        meantime keeps its own)."""
        try:
            if _read_holder(self.path) == holder:
                self.path.unlink()
        except FileNotFoundError:
            pass

    def refresh(self) -> None:
        """Touch the lock (at most every LOCK_REFRESH_S): another host sees the holder alive."""
        if self.held and time.monotonic() - self._touched >= LOCK_REFRESH_S:
            self._touched = time.monotonic()
            try:
                os.utime(self.path)
            except FileNotFoundError:
                log.warning("%s was removed while this run trains in %s", self.path, self.run_dir)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = _read_holder(self.path) if self.path.is_file() else None
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        elif holder is not None:
            log.warning("%s was taken over by %s while this run trained; left to it", self.path, _holder_text(holder))
