"""detectron2 as the training engine: its DefaultTrainer on the project's prepared set and config.

    python detectron_code/main.py --engine detectron2 --backbone resnet101 data.prepared_dir=data/prepared512
    python -m hpa_scc train configs/resnet101_fpn.yaml model.engine=detectron2 model.head=softmax   # the same
    torchrun --nproc-per-node 4 detectron_code/main.py --engine detectron2 --backbone resnext101

What it does, in order (``train_d2``):

1. the project config (``hpa_scc.config``) is resolved as the torchvision engine resolves it: the
   training size from the prepared set, the folds from ``split_folds`` (``data.val_fold``
   validates, the others train); a run folder that already holds a detectron2 checkpoint is
   resumed only with ``RESUMABLE_CHANGES``;
2. the run folder gets ``config.yaml`` (the project's) and ``d2_config.yaml`` (detectron2's,
   ``hpa_scc.models.d2model.build_d2_config``: the backbone's model-zoo config, 19 classes, the
   prepared size, 3/4 input channels, solver from ``optim``/``train``);
3. the per_label COCO folds are registered in detectron2's DatasetCatalog (``register_folds``),
   one record per image with its cells' RLE masks; ``NpyMapper`` reads the prepared cache's
   uint8 [C, S, S] arrays (detectron2's DatasetMapper reads image files of 3 channels only) and
   flips / transposes them (the 8 symmetries of the square, as ``data.rot90`` + flips);
4. detectron2's ``DefaultTrainer`` trains with ``OUTPUT_DIR`` = the run folder, after
   ``resume_or_load(resume=True)``: a rerun continues from the folder's ``last_checkpoint``,
   else starts from ``model.weights`` (a model-zoo .pkl, its stem made RGB(Y) first), else random init.
   Checkpoints: ``model_NNNNNNN.pth`` every ``save_every_epochs`` and ``model_final.pth``;
   metrics in detectron2's ``metrics.json``.

As with the torchvision engine, one run owns the folder: rank 0 holds ``RUN_DIR/.lock`` while it
trains (``hpa_scc.utils.checkpoint.RunLock``: a second start is refused, a dead holder's lock taken
over), ``data.json`` records the digest of the COCO folds it trains on and a resume on changed
folds is refused, naming them. detectron2 reads its own ``.pth`` checkpoints with torch.load's
default, ``weights_only=True`` since torch 2.6; a model-zoo ``.pkl`` (and the RGB(Y) conversion
written into the run folder from it) is a pickle, read with pickle: give only files you trust.

Processes: under torchrun (or srun) each process joins the group the environment describes;
otherwise ``num_gpus`` > 1 (``GPUS`` env, else every visible GPU with ``train.device`` cuda)
spawns through detectron2's own ``launch``; one process otherwise. On SIGUSR1/SIGTERM the
trainer saves a checkpoint after the current step, writes ``preempted.json`` and returns
``"preempted"`` (exit 75 from the CLI: scripts/slurm_train.sh requeues).

Not done by this engine: validation during training (score the run with ``predict`` /
``evaluate``, as the README shows) and the multilabel head (detectron2's softmax head on the
per_label layout only, the original implementation's; its limits are in models/detector.py).
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch

from hpa_scc.config import Config, save_config, with_values
from hpa_scc.data.prepared import PreparedSet
from hpa_scc.engine.distributed import join_group, launcher_env
from hpa_scc.utils.device import device_type
from hpa_scc.engine.runfolder import (ENGINE_FILES, Status, check_resume, clear_preempted, data_record, mark_preempted,
                                      resumes, split_folds, start_over, was_preempted)
from hpa_scc.utils.checkpoint import LOCK_FILE, LOCK_REFRESH_S, RunLock, unwrap, write_data_record
from hpa_scc.models.d2model import (CONVERTED_WEIGHTS, D2_CONFIG, build_d2_config, check_weights_fit,
                                    convert_zoo_weights, read_d2_weights, require_detectron2)

log = logging.getLogger(__name__)

TRAIN_NAME, VAL_NAME = "hpa_scc_train", "hpa_scc_val"
LAST_POINTER = ENGINE_FILES["detectron2"][0]  # detectron2's Checkpointer names its newest file here


# ----------------------------------------------------------------------------------------------
# Data

def fold_records(prepared: PreparedSet, layout: str, folds: list[int], labels: str = "image",
                 max_images: int | None = None) -> list[dict]:
    """detectron2 dataset dicts of some COCO folds: one per image, its annotations in detectron2's form.

    ``category_id`` becomes 0-based (detectron2's classes are 0..18; COCO's are 1..19);
    ``segmentation`` stays the COCO RLE (``INPUT.MASK_FORMAT`` bitmask decodes it).
    """
    from detectron2.structures import BoxMode

    coco = prepared.read_folds(layout, folds, labels)
    by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    size = prepared.size
    records = []
    for img in coco["images"]:
        anns = [{"bbox": [float(v) for v in ann["bbox"]], "bbox_mode": BoxMode.XYWH_ABS,
                 "category_id": int(ann["category_id"]) - 1, "segmentation": ann["segmentation"],
                 "iscrowd": int(ann.get("iscrowd", 0))} for ann in by_image.get(img["id"], [])]
        records.append({"file_name": str(prepared.image_path(img["image_name"])), "image_name": img["image_name"],
                        "image_id": img["id"], "height": size, "width": size, "annotations": anns})
    return records[:max_images] if max_images else records


def register_folds(name: str, prepared: PreparedSet, layout: str, folds: list[int], labels: str = "image",
                   max_images: int | None = None) -> None:
    """Register (or re-register) ``name`` in detectron2's DatasetCatalog/MetadataCatalog."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from hpa_scc.constants import CLASS_NAMES

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: fold_records(prepared, layout, folds, labels, max_images))
    MetadataCatalog.get(name).set(thing_classes=list(CLASS_NAMES), prepared_dir=str(prepared.root), folds=list(folds))


