"""The run folder, for both training engines: how a run starts, resumes, is locked, starts over,
records its data, logs its metrics, marks a preemption and ends.

    run = start_run(cfg)       # device and ranks, resume checks, the lock, then the folder's files
    ...                        # the engine trains (engine.train.fit, or engine.d2train)
    end_run(run)               # log and lock let go

The files themselves (checkpoints, data.json, .lock) are read and written by
``hpa_scc.utils.checkpoint``; this module holds the rules both engines follow: one resume check
(``check_resume``), one fresh start (``start_over``), one preemption marker (``mark_preempted``),
one status type (``Status``), one lock taker (``take_lock``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import torch
import yaml

from hpa_scc.config import RESUMABLE_CHANGES, Config, resume_changes, save_config, with_values
from hpa_scc.data.prepared import PreparedSet
from hpa_scc.engine.distributed import DistInfo, cleanup, gather_objects, init_distributed
from hpa_scc.utils.device import pick_device
from hpa_scc.utils.checkpoint import (BEST, DATA_FILE, EPOCH_PATTERN, LAST, PREEMPTED_FILE, RunFolderLocked, RunLock,
                                     changed_folds, read_data_record, write_data_record)
from hpa_scc.utils.fileio import sweep_stale_temps, write_text_atomic

log = logging.getLogger("hpa_scc.engine.train")

def _setup_logging(run_dir: Path, info: DistInfo) -> logging.Handler | None:
    """Rank 0 logs INFO to RUN_DIR/train.log (appending across resumes); other ranks warnings only."""
    root = logging.getLogger("hpa_scc")
    root.setLevel(logging.INFO if info.is_main else logging.WARNING)
    if not info.is_main:
        return None
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.addHandler(handler)
    return handler


class MetricsLog:
    """metrics.jsonl (+ TensorBoard when installed), written by rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.path, self.enabled, self.writer = run_dir / "metrics.jsonl", enabled, None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed; metrics go to metrics.jsonl only")

    def write(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"kind": kind, "step": step, "time": round(time.time(), 3), **values}) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{kind}/{k}", v, step)
            self.writer.flush()

    def drop_after(self, step: int) -> None:
        """On resume: remove the lines logged after ``step`` (the resumed checkpoint's global step).
        A run stopped without saving (Ctrl-C, a kill, a crash) had logged steps, an epoch line
        or a validation past its last.pt; the resumed run trains and logs those again, which
        wrote the same epoch twice. A line cut short by the kill goes too."""
        if not (self.enabled and self.path.is_file()):
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if _logged_by(line, step)]
        dropped = len(lines) - len(kept)
        if dropped:
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
            log.info("metrics.jsonl: %d line(s) logged after the checkpoint's step %d removed (trained again now)",
                     dropped, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The JSON lines of RUN_DIR/metrics.jsonl (a half-written last line of a live run is skipped).

    A detectron2-engine run logs detectron2's ``metrics.json`` instead: its rows come back in
    this project's form (``kind`` "train", ``step`` = iteration, ``loss`` = total_loss, the
    ``loss_*`` terms as they are).

    Read here, beside the writer of metrics.jsonl (``MetricsLog``), for visualize, the demo and
    notebooks alike.
    """
    path = Path(run_dir) / "metrics.jsonl"
    d2_path = Path(run_dir) / "metrics.json"
    if not path.is_file() and d2_path.is_file():
        path = d2_path
    if not path.is_file():
        raise FileNotFoundError(f"no {path}; is {run_dir} a training run folder?")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if path == d2_path:
        rows = [{"kind": "train", "step": r["iteration"], "loss": r["total_loss"],
                 **{k: v for k, v in r.items() if k.startswith("loss_")}}
                for r in rows if "iteration" in r and "total_loss" in r]
    return rows


def _logged_by(line: str, step: int) -> bool:
    """Whether a metrics.jsonl line is whole and logged at or before ``step``."""
    try:
        return json.loads(line)["step"] <= step
    except (ValueError, KeyError, TypeError):
        return False


class Status(str, Enum):
    """How a training call ended, for both engines. A ``str`` enum: it compares equal to its
    value ("finished", "preempted") in logs, tests and scripts."""

    FINISHED = "finished"
    PREEMPTED = "preempted"  # the last checkpoint holds the step it stopped at: run the same command to resume


FINISHED, PREEMPTED = Status.FINISHED, Status.PREEMPTED


@dataclass
class TrainResult:
    """How a ``train`` call ended. The ``train`` command turns PREEMPTED into exit status 75."""

    status: Status  # FINISHED, or PREEMPTED: last.pt holds the step it stopped at; run the same command to resume
    model: torch.nn.Module  # the trained model, unwrapped from DDP
    run_dir: Path
    epoch: int  # epochs finished (PREEMPTED: the epoch it stopped in)
    step_in_epoch: int = 0
    global_step: int = 0
    best_metric: float = -1.0  # best validation figure (VAL_METRIC); -1 without validation
    signal: int | None = None  # PREEMPTED: the signal that stopped it
    checkpoint: Path | None = None  # last.pt


@dataclass
class Run:
    """A started run: where it writes, which process of how many, on what device, from which set."""

    cfg: Config
    device: torch.device
    info: DistInfo
    prepared: PreparedSet
    run_dir: Path
    log_handler: logging.Handler | None
    data: dict | None = None  # data_record: what it trains on (data.json, and every checkpoint)
    lock: RunLock | None = None  # rank 0's hold on the run folder, released by end_run


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint, restored on resume."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best: float = -1.0


def start_run(cfg: Config) -> Run:
    """Device and ranks; the training size from the prepared set (before config.yaml records it);
    the checks of a resume (settings, data), then the run folder's lock (rank 0), and only then
    anything written there: an earlier run's files gone on a fresh start, config.yaml, data.json,
    train.log; seeds (``seed + rank``)."""
    device = pick_device(cfg.train.device)
    info = init_distributed(device, cfg.train.dist_timeout_min)
    if device.type == "cuda":
        torch.cuda.set_device(info.local_rank)
        device = torch.device("cuda", info.local_rank)
    prepared = PreparedSet(cfg.data.prepared_dir)
    cfg = with_values(cfg, data__image_size=prepared.check_size(cfg.data.image_size, "data.image_size"))
    run_dir = Path(cfg.train.run_dir)
    # rank 0 reads the COCO folds (GBs on a big set) for all: the ranks check the same record
    data = gather_objects(data_record(cfg, prepared, *split_folds(cfg, prepared)) if info.is_main else None, info)[0]
    allowed = check_resume(cfg, run_dir, data, "torchvision")  # before anything in the folder is touched
    lock = take_lock(run_dir, info)
    log_handler = None
    try:
        log_handler = _setup_logging(run_dir, info)
        if allowed and info.is_main:
            log.info("resuming with changed settings: %s",
                     ", ".join(f"{k} {a} -> {b}" for k, (a, b) in allowed.items()))
        if info.is_main:
            if not resumes(cfg, run_dir):
                start_over(run_dir, "torchvision")
            elif read_data_record(run_dir) is None:
                log.warning("%s has no %s (a run of an earlier version): the data it trained on cannot be checked; "
                            "recording the data it trains on from now", run_dir, DATA_FILE)
            clear_preempted(run_dir)  # a record of an earlier stop: the batch script must read only this start's
            save_config(cfg, run_dir / "config.yaml")
            write_data_record(run_dir, data)
            sweep_stale_temps(run_dir)  # a checkpoint half-written when the job was killed
    except BaseException:
        _close_logging(log_handler)
        if lock is not None:
            lock.release()
        raise
    random.seed(cfg.train.seed + info.rank)
    np.random.seed(cfg.train.seed + info.rank)
    torch.manual_seed(cfg.train.seed + info.rank)
    return Run(cfg, device, info, prepared, run_dir, log_handler, data, lock)


def take_lock(run_dir: Path, info: DistInfo) -> RunLock | None:
    """Rank 0 takes RUN_DIR/.lock (``hpa_scc.utils.checkpoint.RunLock``); every rank learns
    whether it was refused and stops too (else the others would wait in their first collective)."""
    lock, error = None, None
    if info.is_main:
        try:
            lock = RunLock(run_dir).acquire()
        except RunFolderLocked as exc:
            error = str(exc)
    error = gather_objects(error, info)[0]
    if error:
        raise RunFolderLocked(error)
    return lock


# What each engine's run leaves in its folder: removed on a fresh start, so that no earlier run's
# checkpoint is taken for this one's (a run without validation writes no best.pt of its own) and
# its metrics are not appended to.
RUN_FILES = {"torchvision": (LAST, BEST, EPOCH_PATTERN, "metrics.jsonl"),
             "detectron2": ("model_*.pth", "last_checkpoint", "metrics.json")}


def start_over(run_dir: Path, engine: str, extra: tuple[str, ...] = ()) -> None:
    """A fresh start (train.resume=false, or nothing to resume) in a folder of an earlier run: that
    engine's files (RUN_FILES) and ``extra`` ones (detectron2's weight conversion: one left by an
    earlier start is never what this start asked for), its preemption marker and data.json go,
    with a warning naming them."""
    old = [path for pattern in (*RUN_FILES[engine], *extra, PREEMPTED_FILE, DATA_FILE)
           for path in sorted(run_dir.glob(pattern)) if path.is_file()]
    if old:
        log.warning("starting %s over (train.resume=false, or nothing to resume): removing the earlier run's %s",
                    run_dir, ", ".join(path.name for path in old))
        for path in old:
            path.unlink()


def mark_preempted(run_dir: Path, where: dict) -> None:
    """After the stopped run's checkpoint is saved: the batch script's proof that it saved, whatever
    the launcher's exit status (torchrun may exit 1 although the workers saved and exited 75)."""
    write_text_atomic(run_dir / PREEMPTED_FILE, json.dumps(where) + "\n")


