"""Train a model on the pseudo-labelled cells: Mask R-CNN, or a cell-level model (hpa_scc.models.cells).

    python -m hpa_scc train configs/densenet121.yaml [key=value ...]
    torchrun --nproc-per-node 4 -m hpa_scc train configs/resnet101_fpn.yaml train.run_dir=runs/r101
    python train_densenet.py [key=value ...]            # = train configs/densenet121.yaml
    python -m hpa_scc train configs/cell_resnet18.yaml  # model.family=cell: masked cell crops, same loop
    python -m hpa_scc train configs/cell_features.yaml  # model.family=features: fitted once, no loop

Resume or load: if ``RUN_DIR/last.pt`` exists (and train.resume is true) training continues from
it, optimizer, scheduler, step and RNG included; otherwise it starts from ``model.weights``. So
one command serves a first start and a requeue. SIGUSR1 or SIGTERM (a scheduler's warning
before the time limit) saves ``last.pt`` at the current step and raises ``Preempted``; the
``train`` command exits with status 75, which the batch script reads as "requeue me".

The run folder gets: config.yaml (the resolved config), last.pt, best.pt, epoch_NNNN.pt,
metrics.jsonl (one JSON line per log and per validation), train.log, tensorboard/.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from hpa_scc.utils.checkpoint import BEST, LAST, load_checkpoint, rng_state, save_checkpoint, set_rng_state, unwrap
from hpa_scc.config import Config, save_config, to_dict
from hpa_scc.engine.distributed import DistInfo, barrier, cleanup, init_distributed, mean_across_ranks
from hpa_scc.engine.loop import evaluate, train_one_epoch, use_fast_path
from hpa_scc.models.cells import build_family_model
from hpa_scc.data.instances import CellInstances, collate, shadowed_instances, shadowed_warning

log = logging.getLogger("hpa_scc.engine.train")
EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped by a signal after saving last.pt; requeue to continue


class Preempted(Exception):
    """Training stopped by SIGUSR1/SIGTERM after rank 0 saved ``last.pt``: run it again to resume.

    Raised, not ``sys.exit``, so that a notebook or a caller survives it; the ``train`` command
    turns it into exit status ``EXIT_REQUEUE`` (75), which the batch scripts requeue on.
    """

    def __init__(self, signum: int, checkpoint: Path, epoch: int, step: int):
        super().__init__(f"signal {signum}: saved {checkpoint} at epoch {epoch} step {step}; run again to resume")
        self.signum, self.checkpoint, self.epoch, self.step = signum, checkpoint, epoch, step


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


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
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

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

# The validation figure that picks best.pt, per model family.
VAL_METRIC = {"maskrcnn": "segm_AP", "cell": "cell_AP", "features": "cell_AP"}


def _truth_labels(prepared: Path):
    """A synthetic set's true cell labels (validation reports against them too), else None."""
    from hpa_scc.models.cells import read_cell_labels

    try:
        return read_cell_labels(prepared, "truth")
    except FileNotFoundError:
        return None


