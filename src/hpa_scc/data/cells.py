"""The cells of a prepared set as arrays the cell-level families train on: masked crops
(``cell_crops``) or per-cell features (``data.features``), one row per cell, cut once from the
cache and saved (``PREPARED/crops/<crop_size>px.npy`` or ``features.npy``, with an index of
(image, cell id, fold) and the cells' fingerprint: rebuilt when the prepared set's cells change;
built as a job array with ``cell-store --shard``), and the dataset and batching over them.
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
from scipy import ndimage
from torch.utils.data import Dataset
from tqdm import tqdm

from hpa_scc.constants import NUM_CLASSES
from hpa_scc.data.annotations import AnnotationStore, cells_fingerprint
from hpa_scc.data.prepared import PreparedSet
from hpa_scc.utils.fileio import atomic_path, write_npy_atomic, write_text_atomic

log = logging.getLogger(__name__)


CROP_FORMAT = 2  # bump when cell_crops changes what it cuts (2: the cells index as an array)


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

    def cap(self, rows: np.ndarray, n: int | None, whole_images: bool = False) -> np.ndarray:
        """The first ``n`` of ``rows`` (None: all): cells, or with ``whole_images`` every cell of
        the first ``n`` images among them (MIL's samples are images: a cap must not cut a bag,
        whose label says that at least one of its cells shows the class)."""
        if n is None:
            return rows
        if not whole_images:
            return rows[:n]
        images = np.asarray(self.cells["image"][rows])
        _, first = np.unique(images, return_index=True)
        return rows[np.isin(images, images[np.sort(first)][:n])]

    def key(self, row: int) -> tuple[str, int]:
        """(image name, cell id) of a row."""
        return self.names[int(self.cells["image"][row])], int(self.cells["cell_id"][row])

    @cached_property
    def _sorted_keys(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted int64 keys ``image << 32 | cell id``, the rows in that order): ``find``'s index."""
        keys = (np.asarray(self.cells["image"], np.int64) << 32) | np.asarray(self.cells["cell_id"], np.int64)
        order = np.argsort(keys, kind="stable")
        return keys[order], order

    @cached_property
    def _image_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    def index(self) -> None:
        """Builds ``find``'s arrays now (in the parent process, so forked loader workers share them)."""
        _ = self._sorted_keys, self._image_index

    def find(self, name: str, cell_ids: np.ndarray) -> np.ndarray:
        """int64 rows of image ``name``'s cells ``cell_ids`` (-1 for a cell the store lacks):
        a binary search in sorted int64 keys, no dict per cell (2M cells: 32 MB of keys)."""
        keys, order = self._sorted_keys
        image = self._image_index.get(name, -1)
        wanted = (np.int64(image) << 32) | np.asarray(cell_ids, np.int64)
        if image < 0 or not len(keys):
            return np.full(len(wanted), -1, np.int64)
        at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
        return np.where(keys[at] == wanted, order[at], -1).astype(np.int64)

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
        from hpa_scc.data.features import FEATURE_NAMES, cell_features
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
        raise ValueError(f"{prepared} has no cells; check {PreparedSet(prepared).failures_path()} and its segmentation")
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


class CellBagDataset(Dataset):
    """The cells of a CellStore grouped by image, for multiple-instance learning: sample i ->
    (crops or features of image i's cells [K, ...], {"label_vector": the image's labels [19],
    the union of its cells' labels; "cells": K}). A cell is read (and augmented) as in
    ``CellDataset``; ``images_per_gpu`` counts images per step."""

    def __init__(self, store: CellStore, rows, labels: np.ndarray | None, *,
                 augment: bool = False, in_channels: int = 4, seed: int = 0):
        rows = np.asarray(rows, np.int64)
        rows = rows[np.argsort(store.cells["image"][rows], kind="stable")]  # each image's cells together
        images = np.asarray(store.cells["image"][rows])
        starts = np.flatnonzero(np.r_[True, images[1:] != images[:-1]]) if len(rows) else np.zeros(0, np.int64)
        self.offsets = np.r_[starts, len(rows)].astype(np.int64)
        self.cells = CellDataset(store, rows, labels, augment=augment, in_channels=in_channels, seed=seed)

    def set_epoch(self, epoch: int) -> None:
        self.cells.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int):
        first, end = int(self.offsets[i]), int(self.offsets[i + 1])
        values = torch.stack([self.cells[j][0] for j in range(first, end)])
        label = torch.from_numpy((self.cells.labels[first:end] > 0.5).any(0).astype(np.float32))
        return values, {"label_vector": label, "cells": end - first}


def collate_bags(batch):
    """Bag batches: every image's cells in one tensor (image after image) and one target per image."""
    values, targets = zip(*batch)
    return torch.cat(values), list(targets)


def collate_cells(batch):
    """Cell batches: one stacked tensor (crops or features) and the targets as a list."""
    values, targets = zip(*batch)
    return torch.stack(values), list(targets)