def clear_preempted(run_dir: Path) -> None:
    (run_dir / PREEMPTED_FILE).unlink(missing_ok=True)


def was_preempted(run_dir: Path) -> bool:
    return (run_dir / PREEMPTED_FILE).is_file()


def data_record(cfg: Config, prepared: PreparedSet, train_folds: list[int], val_folds: list[int]) -> dict:
    """What a run trains on: the label set and the digest of each training and validation fold's
    COCO file (``PreparedSet.data_digest``); saved in data.json and in every checkpoint."""
    labels = cfg.data.labels
    return {"labels": labels, "train": prepared.data_digest(labels, train_folds),
            "val": prepared.data_digest(labels, val_folds) if val_folds else {}}


def changed_data_error(run_dir: Path, record: dict, changed: list[str]) -> ValueError:
    return ValueError(f"{run_dir} trained on other data: the prepared set's '{record['labels']}' labels changed in "
                      f"{', '.join(changed)} since; resuming would mix two data sets: use a new train.run_dir, or "
                      f"train.resume=false to start this folder over")


def resumes(cfg: Config, run_dir: Path, checkpoint: str = LAST) -> bool:
    """Whether this start continues the run in ``run_dir`` (its ``checkpoint`` is there and
    train.resume is on) rather than starting the folder over. ``checkpoint``: the file that marks
    an engine's resumable run (detectron2's is its last_checkpoint pointer)."""
    return cfg.train.resume and (run_dir / checkpoint).is_file()


