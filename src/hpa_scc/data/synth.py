"""Synthetic HPA fields of view whose every cell's labels are known.

    python -m hpa_scc synth OUT_DIR --images N --size PX --seed S

Real HPA images carry image-level labels only, so weak supervision cannot be measured cell by
cell on them. This module draws four-channel images that look like HPA confocal fields
(microtubules red, protein of interest green, nucleus blue, ER yellow) together with the truth:
a cell label image, a nucleus label image, and each cell's own labels.

How an image is made (each step is a function of ``data.synth_layout`` (1-3) or ``data.synth_draw``
(4), in this order; this module writes sets of them):
1. image labels: 1-4 classes with the Kaggle skew flattened (``sample_image_labels``);
2. layout: cells placed as star-shaped outlines around their nuclei, some attached to
   neighbours (clusters, confluent patches with shared boundaries), some cut by the border,
   a few mitotic (``_place_cells``, ``_rasterize``);
3. cell labels: each cell shows a random share of the image's labels (``assign_cell_labels``);
4. rendering: every cell is drawn inside its bounding box: nucleus with nucleoli, radiating
   microtubules, a reticular ER dense near the nucleus, and one green pattern per label
   (``GREEN_PATTERNS``); then blur, uneven illumination and shot/read noise (``_finish``).

Image ``index`` of seed ``seed`` is drawn from ``np.random.default_rng([seed, index])``, so it is
the same whatever the number of images or workers. All lengths are given in pixels at 512 px
and scale with ``size / 512``.

Layout written by ``write_synth_set`` (the Kaggle layout plus the truth); ``SynthSet`` names every
path of it, for this module and for the steps that read the truth (prepare, predict, visualize):
    OUT/train.csv                   ID,Label (image labels, e.g. 8|5|0)
    OUT/train/<ID>_<channel>.png    8-bit red, green, blue, yellow
    OUT/masks/<ID>.png              uint16 cell label image (0 background, cells 1..N)
    OUT/nuclei/<ID>.png             uint16 nucleus label image (nucleus k inside cell k)
    OUT/cells.csv                   ID,cell,Label: each cell's true labels
    OUT/solution.csv                the truth in the Kaggle submission format
    OUT/meta/<ID>.json              per-image record, written last: an image is done when it exists
    OUT/synth.json                  the set's parameters (size, seed, version); a rerun must match
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path

import numpy as np

from hpa_scc.constants import CLASS_NAMES, CHANNELS, NUM_CLASSES, format_labels, parse_labels
from hpa_scc.data.synth_draw import generate_image
from hpa_scc.data.synth_layout import MAX_SIZE, MIN_SIZE, SYNTH_VERSION, image_id_of
from hpa_scc.evaluation.submission import SubmissionRow, cells_to_row, write_submission
from hpa_scc.utils.fileio import OwnedFolder, write_png_atomic, write_text_atomic
from hpa_scc.utils.pool import run_pool, single_threaded_opencv

# ============================================================================================
# The set's folder
# ============================================================================================
class SynthSet(OwnedFolder):
    """A synthetic set's folder: every path of it is named here (layout in the module docstring).

        s = SynthSet("runs/demo/synthetic")
        s.is_synthetic                  # True once written: it has cells.csv and masks/
        s.mask_path("synth0-00003")     # masks/synth0-00003.png, the true cells
        s.true_labels()                 # {ID: {cell id: labels}} from cells.csv
    """

    # The truth's names in the folder, for messages that tell a user what a synthetic set holds.
    MASKS, CELLS_CSV = "masks", "cells.csv"

    # --- the Kaggle layout, which the steps read as any data set (``data.images.find_images``) ----
    @property
    def labels_csv(self) -> Path:
        """train.csv: ID,Label, the image labels."""
        return self.root / "train.csv"

    @property
    def images_dir(self) -> Path:
        return self.root / "train"

    def channel_path(self, image_id: str, channel: str) -> Path:
        """train/<ID>_<channel>.png, one 8-bit channel."""
        return self.images_dir / f"{image_id}_{channel}.png"

    # --- the truth -----------------------------------------------------------------------------
    @property
    def masks_dir(self) -> Path:
        return self.root / self.MASKS

    @property
    def nuclei_dir(self) -> Path:
        return self.root / "nuclei"

    def mask_path(self, image_id: str) -> Path:
        """masks/<ID>.png: the uint16 cell label image (0 background, cells 1..N)."""
        return self.masks_dir / f"{image_id}.png"

    def nuclei_path(self, image_id: str) -> Path:
        """nuclei/<ID>.png: the uint16 nucleus label image (nucleus k inside cell k)."""
        return self.nuclei_dir / f"{image_id}.png"

    def read_mask(self, image_id: str) -> np.ndarray:
        """The true cells of one image, uint16 [H, W]."""
        from hpa_scc.data.images import read_labels

        return read_labels(self.mask_path(image_id))

    def mask_ids(self) -> list[str]:
        """The IDs that have a true cell image, sorted."""
        return [p.stem for p in sorted(self.masks_dir.glob("*.png"))]

    @property
    def cells_csv(self) -> Path:
        """cells.csv: ID,cell,Label, each cell's true labels."""
        return self.root / self.CELLS_CSV

    @property
    def solution_csv(self) -> Path:
        """solution.csv: the truth in the Kaggle submission format."""
        return self.root / "solution.csv"

    @property
    def is_synthetic(self) -> bool:
        """Whether the folder is a synthetic set with its truth (cells.csv and masks/)."""
        return self.cells_csv.is_file() and self.masks_dir.is_dir()

    def true_labels(self) -> dict[str, dict[int, list[int]]]:
        """cells.csv -> {image id: {cell id: labels}}; the cells are masks/<ID>.png."""
        path = self.cells_csv
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: only a synthetic set (python -m hpa_scc synth) has true "
                                    "cell labels")
        table: dict[str, dict[int, list[int]]] = {}
        with open(path, newline="") as fh:
            for line_no, row in enumerate(csv.DictReader(fh), start=2):
                table.setdefault(row["ID"], {})[int(row["cell"])] = parse_labels(row["Label"],
                                                                                 where=f"{path} line {line_no}")
        return table

    # --- synth's own bookkeeping ----------------------------------------------------------------
    @property
    def meta_dir(self) -> Path:
        return self.root / "meta"

    def meta_path(self, image_id: str) -> Path:
        """meta/<ID>.json: the per-image record, written last (an image is done when it exists)."""
        return self.meta_dir / f"{image_id}.json"

    @property
    def params_path(self) -> Path:
        """synth.json: the set's parameters (size, seed, version)."""
        return self.root / "synth.json"


