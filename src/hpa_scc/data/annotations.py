"""The annotation store: one COCO instances file as flat arrays that loader workers memory-map.

    write_coco("coco/multilabel/fold1.json", coco)       # the JSON and fold1.store beside it
    store = open_store("coco/multilabel/fold1.json")     # memory-mapped; None when absent or stale
    store = AnnotationStore.from_coco(coco)               # the same arrays in memory (older sets)
    store.image(i)                # the COCO image dict of row i (image_name, labels, sizes, ...)
    store.masks(i)                # uint8 [N, H, W]: the cells of image i, decoded from their RLE
    store.label_vectors(i)        # float32 [N, 19] (multilabel files); store.category_ids(i) int64 [N]
    store.to_coco()               # the COCO dict back, equal to the JSON it was made from

Why not the COCO dict itself: a PyTorch ``DataLoader`` forks its workers, and a worker reading a
Python object writes its reference count, which copies the page that holds it. Over a pass a
worker comes to own a private copy of every dict it touched: measured on 253k cells, 51 MB ->
182 MB per worker and growing linearly (docs/SCALE.md). Arrays hold no per-record objects, so the
pages stay shared (detectron2's ``DatasetFromList(serialize=True)`` does the same with pickles).
Memory-mapped from a file they are not even loaded: the main process holds what it reads.

The file (``<stem>.store`` beside ``<stem>.json``):
    8 bytes  b"HPASTOR1"
    8 bytes  little-endian length of the header
    header   JSON: format, source (the JSON's size and mtime_ns: a store is used only with the
             file it was made from), info, categories, annotation keys, arrays {name: [dtype,
             shape, offset]}
    arrays   each at a 64-byte aligned offset
Images keep their annotations contiguous (prepare and refine write them so); per image: id,
first annotation, its dict as compact JSON. Per annotation: id, category_id, cell_id, area,
bbox, iscrowd, touches_border, label_vector, the RLE size and counts (bytes in one buffer).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from pycocotools import mask as coco_mask

from hpa_scc.constants import NUM_CLASSES
from hpa_scc.utils.fileio import atomic_path, write_text_atomic

log = logging.getLogger(__name__)

MAGIC = b"HPASTOR1"
STORE_FORMAT = 1
STORE_SUFFIX = ".store"
ALIGN = 64
# Annotation keys a store holds: the columns below, always present, and the optional ones, held
# when every annotation of the file has them.
REQUIRED_KEYS = ("id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd", "cell_id")
OPTIONAL_KEYS = ("touches_border", "label_vector")


def store_path(json_path: str | os.PathLike) -> Path:
    """coco/<layout>/fold1.json -> coco/<layout>/fold1.store."""
    return Path(json_path).with_suffix(STORE_SUFFIX)


def _source(json_path: Path) -> dict:
    stat = json_path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _blob(strings: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Byte strings -> (uint8 buffer, int64 offsets [n + 1])."""
    offsets = np.zeros(len(strings) + 1, np.int64)
    np.cumsum([len(s) for s in strings], out=offsets[1:])
    return np.frombuffer(b"".join(strings), np.uint8), offsets


def _number_kind(values) -> str:
    """'int' when every value is a Python int (so it comes back as one), else 'float'."""
    return "int" if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values) else "float"


