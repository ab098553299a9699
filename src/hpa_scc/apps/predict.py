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
class), ``predict.log`` and ``records/<ID>.json`` (per-image results: a rerun skips them).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from hpa_scc.constants import NUM_CLASSES
from hpa_scc.utils.fileio import atomic_path, write_text_atomic
from hpa_scc.data.images import ImageReadError, ImageRecord, find_images, read_image, resize
from hpa_scc.utils.pool import run_pool, write_failures
from hpa_scc.segment.folder import init_worker, segment_one, worker_segmenter, worker_settings
from hpa_scc.data.images import read_labels
from hpa_scc.evaluation.submission import EncodedCell, SubmissionRow, encode_label_image, write_submission
from hpa_scc.weak.targets import fuse_image_scores

log = logging.getLogger("hpa_scc.apps.predict")
BASELINES = ("image-labels", "truth", "random")
CELL_MODES = ("segmenter", "model")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    image_size: int
    in_channels: int
    head: str
    device: torch.device
    family: str = "maskrcnn"  # maskrcnn | cell | features (hpa_scc.models.cells)
    crop_size: int = 64  # cell-level models: the crops they were trained on
    run_dir: str = ""
    checkpoint: str = ""  # the file the weights came from


def load_run(run_dir: str | os.PathLike, checkpoint: str = "best.pt", device: str = "auto") -> LoadedModel:
    """The model of a run folder (its config.yaml + a checkpoint), in eval mode."""
    from hpa_scc.models.cells import build_family_model
    from hpa_scc.utils.checkpoint import load_checkpoint
    from hpa_scc.config import load_config

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    path = run_dir / checkpoint
    if not path.is_file() and checkpoint == "best.pt":
        path = run_dir / "last.pt"  # a run without validation has no best.pt
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint {run_dir / checkpoint} (nor last.pt); train first or pass --checkpoint")
    cfg.model.weights = None  # the checkpoint below is the whole model
    model = build_family_model(cfg)
    model.load_state_dict(load_checkpoint(path)["model"])
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    model.to(dev).eval()
    log.info("loaded %s (%s %s, %s head, %d px)", path, cfg.model.family, cfg.model.backbone, cfg.model.head,
             cfg.data.image_size)
    return LoadedModel(model, cfg.data.image_size, cfg.model.in_channels, cfg.model.head, dev, cfg.model.family,
                       cfg.data.crop_size, str(run_dir), str(path))


@torch.no_grad()
def detect_batch(loaded: LoadedModel, images: list[np.ndarray], tta: bool = False) -> list[dict[str, torch.Tensor]]:
    """Model detections on a batch of images (uint8 [C, H, W], any size; resized to the training size).

    One dict per image, tensors on the model's device: masks float [N, S, S] (probabilities),
    class_scores [N, 19] (softmax head: one-hot x score; multilabel head: score x label
    probability) and scores [N]. With ``tta`` each image's horizontal flip is added and its
    detections flipped back and appended.
    """
    from hpa_scc.engine.loop import autocast

    size, device = loaded.image_size, loaded.device
    tensors = []
    for image in images:
        small = image[: loaded.in_channels]
        if small.shape[1:] != (size, size):
            small = np.stack([resize(plane, size) for plane in small])
        # uint8 over the bus, scaled on the device (as training does)
        tensors.append(torch.from_numpy(np.ascontiguousarray(small)).to(device, non_blocking=True).float().div_(255.0))
    inputs = tensors + [t.flip(-1) for t in tensors] if tta else tensors
    with autocast(device, device.type == "cuda"):
        outputs = loaded.model(inputs)
    results = []
    for i in range(len(images)):
        parts = [(outputs[i], False)] + ([(outputs[len(images) + i], True)] if tta else [])
        masks, class_scores = [], []
        for out, flipped in parts:
            m = out["masks"][:, 0].float()
            scores = out["scores"].float()
            if "label_scores" in out:
                cs = out["label_scores"].float() * scores[:, None]
            else:
                cs = torch.zeros((len(scores), NUM_CLASSES), device=scores.device)
                cs[torch.arange(len(scores)), out["labels"] - 1] = scores
            masks.append(m.flip(-1) if flipped else m)
            class_scores.append(cs)
        cs = torch.cat(class_scores)
        results.append({"masks": torch.cat(masks), "class_scores": cs,
                        "scores": cs.amax(dim=1) if len(cs) else cs.new_zeros(0)})
    return results


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """bool [N, H, W] x bool [M, H, W] -> IoU [N, M]."""
    a2 = a.reshape(len(a), -1).astype(np.float32)
    b2 = b.reshape(len(b), -1).astype(np.float32)
    inter = a2 @ b2.T
    union = a2.sum(1)[:, None] + b2.sum(1)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def score_cells(cells_small: np.ndarray, cell_ids: list[int], detections: dict) -> np.ndarray:
    """float [K, 19]: per cell and class, the best ``score x mask IoU`` of the detections.

    ``detections`` may hold numpy arrays or tensors; the work runs where the masks are (on the
    GPU only [K, 19] comes back to the host).
    """
    masks = torch.as_tensor(detections["masks"])
    if not cell_ids or len(masks) == 0:
        return np.zeros((len(cell_ids), NUM_CLASSES), dtype=np.float32)
    device = masks.device
    cells = torch.from_numpy(np.ascontiguousarray(cells_small).astype(np.int32)).to(device)
    ids = torch.as_tensor(cell_ids, dtype=torch.int32, device=device)
    cell_masks = (cells.flatten()[None, :] == ids[:, None]).float()  # [K, S*S]
    det = (masks > 0.5).flatten(1).float()  # [D, S*S]
    inter = det @ cell_masks.T
    union = det.sum(1)[:, None] + cell_masks.sum(1)[None, :] - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))  # [D, K]
    class_scores = torch.as_tensor(detections["class_scores"], device=device).float()
    conf = (iou[:, :, None] * class_scores[:, None, :]).amax(dim=0)  # [K, 19]
    return conf.cpu().numpy().astype(np.float32)


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


