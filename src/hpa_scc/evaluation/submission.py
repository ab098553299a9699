"""The Kaggle submission format: masks as COCO RLE, zlib level 9, base64 text.

A row is ``ID,ImageWidth,ImageHeight,PredictionString`` where the string holds
space-separated ``label confidence mask`` triples; a mask with several labels is repeated
once per label, at the original image size.
"""

from __future__ import annotations

import base64
import binascii
import csv
import os
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as coco_mask

from hpa_scc.constants import check_label
from hpa_scc.utils.fileio import atomic_path

HEADER = ("ID", "ImageWidth", "ImageHeight", "PredictionString")


class SubmissionError(ValueError):
    """A malformed submission row; the message names the file and row."""


def encode_mask(mask: np.ndarray) -> str:
    """2-D bool mask [H,W] -> the competition's text (COCO RLE counts, zlib 9, base64)."""
    mask = np.squeeze(np.asarray(mask))
    if mask.ndim != 2:
        raise ValueError(f"encode_mask needs a 2-D mask, got shape {mask.shape}")
    fortran = np.asfortranarray(mask.astype(np.uint8)[:, :, None])
    return _text(coco_mask.encode(fortran)[0]["counts"])


def _text(counts: bytes) -> str:
    return base64.b64encode(zlib.compress(counts, zlib.Z_BEST_COMPRESSION)).decode("ascii")


@dataclass
class EncodedCell:
    """One cell of a label image: its id, bbox (x0, y0, x1, y1; exclusive ends), area and mask text."""

    cell: int
    bbox: list[int]
    area: int
    mask: str


def encode_label_image(cells: np.ndarray) -> list[EncodedCell]:
    """Every cell of a label image [H, W] (0 = background) encoded once, as ``encode_mask`` would.

    Works on each cell's full-height column strip, not a full-size mask per cell: COCO RLE runs
    down columns, so the strip's runs are the image's runs shifted by the columns before it.
    At 2048 px this is ~50x faster than encoding full-size masks, and the text is identical.
    """
    from scipy import ndimage

    cells = np.asarray(cells)
    if cells.ndim != 2:
        raise ValueError(f"encode_label_image needs a 2-D label image, got shape {cells.shape}")
    height, width = cells.shape
    out = []
    for k, box in enumerate(ndimage.find_objects(cells.astype(np.int32, copy=False)), start=1):
        if box is None:
            continue  # an id with no pixel
        rows, cols = box
        strip = np.ascontiguousarray((cells[:, cols] == k).T).ravel()  # column-major order of the strip
        change = np.flatnonzero(strip[1:] != strip[:-1]) + 1
        runs = np.diff(np.concatenate([[0], change, [strip.size]])).tolist()
        if strip[0]:
            runs.insert(0, 0)  # RLE counts start with a run of zeros
        runs[0] += cols.start * height  # the all-zero columns before the strip
        after = (width - cols.stop) * height
        if after:
            if len(runs) % 2:  # the strip ends in zeros: extend that run
                runs[-1] += after
            else:
                runs.append(after)
        rle = coco_mask.frPyObjects({"counts": runs, "size": [height, width]}, height, width)
        out.append(EncodedCell(k, [cols.start, rows.start, cols.stop, rows.stop], int(coco_mask.area(rle)),
                               _text(rle["counts"])))
    return out


def rle_runs(counts: bytes) -> list[int]:
    """COCO's compressed RLE counts -> the run lengths (background first), read as pycocotools
    reads them (6 bits a character, the last runs delta-coded against the one two before)."""
    runs: list[int] = []
    pos, n = 0, len(counts)
    while pos < n:
        value, shift, more = 0, 0, True
        while more:
            if pos >= n:
                raise ValueError("the RLE counts end inside a number")
            c = counts[pos] - 48
            if not 0 <= c < 64:
                raise ValueError(f"the RLE counts hold a byte {counts[pos]!r} outside COCO's alphabet")
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            pos += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def mask_rle(text: str, height: int, width: int, where: str = "") -> dict:
    """The competition's mask text -> a COCO RLE dict (compressed counts), no pixel decoded.
    ``where`` (e.g. the image ID) prefixes the error of a text that is not base64 zlib RLE, or
    whose runs do not cover exactly ``height x width`` pixels: pycocotools would read past the
    end of a shorter mask (a 128 px mask declared 2048 px hung the metric) and score a longer one."""
    prefix = f"{where}: " if where else ""
    try:
        counts = zlib.decompress(base64.b64decode(text, validate=True))
    except (binascii.Error, zlib.error, ValueError) as exc:
        raise ValueError(f"{prefix}mask {text[:24]!r}... is not base64 zlib-compressed RLE: {exc}") from None
    try:
        runs = rle_runs(counts)
    except ValueError as exc:
        raise ValueError(f"{prefix}mask {text[:24]!r}... is not valid COCO RLE: {exc}") from None
    if any(r < 0 for r in runs) or sum(runs) != height * width:
        covered = sum(runs) if all(r >= 0 for r in runs) else "a negative number of"
        raise ValueError(f"{prefix}mask {text[:24]!r}... covers {covered} pixels but the row declares "
                         f"{height}x{width} = {height * width}; encode each mask at the image's original size "
                         f"(the row's ImageHeight x ImageWidth)")
    return {"size": [int(height), int(width)], "counts": counts}