def is_synthetic(data_dir: str | os.PathLike) -> bool:
    """Whether a folder is a synthetic set with its truth (``SynthSet.is_synthetic``)."""
    return SynthSet(data_dir).is_synthetic


def read_true_cell_labels(data_dir: str | os.PathLike) -> dict[str, dict[int, list[int]]]:
    """A synthetic set's cells.csv -> {image id: {cell id: labels}} (``SynthSet.true_labels``)."""
    return SynthSet(data_dir).true_labels()


# ============================================================================================
# Writing a set
# ============================================================================================
def _write_one(task: tuple[str, int, int, int]) -> dict:
    """Generate image ``index`` and write its files; the meta record goes last (the done flag)."""
    out_dir, index, size, seed = task
    out = SynthSet(out_dir)
    synth = generate_image(index, size=size, seed=seed)
    iid = synth.image_id
    for name, plane in zip(CHANNELS, synth.image):
        write_png_atomic(out.channel_path(iid, name), plane)
    write_png_atomic(out.mask_path(iid), synth.cells)
    write_png_atomic(out.nuclei_path(iid), synth.nuclei)
    # The truth in submission form, one encoded mask per cell, kept in the record so the tables
    # can be rebuilt on resume without reading any image back.
    row = cells_to_row(iid, synth.cells, synth.cell_labels)
    masks = iter(text for _, _, text in row.predictions)
    edges = np.concatenate([synth.cells[0], synth.cells[-1], synth.cells[:, 0], synth.cells[:, -1]])
    border_ids = set(np.unique(edges).tolist())
    cells = []
    for cell_id, labels in synth.cell_labels.items():
        texts = [next(masks) for _ in labels]  # the same text repeated once per label
        cells.append({"cell": cell_id, "labels": labels, "mitotic": synth.mitotic[cell_id],
                      "border": cell_id in border_ids, "mask": texts[0]})
    meta = {"id": iid, "index": index, "seed": seed, "size": size, "version": SYNTH_VERSION,
            "image_labels": synth.image_labels, "cells": cells}
    write_text_atomic(out.meta_path(iid), json.dumps(meta))
    return meta