def image_result(image_id: str, cells: np.ndarray, conf: np.ndarray, *, only_positive: bool = False) -> dict:
    """Per-image record: each cell's mask encoded once, its bbox, area and 19 confidences."""
    return encoded_result(image_id, cells.shape, encode_label_image(cells), conf, only_positive=only_positive)


def encoded_result(image_id: str, shape: tuple[int, int], encoded: list[EncodedCell], conf: np.ndarray, *,
                   only_positive: bool = False) -> dict:
    """``image_result`` from cells already encoded (``conf`` row k-1 belongs to cell id k)."""
    cells = [{"cell": e.cell, "bbox": e.bbox, "area": e.area, "mask": e.mask,
              "conf": [round(float(c), 6) for c in conf[e.cell - 1]]} for e in encoded]
    return {"image_id": image_id, "height": int(shape[0]), "width": int(shape[1]), "only_positive": only_positive,
            "cells": cells}


def to_row(result: dict) -> SubmissionRow:
    row = SubmissionRow(result["image_id"], result["width"], result["height"])
    for cell in result["cells"]:
        for c, value in enumerate(cell["conf"]):
            if result["only_positive"] and value <= 0:
                continue
            row.predictions.append((c, value, cell["mask"]))
    return row


def _truth_tables(data_dir: Path) -> dict[str, dict[int, list[int]]]:
    from hpa_scc.apps.prepare import read_true_cell_labels

    if not (data_dir / "cells.csv").is_file():
        raise FileNotFoundError(f"--baseline truth needs a synthetic set with cells.csv and masks/ in {data_dir}")
    return read_true_cell_labels(data_dir)


