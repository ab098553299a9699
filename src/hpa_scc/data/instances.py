"""Training data: the COCO files that ``prepare`` writes, as torchvision detection samples.

    ds = CellInstances(PreparedSet("runs/demo/prepared"), folds=[1, 2], layout="multilabel", augment=True)
    image, target = ds[0]      # float [4, S, S] in [0, 1] (uint8=True: uint8 [4, S, S]); torchvision target dict

Targets follow torchvision's contract: ``boxes`` float xyxy [N, 4], ``labels`` int64 [N]
(0 = background), ``masks`` uint8 [N, S, S]. ``multilabel`` (what the default head trains on):
one instance per cell, ``labels`` all 1 (cell) and ``label_vectors`` float [N, 19].
``per_label`` (the softmax head's, kept for fidelity with the original implementation): one
instance per cell and label, ``labels`` = category id (class + 1). Boxes are recomputed from the
masks after every geometric change, never transformed by hand.

The per_label layout does not train what it says: a cell's instances share one box and mask,
torchvision's Matcher gives each proposal the first of the ground truths tied at its best IoU,
so every proposal on a cell trains as the cell's lowest label and its other labels are never a
target. ``shadowed_instances`` counts those instances; train the multilabel head instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import cached_property

import numpy as np
import torch
from pycocotools import mask as coco_mask
from torch.utils.data import Dataset

from hpa_scc.constants import NUM_CLASSES
from hpa_scc.data.prepared import PreparedSet


def _mask_key(segmentation, height: int, width: int) -> tuple:
    """A COCO segmentation -> a key equal for equal masks (compressed RLE is unique per mask)."""
    if isinstance(segmentation, Mapping) and isinstance(segmentation.get("counts"), str):
        return tuple(segmentation["size"]), segmentation["counts"]
    rles = coco_mask.frPyObjects(segmentation, height, width)  # polygons or uncompressed RLE
    rle = coco_mask.merge(rles) if isinstance(rles, list) else rles
    counts = rle["counts"]
    return tuple(rle["size"]), counts.decode("ascii") if isinstance(counts, bytes) else counts


def shadowed_instances(coco: Mapping) -> tuple[int, int]:
    """(instances never trained as their own label, all instances) of a COCO instances dict.

    An instance whose mask equals an earlier instance's of the same image is shadowed: the
    Matcher ties them at every proposal and picks the earlier, so a softmax head never sees its
    label. The per_label layout shadows every label of a cell after its first; multilabel: (0, N).
    """
    sizes = {img["id"]: (img.get("height"), img.get("width")) for img in coco.get("images", [])}
    seen: set[tuple] = set()
    shadowed = 0
    for ann in coco["annotations"]:
        key = (ann["image_id"], _mask_key(ann["segmentation"], *sizes.get(ann["image_id"], (None, None))))
        shadowed += key in seen
        seen.add(key)
    return shadowed, len(coco["annotations"])


def shadowed_warning(shadowed: int, total: int) -> str:
    """One line for the log when the softmax head trains on instances with shared masks."""
    share = shadowed / total if total else 0.0
    return (f"{shadowed} of {total} training instances ({share:.0%}) repeat the mask of an earlier instance of their "
            f"cell (the per_label layout): torchvision's Matcher assigns every proposal to the first of tied ground "
            f"truths, so the softmax head trains each cell as its lowest label only and never sees these labels; "
            f"use model.head=multilabel (the default)")


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """uint8/bool [N, H, W] -> float xyxy [N, 4] (x1/y1 exclusive, as torchvision expects)."""
    if masks.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    rows = masks.any(dim=2)
    cols = masks.any(dim=1)
    height, width = masks.shape[1:]
    y0 = rows.float().argmax(dim=1)
    y1 = height - rows.flip(1).float().argmax(dim=1)
    x0 = cols.float().argmax(dim=1)
    x1 = width - cols.flip(1).float().argmax(dim=1)
    return torch.stack([x0, y0, x1, y1], dim=1).float()


def random_flips(image: torch.Tensor, target: dict, rng: np.random.Generator, *, hflip_prob: float,
                 vflip_prob: float, rot90: bool) -> tuple[torch.Tensor, dict]:
    """Paired flips / 90-degree rotations of image [C,H,W] and masks [N,H,W]; boxes recomputed."""
    masks = target["masks"]
    if rng.random() < hflip_prob:
        image, masks = image.flip(-1), masks.flip(-1)
    if rng.random() < vflip_prob:
        image, masks = image.flip(-2), masks.flip(-2)
    if rot90:
        k = int(rng.integers(4))
        if k:
            image, masks = torch.rot90(image, k, (-2, -1)), torch.rot90(masks, k, (-2, -1))
    target = {**target, "masks": masks.contiguous(), "boxes": masks_to_boxes(masks)}
    return image.contiguous(), target


class CellInstances(Dataset):
    """Images of the given folds with their cells; sample i -> (float [C,S,S], target dict).

    The annotations stay in the folds' annotation stores (numpy arrays memory-mapped from
    ``fold<K>.store``, see ``hpa_scc.data.annotations``): no Python object per cell, so a forked
    loader worker's memory does not grow with the samples it reads, and opening the set costs
    the same at 100 images as at 100,000. ``image(i)`` is sample i's COCO image dict.
    """

    def __init__(self, prepared: PreparedSet | str | os.PathLike, folds: list[int], layout: str = "multilabel", *,
                 labels: str = "image", in_channels: int = 4, augment: bool = False, hflip_prob: float = 0.5,
                 vflip_prob: float = 0.5, rot90: bool = True, max_images: int | None = None, seed: int = 0,
                 uint8: bool = False, cell_features: bool = False):
        self.prepared = prepared if isinstance(prepared, PreparedSet) else PreparedSet(prepared)
        self.layout, self.in_channels, self.augment = layout, in_channels, augment
        self.flips = {"hflip_prob": hflip_prob, "vflip_prob": vflip_prob, "rot90": rot90}
        self.stores = self.prepared.annotation_stores(layout, folds, labels)
        # Images without any cell give the detector nothing to learn from. Sample i is image row
        # rows[i] of store which[i]: two arrays, whatever the number of images.
        kept = [(k, np.flatnonzero(store.n_cells() > 0)) for k, store in enumerate(self.stores)]
        self.which = np.concatenate([np.full(len(r), k, np.int32) for k, r in kept] or [np.zeros(0, np.int32)])
        self.rows = np.concatenate([r for _, r in kept] or [np.zeros(0, np.int64)])
        self.which, self.rows = self.which[:max_images], self.rows[:max_images]
        self.seed, self.epoch = seed, 0
        self.uint8 = uint8  # uint8 images: engine.to_device scales them on the device
        # each cell's hand-made features (target "cell_features" float [N, F]) for a head that reads
        # them: rows of the prepared set's feature store (PREPARED/crops/features.npy, the table the
        # features family trains on; built once, memory-mapped), not measured again every epoch
        self.features = None
        if cell_features:
            from hpa_scc.data.cells import build_store

            self.features = build_store(self.prepared.root, "features", progress=False)
            self.features.index()

    def set_epoch(self, epoch: int) -> None:
        """Reseeds the augmentation, so every epoch (and every resumed epoch) is reproducible."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, index: int) -> dict:
        """The COCO image dict of sample ``index`` (id, image_name, labels, sizes)."""
        return self.stores[self.which[index]].image(int(self.rows[index]))

    @cached_property
    def coco(self) -> dict:
        """The samples' COCO dict (validation scores against it); built on first use, in this process."""
        out: dict = {"images": [], "annotations": []}
        for k, store in enumerate(self.stores):
            part = store.to_coco(self.rows[self.which == k].tolist())
            out["images"] += part["images"]
            out["annotations"] += part["annotations"]
            out.update({key: part[key] for key in ("info", "categories") if key in part})
        return out

    def shadowed(self) -> tuple[int, int]:
        """``shadowed_instances`` of the samples, counted on the stores (no COCO dict built)."""
        shadowed = total = 0
        for k, store in enumerate(self.stores):
            for row in self.rows[self.which == k]:
                counts = [(tuple(r["size"]), r["counts"]) for r in store.rles(int(row))]
                shadowed += len(counts) - len(set(counts))
                total += len(counts)
        return shadowed, total

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        store, row = self.stores[self.which[index]], int(self.rows[index])
        info = store.image(row)
        pixels = np.array(self.prepared.read_image(info["image_name"])[: self.in_channels])  # out of the memmap
        image = torch.from_numpy(pixels) if self.uint8 else torch.from_numpy(pixels.astype(np.float32) / 255.0)
        masks = torch.from_numpy(store.masks(row))
        target = {"image_id": info["id"], "masks": masks, "boxes": masks_to_boxes(masks)}
        if self.features is not None:  # measured on the unflipped cells (flips leave them unchanged)
            found = self.features.find(info["image_name"], store.cell_ids(row))
            if (found < 0).any():
                raise KeyError(f"{info['image_name']}: {int((found < 0).sum())} cells are not in the feature store "
                               f"{self.prepared.root / 'crops' / 'features.npy'}; delete it to rebuild it")
            target["cell_features"] = torch.from_numpy(np.asarray(self.features.array[found], np.float32))
        if self.layout == "multilabel":
            target["labels"] = torch.ones(len(masks), dtype=torch.int64)
            target["label_vectors"] = torch.from_numpy(store.label_vectors(row)).reshape(-1, NUM_CLASSES)
        else:
            target["labels"] = torch.from_numpy(store.category_ids(row))
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            image, target = random_flips(image, target, rng, **self.flips)
        return image, target


def collate(batch):
    """Detection batches are lists: images of one size still travel as a tuple, as torchvision wants."""
    return tuple(zip(*batch))