def _check_params(out: SynthSet, size: int, seed: int) -> None:
    """Record the set's parameters in OUT/synth.json, or fail if the folder holds another set."""
    params = {"size": size, "seed": seed, "version": SYNTH_VERSION}
    path = out.params_path
    if path.exists():
        old = json.loads(path.read_text())
        differ = {k: (old.get(k), v) for k, v in params.items() if old.get(k) != v}
        if differ:
            what = ", ".join(f"{k} {a} there vs {b} asked" for k, (a, b) in differ.items())
            raise ValueError(f"{out} holds a synthetic set made with other parameters ({what}); "
                             f"use the same --size/--seed to resume or choose another folder")
    else:
        write_text_atomic(path, json.dumps(params, indent=1) + "\n")


def _load_metas(out: SynthSet) -> list[dict]:
    metas = [json.loads(p.read_text()) for p in sorted(out.meta_dir.glob("*.json"))]
    return sorted(metas, key=lambda m: (m["seed"], m["index"]))


def _write_tables(out: SynthSet, metas: list[dict]) -> None:
    """train.csv, cells.csv and solution.csv from the per-image records, each written atomically."""
    train, cells = io.StringIO(), io.StringIO()
    tw, cw = csv.writer(train, lineterminator="\n"), csv.writer(cells, lineterminator="\n")
    tw.writerow(["ID", "Label"])
    cw.writerow(["ID", "cell", "Label"])
    rows = []
    for meta in metas:
        tw.writerow([meta["id"], format_labels(meta["image_labels"])])
        row = SubmissionRow(meta["id"], meta["size"], meta["size"])
        for cell in meta["cells"]:
            cw.writerow([meta["id"], cell["cell"], format_labels(cell["labels"])])
            row.predictions += [(label, 1.0, cell["mask"]) for label in cell["labels"]]
        rows.append(row)
    write_text_atomic(out.labels_csv, train.getvalue())
    write_text_atomic(out.cells_csv, cells.getvalue())
    write_submission(out.solution_csv, rows)


