"""The prepared set: the folder ``prepare`` writes, and the one owner of every fact about it.

    ps = PreparedSet("runs/demo/prepared")
    ps.size                                   # 256: the training size (prepare --size); models follow it
    ps.layouts("image")                       # ("multilabel", "per_label"): what each head can train on
    ps.coco_path("multilabel", fold=1)        # coco/multilabel/fold1.json
    ps.read_folds("multilabel", [1, 2])       # one COCO dict of folds 1 and 2
    ps.read_image("r0001")                    # uint8 [C, size, size] from the cache (memory-mapped)
    ps.true_cell_labels()                     # synthetic sets: {(image, cell): [labels]}, else None

What lies in the folder (``hpa_scc.apps.prepare`` writes it):
    prepare.json                          the settings: size, segmenter, layout, folds, seed
    segmentation/<xx>/<ID>_{cells,nuclei}.png  full-size label images (<xx>: see record_path)
    cache/images/<xx>/<ID>.npy            the images at ``size`` (uint8 [C, size, size])
    folds.csv                             ID,Label,fold
    coco[_truth|_NAME]/<layout>/fold<K>.json (all.json for one fold): cells with their labels:
                                          coco/ the image's labels (weak), coco_truth/ a synthetic
                                          set's true labels, coco_NAME/ a refinement round's
    coco[...]/<layout>/fold<K>.store      the same file as arrays the loader memory-maps
                                          (``hpa_scc.data.annotations``)
Train, refine, predict's checks and the benchmarks ask this object instead of re-deriving paths.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path

import numpy as np
from pycocotools import mask as coco_mask

from hpa_scc.constants import NUM_CLASSES
from hpa_scc.data.annotations import AnnotationStore, load_store
from hpa_scc.data.cache import cache_path
from hpa_scc.data.images import read_labels, seg_paths
from hpa_scc.utils.fileio import fanned
from hpa_scc.utils.provenance import changed, file_digest
from hpa_scc.weak.targets import LAYOUTS, label_of

PREPARE_JSON = "prepare.json"


def record_path(root: str | os.PathLike, image_id: str, fanout: bool = True) -> Path:
    """A prepared folder's per-image record (format 2: in its hashed sub-folder, ``fileio.fanned``)."""
    return fanned(Path(root) / "records", image_id, f"{image_id}.json", fanout)


def labels_folder(labels: str) -> str:
    """Which cell labels -> the prepared set's COCO folder name.

    ``image``: every cell inherits its image's labels (coco/, what real data allows); ``truth``:
    a synthetic set's true cell labels (coco_truth/, the oracle); any other NAME: coco_NAME/,
    e.g. the labels a refinement round wrote (``refined_r1``).
    """
    if not labels or "/" in labels or labels.startswith("."):
        raise ValueError(f"data.labels must be 'image', 'truth' or a name like 'refined_r1', got {labels!r}")
    return {"image": "coco", "truth": "coco_truth"}.get(labels, f"coco_{labels}")


def label_image(annotations: list[dict], shape: tuple[int, int]) -> np.ndarray:
    """int32 [H, W] from one image's COCO annotations: ``cell_id`` where its RLE mask is
    (per_label files repeat a cell once per label; the first copy is drawn)."""
    out = np.zeros(shape, np.int32)
    seen = set()
    for ann in annotations:
        if ann["cell_id"] in seen:
            continue
        seen.add(ann["cell_id"])
        out[coco_mask.decode(ann["segmentation"]).astype(bool)] = ann["cell_id"]
    return out


def cells_of(coco: dict) -> dict[int, dict[int, dict]]:
    """{image id: {cell id: its first annotation}} (per_label files repeat a cell once per label)."""
    out: dict[int, dict[int, dict]] = {}
    for ann in coco["annotations"]:
        out.setdefault(ann["image_id"], {}).setdefault(ann["cell_id"], ann)
    return out


def cell_labels(coco: dict) -> dict[int, dict[int, list[int]]]:
    """{image id: {cell id: sorted class indices}} of a COCO dict of either layout."""
    out: dict[int, dict[int, set[int]]] = {}
    for ann in coco["annotations"]:
        labels = out.setdefault(ann["image_id"], {}).setdefault(ann["cell_id"], set())
        if "label_vector" in ann:
            labels.update(i for i, v in enumerate(ann["label_vector"]) if v)
        else:
            labels.add(label_of(ann["category_id"]))
    return {i: {c: sorted(v) for c, v in cells.items()} for i, cells in out.items()}


