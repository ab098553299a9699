"""Reading HPA images: Kaggle and public-HPA layouts, PNG/TIFF/TIFF.GZ/JPEG, 8- and 16-bit.

Every image in the project is a ``uint8`` array ``[C, H, W]`` with channels in the order of
``constants.CHANNELS`` (red, green, blue, yellow), or the first three of them (RGB) on request.

    from hpa_scc.data.images import find_images, read_image
    records = find_images("data/kaggle")           # train.csv + train/<ID>_<channel>.png
    img = read_image(records[0].folder, records[0].image_id, size=512)   # uint8 [4, 512, 512]

Intensity: 8-bit files are used as they are. 16-bit files are scaled by the 16-bit range
(``x * 255 / 65535``), so a 16-bit image and its 8-bit export read the same; the original
implementation divided by 255, which clips every value above 255 to white.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile

from hpa_scc.constants import CHANNELS, LabelError, parse_labels
from hpa_scc.utils.fileio import fanned

log = logging.getLogger(__name__)

# In the order they are tried when several files exist for one channel.
EXTENSIONS: tuple[str, ...] = (".png", ".tif", ".tiff", ".tif.gz", ".tiff.gz", ".jpg", ".jpeg")
_CHANNEL_FILE = re.compile(
    r"^(?P<id>.+)_(?P<channel>red|green|blue|yellow)(?P<ext>\.png|\.tiff?\.gz|\.tiff?|\.jpe?g)$",
    re.IGNORECASE,
)


class ImageReadError(OSError):
    """A channel file that is missing, unreadable or of an unsupported kind; names the file."""


@dataclass(frozen=True)
class ImageRecord:
    """One field of view: its id, the folder holding ``<id>_<channel>.<ext>``, and its labels."""

    image_id: str
    folder: Path
    labels: tuple[int, ...] | None = None  # None when the layout has no label table


def channel_names(channels: str | int = "rgby") -> tuple[str, ...]:
    """``"rgby"``/4 -> all four channels; ``"rgb"``/3 -> red, green, blue."""
    if channels in ("rgby", 4):
        return CHANNELS
    if channels in ("rgb", 3):
        return CHANNELS[:3]
    raise ValueError(f"channels must be 'rgby' (4) or 'rgb' (3), got {channels!r}")


def channel_path(folder: str | os.PathLike, image_id: str, channel: str) -> Path:
    """The file of one channel: ``<folder>/<image_id>_<channel><ext>`` for the first ext found."""
    folder = Path(folder)
    for ext in EXTENSIONS:
        path = folder / f"{image_id}_{channel}{ext}"
        if path.is_file():
            return path
    tried = ", ".join(f"{image_id}_{channel}{ext}" for ext in EXTENSIONS[:1] + EXTENSIONS[1:3])
    raise ImageReadError(
        f"missing channel file {folder / (image_id + '_' + channel + '.png')} "
        f"(looked for {tried}, ... in {folder}); every image needs its red, green, blue and "
        f"yellow files. Restore the file, or drop {image_id!r} from the label table."
    )


def _decode(path: Path) -> np.ndarray:
    name = path.name.lower()
    if name.endswith((".tif.gz", ".tiff.gz", ".tif", ".tiff")):
        try:
            if name.endswith(".gz"):
                with gzip.open(path, "rb") as fh:
                    array = tifffile.imread(io.BytesIO(fh.read()))
            else:
                array = tifffile.imread(path)
        except Exception as exc:  # tifffile/gzip raise many kinds
            raise ImageReadError(f"cannot read {path}: {exc} (file corrupt or truncated? re-download or "
                                 "re-export it)") from None
        # A stack (pages x H x W) is not a channel: read as colour it came out as a 4-pixel-wide image.
        if array.ndim > 2 and not (array.ndim == 3 and array.shape[2] in (3, 4) and array.shape[0] > 4):
            raise ImageReadError(f"{path} holds {array.shape[0]} planes of {'x'.join(map(str, array.shape[1:]))} "
                                 "(a multi-page TIFF or stack); a channel file holds one plane: save each channel "
                                 "as its own <ID>_<channel>.tif")
        return array
    data = np.fromfile(path, dtype=np.uint8)
    array = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if array is None:
        raise ImageReadError(
            f"cannot decode {path} ({data.size} bytes): the file is corrupt, truncated or not an image; "
            "re-download or re-export it"
        )
    if array.ndim == 3:  # OpenCV gives BGR(A); public HPA JPEGs are coloured copies of one channel
        array = array[..., 2::-1] if array.shape[2] >= 3 else array
    return array


# A 16-bit channel whose brightest pixel is below 1 % of the range reads as black (x / 257 < 3):
# most likely 8-bit values saved in a 16-bit file. Warned once per file, and only for the first
# DIM_WARNINGS files (a folder exported wrongly would otherwise repeat it for every image).
DIM_16BIT_MAX = 656
DIM_WARNINGS = 10
_dim_warned: set[str] = set()
_dim_lock = threading.Lock()


def _warn_dim_16bit(array: np.ndarray, source: str | os.PathLike) -> None:
    brightest = int(array.max(initial=0))
    if brightest >= DIM_16BIT_MAX or brightest == 0:  # an all-zero channel is black in any depth
        return
    key = str(source)
    with _dim_lock:
        if key in _dim_warned or len(_dim_warned) >= DIM_WARNINGS:
            return
        _dim_warned.add(key)
        last = len(_dim_warned) == DIM_WARNINGS
    log.warning("%s is 16-bit but its brightest pixel is %d of 65535 (under 1 %% of the range): scaled by the "
                "16-bit range it reads as black and no cell will be found; it was probably written with the wrong "
                "bit depth: save it as 8-bit PNG%s", source or "a 16-bit channel", brightest,
                " (the last such warning: further dim files are not reported)" if last else "")


def to_uint8(array: np.ndarray, *, source: str | os.PathLike = "") -> np.ndarray:
    """Scale a channel to uint8: 8-bit kept, 16-bit by the 16-bit range, float in [0, 1] by 255.

    A 16-bit channel using under 1 % of its range is scaled all the same (it may truly be dark),
    with a warning naming ``source``.
    """
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        _warn_dim_16bit(array, source)
        # Rounded x * 255 / 65535 (= x / 257) in integers: exact and fast.
        return ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int(array.size - np.isfinite(array).sum())
        raise ImageReadError(f"{source}: {bad} of {array.size} pixels are NaN or infinite (non-finite float values); "
                             "re-export the channel as 8- or 16-bit PNG with real intensities")
    if array.dtype.kind == "f" and array.min() >= 0 and array.max() <= 1:
        return np.round(array * 255).astype(np.uint8)
    raise ImageReadError(
        f"{source}: unsupported pixel type {array.dtype} (range {array.min()}..{array.max()}); "
        "expected 8-bit or 16-bit unsigned integers, or floats in [0, 1]. Convert the file to 8- or 16-bit PNG."
    )


def read_channel(path: str | os.PathLike, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """One channel file -> uint8 [H, W], resized to ``size`` (int = square, or (H, W)) if given."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"missing channel file {path}")
    array = _decode(path)
    if array.ndim == 3:
        # A coloured copy of one channel (public HPA JPEGs: the yellow one is red + green):
        # the brightest colour component is the signal. Alpha is ignored.
        array = array[..., :3].max(axis=2)
    if array.ndim != 2:
        raise ImageReadError(f"{path}: expected a 2-D channel image, got shape {array.shape}")
    array = to_uint8(array, source=path)
    return resize(array, size) if size is not None else array


