"""Segment a data set and turn it into pseudo-labelled COCO instances (the "dataset" step).

    python -m hpa_scc segment DATA_DIR OUT_DIR --segmenter builtin --workers 4
    python -m hpa_scc prepare DATA_DIR OUT_DIR --size 512 --segmenter builtin --folds 5
    python dataset.py DATA_DIR OUT_DIR --size 512 --segmenter builtin --folds 5     # the same

On a cluster, a SLURM job array splits the images over its tasks (see hpa_scc.data.shard):
    sbatch --array=0-15 --wrap "python -m hpa_scc prepare DATA_DIR OUT_DIR --size 512 --shard slurm"
    python -m hpa_scc prepare DATA_DIR OUT_DIR --size 512 --merge    # after the last task

``segment`` writes OUT_DIR/<ID>_cells.png and OUT_DIR/<ID>_nuclei.png (uint16, full size).
``prepare`` writes, under OUT_DIR:
    prepare.json                     the settings; a rerun with other settings fails
    segmentation/<xx>/<ID>_{cells,nuclei}.png   full-size label images (the segment step's output)
    cache/                           the resized uint8 image cache (see hpa_scc.data.cache)
    records/<xx>/<ID>.json           per image: its cells at the training size (RLE), written last
(<xx>: 256 sub-folders by a hash of the image ID, ``fileio.fanned``; sets of format 1 keep these
flat, and prepare resumes and merges them as they are)
    folds.csv                        ID,Label,fold (multi-label stratified)
    coco/<layout>/fold<K>.json       COCO instances of fold K: every cell with its image's labels
    coco/<layout>/fold<K>.store      the same as arrays that training memory-maps (data.annotations)
    coco_truth/<layout>/fold<K>.json synthetic sets only: the same cells with their true labels
    failures.csv                     ID,error: one line per skipped image
<layout>: multilabel and per_label by default (``--layout both``), so any head trains on the set;
``--layout multilabel`` or ``--layout per_label`` writes that one only.
An image is finished when its record exists; a rerun skips finished images, so an interrupted
run is resumed by running the same command again.

A shard (``shard=(I, N)``) does the per-image work of its images only (segmentation, cache,
records) and writes its failures to failures-shard<I>of<N>.csv (and cache/index-shard<I>of<N>.csv);
the merge (``merge_prepared``) then writes folds.csv, coco/, coco_truth/, failures.csv and
cache/index.csv from the records, byte for byte what one unsharded run writes.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as coco_mask

from hpa_scc.data.annotations import write_coco
from hpa_scc.data.prepared import record_path as prepared_record
from hpa_scc.data.cache import cache_path, cache_settings, is_cached, write_index
from hpa_scc.constants import CHANNELS, CLASS_NAMES, MAX_SIZE, format_labels
from hpa_scc.utils.fileio import atomic_path, check_settings, refuse_inside, write_npy_atomic, write_text_atomic
from hpa_scc.data.folds import assign_folds
from hpa_scc.data.images import ImageReadError, ImageRecord, find_images, image_stamp, read_image, resize
from hpa_scc.utils.pool import run_pool, write_failures
from hpa_scc.segment import check_segmenter, segmenter_record
from hpa_scc.segment.folder import init_worker, seg_paths, segment_one, worker_segmenter, worker_settings
from hpa_scc.data.images import read_labels
from hpa_scc.data.synth import is_synthetic, read_true_cell_labels
from hpa_scc.data.shard import Shard, check_shard, gather_shards, select_shard, shard_suffix
from hpa_scc.weak.targets import LAYOUTS, cell_instances, describe_cells, inherit_labels, keep_cells, transfer_labels

log = logging.getLogger(__name__)
PREPARE_FORMAT = 2  # 2: per-image files in hashed sub-folders (PreparedSet.fanout); a format 1 set is resumed flat
# What ``layout`` may ask for -> the COCO layouts written. "both" (the default) lets any head
# train on the prepared set; writing a layout costs only its JSON (the records are shared).
LAYOUT_CHOICES = {"both": LAYOUTS, **{name: (name,) for name in LAYOUTS}}


class NoCellsError(ValueError):
    """The segmenter found no cell (after the filters) in an image."""


@dataclass
class StepReport:
    """What a folder-wide step did: written now, skipped as already done, failed (id, error)."""

    name: str
    out_dir: Path
    written: int = 0
    skipped_existing: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    failures_file: str = "failures.csv"

    def summary(self) -> str:
        head = (f"{self.name} {self.out_dir}: {self.written} images done now, "
                f"{self.skipped_existing} already done, {len(self.failures)} skipped")
        if self.failures:
            head += f" (listed in {self.out_dir / self.failures_file})"
        lines = [head] + [f"  skipped {image_id}: {error}" for image_id, error in self.failures[:5]]
        return "\n".join(lines + self.extra)


def _segment_job(record: ImageRecord) -> tuple[str, bool, str | None]:
    try:
        _, _, now = segment_one(record, worker_segmenter(), Path(worker_settings()["out_dir"]))
        return record.image_id, now, None
    except (ImageReadError, OSError, ValueError) as exc:
        return record.image_id, False, str(exc)


def segment_folder(data_dir: str | os.PathLike, out_dir: str | os.PathLike, *, segmenter: str = "builtin",
                   segmenter_options: dict | None = None, workers: int = 1,
                   labels_csv: str | os.PathLike | None = None, progress: bool = True,
                   shard: Shard | None = None) -> StepReport:
    """Segment every image of ``data_dir`` into OUT_DIR/<ID>_{cells,nuclei}.png (resumable).

    ``shard=(I, N)``: only the images of shard I; failures go to failures-shard<I>of<N>.csv,
    which ``merge_failures`` gathers into failures.csv.
    """
    out_dir = Path(out_dir)
    check_shard(shard)
    refuse_inside(out_dir, data_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_segmenter(segmenter, **(segmenter_options or {}))  # fail now, not in every worker
    records = select_shard(find_images(data_dir, labels_csv), shard)  # inputs before the settings record
    # Label images made by another segmenter are never mixed in: another one into this folder is refused.
    check_settings(out_dir, {"segmenter": segmenter, "segmenter_options": segmenter_record(segmenter_options) or {}},
                   "segment.json")
    report = StepReport("segment", out_dir, failures_file=f"failures{shard_suffix(shard)}.csv")
    settings = {"out_dir": str(out_dir)}
    for image_id, now, error in run_pool(_segment_job, records, workers=workers, initializer=init_worker,
                                         initargs=(segmenter, segmenter_options or {}, settings),
                                         desc="segment", progress=progress):
        if error:
            report.failures.append((image_id, error))
            log.warning("skipped %s: %s", image_id, error)
        elif now:
            report.written += 1
        else:
            report.skipped_existing += 1
    report.failures.sort()
    write_failures(out_dir / report.failures_file, report.failures)
    if shard is not None:
        report.extra.append(_merge_hint("segment", out_dir, shard))
    return report


def merge_failures(out_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None, *,
                   labels_csv: str | os.PathLike | None = None) -> StepReport:
    """Gather a sharded ``segment`` run's failures-shard*.csv into OUT_DIR/failures.csv.

    A failure line of an image that has its label images now (a later rerun segmented it) is
    dropped. With ``data_dir``: fails, naming them, if some of its images have neither label
    images nor a failure line (a shard did not finish).
    """
    out_dir = Path(out_dir)
    ids = None if data_dir is None else [r.image_id for r in find_images(data_dir, labels_csv)]
    finished, failures, seen = gather_shards(out_dir, ids,
                                             lambda image_id: all(p.is_file() for p in seg_paths(out_dir, image_id)))
    report = StepReport("merge segment", out_dir, skipped_existing=len(finished), failures=failures)
    write_failures(out_dir / "failures.csv", report.failures)
    report.extra.append(f"  merged {len(seen)} shard failure log(s) into {out_dir / 'failures.csv'}")
    return report


def _merge_hint(step: str, out_dir: Path, shard: Shard) -> str:
    return (f"  shard {shard[0]}/{shard[1]} done. Once every shard has finished, merge them: "
            f"python -m hpa_scc {step} DATA_DIR {out_dir} <the same options> --merge")


# --- prepare: segment + cache + per-image record -------------------------------------------------
def encode_cells(cells_small: np.ndarray, cell_ids: list[int]) -> list[dict]:
    """RLE, area and bbox (x, y, w, h) of each cell id in a label image; vanished cells dropped."""
    if not cell_ids:
        return []
    stack = np.asfortranarray(np.stack([cells_small == k for k in cell_ids], axis=2).astype(np.uint8))
    rles = coco_mask.encode(stack)
    areas = coco_mask.area(rles)
    boxes = coco_mask.toBbox(rles)
    out = []
    for cell_id, rle, area, box in zip(cell_ids, rles, areas, boxes, strict=True):
        if area == 0:
            continue  # a sliver that vanished when resized
        out.append({"cell_id": int(cell_id), "area": int(area), "bbox": [float(v) for v in box],
                    "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}})
    return out


def _prepare_job(record: ImageRecord) -> tuple[str, dict | None, str | None, str]:
    """Worker: one image -> (id, its record (cells at the training size, written last), error,
    how: "new", "reused" or "relabelled" (reused, with the labels the table has now))."""
    s = worker_settings()
    out = Path(s["out_dir"])
    record_path = prepared_record(out, record.image_id, s["fanout"])
    npy = cache_path(out / "cache", record.image_id, s["fanout"])
    try:
        source = image_stamp(record)  # what the record is made from: its channel files now
    except ImageReadError as exc:
        return record.image_id, None, str(exc), "new"
    result = None
    if record_path.is_file() and is_cached(npy, (len(CHANNELS), s["size"], s["size"])):
        try:
            result = json.loads(record_path.read_text())
        except json.JSONDecodeError:
            result = None  # damaged: redo this image
        if result is not None and result.get("source") == source:
            labels = list(record.labels) if record.labels else None
            if result.get("labels") == labels:
                return record.image_id, result, None, "reused"
            result["labels"] = labels  # the table changed: a record's labels follow it
            write_text_atomic(record_path, json.dumps(result, separators=(",", ":")))
            return record.image_id, result, None, "relabelled"
    # made from other channel files (changed, replaced, or an earlier version without a stamp)
    how = "redone" if result is not None else "new"
    try:
        record_path.unlink(missing_ok=True)  # a crash below must not leave the old record vouching for new files
        image = read_image(record.folder, record.image_id)
        nuclei, cells, _ = segment_one(record, worker_segmenter(), out / "segmentation", image, fanout=s["fanout"])
        size = s["size"]
        write_npy_atomic(npy, np.stack([resize(plane, size) for plane in image]))
        infos = keep_cells(describe_cells(cells), min_cell_area_px=s["min_cell_area_px"],
                           drop_border_cells=s["drop_border_cells"])
        cells_small = cv2.resize(cells, (size, size), interpolation=cv2.INTER_NEAREST)
        encoded = encode_cells(cells_small, [c.cell_id for c in infos])
        if not encoded:
            raise NoCellsError(f"no cell found in {record.image_id} (after min area {s['min_cell_area_px']} px"
                               f"{', border cells dropped' if s['drop_border_cells'] else ''}); image skipped")
        border = {c.cell_id: c.touches_border for c in infos}
        for cell in encoded:
            cell["touches_border"] = border[cell["cell_id"]]
        result = {"image_id": record.image_id, "height": size, "width": size,
                  "orig_height": int(image.shape[1]), "orig_width": int(image.shape[2]),
                  "labels": list(record.labels) if record.labels else None, "cells": encoded, "source": source}
        truth = s.get("truth_dir")
        if truth:
            true_cells = read_labels(Path(truth) / "masks" / f"{record.image_id}.png")
            if record.image_id not in s["true_labels"]:
                raise ValueError(f"{record.image_id} is not in {truth}/cells.csv; the synthetic set is incomplete")
            transferred = transfer_labels(cells, true_cells, s["true_labels"][record.image_id])
            result["true_labels"] = {str(k): v[0] for k, v in transferred.items()}
            result["true_cell"] = {str(k): v[1] for k, v in transferred.items()}
        write_text_atomic(record_path, json.dumps(result, separators=(",", ":")))
        return record.image_id, result, None, how
    except (ImageReadError, OSError, ValueError) as exc:
        return record.image_id, None, str(exc), how


def coco_file(records: list[dict], layout: str, *, truth: bool = False, description: str = "") -> dict:
    """Records -> a COCO instances dict (images in the given order, ids from their table index).

    Weak: every cell carries its image's labels. ``truth``: each cell carries the true labels
    transferred from the synthetic truth. Image records keep the image-level labels.
    """
    images, annotations = [], []
    for rec in records:
        cells = {c["cell_id"]: c for c in rec["cells"]}
        if truth:
            labels = {k: rec["true_labels"][str(k)] for k in cells}
        else:
            labels = inherit_labels(cells, rec["labels"])
        images.append({"id": rec["index"], "file_name": f"{rec['image_id']}.npy", "image_name": rec["image_id"],
                       "height": rec["height"], "width": rec["width"], "orig_height": rec["orig_height"],
                       "orig_width": rec["orig_width"], "labels": rec["labels"]})
        for inst in cell_instances(labels, layout):
            cell = cells[inst.cell_id]
            ann = {"id": len(annotations) + 1, "image_id": rec["index"], "category_id": inst.category_id,
                   "segmentation": cell["segmentation"], "area": cell["area"], "bbox": cell["bbox"], "iscrowd": 0,
                   "cell_id": inst.cell_id, "touches_border": cell["touches_border"]}
            if inst.label_vector is not None:
                ann["label_vector"] = list(inst.label_vector)
            annotations.append(ann)
    categories = [{"id": c + 1, "name": name, "supercategory": "location"} for c, name in enumerate(CLASS_NAMES)]
    info = {"description": description, "layout": layout, "labels": "true cell labels" if truth else
            "image labels inherited by every cell", "category_ids": "class index + 1; 0 is background"}
    return {"info": info, "images": images, "annotations": annotations, "categories": categories}


def _format_of(out_dir: Path) -> int:
    """The format of the set prepared in ``out_dir`` (its prepare.json), PREPARE_FORMAT for a new one."""
    try:
        return int(json.loads((out_dir / "prepare.json").read_text()).get("format", 1))
    except (OSError, ValueError):
        return PREPARE_FORMAT


def prepare_dataset(data_dir: str | os.PathLike, out_dir: str | os.PathLike, *, size: int = 512,
                    segmenter: str = "builtin", segmenter_options: dict | None = None, n_folds: int = 5,
                    seed: int = 0, layout: str = "both", min_cell_area_px: int = 0,
                    drop_border_cells: bool = False, workers: int = 1,
                    labels_csv: str | os.PathLike | None = None, progress: bool = True,
                    shard: Shard | None = None, merge_only: bool = False) -> StepReport:
    """Segment, cache and turn ``data_dir`` into pseudo-labelled COCO files under ``out_dir``.

    ``layout``: "both" (coco/multilabel/ and coco/per_label/), "multilabel" or "per_label".
    ``shard=(I, N)``: the per-image work of shard I only, no COCO files (see the module text).
    ``merge_only``: no per-image work; check the settings against prepare.json, then
    ``merge_prepared`` the finished shards.
    """
    if layout not in LAYOUT_CHOICES:
        raise ValueError(f"unknown layout {layout!r}; choose one of {list(LAYOUT_CHOICES)}")
    if not 16 <= size <= MAX_SIZE:  # past the largest HPA image (3072 px) only memory grows, by size^2
        raise ValueError(f"--size {size} is out of range; use 16 to {MAX_SIZE} px (512 is the usual training size)")
    if min_cell_area_px < 0:
        raise ValueError(f"--min-cell-area {min_cell_area_px}: an area in px is 0 or more")
    if n_folds < 1:
        raise ValueError(f"--folds {n_folds}: use 1 (one file all.json) or more (5 is the usual)")
    check_shard(shard)
    if merge_only and shard is not None:
        raise ValueError("--merge gathers every shard; give it without --shard")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    refuse_inside(out_dir, data_dir)
    records = find_images(data_dir, labels_csv)
    unlabelled = [r.image_id for r in records if not r.labels]
    if unlabelled:
        raise ValueError(f"prepare needs image labels, and {len(unlabelled)} image(s) have none (e.g. "
                         f"{unlabelled[0]}); give DATA_DIR/train.csv or --labels, or use 'segment' for unlabelled images")
    if n_folds > 1 and len(records) < n_folds:  # now, not after every image is segmented
        fix = "--folds 1 (one file, all.json)" if len(records) < 2 else f"--folds {len(records)} or fewer"
        raise ValueError(f"--folds {n_folds} needs at least {n_folds} images and {data_dir} has {len(records)}; "
                         f"use {fix}")
    if merge_only and not (out_dir / "prepare.json").is_file():
        raise FileNotFoundError(f"nothing to merge: {out_dir / 'prepare.json'} not found; run the shards first "
                                "(the same command with --shard I/N instead of --merge)")
    if not merge_only:
        check_segmenter(segmenter, **(segmenter_options or {}))  # fail now, not in every worker
    out_dir.mkdir(parents=True, exist_ok=True)
    # A set prepared by format 1 (flat per-image folders) is resumed and merged as it is.
    fanout = _format_of(out_dir) >= 2
    recorded = {"format": PREPARE_FORMAT if fanout else 1, "size": size, "segmenter": segmenter, "layout": layout,
                "min_cell_area_px": min_cell_area_px, "drop_border_cells": drop_border_cells, "folds": n_folds,
                "seed": seed}
    if not merge_only:  # the merge segments nothing: its options are not asked again
        recorded["segmenter_options"] = segmenter_record(segmenter_options)  # None (no key before) without options
    check_settings(out_dir, recorded, name="prepare.json")
    check_settings(out_dir / "cache", cache_settings(size, fanout=fanout), sweep=False)  # out_dir's sweep covered it
    if merge_only:
        return merge_prepared(data_dir, out_dir, labels_csv=labels_csv)
    synthetic = is_synthetic(data_dir)
    settings = {"out_dir": str(out_dir), "size": size, "fanout": fanout, "min_cell_area_px": min_cell_area_px,
                "drop_border_cells": drop_border_cells}
    if synthetic:
        settings.update(truth_dir=str(data_dir), true_labels=read_true_cell_labels(data_dir))

    todo = select_shard(records, shard)
    suffix = shard_suffix(shard)
    report = StepReport("prepare", out_dir, failures_file=f"failures{suffix}.csv")
    # Only each finished image's original size is kept here; its record (cells and RLE) stays on
    # disk until its fold's COCO file is written, so memory does not grow with the set.
    results: dict[str, tuple[int, int]] = {}
    how_done: Counter = Counter()
    try:
        for image_id, result, error, how in run_pool(_prepare_job, todo, workers=workers, initializer=init_worker,
                                                initargs=(segmenter, segmenter_options or {}, settings),
                                                desc=f"prepare {size}px", progress=progress):
            if error:
                report.failures.append((image_id, error))
                log.warning("skipped %s: %s", image_id, error)
            else:
                how_done[how] += 1
                results[image_id] = (result["orig_height"], result["orig_width"])
    finally:
        report.failures.sort()
        _write_logs(out_dir, todo, results, report.failures, suffix)
    if how_done["relabelled"]:
        report.extra.append(f"  {how_done['relabelled']} finished image(s) relabelled: their labels changed in the "
                            "table")
    report.skipped_existing = how_done["reused"] + how_done["relabelled"]
    report.written = how_done["new"] + how_done["redone"]
    if how_done["redone"]:
        report.extra.append(f"  {how_done['redone']} finished image(s) redone: their channel files changed (or were "
                            "prepared by an earlier version, which recorded no stamp)")
    if shard is not None:
        report.extra.append(_merge_hint("prepare", out_dir, shard))
        return report
    if not results:  # empty COCO files would only fail later, in train, far from the cause
        raise ValueError(f"no image of {data_dir} could be prepared: all {len(report.failures)} failed (e.g. "
                         f"{report.failures[0][0]}: {report.failures[0][1]}); see {out_dir / report.failures_file}"
                         if report.failures else f"{data_dir} holds no image to prepare")
    _write_coco(data_dir, out_dir, records, results, report, size=size, segmenter=segmenter, n_folds=n_folds,
                seed=seed, layout=layout, fanout=fanout)
    return report


def merge_prepared(data_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                   labels_csv: str | os.PathLike | None = None) -> StepReport:
    """Gather the records and failure logs of a sharded ``prepare`` into its dataset files.

    Writes folds.csv, coco/, coco_truth/, failures.csv and cache/index.csv with the settings of
    OUT_DIR/prepare.json, byte for byte what one unsharded run writes. Fails, naming them, if
    some images have neither a record nor a line in a shard's failure log (a shard did not finish).
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    meta = out_dir / "prepare.json"
    if not meta.is_file():
        raise FileNotFoundError(f"nothing to merge: {meta} not found; run the shards first (--shard I/N)")
    s = json.loads(meta.read_text())
    fanout = int(s.get("format", 1)) >= 2
    records = find_images(data_dir, labels_csv)
    results: dict[str, tuple[int, int]] = {}

    def done(image_id: str) -> bool:
        try:
            rec = json.loads(prepared_record(out_dir, image_id, fanout).read_text())
            results[image_id] = (rec["orig_height"], rec["orig_width"])
            return True
        except (FileNotFoundError, json.JSONDecodeError):
            return False  # damaged records are redone by a rerun, as missing ones

    _, failures, seen = gather_shards(out_dir, [r.image_id for r in records], done)
    report = StepReport("merge prepare", out_dir, skipped_existing=len(results), failures=failures)
    _write_logs(out_dir, records, results, report.failures, "")
    _write_coco(data_dir, out_dir, records, results, report, size=s["size"], segmenter=s["segmenter"],
                n_folds=s["folds"], seed=s["seed"], layout=s["layout"], fanout=fanout)
    report.extra.append(f"  merged the records of {len(results)} images and {len(seen)} shard failure log(s)")
    return report


