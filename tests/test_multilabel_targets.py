"""What each head trains a cell with several labels on: the multilabel head all of them, the
softmax head (per_label layout) only the first, since the cell's instances share one mask.

Both through a real training forward of a random-init 128 px DenseNet121, with the loss inputs
caught on their way in.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.models.detection.roi_heads as tv_roi_heads
from pycocotools import mask as coco_mask

from hpa_scc.config import ModelConfig
from hpa_scc.data.instances import masks_to_boxes, shadowed_instances, shadowed_warning
from hpa_scc.models.detector import build_model
from hpa_scc.apps.prepare import coco_file

SIZE = 128


def cell_mask(x: int, y: int, w: int = 30, h: int = 36) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[y:y + h, x:x + w] = 1
    return mask


def record(labels: list[int], masks: list[np.ndarray]) -> dict:
    """A prepare record of one image whose cells are ``masks``, every cell with the image's ``labels``."""
    cells = []
    for cell_id, mask in enumerate(masks, start=1):
        rle = coco_mask.encode(np.asfortranarray(mask))
        cells.append({"cell_id": cell_id, "area": int(mask.sum()), "bbox": coco_mask.toBbox(rle).tolist(),
                      "touches_border": False,
                      "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    return {"index": 1, "image_id": "img", "height": SIZE, "width": SIZE, "orig_height": SIZE, "orig_width": SIZE,
            "labels": labels, "cells": cells}


def target_of(coco: dict) -> dict:
    """The COCO instances of the one image as a torchvision target, as CellInstances reads them."""
    anns = coco["annotations"]
    masks = torch.from_numpy(coco_mask.decode([a["segmentation"] for a in anns])).permute(2, 0, 1).contiguous()
    target = {"masks": masks, "boxes": masks_to_boxes(masks)}
    if coco["info"]["layout"] == "multilabel":
        target["labels"] = torch.ones(len(anns), dtype=torch.int64)
        target["label_vectors"] = torch.tensor([a["label_vector"] for a in anns], dtype=torch.float32)
    else:
        target["labels"] = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
    return target


def training_forward(head: str, target: dict) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="densenet121", head=head, in_channels=3), image_size=SIZE).train()
    model([torch.rand(3, SIZE, SIZE)], [target])


def test_multilabel_head_trains_every_label_of_a_cell(monkeypatch):
    """Cell A shows classes 1 and 6, cell B class 3: every positive proposal's BCE target is its cell's whole vector."""
    coco = coco_file([record([1, 6], [cell_mask(10, 10)])], "multilabel")
    other = coco_file([record([3], [cell_mask(70, 60)])], "multilabel")
    target = target_of({**coco, "annotations": coco["annotations"] + other["annotations"]})
    assert target["label_vectors"].sum(1).tolist() == [2, 1]

    caught = []
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def catch(logits, targets, *args, **kwargs):
        if targets.ndim == 2 and targets.shape[1] == 19:  # the label loss, not the RPN's objectness
            caught.append(targets.detach().clone())
        return bce(logits, targets, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "binary_cross_entropy_with_logits", catch)
    training_forward("multilabel", target)
    (targets,) = caught
    cell_a, cell_b = target["label_vectors"]
    is_a = (targets == cell_a).all(1)
    is_b = (targets == cell_b).all(1)
    assert (is_a | is_b).all() and is_a.any() and is_b.any()
    assert (targets[is_a][:, [1, 6]] == 1).all()  # both labels of cell A are targets of each of its proposals
    assert shadowed_instances(coco) == (0, 1)


def test_softmax_head_on_per_label_instances_never_trains_a_cells_second_label(monkeypatch):
    """The flaw the multilabel head removes: a cell labelled 1 and 6 is two instances (category ids 2 and 7)
    with one mask; the Matcher picks the first of tied ground truths, so every positive proposal is 2, none 7."""
    coco = coco_file([record([1, 6], [cell_mask(10, 10)])], "per_label")
    target = target_of(coco)
    assert target["labels"].tolist() == [2, 7] and torch.equal(target["masks"][0], target["masks"][1])

    caught = []
    loss = tv_roi_heads.fastrcnn_loss

    def catch(class_logits, box_regression, labels, regression_targets):
        caught.append(torch.cat(labels))
        return loss(class_logits, box_regression, labels, regression_targets)

    monkeypatch.setattr(tv_roi_heads, "fastrcnn_loss", catch)
    training_forward("softmax", target)
    (labels,) = caught
    positives = labels[labels > 0]
    assert len(positives) > 0 and (positives == 2).all() and not (labels == 7).any()
    assert shadowed_instances(coco) == (1, 2)
    assert "1 of 2 training instances (50%)" in shadowed_warning(1, 2)


def test_shadowed_instances_compare_masks_within_an_image_only():
    """Equal masks in two images shadow nothing; a polygon and the RLE of its mask are one mask."""
    rle = coco_file([record([0], [cell_mask(10, 10)])], "multilabel")["annotations"][0]["segmentation"]
    polygon = [[60.0, 60.0, 100.0, 60.0, 100.0, 90.0, 60.0, 90.0]]
    raster = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(polygon, SIZE, SIZE)))
    raster_rle = {"size": [SIZE, SIZE], "counts": coco_mask.encode(np.asfortranarray(raster))["counts"].decode("ascii")}
    coco = {"images": [{"id": 1, "height": SIZE, "width": SIZE}, {"id": 2, "height": SIZE, "width": SIZE}],
            "annotations": [{"image_id": 1, "segmentation": rle}, {"image_id": 2, "segmentation": rle}]}
    assert shadowed_instances(coco) == (0, 2)
    coco["annotations"] += [{"image_id": 2, "segmentation": polygon}, {"image_id": 2, "segmentation": raster_rle}]
    assert shadowed_instances(coco) == (1, 4)
    assert shadowed_instances({"images": [], "annotations": []}) == (0, 0)


@pytest.mark.parametrize("layout, expected", [("per_label", 1), ("multilabel", 0)])
def test_shadowed_instances_of_each_layout(layout, expected):
    coco = coco_file([record([1, 6], [cell_mask(10, 10), cell_mask(70, 60)])], layout)
    assert shadowed_instances(coco) == (2 * expected, 4 if layout == "per_label" else 2)
