"""The HPA Single Cell Classification metric: mask mAP at IoU 0.6, Open Images challenge rules.

    python -m hpa_scc evaluate --solution SOLUTION.csv --submission SUBMISSION.csv [--out out.json] [--plot pr.png]

Both files are in the submission format (``submission.py``); the truth's confidences are ignored.
How one class ``c`` is scored (``evaluate``):

1. Empty masks (0 pixels) are dropped on both sides. A truth (label, mask) pair listed twice
   in one image counts once.
2. Only images whose truth holds class ``c`` take part: detections of ``c`` on any other image
   are ignored entirely (neither TP nor FP); they are counted in ``n_ignored_detections``.
3. In each image, detections of ``c`` are visited in descending confidence; each is matched to
   the truth mask of class ``c`` with the highest mask IoU. It is a true positive if that IoU is
   ``>= iou_threshold`` and that truth mask is not taken yet; otherwise a false positive (a second
   detection of a taken mask is a FP; it does not fall back to its next-best truth mask).
4. All images' detections of ``c`` are ranked by descending confidence; precision and recall
   (TP / number of truth masks of ``c``) are taken at every rank, precision is made
   non-increasing from the right, and AP is the area under that curve at every recall step
   (all points, not COCO's 101-point sampling).
5. mAP is the mean AP over the classes with at least one truth mask (Negative included);
   the other classes have AP NaN and are left out.

Ties are deterministic: equal confidences keep file order. Within an image that is the order of
the triples in the row; across images, the order of the images in the solution file, then the
row order. Among truth masks with the same highest IoU, the first in the truth row wins.

Speed: a mask string is parsed once per image however many labels repeat it, and IoUs are
computed once per image on the COCO RLEs (pycocotools ``mask.iou``, all distinct predicted
masks against all distinct truth masks), never on decoded pixel arrays.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
from pycocotools import mask as coco_mask

from hpa_scc.constants import CLASS_NAMES, NUM_CLASSES
from hpa_scc.utils.fileio import write_text_atomic
from hpa_scc.evaluation.submission import SubmissionRow, check_rles, mask_rle, read_submission

IOU_THRESHOLD = 0.6  # the competition's mask IoU for a match


@dataclass
class EvalResult:
    """Per-class AP and counts; class indices 0-18 are keys of every per-class dict.

    ``pr_curves[c]`` = (recall, precision), float arrays [n_detections[c]] at each rank of the
    confidence-ordered detections; precision is the raw value (AP integrates its envelope).
    Classes with no truth mask have AP NaN and no curve.
    """

    mAP: float
    per_class_ap: dict[int, float]
    n_truth: dict[int, int]
    n_detections: dict[int, int]  # scored detections (on images whose truth holds the class)
    n_true_positives: dict[int, int]
    pr_curves: dict[int, tuple[np.ndarray, np.ndarray]]
    iou_threshold: float = IOU_THRESHOLD
    n_images: int = 0  # images in the solution
    n_extra_images: int = 0  # submission IDs not in the solution: ignored
    n_missing_images: int = 0  # solution IDs absent from the submission: their truth all missed
    n_ignored_detections: int = 0  # detections of a class absent from that image's truth
    n_empty_truth: int = 0  # truth (label, mask) pairs dropped for an empty mask
    n_empty_detections: int = 0  # detections dropped for an empty mask
    extra_image_ids: list[str] = field(default_factory=list)
    missing_image_ids: list[str] = field(default_factory=list)

    def classes_scored(self) -> list[int]:
        return [c for c in range(NUM_CLASSES) if self.n_truth[c] > 0]

    def to_dict(self) -> dict:
        """JSON-ready: NaN becomes null, curves are left out."""
        def num(x: float) -> float | None:
            return None if math.isnan(x) else float(x)

        return {
            "mAP": num(self.mAP),
            "iou_threshold": self.iou_threshold,
            "classes": [
                {"index": c, "name": CLASS_NAMES[c], "ap": num(self.per_class_ap[c]), "n_truth": self.n_truth[c],
                 "n_detections": self.n_detections[c], "n_true_positives": self.n_true_positives[c]}
                for c in range(NUM_CLASSES)
            ],
            "images": {
                "n_images": self.n_images, "n_extra_images": self.n_extra_images,
                "n_missing_images": self.n_missing_images,
                "extra_image_ids": self.extra_image_ids, "missing_image_ids": self.missing_image_ids,
            },
            "n_ignored_detections": self.n_ignored_detections,
            "n_empty_truth": self.n_empty_truth,
            "n_empty_detections": self.n_empty_detections,
        }


class _ImageMasks:
    """The distinct non-empty masks of one row: text -> index, their RLEs, and the empty texts."""

    def __init__(self, row: SubmissionRow, where: str):
        self.index: dict[str, int] = {}
        self.rles: list[dict] = []
        self.empty: set[str] = set()
        ordered = list(dict.fromkeys(text for _, _, text in row.predictions))  # each string parsed once
        if not ordered:
            return
        rles = [mask_rle(t, row.height, row.width, where, check=False) for t in ordered]
        check_rles(rles, ordered, where)  # all the row's masks in one pass
        try:
            areas = np.atleast_1d(coco_mask.area(rles))
        except Exception as exc:  # pycocotools raises bare Exceptions on bad RLE
            raise ValueError(f"{where}: a mask is not valid COCO RLE: {exc}") from None
        limit = row.height * row.width
        for text, rle, area in zip(ordered, rles, areas, strict=True):
            if area > limit:
                raise ValueError(f"{where}: mask {text[:24]!r}... covers {area} pixels, more than "
                                 f"{row.height}x{row.width}")
            if area == 0:
                self.empty.add(text)
            else:
                self.index[text] = len(self.rles)
                self.rles.append(rle)


def _by_id(rows: list[SubmissionRow], what: str) -> dict[str, SubmissionRow]:
    out: dict[str, SubmissionRow] = {}
    for row in rows:
        if row.image_id in out:
            raise ValueError(f"{what}: image ID {row.image_id} appears more than once")
        out[row.image_id] = row
    return out


def average_precision(tp_ranked: np.ndarray, n_truth: int) -> tuple[float, np.ndarray, np.ndarray]:
    """Open Images AP of detections already in rank order; (ap, recall, precision) per rank.

    ``tp_ranked``: bool [N], True for a true positive. Precision is made non-increasing from the
    right and integrated over every recall step. ``n_truth`` must be > 0.
    """
    tp = np.cumsum(tp_ranked, dtype=np.float64)
    fp = np.cumsum(~tp_ranked, dtype=np.float64)
    recall = tp / n_truth
    precision = tp / np.maximum(tp + fp, 1.0)
    if tp_ranked.size == 0:
        return 0.0, recall, precision
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]  # envelope: best precision at this recall or beyond
    steps = np.flatnonzero(r[1:] != r[:-1]) + 1
    return float(np.sum((r[steps] - r[steps - 1]) * p[steps])), recall, precision


def evaluate(solution_rows: list[SubmissionRow], submission_rows: list[SubmissionRow],
             iou_threshold: float = IOU_THRESHOLD) -> EvalResult:
    """Score a submission against the truth (both lists of rows); see the module docstring."""
    truth_by_id = _by_id(solution_rows, "solution")
    pred_by_id = _by_id(submission_rows, "submission")
    extra = [i for i in pred_by_id if i not in truth_by_id]
    missing = [i for i in truth_by_id if i not in pred_by_id]

    n_truth = [0] * NUM_CLASSES
    # Per class: confidences and TP flags, appended image by image in solution order and within
    # an image in row order, so a stable sort on confidence gives the documented tie order.
    conf_parts: list[list[np.ndarray]] = [[] for _ in range(NUM_CLASSES)]
    tp_parts: list[list[np.ndarray]] = [[] for _ in range(NUM_CLASSES)]
    n_ignored = n_empty_truth = n_empty_det = 0

    for image_id, truth in truth_by_id.items():
        pred = pred_by_id.get(image_id)
        if pred is not None and (pred.width, pred.height) != (truth.width, truth.height):
            raise ValueError(f"image {image_id}: submission size {pred.width}x{pred.height} (WxH) differs "
                             f"from the solution's {truth.width}x{truth.height}")
        t_masks = _ImageMasks(truth, f"solution image {image_id}")
        truth_of_class: dict[int, list[int]] = {}
        seen: set[tuple[int, int]] = set()
        for label, _, text in truth.predictions:
            if text in t_masks.empty:
                n_empty_truth += 1
                continue
            key = (label, t_masks.index[text])
            if key not in seen:  # a (label, mask) pair listed twice is one object
                seen.add(key)
                truth_of_class.setdefault(label, []).append(key[1])
        for c, idx in truth_of_class.items():
            n_truth[c] += len(idx)
        if pred is None:
            continue

        p_masks = _ImageMasks(pred, f"submission image {image_id}")
        dets_of_class: dict[int, tuple[list[float], list[int]]] = {}
        for label, conf, text in pred.predictions:
            if text in p_masks.empty:
                n_empty_det += 1
                continue
            if label not in truth_of_class:
                n_ignored += 1
                continue
            if not math.isfinite(conf):
                raise ValueError(f"submission image {image_id}: confidence {conf} for label {label} is not finite")
            confs, masks = dets_of_class.setdefault(label, ([], []))
            confs.append(conf)
            masks.append(p_masks.index[text])
        if not dets_of_class:
            continue

        # One IoU matrix per image [distinct predicted masks, distinct truth masks].
        iou = np.asarray(coco_mask.iou(p_masks.rles, t_masks.rles, [0] * len(t_masks.rles)), dtype=np.float64)
        iou = iou.reshape(len(p_masks.rles), len(t_masks.rles))
        for c, (confs, masks) in dets_of_class.items():
            conf = np.asarray(confs, dtype=np.float64)
            sub = iou[np.asarray(masks)][:, truth_of_class[c]]  # [detections, truth masks of c]
            best = np.argmax(sub, axis=1)  # first truth mask wins a tie
            best_iou = sub[np.arange(len(best)), best]
            tp = np.zeros(len(conf), dtype=bool)
            taken = np.zeros(sub.shape[1], dtype=bool)
            for d in np.argsort(-conf, kind="stable"):
                if best_iou[d] >= iou_threshold and not taken[best[d]]:
                    tp[d] = taken[best[d]] = True
            conf_parts[c].append(conf)
            tp_parts[c].append(tp)

    per_class_ap: dict[int, float] = {}
    n_det: dict[int, int] = {}
    n_tp: dict[int, int] = {}
    curves: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for c in range(NUM_CLASSES):
        conf = np.concatenate(conf_parts[c]) if conf_parts[c] else np.zeros(0)
        tp = np.concatenate(tp_parts[c]) if tp_parts[c] else np.zeros(0, dtype=bool)
        n_det[c], n_tp[c] = int(conf.size), int(tp.sum())
        if n_truth[c] == 0:
            per_class_ap[c] = math.nan
            continue
        ranked = tp[np.argsort(-conf, kind="stable")]
        per_class_ap[c], recall, precision = average_precision(ranked, n_truth[c])
        curves[c] = (recall, precision)

    scored = [per_class_ap[c] for c in range(NUM_CLASSES) if n_truth[c] > 0]
    return EvalResult(
        mAP=float(np.mean(scored)) if scored else math.nan,
        per_class_ap=per_class_ap, n_truth=dict(enumerate(n_truth)), n_detections=n_det,
        n_true_positives=n_tp, pr_curves=curves, iou_threshold=iou_threshold,
        n_images=len(truth_by_id), n_extra_images=len(extra), n_missing_images=len(missing),
        n_ignored_detections=n_ignored, n_empty_truth=n_empty_truth, n_empty_detections=n_empty_det,
        extra_image_ids=extra, missing_image_ids=missing,
    )


def format_result(result: EvalResult) -> str:
    """Per-class table (index, name, AP, truth masks, detections), then a last line ``mAP 0.xxxxxx``."""
    lines = [f"{'':>2} {'class':<42} {'AP':>8} {'truth':>7} {'dets':>8}"]
    for c in range(NUM_CLASSES):
        ap = result.per_class_ap[c]
        ap_text = "-" if math.isnan(ap) else f"{ap:.6f}"
        lines.append(f"{c:>2} {CLASS_NAMES[c]:<42} {ap_text:>8} {result.n_truth[c]:>7} {result.n_detections[c]:>8}")
    lines.append(f"images {result.n_images}; submission IDs not in the solution (ignored): {result.n_extra_images}; "
                 f"solution IDs missing from the submission: {result.n_missing_images}")
    lines.append(f"detections ignored (class not in that image's truth): {result.n_ignored_detections}; "
                 f"empty masks dropped: truth {result.n_empty_truth}, detections {result.n_empty_detections}")
    lines.append(f"mAP {result.mAP:.6f}")  # NaN prints as 'mAP nan' when no class has truth
    return "\n".join(lines)


def evaluate_files(solution_csv: str | os.PathLike, submission_csv: str | os.PathLike,
                   out_json: str | os.PathLike | None = None, iou_threshold: float = IOU_THRESHOLD) -> EvalResult:
    """Read both CSVs, score them (``evaluate``), optionally write the JSON. The PR curves are
    ``visualize.plot_pr_curves(result, path)``: the metric knows nothing of plots."""
    result = evaluate(read_submission(solution_csv), read_submission(submission_csv), iou_threshold)
    if out_json is not None:
        payload = {"solution": str(solution_csv), "submission": str(submission_csv), **result.to_dict()}
        write_text_atomic(out_json, json.dumps(payload, indent=2) + "\n")
    return result
