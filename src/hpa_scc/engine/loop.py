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


def use_fast_path(model: torch.nn.Module, device: torch.device, *, channels_last: bool = True, tf32: bool = True,
                  compile: bool = False) -> torch.nn.Module:
    """Set up ``model`` (in place) and the CUDA back-ends for speed; nothing changes on CPU.

    cudnn.benchmark picks the fastest convolution kernels once per input shape (training images
    all have one size); channels_last is the layout tensor-core convolutions want; TF32 runs the
    fp32 work left outside bf16 autocast on tensor cores; ``compile`` fuses the backbone's
    conv-BN-ReLU chains (nn.Module.compile keeps the state-dict keys, so checkpoints stay plain).
    All off is plain fp32, the baseline of bench/gpu.sh.
    """
    if device.type != "cuda":
        return model
    torch.backends.cudnn.benchmark = channels_last or tf32 or compile
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        model.backbone.compile()
    return model


def to_device(images, targets, device):
    """Move a batch to ``device``; uint8 images become float in [0, 1] there (4x less to copy)."""
    images = [im.to(device, non_blocking=True) for im in images]
    images = [im.float().div_(255.0) if im.dtype == torch.uint8 else im for im in images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    return images, targets


def _check_finite(values: dict[str, float], step: int) -> None:
    total = sum(values.values())
    if not math.isfinite(total):
        raise NonFiniteLossError(f"non-finite loss {total:.4g} by step {step} of the epoch; losses: {values}. "
                                 "Lower optim.lr, raise optim.warmup_iters, or check the data for empty/degenerate masks")


def train_one_epoch(model, optimizer, scheduler, batches: Iterable, device: torch.device, *, accumulate_steps: int = 1,
                    clip_grad_norm: float | None = None, amp: bool = True, sync_every: int = 1,
                    on_step: Callable[[int, dict | None], bool] | None = None) -> dict[str, float]:
    """One pass over ``batches``; returns the mean of each loss.

    Losses stay on the device and are read back (a host sync, which stalls the GPU queue) only
    every ``sync_every`` optimizer steps, when stopping and at the end; each read checks that
    the loss is finite. ``on_step(step_in_epoch, losses)`` is called after every optimizer step,
    with the losses averaged since the last read on a read step and None otherwise; returning
    True stops the epoch early (a signal asked to checkpoint and exit). A non-finite loss raises
    NonFiniteLossError at the next read, before anything can be saved.
    """
    model.train()
    names: list[str] = []
    epoch_sum = window_sum = None  # device tensors [n_losses]
    count = window_count = 0
    optimizer.zero_grad(set_to_none=True)
    micro = 0

    def read_window(step: int) -> dict[str, float] | None:
        nonlocal window_sum, window_count
        if window_sum is None:
            return None
        values = dict(zip(names, (window_sum / window_count).tolist(), strict=True))
        _check_finite(values, step)
        window_sum, window_count = None, 0
        return values

    for images, targets in batches:
        images, targets = to_device(images, targets, device)
        sync = (micro + 1) % accumulate_steps == 0
        # DDP: all-reduce gradients only on the micro-batch that steps
        ctx = model.no_sync() if (hasattr(model, "no_sync") and not sync) else contextlib.nullcontext()
        with ctx:
            with autocast(device, amp):
                loss_dict = model(images, targets)
            names = names or list(loss_dict)
            loss = sum(loss_dict.values())
            (loss / accumulate_steps).backward()
        stacked = torch.stack([v.detach().float().sum() for v in loss_dict.values()])
        epoch_sum = stacked if epoch_sum is None else epoch_sum + stacked
        window_sum = stacked if window_sum is None else window_sum + stacked
        count, window_count = count + 1, window_count + 1
        micro += 1
        if not sync:
            continue
        if clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm, foreach=True)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step = micro // accumulate_steps
        losses = read_window(step) if step % sync_every == 0 else None
        if losses is not None:
            losses["loss"] = sum(losses.values())
        if on_step is not None and on_step(step, losses):
            read_window(step)  # never let a stop save a model trained on a non-finite loss
            break
    if epoch_sum is None:
        return {}
    read_window(micro // max(accumulate_steps, 1))
    means = dict(zip(names, (epoch_sum / count).tolist(), strict=True))
    _check_finite(means, micro // max(accumulate_steps, 1))
    return means


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
