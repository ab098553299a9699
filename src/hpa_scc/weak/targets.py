"""Weak labels to cell targets: pure functions, no I/O.

HPA gives labels per image; Mask R-CNN needs one target per cell. Every cell inherits its
image's labels (the weak-supervision assumption), and the cells become instances in one of two
layouts:

- ``multilabel``: one instance per cell, with a 19-long 0/1 label vector (for a sigmoid head);
- ``per_label``: one instance per cell and label, the original implementation's layout, which a
  stock softmax Mask R-CNN can train on.

Category ids are ``label + 1`` (1..19): 0 stays background. The original DenseNet path used the
class index itself as the category id, so Nucleoplasm (0) collided with background.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from hpa_scc.constants import NEGATIVE, NUM_CLASSES, check_label, labels_to_multihot

LAYOUTS = ("multilabel", "per_label")


def category_id(label: int) -> int:
    """Class index 0..18 -> category id 1..19 (0 is background)."""
    return check_label(label) + 1


def label_of(category: int) -> int:
    """Category id 1..19 -> class index 0..18."""
    if not 1 <= int(category) <= NUM_CLASSES:
        raise ValueError(f"category id {category} is not 1..{NUM_CLASSES} (0 is background)")
    return int(category) - 1


@dataclass(frozen=True)
class CellInfo:
    """One cell of a label image: id, area in px, bbox (x0, y0, x1, y1; x1/y1 exclusive), border."""

    cell_id: int
    area_px: int
    bbox: tuple[int, int, int, int]
    touches_border: bool


def describe_cells(cells: np.ndarray) -> list[CellInfo]:
    """Label image uint [H, W] (0 background) -> one CellInfo per cell id present, in id order."""
    cells = np.asarray(cells)
    areas = np.bincount(cells.ravel().astype(np.int64))
    height, width = cells.shape
    out = []
    for index, slices in enumerate(ndimage.find_objects(cells.astype(np.int32)), start=1):
        if slices is None:
            continue
        ys, xs = slices
        border = ys.start == 0 or xs.start == 0 or ys.stop == height or xs.stop == width
        out.append(CellInfo(index, int(areas[index]), (xs.start, ys.start, xs.stop, ys.stop), border))
    return out


def keep_cells(cells: Iterable[CellInfo], *, min_cell_area_px: int = 0, drop_border_cells: bool = False) -> list[CellInfo]:
    """The cells that pass the filters: area >= min_cell_area_px, and not cut by the border if asked."""
    return [c for c in cells if c.area_px >= min_cell_area_px and not (drop_border_cells and c.touches_border)]


def inherit_labels(cell_ids: Iterable[int], image_labels: Iterable[int]) -> dict[int, list[int]]:
    """Every cell gets its image's labels (sorted, checked)."""
    labels = sorted({check_label(i) for i in image_labels})
    if not labels:
        raise ValueError("an image needs at least one label to label its cells (Negative is 18)")
    return {int(k): list(labels) for k in cell_ids}


@dataclass(frozen=True)
class Instance:
    """One training instance: a cell, its category id and (multilabel) its label vector."""

    cell_id: int
    category_id: int  # 1..19; in the multilabel layout, the cell's first label
    label_vector: tuple[float, ...] | None = None  # multilabel layout only: 0/1, or soft targets (distillation)


