"""Multi-label stratified folds, so every class (even the 78-image Mitotic spindle) is spread
over every fold.

    python -m hpa_scc split LABELS.csv --folds 5 --seed 0 --out folds.csv

Uses iterative stratification (Sechidis et al. 2011, ``iterative-stratification``); the
assignment is a pure function of the label table's rows (in file order), the fold count and
the seed.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

from hpa_scc.constants import CLASS_NAMES, NUM_CLASSES, format_labels
from hpa_scc.utils.fileio import atomic_path
from hpa_scc.data.images import read_label_table


def assign_folds(labels: list[tuple[int, ...]], n_folds: int = 5, seed: int = 0) -> np.ndarray:
    """Labels per image -> fold index per image (int64 [N], values 0..n_folds-1)."""
    if n_folds < 2:
        raise ValueError(f"--folds must be at least 2, got {n_folds}")
    if len(labels) < n_folds:
        raise ValueError(f"cannot split {len(labels)} images into {n_folds} folds")
    y = np.zeros((len(labels), NUM_CLASSES), dtype=np.int8)
    for row, image_labels in enumerate(labels):
        y[row, list(image_labels)] = 1
    folds = np.full(len(labels), -1, dtype=np.int64)
    splitter = MultilabelStratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), y)):
        folds[held_out] = fold
    return folds


def fold_class_counts(labels: list[tuple[int, ...]], folds: np.ndarray) -> np.ndarray:
    """int64 [n_folds, 19]: how many images of each class each fold holds."""
    counts = np.zeros((int(folds.max()) + 1, NUM_CLASSES), dtype=np.int64)
    for image_labels, fold in zip(labels, folds, strict=True):
        counts[fold, list(image_labels)] += 1
    return counts


def split_table(labels_csv: str | os.PathLike, out_csv: str | os.PathLike, n_folds: int = 5,
                seed: int = 0) -> tuple[list[str], list[tuple[int, ...]], np.ndarray]:
    """Read ``ID,Label``, assign folds, write ``ID,Label,fold`` atomically; returns the columns."""
    table = read_label_table(labels_csv)
    ids, labels = list(table), list(table.values())
    folds = assign_folds(labels, n_folds, seed)
    with atomic_path(out_csv, ".csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ID", "Label", "fold"])
        for image_id, image_labels, fold in zip(ids, labels, folds, strict=True):
            writer.writerow([image_id, format_labels(image_labels), int(fold)])
    return ids, labels, folds


def format_balance(counts: np.ndarray) -> str:
    """A class x fold table of image counts, with each class's smallest/largest fold share."""
    n_folds = counts.shape[0]
    head = f"{'class':<44}" + "".join(f"{'fold' + str(f):>7}" for f in range(n_folds)) + "  min/max"
    lines = [head]
    for c in range(NUM_CLASSES):
        col = counts[:, c]
        ratio = f"{col.min() / col.max():.2f}" if col.max() else "  -"
        lines.append(f"{c:>2} {CLASS_NAMES[c]:<41}" + "".join(f"{v:>7}" for v in col) + f"  {ratio:>7}")
    return "\n".join(lines)


def default_out(labels_csv: str | os.PathLike, n_folds: int, seed: int) -> Path:
    return Path(f"{Path(labels_csv).stem}_folds{n_folds}_seed{seed}.csv")
