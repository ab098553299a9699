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
image's labels at confidence 1 (what image-level labels alone give); ``truth`` submits a
synthetic set's true cells and labels (a sanity check: it must score 1.0).

OUT_DIR gets ``submission.csv``, ``cells.csv`` (ID, cell, bbox, area, one confidence column per
class), ``predict.log`` and ``records/<ID>.json`` (per-image results: a rerun skips them).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from hpa_scc.constants import NUM_CLASSES
from hpa_scc.fileio import atomic_path, write_text_atomic
from hpa_scc.images import ImageReadError, ImageRecord, find_images, read_image, resize
from hpa_scc.segment import build_segmenter
from hpa_scc.segment.precomputed import read_labels
from hpa_scc.submission import SubmissionRow, encode_label_image, write_submission

log = logging.getLogger("hpa_scc.predict")
BASELINES = ("image-labels", "truth")
CELL_MODES = ("segmenter", "model")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    image_size: int
    in_channels: int
    head: str
    device: torch.device


def load_run(run_dir: str | os.PathLike, checkpoint: str = "best.pt", device: str = "auto") -> LoadedModel:
    """The model of a run folder (its config.yaml + a checkpoint), in eval mode."""
    from hpa_scc.checkpoint import load_checkpoint
    from hpa_scc.config import load_config
    from hpa_scc.models import build_model

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    path = run_dir / checkpoint
    if not path.is_file() and checkpoint == "best.pt":
        path = run_dir / "last.pt"  # a run without validation has no best.pt
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint {run_dir / checkpoint} (nor last.pt); train first or pass --checkpoint")
    cfg.model.weights = None  # the checkpoint below is the whole model
    model = build_model(cfg.model, image_size=cfg.data.image_size)
    model.load_state_dict(load_checkpoint(path)["model"])
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    model.to(dev).eval()
    log.info("loaded %s (%s, %s head, %d px)", path, cfg.model.backbone, cfg.model.head, cfg.data.image_size)
    return LoadedModel(model, cfg.data.image_size, cfg.model.in_channels, cfg.model.head, dev)


@torch.no_grad()
def detect(loaded: LoadedModel, image: np.ndarray, tta: bool = False) -> dict[str, np.ndarray]:
    """Model detections on one image at the training size.

    Returns masks float [N, S, S] (probabilities), scores [N] and class_scores [N, 19]: for the
    softmax head one-hot times the score, for the multilabel head score x label probability.
    With ``tta`` the horizontally flipped image is added and its detections flipped back.
    """
    size = loaded.image_size
    small = np.stack([resize(plane, size) for plane in image[: loaded.in_channels]])
    tensor = torch.from_numpy(small.astype(np.float32) / 255.0).to(loaded.device)
    inputs = [tensor, tensor.flip(-1)] if tta else [tensor]
    outputs = loaded.model(inputs)
    masks, class_scores = [], []
    for i, out in enumerate(outputs):
        m = out["masks"][:, 0].float()
        if i == 1:
            m = m.flip(-1)
        scores = out["scores"].float()
        if "label_scores" in out:
            cs = out["label_scores"].float() * scores[:, None]
        else:
            cs = torch.zeros((len(scores), NUM_CLASSES), device=scores.device)
            cs[torch.arange(len(scores)), out["labels"] - 1] = scores
        masks.append(m)
        class_scores.append(cs)
    masks_t = torch.cat(masks).cpu().numpy()
    cs_t = torch.cat(class_scores).cpu().numpy()
    return {"masks": masks_t, "class_scores": cs_t, "scores": cs_t.max(axis=1) if len(cs_t) else np.zeros(0)}


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """bool [N, H, W] x bool [M, H, W] -> IoU [N, M]."""
    a2 = a.reshape(len(a), -1).astype(np.float32)
    b2 = b.reshape(len(b), -1).astype(np.float32)
    inter = a2 @ b2.T
    union = a2.sum(1)[:, None] + b2.sum(1)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def score_cells(cells_small: np.ndarray, cell_ids: list[int], detections: dict) -> np.ndarray:
    """float [K, 19]: per cell and class, the best ``score x IoU`` of the detections."""
    conf = np.zeros((len(cell_ids), NUM_CLASSES), dtype=np.float32)
    if not cell_ids or len(detections["masks"]) == 0:
        return conf
    cell_masks = np.stack([cells_small == k for k in cell_ids])
    iou = mask_iou(detections["masks"] > 0.5, cell_masks)  # [D, K]
    # [D, K, 19] evidence, max over detections
    conf = (iou[:, :, None] * detections["class_scores"][:, None, :]).max(axis=0)
    return conf.astype(np.float32)


