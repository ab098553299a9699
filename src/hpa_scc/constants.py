"""HPA facts, declared once: the 19 classes, the channel order and the label-string format.

Every other module imports these names; nothing else in the package spells a class name,
a channel name or the ``|`` separator.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# Class index -> name, as in the Kaggle 2021 "HPA Single Cell Classification" task.
CLASS_NAMES: tuple[str, ...] = (
    "Nucleoplasm",  # 0
    "Nuclear membrane",  # 1
    "Nucleoli",  # 2
    "Nucleoli fibrillar center",  # 3
    "Nuclear speckles",  # 4
    "Nuclear bodies",  # 5
    "Endoplasmic reticulum",  # 6
    "Golgi apparatus",  # 7
    "Intermediate filaments",  # 8
    "Actin filaments",  # 9
    "Microtubules",  # 10
    "Mitotic spindle",  # 11
    "Centrosome",  # 12
    "Plasma membrane",  # 13
    "Mitochondria",  # 14
    "Aggresome",  # 15
    "Cytosol",  # 16
    "Vesicles and punctate cytosolic patterns",  # 17
    "Negative",  # 18
)
NUM_CLASSES = len(CLASS_NAMES)  # 19
# Display abbreviations (figure captions), in class order.
SHORT_CLASS_NAMES: tuple[str, ...] = (
    "Nucleopl.", "Nuc. membr.", "Nucleoli", "Nucleoli FC", "Nuc. speckles", "Nuc. bodies", "ER", "Golgi",
    "Int. filam.", "Actin filam.", "Microtub.", "Mit. spindle", "Centrosome", "Plasma membr.", "Mitochond.",
    "Aggresome", "Cytosol", "Vesicles", "Negative",
)
NEGATIVE = 18
MITOTIC_SPINDLE = 11

# How many of the 21,806 Kaggle training images carry each class (counted from the real
# train.csv; a few rows repeat a label, e.g. '13|13', counted once). The synthetic generator
# draws labels with this skew.
KAGGLE_CLASS_COUNTS: tuple[int, ...] = (
    8797, 1095, 2451, 1262, 1425, 1792, 775, 1846, 964, 998,
    818, 78, 1734, 3111, 2013, 252, 5685, 593, 34,
)

# Channel order of every array in the project: [R, G, B, Y] =
# microtubules, protein of interest, nucleus, endoplasmic reticulum.
CHANNELS: tuple[str, ...] = ("red", "green", "blue", "yellow")
RGB_CHANNELS: tuple[str, ...] = CHANNELS[:3]

LABEL_SEP = "|"


class LabelError(ValueError):
    """A label string or index that is not one of the 19 classes."""


def parse_labels(text: str, *, where: str = "") -> list[int]:
    """``"8|5|0"`` -> ``[8, 5, 0]`` (order kept, duplicates dropped).

    ``where`` names the row or file in the error, e.g. ``"train.csv row 12 (ID abc)"``.
    """
    at = f" in {where}" if where else ""
    text = str(text).strip()
    if not text:
        raise LabelError(f"empty label string{at}; expected class indices joined by '|', e.g. '8|5|0'")
    out: list[int] = []
    for token in text.split(LABEL_SEP):
        token = token.strip()
        try:
            idx = int(token)
        except ValueError:
            raise LabelError(
                f"label {token!r}{at} is not an integer; expected class indices 0-{NUM_CLASSES - 1} "
                f"joined by '|', e.g. '8|5|0'"
            ) from None
        check_label(idx, where=where)
        if idx not in out:
            out.append(idx)
    if NEGATIVE in out and len(out) > 1:
        raise LabelError(f"labels {text!r}{at} combine Negative ({NEGATIVE}) with other classes; Negative means "
                         f"none of the others: keep {NEGATIVE} alone or drop it")
    return out


def check_label(idx: int, *, where: str = "") -> int:
    """Return ``idx`` if it is a class index, else raise LabelError naming ``where``."""
    if not 0 <= int(idx) < NUM_CLASSES:
        at = f" in {where}" if where else ""
        raise LabelError(f"unknown label {idx}{at}; class indices run 0-{NUM_CLASSES - 1} (18 = Negative)")
    return int(idx)


def format_labels(labels: Iterable[int]) -> str:
    """``[8, 5, 0]`` -> ``"8|5|0"``; rejects unknown indices."""
    labels = [check_label(i) for i in labels]
    if not labels:
        raise LabelError("cannot format an empty label set; a cell with no label is Negative (18)")
    return LABEL_SEP.join(str(i) for i in labels)


def labels_to_multihot(labels: Iterable[int]) -> list[int]:
    """``[0, 5]`` -> a 19-long 0/1 list."""
    hot = [0] * NUM_CLASSES
    for i in labels:
        hot[check_label(i)] = 1
    return hot

# The largest side a step resizes images to: the largest HPA images are 3072 px, and past them a
# cached image only grows in memory (4 x size^2 bytes: 64 MB at 4096 px, 40 GB at 100,000 px).
MAX_SIZE = 4096


@dataclass(frozen=True)
class FamilySpec:
    """A model family (``model.family``): the facts the config, the trainer and predict share.
    Each family's code is its entry in ``engine.families`` (data, fit) and ``models`` (the model)."""

    name: str
    backbones: tuple[str, ...] | None  # None: checked elsewhere (the detector's, or none)
    unit: str  # what one training sample is: "images" or "cells"
    val_metric: str  # the validation figure that picks best.pt
    loop: bool  # trained by the gradient loop; False: fitted once (no optimiser, no loader)


# The one registry of model families: config.validate checks model.family against it, the
# trainer and predict read their facts here (no parallel name lists).
FAMILIES = {f.name: f for f in (
    FamilySpec("maskrcnn", None, "images", "segm_AP", True),
    FamilySpec("cell", ("resnet18", "resnet34", "resnet50", "resnet101", "resnext101_32x8d", "densenet121",
                        "efficientnet_b0"), "cells", "cell_AP", True),
    FamilySpec("features", None, "cells", "cell_AP", False),
)}

# Multiple-instance learning: how the cells' logits pool into the image's (hpa_scc.weak.mil).
MIL_POOLING = ("lse", "attention", "max", "mean", "noisy_or")
# What the detector's multilabel head classifies a cell from (models.detector.MultiLabelRoIHeads):
# its whole box, or the box's features weighted by the cell's mask.
LABEL_POOLING = ("box", "mask")
LABEL_LOSSES = ("mean", "sum")  # the multilabel head's BCE over a cell's classes (models.detector)
# The per-cell classifiers of the features family (model.feature_classifier).
FEATURE_CLASSIFIERS = ("logistic", "boosting")