class PreparedSet:
    """A prepared folder; every path and setting of it is read here (see the module docstring)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __fspath__(self) -> str:  # a PreparedSet goes wherever a path to it does
        return str(self.root)

    def __repr__(self) -> str:
        return f"PreparedSet({str(self.root)!r})"

    @cached_property
    def settings(self) -> dict:
        """prepare.json: what the set was prepared with."""
        path = self.root / PREPARE_JSON
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {self.root} is not a prepared set; make it with "
                                    f"'python dataset.py DATA_DIR {self.root} --size 512' (python -m hpa_scc prepare)")
        try:
            return json.loads(path.read_text())
        except ValueError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); prepare the set again into a new folder") from None

    @property
    def size(self) -> int:
        """The side in px of every cached image and COCO mask: the training size."""
        return int(self.settings["size"])

    @property
    def n_folds(self) -> int:
        return max(int(self.settings.get("folds", 1)), 1)

    def check_size(self, size: int | None, what: str, fix: str | None = None) -> int:
        """The set's size; ``size`` (None: take the set's) must equal it, else an error naming ``what``."""
        if size is not None and int(size) != self.size:
            fix = fix or f"leave {what} out (it follows the prepared set) or prepare again with --size {size}"
            raise ValueError(f"{self.root} was prepared at {self.size} px but {what} is {size}; {fix}")
        return self.size

    # --- COCO folds -------------------------------------------------------------------------
    def labels_dir(self, labels: str = "image") -> Path:
        return self.root / labels_folder(labels)

    def has_labels(self, labels: str) -> bool:
        return self.labels_dir(labels).is_dir()

    def labels_fix(self, labels: str) -> str:
        """How the COCO files of ``labels`` are made, for the error that finds them missing: prepare
        for image labels, synth for the truth, a refinement round for any other name."""
        if labels == "image":
            return f"build them with 'python dataset.py DATA_DIR {self.root}' (python -m hpa_scc prepare)"
        if labels == "truth":
            return "only synthetic sets (with masks/ and cells.csv) have true cell labels"
        here = ["image"] * self.has_labels("image") + ["truth"] * self.has_labels("truth") + sorted(
            d.name.removeprefix("coco_") for d in self.root.glob("coco_*") if d.is_dir() and d.name != "coco_truth")
        return (f"write it with a refinement round: python -m hpa_scc refine RUN_DIR {self.root} --name {labels} "
                f"--held-out-folds K (label sets in this set: {', '.join(here) or 'none'})")

    def first_layout(self, labels: str = "image", layout: str | None = None) -> str:
        """``layout``, or else the first layout the set has for ``labels`` (the cells are the same in
        every layout); none: an error saying how to make them."""
        layouts = (layout,) if layout else self.layouts(labels)
        if not layouts:
            raise FileNotFoundError(f"no COCO files under {self.labels_dir(labels)}; {self.labels_fix(labels)}")
        return layouts[0]

    def layouts(self, labels: str = "image") -> tuple[str, ...]:
        """The COCO layouts written for ``labels``, in LAYOUTS order."""
        return tuple(lay for lay in LAYOUTS if (self.labels_dir(labels) / lay).is_dir())

    def coco_path(self, layout: str, fold: int, labels: str = "image") -> Path:
        """coco[_truth|_NAME]/<layout>/fold<K>.json (all.json, fold 0, when the set has one fold)."""
        base = self.labels_dir(labels) / layout
        path = base / f"fold{fold}.json"
        if not path.is_file() and (base / "all.json").is_file() and fold == 0:
            return base / "all.json"
        if not path.is_file():
            hint = {"image": f"build it with 'python dataset.py DATA_DIR {self.root}' (both layouts unless --layout "
                              f"names one; a set prepared with --layout holds that one only: prepare it again into "
                              f"another OUT_DIR, or train the head of the layout it holds, model.head=softmax for "
                              f"per_label)",
                    }.get(labels) or self.labels_fix(labels)
            raise FileNotFoundError(f"{path} not found; {hint} (and check data.val_fold against the number of folds)")
        return path

    def fold_files(self, layout: str, labels: str = "image") -> list[tuple[int, Path]]:
        """(fold, path) of every COCO file of one label folder and layout, in fold order."""
        base = self.labels_dir(labels) / layout
        if (base / "all.json").is_file():
            return [(0, base / "all.json")]
        files = sorted(base.glob("fold*.json"), key=lambda p: int(p.stem[4:]))
        if not files:
            raise FileNotFoundError(f"no COCO files in {base}; {self.labels_fix(labels)}")
        return [(int(p.stem[4:]), p) for p in files]

    def read_folds(self, layout: str, folds: list[int], labels: str = "image") -> dict:
        """The COCO files of several folds merged into one COCO dict (ids are unique across folds)."""
        merged: dict = {"images": [], "annotations": []}
        for fold in folds:
            data = json.loads(self.coco_path(layout, fold, labels).read_text())
            merged["images"] += data["images"]
            merged["annotations"] += data["annotations"]
            merged["categories"] = data["categories"]
            merged["info"] = data["info"]
        return merged

    def annotation_stores(self, layout: str, folds: list[int], labels: str = "image") -> list[AnnotationStore]:
        """The annotation store of each fold's COCO file, memory-mapped (``data.annotations``); a file
        without one (a set prepared before stores existed) is read into memory, with a warning."""
        self.check_refined(labels)
        fix = ("re-run the refinement round that wrote it" if labels not in ("image", "truth") else
               f"re-run the same prepare command on {self.root} (finished images are reused; it adds the stores)")
        return [load_store(self.coco_path(layout, fold, labels), fix) for fold in folds]

    def fold_stores(self, labels: str = "image", layout: str | None = None) -> list[tuple[int, AnnotationStore]]:
        """(fold, annotation store) of every fold, in ``layout`` or else the first layout the set has
        (the cells are the same in every layout): ``fold_cocos`` without building a dict per cell."""
        layout = self.first_layout(labels, layout)
        folds = [fold for fold, _ in self.fold_files(layout, labels)]
        return list(zip(folds, self.annotation_stores(layout, folds, labels), strict=True))

    def check_refined(self, labels: str) -> None:
        """A refined label set (``refine``) is made from the image labels of its time; once those
        change (prepare rerun on a fixed or extended table) training on it would mix old labels in:
        refused, naming the changed folds. Checked once per PreparedSet and label set."""
        checked = self.__dict__.setdefault("_refined_checked", set())
        if labels in ("image", "truth") or labels in checked:
            return
        try:
            made = json.loads((self.labels_dir(labels) / "refine.json").read_text()).get("made_from") or {}
        except (OSError, ValueError):
            made = {}  # written by hand or by an earlier version: nothing recorded to check
        if "source_data" in made:
            folds = changed(made["source_data"], self.data_digest(made.get("source", "image")))
            if folds:
                raise ValueError(f"{self.labels_dir(labels)} was refined from {made.get('source', 'image')} labels "
                                 f"that have changed since ({', '.join(folds)}: a prepare rerun relabelled, added "
                                 f"or dropped images); refine again under a new name and train on that")
        checked.add(labels)

    def data_digest(self, labels: str = "image", folds: list[int] | None = None) -> dict[str, str]:
        """{"fold<K>": 16 hex digits} of the COCO file of each fold (all when ``folds`` is None), of
        the first layout the set has for ``labels``: they change when an image, a cell or a label
        does. What a run trained on; ``train`` records it and refuses to resume (or refit) on a
        set whose digest changed, naming the folds (``provenance.changed``)."""
        return {f"fold{fold}": file_digest(path) for fold, path in self.fold_files(self.first_layout(labels), labels)
                if folds is None or fold in folds}

    def fold_cocos(self, labels: str = "image", layout: str | None = None) -> list[tuple[int, dict]]:
        """(fold, COCO dict) of every fold, in ``layout`` or else the first layout the set has
        (the cells are the same in every layout)."""
        return [(fold, json.loads(path.read_text()))
                for fold, path in self.fold_files(self.first_layout(labels, layout), labels)]

    def label_matrix(self, names: list[str], image_index: np.ndarray, cell_ids: np.ndarray,
                     labels: str = "image") -> tuple[np.ndarray, np.ndarray]:
        """The labels of the cells (``names[image_index[k]]``, ``cell_ids[k]``) from coco[_truth|_NAME]/:
        (float32 [K, 19], bool [K] found). Vectors may be soft (a refinement round can write scores).

        Arrays all the way (cells matched by a sorted int64 key), so 2M cells cost tens of MB.
        """
        index_of = {name: i for i, name in enumerate(names)}
        keys, vectors = [], []
        for _fold, store in self.fold_stores(labels):
            rows, cells, vecs = store.cell_label_vectors()
            image = np.array([index_of.get(n, -1) for n in store.image_names()], np.int64)[rows]
            keep = image >= 0
            keys.append((image[keep] << 32) | cells[keep])
            vectors.append(vecs[keep])
        keys_all = np.concatenate(keys) if keys else np.zeros(0, np.int64)
        unique, inverse = np.unique(keys_all, return_inverse=True)
        merged = np.zeros((len(unique), NUM_CLASSES), np.float32)
        if len(keys_all):
            np.maximum.at(merged, inverse, np.concatenate(vectors))  # per_label: a cell's labels together
        wanted = (np.asarray(image_index, np.int64) << 32) | np.asarray(cell_ids, np.int64)
        at = np.minimum(np.searchsorted(unique, wanted), max(len(unique) - 1, 0))
        found = (unique[at] == wanted) if len(unique) else np.zeros(len(wanted), bool)
        out = np.where(found[:, None], merged[at] if len(unique) else 0.0, 0.0).astype(np.float32)
        return out, found

    def label_vectors(self, labels: str = "image") -> dict[tuple[str, int], np.ndarray]:
        """{(image name, cell id): float32 [19] label vector} of every cell, from coco[_truth|_NAME]/
        (a dict for small sets and tests; training uses ``label_matrix``)."""
        out: dict[tuple[str, int], np.ndarray] = {}
        for _fold, store in self.fold_stores(labels):
            names = store.image_names()
            for row, cell, vec in zip(*store.cell_label_vectors(), strict=True):
                key = (names[row], int(cell))
                out[key] = np.maximum(out[key], vec) if key in out else vec.copy()
        return out

    def true_cell_labels(self) -> dict[tuple[str, int], list[int]] | None:
        """{(image name, cell id): true labels} from coco_truth/ (synthetic sets only), else None."""
        if not self.layouts("truth"):
            return None
        out = {}
        for _, coco in self.fold_cocos("truth"):
            names = {img["id"]: img["image_name"] for img in coco["images"]}
            out.update({(names[i], c): labels for i, cells in cell_labels(coco).items() for c, labels in cells.items()})
        return out

    # --- pixels -----------------------------------------------------------------------------
    @property
    def fanout(self) -> bool:
        """Per-image files in hashed sub-folders (prepare format 2); format 1 sets keep them flat."""
        return int(self.settings.get("format", 1)) >= 2

    def image_path(self, image_id: str) -> Path:
        return cache_path(self.root / "cache", image_id, self.fanout)

    def record_path(self, image_id: str) -> Path:
        """records/<xx>/<ID>.json: one finished image's cells at the training size (prepare writes it)."""
        return record_path(self.root, image_id, self.fanout)

    def read_image(self, image_id: str) -> np.ndarray:
        """uint8 [C, size, size], memory-mapped; a missing or unreadable file names the fix."""
        path = self.image_path(image_id)
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError, EOFError) as exc:  # EOFError: a zero-byte file
            raise OSError(f"cannot read {path} (image {image_id}): {exc}; re-run prepare on the same folder to "
                          f"rebuild it") from None

    def is_segmented(self, image_id: str) -> bool:
        return seg_paths(self.root / "segmentation", image_id, self.fanout)[1].is_file()

    def segmentation(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(nuclei, cells) uint16 [H, W] full-size label images of one image."""
        return read_labels(seg_paths(self.root / "segmentation", image_id, self.fanout)[0]), self.cells(image_id)

    def cells(self, image_id: str) -> np.ndarray:
        """The uint16 [H, W] full-size cell label image alone (half the reading of ``segmentation``)."""
        return read_labels(seg_paths(self.root / "segmentation", image_id, self.fanout)[1])