def cells_from_detections(detections: dict, shape: tuple[int, int], min_score: float = 0.05,
                          merge_iou: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Model-mode cells: (label image uint16 [H, W] at full size, confidences [K, 19])."""
    order = np.argsort(-detections["scores"], kind="stable")
    order = [d for d in order if detections["scores"][d] >= min_score]
    binary = detections["masks"] > 0.5
    groups: list[list[int]] = []
    for d in order:
        if not binary[d].any():
            continue
        for group in groups:
            if mask_iou(binary[d][None], binary[group[0]][None])[0, 0] >= merge_iou:
                group.append(d)
                break
        else:
            groups.append([d])
    height, width = shape
    if not groups:
        return np.zeros(shape, np.uint16), np.zeros((0, NUM_CLASSES), np.float32)
    # Paste each cell's best probability map back at full size, only over its box (never a
    # full-size map per detection); where cells overlap the more probable one wins.
    size_y, size_x = detections["masks"].shape[1:]
    scale_y, scale_x = height / size_y, width / size_x
    best = np.zeros(shape, np.float32)
    labels = np.zeros(shape, np.uint16)
    for k, group in enumerate(groups, start=1):
        prob = detections["masks"][group[0]]
        ys, xs = np.nonzero(binary[group[0]])
        y0, y1 = max(ys.min() - 1, 0), min(ys.max() + 2, size_y)
        x0, x1 = max(xs.min() - 1, 0), min(xs.max() + 2, size_x)
        Y0, Y1 = int(y0 * scale_y), min(int(np.ceil(y1 * scale_y)), height)
        X0, X1 = int(x0 * scale_x), min(int(np.ceil(x1 * scale_x)), width)
        crop = cv2.resize(prob[y0:y1, x0:x1], (X1 - X0, Y1 - Y0), interpolation=cv2.INTER_LINEAR)
        region = best[Y0:Y1, X0:X1]
        take = (crop > 0.5) & (crop > region)
        region[take] = crop[take]
        labels[Y0:Y1, X0:X1][take] = k
    conf = np.stack([detections["class_scores"][g].max(axis=0) for g in groups]).astype(np.float32)
    counts = np.bincount(labels.ravel(), minlength=len(groups) + 1)
    present = [k for k in range(1, len(groups) + 1) if counts[k]]
    remap = np.zeros(len(groups) + 1, np.uint16)
    remap[present] = np.arange(1, len(present) + 1)
    return remap[labels], conf[[k - 1 for k in present]]


def image_result(image_id: str, cells: np.ndarray, conf: np.ndarray, *, only_positive: bool = False,
                 encoded: list | None = None) -> dict:
    """Per-image record: each cell's mask encoded once (or ``encoded`` reused), bbox, area, 19 confidences."""
    encoded = encode_label_image(cells) if encoded is None else encoded
    out = [{"cell": e.cell, "bbox": e.bbox, "area": e.area, "mask": e.mask,
            "conf": [round(float(c), 6) for c in conf[e.cell - 1]]} for e in encoded]
    return {"image_id": image_id, "height": int(cells.shape[0]), "width": int(cells.shape[1]),
            "only_positive": only_positive, "cells": out}


def to_row(result: dict) -> SubmissionRow:
    row = SubmissionRow(result["image_id"], result["width"], result["height"])
    for cell in result["cells"]:
        for c, value in enumerate(cell["conf"]):
            if result["only_positive"] and value <= 0:
                continue
            row.predictions.append((c, value, cell["mask"]))
    return row


def _truth_tables(data_dir: Path) -> dict[str, dict[int, list[int]]]:
    from hpa_scc.prepare import read_true_cell_labels

    if not (data_dir / "cells.csv").is_file():
        raise FileNotFoundError(f"--baseline truth needs a synthetic set with cells.csv and masks/ in {data_dir}")
    return read_true_cell_labels(data_dir)


def predict_folder(run_dir: str | os.PathLike | None, data_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                   cells: str = "segmenter", segmenter: str = "builtin", segmenter_options: dict | None = None,
                   checkpoint: str = "best.pt", tta: bool = False, baseline: str | None = None,
                   labels_csv: str | os.PathLike | None = None, device: str = "auto", progress: bool = True) -> Path:
    """Predict every image of ``data_dir``; returns the path of submission.csv (see module docstring)."""
    from hpa_scc.prepare import segment_one, write_failures

    if cells not in CELL_MODES:
        raise ValueError(f"unknown --cells {cells!r}; choose one of {list(CELL_MODES)}")
    if baseline is not None and baseline not in BASELINES:
        raise ValueError(f"unknown --baseline {baseline!r}; choose one of {list(BASELINES)}")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out_dir / "predict.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    try:
        records = find_images(data_dir, labels_csv)
        loaded = load_run(run_dir, checkpoint, device) if baseline is None else None
        seg = build_segmenter(segmenter, **(segmenter_options or {})) if (baseline != "truth" and
                                                                          (baseline or cells == "segmenter")) else None
        truth = _truth_tables(data_dir) if baseline == "truth" else None
        results, failures = [], []
        for rec in tqdm(records, desc="predict", unit="img", disable=not progress):
            path = out_dir / "records" / f"{rec.image_id}.json"
            if path.is_file():
                results.append(json.loads(path.read_text()))
                continue
            try:
                result = _predict_one(rec, data_dir, out_dir, loaded, seg, cells, tta, baseline, truth, segment_one)
            except (ImageReadError, OSError, ValueError) as exc:
                failures.append((rec.image_id, str(exc)))
                log.warning("skipped %s: %s", rec.image_id, exc)
                continue
            write_text_atomic(path, json.dumps(result, separators=(",", ":")))
            results.append(result)
        write_failures(out_dir / "failures.csv", failures)
        submission = out_dir / "submission.csv"
        write_submission(submission, [to_row(r) for r in results])
        with atomic_path(out_dir / "cells.csv", ".csv") as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["ID", "cell", "x0", "y0", "x1", "y1", "area", *[f"conf_{c}" for c in range(NUM_CLASSES)]])
            for r in results:
                for cell in r["cells"]:
                    writer.writerow([r["image_id"], cell["cell"], *cell["bbox"], cell["area"], *cell["conf"]])
        log.info("%d images predicted, %d skipped -> %s", len(results), len(failures), submission)
        return submission
    finally:
        log.removeHandler(handler)
        handler.close()


