"""Segment a data set and turn it into pseudo-labelled COCO instances (the "dataset" step).

    python -m hpa_scc segment DATA_DIR OUT_DIR --segmenter builtin --workers 4
    python -m hpa_scc prepare DATA_DIR OUT_DIR --size 512 --segmenter builtin --folds 5
    python dataset.py DATA_DIR OUT_DIR --size 512 --segmenter builtin --folds 5     # the same

On a cluster, a SLURM job array splits the images over its tasks (see hpa_scc.data.shard):
    sbatch --array=0-15 --wrap "python -m hpa_scc prepare DATA_DIR OUT_DIR --size 512 --shard slurm"
    python -m hpa_scc prepare DATA_DIR OUT_DIR --size 512 --merge    # after the last task

``segment`` writes OUT_DIR/<ID>_cells.png and OUT_DIR/<ID>_nuclei.png (uint16, full size; the
folder's layout is ``hpa_scc.segment.folder``'s).
``prepare`` writes, under OUT_DIR, through ``hpa_scc.data.prepared.PreparedSet`` (which names every path):
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
# The set's format, paths and COCO builder are its owner's (coco_file is still importable from here).
from hpa_scc.data.prepared import PREPARE_FORMAT, PREPARE_JSON, PreparedSet, coco_file, labels_folder
from hpa_scc.data.cache import CACHE_JSON, cache_settings, is_cached, write_index
from hpa_scc.constants import CHANNELS, MAX_SIZE
from hpa_scc.utils.fileio import check_settings, failures_name, refuse_inside, write_npy_atomic
from hpa_scc.data.folds import assign_folds
from hpa_scc.data.images import ImageReadError, ImageRecord, find_images, image_stamp, read_image, resize
from hpa_scc.utils.pool import run_pool, write_failures
from hpa_scc.segment import check_segmenter, segmenter_record
from hpa_scc.segment.folder import SEGMENT_JSON, SegmenterSpec, init_worker, seg_paths, segment_one, worker_segmenter
from hpa_scc.data.synth import SynthSet
from hpa_scc.data.shard import Shard, check_shard, gather_shards, select_shard, shard_suffix
from hpa_scc.weak.targets import LAYOUTS, describe_cells, keep_cells, transfer_labels

log = logging.getLogger(__name__)
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
    failures_file: str = failures_name()

    def summary(self) -> str:
        head = (f"{self.name} {self.out_dir}: {self.written} images done now, "
                f"{self.skipped_existing} already done, {len(self.failures)} skipped")
        if self.failures:
            head += f" (listed in {self.out_dir / self.failures_file})"
        lines = [head] + [f"  skipped {image_id}: {error}" for image_id, error in self.failures[:5]]
        return "\n".join(lines + self.extra)


@dataclass(frozen=True)
class SegmentSettings:
    """What a worker of ``segment`` needs, sent with each image (``_segment_job``)."""

    out_dir: Path
    segmenter: SegmenterSpec


def _segment_job(job: tuple[SegmentSettings, ImageRecord]) -> tuple[str, bool, str | None]:
    settings, record = job
    try:
        _, _, now = segment_one(record, worker_segmenter(settings.segmenter), settings.out_dir)
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
                   SEGMENT_JSON)
    report = StepReport("segment", out_dir, failures_file=failures_name(shard_suffix(shard)))
    settings = SegmentSettings(out_dir, SegmenterSpec(segmenter, segmenter_options or {}))
    for image_id, now, error in run_pool(_segment_job, [(settings, r) for r in records], workers=workers,
                                         initializer=init_worker, initargs=(settings.segmenter,),
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
    write_failures(out_dir / report.failures_file, report.failures)
    report.extra.append(f"  merged {len(seen)} shard failure log(s) into {out_dir / report.failures_file}")
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


@dataclass(frozen=True)
class PrepareSettings:
    """What a worker of ``prepare`` needs, sent with each image (``_prepare_job``)."""

    prepared: PreparedSet  # the set being written, its per-image layout (fanout) given
    size: int
    min_cell_area_px: int
    drop_border_cells: bool
    segmenter: SegmenterSpec
    truth: SynthSet | None = None  # a synthetic set's truth: its true labels go into the records


def _prepare_job(job: tuple[PrepareSettings, ImageRecord, dict | None]) -> tuple[str, dict | None, str | None, str]:
    """Worker: one image -> (id, its record (cells at the training size, written last), error,
    how: "new", "reused" or "relabelled" (reused, with the labels the table has now)).
    ``job``: the settings, the image, and its cells' true labels (synthetic sets; None: not in cells.csv)."""
    s, record, true_labels = job
    out = s.prepared
    record_path = out.record_path(record.image_id)
    npy = out.image_path(record.image_id)
    try:
        source = image_stamp(record)  # what the record is made from: its channel files now
    except ImageReadError as exc:
        return record.image_id, None, str(exc), "new"
    result = None
    if record_path.is_file() and is_cached(npy, (len(CHANNELS), s.size, s.size)):
        try:
            result = out.read_record(record.image_id)
        except json.JSONDecodeError:
            result = None  # damaged: redo this image
        if result is not None and result.get("source") == source:
            labels = list(record.labels) if record.labels else None
            if result.get("labels") == labels:
                return record.image_id, result, None, "reused"
            result["labels"] = labels  # the table changed: a record's labels follow it
            out.write_record(record.image_id, result)
            return record.image_id, result, None, "relabelled"
    # made from other channel files (changed, replaced, or an earlier version without a stamp)
    how = "redone" if result is not None else "new"
    try:
        record_path.unlink(missing_ok=True)  # a crash below must not leave the old record vouching for new files
        image = read_image(record.folder, record.image_id)
        nuclei, cells, _ = segment_one(record, worker_segmenter(s.segmenter), out.segmentation_dir, image,
                                       fanout=out.fanout)
        size = s.size
        write_npy_atomic(npy, np.stack([resize(plane, size) for plane in image]))
        infos = keep_cells(describe_cells(cells), min_cell_area_px=s.min_cell_area_px,
                           drop_border_cells=s.drop_border_cells)
        cells_small = cv2.resize(cells, (size, size), interpolation=cv2.INTER_NEAREST)
        encoded = encode_cells(cells_small, [c.cell_id for c in infos])
        if not encoded:
            raise NoCellsError(f"no cell found in {record.image_id} (after min area {s.min_cell_area_px} px"
                               f"{', border cells dropped' if s.drop_border_cells else ''}); image skipped")
        border = {c.cell_id: c.touches_border for c in infos}
        for cell in encoded:
            cell["touches_border"] = border[cell["cell_id"]]
        result = {"image_id": record.image_id, "height": size, "width": size,
                  "orig_height": int(image.shape[1]), "orig_width": int(image.shape[2]),
                  "labels": list(record.labels) if record.labels else None, "cells": encoded, "source": source}
        if s.truth is not None:
            true_cells = s.truth.read_mask(record.image_id)
            if true_labels is None:
                raise ValueError(f"{record.image_id} is not in {s.truth.cells_csv}; the synthetic set is incomplete")
            transferred = transfer_labels(cells, true_cells, true_labels)
            result["true_labels"] = {str(k): v[0] for k, v in transferred.items()}
            result["true_cell"] = {str(k): v[1] for k, v in transferred.items()}
        out.write_record(record.image_id, result)
        return record.image_id, result, None, how
    except (ImageReadError, OSError, ValueError) as exc:
        return record.image_id, None, str(exc), how


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
    if merge_only and not PreparedSet(out_dir).exists():
        raise FileNotFoundError(f"nothing to merge: {PreparedSet(out_dir).settings_path} not found; run the shards "
                                "first (the same command with --shard I/N instead of --merge)")
    if not merge_only:
        check_segmenter(segmenter, **(segmenter_options or {}))  # fail now, not in every worker
    out_dir.mkdir(parents=True, exist_ok=True)
    # A set prepared by format 1 (flat per-image folders) is resumed and merged as it is.
    written = PreparedSet(out_dir).written_format()
    fanout = (PREPARE_FORMAT if written is None else written) >= 2
    prepared = PreparedSet(out_dir, fanout=fanout)  # the layout decided here, before prepare.json records it
    recorded = {"format": PREPARE_FORMAT if fanout else 1, "size": size, "segmenter": segmenter, "layout": layout,
                "min_cell_area_px": min_cell_area_px, "drop_border_cells": drop_border_cells, "folds": n_folds,
                "seed": seed}
    if not merge_only:  # the merge segments nothing: its options are not asked again
        recorded["segmenter_options"] = segmenter_record(segmenter_options)  # None (no key before) without options
    check_settings(out_dir, recorded, name=PREPARE_JSON)
    check_settings(prepared.cache_dir, cache_settings(size, fanout=fanout), CACHE_JSON, sweep=False)  # out_dir's sweep covered it
    if merge_only:
        return merge_prepared(data_dir, out_dir, labels_csv=labels_csv)
    truth = SynthSet(data_dir)
    truth = truth if truth.is_synthetic else None
    true_labels = truth.true_labels() if truth is not None else {}
    settings = PrepareSettings(prepared, size, min_cell_area_px, drop_border_cells,
                               SegmenterSpec(segmenter, segmenter_options or {}), truth)

    todo = select_shard(records, shard)
    suffix = shard_suffix(shard)
    report = StepReport("prepare", out_dir, failures_file=prepared.failures_path(suffix).name)
    # Only each finished image's original size is kept here; its record (cells and RLE) stays on
    # disk until its fold's COCO file is written, so memory does not grow with the set.
    results: dict[str, tuple[int, int]] = {}
    how_done: Counter = Counter()
    try:
        # each image travels with the settings and its own true labels (not the whole table)
        jobs = [(settings, r, true_labels.get(r.image_id)) for r in todo]
        for image_id, result, error, how in run_pool(_prepare_job, jobs, workers=workers, initializer=init_worker,
                                                     initargs=(settings.segmenter,), desc=f"prepare {size}px",
                                                     progress=progress):
            if error:
                report.failures.append((image_id, error))
                log.warning("skipped %s: %s", image_id, error)
            else:
                how_done[how] += 1
                results[image_id] = (result["orig_height"], result["orig_width"])
    finally:
        report.failures.sort()
        _write_logs(prepared, todo, results, report.failures, suffix)
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
    _write_coco(data_dir, prepared, records, results, report, size=size, segmenter=segmenter, n_folds=n_folds,
                seed=seed, layout=layout)
    return report