def decode_mask(text: str, height: int, width: int) -> np.ndarray:
    """The competition's mask text -> bool [height, width]."""
    rle = mask_rle(text, height, width)
    try:
        area = int(coco_mask.area(rle))
    except Exception as exc:  # pycocotools raises bare Exceptions on bad RLE
        raise ValueError(f"mask {text[:24]!r}... is not valid COCO RLE: {exc}") from None
    if area > height * width:
        raise ValueError(f"mask {text[:24]!r}... covers {area} pixels, more than {height}x{width}")
    return coco_mask.decode(rle).astype(bool)


@dataclass
class SubmissionRow:
    """One image: (label, confidence, encoded mask) triples at the image's original size."""

    image_id: str
    width: int
    height: int
    predictions: list[tuple[int, float, str]] = field(default_factory=list)

    def prediction_string(self) -> str:
        return " ".join(f"{label} {conf:.6g} {mask}" for label, conf, mask in self.predictions)


def cells_to_row(image_id: str, cell_labels: np.ndarray, labels_per_cell: dict[int, Iterable[int]],
                 confidence: dict[int, Iterable[float]] | None = None) -> SubmissionRow:
    """Label image [H,W] (0 background) + {cell id: labels} -> a row; each cell encoded once."""
    height, width = cell_labels.shape
    row = SubmissionRow(image_id, int(width), int(height))
    texts = {e.cell: e.mask for e in encode_label_image(cell_labels)}
    for cell_id, labels in labels_per_cell.items():
        text = texts.get(cell_id) or encode_mask(cell_labels == cell_id)
        labels = list(labels)
        confs = list(confidence[cell_id]) if confidence is not None else [1.0] * len(labels)
        for label, conf in zip(labels, confs, strict=True):
            row.predictions.append((check_label(label), float(conf), text))
    return row


def write_submission(path: str | os.PathLike, rows: Iterable[SubmissionRow]) -> None:
    """Write rows as a submission CSV, atomically."""
    with atomic_path(path, ".csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(HEADER)
        for row in rows:
            writer.writerow([row.image_id, row.width, row.height, row.prediction_string()])


def read_submission(path: str | os.PathLike) -> list[SubmissionRow]:
    """Parse a submission CSV; malformed rows raise SubmissionError naming the file and row."""
    path = Path(path)
    rows = []
    # A row holds every cell x label of an image: far past csv's default 128 KiB field limit.
    csv.field_size_limit(2**31 - 1)
    with open(path, newline="", encoding="utf-8-sig") as fh:  # a spreadsheet's byte-order mark is not the header
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != HEADER:
            raise SubmissionError(f"{path}: header is {header}, expected {','.join(HEADER)}")
        for line_no, rec in enumerate(reader, start=2):
            where = f"{path} line {line_no}"
            if len(rec) != 4:
                raise SubmissionError(f"{where}: expected 4 columns, got {len(rec)}")
            image_id, width, height, text = rec
            try:
                row = SubmissionRow(image_id, int(width), int(height))
            except ValueError:
                raise SubmissionError(f"{where} (ID {image_id}): width/height {width!r}/{height!r} are not integers") from None
            tokens = text.split()
            if len(tokens) % 3:
                raise SubmissionError(f"{where} (ID {image_id}): {len(tokens)} tokens, not label/confidence/mask triples")
            for i in range(0, len(tokens), 3):
                try:
                    label = check_label(int(tokens[i]))
                    conf = float(tokens[i + 1])
                except ValueError as exc:
                    raise SubmissionError(f"{where} (ID {image_id}), triple {i // 3}: {exc}") from None
                row.predictions.append((label, conf, tokens[i + 2]))
            rows.append(row)
    return rows
