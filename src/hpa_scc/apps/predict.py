"""Per-cell labels for any folder of HPA images, in the Kaggle submission format.

    python -m hpa_scc predict RUN_DIR DATA_DIR --out OUT_DIR [--cells segmenter|model] [--tta]
    python -m hpa_scc predict - DATA_DIR --out OUT_DIR --baseline image-labels   # no model needed

Cells (``--cells``):
- ``segmenter`` (default): the segmenter's cells at full size (``--segmenter``, or precomputed
  masks), each scored by the model: every detection of class c adds evidence
  ``score x mask IoU(detection, cell)`` and a cell's confidence for c is the largest. This is
  what the strongest Kaggle teams submitted: the official cell masks were close to
  HPA-Cell-Segmentation's.
- ``model``: Mask R-CNN's own masks: detections of any class that overlap (mask IoU >= 0.5) are
  one cell; its confidence for c is the best score of its class-c detections; masks are pasted
  back at full size, overlaps going to the more confident cell.
Every cell gets a confidence for all 19 classes: the metric rewards ranking.

Baselines (``--baseline``), for a labelled set: ``image-labels`` gives every segmented cell its
image's labels at confidence 1 (what image-level labels alone give); ``random`` gives every
segmented cell a random confidence for each class (chance level); ``truth`` submits a synthetic
set's true cells and labels (a sanity check: it must score 1.0).

``--image-fusion W`` blends each cell's confidences with its image's score (per class, the best
cell): conf^(1-W) x image^W (``targets.fuse_image_scores``); 0 (default) leaves them alone.

OUT_DIR gets ``submission.csv``, ``cells.csv`` (ID, cell, bbox, area, one confidence column per
class), ``predict.log`` and ``records/<xx>/<ID>.json`` (per-image results, in 256 sub-folders by a
hash of the ID: a rerun skips them); ``hpa_scc.evaluation.predictions.PredictionFolder`` names
every path of it and reads and writes the records.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from hpa_scc.constants import NUM_CLASSES
from hpa_scc.utils.fileio import refuse_inside
from hpa_scc.utils.provenance import sources_stamp
from hpa_scc.data.images import ImageReadError, ImageRecord, find_images, image_stamp, read_image, resize
from hpa_scc.data.shard import Shard, check_shard, gather_shards, select_shard, shard_suffix
from hpa_scc.utils.pool import run_pool, write_failures
from hpa_scc.segment.folder import SegmenterSpec, init_worker, segment_one, worker_segmenter
from hpa_scc.data.synth import SynthSet
from hpa_scc.evaluation.predictions import PREDICT_JSON, PredictionFolder, encoded_result, image_result
from hpa_scc.evaluation.submission import encode_label_image
from hpa_scc.engine.inference import (LoadedModel, cells_from_detections, detect_batch, load_run, model_identity,
                                     segmenter_cell_scores)
from hpa_scc.weak.targets import fuse_image_scores

log = logging.getLogger("hpa_scc.apps.predict")
BASELINES = ("image-labels", "truth", "random")
CELL_MODES = ("segmenter", "model")


@dataclass(frozen=True)
class PredictSettings:
    """What a worker of ``predict`` needs, sent with each image (``_inputs_job``)."""

    mode: str  # a cell mode or a baseline
    truth: SynthSet  # DATA_DIR as a synthetic set: its true cells, for the truth baseline
    folder: PredictionFolder  # OUT_DIR
    model_size: int | None  # the models' image size (None: no model)
    in_channels: int | None
    segmenter: SegmenterSpec


def predict_folder(run_dir: str | os.PathLike | None, data_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                   cells: str = "segmenter", segmenter: str = "builtin", segmenter_options: dict | None = None,
                   checkpoint: str = "best.pt", tta: bool = False, baseline: str | None = None,
                   labels_csv: str | os.PathLike | None = None, device: str = "auto", workers: int = 1,
                   batch_size: int = 8, image_fusion: float = 0.0, ensemble: list | tuple = (),
                   cell_scoring: str = "auto", allow_missing: bool = False, progress: bool = True,
                   shard: Shard | None = None, merge_only: bool = False) -> Path:
    """Predict every image of ``data_dir``; returns the path of submission.csv (see module docstring).

    The CPU work (read four channels, segment, encode every cell once, resize for the model) runs
    in ``workers`` processes while this process runs the model on batches of ``batch_size``
    images and scores the cells, so a GPU is kept busy by a pool of CPU cores.

    ``ensemble``: more run folders whose models score the same segmenter cells; a cell's
    confidences are the mean of all the models' (e.g. a cell-level model with a detector).

    An image that cannot be predicted (unreadable, ...) is listed in failures.csv; a submission
    must hold every ID, so then no submission.csv is written and the call fails naming them
    (finished images are kept: fix the inputs and run again), unless ``allow_missing``.

    ``shard=(I, N)``: the images of shard I only (a job array task; see ``hpa_scc.data.shard``):
    their records and failures-shard<I>of<N>.csv, no submission; returns the records folder.
    ``merge_only``: no model, no image read: once every shard has finished, the records and the
    shards' failure logs -> submission.csv, cells.csv and failures.csv (what one run writes).
    """
    check_shard(shard)
    if merge_only and shard is not None:
        raise ValueError("--merge gathers every shard; give it without --shard")
    if cells not in CELL_MODES:
        raise ValueError(f"unknown --cells {cells!r}; choose one of {list(CELL_MODES)}")
    if baseline is not None and baseline not in BASELINES:
        raise ValueError(f"unknown --baseline {baseline!r}; choose one of {list(BASELINES)}")
    if batch_size < 1 or workers < 1:
        raise ValueError(f"--batch-size {batch_size} / --workers {workers}: each must be at least 1")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    refuse_inside(out_dir, data_dir, "--out")
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = PredictionFolder(out_dir)
    handler = logging.FileHandler(folder.log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    try:
        records = find_images(data_dir, labels_csv)
        if merge_only:
            if not folder.settings_path.is_file():
                raise FileNotFoundError(f"nothing to merge: {folder.settings_path} not found; run the shards "
                                        "first (the same command with --shard I/N instead of --merge)")
            done, failures, seen = gather_shards(out_dir, [r.image_id for r in records], folder.is_finished)
            log.info("merging the records of %d images and %d shard failure log(s)", len(done), len(seen))
            return _write_outputs(folder, records, set(done), failures, allow_missing)
        by_id = {rec.image_id: rec for rec in records}
        loaded = load_run(run_dir, checkpoint, device) if baseline is None else None
        members = [loaded] + [load_run(r, checkpoint, device) for r in ensemble] if loaded else []
        if loaded and loaded.family != "maskrcnn" and cells == "model":
            raise ValueError(f"--cells model needs a detector; {run_dir} is a {loaded.family}-family model: "
                             "use --cells segmenter")
        if ensemble and cells != "segmenter":
            raise ValueError("--ensemble scores the segmenter's cells: use --cells segmenter")
        sizes = {m.image_size for m in members}
        if len(sizes) > 1:
            raise ValueError(f"the models of an ensemble must share one image size, got {sorted(sizes)} "
                             f"({', '.join(m.run_dir for m in members)})")
        mode = baseline or cells
        unlabelled = [r.image_id for r in records if not r.labels]
        if baseline == "image-labels" and unlabelled:
            raise ValueError(f"the image-labels baseline gives each cell its image's labels, and {len(unlabelled)} "
                             f"image(s) of {data_dir} have none (e.g. {unlabelled[0]}): give a table with --labels")
        truth = SynthSet(data_dir).true_labels() if baseline == "truth" else None
        if mode in ("segmenter", "image-labels", "random"):
            from hpa_scc.segment import check_segmenter

            # now, before the settings record: a missing package is fixed by the same command
            check_segmenter(segmenter, **(segmenter_options or {}))
        # The per-image records of an earlier run are reused only for the same models and settings:
        # another model, checkpoint or option into the same OUT is refused, never mixed in.
        from hpa_scc.segment import segmenter_record
        from hpa_scc.utils.fileio import check_settings

        check_settings(out_dir, {"mode": mode, "models": [model_identity(m) for m in members],
                                 "cells": cells, "tta": tta, "image_fusion": image_fusion,
                                 "cell_scoring": cell_scoring, "segmenter": segmenter if mode != "truth" else None,
                                 "segmenter_options": segmenter_record(segmenter_options) or {},
                                 "files": "fanned"},  # records/<xx>/: an OUT of flat records is not resumed
                       PREDICT_JSON)
        # Finished images are known by their records on disk, and reused only when made from the
        # same inputs (the record's stamp, checked by the workers: ``_inputs_job``). The records
        # (every cell's mask at the original size) are read back one at a time for the outputs.
        finished, failures = set(), []
        todo = select_shard(records, shard)
        uses_segmenter = mode in ("segmenter", "image-labels", "random")
        settings = PredictSettings(mode, SynthSet(data_dir), folder, loaded.image_size if loaded else None,
                                   max(m.in_channels for m in members) if loaded else None,
                                   SegmenterSpec(segmenter if uses_segmenter else None, segmenter_options or {}))
        stream = run_pool(_inputs_job, [(settings, r) for r in todo], workers=workers, initializer=init_worker,
                          initargs=(settings.segmenter,), desc="predict", progress=progress)
        batch: list[tuple[str, dict]] = []
        how_done = {"reused": 0, "redone": 0}
        for i, (image_id, inputs, error) in enumerate(stream, start=1):
            if error is not None:
                failures.append((image_id, error))
                log.warning("skipped %s: %s", image_id, error)
            elif inputs.get("reused"):
                finished.add(image_id)
                how_done["reused"] += 1
            else:
                batch.append((image_id, inputs))
            if batch and (len(batch) == batch_size or i == len(todo)):
                for image_id, result, error in _finish(batch, by_id, members, mode, tta, truth, image_fusion,
                                                               cell_scoring):
                    if error is not None:
                        failures.append((image_id, error))
                        log.warning("skipped %s: %s", image_id, error)
                        continue
                    source = dict(batch)[image_id]
                    folder.write_record(image_id, result, source["source"])  # stamped last: a crash leaves it to redo
                    how_done["redone"] += bool(source.get("redone"))
                    finished.add(image_id)
                batch = []
        if how_done["reused"] or how_done["redone"]:
            log.info("%d image(s) reused from an earlier run, %d redone: their inputs changed%s", how_done["reused"],
                     how_done["redone"], " (channel files or labels)" if mode == "image-labels" else " (channel files)")
        if shard is not None:
            failures.sort()
            write_failures(folder.failures_path(shard_suffix(shard)), failures)
            log.info("shard %d/%d: %d images predicted, %d skipped; once every shard has finished: python -m "
                     "hpa_scc predict RUN_DIR DATA_DIR --out %s --merge", *shard, len(finished), len(failures), out_dir)
            return folder.records_dir
        return _write_outputs(folder, records, finished, failures, allow_missing)
    finally:
        log.removeHandler(handler)
        handler.close()


def _write_outputs(folder: PredictionFolder, records: list[ImageRecord], finished: set[str],
                   failures: list[tuple[str, str]], allow_missing: bool) -> Path:
    """failures.csv, then submission.csv and cells.csv from the finished images' records, read
    back one at a time in the table's order; returns the submission's path."""
    done = [rec.image_id for rec in records if rec.image_id in finished]
    write_failures(folder.failures_path(), failures)
    if failures and not allow_missing:
        failures.sort()
        folder.submission.unlink(missing_ok=True)  # never leave a submission that lacks these IDs
        raise ValueError(
            f"{len(failures)} of {len(records)} images could not be predicted (e.g. {failures[0][0]}: "
            f"{failures[0][1]}); all are listed in {folder.failures_path()}. A submission needs every ID: fix "
            f"them and run again (the {len(done)} finished images are kept), or pass --allow-missing to "
            f"write the submission without them")
    if failures:
        log.warning("%d image(s) left out of the submission (--allow-missing): %s", len(failures),
                    ", ".join(i for i, _ in failures[:10]))
    folder.write_tables(done)
    log.info("%d images predicted, %d skipped -> %s", len(done), len(failures), folder.submission)
    return folder.submission


def _inputs_job(job: tuple[PredictSettings, ImageRecord]) -> tuple[str, dict | None, str | None]:
    """Worker: one image's CPU work -> what the model and the record need (never the full image);
    {"reused": True} when its record was made from these very inputs (``utils.provenance``)."""
    s, record = job
    try:
        truth_mask = s.truth.mask_path(record.image_id)
        # What the record is made from: the channel files (the true mask for "truth"), and the
        # labels where the record copies them.
        source = (sources_stamp([truth_mask]) if s.mode == "truth" else
                  image_stamp(record, labels=list(record.labels or ())) if s.mode == "image-labels" else
                  image_stamp(record))
        if s.folder.is_current(record.image_id, source):
            return record.image_id, {"reused": True}, None
        inputs: dict = {"source": source, "redone": s.folder.has_record(record.image_id)}
        if s.mode == "truth":
            true_cells = s.truth.read_mask(record.image_id)
            return record.image_id, {**inputs, "shape": true_cells.shape, "encoded": encode_label_image(true_cells),
                                     "n_cells": int(true_cells.max())}, None
        image = read_image(record.folder, record.image_id)
        inputs["shape"] = image.shape[1:]
        if s.mode in ("segmenter", "image-labels", "random"):
            _, cell_labels, _ = segment_one(record, worker_segmenter(s.segmenter), s.folder.segmentation_dir, image,
                                            fanout=True)
            inputs["encoded"] = encode_label_image(cell_labels)
            inputs["n_cells"] = int(cell_labels.max())
        if s.model_size:
            size = s.model_size
            inputs["small"] = np.stack([resize(plane, size) for plane in image[: s.in_channels]])
            if s.mode == "segmenter":
                inputs["small_cells"] = cv2.resize(cell_labels, (size, size), interpolation=cv2.INTER_NEAREST)
        return record.image_id, inputs, None
    except (ImageReadError, OSError, ValueError) as exc:
        return record.image_id, None, str(exc)


def _finish(batch: list[tuple[str, dict]], by_id: dict[str, ImageRecord], members: list[LoadedModel], mode: str,
            tta: bool, truth: dict | None, image_fusion: float = 0.0,
            cell_scoring: str = "auto") -> list[tuple[str, dict | None, str | None]]:
    """The models' part for a batch of images, then each image's record."""
    detections = scored = [None] * len(batch)
    if members and mode == "model":
        detections = detect_batch(members[0], [inputs["small"] for _, inputs in batch], tta)
    elif members:
        args = ([inputs["small"] for _, inputs in batch], [inputs["small_cells"] for _, inputs in batch],
                [inputs["n_cells"] for _, inputs in batch])
        per_model = [segmenter_cell_scores(m, [a[: m.in_channels] for a in args[0]], args[1], args[2], tta,
                                           cell_scoring) for m in members]
        scored = [np.mean(confs, axis=0) for confs in zip(*per_model)]
    out = []
    for (image_id, inputs), det, model_conf in zip(batch, detections, scored, strict=True):
        conf = np.zeros((inputs.get("n_cells", 0), NUM_CLASSES), np.float32)
        if mode == "truth":
            for k, labels in truth[image_id].items():
                conf[k - 1, labels] = 1.0
        elif mode == "image-labels":
            labels = by_id[image_id].labels
            if not labels:
                out.append((image_id, None, f"{image_id} has no image labels; --baseline image-labels needs "
                                            "train.csv or --labels"))
                continue
            conf[:, list(labels)] = 1.0
        elif mode == "random":  # chance level, reproducible per image
            seed = int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "little")
            conf = np.random.default_rng(seed).random(conf.shape, dtype=np.float32)
        elif mode == "model":
            numpy_det = {k: v.cpu().numpy() for k, v in det.items()}
            cell_labels, conf = cells_from_detections(numpy_det, inputs["shape"])
            conf = fuse_image_scores(conf, image_fusion)
            out.append((image_id, image_result(image_id, cell_labels, conf), None))
            continue
        else:
            conf = fuse_image_scores(model_conf, image_fusion)
        out.append((image_id, encoded_result(image_id, inputs["shape"], inputs["encoded"], conf,
                                             only_positive=mode in ("truth", "image-labels")), None))
    return out
