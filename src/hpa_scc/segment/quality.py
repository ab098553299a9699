"""Segmentation quality: IoU, matching, recall and class-agnostic mask AP on label images.

Every function takes label images (integer [H, W], 0 = background, object ids 1..N; ids
may skip numbers, a missing id is an object of area 0) and works from one ``np.bincount``
over the paired labels, so the cost is one pass over the pixels whatever the number of
objects.

    from hpa_scc.segment.quality import iou_matrix, match_at, recall_at, mask_ap
    iou = iou_matrix(pred_cells, true_cells)            # float [pred.max(), true.max()]
    share = recall_at(pred_cells, true_cells, iou=0.6)  # share of true cells found
    ap = mask_ap([pred_cells], [true_cells], iou=0.6)   # AP over a list of images
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _check_pair(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, true = np.asarray(pred), np.asarray(true)
    if pred.shape != true.shape:
        raise ValueError(f"label images differ in shape: pred {pred.shape} vs true {true.shape}")
    for name, lab in (("pred", pred), ("true", true)):
        if lab.dtype.kind not in "iub":
            raise ValueError(f"{name} must be an integer label image, got dtype {lab.dtype}")
        if lab.size and lab.min() < 0:
            raise ValueError(f"{name} has negative labels; 0 is background, objects are 1..N")
    return pred, true


def _overlap(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(intersection [n_pred, n_true], pred areas [n_pred], true areas [n_true]) in px."""
    pred, true = _check_pair(pred, true)
    n_pred = int(pred.max()) if pred.size else 0
    n_true = int(true.max()) if true.size else 0
    # One bincount over the pair code pred * (n_true + 1) + true: the full contingency table.
    code = pred.ravel().astype(np.int64) * (n_true + 1) + true.ravel()
    table = np.bincount(code, minlength=(n_pred + 1) * (n_true + 1)).reshape(n_pred + 1, n_true + 1)
    return table[1:, 1:], table[1:, :].sum(axis=1), table[:, 1:].sum(axis=0)


def iou_matrix(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """IoU of every predicted object with every true one: float64 [pred.max(), true.max()].

    Row i is predicted id i + 1, column j true id j + 1; pairs with an empty union get 0.
    """
    inter, area_pred, area_true = _overlap(pred, true)
    union = area_pred[:, None] + area_true[None, :] - inter
    return np.divide(inter, union, out=np.zeros(inter.shape, np.float64), where=union > 0)


def _greedy_pairs(iou: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of a greedy one-to-one matching by IoU, best pairs first."""
    rows, cols = np.nonzero(iou >= threshold)
    order = np.argsort(-iou[rows, cols], kind="stable")
    used_r, used_c, keep = set(), set(), []
    for k in order:
        r, c = rows[k], cols[k]
        if r not in used_r and c not in used_c:
            used_r.add(r)
            used_c.add(c)
            keep.append(k)
    keep = np.asarray(keep, dtype=np.int64)
    return rows[keep], cols[keep]


def match_at(pred: np.ndarray, true: np.ndarray, iou: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """Greedy one-to-one matching of objects with IoU >= ``iou``: (pred ids, true ids), int64 [M].

    Pairs are taken in order of decreasing IoU, each object at most once. For ``iou`` >= 0.5 the
    matching is unique whatever the order, since an object can overlap only one other by more
    than half of their union.
    """
    rows, cols = _greedy_pairs(iou_matrix(pred, true), iou)
    return rows + 1, cols + 1


def _present_ids(labels: np.ndarray) -> int:
    return int(np.count_nonzero(np.bincount(np.asarray(labels).ravel())[1:]))


def recall_at(pred: np.ndarray, true: np.ndarray, iou: float = 0.6) -> float:
    """Share of the true objects (ids present in ``true``) matched by a prediction at ``iou``.

    NaN when ``true`` holds no object: a recall is not defined then.
    """
    n_true = _present_ids(true)
    if n_true == 0:
        return float("nan")
    return len(match_at(pred, true, iou)[0]) / n_true


def mask_ap(preds: Sequence[np.ndarray], trues: Sequence[np.ndarray], iou: float = 0.6,
            scores: Sequence[np.ndarray] | None = None) -> float:
    """Class-agnostic mask average precision at one IoU threshold over a list of images.

    ``scores[i][k]`` is the confidence of object id k + 1 of ``preds[i]``; None gives every
    object the same score. Within an image, detections are taken by decreasing score, each
    matched to the untaken true object it overlaps most, a true positive if that IoU is >=
    ``iou``. Over all images, precision and recall are read at each distinct score (tied
    detections count as one operating point), precision is made non-increasing from the right,
    and AP is the area under that curve (all points, no 101-point sampling). So with scores
    None there is one operating point and AP = precision * recall.

    Ids absent from a prediction are not detections. NaN when the truth holds no object.
    """
    if len(preds) != len(trues):
        raise ValueError(f"{len(preds)} predictions for {len(trues)} true label images")
    if scores is not None and len(scores) != len(preds):
        raise ValueError(f"{len(scores)} score arrays for {len(preds)} predictions")
    all_scores, all_tp, n_true = [], [], 0
    for i, (pred, true) in enumerate(zip(preds, trues)):
        inter, area_pred, area_true = _overlap(pred, true)
        union = area_pred[:, None] + area_true[None, :] - inter
        ious = np.divide(inter, union, out=np.zeros(inter.shape, np.float64), where=union > 0)
        n_true += int(np.count_nonzero(area_true))
        present = np.flatnonzero(area_pred > 0)  # row indices of real detections
        score = np.ones(len(area_pred)) if scores is None else np.asarray(scores[i], np.float64)
        if len(score) < len(area_pred):
            raise ValueError(f"image {i}: {len(score)} scores for prediction ids up to {len(area_pred)}")
        taken = np.zeros(ious.shape[1], dtype=bool)
        for row in present[np.argsort(-score[present], kind="stable")]:
            candidates = np.where(taken, -1.0, ious[row])
            best = int(np.argmax(candidates)) if len(candidates) else -1
            hit = best >= 0 and candidates[best] >= iou
            if hit:
                taken[best] = True
            all_scores.append(score[row])
            all_tp.append(hit)
    if n_true == 0:
        return float("nan")
    if not all_tp:
        return 0.0
    order = np.argsort(-np.asarray(all_scores), kind="stable")
    ranked, tp = np.asarray(all_scores)[order], np.asarray(all_tp)[order]
    cum_tp = np.cumsum(tp)
    precision = cum_tp / np.arange(1, len(tp) + 1)
    recall = cum_tp / n_true
    # Operating points: the last detection of each group of tied scores.
    last = np.append(ranked[1:] != ranked[:-1], True)
    precision, recall = precision[last], recall[last]
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # non-increasing envelope
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


__all__ = ["iou_matrix", "match_at", "recall_at", "mask_ap"]
