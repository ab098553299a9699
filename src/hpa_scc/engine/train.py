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

The run folder's rules (start, resume, lock, fresh start, data record, metrics log, preemption
marker) are ``hpa_scc.engine.runfolder``'s, shared with the detectron2 engine; each family's data
and fit are ``hpa_scc.engine.families``'; the sampler, optimiser and schedule ``engine.optim``'s.

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

import logging
import math
import os
import random
import signal
import socket
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hpa_scc.config import Config, to_dict, with_values
from hpa_scc.constants import FAMILIES
from hpa_scc.engine.distributed import DistInfo, barrier, gather_objects, mean_across_ranks
from hpa_scc.utils.device import pick_device
from hpa_scc.engine.families import VAL_METRIC, Data, build_data, fit_features
from hpa_scc.engine.loop import train_one_epoch, use_fast_path
from hpa_scc.engine.optim import EpochSampler, build_optimizer, lr_lambda, make_loader
from hpa_scc.engine.runfolder import (FINISHED, PREEMPTED, RESUME_FIX, MetricsLog, Progress, Run, Status,
                                      TrainResult, check_resume, end_run, mark_preempted, resumes, split_folds,
                                      start_run)
from hpa_scc.models.cells import build_family_model
from hpa_scc.utils.checkpoint import (BEST, LAST, epoch_name, load_checkpoint, load_model_state, rng_state,
                                     save_checkpoint, set_rng_state, unwrap, weights_digest)

log = logging.getLogger("hpa_scc.engine.train")


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

    ``cfg.data.image_size`` left unset is the prepared set's size (in the run's copy of ``cfg``,
    saved in config.yaml; ``cfg`` itself is not changed). Returns a
    TrainResult; a SIGUSR1/SIGTERM ends it early with status PREEMPTED after saving last.pt.
    """
    run = start_run(cfg)
    cfg = run.cfg  # resolved (the prepared set's size): the caller's config is left as it was
    try:
        with warnings.catch_warnings():
            # torch warns of more loader workers than cores in two long lines, twice per loader and
            # rank; check_workers says it once, in one line
            warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
            if run.info.is_main and FAMILIES[cfg.model.family].loop:  # a family fitted once uses no loader
                check_workers(cfg.data.workers)
            train_folds, val_folds = split_folds(cfg, run.prepared)
            data = build_data(cfg, run.prepared, train_folds, val_folds, progress and run.info.is_main)
            if len(data.train_set) == 0:
                what = "images with cells" if FAMILIES[cfg.model.family].unit == "images" else "cells"
                raise ValueError(f"no training {what} in {run.prepared.root} folds {train_folds}")
            if not FAMILIES[cfg.model.family].loop:  # fitted in one go (features: scikit-learn): no optimiser
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

    # a resumed run's feature head comes from last.pt: the features model it started as is not read
    # again (it may have moved since), nor may a resume change it
    model = build_family_model(with_values(cfg, model__cell_features_init=None) if resumes(cfg, run.run_dir)
                               else cfg).to(device)
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
    # what one training sample is: MIL trains the cell family on images (bags of their cells)
    unit = "images (bags of cells)" if cfg.model.mil != "none" else FAMILIES[cfg.model.family].unit
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
                        mark_preempted(run.run_dir, {"signal": stop.signal, "epoch": epoch,
                                                     "step_in_epoch": state.step_in_epoch,
                                                     "global_step": state.global_step})
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


# The names a caller (CLI, notebooks, tests) takes from here; the run folder's and the families'
# own live in engine.runfolder and engine.families.
__all__ = ["train", "fit", "TrainResult", "Status", "FINISHED", "PREEMPTED", "StopSignals", "start_run", "end_run",
           "check_resume", "pick_device", "restore_rng", "resume_or_load", "EpochSampler", "lr_lambda", "Run"]
