"""A trained model on arrays: load a run folder's model, detect, score given cells.

    loaded = load_run("runs/demo/densenet121", "best.pt")
    detections = detect_batch(loaded, [image])                       # uint8 [C, H, W] images, any size
    conf = segmenter_cell_scores(loaded, [small], [cells], [n])[0]   # float [n, 19] for cells 1..n

``hpa_scc.apps.predict`` (folders of images -> a Kaggle submission) and ``hpa_scc.apps.refine``
(a prepared set's cells relabelled) both call these; neither reads the other.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from hpa_scc.constants import NUM_CLASSES
from hpa_scc.data.images import resize

log = logging.getLogger(__name__)


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


def model_identity(loaded: LoadedModel) -> dict:
    """What a result depends on in a model: its run folder, checkpoint file (size and mtime);
    predict and refine record it and reuse earlier work only for the same one."""
    path = Path(loaded.checkpoint)
    stat = path.stat()
    return {"run_dir": str(Path(loaded.run_dir).resolve()), "checkpoint": path.name, "bytes": stat.st_size,
            "mtime_ns": stat.st_mtime_ns}


def load_run(run_dir: str | os.PathLike, checkpoint: str = "best.pt", device: str = "auto") -> LoadedModel:
    """The model of a run folder (its config.yaml + a checkpoint), in eval mode."""
    from hpa_scc.utils.device import pick_device
    from hpa_scc.models.cells import build_family_model
    from hpa_scc.utils.checkpoint import load_checkpoint, load_model_state
    from hpa_scc.config import load_config, with_values

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        from hpa_scc.data.prepared import PreparedSet

        what = (" (it is a prepared set: give the run folder that trained on it)" if PreparedSet(run_dir).exists()
                else " (no such folder)" if not run_dir.is_dir() else "")
        raise FileNotFoundError(f"{run_dir} is not a training run: it has no config.yaml{what}; give a train.run_dir, "
                                "or '-' with --baseline")
    cfg = load_config(run_dir / "config.yaml")
    dev = pick_device(device, "--device")  # 'tpu' gets the list of choices, not torch's own text
    if cfg.model.engine == "detectron2":  # detectron2's own network behind the torchvision interface
        from hpa_scc.models.d2model import load_d2_run

        model, path = load_d2_run(run_dir, cfg, checkpoint)
        model.to(dev).eval()
        log.info("loaded %s (detectron2 %s, %d px)", path, cfg.model.backbone, cfg.data.image_size)
        return LoadedModel(model, cfg.data.image_size, cfg.model.in_channels, cfg.model.head, dev, cfg.model.family,
                           cfg.data.crop_size, str(run_dir), str(path))
    path = run_dir / checkpoint
    if not path.is_file() and checkpoint == "best.pt":
        path = run_dir / "last.pt"  # a run without validation has no best.pt
    if not path.is_file():
        there = sorted(p.name for p in run_dir.glob("*.pt"))
        fallback = " (nor last.pt, the fallback of best.pt)" if checkpoint == "best.pt" else ""
        raise FileNotFoundError(
            f"no checkpoint {run_dir / checkpoint}{fallback}; "
            + (f"{run_dir} holds {', '.join(there)}: pass one with --checkpoint" if there
               else f"{run_dir} holds no checkpoint yet: train first (python -m hpa_scc train ...)"))
    cfg = with_values(cfg, model__weights=None, model__cell_features_init=None)  # the checkpoint is the whole model
    model = build_family_model(cfg)
    # a checkpoint of another run copied in: one line naming both, not torch's list of key names
    load_model_state(model, load_checkpoint(path), path, cfg.model.family, cfg.model.backbone,
                     f"{run_dir}/config.yaml describes another model; pass a checkpoint of this run (--checkpoint), "
                     "or the run folder it came from")
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
    masks = None
    if getattr(loaded.model.roi_heads, "label_pooling", "box") == "mask":  # each cell's own mask, cells 1..K
        masks = [torch.from_numpy(np.asarray(c, np.int64)).to(device)[None] == torch.arange(1, n + 1, device=device)[:, None, None]
                 for c, n in zip(small_cells, n_cells)]
    features = None
    if getattr(loaded.model.roi_heads, "cell_features", 0):  # measured on each cell, as the features family does
        from hpa_scc.data.features import cell_features

        features = [torch.from_numpy(cell_features(im, c, range(1, n + 1))) for im, c, n in zip(smalls, small_cells, n_cells)]
    with autocast(device, device.type == "cuda"):
        scores = [s.float() for s in score_boxes(loaded.model, images, boxes, masks, features)]
        if tta:  # the horizontal flip, boxes (and masks) flipped with it
            width = [im.shape[-1] for im in images]
            flipped = [torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1) for b, w in zip(boxes, width)]
            flipped_masks = [m.flip(-1) for m in masks] if masks is not None else None
            scores = [(a + b.float()) / 2 for a, b in zip(scores, score_boxes(loaded.model, [im.flip(-1) for im in images],
                                                                             flipped, flipped_masks, features))]
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

    return [cell_scores(loaded.model, loaded.family, image, cells, range(1, n + 1), crop_size=loaded.crop_size,
                        in_channels=loaded.in_channels, device=loaded.device, tta=tta)
            for image, cells, n in zip(smalls, small_cells, n_cells)]


def cell_scores(model: torch.nn.Module, family: str, image: np.ndarray, cells: np.ndarray, cell_ids, *,
                crop_size: int, in_channels: int, device: torch.device, tta: bool = False) -> np.ndarray:
    """float32 [K, 19]: a cell-level model's scores for the cells of one image (at the model's size).

    ``tta``: crops are also scored flipped and rotated by 90 degrees (4 views), scores averaged.
    """
    from hpa_scc.data.cells import cell_crops
    from hpa_scc.data.features import cell_features

    ids = list(cell_ids)
    if not ids:
        return np.zeros((0, NUM_CLASSES), np.float32)
    if family == "features":
        values = torch.from_numpy(cell_features(image, cells, ids))
    else:
        values = torch.from_numpy(cell_crops(image[:in_channels], cells, ids, crop_size))
    model.eval()
    values = values.to(device)
    with torch.no_grad():
        if not tta or family == "features":
            return model(values).float().cpu().numpy()
        views = [values, values.flip(-1), torch.rot90(values, 1, (-2, -1)), torch.rot90(values.flip(-1), 1, (-2, -1))]
        return torch.stack([model(v.contiguous()).float() for v in views]).mean(0).cpu().numpy()