def _datasets(cfg: Config, prepared: Path, train_folds: list[int], val_folds: list[int], progress: bool = True):
    """(train set, val set or None, collate_fn, validate(model, val_set, device) -> dict) of the family."""
    if cfg.model.family == "maskrcnn":
        # uint8 samples: a quarter of the bytes through workers, pinned memory and the PCIe copy
        common = {"layout": cfg.data.layout, "labels": cfg.data.labels, "in_channels": cfg.model.in_channels,
                  "seed": cfg.train.seed, "uint8": True}
        train_set = CellInstances(prepared, train_folds, augment=True, hflip_prob=cfg.data.hflip_prob,
                                  vflip_prob=cfg.data.vflip_prob, rot90=cfg.data.rot90,
                                  max_images=cfg.data.max_train_images, **common)
        val_set = CellInstances(prepared, val_folds, max_images=cfg.data.max_val_images, **common) if val_folds else None
        if cfg.model.head == "softmax":  # kept for fidelity with the original; see instances.shadowed_instances
            shadowed, total = shadowed_instances(train_set.coco)
            if shadowed:
                log.warning(shadowed_warning(shadowed, total))

        def validate(model, dataset, device):
            loader = DataLoader(dataset, batch_size=cfg.train.images_per_gpu, collate_fn=collate,
                                num_workers=cfg.data.workers)
            return evaluate(model, loader, dataset.coco, device, amp=cfg.train.amp)

        return train_set, val_set, collate, validate

    from hpa_scc.models.cells import CellDataset, build_store, collate_cells, evaluate_cells, read_cell_labels

    store = build_store(prepared, "crops", cfg.data.crop_size, progress=progress)
    labels = read_cell_labels(prepared, cfg.data.labels)
    train_set = CellDataset(store, store.select(train_folds)[: cfg.data.max_train_images], labels, augment=True,
                            in_channels=cfg.model.in_channels, seed=cfg.train.seed)
    val_set = (CellDataset(store, store.select(val_folds)[: cfg.data.max_val_images], labels,
                           in_channels=cfg.model.in_channels) if val_folds else None)
    truth = _truth_labels(prepared)

    def validate(model, dataset, device):
        return evaluate_cells(model, dataset, device, truth)

    return train_set, val_set, collate_cells, validate


def _fit_features(cfg: Config, prepared: Path, train_folds: list[int], val_folds: list[int], run_dir: Path,
                  info: DistInfo, log_handler, progress: bool = True) -> torch.nn.Module:
    """The ``features`` family: per-cell features + logistic regressions, fitted once, saved as
    best.pt/last.pt like any run (so predict and refine load it the same way)."""
    from hpa_scc.models.cells import CellDataset, build_store, evaluate_cells, fit_feature_classifier, read_cell_labels

    try:
        last = run_dir / LAST
        if cfg.train.resume and last.is_file():
            state = load_checkpoint(last)
            if state.get("config") == to_dict(cfg):  # fitted already with these settings: nothing to redo
                model = build_family_model(cfg)
                model.load_state_dict(state["model"])
                log.info("features model already fitted with this config: %s", last)
                return model
            log.info("%s was fitted with another config: fitting again", last)
        store = build_store(prepared, "features", progress=progress)
        labels = read_cell_labels(prepared, cfg.data.labels)
        train_set = CellDataset(store, store.select(train_folds)[: cfg.data.max_train_images], labels)
        model = build_family_model(cfg)
        start = time.perf_counter()
        fit_feature_classifier(model, store.array[train_set.rows], train_set.labels, c=cfg.model.feature_c,
                               seed=cfg.train.seed)
        log.info("features: logistic regressions on %d cells x %d features in %.1f s", len(train_set),
                 store.array.shape[1], time.perf_counter() - start)
        scores = {}
        if val_folds:
            val_set = CellDataset(store, store.select(val_folds)[: cfg.data.max_val_images], labels)
            scores = evaluate_cells(model, val_set, torch.device("cpu"), _truth_labels(prepared))
            log.info("validation: %s", ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float)))
        if info.is_main:
            metrics = MetricsLog(run_dir, True, False)
            metrics.write("val", 0, {"epoch": cfg.train.max_epochs, **scores})
            state = {"model": model.state_dict(), "epoch": cfg.train.max_epochs, "step_in_epoch": 0, "global_step": 0,
                     "best_metric": scores.get("cell_AP", -1.0), "config": to_dict(cfg)}
            save_checkpoint(run_dir / BEST, state)
            save_checkpoint(run_dir / LAST, state)
        return model
    finally:
        if log_handler is not None:
            logging.getLogger("hpa_scc").removeHandler(log_handler)
            log_handler.close()


def _prepared_meta(cfg: Config, prepared: Path) -> dict:
    """The prepared set's prepare.json; sets ``cfg.data.image_size`` to its size when unset (the
    prepared set owns the training size) and refuses a different one."""
    meta_path = prepared / "prepare.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: data.prepared_dir must be the output of "
                                f"'python dataset.py DATA_DIR {prepared} --size {cfg.data.image_size or 512}'")
    meta = json.loads(meta_path.read_text())
    if cfg.data.image_size is None:
        cfg.data.image_size = int(meta["size"])
    elif meta["size"] != cfg.data.image_size:
        raise ValueError(f"{prepared} was prepared at {meta['size']} px but data.image_size is {cfg.data.image_size}; "
                         f"leave data.image_size out (it follows the prepared set) or prepare again with "
                         f"--size {cfg.data.image_size}")
    return meta


