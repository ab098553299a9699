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


def mask_rle(text: str, height: int, width: int, where: str = "", check: bool = True) -> dict:
    """The competition's mask text -> a COCO RLE dict (compressed counts), no pixel decoded.
    ``where`` (e.g. the image ID) prefixes the error of a text that is not base64 zlib RLE, or
    (``check``) whose runs do not cover exactly ``height x width`` pixels. ``check=False`` for a
    caller that checks many masks at once with ``check_rles``."""
    prefix = f"{where}: " if where else ""
    try:
        counts = zlib.decompress(base64.b64decode(text, validate=True))
    except (binascii.Error, zlib.error, ValueError) as exc:
        raise ValueError(f"{prefix}mask {text[:24]!r}... is not base64 zlib-compressed RLE: {exc}") from None
    rle = {"size": [int(height), int(width)], "counts": counts}
    if check:
        check_rles([rle], [text], where)
    return rle


def _run_totals(counts: list[bytes]) -> tuple[np.ndarray, np.ndarray] | None:
    """(sum of the runs, smallest run) of every counts string, in a few numpy passes over all of
    them (``rle_runs`` vectorised); None when some string is malformed (``rle_runs`` says how)."""
    lengths = np.fromiter(map(len, counts), np.int64, len(counts))
    if not counts or lengths.min() == 0:
        return None
    c = np.frombuffer(b"".join(counts), np.uint8).astype(np.int64) - 48
    last = (c & 0x20) == 0  # the last character of a number
    if c.min() < 0 or c.max() >= 64 or not last[np.cumsum(lengths) - 1].all():
        return None
    first = np.flatnonzero(np.r_[True, last[:-1]])  # each number's first character
    number = np.cumsum(np.r_[0, last[:-1]])  # character -> its number
    place = np.arange(c.size) - first[number]  # character -> its place in the number
    values = np.add.reduceat((c & 0x1F) << (5 * place), first)
    ends = np.flatnonzero(last)
    negative = (c[ends] & 0x10) != 0
    values[negative] -= np.int64(1) << (5 * (place[ends][negative] + 1))
    mask = np.searchsorted(np.cumsum(lengths), first, side="right")  # number -> its string
    mask_first = np.searchsorted(mask, np.arange(len(counts)))  # string -> its first number
    k = np.arange(values.size) - mask_first[mask]  # place of the number in its string
    runs = values.copy()
    # From the fourth number on, a run is stored as the difference to the run two before: undo
    # that with a cumulative sum per string and parity (odd from k = 1, even from k = 2).
    for chain in ((k % 2 == 1), (k % 2 == 0) & (k >= 2)):
        idx = np.flatnonzero(chain)
        if idx.size:
            total = np.cumsum(values[idx])
            start = np.r_[True, mask[idx][1:] != mask[idx][:-1]]
            offset = (total - values[idx])[start]
            runs[idx] = total - offset[np.cumsum(start) - 1]
    return np.add.reduceat(runs, mask_first), np.minimum.reduceat(runs, mask_first)


def check_rles(rles: list[dict], texts: list[str], where: str = "") -> None:
    """Every RLE's runs must cover exactly its declared height x width, none negative: pycocotools
    reads past the end of a shorter mask (a 128 px mask declared 2048 px hung the metric) and
    scores a longer one. One vectorised pass for all (this runs on every mask the metric reads);
    a failure is then named by reading the masks one by one."""
    sizes = [rle["size"][0] * rle["size"][1] for rle in rles]
    totals = _run_totals([rle["counts"] for rle in rles])
    if totals is not None and (totals[0] == sizes).all() and (totals[1] >= 0).all():
        return
    prefix = f"{where}: " if where else ""
    for rle, text, size in zip(rles, texts, sizes, strict=True):
        try:
            runs = rle_runs(rle["counts"])
        except ValueError as exc:
            raise ValueError(f"{prefix}mask {text[:24]!r}... is not valid COCO RLE: {exc}") from None
        if min(runs, default=0) < 0 or sum(runs) != size:
            covered = sum(runs) if min(runs, default=0) >= 0 else "a negative number of"
            height, width = rle["size"]
            raise ValueError(f"{prefix}mask {text[:24]!r}... covers {covered} pixels but the row declares "
                             f"{height}x{width} = {size}; encode each mask at the image's original size "
                             f"(the row's ImageHeight x ImageWidth)")


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
    # A row holds every cell x label of an image: far past csv's default 128 KiB field limit.
    csv.field_size_limit(2**31 - 1)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:  # a spreadsheet's byte-order mark is not the header
            return _read_rows(path, csv.reader(fh))
    except UnicodeDecodeError as exc:
        raise SubmissionError(f"{path} is not a text CSV (byte {exc.start} is not UTF-8): give the submission or "
                              "solution CSV itself, not a compressed or binary file") from None


def _read_rows(path: Path, reader) -> list[SubmissionRow]:
    rows = []
    header = next(reader, None)
    if header is None:
        raise SubmissionError(f"{path} is empty; expected the header {','.join(HEADER)} and one row per image")
    if tuple(h.strip() for h in header) != HEADER:
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