def write_synth_set(out_dir, n_images: int, *, size: int = 512, seed: int = 0, workers: int = 1,
                    progress: bool = True) -> dict:
    """Write images 0..n_images-1 of ``seed`` under ``out_dir`` (layout in the module docstring).

    Resumable: images whose record OUT/meta/<ID>.json exists are skipped; the tables are rebuilt
    from all records in the folder. Returns a summary dict (see ``format_summary``).
    """
    if n_images < 1:
        raise ValueError(f"--images {n_images}: a synthetic set needs at least 1 image")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"--size {size}: synthetic images are {MIN_SIZE} to {MAX_SIZE} px (real HPA images are "
                         f"1728 to 3072 px; 512 is the usual)")
    out = SynthSet(out_dir)
    # The tables are rebuilt from OUT/meta/: a folder with a train.csv and no meta/ is someone's
    # data set, whose label table would be replaced.
    if out.labels_csv.is_file() and not out.meta_dir.is_dir():
        raise ValueError(f"{out.root} holds a label table (train.csv) that synth did not write; synth would replace "
                         "it: give a folder of its own")
    out.root.mkdir(parents=True, exist_ok=True)
    _check_params(out, size, seed)
    todo = []
    for index in range(n_images):
        path = out.meta_path(image_id_of(index, seed))
        if not (path.exists() and json.loads(path.read_text()).get("size") == size):
            todo.append((str(out.root), index, size, seed))

    start = time.perf_counter()
    chunk = max(1, min(8, len(todo) // (4 * max(workers, 1))))
    for _ in run_pool(_write_one, todo, workers=workers, initializer=single_threaded_opencv, desc="synth",
                      progress=progress, chunksize=chunk):
        pass
    seconds = time.perf_counter() - start

    metas = _load_metas(out)
    _write_tables(out, metas)
    return _summarise(out, metas, size, seed, requested=n_images, generated=len(todo), seconds=seconds)


def _summarise(out: SynthSet, metas: list[dict], size: int, seed: int, *, requested: int, generated: int,
               seconds: float) -> dict:
    """``requested``/``generated``/``skipped`` describe this call's images 0..requested-1; ``images``
    and the counts describe the whole folder (its tables list every record in it)."""
    n_cells = [len(m["cells"]) for m in metas]
    image_counts, cell_counts = [0] * NUM_CLASSES, [0] * NUM_CLASSES
    for meta in metas:
        for label in meta["image_labels"]:
            image_counts[label] += 1
        for cell in meta["cells"]:
            for label in cell["labels"]:
                cell_counts[label] += 1
    return {
        "out_dir": str(out.root), "size": size, "seed": seed,
        "images": len(metas), "requested": requested, "generated": generated, "skipped": requested - generated,
        "seconds": seconds, "images_per_s": generated / seconds if generated and seconds > 0 else None,
        "cells": int(sum(n_cells)),
        "cells_per_image": {"min": min(n_cells, default=0), "mean": float(np.mean(n_cells)) if n_cells else 0.0,
                            "max": max(n_cells, default=0)},
        "border_cells": sum(c["border"] for m in metas for c in m["cells"]),
        "mitotic_cells": sum(c["mitotic"] for m in metas for c in m["cells"]),
        "image_counts": image_counts, "cell_counts": cell_counts,
        "paths": {name: str(path) for name, path in (
            ("train_csv", out.labels_csv), ("images", out.images_dir), ("masks", out.masks_dir),
            ("nuclei", out.nuclei_dir), ("cells_csv", out.cells_csv), ("solution_csv", out.solution_csv),
            ("meta", out.meta_dir))},
    }


def format_summary(summary: dict) -> str:
    """The summary of ``write_synth_set`` as readable lines."""
    cpi, cells = summary["cells_per_image"], max(summary["cells"], 1)
    speed = f", {summary['images_per_s']:.1f} images/s" if summary.get("images_per_s") else ""
    lines = [
        f"synthetic HPA set {summary['out_dir']} (seed {summary['seed']}, {summary['size']}x{summary['size']} px)",
        f"  images: {summary['requested']} asked for, {summary['generated']} written now in {summary['seconds']:.1f} s"
        f"{speed}, {summary['skipped']} already there",
        *([f"  the folder holds {summary['images']} images (an earlier call made more), all listed in train.csv; "
            f"the counts below are over all {summary['images']}"] if summary["images"] != summary["requested"] else []),
        f"  cells: {summary['cells']}; per image min {cpi['min']} / mean {cpi['mean']:.1f} / max {cpi['max']}",
        f"  cut by the border: {summary['border_cells']} ({100 * summary['border_cells'] / cells:.0f} %); "
        f"mitotic: {summary['mitotic_cells']} ({100 * summary['mitotic_cells'] / cells:.1f} %)",
        f"  {'class':<46} {'images':>7} {'cells':>7}",
    ]
    for i, name in enumerate(CLASS_NAMES):
        lines.append(f"  {i:>2} {name:<43} {summary['image_counts'][i]:>7} {summary['cell_counts'][i]:>7}")
    lines.append("  outputs:")
    lines += [f"    {name:<13} {path}" for name, path in summary["paths"].items()]
    return "\n".join(lines)


# The set's API; an image is drawn by data.synth_draw.generate_image (from data.synth_layout's cells).
__all__ = ["SynthSet", "write_synth_set", "format_summary", "is_synthetic", "read_true_cell_labels"]