def cell_instances(cell_labels: Mapping[int, Iterable[int]], layout: str) -> list[Instance]:
    """{cell id: labels} -> instances in ``layout`` (cells in id order, labels ascending)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {list(LAYOUTS)}")
    out = []
    for cell_id in sorted(cell_labels):
        labels = sorted({check_label(i) for i in cell_labels[cell_id]})
        if not labels:
            raise ValueError(f"cell {cell_id} has no label; a cell with no label is Negative ({NEGATIVE})")
        if layout == "multilabel":
            out.append(Instance(cell_id, category_id(labels[0]), tuple(labels_to_multihot(labels))))
        else:
            out.extend(Instance(cell_id, category_id(label)) for label in labels)
    return out


def transfer_labels(pred_cells: np.ndarray, true_cells: np.ndarray,
                    true_labels: Mapping[int, Iterable[int]]) -> dict[int, tuple[list[int], int]]:
    """Give each predicted cell the labels of the true cell it overlaps most (for the oracle).

    Returns {pred id: (labels, true id)}; a predicted cell on true background gets
    ([Negative], 0). Used on synthetic sets, where the true cells are known.
    """
    pred = pred_cells.ravel().astype(np.int64)
    true = true_cells.ravel().astype(np.int64)
    n_true = int(true.max()) + 1
    pairs = np.bincount(pred * n_true + true, minlength=(int(pred.max()) + 1) * n_true)
    pairs = pairs.reshape(-1, n_true)
    out = {}
    for pred_id in np.unique(pred):
        if pred_id == 0:
            continue
        overlap = pairs[pred_id].copy()
        overlap[0] = 0  # background does not count as a cell
        best = int(overlap.argmax())
        if overlap[best] == 0:
            out[int(pred_id)] = ([NEGATIVE], 0)
        else:
            out[int(pred_id)] = (sorted(true_labels[best]), best)
    return out


# --- label refinement: the model's cell scores narrow the image labels down -------------------------
def refine_labels(image_labels: Iterable[int], conf: np.ndarray, threshold: float,
                  relative: float = 0.0) -> list[list[int]]:
    """Each cell keeps the image labels it scores highly for; none left -> Negative.

    ``conf`` float [K, 19] holds the model's per-cell confidences. A cell keeps image label c
    when its confidence for c is at least ``threshold`` and at least ``relative`` x the best
    cell's confidence for c in this image (``relative`` 0: the absolute threshold alone). The
    relative rule compares cells of one image with each other, which is what the competition
    ranks, and does not depend on how well a young model's scores are calibrated. A label the
    image does not carry is never added (the image labels are the only supervision we trust),
    and Negative stays Negative. Returns one sorted label list per cell, in row order.
    """
    labels = sorted({check_label(i) for i in image_labels})
    if not labels:
        raise ValueError("an image needs at least one label to refine its cells' labels (Negative is 18)")
    if not 0.0 <= relative <= 1.0:
        raise ValueError(f"relative must be in [0, 1] (a share of the image's best cell score), got {relative}")
    conf = np.asarray(conf, dtype=np.float32).reshape(-1, NUM_CLASSES)
    if labels == [NEGATIVE] or not len(conf):
        return [[NEGATIVE] for _ in range(len(conf))]
    cut = np.maximum(threshold, relative * conf.max(axis=0))  # per class: the stricter of the two rules
    return [[c for c in labels if row[c] >= cut[c]] or [NEGATIVE] for row in conf]


# --- distillation: the teacher's cell scores as soft targets -----------------------------------------
SOFT_SCALES = ("relative", "raw")


def soft_targets(image_labels: Iterable[int], conf: np.ndarray, scale: str = "relative") -> np.ndarray:
    """A teacher's per-cell scores as the soft targets a student matches, float32 [K, 19].

    Only what the image labels allow: a class the image does not carry is 0 for every cell (the
    image labels are the only supervision we trust). For a class it carries, ``relative``: the
    cell's score over the image's best cell's score for the class, so the best cell gets 1 (an
    image label says at least one cell shows it) and the others their share of it, the same
    comparison refine's relative rule cuts at; ``raw``: the teacher's score itself. Negative (18)
    gets 1 minus the cell's highest target: a cell that fits none of its image's labels is
    Negative, as refine's hard labels make it. An image labelled Negative makes every cell Negative.
    """
    if scale not in SOFT_SCALES:
        raise ValueError(f"unknown soft target scale {scale!r}; choose one of {list(SOFT_SCALES)}")
    labels = sorted({check_label(i) for i in image_labels})
    if not labels:
        raise ValueError("an image needs at least one label to make its cells' targets (Negative is 18)")
    conf = np.asarray(conf, dtype=np.float32).reshape(-1, NUM_CLASSES)
    if not np.isfinite(conf).all():
        raise ValueError("the teacher's cell scores hold NaN or inf: check the teacher run (a diverged fit)")
    out = np.zeros_like(conf)
    shown = [c for c in labels if c != NEGATIVE]
    if not shown:
        out[:, NEGATIVE] = 1.0
        return out
    scores = np.clip(conf[:, shown], 0.0, 1.0)
    if scale == "relative":
        best = scores.max(axis=0, keepdims=True)
        scores = np.divide(scores, best, out=np.ones_like(scores), where=best > 0)  # no signal: every cell may show it
    out[:, shown] = scores
    out[:, NEGATIVE] = 1.0 - scores.max(axis=1)
    return out


def soft_instances(cell_targets: Mapping[int, np.ndarray], decimals: int = 4) -> list[Instance]:
    """{cell id: float [19] targets} -> multilabel instances (cells in id order) whose label vector
    is the targets rounded to ``decimals`` (the COCO files stay small and the same scores write
    the same bytes) and whose category is the highest target's."""
    out = []
    for cell_id in sorted(cell_targets):
        vector = np.round(np.asarray(cell_targets[cell_id], np.float64).reshape(NUM_CLASSES), decimals)
        if not ((vector >= 0) & (vector <= 1)).all():
            raise ValueError(f"cell {cell_id}: soft targets must lie in [0, 1], got {vector.min()}..{vector.max()}")
        out.append(Instance(int(cell_id), category_id(int(vector.argmax())), tuple(float(v) for v in vector)))
    return out


