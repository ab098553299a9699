"""Train a model on the pseudo-labelled cells: Mask R-CNN, or a cell-level model (hpa_scc.models.cells).

    python -m hpa_scc train configs/densenet121.yaml [key=value ...]
    torchrun --nproc-per-node 4 -m hpa_scc train configs/resnet101_fpn.yaml train.run_dir=runs/r101
    python train_densenet.py [key=value ...]            # = train configs/densenet121.yaml
    python -m hpa_scc train configs/cell_resnet18.yaml  # model.family=cell: masked cell crops, same loop
    python -m hpa_scc train configs/cell_features.yaml  # model.family=features: fitted once, no loop

Resume or load: if ``RUN_DIR/last.pt`` exists (and train.resume is true) training continues from
it, optimizer, scheduler, step and RNG included; otherwise it starts from ``model.weights``. So
one command serves a first start and a requeue. SIGUSR1 or SIGTERM (a scheduler's warning
before the time limit) saves ``last.pt`` at the current step and ends with status PREEMPTED; the
``train`` command exits with status 75, which the batch script reads as "requeue me".

``train`` is a composition of named steps, each a plain function: ``start_run`` (device, ranks,
the prepared set's size, run folder, seeds), ``split_folds``, ``build_data``, then ``fit`` (the
loop: ``resume_or_load``, ``train_one_epoch``, ``StopSignals``, ``end_of_epoch`` for validation
and the save policy) or ``fit_features``; it returns a ``TrainResult``.

The run folder gets: config.yaml (the resolved config), last.pt, best.pt, epoch_NNNN.pt,
metrics.jsonl (one JSON line per log and per validation), train.log, tensorboard/, data.json (the
digest of the COCO folds it trains and validates on) and, while it trains, .lock (host, PID, start).

A run folder holds one run: a second start while one trains there is refused (``.lock``; one whose
holder is gone is taken over, see ``hpa_scc.utils.checkpoint``); a fresh start (train.resume=false,
or no last.pt) removes the earlier run's checkpoints and metrics, so predict never loads an older
best.pt; a resume on data whose folds changed since (data.json) is refused, naming the folds
(the ``features`` family fits again instead).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import signal
import socket
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from hpa_scc.utils.checkpoint import (BEST, DATA_FILE, EPOCH_PATTERN, LAST, PREEMPTED_FILE, RunFolderLocked, RunLock,
                                     changed_folds, check_model, epoch_name, load_checkpoint, load_model_state,
                                     read_data_record, rng_state, save_checkpoint, set_rng_state, unwrap,
                                     weights_digest, write_data_record)
from hpa_scc.config import RESUMABLE_CHANGES, Config, resume_changes, save_config, to_dict
from hpa_scc.engine.distributed import (DistInfo, barrier, cleanup, gather_objects, init_distributed,
                                       mean_across_ranks)
from hpa_scc.engine.loop import evaluate, train_one_epoch, use_fast_path
from hpa_scc.models.cells import build_family_model
from hpa_scc.data.instances import CellInstances, collate, shadowed_warning
from hpa_scc.data.prepared import PreparedSet
from hpa_scc.utils.fileio import sweep_stale_temps, write_text_atomic

log = logging.getLogger("hpa_scc.engine.train")


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


DEVICES = ("auto", "cpu", "cuda", "cuda:N")


def pick_device(name: str, key: str = "train.device") -> torch.device:
    """The torch device ``name`` asks for (one of DEVICES; auto: cuda when one is visible), with a
    one-line error naming ``key`` (predict's and refine's --device read the same names)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", str(name)):
        raise ValueError(f"{key}={name!r} is not a device here; choose one of {', '.join(DEVICES)}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"{key}={name} but no CUDA device is visible; use {key}=cpu or auto")
        index, count = int(name.partition(":")[2] or 0), torch.cuda.device_count()
        if index >= count:
            raise ValueError(f"{key}={name} but {count} CUDA device(s) are visible: use cuda:0 to cuda:{count - 1}")
    return torch.device(name)


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


def _logged_by(line: str, step: int) -> bool:
    """Whether a metrics.jsonl line is whole and logged at or before ``step``."""
    try:
        return json.loads(line)["step"] <= step
    except (ValueError, KeyError, TypeError):
        return False


# The validation figure that picks best.pt, per model family.
VAL_METRIC = {"maskrcnn": "segm_AP", "cell": "cell_AP", "features": "cell_AP"}
FINISHED, PREEMPTED = "finished", "preempted"


@dataclass
class TrainResult:
    """How a ``train`` call ended. The ``train`` command turns PREEMPTED into exit status 75."""

    status: str  # FINISHED, or PREEMPTED: last.pt holds the step it stopped at; run the same command to resume
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


@dataclass
class Data:
    """A family's training data: the sets, how to batch them and how to score the model on the validation set."""

    train_set: Any
    val_set: Any
    collate_fn: Callable
    validate: Callable[[torch.nn.Module, Any, torch.device], dict]


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
    cfg.data.image_size = prepared.check_size(cfg.data.image_size, "data.image_size")
    run_dir = Path(cfg.train.run_dir)
    # rank 0 reads the COCO folds (GBs on a big set) for all: the ranks check the same record
    data = gather_objects(data_record(cfg, prepared, *split_folds(cfg, prepared)) if info.is_main else None, info)[0]
    allowed = check_resume(cfg, run_dir, data)  # before anything in the folder is touched
    lock = take_lock(run_dir, info)
    log_handler = None
    try:
        log_handler = _setup_logging(run_dir, info)
        if allowed and info.is_main:
            log.info("resuming with changed settings: %s",
                     ", ".join(f"{k} {a} -> {b}" for k, (a, b) in allowed.items()))
        if info.is_main:
            if not resumes(cfg, run_dir):
                start_over(run_dir)
            elif read_data_record(run_dir) is None:
                log.warning("%s has no %s (a run of an earlier version): the data it trained on cannot be checked; "
                            "recording the data it trains on from now", run_dir, DATA_FILE)
            # a record of an earlier stop; the batch script must read only this start's
            (run_dir / PREEMPTED_FILE).unlink(missing_ok=True)
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


def start_over(run_dir: Path) -> None:
    """A fresh start (train.resume=false, or no last.pt) in a folder of an earlier run: its
    checkpoints, metrics and records go, with a warning naming them. Else a run without
    validation (no best.pt of its own) left the earlier best.pt for predict to load, and the
    earlier run's steps would mix with this one's in metrics.jsonl (the detectron2 engine's
    ``start_over`` does the same with its files)."""
    old = [path for path in (run_dir / LAST, run_dir / BEST, *sorted(run_dir.glob(EPOCH_PATTERN)),
                             run_dir / "metrics.jsonl", run_dir / PREEMPTED_FILE, run_dir / DATA_FILE)
           if path.is_file()]
    if old:
        log.warning("starting %s over (train.resume=false, or no last.pt to resume): removing the earlier run's %s",
                    run_dir, ", ".join(path.name for path in old))
        for path in old:
            path.unlink()


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


# The files that say which engine a run folder belongs to (its checkpoints).
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


def check_resume(cfg: Config, run_dir: Path, data: dict | None = None) -> dict:
    """A run folder with last.pt is resumed only with the settings it was started with, but for
    RESUMABLE_CHANGES (more epochs, logging, loaders): returns those, refuses the others naming
    each key, before config.yaml is overwritten. With ``data`` (``data_record``) it refuses too
    when a fold changed since data.json recorded it (not the ``features`` family: it fits again)."""
    refuse_other_engine(run_dir, "torchvision")
    saved_path = run_dir / "config.yaml"
    if not (resumes(cfg, run_dir) and saved_path.is_file()):
        return {}
    allowed, refused = resume_changes(yaml.safe_load(saved_path.read_text()) or {}, cfg)
    if refused:
        lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise ValueError(f"{run_dir} holds a run started with other settings ({lines}); resuming it with these "
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


def build_data(cfg: Config, prepared: PreparedSet, train_folds: list[int], val_folds: list[int],
               progress: bool = True) -> Data:
    """The family's datasets: Mask R-CNN trains on the COCO folds, cell models on stored crops."""
    if cfg.model.family == "maskrcnn":
        # uint8 samples: a quarter of the bytes through workers, pinned memory and the PCIe copy
        common = {"layout": cfg.data.layout, "labels": cfg.data.labels, "in_channels": cfg.model.in_channels,
                  "seed": cfg.train.seed, "uint8": True}
        train_set = CellInstances(prepared, train_folds, augment=True, hflip_prob=cfg.data.hflip_prob,
                                  vflip_prob=cfg.data.vflip_prob, rot90=cfg.data.rot90,
                                  max_images=cfg.data.max_train_images, **common)
        val_set = CellInstances(prepared, val_folds, max_images=cfg.data.max_val_images, **common) if val_folds else None
        if cfg.model.head == "softmax":  # kept for fidelity with the original; see instances.shadowed_instances
            shadowed, total = train_set.shadowed()
            if shadowed:
                log.warning(shadowed_warning(shadowed, total))

        def validate(model, dataset, device):
            loader = DataLoader(dataset, batch_size=cfg.train.images_per_gpu, collate_fn=collate,
                                num_workers=cfg.data.workers)
            return evaluate(model, loader, dataset.coco, device, amp=cfg.train.amp)

        return Data(train_set, val_set, collate, validate)

    from hpa_scc.models.cells import CellDataset, build_store, collate_cells, evaluate_cells

    kind = "crops" if cfg.model.family == "cell" else "features"
    store = build_store(prepared, kind, cfg.data.crop_size, progress=progress)
    labels = store.labels(prepared, cfg.data.labels)  # float32 [cells, 19], aligned with the store's rows
    crops = {"augment": True, "in_channels": cfg.model.in_channels, "seed": cfg.train.seed} if kind == "crops" else {}
    train_set = CellDataset(store, store.select(train_folds)[: cfg.data.max_train_images], labels, **crops)
    val_set = (CellDataset(store, store.select(val_folds)[: cfg.data.max_val_images], labels,
                           **({"in_channels": cfg.model.in_channels} if kind == "crops" else {}))
               if val_folds else None)

    # A synthetic set's true cell labels: validation reports against them too.
    truth = store.labels(prepared, "truth", strict=False) if prepared.layouts("truth") else None

    def validate(model, dataset, device):
        return evaluate_cells(model, dataset, device, truth)

    return Data(train_set, val_set, collate_cells, validate)


def fit_features(run: Run, data: Data) -> TrainResult:
    """The ``features`` family: per-cell features + logistic regressions, fitted once, saved as
    best.pt/last.pt like any run (so predict and refine load it the same way)."""
    from hpa_scc.models.cells import fit_feature_classifier

    cfg, last = run.cfg, run.run_dir / LAST
    model = build_family_model(cfg)
    if resumes(cfg, run.run_dir):
        state = load_checkpoint(last)
        check_model(state, last, cfg.model.family, cfg.model.backbone, RESUME_FIX)  # not refitted over another run's
        # fitted already with these settings on this data: nothing to redo. A checkpoint without a
        # data record (an earlier version's) is fitted again, once.
        changed = changed_folds(state["data"], run.data) if state.get("data") and run.data else []
        if state.get("config") != to_dict(cfg):
            log.info("%s was fitted with another config: fitting again", last)
        elif not state.get("data"):
            log.info("%s records no data it was fitted on (an earlier version's): fitting again", last)
        elif changed:
            log.info("%s was fitted on other data (the '%s' labels changed in %s): fitting again", last,
                     run.data["labels"], ", ".join(changed))
        else:
            load_model_state(model, state, last, cfg.model.family, cfg.model.backbone, RESUME_FIX)
            log.info("features model already fitted with this config and data: %s", last)
            return TrainResult(FINISHED, model, run.run_dir, cfg.train.max_epochs,
                               best_metric=state.get("best_metric", -1.0), checkpoint=last)
    start = time.perf_counter()
    store = data.train_set.store
    fit_feature_classifier(model, store.array[data.train_set.rows], data.train_set.labels, c=cfg.model.feature_c,
                           seed=cfg.train.seed)
    log.info("features: logistic regressions on %d cells x %d features in %.1f s", len(data.train_set),
             store.array.shape[1], time.perf_counter() - start)
    scores = {}
    if data.val_set is not None:
        scores = data.validate(model, data.val_set, torch.device("cpu"))
        log.info("validation: %s", ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float)))
    best = scores.get(VAL_METRIC["features"], -1.0)
    if run.info.is_main:
        metrics = MetricsLog(run.run_dir, True, False)
        metrics.write("val", 0, {"epoch": cfg.train.max_epochs, **scores})
        state = {"model": model.state_dict(), "epoch": cfg.train.max_epochs, "step_in_epoch": 0, "global_step": 0,
                 "best_metric": float(best), "config": to_dict(cfg), "family": cfg.model.family, "data": run.data}
        save_checkpoint(run.run_dir / BEST, state)
        save_checkpoint(last, state)
    return TrainResult(FINISHED, model, run.run_dir, cfg.train.max_epochs, best_metric=best, checkpoint=last)


