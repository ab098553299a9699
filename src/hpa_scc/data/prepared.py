"""The prepared set: the folder ``prepare`` writes, and the one owner of every fact about it.

    ps = PreparedSet("runs/demo/prepared")
    ps.size                                   # 256: the training size (prepare --size); models follow it
    ps.layouts("image")                       # ("multilabel", "per_label"): what each head can train on
    ps.coco_path("multilabel", fold=1)        # coco/multilabel/fold1.json
    ps.read_folds("multilabel", [1, 2])       # one COCO dict of folds 1 and 2
    ps.read_image("r0001")                    # uint8 [C, size, size] from the cache (memory-mapped)
    ps.true_cell_labels()                     # synthetic sets: {(image, cell): [labels]}, else None

What lies in the folder (``hpa_scc.apps.prepare`` writes it through this object):
    prepare.json                          the settings: size, segmenter, layout, folds, seed
    segmentation/<xx>/<ID>_{cells,nuclei}.png  full-size label images (<xx>: see record_path)
    cache/images/<xx>/<ID>.npy            the images at ``size`` (uint8 [C, size, size])
    cache/cache.json, cache/index.csv     the cache's settings and index (``hpa_scc.data.cache``)
    records/<xx>/<ID>.json                one finished image: its cells at ``size`` (RLE), written last
    folds.csv                             ID,Label,fold
    coco[_truth|_NAME]/<layout>/fold<K>.json (all.json for one fold): cells with their labels:
                                          coco/ the image's labels (weak), coco_truth/ a synthetic
                                          set's true labels, coco_NAME/ a refinement round's
    coco[...]/<layout>/fold<K>.store      the same file as arrays the loader memory-maps
                                          (``hpa_scc.data.annotations``)
    coco_NAME/refine.json                 what a refinement round was made from (``apps.refine``)
    failures.csv                          ID,error (failures-shard<I>of<N>.csv per shard)
Train, refine, predict's checks and the benchmarks ask this object instead of re-deriving paths;
``coco_file`` and ``cell_annotation`` build the COCO files prepare and refine write.

Why ~460 lines: the prepared set's one owner: every path, setting and reader/writer of the folder
is here (issue 28), so nothing else names its files.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path

import numpy as np
from pycocotools import mask as coco_mask

from hpa_scc.constants import CLASS_NAMES, NUM_CLASSES, format_labels
from hpa_scc.data.annotations import AnnotationStore, load_store
from hpa_scc.data.cache import cache_path
from hpa_scc.data.images import read_labels, seg_paths
from hpa_scc.utils.fileio import SETTINGS_RECORDS, OwnedFolder, atomic_path, failures_name, fanned, write_text_atomic
from hpa_scc.utils.provenance import changed, file_digest
from hpa_scc.weak.targets import LAYOUTS, Instance, cell_instances, inherit_labels, label_of

PREPARE_JSON = SETTINGS_RECORDS["prepare"]  # the settings record (``fileio.check_settings``)
PREPARE_FORMAT = 2  # 2: per-image files in hashed sub-folders (PreparedSet.fanout); a format 1 set is resumed flat


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


def coco_file_name(fold: int, n_folds: int) -> str:
    """fold<K>.json, or all.json when the set has one fold."""
    return f"fold{fold}.json" if n_folds > 1 else "all.json"


def cell_annotation(ann_id: int, image_id: int, inst: Instance, cell: Mapping, *, ids_first: bool = True) -> dict:
    """One COCO annotation: instance ``inst`` (``weak.targets.cell_instances``: the cell id, a
    category, a label vector for the multilabel layout) of ``cell``, a mapping with the cell's mask
    fields (segmentation, area, bbox; iscrowd, 0 when absent; touches_border, left out when absent).

    ``ids_first=False`` puts id, image_id and category_id after the cell's fields: the key order
    refine has always written, kept so that the same refinement writes the same bytes (a run
    records the digest of the label files it trained on)."""
    fields = {"segmentation": cell["segmentation"], "area": cell["area"], "bbox": cell["bbox"],
              "iscrowd": cell.get("iscrowd", 0), "cell_id": inst.cell_id}
    if "touches_border" in cell:
        fields["touches_border"] = cell["touches_border"]
    ids = {"id": ann_id, "image_id": image_id, "category_id": inst.category_id}
    ann = {**ids, **fields} if ids_first else {**fields, **ids}
    if inst.label_vector is not None:
        ann["label_vector"] = list(inst.label_vector)
    return ann


def coco_file(records: list[dict], layout: str, *, truth: bool = False, description: str = "") -> dict:
    """Prepared records (``PreparedSet.read_record``, each with its table ``index``) -> a COCO
    instances dict (images in the given order, ids from their table index).

    Weak: every cell carries its image's labels. ``truth``: each cell carries the true labels
    transferred from the synthetic truth. Image records keep the image-level labels.
    """
    images, annotations = [], []
    for rec in records:
        cells = {c["cell_id"]: c for c in rec["cells"]}
        if truth:
            labels = {k: rec["true_labels"][str(k)] for k in cells}
        else:
            labels = inherit_labels(cells, rec["labels"])
        images.append({"id": rec["index"], "file_name": f"{rec['image_id']}.npy", "image_name": rec["image_id"],
                       "height": rec["height"], "width": rec["width"], "orig_height": rec["orig_height"],
                       "orig_width": rec["orig_width"], "labels": rec["labels"]})
        for inst in cell_instances(labels, layout):
            annotations.append(cell_annotation(len(annotations) + 1, rec["index"], inst, cells[inst.cell_id]))
    categories = [{"id": c + 1, "name": name, "supercategory": "location"} for c, name in enumerate(CLASS_NAMES)]
    info = {"description": description, "layout": layout, "labels": "true cell labels" if truth else
            "image labels inherited by every cell", "category_ids": "class index + 1; 0 is background"}
    return {"info": info, "images": images, "annotations": annotations, "categories": categories}


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


class PreparedSet(OwnedFolder):
    """A prepared folder; every path and setting of it is read here (see the module docstring).

    ``fanout``: the per-image file layout, for prepare while it writes the set (it decides the
    format); left out, it is read from prepare.json.
    """

    def __init__(self, root: str | os.PathLike, *, fanout: bool | None = None):
        super().__init__(root)
        self._fanout = fanout

    @property
    def settings_path(self) -> Path:
        return self.root / PREPARE_JSON

    def exists(self) -> bool:
        """Whether the folder holds a prepared set (its prepare.json), finished or not."""
        return self.settings_path.is_file()

    def written_format(self) -> int | None:
        """The format prepare.json records (1 when it names none), None when there is no readable one."""
        try:
            return int(json.loads(self.settings_path.read_text()).get("format", 1))
        except (OSError, ValueError):
            return None

    @cached_property
    def settings(self) -> dict:
        """prepare.json: what the set was prepared with."""
        path = self.settings_path
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
            from hpa_scc.data.synth import SynthSet

            return f"only synthetic sets (with {SynthSet.MASKS}/ and {SynthSet.CELLS_CSV}) have true cell labels"
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

    def coco_target(self, layout: str, fold: int, n_folds: int, labels: str = "image") -> Path:
        """Where fold ``fold`` of ``n_folds`` is written: coco[_truth|_NAME]/<layout>/fold<K>.json (all.json)."""
        return self.labels_dir(labels) / layout / coco_file_name(fold, n_folds)

    def refine_record_path(self, labels: str) -> Path:
        """coco_NAME/refine.json: what a refinement round's labels were made from, and how it went."""
        return self.labels_dir(labels) / "refine.json"

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
            made = json.loads(self.refine_record_path(labels).read_text()).get("made_from") or {}
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

    # --- the per-image files --------------------------------------------------------------------
    @property
    def fanout(self) -> bool:
        """Per-image files in hashed sub-folders (prepare format 2); format 1 sets keep them flat."""
        if self._fanout is not None:
            return self._fanout
        return int(self.settings.get("format", 1)) >= 2

    @property
    def cache_dir(self) -> Path:
        """cache/: the resized images, a cache of ``hpa_scc.data.cache``'s layout."""
        return self.root / "cache"

    def cache_index_path(self, suffix: str = "") -> Path:
        """cache/index<suffix>.csv: the cache's index (``data.cache.write_index``; suffix: a shard's)."""
        return self.cache_dir / f"index{suffix}.csv"

    @property
    def segmentation_dir(self) -> Path:
        """segmentation/: the full-size label images (``data.images.seg_paths``)."""
        return self.root / "segmentation"

    def image_path(self, image_id: str) -> Path:
        return cache_path(self.cache_dir, image_id, self.fanout)

    def record_path(self, image_id: str) -> Path:
        """records/<xx>/<ID>.json: one finished image's cells at the training size (prepare writes it)."""
        return record_path(self.root, image_id, self.fanout)

    def read_record(self, image_id: str) -> dict:
        """One image's record; FileNotFoundError when it has none, ValueError when it is damaged."""
        return json.loads(self.record_path(image_id).read_text())

    def write_record(self, image_id: str, record: dict) -> None:
        """records/<xx>/<ID>.json, atomically: the image is finished once it exists."""
        write_text_atomic(self.record_path(image_id), json.dumps(record, separators=(",", ":")))

    def failures_path(self, suffix: str = "") -> Path:
        """failures<suffix>.csv: the images prepare skipped (suffix: a shard's, ``data.shard.shard_suffix``)."""
        return self.root / failures_name(suffix)

    @property
    def folds_csv(self) -> Path:
        return self.root / "folds.csv"

    def write_folds(self, image_ids: list[str], labels: list, folds) -> None:
        """folds.csv (ID,Label,fold), atomically: each image's fold, in the table's order."""
        with atomic_path(self.folds_csv, ".csv") as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["ID", "Label", "fold"])
            for image_id, image_labels, fold in zip(image_ids, labels, folds, strict=True):
                writer.writerow([image_id, format_labels(image_labels), int(fold)])

    # --- pixels -----------------------------------------------------------------------------
    def read_image(self, image_id: str) -> np.ndarray:
        """uint8 [C, size, size], memory-mapped; a missing or unreadable file names the fix."""
        path = self.image_path(image_id)
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError, EOFError) as exc:  # EOFError: a zero-byte file
            raise OSError(f"cannot read {path} (image {image_id}): {exc}; re-run prepare on the same folder to "
                          f"rebuild it") from None

    def seg_paths(self, image_id: str) -> tuple[Path, Path]:
        """(nuclei, cells) label image paths of one image under segmentation/."""
        return seg_paths(self.segmentation_dir, image_id, self.fanout)

    def is_segmented(self, image_id: str) -> bool:
        return self.seg_paths(image_id)[1].is_file()

    def segmentation(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(nuclei, cells) uint16 [H, W] full-size label images of one image."""
        return read_labels(self.seg_paths(image_id)[0]), self.cells(image_id)

    def cells(self, image_id: str) -> np.ndarray:
        """The uint16 [H, W] full-size cell label image alone (half the reading of ``segmentation``)."""
        return read_labels(self.seg_paths(image_id)[1])
