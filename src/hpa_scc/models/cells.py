"""Cell-level models: classifiers of single cells, trained on the cells' (weak) labels.

    python -m hpa_scc train configs/cell_resnet18.yaml data.prepared_dir=runs/demo/prepared
    python -m hpa_scc train configs/cell_features.yaml data.prepared_dir=runs/demo/prepared   # no deep learning
    python -m hpa_scc predict RUN_DIR DATA_DIR --out OUT                                      # the same predict

What the strongest Kaggle HPA 2021 teams did: cut every cell out of the image (the segmenter's
mask, other cells zeroed), resize it to a fixed crop and train an image classifier on it with the
image's labels as the cell's labels (multi-label BCE). A cell-level model sees one cell at full
detail, where a detector's stride-32 features mix it with its neighbours, so it learns which of
its image's labels a cell shows from many images' worth of weak labels.

Two families (``model.family``):
* ``cell``: a torchvision classifier (``model.backbone`` in CELL_BACKBONES: resnet18/34/50,
  densenet121, efficientnet_b0) on masked 4-channel crops of ``data.crop_size`` px;
* ``features``: the non-deep baseline: per-cell intensity/texture features
  (``hpa_scc.models.features``) and one logistic regression per class, fitted in seconds, saved as a
  torch module so checkpoints, ``predict`` and ``refine`` treat it like the others.

The crops of a prepared set are cut once from its cache and saved as one uint8 array
(``PREPARED/crops/<crop_size>px.npy`` + ``.json`` index; features likewise as
``features.npy``), so an epoch is a read of memory-mapped crops. Both are rebuilt when the
prepared set's cells change (the index records them).
"""

from __future__ import annotations

import json
import logging
import os
from functools import cached_property
from pathlib import Path

import cv2
import numpy as np
import torch
import torchvision
from scipy import ndimage
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from hpa_scc.constants import NUM_CLASSES
from hpa_scc.data.annotations import AnnotationStore, cells_fingerprint
from hpa_scc.data.prepared import PreparedSet
from hpa_scc.utils.fileio import atomic_path, write_npy_atomic, write_text_atomic

log = logging.getLogger(__name__)

FAMILIES = ("maskrcnn", "cell", "features")
CROP_FORMAT = 2  # bump when cell_crops changes what it cuts (2: the cells index as an array)


# ----------------------------------------------------------------------------------------------
# Crops

def cell_crops(image: np.ndarray, cells: np.ndarray, cell_ids, crop_size: int, context: float = 0.1) -> np.ndarray:
    """Masked square crops of cells: uint8 [K, C, crop_size, crop_size].

    ``image`` uint8 [C, H, W]; ``cells`` int label image [H, W] (0 background); one crop per id
    of ``cell_ids``, in order. Each crop is the cell's bounding square (side = the longer bbox
    side x (1 + 2 x context), centred, zero outside the image) with every pixel outside the cell
    set to 0, resized to ``crop_size``. An id absent from ``cells`` gives an all-zero crop.
    """
    ids = [int(i) for i in cell_ids]
    channels = image.shape[0]
    out = np.zeros((len(ids), channels, crop_size, crop_size), np.uint8)
    if not ids:
        return out
    labels = np.ascontiguousarray(cells).astype(np.int32, copy=False)
    slices = ndimage.find_objects(labels, max_label=max(ids))
    height, width = labels.shape
    hwc = np.ascontiguousarray(image.transpose(1, 2, 0))
    for k, cell_id in enumerate(ids):
        box = slices[cell_id - 1] if 0 < cell_id <= len(slices) else None
        if box is None:
            continue
        y0, y1, x0, x1 = box[0].start, box[0].stop, box[1].start, box[1].stop
        side = max(int(round(max(y1 - y0, x1 - x0) * (1 + 2 * context))), 4)
        cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
        top, left = cy - side // 2, cx - side // 2
        # the part of the square inside the image, and where it lands in the square
        sy0, sx0 = max(top, 0), max(left, 0)
        sy1, sx1 = min(top + side, height), min(left + side, width)
        square = np.zeros((side, side, channels), np.uint8)
        window = hwc[sy0:sy1, sx0:sx1] * (labels[sy0:sy1, sx0:sx1] == cell_id)[..., None]
        square[sy0 - top:sy1 - top, sx0 - left:sx1 - left] = window
        interp = cv2.INTER_AREA if side > crop_size else cv2.INTER_LINEAR
        resized = cv2.resize(square, (crop_size, crop_size), interpolation=interp)
        out[k] = resized.reshape(crop_size, crop_size, channels).transpose(2, 0, 1)
    return out