# What to do when a run folder's checkpoint is not this run's model.
RESUME_FIX = "the folder mixes two runs; use another train.run_dir, or train.resume=false to start it over"


def resume_or_load(run: Run, model, optimizer, scheduler) -> Progress:
    """Resume from RUN_DIR/last.pt when there is one (and train.resume): weights, optimiser,
    schedule, step and RNG; otherwise start at step 0 from what ``build_family_model`` loaded
    (``model.weights``). One command serves a first start and a requeue."""
    last = run.run_dir / LAST
    if not resumes(run.cfg, run.run_dir):
        return Progress()
    state = load_checkpoint(last)
    load_model_state(model, state, last, run.cfg.model.family, run.cfg.model.backbone, RESUME_FIX)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(state, run)
    progress = Progress(state["epoch"], state["step_in_epoch"], state["global_step"], state.get("best_metric", -1.0))
    log.info("resumed from %s at epoch %d, step %d (global step %d)", last, progress.epoch, progress.step_in_epoch,
             progress.global_step)
    return progress


def restore_rng(state: dict, run: Run) -> None:
    """Each rank takes back its own generators (ranks were seeded ``seed + rank``), so proposal
    sampling and augmentation continue exactly as they would have. A checkpoint written by
    another number of ranks cannot say what a rank's state was: each rank is re-seeded from
    ``seed + rank`` and the global step, and the log says so."""
    saved = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # a dict: one rank's, older runs
    if len(saved) == run.info.world_size:
        set_rng_state(saved[run.info.rank])
        return
    seed = run.cfg.train.seed + run.info.rank + 1_000_003 * state["global_step"]
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if run.info.is_main:
        log.warning("last.pt was written by %d rank(s), this run has %d: random generators re-seeded, so the "
                    "resumed run will not repeat the uninterrupted one exactly", len(saved), run.info.world_size)