class AnnotationStore:
    """A COCO instances dict held in arrays (memory-mapped from a .store file, or in memory)."""

    def __init__(self, arrays: dict[str, np.ndarray], header: dict, path: Path | None = None):
        self.arrays, self.header, self.path = arrays, header, path
        self.keys = tuple(header["keys"])
        self.image_ids, self.image_first = arrays["image_id"], arrays["image_first"]

    def __len__(self) -> int:
        """The number of images."""
        return len(self.image_ids)

    @property
    def n_annotations(self) -> int:
        return int(self.image_first[-1])

    def n_cells(self) -> np.ndarray:
        """int64 [images]: annotations per image."""
        return np.diff(self.image_first)

    # --- per image --------------------------------------------------------------------------
    def _span(self, i: int) -> slice:
        return slice(int(self.image_first[i]), int(self.image_first[i + 1]))

    def image(self, i: int) -> dict:
        """The COCO image dict of row ``i``."""
        off = self.arrays["image_json_off"]
        return json.loads(self.arrays["image_json"][off[i]:off[i + 1]].tobytes())

    def rles(self, i: int) -> list[dict]:
        """The compressed RLEs (counts as bytes, as pycocotools takes them) of image ``i``'s annotations."""
        span = self._span(i)
        off, counts, sizes = self.arrays["rle_off"], self.arrays["rle_counts"], self.arrays["rle_size"]
        return [{"size": [int(h), int(w)], "counts": counts[off[k]:off[k + 1]].tobytes()}
                for k, (h, w) in zip(range(span.start, span.stop), sizes[span], strict=True)]

    def masks(self, i: int, shape: tuple[int, int] | None = None) -> np.ndarray:
        """uint8 [N, H, W]: the masks of image ``i``'s annotations (N = 0 gives [0, H, W] with ``shape``)."""
        rles = self.rles(i)
        if not rles:
            img = self.image(i) if shape is None else {"height": shape[0], "width": shape[1]}
            return np.zeros((0, img["height"], img["width"]), np.uint8)
        return np.ascontiguousarray(coco_mask.decode(rles).transpose(2, 0, 1))

    def label_image(self, i: int, shape: tuple[int, int] | None = None) -> np.ndarray:
        """int32 [H, W]: ``cell_id`` where its mask is (a per_label file's repeats drawn once)."""
        img = None if shape is not None else self.image(i)
        out = np.zeros(shape or (img["height"], img["width"]), np.int32)
        ids = self.cell_ids(i)
        if len(ids):
            masks = self.masks(i).astype(bool)
            for k in np.unique(ids, return_index=True)[1]:
                out[masks[k]] = ids[k]
        return out

    def category_ids(self, i: int) -> np.ndarray:
        return np.asarray(self.arrays["category_id"][self._span(i)], np.int64)

    def cell_ids(self, i: int) -> np.ndarray:
        return np.asarray(self.arrays["cell_id"][self._span(i)], np.int64)

    def cell_label_vectors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every annotation as (image row int64 [A], cell id int64 [A], float32 [A, 19] labels):
        a multilabel file's vectors, or a per_label file's categories one-hot (rows repeat per label)."""
        rows = np.repeat(np.arange(len(self), dtype=np.int64), self.n_cells())
        cells = np.asarray(self.arrays["cell_id"], np.int64)
        if "label_vector" in self.arrays:
            return rows, cells, np.asarray(self.arrays["label_vector"], np.float32)
        vectors = np.zeros((len(cells), NUM_CLASSES), np.float32)
        vectors[np.arange(len(cells)), np.asarray(self.arrays["category_id"], np.int64) - 1] = 1.0
        return rows, cells, vectors

    def image_names(self) -> list[str]:
        """The ``image_name`` of every image row."""
        return [self.image(i)["image_name"] for i in range(len(self))]

    def label_vectors(self, i: int) -> np.ndarray:
        """float32 [N, 19] of a multilabel file's annotations of image ``i``."""
        if "label_vector" not in self.arrays:
            raise KeyError("this COCO file has no label_vector (a per_label layout): use category_ids")
        return np.array(self.arrays["label_vector"][self._span(i)], np.float32)  # a copy: writable

    # --- whole file ---------------------------------------------------------------------------
    def to_coco(self, rows=None) -> dict:
        """The COCO dict (of the image rows ``rows`` only, in that order, when given)."""
        a, kinds = self.arrays, self.header["kinds"]
        rows = range(len(self)) if rows is None else rows
        images, annotations = [], []
        area = int if kinds.get("area") == "int" else float  # as the JSON had it
        for i in rows:
            img = self.image(i)
            images.append(img)
            span = self._span(i)
            for k, rle in zip(range(span.start, span.stop), self.rles(i), strict=True):
                ann = {"id": int(a["ann_id"][k]), "image_id": int(self.image_ids[i]),
                       "category_id": int(a["category_id"][k]),
                       "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                       "area": area(a["area"][k]), "bbox": [float(v) for v in a["bbox"][k]],
                       "iscrowd": int(a["iscrowd"][k]), "cell_id": int(a["cell_id"][k])}
                if "touches_border" in self.keys:
                    ann["touches_border"] = bool(a["touches_border"][k])
                if "label_vector" in self.keys:
                    ann["label_vector"] = [float(v) for v in a["label_vector"][k]]
                annotations.append(ann)
        out = {"images": images, "annotations": annotations}
        out.update({k: self.header[k] for k in ("info", "categories") if k in self.header})
        return out

    @classmethod
    def from_coco(cls, coco: dict, source: str = "COCO dict") -> AnnotationStore:
        """Arrays from a COCO dict (annotations grouped by image, in image order, as prepare writes)."""
        images, anns = coco["images"], coco["annotations"]
        row_of = {img["id"]: i for i, img in enumerate(images)}
        if len(row_of) != len(images):
            raise ValueError(f"{source}: image ids repeat; the COCO file is damaged")
        keys = set().union(*(a.keys() for a in anns)) if anns else set(REQUIRED_KEYS)
        unknown = keys - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS)
        missing = [k for k in REQUIRED_KEYS if any(k not in a for a in anns)]
        if unknown or missing:
            raise ValueError(f"{source}: annotations with keys {sorted(unknown)} unknown or {missing} missing; the "
                             f"store holds {list(REQUIRED_KEYS + OPTIONAL_KEYS)} (was it written by prepare or "
                             f"refine?)")
        optional = [k for k in OPTIONAL_KEYS if anns and all(k in a for a in anns)]
        partial = [k for k in OPTIONAL_KEYS if k in keys and k not in optional]
        if partial:
            raise ValueError(f"{source}: some annotations have {partial} and some do not; rewrite the file")
        try:
            ann_rows = np.fromiter((row_of[a["image_id"]] for a in anns), np.int64, len(anns))
        except KeyError as exc:
            raise ValueError(f"{source}: an annotation names image id {exc}, which the file does not list") from None
        order = np.argsort(ann_rows, kind="stable")  # a no-op for files prepare and refine wrote
        anns = [anns[k] for k in order]
        ann_rows = ann_rows[order]
        first = np.zeros(len(images) + 1, np.int64)
        np.cumsum(np.bincount(ann_rows, minlength=len(images)), out=first[1:])
        for a in anns:
            seg = a["segmentation"]
            if not (isinstance(seg, dict) and isinstance(seg.get("counts"), str)):
                raise ValueError(f"{source}: annotation {a['id']} is not a compressed RLE; the store holds those only")
        arrays = {"image_id": np.array([img["id"] for img in images], np.int64), "image_first": first}
        arrays["image_json"], arrays["image_json_off"] = _blob(
            [json.dumps(img, separators=(",", ":")).encode() for img in images])
        arrays["ann_id"] = np.array([a["id"] for a in anns], np.int64)
        arrays["category_id"] = np.array([a["category_id"] for a in anns], np.int32)
        arrays["cell_id"] = np.array([a["cell_id"] for a in anns], np.int64)
        arrays["area"] = np.array([a["area"] for a in anns], np.float64)
        arrays["bbox"] = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
        arrays["iscrowd"] = np.array([a["iscrowd"] for a in anns], np.int8)
        arrays["rle_size"] = np.array([a["segmentation"]["size"] for a in anns], np.int32).reshape(-1, 2)
        arrays["rle_counts"], arrays["rle_off"] = _blob([a["segmentation"]["counts"].encode("ascii") for a in anns])
        if "touches_border" in optional:
            arrays["touches_border"] = np.array([a["touches_border"] for a in anns], np.int8)
        if "label_vector" in optional:
            vectors = np.array([a["label_vector"] for a in anns], np.float64).reshape(-1, NUM_CLASSES)
            # float32 when that is exact (hard labels, the usual case): half the bytes
            arrays["label_vector"] = vectors.astype(np.float32) if np.array_equal(
                vectors.astype(np.float32), vectors) else vectors
        header = {"format": STORE_FORMAT, "keys": list(REQUIRED_KEYS) + optional,
                  "kinds": {"area": _number_kind(a["area"] for a in anns)}}
        header.update({k: coco[k] for k in ("info", "categories") if k in coco})
        return cls(arrays, header)

    # --- file -------------------------------------------------------------------------------
    def write(self, path: str | os.PathLike, source: dict | None = None) -> None:
        """Write the store file atomically (``source``: the size/mtime of the JSON it stands for)."""
        layout, offset = {}, 0
        for name, arr in self.arrays.items():
            offset = -(-offset // ALIGN) * ALIGN
            layout[name] = [arr.dtype.str, list(arr.shape), offset]
            offset += arr.nbytes
        header = {**self.header, "source": source, "arrays": layout}
        text = json.dumps(header, separators=(",", ":")).encode()
        start = -(-(16 + len(text)) // ALIGN) * ALIGN
        with atomic_path(path, STORE_SUFFIX) as tmp, open(tmp, "wb") as fh:
            fh.write(MAGIC + len(text).to_bytes(8, "little") + text)
            for name, arr in self.arrays.items():
                fh.seek(start + layout[name][2])
                fh.write(np.ascontiguousarray(arr).tobytes())
            fh.truncate(start + offset)

    @classmethod
    def open(cls, path: str | os.PathLike) -> AnnotationStore:
        """Memory-map a .store file; a damaged one raises ValueError naming it."""
        path = Path(path)
        with open(path, "rb") as fh:
            head = fh.read(16)
            if len(head) < 16 or head[:8] != MAGIC:
                raise ValueError(f"{path} is not an annotation store (bad magic)")
            length = int.from_bytes(head[8:], "little")
            try:
                header = json.loads(fh.read(length))
            except ValueError as exc:
                raise ValueError(f"{path}: damaged header ({exc})") from None
        if header.get("format") != STORE_FORMAT:
            raise ValueError(f"{path}: store format {header.get('format')} (this version reads {STORE_FORMAT})")
        start = -(-(16 + length) // ALIGN) * ALIGN
        size = path.stat().st_size
        arrays = {}
        for name, (dtype, shape, offset) in header["arrays"].items():
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            if start + offset + nbytes > size:
                raise ValueError(f"{path} is truncated ({size} bytes; array {name} ends at {start + offset + nbytes})")
            arrays[name] = (np.memmap(path, dtype=dtype, mode="r", offset=start + offset, shape=tuple(shape))
                            if nbytes else np.zeros(shape, dtype))
        return cls(arrays, header, path)


def cells_fingerprint(images: Iterable[tuple[AnnotationStore, int]]) -> str:
    """16 hex digits that change when any (store, image row)'s name, cell ids or masks do: what
    work made from a prepared set's cells (the cell store, refine's scores) records and checks."""
    h = hashlib.sha256()
    for store, row in images:
        h.update(store.image(row)["image_name"].encode())
        h.update(store.cell_ids(row).tobytes())
        span = store._span(row)
        off = store.arrays["rle_off"]
        h.update(store.arrays["rle_counts"][off[span.start]:off[span.stop]].tobytes())
    return h.hexdigest()[:16]


def write_coco(json_path: str | os.PathLike, coco: dict) -> None:
    """Write a COCO file and its annotation store beside it, both atomically (JSON first: a store
    names the JSON's size and mtime, so a crash between the two leaves a store that is not used)."""
    json_path = Path(json_path)
    store = AnnotationStore.from_coco(coco, str(json_path))
    write_text_atomic(json_path, json.dumps(coco, separators=(",", ":")))
    store.write(store_path(json_path), _source(json_path))


def open_store(json_path: str | os.PathLike) -> AnnotationStore | None:
    """The store of a COCO file, memory-mapped, or None when there is none or it was made from
    another version of the JSON (a refine round or an older prepare rewrote it): the caller reads
    the JSON instead."""
    json_path = Path(json_path)
    path = store_path(json_path)
    if not path.is_file():
        return None
    try:
        store = AnnotationStore.open(path)
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable (%s): reading %s instead", path, exc, json_path)
        return None
    if store.header.get("source") != _source(json_path):
        log.warning("%s was made from another version of %s: reading the JSON instead", path, json_path)
        return None
    return store


def load_store(json_path: str | os.PathLike, fix: str) -> AnnotationStore:
    """The memory-mapped store of a COCO file, or the JSON read into arrays in memory (slower and
    held by the process, but still shared with its workers), with a warning that names ``fix``."""
    json_path = Path(json_path)
    store = open_store(json_path)
    if store is not None:
        return store
    log.warning("%s has no annotation store beside it (%s): reading the JSON into memory, which at 100k images "
                "takes minutes and GBs; %s", json_path, store_path(json_path).name, fix)
    try:
        coco = json.loads(json_path.read_text())
    except ValueError as exc:
        raise ValueError(f"{json_path} is not valid JSON ({exc}); {fix}") from None
    return AnnotationStore.from_coco(coco, str(json_path))