def train(cfg: Config, progress: bool = True) -> torch.nn.Module:
    """Run (or resume) the training described by ``cfg``; returns the trained (unwrapped) model.
    ``cfg.data.image_size`` left unset is filled in with the prepared set's size."""
    device = pick_device(cfg.train.device)
    info = init_distributed(device)
    if device.type == "cuda":
        torch.cuda.set_device(info.local_rank)
        device = torch.device("cuda", info.local_rank)
    prepared = Path(cfg.data.prepared_dir)
    meta = _prepared_meta(cfg, prepared)  # before config.yaml is written: it records the resolved size
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_handler = _setup_logging(run_dir, info)
    if info.is_main:
        save_config(cfg, run_dir / "config.yaml")
    random.seed(cfg.train.seed + info.rank)
    np.random.seed(cfg.train.seed + info.rank)
    torch.manual_seed(cfg.train.seed + info.rank)

    # data: the validation fold validates, the others train
    n_folds = max(int(meta.get("folds", 1)), 1)
    train_folds = [f for f in range(n_folds) if f != cfg.data.val_fold] or [0]
    val_folds = [cfg.data.val_fold] if n_folds > 1 and cfg.data.val_fold >= 0 else []
    if cfg.data.val_fold >= n_folds:
        raise ValueError(f"data.val_fold={cfg.data.val_fold} but {prepared} has {n_folds} folds (0-{n_folds - 1}); "
                         "set data.val_fold=-1 to train on every fold without validation")
    if cfg.model.family == "features":  # fitted in one go by scikit-learn: no loop, no optimiser
        return _fit_features(cfg, prepared, train_folds, val_folds, run_dir, info, log_handler, progress and info.is_main)
    train_set, val_set, collate_fn, validate = _datasets(cfg, prepared, train_folds, val_folds, progress and info.is_main)
    if len(train_set) == 0:
        raise ValueError(f"no training images with cells in {prepared} folds {train_folds}")
    sampler = EpochSampler(len(train_set), seed=cfg.train.seed, rank=info.rank, world_size=info.world_size)
    train_loader = make_loader(train_set, cfg.train.images_per_gpu, cfg.data.workers, device, sampler=sampler,
                               collate_fn=collate_fn)
    steps_per_epoch = math.ceil(sampler.per_rank / cfg.train.images_per_gpu / cfg.train.accumulate_steps)
    if cfg.train.max_iters_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_iters_per_epoch)

    model = build_family_model(cfg).to(device)
    use_fast_path(model, device, channels_last=cfg.train.channels_last, tf32=cfg.train.tf32, compile=cfg.train.compile)
    optimizer = build_optimizer(cfg, model, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps_per_epoch))
    start_epoch, start_step, global_step, best = 0, 0, 0, -1.0
    last = run_dir / LAST
    if cfg.train.resume and last.is_file():
        state = load_checkpoint(last)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, start_step, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        best = state.get("best_metric", -1.0)
        set_rng_state(state["rng"])  # rank 0's state: proposal sampling continues exactly as it would have
        log.info("resumed from %s at epoch %d, step %d (global step %d)", last, start_epoch, start_step, global_step)
    if info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    effective_batch = cfg.train.images_per_gpu * info.world_size * cfg.train.accumulate_steps
    unit = "images" if cfg.model.family == "maskrcnn" else "cells"
    log.info("%s %s, %d train / %d val %s, %d ranks x %d %s x %d accumulation = %d per step, lr %g, "
             "%d steps per epoch, device %s", cfg.model.family, cfg.model.backbone, len(train_set), len(val_set or []),
             unit, info.world_size,
             cfg.train.images_per_gpu, unit, cfg.train.accumulate_steps, effective_batch, cfg.optim.lr, steps_per_epoch, device)
    metrics = MetricsLog(run_dir, info.is_main, cfg.train.tensorboard)

    # On a GPU every host read of a loss stalls the queue: read (and check) them only when logging.
    sync_every = cfg.train.log_every_iters if device.type == "cuda" else 1
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum  # acted on after the current step: never save a half-updated model

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGUSR1, signal.SIGTERM)}

    def state_dict(epoch: int, step_in_epoch: int) -> dict:
        return {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "step_in_epoch": step_in_epoch,
                "global_step": global_step, "best_metric": best, "rng": rng_state(), "config": to_dict(cfg)}

    try:
        for epoch in range(start_epoch, cfg.train.max_epochs):
            skip_steps = start_step if epoch == start_epoch else 0
            sampler.set_epoch(epoch, skip=skip_steps * cfg.train.images_per_gpu * cfg.train.accumulate_steps)
            train_set.set_epoch(epoch)
            bar = tqdm(total=steps_per_epoch, initial=skip_steps, desc=f"epoch {epoch + 1}/{cfg.train.max_epochs}",
                       disable=not (info.is_main and progress), unit="step", leave=False)
            steps_done = skip_steps

            def on_step(step: int, losses: dict | None) -> bool:
                # losses is None between reads (every sync_every steps): reading them would stall the GPU
                nonlocal global_step, steps_done
                global_step += 1
                steps_done = skip_steps + step
                bar.update(1)
                if losses is not None:
                    bar.set_postfix(loss=f"{losses['loss']:.3f}")
                    if sync_every > 1 or global_step % cfg.train.log_every_iters == 0:
                        metrics.write("train", global_step, {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                                                             **losses})
                if info.distributed and losses is not None:  # every rank stops at the same step, or DDP would hang
                    flag = torch.tensor([0 if stop["signal"] is None else stop["signal"]], device=device)
                    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                    stop["signal"] = int(flag) or None
                return stop["signal"] is not None or steps_done >= steps_per_epoch

            means = train_one_epoch(model, optimizer, scheduler, train_loader, device,
                                    accumulate_steps=cfg.train.accumulate_steps,
                                    clip_grad_norm=cfg.optim.clip_grad_norm, amp=cfg.train.amp,
                                    sync_every=sync_every, on_step=on_step)
            bar.close()
            means = mean_across_ranks(means, info)
            if stop["signal"] is not None:
                if info.is_main:
                    save_checkpoint(last, state_dict(epoch, steps_done))
                    log.warning("signal %d: saved %s at epoch %d step %d; exit %d to requeue", stop["signal"], last,
                                epoch, steps_done, EXIT_REQUEUE)
                barrier(info)
                metrics.close()
                cleanup(info)
                raise Preempted(stop["signal"], last, epoch, steps_done)
            metrics.write("epoch", global_step, {"epoch": epoch + 1, **{f"mean_{k}": v for k, v in means.items()}})
            log.info("epoch %d/%d: %s", epoch + 1, cfg.train.max_epochs,
                     ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
            if info.is_main and val_set is not None and ((epoch + 1) % cfg.train.val_every_epochs == 0
                                                         or epoch + 1 == cfg.train.max_epochs):
                scores = validate(unwrap(model), val_set, device)
                metrics.write("val", global_step, {"epoch": epoch + 1, **scores})
                log.info("validation after epoch %d: %s", epoch + 1,
                         ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float)))
                if scores[VAL_METRIC[cfg.model.family]] > best:
                    best = scores[VAL_METRIC[cfg.model.family]]
                    save_checkpoint(run_dir / BEST, state_dict(epoch + 1, 0))
            if info.is_main:
                save_checkpoint(last, state_dict(epoch + 1, 0))
                if (epoch + 1) % cfg.train.save_every_epochs == 0:
                    save_checkpoint(run_dir / f"epoch_{epoch + 1:04d}.pt", state_dict(epoch + 1, 0))
            barrier(info)
        log.info("done: %s", run_dir)
    finally:
        metrics.close()
        for sig, handler in previous.items():  # a notebook or test process keeps its own handlers
            signal.signal(sig, handler)
        if log_handler is not None:
            logging.getLogger("hpa_scc").removeHandler(log_handler)
            log_handler.close()
    cleanup(info)
    return unwrap(model)