# The files that say which engine a run folder belongs to (its checkpoints); the first is the one
# that marks a resumable run.
ENGINE_FILES = {"torchvision": (LAST, BEST), "detectron2": ("last_checkpoint", "model_final.pth")}


def refuse_other_engine(run_dir: Path, engine: str) -> None:
    """A run folder belongs to one engine: another engine's checkpoints there are refused, since
    the two runs would mix (and predict would load the wrong kind). Nor is a data folder (a prepared
    set, a cache, a data set) a run folder: a fresh start there would clean out files it did not write."""
    from hpa_scc.utils.fileio import STEP_RECORDS

    data = [name for name in (*STEP_RECORDS, "train.csv") if (run_dir / name).is_file()]
    if data:
        raise ValueError(f"{run_dir} is a data folder ({data[0]}), not a run folder; a run there would mix with its "
                         "files: use another train.run_dir (e.g. runs/NAME)")
    for other, names in ENGINE_FILES.items():
        found = [name for name in names if other != engine and (run_dir / name).is_file()]
        if found:
            raise ValueError(f"{run_dir} holds a {other}-engine run ({', '.join(found)}); a {engine} run there "
                             "would mix with it: use another train.run_dir")


def check_resume(cfg: Config, run_dir: Path, data: dict | None = None, engine: str = "torchvision") -> dict:
    """Both engines' resume rule. A run folder with a checkpoint is resumed only with the settings
    it was started with, but for RESUMABLE_CHANGES (more epochs, logging, loaders): returns those,
    refuses the others naming each key, before config.yaml is overwritten. With ``data``
    (``data_record``) it refuses too when a fold changed since data.json recorded it (not the
    ``features`` family: it fits again). Another engine's folder or a data folder is refused."""
    refuse_other_engine(run_dir, engine)
    saved_path = run_dir / "config.yaml"
    if not (resumes(cfg, run_dir, ENGINE_FILES[engine][0]) and saved_path.is_file()):
        return {}
    allowed, refused = resume_changes(yaml.safe_load(saved_path.read_text()) or {}, cfg)
    if refused:
        lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        what = "a detectron2 run" if engine == "detectron2" else "a run"
        raise ValueError(f"{run_dir} holds {what} started with other settings ({lines}); resuming it with these "
                         f"would mix two experiments. Use another train.run_dir, put the settings back, or set "
                         f"train.resume=false to start this folder over. (A resume may change: "
                         f"{', '.join(RESUMABLE_CHANGES)})")
    if data is not None and cfg.model.family != "features":
        saved = read_data_record(run_dir)  # None: a run of an earlier version, not checked (start_run warns)
        changed = changed_folds(saved, data) if saved is not None else []
        if changed:
            raise changed_data_error(run_dir, data, changed)
    return allowed