def predict_folder(run_dir: str | os.PathLike | None, data_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                   cells: str = "segmenter", segmenter: str = "builtin", segmenter_options: dict | None = None,
                   checkpoint: str = "best.pt", tta: bool = False, baseline: str | None = None,
                   labels_csv: str | os.PathLike | None = None, device: str = "auto", workers: int = 1,
                   batch_size: int = 8, image_fusion: float = 0.0, ensemble: list | tuple = (),
                   cell_scoring: str = "auto", progress: bool = True) -> Path:
    """Predict every image of ``data_dir``; returns the path of submission.csv (see module docstring).

    The CPU work (read four channels, segment, encode every cell once, resize for the model) runs
    in ``workers`` processes while this process runs the model on batches of ``batch_size``
    images and scores the cells, so a GPU is kept busy by a pool of CPU cores.

    ``ensemble``: more run folders whose models score the same segmenter cells; a cell's
    confidences are the mean of all the models' (e.g. a cell-level model with a detector).
    """
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
        truth = _truth_tables(data_dir) if baseline == "truth" else None
        # The per-image records of an earlier run are reused only for the same models and settings:
        # another model, checkpoint or option into the same OUT is refused, never mixed in.
        from hpa_scc.data.cache import check_settings

        check_settings(out_dir, {"mode": mode, "models": [_model_identity(m) for m in members],
                                 "cells": cells, "tta": tta, "image_fusion": image_fusion,
                                 "cell_scoring": cell_scoring, "segmenter": segmenter if mode != "truth" else None,
                                 "segmenter_options": {k: str(v) for k, v in (segmenter_options or {}).items()}},
                       "predict.json")
        results, failures, todo = {}, [], []
        for rec in records:
            path = out_dir / "records" / f"{rec.image_id}.json"
            if path.is_file():  # finished by an earlier run
                results[rec.image_id] = json.loads(path.read_text())
            else:
                todo.append(rec)
        settings = {"mode": mode, "data_dir": str(data_dir), "seg_dir": str(out_dir / "segmentation"),
                    "model_size": loaded.image_size if loaded else None,
                    "in_channels": max(m.in_channels for m in members) if loaded else None}
        uses_segmenter = mode in ("segmenter", "image-labels", "random")
        stream = run_pool(_inputs_job, todo, workers=workers, initializer=init_worker,
                          initargs=(segmenter if uses_segmenter else None, segmenter_options or {}, settings),
                          desc="predict", progress=progress)
        batch: list[tuple[str, dict]] = []
        for i, (image_id, inputs, error) in enumerate(stream, start=1):
            if error is not None:
                failures.append((image_id, error))
                log.warning("skipped %s: %s", image_id, error)
            else:
                batch.append((image_id, inputs))
            if batch and (len(batch) == batch_size or i == len(todo)):
                for image_id, result, error in _finish(batch, by_id, members, mode, tta, truth, image_fusion,
                                                               cell_scoring):
                    if error is not None:
                        failures.append((image_id, error))
                        log.warning("skipped %s: %s", image_id, error)
                        continue
                    write_text_atomic(out_dir / "records" / f"{image_id}.json", json.dumps(result, separators=(",", ":")))
                    results[image_id] = result
                batch = []
        ordered = [results[rec.image_id] for rec in records if rec.image_id in results]
        write_failures(out_dir / "failures.csv", failures)
        submission = out_dir / "submission.csv"
        write_submission(submission, [to_row(r) for r in ordered])
        with atomic_path(out_dir / "cells.csv", ".csv") as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["ID", "cell", "x0", "y0", "x1", "y1", "area", *[f"conf_{c}" for c in range(NUM_CLASSES)]])
            for r in ordered:
                for cell in r["cells"]:
                    writer.writerow([r["image_id"], cell["cell"], *cell["bbox"], cell["area"], *cell["conf"]])
        log.info("%d images predicted, %d skipped -> %s", len(ordered), len(failures), submission)
        return submission
    finally:
        log.removeHandler(handler)
        handler.close()


def _model_identity(loaded: LoadedModel) -> dict:
    """What a prediction depends on in a model: its run folder, checkpoint file (size and mtime)."""
    path = Path(loaded.checkpoint)
    stat = path.stat()
    return {"run_dir": str(Path(loaded.run_dir).resolve()), "checkpoint": path.name, "bytes": stat.st_size,
            "mtime_ns": stat.st_mtime_ns}


