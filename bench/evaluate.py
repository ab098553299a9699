"""Metric benchmark: ``evaluate_files`` on a test-set-sized submission, on one core.

    .venv/bin/python bench/evaluate.py [--images 559] [--size 2048] [--cells 20] [--json out.json]

The data mimic the Kaggle test set: 559 images of 2048x2048, ~20 cells each, every cell
predicted with all 19 labels (~212k detections), the truth holding 1-3 labels per cell.
Cells are random ellipses; a predicted cell is its true ellipse shifted and rescaled so that
IoUs spread around the 0.6 threshold. Each mask is encoded once and its string repeated per
label, as a real submission does. The CSVs are generated once (2 processes) and cached under
--work (default runs/bench-evaluate); reruns only time. Timing pins the process to one core
with one thread and covers reading both CSVs plus scoring. Target: < 10 s.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy is imported: one thread means one core

import argparse  # noqa: E402
import base64  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from pycocotools import mask as coco_mask  # noqa: E402

from hpa_scc.constants import NUM_CLASSES  # noqa: E402
from hpa_scc.utils.fileio import write_text_atomic  # noqa: E402
from hpa_scc.evaluation.metric import evaluate_files, format_result  # noqa: E402
from hpa_scc.evaluation.submission import SubmissionRow, encode_mask, write_submission  # noqa: E402

BENCH_VERSION = 2  # bump when the generator changes, so a stale cache is rebuilt
AXES_PX = (40, 110)  # ellipse semi-axes at 2048 px; scaled with size / 2048
SHIFT_SHARE = (0.1, 0.8)  # predicted centre shift, as a share of the smaller semi-axis
SCALE = (0.75, 1.3)  # predicted semi-axes rescaled by this factor


class _Drawer:
    """Draws one ellipse at a time into a reused canvas and encodes it (Fortran order, fast)."""

    def __init__(self, size: int):
        # Drawn transposed in a C-order [W, H] canvas, so canvas.T is the Fortran-ordered [H, W]
        # mask pycocotools encodes without a copy (about 10x faster than a C-order mask).
        self.canvas = np.zeros((size, size), np.uint8)

    def encode(self, cx: float, cy: float, ax: float, ay: float, angle: float) -> str:
        center, axes = (int(round(cy)), int(round(cx))), (max(1, int(round(ay))), max(1, int(round(ax))))
        cv2.ellipse(self.canvas, center, axes, -angle, 0, 360, 1, -1)  # transposed frame: x<->y
        text = encode_mask(self.canvas.T.view(bool))
        cv2.ellipse(self.canvas, center, axes, -angle, 0, 360, 0, -1)  # erase: the canvas stays zero
        return text


def make_image(index: int, size: int, n_cells: int, seed: int) -> tuple[SubmissionRow, SubmissionRow, list[float]]:
    """(truth row, predicted row, IoU of each predicted cell with its true cell) for one image."""
    rng = np.random.default_rng([seed, index])
    drawer = _Drawer(size)
    s = size / 2048
    image_id = f"bench{index:04d}"
    truth, pred = SubmissionRow(image_id, size, size), SubmissionRow(image_id, size, size)
    n = int(rng.integers(max(1, n_cells - 4), n_cells + 5))  # ~n_cells per image on average
    ious = []
    for _ in range(n):
        ax, ay = rng.uniform(*AXES_PX, size=2) * s
        cx, cy = rng.uniform(ax, size - ax), rng.uniform(ay, size - ay)
        angle = rng.uniform(0, 180)
        t_text = drawer.encode(cx, cy, ax, ay, angle)
        shift = rng.uniform(*SHIFT_SHARE) * min(ax, ay)
        direction = rng.uniform(0, 2 * np.pi)
        p_text = drawer.encode(cx + shift * np.cos(direction), cy + shift * np.sin(direction),
                               ax * rng.uniform(*SCALE), ay * rng.uniform(*SCALE), angle + rng.normal(0, 10))
        rles = [{"size": [size, size], "counts": _counts(t)} for t in (p_text, t_text)]
        ious.append(float(coco_mask.iou(rles[:1], rles[1:], [0])[0][0]))
        labels = rng.choice(NUM_CLASSES, size=int(rng.integers(1, 4)), replace=False)
        for label in labels:
            truth.predictions.append((int(label), 1.0, t_text))
        confidence = rng.uniform(0.0, 0.6, NUM_CLASSES)
        confidence[labels] = rng.uniform(0.3, 1.0, len(labels))  # true labels score higher, with overlap
        for label in range(NUM_CLASSES):
            pred.predictions.append((label, float(np.round(confidence[label], 4)), p_text))
    return truth, pred, ious


def _counts(text: str) -> bytes:
    return zlib.decompress(base64.b64decode(text))


def _make_image_task(task):
    return make_image(*task)


def build_data(work: Path, n_images: int, size: int, n_cells: int, seed: int) -> tuple[Path, Path]:
    """Write (or reuse) work/solution.csv and work/submission.csv for these parameters."""
    params = {"version": BENCH_VERSION, "images": n_images, "size": size, "cells": n_cells, "seed": seed}
    solution, submission, meta = work / "solution.csv", work / "submission.csv", work / "params.json"
    if meta.exists() and json.loads(meta.read_text()) == params and solution.exists() and submission.exists():
        print(f"reusing {work}")
        return solution, submission
    meta.unlink(missing_ok=True)  # written last: its presence means both CSVs are complete
    print(f"generating {n_images} images of {size}x{size} px, ~{n_cells} cells each, into {work} ...", flush=True)
    start = time.perf_counter()
    tasks = [(i, size, n_cells, seed) for i in range(n_images)]
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.map(_make_image_task, tasks, chunksize=8)
    ious = np.array([v for _, _, image_ious in results for v in image_ious])
    write_submission(solution, [t for t, _, _ in results])
    write_submission(submission, [p for _, p, _ in results])
    write_text_atomic(meta, json.dumps(params) + "\n")
    n_det = sum(len(p.predictions) for _, p, _ in results)
    print(f"  {len(ious)} cells, {n_det} detections in {time.perf_counter() - start:.0f} s; predicted-cell IoU "
          f"median {np.median(ious):.2f}, share >= 0.6: {np.mean(ious >= 0.6):.2f}")
    return solution, submission


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=559, help="Kaggle test set: 559")
    parser.add_argument("--size", type=int, default=2048, help="image side, px")
    parser.add_argument("--cells", type=int, default=20, help="mean cells per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="time this many runs, report the best")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-evaluate"))
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    solution, submission = build_data(args.work, args.images, args.size, args.cells, args.seed)

    cv2.setNumThreads(1)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, after the 2-process generation
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = evaluate_files(solution, submission)
        times.append(time.perf_counter() - start)
    print(format_result(result))
    n_det = sum(result.n_detections.values()) + result.n_ignored_detections
    seconds = min(times)
    print(f"evaluate_files: {seconds:.2f} s on one core for {result.n_images} images, {n_det} detections "
          f"({platform.processor() or platform.machine()}); target < 10 s")
    if args.json is not None:
        write_text_atomic(args.json, json.dumps({"seconds": seconds, "times": times, "mAP": result.mAP,
                                                 "images": result.n_images, "detections": n_det}) + "\n")


if __name__ == "__main__":
    main()