def _transforms():
    """The transpose transform/augmentation, built on first use (detectron2 is imported lazily)."""
    from detectron2.data import transforms as T

    class TransposeTransform(T.Transform):
        """Swap x and y: with the two flips it gives every rotation by 90 degrees."""

        def apply_image(self, img: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(np.swapaxes(img, 0, 1))

        def apply_coords(self, coords: np.ndarray) -> np.ndarray:
            return coords[:, ::-1].copy()

        def inverse(self):
            return self

    class RandomTranspose(T.Augmentation):
        def __init__(self, prob: float):
            super().__init__()
            self.prob = prob

        def get_transform(self, image):
            return TransposeTransform() if self._rand_range() < self.prob else T.NoOpTransform()

    return T, RandomTranspose


class NpyMapper:
    """A dataset dict -> detectron2's model input: ``image`` uint8 [C, S, S] from the prepared cache,
    ``instances`` with gt boxes, classes and bitmasks (augmented when ``is_train``)."""

    def __init__(self, prepared_dir: str, in_channels: int, is_train: bool, hflip_prob: float = 0.5,
                 vflip_prob: float = 0.5, rot90: bool = True):
        T, RandomTranspose = _transforms()
        self.prepared = PreparedSet(prepared_dir)
        self.in_channels = in_channels
        self.is_train = is_train
        self.augmentations = T.AugmentationList([
            T.RandomFlip(prob=hflip_prob, horizontal=True, vertical=False),
            T.RandomFlip(prob=vflip_prob, horizontal=False, vertical=True),
            RandomTranspose(0.5 if rot90 else 0.0)] if is_train else [])

    def __call__(self, record: dict) -> dict:
        from detectron2.data import detection_utils as utils
        from detectron2.data import transforms as T

        record = copy.deepcopy(record)
        try:
            image = np.array(self.prepared.read_image(record["image_name"])[: self.in_channels]).transpose(1, 2, 0)
        except OSError as exc:
            raise OSError(f"image {record['image_name']}: {exc}") from None
        aug = T.AugInput(image)
        transforms = self.augmentations(aug)
        image = aug.image
        shape = image.shape[:2]
        annos = [utils.transform_instance_annotations(a, transforms, shape)
                 for a in record.pop("annotations", []) if not a.get("iscrowd", 0)]
        instances = utils.annotations_to_instances(annos, shape, mask_format="bitmask")
        record["instances"] = utils.filter_empty_instances(instances)
        record["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return record


# ----------------------------------------------------------------------------------------------
# Trainer

def _trainer_class():
    """DefaultTrainer with the .npy mapper and the project's writers (built lazily: detectron2 is optional)."""
    from detectron2.data import build_detection_test_loader, build_detection_train_loader
    from detectron2.engine import DefaultTrainer, HookBase
    from detectron2.utils import comm
    from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter

    class StopOnSignal(HookBase):
        """Save after the step in which SIGUSR1/SIGTERM arrived, then end training (all ranks agree)."""

        def __init__(self, run_dir: Path):
            self.run_dir = run_dir
            self.signalled = False
            self.touched = time.monotonic()
            for sig in (signal.SIGUSR1, signal.SIGTERM):
                signal.signal(sig, self._note)

        def _note(self, signum, _frame):
            self.signalled = True

        def after_step(self):
            if comm.is_main_process() and time.monotonic() - self.touched >= LOCK_REFRESH_S:
                # the run folder's lock, seen alive from another host (as RunLock.refresh; by path: under
                # launch this is a spawned process, the lock is its parent's)
                self.touched = time.monotonic()
                if (self.run_dir / LOCK_FILE).is_file():
                    os.utime(self.run_dir / LOCK_FILE)
            flag = torch.tensor([int(self.signalled)])
            if comm.get_world_size() > 1:  # one rank signalled: all stop after this step, or DDP would hang
                flag = flag.to(self.trainer.cfg.MODEL.DEVICE)
                torch.distributed.all_reduce(flag)
            if not flag.item():
                return
            it = self.trainer.iter
            self.trainer.checkpointer.save(f"model_{it:07d}", iteration=it)
            if comm.is_main_process():
                mark_preempted(self.run_dir, {"iteration": it})
            log.info("signal: saved iteration %d in %s; run the same command to resume", it, self.run_dir)
            raise _Preempted()

    class HPATrainer(DefaultTrainer):
        @classmethod
        def build_train_loader(cls, cfg):
            return build_detection_train_loader(cfg, mapper=NpyMapper(
                cfg.HPA.PREPARED_DIR, cfg.HPA.IN_CHANNELS, True, cfg.HPA.HFLIP_PROB, cfg.HPA.VFLIP_PROB, cfg.HPA.ROT90))

        @classmethod
        def build_test_loader(cls, cfg, dataset_name):
            return build_detection_test_loader(cfg, dataset_name, mapper=NpyMapper(
                cfg.HPA.PREPARED_DIR, cfg.HPA.IN_CHANNELS, False))

        @classmethod
        def build_optimizer(cls, cfg, model):
            optimizer = super().build_optimizer(cfg, model)
            max_norm = cfg.HPA.CLIP_GRAD_NORM
            if max_norm > 0:  # one norm over all gradients, as the torchvision engine (models/d2model.py says why)
                base = type(optimizer)

                class FullModelClipped(base):
                    def step(self, closure=None):
                        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
                        torch.nn.utils.clip_grad_norm_(params, max_norm)
                        return super().step(closure)

                optimizer.__class__ = FullModelClipped
            return optimizer

        def build_writers(self):
            writers = [CommonMetricPrinter(self.max_iter), JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"))]
            if self.cfg.HPA.TENSORBOARD:
                writers.append(TensorboardXWriter(self.cfg.OUTPUT_DIR))
            return writers

        def build_hooks(self):
            return super().build_hooks() + [StopOnSignal(Path(self.cfg.OUTPUT_DIR))]

    return HPATrainer


class _Preempted(BaseException):
    """Raised by the signal hook to leave detectron2's loop (BaseException: its loop re-raises Exception with a traceback log)."""


def add_project_keys(d2cfg, cfg: Config) -> None:
    """The keys our mapper and writers read from detectron2's config, under ``HPA``."""
    from detectron2.config import CfgNode

    d2cfg.HPA = CfgNode({"PREPARED_DIR": str(Path(cfg.data.prepared_dir).resolve()), "IN_CHANNELS": cfg.model.in_channels,
                         "BACKBONE": cfg.model.backbone,
                         "HFLIP_PROB": cfg.data.hflip_prob, "VFLIP_PROB": cfg.data.vflip_prob, "ROT90": cfg.data.rot90,
                         "LAYOUT": cfg.data.layout, "LABELS": cfg.data.labels,
                         "TRAIN_FOLDS": [], "VAL_FOLDS": [], "MAX_TRAIN_IMAGES": cfg.data.max_train_images or 0,
                         "TENSORBOARD": cfg.train.tensorboard,
                         "CLIP_GRAD_NORM": cfg.optim.clip_grad_norm or 0.0})  # 0: none


def prepare_d2_run(cfg: Config, num_gpus: int = 1, write: bool = True, lock: RunLock | None = None):
    """Resolve ``cfg`` against its prepared set and run folder; return detectron2's config.

    With ``write`` (rank 0) the run folder gets config.yaml, d2_config.yaml, data.json and, for a
    .pkl ``model.weights``, its RGB(Y) conversion; ``lock`` (train_d2's) is taken after the checks,
    before the first of those is written.
    """
    require_detectron2()
    prepared = PreparedSet(cfg.data.prepared_dir)
    cfg = with_values(cfg, data__image_size=prepared.check_size(cfg.data.image_size, "data.image_size"))
    run_dir = Path(cfg.train.run_dir)
    train_folds, val_folds = split_folds(cfg, prepared)
    data = data_record(cfg, prepared, train_folds, val_folds)
    allowed = check_resume(cfg, run_dir, data, "detectron2")  # the torchvision engine's rule, shared
    if allowed:
        log.info("resuming with changed settings: %s", ", ".join(f"{k} {a} -> {b}" for k, (a, b) in allowed.items()))
    n_train = len(fold_records(prepared, cfg.data.layout, train_folds, cfg.data.labels, cfg.data.max_train_images))

    fresh = not resumes(cfg, run_dir, LAST_POINTER)  # else the checkpoint is loaded
    weights = ""
    if cfg.model.weights == "imagenet":
        raise ValueError("the detectron2 engine starts from a model-zoo .pkl or random init; model.weights=imagenet "
                         "is the torchvision engine's")
    if cfg.model.weights:
        source = Path(cfg.model.weights)
        if source.is_dir():
            raise ValueError(f"model.weights: {source} is a folder; give the .pkl or .pth file itself")
        if not source.is_file():
            raise FileNotFoundError(f"model.weights: {source} not found")
        if fresh and source.suffix != ".pkl":
            read_d2_weights(source)  # a clear error now, not a traceback from inside detectron2
        weights = str(run_dir / CONVERTED_WEIGHTS) if source.suffix == ".pkl" else str(source)
    d2cfg = build_d2_config(cfg, num_gpus=num_gpus, n_train_images=n_train, weights=weights)
    add_project_keys(d2cfg, cfg)
    d2cfg.HPA.TRAIN_FOLDS, d2cfg.HPA.VAL_FOLDS = list(train_folds), list(val_folds)
    d2cfg.DATASETS.TRAIN = (TRAIN_NAME,)
    d2cfg.DATASETS.TEST = ()  # scored afterwards by predict / evaluate
    if write:
        if lock is not None:
            lock.acquire()
        run_dir.mkdir(parents=True, exist_ok=True)
        if fresh:
            start_over(run_dir, "detectron2", extra=(CONVERTED_WEIGHTS,))
            if weights.endswith(CONVERTED_WEIGHTS):
                convert_zoo_weights(cfg.model.weights, cfg.model.in_channels, run_dir / CONVERTED_WEIGHTS)
        save_config(cfg, run_dir / "config.yaml")
        from hpa_scc.utils.fileio import write_text_atomic

        write_text_atomic(run_dir / D2_CONFIG, d2cfg.dump())
        write_data_record(run_dir, data)
        clear_preempted(run_dir)
    log.info("detectron2 %s: %d training images (folds %s), %d iterations of %d images -> %s", cfg.model.backbone,
             n_train, train_folds, d2cfg.SOLVER.MAX_ITER, d2cfg.SOLVER.IMS_PER_BATCH, run_dir)
    return d2cfg


def _worker(d2cfg, resume: bool) -> str:
    """One process's training (each spawned process registers the datasets itself)."""
    from detectron2.utils import comm
    from detectron2.utils.logger import setup_logger

    setup_logger(output=d2cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="detectron2")
    prepared = PreparedSet(d2cfg.HPA.PREPARED_DIR)
    register_folds(TRAIN_NAME, prepared, d2cfg.HPA.LAYOUT, list(d2cfg.HPA.TRAIN_FOLDS), d2cfg.HPA.LABELS,
                   d2cfg.HPA.MAX_TRAIN_IMAGES or None)
    if d2cfg.HPA.VAL_FOLDS:
        register_folds(VAL_NAME, prepared, d2cfg.HPA.LAYOUT, list(d2cfg.HPA.VAL_FOLDS), d2cfg.HPA.LABELS)
    trainer = _trainer_class()(d2cfg)
    if d2cfg.MODEL.WEIGHTS and not (resume and trainer.checkpointer.has_checkpoint()):
        check_weights_fit(unwrap(trainer.model), read_d2_weights(d2cfg.MODEL.WEIGHTS), d2cfg.MODEL.WEIGHTS,
                          d2cfg.HPA.BACKBONE)
    # resume=True: the folder's last_checkpoint if there is one, else MODEL.WEIGHTS (or random init)
    trainer.resume_or_load(resume=resume)
    try:
        trainer.train()
    except _Preempted:
        return Status.PREEMPTED
    return Status.FINISHED


def _torchrun_group(device: str, timeout_min: int) -> bool:
    """Join the process group torchrun/srun describe (``engine.distributed``, as the torchvision
    engine does), with detectron2's per-machine group; False when there is none."""
    from detectron2.utils import comm

    info = launcher_env()
    if not info.distributed:
        return False
    join_group(info, device, timeout_min)
    if device == "cuda":
        torch.cuda.set_device(info.local_rank)
    comm.create_local_process_group(info.local_world_size)
    return True


def default_num_gpus(cfg: Config) -> int:
    """GPUs for detectron2's launch: $GPUS, else every visible GPU when training on cuda, else 0 (CPU)."""
    if os.environ.get("GPUS", "").strip():
        return int(os.environ["GPUS"])
    return torch.cuda.device_count() if device_type(cfg.train.device) == "cuda" else 0


def train_d2(cfg: Config, num_gpus: int | None = None) -> str:
    """Train ``cfg`` with detectron2 (module docstring); returns Status.FINISHED or Status.PREEMPTED."""
    require_detectron2()
    from detectron2.engine import launch

    device = device_type(cfg.train.device)
    num_gpus = default_num_gpus(cfg) if num_gpus is None else num_gpus
    processes = launcher_env().world_size
    if device == "cpu" and max(processes, num_gpus) > 1:
        # detectron2 0.6's DefaultTrainer wraps the model in DDP with device_ids=[local rank], which
        # torch refuses for a CPU model
        raise ValueError(f"the detectron2 engine trains several processes on GPUs only; on CPU run one process "
                         f"(got {max(processes, num_gpus)}: unset GPUS / run without torchrun, or train.device=cuda)")
    under_launcher = _torchrun_group(device, cfg.train.dist_timeout_min)
    # held by the process that writes the folder (rank 0, or the parent of launch's processes);
    # taken by prepare_d2_run after its checks, let go however training ends
    lock = RunLock(cfg.train.run_dir)
    try:
        if under_launcher:
            world = torch.distributed.get_world_size()
            main = torch.distributed.get_rank() == 0
            d2cfg = prepare_d2_run(cfg, num_gpus=world, write=main, lock=lock if main else None)
            torch.distributed.barrier()  # the files exist before any rank reads them
            return _worker(d2cfg, cfg.train.resume)
        d2cfg = prepare_d2_run(cfg, num_gpus=max(num_gpus, 1), lock=lock)
        if num_gpus > 1:
            launch(_worker, num_gpus, dist_url="auto", args=(d2cfg, cfg.train.resume))  # a free local port
            return Status.PREEMPTED if was_preempted(Path(cfg.train.run_dir)) else Status.FINISHED
        return _worker(d2cfg, cfg.train.resume)
    finally:
        lock.release()


__all__ = ["train_d2", "prepare_d2_run", "register_folds", "fold_records", "NpyMapper", "default_num_gpus"]
