"""The prediction folder: what ``predict`` writes and ``visualize`` and the notebooks read. Every
path of it and its per-image record are named here.

    folder = PredictionFolder("runs/demo/predict/maskrcnn")
    folder.submission                        # submission.csv, the Kaggle submission
    folder.read_record("r0001")              # one image: every cell's mask, bbox, area, 19 confidences
    cells, conf = folder.label_image("r0001")  # uint16 [H, W] and {cell id: float32 [19]}

What lies in the folder (``hpa_scc.apps.predict`` writes it through this object):
    predict.json                 the settings (models, cell mode, options); other settings are refused
    predict.log                  the log of every run into the folder
    records/<xx>/<ID>.json       one image (``encoded_result``): its size and, per cell, its mask at the
                                 original size (submission RLE text), bbox, area and 19 confidences
    records/<xx>/<ID>.json.src   the record's stamp: the inputs it was made from (``utils.provenance``);
                                 a record without one is unfinished and is made again
    segmentation/<xx>/<ID>_{cells,nuclei}.png  the segmenter's cells (``data.images.seg_paths``)
    failures.csv                 ID,error (failures-shard<I>of<N>.csv per shard)
    submission.csv               the Kaggle submission (``evaluation.submission``)
    cells.csv                    ID,cell,x0,y0,x1,y1,area,conf_0..conf_18
(<xx>: 256 sub-folders by a hash of the image ID, ``fileio.fanned``.)
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from hpa_scc.constants import NUM_CLASSES
from hpa_scc.evaluation.submission import (EncodedCell, SubmissionRow, decode_mask, encode_label_image,
                                           write_submission)
from hpa_scc.utils.fileio import SETTINGS_RECORDS, OwnedFolder, atomic_path, failures_name, fanned, write_text_atomic
from hpa_scc.utils.provenance import sidecar, stamp, stamped, unstamp

PREDICT_JSON = SETTINGS_RECORDS["predict"]  # the settings record (``fileio.check_settings``)


# --- the per-image record ---------------------------------------------------------------------
def image_result(image_id: str, cells: np.ndarray, conf: np.ndarray, *, only_positive: bool = False) -> dict:
    """Per-image record: each cell's mask encoded once, its bbox, area and 19 confidences."""
    return encoded_result(image_id, cells.shape, encode_label_image(cells), conf, only_positive=only_positive)


def encoded_result(image_id: str, shape: tuple[int, int], encoded: list[EncodedCell], conf: np.ndarray, *,
                   only_positive: bool = False) -> dict:
    """``image_result`` from cells already encoded (``conf`` row k-1 belongs to cell id k).
    ``only_positive``: the submission lists a cell's classes of confidence > 0 only (baselines)."""
    cells = [{"cell": e.cell, "bbox": e.bbox, "area": e.area, "mask": e.mask,
              "conf": [round(float(c), 6) for c in conf[e.cell - 1]]} for e in encoded]
    return {"image_id": image_id, "height": int(shape[0]), "width": int(shape[1]), "only_positive": only_positive,
            "cells": cells}


def to_row(result: dict) -> SubmissionRow:
    """A record -> its submission row: one (class, confidence, mask) per cell and class."""
    row = SubmissionRow(result["image_id"], result["width"], result["height"])
    for cell in result["cells"]:
        for c, value in enumerate(cell["conf"]):
            if result["only_positive"] and value <= 0:
                continue
            row.predictions.append((c, value, cell["mask"]))
    return row


class PredictionFolder(OwnedFolder):
    """A prediction folder (``predict``'s OUT); every path of it is named here (module docstring)."""

    @property
    def settings_path(self) -> Path:
        return self.root / PREDICT_JSON

    @property
    def log_path(self) -> Path:
        return self.root / "predict.log"

    @property
    def records_dir(self) -> Path:
        return self.root / "records"

    @property
    def segmentation_dir(self) -> Path:
        return self.root / "segmentation"

    @property
    def submission(self) -> Path:
        return self.root / "submission.csv"

    @property
    def cells_csv(self) -> Path:
        return self.root / "cells.csv"

    def failures_path(self, suffix: str = "") -> Path:
        """failures<suffix>.csv: the images predict skipped (suffix: a shard's, ``data.shard.shard_suffix``)."""
        return self.root / failures_name(suffix)

    # --- records ------------------------------------------------------------------------------
    def record_path(self, image_id: str) -> Path:
        """records/<xx>/<ID>.json: one predicted image (its cells' masks and confidences)."""
        return fanned(self.records_dir, image_id, f"{image_id}.json")

    def has_record(self, image_id: str) -> bool:
        return self.record_path(image_id).is_file()

    def is_finished(self, image_id: str) -> bool:
        """Whether the image's record was finished: it carries a stamp (written after the record)."""
        return sidecar(self.record_path(image_id)).is_file()

    def is_current(self, image_id: str, source: str) -> bool:
        """Whether the image's record was made from the inputs whose stamp is ``source``."""
        return stamped(self.record_path(image_id), source)

    def read_record(self, image_id: str) -> dict:
        return json.loads(self.record_path(image_id).read_text())

    def write_record(self, image_id: str, record: dict, source: str) -> None:
        """The record, then its stamp ``source``: a crash between the two leaves no stamp, and the
        image is made again by the next run."""
        path = self.record_path(image_id)
        unstamp(path)
        write_text_atomic(path, json.dumps(record, separators=(",", ":")))
        stamp(path, source)

    def label_image(self, image_id: str) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """(cell label image uint16 [H, W] at full size, {cell id: float32 [19]}) of one record.

        The record holds every cell's mask, whatever the cell mode or baseline that made it.
        """
        path = self.record_path(image_id)
        if not path.is_file():
            raise FileNotFoundError(f"no prediction record {path}; run predict on this image first")
        record = json.loads(path.read_text())
        cells = np.zeros((record["height"], record["width"]), np.uint16)
        conf = {}
        for cell in record["cells"]:
            cells[decode_mask(cell["mask"], record["height"], record["width"])] = cell["cell"]
            conf[int(cell["cell"])] = np.asarray(cell["conf"], np.float32)
        return cells, conf

    # --- the tables ---------------------------------------------------------------------------
    def write_tables(self, image_ids: Iterable[str]) -> None:
        """submission.csv and cells.csv from the records of ``image_ids``, in that order, each read
        back one at a time (memory holds one image's cells)."""
        image_ids = list(image_ids)

        def ordered() -> Iterator[dict]:
            for image_id in image_ids:
                yield self.read_record(image_id)

        write_submission(self.submission, (to_row(r) for r in ordered()))
        with atomic_path(self.cells_csv, ".csv") as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["ID", "cell", "x0", "y0", "x1", "y1", "area", *[f"conf_{c}" for c in range(NUM_CLASSES)]])
            for r in ordered():
                for cell in r["cells"]:
                    writer.writerow([r["image_id"], cell["cell"], *cell["bbox"], cell["area"], *cell["conf"]])