def _write_logs(out_dir: Path, records: list[ImageRecord], results: dict[str, tuple[int, int]],
                failures: list[tuple[str, str]], suffix: str) -> None:
    """failures<suffix>.csv and cache/index<suffix>.csv of the images of ``records``."""
    write_failures(out_dir / f"failures{suffix}.csv", failures)
    write_index(out_dir / "cache" / f"index{suffix}.csv", [r for r in records if r.image_id in results], results)


def _write_coco(data_dir: Path, out_dir: Path, records: list[ImageRecord], finished: Mapping[str, object],
                report: StepReport, *, size: int, segmenter: str, n_folds: int, seed: int, layout: str,
                fanout: bool = True) -> None:
    """folds.csv and the COCO files (with their stores) of every fold, from the records of the
    ``finished`` images of ``data_dir``, read from OUT_DIR/records/ one fold at a time: memory
    holds one fold's cells, not the whole set's."""
    # Folds come from the whole label table, so a skipped image never moves the others.
    folds = assign_folds([r.labels for r in records], n_folds, seed) if n_folds > 1 else np.zeros(len(records), int)
    with atomic_path(out_dir / "folds.csv", ".csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ID", "Label", "fold"])
        for rec, fold in zip(records, folds, strict=True):
            writer.writerow([rec.image_id, format_labels(rec.labels), int(fold)])
    kinds = [("coco", False)] + ([("coco_truth", True)] if is_synthetic(data_dir) else [])
    n_cells = n_images = 0
    for fold in range(max(n_folds, 1)):
        subset = []
        for index, (rec, rec_fold) in enumerate(zip(records, folds, strict=True)):
            if rec_fold == fold and rec.image_id in finished:
                saved = json.loads(prepared_record(out_dir, rec.image_id, fanout).read_text())
                subset.append({**saved, "index": index + 1, "fold": fold})
        n_images += len(subset)
        n_cells += sum(len(r["cells"]) for r in subset)
        file_name = f"fold{fold}.json" if n_folds > 1 else "all.json"
        for folder, truth in kinds:
            for name in LAYOUT_CHOICES[layout]:
                coco = coco_file(subset, name, truth=truth,
                                 description=f"{data_dir.name}: fold {fold} of {n_folds}, {segmenter} cells, {size} px")
                write_coco(out_dir / folder / name / file_name, coco)
        del subset
    for folder, _ in kinds:
        for name in LAYOUT_CHOICES[layout]:
            report.extra.append(f"  {folder}/{name}/: {max(n_folds, 1)} COCO file(s), {n_cells} cells in "
                                f"{n_images} images")