def merge_prepared(data_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                   labels_csv: str | os.PathLike | None = None) -> StepReport:
    """Gather the records and failure logs of a sharded ``prepare`` into its dataset files.

    Writes folds.csv, coco/, coco_truth/, failures.csv and cache/index.csv with the settings of
    OUT_DIR/prepare.json, byte for byte what one unsharded run writes. Fails, naming them, if
    some images have neither a record nor a line in a shard's failure log (a shard did not finish).
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    prepared = PreparedSet(out_dir)
    if not prepared.exists():
        raise FileNotFoundError(f"nothing to merge: {prepared.settings_path} not found; run the shards first "
                                "(--shard I/N)")
    s = prepared.settings
    records = find_images(data_dir, labels_csv)
    results: dict[str, tuple[int, int]] = {}

    def done(image_id: str) -> bool:
        try:
            rec = prepared.read_record(image_id)
            results[image_id] = (rec["orig_height"], rec["orig_width"])
            return True
        except (FileNotFoundError, json.JSONDecodeError):
            return False  # damaged records are redone by a rerun, as missing ones

    _, failures, seen = gather_shards(out_dir, [r.image_id for r in records], done)
    report = StepReport("merge prepare", out_dir, skipped_existing=len(results), failures=failures)
    _write_logs(prepared, records, results, report.failures, "")
    _write_coco(data_dir, prepared, records, results, report, size=s["size"], segmenter=s["segmenter"],
                n_folds=s["folds"], seed=s["seed"], layout=s["layout"])
    report.extra.append(f"  merged the records of {len(results)} images and {len(seen)} shard failure log(s)")
    return report


def _write_logs(prepared: PreparedSet, records: list[ImageRecord], results: dict[str, tuple[int, int]],
                failures: list[tuple[str, str]], suffix: str) -> None:
    """failures<suffix>.csv and cache/index<suffix>.csv of the images of ``records``."""
    write_failures(prepared.failures_path(suffix), failures)
    write_index(prepared.cache_index_path(suffix), [r for r in records if r.image_id in results], results)


def _write_coco(data_dir: Path, prepared: PreparedSet, records: list[ImageRecord], finished: Mapping[str, object],
                report: StepReport, *, size: int, segmenter: str, n_folds: int, seed: int, layout: str) -> None:
    """folds.csv and the COCO files (with their stores) of every fold, from the records of the
    ``finished`` images of ``data_dir``, read from OUT_DIR/records/ one fold at a time: memory
    holds one fold's cells, not the whole set's."""
    # Folds come from the whole label table, so a skipped image never moves the others.
    folds = assign_folds([r.labels for r in records], n_folds, seed) if n_folds > 1 else np.zeros(len(records), int)
    prepared.write_folds([r.image_id for r in records], [r.labels for r in records], folds)
    kinds = [("image", False)] + ([("truth", True)] if SynthSet(data_dir).is_synthetic else [])
    n_cells = n_images = 0
    for fold in range(max(n_folds, 1)):
        subset = []
        for index, (rec, rec_fold) in enumerate(zip(records, folds, strict=True)):
            if rec_fold == fold and rec.image_id in finished:
                subset.append({**prepared.read_record(rec.image_id), "index": index + 1, "fold": fold})
        n_images += len(subset)
        n_cells += sum(len(r["cells"]) for r in subset)
        for labels, truth in kinds:
            for name in LAYOUT_CHOICES[layout]:
                coco = coco_file(subset, name, truth=truth,
                                 description=f"{data_dir.name}: fold {fold} of {n_folds}, {segmenter} cells, {size} px")
                write_coco(prepared.coco_target(name, fold, n_folds, labels), coco)
        del subset
    for labels, _ in kinds:
        for name in LAYOUT_CHOICES[layout]:
            report.extra.append(f"  {labels_folder(labels)}/{name}/: {max(n_folds, 1)} COCO file(s), {n_cells} cells "
                                f"in {n_images} images")