def cell_images(prepared: str | os.PathLike) -> list[tuple[int, AnnotationStore, int]]:
    """(fold, its annotation store, image row) of every image with cells, fold order: the order of
    a cell store's rows. The stores of the first layout the set has (the cells are the same in each)."""
    return [(fold, store, int(row)) for fold, store in PreparedSet(prepared).fold_stores()
            for row in np.flatnonzero(store.n_cells() > 0)]


CELL_DTYPE = np.dtype([("image", "<i4"), ("cell_id", "<i4"), ("fold", "<i2")])


class CellStore:
    """Per-cell arrays of a prepared set, built once: ``array`` (crops uint8 [N, C, c, c] or
    features float32 [N, F], memory-mapped) and ``cells`` (structured [N]: image index into
    ``names``, cell id, fold). Arrays only: loader workers read them without copying pages."""

    def __init__(self, array: np.ndarray, names: list[str], cells: np.ndarray):
        self.array, self.names, self.cells = array, names, cells

    def __len__(self) -> int:
        return len(self.cells)

    def select(self, folds: list[int]) -> np.ndarray:
        """int64 rows of the cells of ``folds``."""
        return np.flatnonzero(np.isin(self.cells["fold"], folds))

    def key(self, row: int) -> tuple[str, int]:
        """(image name, cell id) of a row."""
        return self.names[int(self.cells["image"][row])], int(self.cells["cell_id"][row])

    @cached_property
    def rows(self) -> dict[tuple[str, int], int]:
        """{(image name, cell id): row}, built on first use (a dict per cell: for small sets and tests)."""
        return {self.key(i): i for i in range(len(self))}

    def labels(self, prepared: PreparedSet, labels: str, rows: np.ndarray | None = None,
               strict: bool = True) -> np.ndarray:
        """float32 [len(rows), 19]: the cells' labels from ``labels`` (image, truth or a round's
        name); a cell missing from that folder is an error naming it (``strict=False``: zeros)."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, np.int64)
        vectors, found = prepared.label_matrix(self.names, self.cells["image"][rows], self.cells["cell_id"][rows],
                                               labels)
        if strict and not found.all():
            missing = [self.key(r) for r in rows[~found][:3]]
            raise KeyError(f"{int((~found).sum())} cells have no labels in data.labels={labels!r}, e.g. {missing}; "
                           "was the labels folder written for this prepared set?")
        return vectors


def _store_files(folder: Path, name: str) -> tuple[Path, Path, Path]:
    """(array .npy, cells .npy, index .json) of a stored array; the index is written last."""
    return folder / f"{name}.npy", folder / f"{name}.cells.npy", folder / f"{name}.json"


def _open_saved(folder: Path, name: str, settings: dict) -> CellStore | None:
    array_path, cells_path, index_path = _store_files(folder, name)
    if not (index_path.is_file() and array_path.is_file() and cells_path.is_file()):
        return None
    try:
        saved = json.loads(index_path.read_text())
        if saved.get("settings") != settings:
            log.info("%s was built from other cells or settings: rebuilding it", array_path)
            return None
        array, cells = np.load(array_path, mmap_mode="r"), np.load(cells_path)
        if len(array) == len(cells):
            return CellStore(array, saved["names"], cells)
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable (%s): rebuilding it", array_path, exc)
    return None


def build_store(prepared: str | os.PathLike, kind: str, crop_size: int = 64, progress: bool = True,
                shard: tuple[int, int] | None = None, merge_only: bool = False) -> CellStore:
    """Crops (``kind="crops"``) or features (``"features"``) of every cell of a prepared set.

    Saved as PREPARED/crops/<crop_size>px.npy or PREPARED/crops/features.npy with <name>.cells.npy
    (which cell each row is) and <name>.json (settings, image names); reused while the prepared
    set's cells are unchanged, rebuilt (and logged) otherwise.

    ``shard=(I, N)``: the cells of shard I's images only, into <name>-shard<I>of<N>.* (a job
    array task; a finished shard is reused). When every shard of one N is there with these
    settings, a call without ``shard`` merges them into the store (in the unsharded row order:
    the same file one process writes) instead of computing anything; ``merge_only`` insists.
    """
    from hpa_scc.data.shard import check_shard, shard_of, shard_suffix

    prepared = Path(prepared)
    source = PreparedSet(prepared)
    check_shard(shard)
    if kind == "features":
        from hpa_scc.models.features import FEATURE_NAMES, cell_features
    images = cell_images(source)
    name = f"{crop_size}px" if kind == "crops" else "features"
    settings = {"format": CROP_FORMAT, "kind": kind, "crop_size": crop_size if kind == "crops" else None,
                "cells": cells_fingerprint((store, row) for _, store, row in images),
                "features": list(FEATURE_NAMES) if kind == "features" else None}
    folder = prepared / "crops"
    names = [store.image(row)["image_name"] for _, store, row in images]
    if shard is None:
        saved = _open_saved(folder, name, settings)
        if saved is not None:
            return saved
        merged = _merge_shards(folder, name, settings, names)
        if merged is not None:
            return merged
        if merge_only:
            raise FileNotFoundError(f"cannot merge {folder / name}: no complete set of shards built with these "
                                    f"settings; run every shard (--shard I/N) first")
    else:
        saved = _open_saved(folder, name + shard_suffix(shard), {**settings, "shard": list(shard)})
        if saved is not None:
            log.info("shard %d/%d of %s already built", *shard, folder / name)
            return saved
    todo = [k for k in range(len(images)) if shard is None or shard_of(names[k], shard[1]) == shard[0]]
    n = sum(len(np.unique(images[k][1].cell_ids(images[k][2]))) for k in todo)
    if n == 0 and shard is None:
        raise ValueError(f"{prepared} has no cells; check its failures.csv and segmentation")
    folder.mkdir(parents=True, exist_ok=True)
    out_name = name + shard_suffix(shard)
    array_path, cells_path, index_path = _store_files(folder, out_name)
    cells = np.zeros(n, CELL_DTYPE)
    with atomic_path(array_path, ".npy") as tmp:
        out, row = None, 0
        for k in tqdm(todo, desc=f"cell {kind}", disable=not progress, unit="image"):
            fold, store, image_row = images[k]
            pixels = np.array(source.read_image(names[k]))
            label = store.label_image(image_row, pixels.shape[1:])
            ids = np.unique(store.cell_ids(image_row)).tolist()
            values = (cell_crops(pixels, label, ids, crop_size) if kind == "crops"
                      else cell_features(pixels, label, ids))
            if out is None:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=values.dtype, shape=(n, *values.shape[1:]))
            out[row:row + len(ids)] = values
            cells[row:row + len(ids)] = [(k, i, fold) for i in ids]
            row += len(ids)
        if out is None:  # a shard without cells: an empty array of the right shape
            width = (len(FEATURE_NAMES),) if kind == "features" else (4, crop_size, crop_size)
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32 if kind == "features" else np.uint8,
                                            shape=(0, *width))
        out.flush()
        del out
    write_npy_atomic(cells_path, cells)
    record = settings if shard is None else {**settings, "shard": list(shard)}
    write_text_atomic(index_path, json.dumps({"settings": record, "names": names}))
    log.info("cell %s of %d cells in %d images -> %s", kind, n, len(todo), array_path)
    return CellStore(np.load(array_path, mmap_mode="r"), names, cells)


def _merge_shards(folder: Path, name: str, settings: dict, names: list[str]) -> CellStore | None:
    """The store from a complete set of shards (one N, all I, these settings), or None."""
    from hpa_scc.data.shard import complete_shard_counts

    for count in complete_shard_counts(folder, name, ".json"):
        parts = [_open_saved(folder, f"{name}-shard{i}of{count}", {**settings, "shard": [i, count]})
                 for i in range(count)]
        if any(p is None for p in parts):
            continue
        cells = np.concatenate([p.cells for p in parts])
        order = np.lexsort((np.arange(len(cells)), cells["image"]))  # image order, cells in order within
        array_path, cells_path, index_path = _store_files(folder, name)
        sources = np.concatenate([np.full(len(p), i) for i, p in enumerate(parts)]).astype(np.int64)
        local = np.concatenate([np.arange(len(p)) for p in parts]).astype(np.int64)
        first = parts[0].array  # an empty part still has the right dtype and row shape
        with atomic_path(array_path, ".npy") as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=first.dtype, shape=(len(cells), *first.shape[1:]))
            for start in range(0, len(order), 65536):  # in chunks: never every crop in memory
                chunk = order[start:start + 65536]
                for i, part in enumerate(parts):
                    sel = sources[chunk] == i
                    if sel.any():
                        out[start + np.flatnonzero(sel)] = part.array[local[chunk][sel]]
            out.flush()
            del out
        write_npy_atomic(cells_path, cells[order])
        write_text_atomic(index_path, json.dumps({"settings": settings, "names": names}))
        log.info("merged %d shards of %s: %d cells", count, array_path, len(cells))
        return CellStore(np.load(array_path, mmap_mode="r"), names, cells[order])
    return None


# ----------------------------------------------------------------------------------------------
# Datasets

def random_dihedral(crop: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """One of the 8 flips/rotations of a [C, h, w] crop: a cell has no up or left."""
    if rng.random() < 0.5:
        crop = crop.flip(-1)
    k = int(rng.integers(4))
    return torch.rot90(crop, k, (-2, -1)) if k else crop


class CellDataset(Dataset):
    """Rows of a CellStore with their label vectors: sample i -> (tensor, {"label_vector": [19], "row": int}).

    Crops come as uint8 [C, c, c] (``engine.to_device`` scales them on the device), features
    as float32 [F]. ``in_channels`` keeps the first channels of a crop (3 = RGB).
    """

    def __init__(self, store: CellStore, rows, labels: np.ndarray | None, *,
                 augment: bool = False, in_channels: int = 4, seed: int = 0):
        # rows as an array: a forked loader worker reading a Python list would copy its pages
        self.store, self.augment, self.in_channels, self.seed = store, augment, in_channels, seed
        self.rows = np.asarray(rows, np.int64)
        self.epoch = 0
        # labels: float32 [len(store), 19] (CellStore.labels), one row per store row; None: zeros
        self.labels = (np.zeros((len(self.rows), NUM_CLASSES), np.float32) if labels is None
                       else np.ascontiguousarray(labels[self.rows], np.float32))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: int):
        value = torch.from_numpy(np.array(self.store.array[self.rows[j]]))
        if value.dim() == 3:
            value = value[: self.in_channels]
            if self.augment:
                value = random_dihedral(value, np.random.default_rng([self.seed, self.epoch, j])).contiguous()
        return value, {"label_vector": torch.from_numpy(self.labels[j]), "row": int(self.rows[j])}


def collate_cells(batch):
    """Cell batches: one stacked tensor (crops or features) and the targets as a list."""
    values, targets = zip(*batch)
    return torch.stack(values), list(targets)


# ----------------------------------------------------------------------------------------------
# Models

def _resnet(arch: str):
    def build(in_channels: int, num_classes: int) -> nn.Module:
        net = getattr(torchvision.models, arch)(weights=None)
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        net.fc = nn.Linear(net.fc.in_features, num_classes)
        return net
    return build


def _densenet121(in_channels: int, num_classes: int) -> nn.Module:
    net = torchvision.models.densenet121(weights=None)
    net.features.conv0 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    net.classifier = nn.Linear(net.classifier.in_features, num_classes)
    return net


def _efficientnet_b0(in_channels: int, num_classes: int) -> nn.Module:
    net = torchvision.models.efficientnet_b0(weights=None)
    old = net.features[0][0]
    net.features[0][0] = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
    net.classifier[-1] = nn.Linear(net.classifier[-1].in_features, num_classes)
    return net


CELL_BACKBONES = {"resnet18": _resnet("resnet18"), "resnet34": _resnet("resnet34"), "resnet50": _resnet("resnet50"),
                  "densenet121": _densenet121, "efficientnet_b0": _efficientnet_b0}
# torchvision's ImageNet file and the names of its stem and classifier in that file
CELL_IMAGENET = {"resnet18": ("ResNet18_Weights", "conv1.weight", "fc."),
                 "resnet34": ("ResNet34_Weights", "conv1.weight", "fc."),
                 "resnet50": ("ResNet50_Weights", "conv1.weight", "fc."),
                 "densenet121": ("DenseNet121_Weights", "features.conv0.weight", "classifier."),
                 "efficientnet_b0": ("EfficientNet_B0_Weights", "features.0.0.weight", "classifier.")}


class _MultiLabelModel(nn.Module):
    """The detectors' calling convention for a model with ``logits(x) -> [B, 19]``: with targets
    the multi-label BCE against their ``label_vector``s ({"loss_bce"}), else sigmoid scores."""

    def forward(self, inputs, targets: list[dict] | None = None):
        logits = self.logits(inputs)
        if targets is None:
            return logits.sigmoid()
        target = torch.stack([t["label_vector"] for t in targets]).to(logits.dtype)
        return {"loss_bce": F.binary_cross_entropy_with_logits(logits, target)}


class CellClassifier(_MultiLabelModel):
    """A classifier of cell crops with the detectors' calling convention.

    ``forward(images, targets=None)``: images uint8/float [B, C, c, c] (or a list of [C, c, c]),
    float in [0, 1] after ``engine.to_device``; normalised here by per-channel buffers. Training
    (targets given): {"loss_bce": multi-label BCE against the targets' ``label_vector``s}.
    Inference: sigmoid scores float [B, 19].
    """

    def __init__(self, backbone: str, in_channels: int = 4, num_classes: int = NUM_CLASSES,
                 mean: list[float] | None = None, std: list[float] | None = None):
        super().__init__()
        if backbone not in CELL_BACKBONES:
            raise ValueError(f"unknown cell backbone {backbone!r}; choose one of {sorted(CELL_BACKBONES)}")
        from hpa_scc.models.detector import default_pixel_stats

        d_mean, d_std = default_pixel_stats(in_channels)
        self.net = CELL_BACKBONES[backbone](in_channels, num_classes)
        self.register_buffer("pixel_mean", torch.tensor(mean or d_mean, dtype=torch.float32))
        self.register_buffer("pixel_std", torch.tensor(std or d_std, dtype=torch.float32))

    def logits(self, images) -> torch.Tensor:
        x = torch.stack(list(images)) if isinstance(images, (list, tuple)) else images
        if not x.is_floating_point():
            x = x.float().div_(255.0)
        x = (x - self.pixel_mean[:, None, None]) / self.pixel_std[:, None, None]
        return self.net(x)



class FeatureClassifier(_MultiLabelModel):
    """The features baseline as a module: standardise, then one logistic regression per class.

    ``forward(features float [B, F], targets=None)`` -> probabilities [B, 19] (or the BCE loss
    dict with targets). Fitted by ``fit_feature_classifier`` (scikit-learn), never by SGD.
    """

    def __init__(self, n_features: int, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("scale", torch.ones(n_features))
        self.linear = nn.Linear(n_features, num_classes)

    def logits(self, features) -> torch.Tensor:
        x = torch.stack(list(features)) if isinstance(features, (list, tuple)) else features
        return self.linear((x.float() - self.mean) / self.scale)



def fit_feature_classifier(model: FeatureClassifier, features: np.ndarray, labels: np.ndarray, c: float = 1.0,
                           seed: int = 0) -> FeatureClassifier:
    """Fit ``model`` in place: standardisation + an L2 logistic regression per class (soft labels
    above 0.5 count as positive). A class with no positive (or no negative) cell gets a constant."""
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(features, np.float64)
    mean, scale = x.mean(0), x.std(0)
    scale[scale < 1e-8] = 1.0
    z = (x - mean) / scale
    y = np.asarray(labels) > 0.5
    weight = np.zeros((y.shape[1], x.shape[1]))
    bias = np.zeros(y.shape[1])
    for c_idx in range(y.shape[1]):
        pos = y[:, c_idx].mean()
        if pos in (0.0, 1.0):
            bias[c_idx] = -9.0 if pos == 0 else 9.0
            continue
        clf = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(z, y[:, c_idx])
        weight[c_idx], bias[c_idx] = clf.coef_[0], clf.intercept_[0]
    with torch.no_grad():
        model.mean.copy_(torch.from_numpy(mean).float())
        model.scale.copy_(torch.from_numpy(scale).float())
        model.linear.weight.copy_(torch.from_numpy(weight).float())
        model.linear.bias.copy_(torch.from_numpy(bias).float())
    return model


def load_cell_imagenet(model: CellClassifier, backbone: str, in_channels: int, path: str | None = None) -> None:
    """torchvision's ImageNet weights for a cell backbone, from ``path`` or the torch hub cache (never
    downloaded); a 4-channel stem takes yellow from red (``models.adapt_stem``); classifier dropped."""
    from hpa_scc.models.detector import adapt_stem

    enum, stem, head = CELL_IMAGENET[backbone]
    if path is None:
        weights = getattr(torchvision.models, enum).IMAGENET1K_V1
        file = Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]
        if not file.is_file():
            raise FileNotFoundError(f"model.weights=imagenet needs {file}; this code never downloads. Copy torchvision's "
                                    f"{enum}.IMAGENET1K_V1 file there (set TORCH_HOME to move the folder), or set "
                                    "model.weights to its path, or null for random init")
        path = str(file)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith(head)}
    if backbone == "densenet121":
        from hpa_scc.models.detector import densenet_imagenet_keys

        state = {"features." + k[len("backbone.body."):]: v for k, v in densenet_imagenet_keys(state).items()}
    state[stem] = adapt_stem(state[stem], in_channels)
    missing, unexpected = model.net.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith(head)]:
        raise ValueError(f"{path}: not {backbone} ImageNet weights (missing {missing[:3]}, unexpected {unexpected[:3]})")
    log.info("ImageNet weights for the cell backbone from %s", path)


def build_family_model(cfg) -> nn.Module:
    """The model of a Config of any family: Mask R-CNN (hpa_scc.models.detector) or a cell-level model."""
    if cfg.model.family == "maskrcnn":
        from hpa_scc.models.detector import build_model

        if cfg.data.image_size is None:
            raise ValueError("data.image_size is unset: train takes it from the prepared set (prepare.json); "
                             "set it to build a Mask R-CNN outside training")
        return build_model(cfg.model, image_size=cfg.data.image_size)
    return build_cell_model(cfg.model)


def build_cell_model(cfg, n_features: int | None = None) -> nn.Module:
    """The model of ``cfg`` (a ModelConfig) for the ``cell`` or ``features`` family."""
    if cfg.family == "features":
        from hpa_scc.models.features import FEATURE_NAMES

        return FeatureClassifier(n_features or len(FEATURE_NAMES))
    model = CellClassifier(cfg.backbone, cfg.in_channels, mean=cfg.pixel_mean, std=cfg.pixel_std)
    if cfg.weights == "imagenet" or (cfg.weights and Path(cfg.weights).suffix == ".pth"):
        load_cell_imagenet(model, cfg.backbone, cfg.in_channels, None if cfg.weights == "imagenet" else cfg.weights)
    elif cfg.weights:
        from hpa_scc.utils.checkpoint import load_checkpoint, load_model_state

        load_model_state(model, load_checkpoint(cfg.weights), cfg.weights, cfg.family, cfg.backbone,
                         f"model.weights must be a checkpoint of a cell run with model.backbone={cfg.backbone}")
        log.info("cell model weights from %s", cfg.weights)
    return model


# ----------------------------------------------------------------------------------------------
# Scoring and validation

@torch.no_grad()
def score_store_rows(model: nn.Module, dataset: CellDataset, device: torch.device, batch_size: int = 256) -> np.ndarray:
    """float32 [len(dataset), 19]: the model's scores for every row of ``dataset`` (no augmentation)."""
    model.eval()
    out = []
    for start in range(0, len(dataset), batch_size):
        values = torch.stack([dataset[j][0] for j in range(start, min(start + batch_size, len(dataset)))])
        out.append(model(values.to(device)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, NUM_CLASSES), np.float32)