def _inputs_job(record: ImageRecord) -> tuple[str, dict | None, str | None]:
    """Worker: one image's CPU work -> what the model and the record need (never the full image)."""
    s = worker_settings()
    try:
        if s["mode"] == "truth":
            true_cells = read_labels(Path(s["data_dir"]) / "masks" / f"{record.image_id}.png")
            return record.image_id, {"shape": true_cells.shape, "encoded": encode_label_image(true_cells),
                                     "n_cells": int(true_cells.max())}, None
        image = read_image(record.folder, record.image_id)
        inputs: dict = {"shape": image.shape[1:]}
        if s["mode"] in ("segmenter", "image-labels", "random"):
            _, cell_labels, _ = segment_one(record, worker_segmenter(), Path(s["seg_dir"]), image)
            inputs["encoded"] = encode_label_image(cell_labels)
            inputs["n_cells"] = int(cell_labels.max())
        if s["model_size"]:
            size = s["model_size"]
            inputs["small"] = np.stack([resize(plane, size) for plane in image[: s["in_channels"]]])
            if s["mode"] == "segmenter":
                inputs["small_cells"] = cv2.resize(cell_labels, (size, size), interpolation=cv2.INTER_NEAREST)
        return record.image_id, inputs, None
    except (ImageReadError, OSError, ValueError) as exc:
        return record.image_id, None, str(exc)


def cell_boxes(cells: np.ndarray, n_cells: int) -> np.ndarray:
    """float32 [K, 4] xyxy (x1/y1 exclusive) of cells 1..K of a label image; zeros for an absent id."""
    from scipy import ndimage

    out = np.zeros((n_cells, 4), np.float32)
    for k, box in enumerate(ndimage.find_objects(np.asarray(cells, np.int32), max_label=n_cells)):
        if box is not None:
            out[k] = (box[1].start, box[0].start, box[1].stop, box[0].stop)
    return out


@torch.no_grad()
def box_scores(loaded: LoadedModel, smalls: list[np.ndarray], small_cells: list[np.ndarray], n_cells: list[int],
               tta: bool = False) -> list[np.ndarray]:
    """Each segmenter cell's box fed to a multilabel detector's RoI heads: all 19 scores per cell
    from its classifier, with no detection cap or score threshold (``models.score_boxes``)."""
    from hpa_scc.engine.loop import autocast
    from hpa_scc.models.detector import score_boxes

    device = loaded.device
    images = [torch.from_numpy(np.ascontiguousarray(im)).to(device).float().div_(255.0) for im in smalls]
    boxes = [torch.from_numpy(cell_boxes(c, n)).to(device) for c, n in zip(small_cells, n_cells)]
    with autocast(device, device.type == "cuda"):
        scores = [s.float() for s in score_boxes(loaded.model, images, boxes)]
        if tta:  # the horizontal flip, boxes flipped with it
            width = [im.shape[-1] for im in images]
            flipped = [torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1) for b, w in zip(boxes, width)]
            scores = [(a + b.float()) / 2 for a, b in zip(scores, score_boxes(loaded.model, [im.flip(-1) for im in images],
                                                                             flipped))]
    return [s.cpu().numpy() for s in scores]


def segmenter_cell_scores(loaded: LoadedModel, smalls: list[np.ndarray], small_cells: list[np.ndarray],
                          n_cells: list[int], tta: bool = False, cell_scoring: str = "auto") -> list[np.ndarray]:
    """Each image's segmenter cells scored by one model: float [K, 19] per image (cells 1..K).

    Detectors: ``cell_scoring`` ``boxes`` (the default for the multilabel head) feeds each cell's
    box to the RoI heads (``box_scores``); ``detections`` scores a cell from the detections that
    overlap it (best ``score x mask IoU`` per class; the only way for the softmax head).
    Cell-level models score each cell's crop (or features) directly.
    """
    if loaded.family == "maskrcnn":
        if cell_scoring not in ("auto", "boxes", "detections"):
            raise ValueError(f"unknown cell scoring {cell_scoring!r}; choose auto, boxes or detections")
        if cell_scoring == "boxes" and loaded.head != "multilabel":
            raise ValueError("--cell-scoring boxes needs a multilabel-head detector; use detections")
        if cell_scoring in ("auto", "boxes") and loaded.head == "multilabel":
            return box_scores(loaded, smalls, small_cells, n_cells, tta)
        detections = detect_batch(loaded, smalls, tta)
        return [score_cells(cells, list(range(1, n + 1)), det) for cells, n, det in zip(small_cells, n_cells, detections)]
    from hpa_scc.models.cells import cell_scores

    return [cell_scores(loaded.model, loaded.family, image, cells, range(1, n + 1), crop_size=loaded.crop_size,
                        in_channels=loaded.in_channels, device=loaded.device, tta=tta)
            for image, cells, n in zip(smalls, small_cells, n_cells)]


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