def checkpoint_state(cfg: Config, model, optimizer, scheduler, progress: Progress, rngs: list[dict],
                     data: dict | None = None) -> dict:
    """Everything ``resume_or_load`` needs to continue exactly where ``progress`` stands;
    ``rngs`` holds every rank's generators in rank order (``gather_objects(rng_state())``);
    ``data``: what the run trains on (``data_record``). Plain data only: load_checkpoint reads
    it with weights_only (a numpy figure would be refused, hence float())."""
    return {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": progress.epoch, "step_in_epoch": progress.step_in_epoch,
            "global_step": progress.global_step, "best_metric": float(progress.best), "rng": rngs,
            "config": to_dict(cfg), "family": cfg.model.family, "data": data}


class StopSignals:
    """SIGUSR1/SIGTERM (a scheduler's warning before the time limit) noted, acted on after the
    current step: never save a half-updated model. The handlers a notebook or test had are put
    back on exit."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        self._previous = {sig: signal.signal(sig, self._note) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _note(self, signum, _frame) -> None:
        self.signal = signum

    def agree(self, info: DistInfo, device: torch.device) -> int | None:
        """Every rank learns whether any rank was signalled, so all stop at the same step (or DDP hangs)."""
        if info.distributed:
            flag = torch.tensor([self.signal or 0], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            self.signal = int(flag) or None
        return self.signal


def end_of_epoch(run: Run, data: Data, model, progress: Progress, metrics: "MetricsLog",
                 save: Callable[[Path, list], None]):
    """Validation when due (every ``val_every_epochs`` and after the last epoch; rank 0), best.pt
    when it improves, last.pt always, epoch_NNNN.pt every ``save_every_epochs``."""
    cfg, epoch = run.cfg, progress.epoch
    rngs = gather_objects(rng_state(), run.info)  # every rank's, before rank 0 saves
    if run.info.is_main and data.val_set is not None and (epoch % cfg.train.val_every_epochs == 0
                                                          or epoch == cfg.train.max_epochs):
        scores = data.validate(unwrap(model), data.val_set, run.device)
        metrics.write("val", progress.global_step, {"epoch": epoch, **scores})
        log.info("validation after epoch %d: %s", epoch,
                 ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float)))
        if scores[VAL_METRIC[cfg.model.family]] > progress.best:
            progress.best = scores[VAL_METRIC[cfg.model.family]]
            save(run.run_dir / BEST, rngs)
    if run.info.is_main:
        save(run.run_dir / LAST, rngs)
        if epoch % cfg.train.save_every_epochs == 0:
            save(run.run_dir / epoch_name(epoch), rngs)
    barrier(run.info)


def train(cfg: Config, progress: bool = True) -> TrainResult:
    """Run (or resume) the training described by ``cfg``; see the module docstring.

    ``cfg.data.image_size`` left unset is filled in with the prepared set's size. Returns a
    TrainResult; a SIGUSR1/SIGTERM ends it early with status PREEMPTED after saving last.pt.
    """
    run = start_run(cfg)
    try:
        with warnings.catch_warnings():
            # torch warns of more loader workers than cores in two long lines, twice per loader and
            # rank; check_workers says it once, in one line
            warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
            if run.info.is_main and cfg.model.family != "features":  # the features family uses no loader
                check_workers(cfg.data.workers)
            train_folds, val_folds = split_folds(cfg, run.prepared)
            data = build_data(cfg, run.prepared, train_folds, val_folds, progress and run.info.is_main)
            if len(data.train_set) == 0:
                what = "images with cells" if cfg.model.family == "maskrcnn" else "cells"
                raise ValueError(f"no training {what} in {run.prepared.root} folds {train_folds}")
            if cfg.model.family == "features":  # fitted in one go by scikit-learn: no loop, no optimiser
                return fit_features(run, data)
            return fit(run, data, progress)
    finally:
        end_run(run)


def check_workers(workers: int) -> None:
    """One warning line when data.workers exceeds the CPU cores this process may use (a
    SLURM allocation's, not the node's): the workers then compete for them and loading slows."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if workers > cores:
        log.warning("data.workers=%d but this process may use %d CPU core(s): loading may be slower, not faster; "
                    "set data.workers=%d or less", workers, cores, cores)