def cell_scores(model: nn.Module, family: str, image: np.ndarray, cells: np.ndarray, cell_ids, *,
                crop_size: int, in_channels: int, device: torch.device, tta: bool = False) -> np.ndarray:
    """float32 [K, 19]: a cell-level model's scores for the cells of one image (at the model's size).

    ``tta``: crops are also scored flipped and rotated by 90 degrees (4 views), scores averaged.
    """
    from hpa_scc.models.features import cell_features

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


def macro_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes (with positive and negative cells) of the average precision of cell scores."""
    from sklearn.metrics import average_precision_score

    y = labels > 0.5
    aps = [average_precision_score(y[:, c], scores[:, c]) for c in range(y.shape[1]) if 0 < y[:, c].sum() < len(y)]
    return float(np.mean(aps)) if aps else 0.0


def evaluate_cells(model: nn.Module, dataset: CellDataset, device: torch.device,
                   truth: np.ndarray | None = None) -> dict[str, float]:
    """Validation of a cell-level model: macro AP of its cell scores against the cells' training
    labels (``cell_AP``), and against the true labels where a synthetic set has them (``truth``:
    float32 [len(store), 19], ``CellStore.labels(..., "truth")``)."""
    scores = score_store_rows(model, dataset, device)
    out = {"cell_AP": macro_ap(scores, dataset.labels), "cells": len(dataset)}
    if truth is not None:
        out["cell_AP_truth"] = macro_ap(scores, truth[dataset.rows])
    return out