def resize(array: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a 2-D image; area averaging when shrinking (no aliasing of thin filaments)."""
    height, width = (size, size) if isinstance(size, int) else size
    if array.shape == (height, width):
        return array
    shrink = height < array.shape[0] or width < array.shape[1]
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(array, (width, height), interpolation=interp)


def read_image(folder: str | os.PathLike, image_id: str, *, size: int | tuple[int, int] | None = None,
               channels: str | int = "rgby") -> np.ndarray:
    """Read one field of view -> uint8 [C, H, W] (C = 4 for RGBY, 3 for RGB), at ``size`` if given.

    Raises ImageReadError naming the file when a channel is missing, unreadable, of an
    unsupported bit depth, or of a different size than the others.
    """
    names = channel_names(channels)
    planes = []
    shape = None
    for channel in names:
        path = channel_path(folder, image_id, channel)
        plane = read_channel(path)
        if shape is None:
            shape, first = plane.shape, path
        elif plane.shape != shape:
            raise ImageReadError(
                f"{path} is {plane.shape[1]}x{plane.shape[0]} but {first.name} is {shape[1]}x{shape[0]}; "
                "the four channels of an image must have one size"
            )
        planes.append(resize(plane, size) if size is not None else plane)
    return np.stack(planes)


def scan_folder(folder: str | os.PathLike) -> dict[str, set[str]]:
    """{image id: channels present} for every ``<id>_<channel>.<ext>`` file in ``folder``."""
    found: dict[str, set[str]] = {}
    for entry in os.scandir(folder):
        match = _CHANNEL_FILE.match(entry.name)
        if match and entry.is_file():
            found.setdefault(match["id"], set()).add(match["channel"].lower())
    return found


def table_rows(fh) -> csv.DictReader:
    """A CSV reader as spreadsheets write tables: a UTF-8 byte-order mark is dropped (open the file
    with ``encoding="utf-8-sig"``) and the header's names are stripped (``ID , Label``)."""
    reader = csv.DictReader(fh)
    reader.fieldnames = [name.strip() for name in reader.fieldnames or ()]
    return reader


def read_label_table(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """``ID,Label`` CSV (Kaggle train.csv) -> {ID: labels}; bad rows raise naming file and row."""
    path = Path(path)
    table: dict[str, tuple[int, ...]] = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = table_rows(fh)
        missing = {"ID", "Label"} - set(reader.fieldnames or ())
        if missing:
            raise LabelError(f"{path}: missing column(s) {sorted(missing)}; expected a header 'ID,Label'")
        for row_no, row in enumerate(reader, start=2):
            image_id = (row["ID"] or "").strip()
            where = f"{path} line {row_no} (ID {image_id})"
            if not image_id:
                raise LabelError(f"{where}: empty ID")
            check_image_id(image_id, where)
            if image_id in table:
                raise LabelError(f"{where}: ID listed twice")
            table[image_id] = tuple(parse_labels(row["Label"] or "", where=where))
    return table


def find_images(data_dir: str | os.PathLike, labels_csv: str | os.PathLike | None = None) -> list[ImageRecord]:
    """Every image of a data folder, in a stable order.

    Layouts understood:
    - Kaggle: ``DATA_DIR/train.csv`` and ``DATA_DIR/train/<ID>_<channel>.png``; images come
      from the table (a listed image with a missing file fails later, when read, naming it);
    - any folder of ``<ID>_<channel>.<ext>`` files (Kaggle ``test/``, public HPA downloads),
      ``DATA_DIR`` itself or its ``train/``/``test/`` sub-folder; labels from ``labels_csv``
      when given, else none.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder {data_dir} does not exist")
    if labels_csv and not Path(labels_csv).is_file():  # else the folder would be read as unlabelled
        raise FileNotFoundError(f"label table {labels_csv} (--labels) not found; give an ID,Label CSV, or leave "
                                f"--labels out to use {data_dir / 'train.csv'}")
    table_path = Path(labels_csv) if labels_csv else data_dir / "train.csv"
    image_dir = data_dir / "train" if (data_dir / "train").is_dir() else data_dir
    if table_path.is_file():
        table = read_label_table(table_path)
        return [ImageRecord(i, image_dir, labels) for i, labels in table.items()]
    for candidate in (data_dir, data_dir / "train", data_dir / "test"):
        if candidate.is_dir() and (found := scan_folder(candidate)):
            return [ImageRecord(i, candidate, None) for i in sorted(found)]
    raise FileNotFoundError(
        f"no HPA images in {data_dir}: expected train.csv with train/<ID>_red.png etc. (Kaggle layout) "
        "or files named <ID>_{red,green,blue,yellow}.{png,tif,tif.gz,jpg}"
    )


def seg_paths(seg_dir: Path, image_id: str, fanout: bool = False) -> tuple[Path, Path]:
    """(nuclei, cells) label image paths: flat in ``seg_dir`` (the ``segment`` command's output, read by
    other tools), or in its hashed sub-folder (``fileio.fanned``: a prepared set's or predict's)."""
    return (fanned(seg_dir, image_id, f"{image_id}_nuclei.png", fanout),
            fanned(seg_dir, image_id, f"{image_id}_cells.png", fanout))


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """A label image (.png 8/16-bit or .npz with arr_0) -> uint16 [H, W]."""
    path = Path(path)
    if path.suffix == ".npz":
        try:
            with np.load(path) as data:
                labels = data["arr_0"]
        except (OSError, ValueError, KeyError) as exc:
            raise ImageReadError(f"cannot read label image {path}: {exc} (an .npz needs the labels as arr_0)") from None
    else:
        labels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if labels is None:
            raise ImageReadError(f"cannot decode label image {path}: corrupt or not a PNG")
    if labels.ndim != 2 or labels.dtype.kind not in "ui" or labels.max(initial=0) > 65535:
        raise ImageReadError(f"{path}: expected a 2-D integer label image with ids <= 65535, "
                             f"got {labels.dtype} {labels.shape}")
    return labels.astype(np.uint16)


def image_stamp(record: ImageRecord, channels: str | int = "rgby", **extra) -> str:
    """What an image's outputs are made from (``utils.provenance``): its channel files' names,
    sizes and modification times, plus ``extra`` (labels, where an output copies them). A missing
    channel raises ImageReadError naming it, as reading the image would."""
    from hpa_scc.utils.provenance import sources_stamp

    return sources_stamp((channel_path(record.folder, record.image_id, c) for c in channel_names(channels)), **extra)


def check_image_id(image_id: str, where: str) -> None:
    """An ID becomes part of file names (``<ID>_red.png``, ``records/<xx>/<ID>.json``): one with a
    path separator, ``..`` or NUL would read or write outside the folders (``../../x``)."""
    if any(bad in image_id for bad in ("/", "\\", "\0", "..")) or image_id == ".":
        raise LabelError(f"{where}: the ID {image_id!r} holds a path separator, '..' or NUL, which would name "
                         "files outside the data and output folders; rename the image and its row")