def _close_logging(handler: logging.Handler | None) -> None:
    if handler is not None:
        logging.getLogger("hpa_scc").removeHandler(handler)
        handler.close()


def end_run(run: Run) -> None:
    """The run folder's log and lock let go (after a finished, stopped or failed run alike)."""
    _close_logging(run.log_handler)
    if run.lock is not None:
        run.lock.release()
    cleanup(run.info)


def split_folds(cfg: Config, prepared: PreparedSet) -> tuple[list[int], list[int]]:
    """(train folds, validation folds): ``data.val_fold`` validates, the others train."""
    n_folds = prepared.n_folds
    if cfg.data.val_fold >= n_folds:
        raise ValueError(f"data.val_fold={cfg.data.val_fold} but {prepared.root} has {n_folds} folds "
                         f"(0-{n_folds - 1}); set data.val_fold=-1 to train on every fold without validation")
    train_folds = [f for f in range(n_folds) if f != cfg.data.val_fold] or [0]
    val_folds = [cfg.data.val_fold] if n_folds > 1 and cfg.data.val_fold >= 0 else []
    return train_folds, val_folds


# What to do when a run folder's checkpoint is not this run's model.
RESUME_FIX = "the folder mixes two runs; use another train.run_dir, or train.resume=false to start it over"