def label_quality(predicted: Sequence[Iterable[int]], truth: Sequence[Iterable[int]]) -> dict[str, float]:
    """How well cell labels match the truth, micro over (cell, class) pairs of the 19 classes.

    Returns precision, recall, F1 and ``exact`` (share of cells whose label set is right). Used
    on synthetic sets to say whether a refinement round made the training labels better: the
    image labels inherited by every cell give cells labels they do not show (low precision) and
    never say Negative (a truly Negative cell in a labelled image is a miss).
    """
    if len(predicted) != len(truth):
        raise ValueError(f"need one label list per cell on both sides, got {len(predicted)} and {len(truth)}")
    tp = n_pred = n_true = exact = 0
    for p, t in zip(predicted, truth, strict=True):
        p, t = {check_label(i) for i in p}, {check_label(i) for i in t}
        tp, n_pred, n_true, exact = tp + len(p & t), n_pred + len(p), n_true + len(t), exact + (p == t)
    return {"precision": tp / max(n_pred, 1), "recall": tp / max(n_true, 1),
            "f1": 2 * tp / max(n_pred + n_true, 1), "exact": exact / max(len(truth), 1)}


def within_image_auc(image_labels: Sequence[Iterable[int]], confs: Sequence[np.ndarray],
                     truth: Sequence[Sequence[Iterable[int]]]) -> tuple[float, int]:
    """How well a model ranks the cells of one image: (mean ROC AUC, number of pairs).

    For every image and each of its labels shown by some but not all of its cells, the AUC of
    the cells' confidence for that label at telling the cells that show it from those that do
    not (ties count half); the mean over those (image, label) pairs. 0.5 is chance: no rule can
    then make better cell labels than the image labels. (nan, 0) when no pair qualifies. Needs
    the cells' true labels, so synthetic sets only.
    """
    if not len(image_labels) == len(confs) == len(truth):
        raise ValueError(f"need image labels, confidences and true labels per image, got {len(image_labels)}, "
                         f"{len(confs)} and {len(truth)}")
    aucs = []
    for labels, conf, cells in zip(image_labels, confs, truth, strict=True):
        conf = np.asarray(conf, dtype=np.float64).reshape(-1, NUM_CLASSES)
        if len(conf) != len(cells):
            raise ValueError(f"{len(conf)} confidence rows for {len(cells)} cells")
        for label in sorted({check_label(i) for i in labels} - {NEGATIVE}):
            shows = np.array([label in set(c) for c in cells], bool)
            if shows.all() or not shows.any():
                continue
            pos, neg = conf[shows, label], conf[~shows, label]
            wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
            aucs.append(wins / (len(pos) * len(neg)))
    return (float(np.mean(aucs)), len(aucs)) if aucs else (float("nan"), 0)


def image_scores(conf: np.ndarray) -> np.ndarray:
    """An image's score per class: the best cell's confidence, float [19] (zeros without cells)."""
    conf = np.asarray(conf, dtype=np.float32).reshape(-1, NUM_CLASSES)
    return conf.max(axis=0) if len(conf) else np.zeros(NUM_CLASSES, np.float32)


def choose_threshold(image_labels: list[Iterable[int]], confs: list[np.ndarray],
                     candidates: Iterable[float] | None = None) -> tuple[float, float]:
    """The cell threshold that best recovers held-out images' labels from their cells: (t, F1).

    Uses image labels only (what real data has): image i is predicted to carry class c when
    one of its cells scores >= t for c; t maximises the micro F1 of those predictions against
    the true image labels over ``candidates`` (default 0.05, 0.10, ..., 0.95). Ties go to the
    lower t, which keeps more labels.
    """
    if len(image_labels) != len(confs) or not confs:
        raise ValueError(f"need one confidence array per held-out image, got {len(image_labels)} labels "
                         f"and {len(confs)} arrays")
    truth = np.zeros((len(confs), NUM_CLASSES), bool)
    for i, labels in enumerate(image_labels):
        truth[i, [check_label(c) for c in labels]] = True
    best = np.stack([image_scores(c) for c in confs])  # [images, 19]
    grid = np.round(np.arange(0.05, 0.96, 0.05), 2) if candidates is None else np.asarray(list(candidates))
    best_t, best_f1 = float(grid[0]), -1.0
    for t in grid:
        pred = best >= t
        tp = int((pred & truth).sum())
        f1 = 2 * tp / max(int(pred.sum()) + int(truth.sum()), 1)
        if f1 > best_f1 + 1e-12:
            best_t, best_f1 = float(t), f1
    return best_t, best_f1


def fuse_image_scores(conf: np.ndarray, weight: float) -> np.ndarray:
    """Cell confidences blended with the image's score: conf^(1-w) x image_score^w, float [K, 19].

    The image score (per class, the best cell) says whether the image shows the class at all;
    the cell score says which cells. ``weight`` 0 returns the cell scores unchanged.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"image fusion weight must be in [0, 1], got {weight}")
    conf = np.asarray(conf, dtype=np.float32).reshape(-1, NUM_CLASSES)
    if weight == 0 or not len(conf):
        return conf
    return (np.power(conf, 1.0 - weight) * np.power(image_scores(conf)[None, :], weight)).astype(np.float32)
