"""The training step and the validation pass: plain PyTorch, as torchvision's references do.

``train_one_epoch`` runs the optimiser over one epoch (accumulation, clipping, autocast, stop on
a non-finite loss); ``evaluate`` scores the model with pycocotools' COCO mask AP on the
validation images, every cell once per label.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from hpa_scc.constants import NUM_CLASSES

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message holds the loss dict."""


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA devices that support it; nothing elsewhere (CPU detection ops are fp32)."""
    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(images, targets, device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    return images, targets


def train_one_epoch(model, optimizer, scheduler, batches: Iterable, device: torch.device, *, accumulate_steps: int = 1,
                    clip_grad_norm: float | None = None, amp: bool = True,
                    on_step: Callable[[int, dict], bool] | None = None) -> dict[str, float]:
    """One pass over ``batches``; returns the mean of each loss.

    ``on_step(step_in_epoch, losses)`` is called after every optimizer step; returning True
    stops the epoch early (a signal asked to checkpoint and exit).
    """
    model.train()
    sums: dict[str, float] = {}
    count = 0
    optimizer.zero_grad(set_to_none=True)
    micro = 0
    for images, targets in batches:
        images, targets = to_device(images, targets, device)
        sync = (micro + 1) % accumulate_steps == 0
        # DDP: all-reduce gradients only on the micro-batch that steps
        ctx = model.no_sync() if (hasattr(model, "no_sync") and not sync) else contextlib.nullcontext()
        with ctx:
            with autocast(device, amp):
                loss_dict = model(images, targets)
            loss = sum(loss_dict.values())
            values = {k: float(v.detach()) for k, v in loss_dict.items()}
            total = float(loss.detach())
            if not math.isfinite(total):
                raise NonFiniteLossError(f"non-finite loss {total:.4g}; losses: {values}. Lower optim.lr, "
                                         "raise optim.warmup_iters, or check the data for empty/degenerate masks")
            (loss / accumulate_steps).backward()
        micro += 1
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        count += 1
        if not sync:
            continue
        if clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step is not None and on_step(micro // accumulate_steps, {**values, "loss": sum(values.values())}):
            break
    return {k: v / max(count, 1) for k, v in sums.items()}


def per_label_truth(coco_dict: dict) -> dict:
    """A COCO dict whose annotations are one per cell and label (expands multilabel files)."""
    out = copy.copy(coco_dict)
    annotations = []
    for ann in coco_dict["annotations"]:
        if "label_vector" in ann:
            for c in np.flatnonzero(ann["label_vector"]):
                annotations.append({**ann, "id": len(annotations) + 1, "category_id": int(c) + 1})
        else:
            annotations.append({**ann, "id": len(annotations) + 1})
    out["annotations"] = annotations
    return out


def detections_to_coco(image_id: int, output: dict, *, min_score: float = 0.01) -> list[dict]:
    """One image's model output -> COCO result dicts, one per (cell, label) with its score."""
    masks = (output["masks"][:, 0] > 0.5).cpu().numpy()
    if len(masks) == 0:
        return []
    rles = coco_mask.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    scores = output["scores"].float().cpu().numpy()
    results = []
    for i, rle in enumerate(rles):
        rle = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        if "label_scores" in output:  # multilabel head: cell score x label probability, per label
            label_scores = output["label_scores"][i].float().cpu().numpy() * scores[i]
            pairs = [(c + 1, s) for c, s in enumerate(label_scores) if s >= min_score]
        else:
            pairs = [(int(output["labels"][i]), scores[i])]
        results += [{"image_id": image_id, "category_id": int(c), "segmentation": rle, "score": float(s)}
                    for c, s in pairs]
    return results


@torch.no_grad()
def evaluate(model, batches: Iterable, truth: dict, device: torch.device, *, amp: bool = True) -> dict[str, float]:
    """COCO mask AP (segm) of the model on the validation batches against ``truth`` (COCO dict)."""
    model.eval()
    results = []
    for images, targets in batches:
        images, _ = to_device(images, [], device)
        with autocast(device, amp):
            outputs = model(images)
        for target, output in zip(targets, outputs, strict=True):
            results += detections_to_coco(int(target["image_id"]), output)
    gt = COCO()
    gt.dataset = per_label_truth(truth)
    with contextlib.redirect_stdout(None):
        gt.createIndex()
    if not results:
        return {"segm_AP": 0.0, "segm_AP50": 0.0, "detections": 0}
    with contextlib.redirect_stdout(None):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iouType="segm")
        ev.params.catIds = list(range(1, NUM_CLASSES + 1))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ap, ap50 = float(ev.stats[0]), float(ev.stats[1])
    return {"segm_AP": max(ap, 0.0), "segm_AP50": max(ap50, 0.0), "detections": len(results)}