def report_weights(info: DistInfo, model, global_step: int) -> None:
    """Under DDP every rank prints its weights' digest at the end: the job log shows they agree."""
    if info.distributed:
        rank_line(f"rank {info.rank}/{info.world_size} done at global step {global_step}: weights "
                  f"{weights_digest(model)}")


def rank_line(text: str) -> None:
    """One line to stderr in one write: the ranks share the job log, and print's separate write of
    the newline let two ranks' lines run together ("...a1rank 1/2 done", seen in CI)."""
    sys.stderr.flush()  # what print and tqdm buffered comes first
    os.write(sys.stderr.fileno(), (text + "\n").encode())


def fit(run: Run, data: Data, show_progress: bool = True) -> TrainResult:
    """The loop of the gradient-trained families: epochs of ``train_one_epoch``, each followed by
    ``end_of_epoch``; a stop signal saves last.pt at the current step and ends with PREEMPTED."""
    cfg, info, device = run.cfg, run.info, run.device
    sampler = EpochSampler(len(data.train_set), seed=cfg.train.seed, rank=info.rank, world_size=info.world_size)
    train_loader = make_loader(data.train_set, cfg.train.images_per_gpu, cfg.data.workers, device, sampler=sampler,
                               collate_fn=data.collate_fn)
    steps_per_epoch = math.ceil(sampler.per_rank / cfg.train.images_per_gpu / cfg.train.accumulate_steps)
    if cfg.train.max_iters_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_iters_per_epoch)

    model = build_family_model(cfg).to(device)
    use_fast_path(model, device, channels_last=cfg.train.channels_last, tf32=cfg.train.tf32, compile=cfg.train.compile)
    optimizer = build_optimizer(cfg, model, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps_per_epoch))
    state = resume_or_load(run, model, optimizer, scheduler)
    if info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    if info.distributed:  # one line per rank in the job's log: every rank is there, on its node and device
        node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()  # SLURM's node name where there is one
        rank_line(f"rank {info.rank}/{info.world_size} on {node}: device {device}")
    effective_batch = cfg.train.images_per_gpu * info.world_size * cfg.train.accumulate_steps
    unit = "images" if cfg.model.family == "maskrcnn" else "cells"
    log.info("%s %s, %d train / %d val %s, %d ranks x %d %s x %d accumulation = %d per step, lr %g, "
             "%d steps per epoch, device %s", cfg.model.family, cfg.model.backbone, len(data.train_set),
             len(data.val_set or []), unit, info.world_size, cfg.train.images_per_gpu, unit,
             cfg.train.accumulate_steps, effective_batch, cfg.optim.lr, steps_per_epoch, device)
    metrics = MetricsLog(run.run_dir, info.is_main, cfg.train.tensorboard)
    if resumes(cfg, run.run_dir):
        metrics.drop_after(state.global_step)

    def save(path: Path, rngs: list[dict]) -> None:
        save_checkpoint(path, checkpoint_state(cfg, model, optimizer, scheduler, state, rngs, run.data))
        if run.lock is not None:
            run.lock.refresh()

    # On a GPU every host read of a loss stalls the queue: read (and check) them only when logging.
    sync_every = cfg.train.log_every_iters if device.type == "cuda" else 1
    try:
        with StopSignals() as stop:
            while state.epoch < cfg.train.max_epochs:
                epoch, skip_steps = state.epoch, state.step_in_epoch
                sampler.set_epoch(epoch, skip=skip_steps * cfg.train.images_per_gpu * cfg.train.accumulate_steps)
                data.train_set.set_epoch(epoch)
                bar = tqdm(total=steps_per_epoch, initial=skip_steps, desc=f"epoch {epoch + 1}/{cfg.train.max_epochs}",
                           disable=not (info.is_main and show_progress), unit="step", leave=False)

                def on_step(step: int, losses: dict | None) -> bool:
                    # losses is None between reads (every sync_every steps): reading them would stall the GPU
                    state.global_step += 1
                    state.step_in_epoch = skip_steps + step
                    bar.update(1)
                    if run.lock is not None:  # seen alive from another host (at most once a minute)
                        run.lock.refresh()
                    if losses is not None:
                        bar.set_postfix(loss=f"{losses['loss']:.3f}")
                        if sync_every > 1 or state.global_step % cfg.train.log_every_iters == 0:
                            metrics.write("train", state.global_step,
                                          {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], **losses})
                        stop.agree(info, device)
                    return stop.signal is not None or state.step_in_epoch >= steps_per_epoch

                means = {}
                # A stop on an epoch's last step saved step_in_epoch = steps_per_epoch: nothing is
                # left of it (with max_iters_per_epoch the sampler still has samples, and a step
                # more than the uninterrupted run would train).
                if skip_steps < steps_per_epoch:
                    means = train_one_epoch(model, optimizer, scheduler, train_loader, device,
                                            accumulate_steps=cfg.train.accumulate_steps,
                                            clip_grad_norm=cfg.optim.clip_grad_norm, amp=cfg.train.amp,
                                            sync_every=sync_every, on_step=on_step)
                bar.close()
                means = mean_across_ranks(means, info, device)
                if stop.signal is not None:
                    last = run.run_dir / LAST
                    rngs = gather_objects(rng_state(), info)
                    if info.is_main:
                        save(last, rngs)
                        # the batch script's proof that the trainer saved, whatever the launcher's exit status
                        write_text_atomic(run.run_dir / PREEMPTED_FILE, json.dumps(
                            {"signal": stop.signal, "epoch": epoch, "step_in_epoch": state.step_in_epoch,
                             "global_step": state.global_step}) + "\n")
                        log.warning("signal %d: saved %s at epoch %d step %d; run the same command to resume", stop.signal,
                                    last, epoch, state.step_in_epoch)
                    barrier(info)
                    report_weights(info, model, state.global_step)
                    return TrainResult(PREEMPTED, unwrap(model), run.run_dir, epoch, state.step_in_epoch,
                                       state.global_step, state.best, stop.signal, last)
                state.epoch, state.step_in_epoch = epoch + 1, 0
                metrics.write("epoch", state.global_step, {"epoch": epoch + 1, **{f"mean_{k}": v for k, v in means.items()}})
                log.info("epoch %d/%d: %s", epoch + 1, cfg.train.max_epochs,
                         ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
                end_of_epoch(run, data, model, state, metrics, save)
        log.info("done: %s", run.run_dir)
        report_weights(info, model, state.global_step)
        return TrainResult(FINISHED, unwrap(model), run.run_dir, state.epoch, 0, state.global_step, state.best,
                           checkpoint=run.run_dir / LAST)
    finally:
        metrics.close()