def _predict_one(rec: ImageRecord, data_dir: Path, out_dir: Path, loaded, seg, cells_mode, tta, baseline, truth,
                 segment_one) -> dict:
    if baseline == "truth":
        true_cells = read_labels(data_dir / "masks" / f"{rec.image_id}.png")
        conf = np.zeros((int(true_cells.max()), NUM_CLASSES), np.float32)
        for k, labels in truth[rec.image_id].items():
            conf[k - 1, labels] = 1.0
        return image_result(rec.image_id, true_cells, conf, only_positive=True)
    image = read_image(rec.folder, rec.image_id)
    if baseline == "image-labels":
        if not rec.labels:
            raise ValueError(f"{rec.image_id} has no image labels; --baseline image-labels needs train.csv or --labels")
        _, cell_labels, _ = segment_one(rec, seg, out_dir / "segmentation", image)
        conf = np.zeros((int(cell_labels.max()), NUM_CLASSES), np.float32)
        conf[:, list(rec.labels)] = 1.0
        return image_result(rec.image_id, cell_labels, conf, only_positive=True)
    detections = detect(loaded, image, tta)
    if cells_mode == "model":
        cell_labels, conf = cells_from_detections(detections, image.shape[1:])
        return image_result(rec.image_id, cell_labels, conf)
    _, cell_labels, _ = segment_one(rec, seg, out_dir / "segmentation", image)
    size = loaded.image_size
    small = cv2.resize(cell_labels, (size, size), interpolation=cv2.INTER_NEAREST)
    ids = list(range(1, int(cell_labels.max()) + 1))
    return image_result(rec.image_id, cell_labels, score_cells(small, ids, detections))
