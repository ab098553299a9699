"""Public HPA images: download the fields of view of ``kaggle_2021.tsv``, convert them to PNG, merge tables.

    python -m hpa_scc download-public kaggle_2021.tsv data/public --exclude-train --cell-lines kaggle --workers 8
    python -m hpa_scc download-public kaggle_2021.tsv data/rare --labels 11 15 --size 1024 --bits 8
    python -m hpa_scc merge-tables data/kaggle/train.csv data/public/train.csv --out data/merged.csv
    python -m hpa_scc split data/merged.csv --folds 5 --out data/folds.csv

The table (the competition's ``kaggle_2021.tsv``; despite its name it is comma-separated, and a
tab-separated copy reads too) has one row per field of view:

    Image        URL prefix, e.g. https://images.proteinatlas.org/10580/1758_B1_1; the channel
                 files are <prefix>_{red,green,blue,yellow}.tif.gz
    Label        HPA location names joined by ',' (quoted), e.g. "Nucleoplasm,Cytosol"
    Cellline     e.g. U-2 OS (needed by --cell-lines)
    in_trainset  True for the images that are already in the Kaggle training set (needed by --exclude-train)
    Label_idx    optional: class indices joined by '|' (the organisers' own mapping of Label)

Labels: each name maps to one of the 19 classes (``HPA_LOCATION_TO_CLASS``; the class names
themselves, plus Focal adhesion sites -> Actin filaments, Centriolar satellite -> Centrosome,
Cell Junctions -> Plasma membrane, Peroxisomes/Endosomes/Lysosomes/Lipid droplets/Cytoplasmic
bodies -> Vesicles, No staining -> Negative; case is ignored). Names outside the competition
(e.g. Midbody) are counted and reported, and dropped. ``Label_idx`` is used for a row only when
its names give no class; a row with neither is skipped (counted). Decided so because the names
are what HPA publishes, and Label_idx is only a derived column that some copies lack.

Image ids: the last two components of the URL path joined by '_' (``10580_1758_B1_1``: antibody
folder and plate_well_field), which is unique across HPA; the first row wins when an id repeats.

OUT_DIR takes the Kaggle layout, so it is a DATA_DIR for ``cache`` and ``prepare``:
    train/<ID>_<color>.png  each channel as PNG: the file's bit depth (16-bit kept) or 8-bit with
                            --bits 8 (x * 255 / 65535, as images.to_uint8), resized with --size
    train.csv               ID,Label,source,Cellline,Image: the selected images whose four PNGs
                            exist (this run's and earlier runs'), in table order
    failures.csv            ID,url,reason: the images that failed in this run
    download.json           --bits and --size of the folder; other settings are refused

Each request has a timeout (seconds without data), is retried with exponential backoff
(``backoff_s * 2**attempt``) unless the server answered 400/401/403/404/410, and counts only
when the bytes received equal the Content-Length, the gzip stream ends with a valid CRC-32 and
length (a cut file fails here) and the TIFF decodes. Every PNG is written atomically, so
re-running the same command resumes: channels already written are skipped, and an image whose
four PNGs exist makes no request at all. A channel fetched by a rerun must have the size of the
channels already written, as in one run. When every image a run tried failed (the server down)
the report says so (``DownloadReport.all_failed``) and the command exits 1.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import http.client
import io
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
from tqdm import tqdm

from hpa_scc import __version__
from hpa_scc.constants import (
    CHANNELS,
    CLASS_NAMES,
    NEGATIVE,
    LabelError,
    check_label,
    format_labels,
    parse_labels,
)
from hpa_scc.utils.fileio import atomic_path, write_png_atomic, write_text_atomic
from hpa_scc.data.images import ImageReadError, check_image_id, read_label_table, resize, table_rows, to_uint8
from hpa_scc.utils.pool import write_failures

log = logging.getLogger(__name__)

SOURCE = "hpa_public"  # the `source` value of downloaded images in train.csv and merged tables
KAGGLE_SOURCE = "kaggle"

# HPA subcellular location name -> class index. The 19 class names map to themselves, except
# "Vesicles and punctate cytosolic patterns", which HPA calls "Vesicles".
HPA_LOCATION_TO_CLASS: dict[str, int] = {
    **{name: i for i, name in enumerate(CLASS_NAMES)},
    "Focal adhesion sites": 9,  # Actin filaments
    "Centriolar satellite": 12,  # Centrosome
    "Cell Junctions": 13,  # Plasma membrane
    "Vesicles": 17,
    "Peroxisomes": 17,
    "Endosomes": 17,
    "Lysosomes": 17,
    "Lipid droplets": 17,
    "Cytoplasmic bodies": 17,
    "No staining": 18,  # Negative
}
_BY_FOLDED_NAME = {name.casefold(): idx for name, idx in HPA_LOCATION_TO_CLASS.items()}

# The 17 cell lines of the Kaggle 2021 images (what the top teams kept); --cell-lines kaggle.
KAGGLE_CELL_LINES: tuple[str, ...] = (
    "A-431", "A549", "EFO-21", "HAP1", "HEK 293", "HUVEC TERT2", "HaCaT", "HeLa", "PC-3", "RH-30",
    "RPTEC TERT1", "SH-SY5Y", "SK-MEL-30", "SiHa", "U-2 OS", "U-251 MG", "hTCEpi",
)
TABLE_COLUMNS = ("Image", "Label", "Cellline", "in_trainset", "Label_idx")
PERMANENT_HTTP_CODES = frozenset({400, 401, 403, 404, 410})  # retrying cannot help
_TRUE, _FALSE = {"true", "1", "yes", "t", "y"}, {"false", "0", "no", "f", "n", ""}


# ---------------------------------------------------------------- labels and the table

def map_location_names(text: str) -> tuple[list[int], list[str]]:
    """``"Nucleoplasm,Cytosol,Midbody"`` -> ``([0, 16], ["Midbody"])``: classes (order kept,
    duplicates dropped) and the names that are not one of the 19 classes."""
    classes: list[int] = []
    unknown: list[str] = []
    for name in str(text).split(","):
        name = name.strip()
        if not name:
            continue
        idx = _BY_FOLDED_NAME.get(name.casefold())
        if idx is None:
            unknown.append(name)
        elif idx not in classes:
            classes.append(idx)
    return classes, unknown


def parse_class(token: str | int) -> int:
    """A class given by index (``"11"``) or by name (``"Mitotic spindle"``, ``"Vesicles"``) -> index."""
    text = str(token).strip()
    if text.isdigit():
        return check_label(int(text))
    idx = _BY_FOLDED_NAME.get(text.casefold())
    if idx is None:
        raise LabelError(f"unknown class {text!r}; give an index 0-18 or a name, e.g. 11 or 'Mitotic spindle'")
    return idx


def image_id_from_url(prefix: str) -> str:
    """``https://images.proteinatlas.org/10580/1758_B1_1`` -> ``10580_1758_B1_1`` (last two path parts)."""
    parts = [p for p in urllib.parse.urlsplit(prefix.strip()).path.split("/") if p]
    if not parts:
        raise ValueError(f"Image {prefix!r} has no path; expected a URL prefix like "
                         "https://images.proteinatlas.org/10580/1758_B1_1")
    image_id = "_".join(parts[-2:])
    check_image_id(image_id, f"Image {prefix!r}")  # it names the files written
    return image_id


def channel_url(prefix: str, channel: str, base_url: str | None = None) -> str:
    """The URL of one channel file, ``<prefix>_<channel>.tif.gz``; ``base_url`` replaces the
    prefix's scheme and host (a mirror): ``http://mirror/hpa`` + ``/10580/1758_B1_1``."""
    prefix = prefix.strip()
    if base_url:
        path = urllib.parse.urlsplit(prefix).path
        prefix = base_url.rstrip("/") + "/" + path.lstrip("/")
    return f"{prefix}_{channel}.tif.gz"


@dataclass(frozen=True)
class PublicImage:
    """One row of the public table: a field of view to download."""

    image_id: str
    url_prefix: str
    labels: tuple[int, ...]
    cell_line: str = ""
    in_trainset: bool = False


@dataclass
class TableReport:
    """What reading and filtering the table kept and dropped, and why."""

    path: Path
    rows: int = 0
    unknown_names: Counter = field(default_factory=Counter)  # name -> rows it occurs in
    from_label_idx: int = 0  # rows labelled from Label_idx (their names gave no class)
    no_class: int = 0  # rows dropped: no name of the 19 classes and no Label_idx
    duplicates: int = 0  # rows dropped: their image id was listed before
    negative_dropped: int = 0  # rows whose "No staining" came with other locations: Negative left out
    dropped_by: dict[str, int] = field(default_factory=dict)  # filter -> rows it dropped
    selected: int = 0

    def summary(self) -> str:
        lines = [f"table {self.path}: {self.rows} rows, {self.selected} selected"]
        if self.from_label_idx:
            lines.append(f"  {self.from_label_idx} rows labelled from Label_idx (no known name in Label)")
        if self.no_class:
            lines.append(f"  {self.no_class} rows skipped: no location among the 19 classes")
        if self.duplicates:
            lines.append(f"  {self.duplicates} rows skipped: image id listed twice (first row kept)")
        if self.negative_dropped:
            lines.append(f"  {self.negative_dropped} rows name 'No staining' with other locations: "
                         "labelled with the others (Negative excludes every other class)")
        for name, n in self.dropped_by.items():
            lines.append(f"  {n} rows dropped by {name}")
        if self.unknown_names:
            top = ", ".join(f"{name} ({n})" for name, n in self.unknown_names.most_common(8))
            more = len(self.unknown_names) - 8
            lines.append(f"  {sum(self.unknown_names.values())} location names outside the 19 classes, "
                         f"ignored: {top}" + (f" and {more} more" if more > 0 else ""))
        return "\n".join(lines)


def _parse_bool(text: str, where: str) -> bool:
    value = str(text).strip().casefold()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{where}: in_trainset {text!r} is not True or False")


def _parse_label_idx(text: str, where: str) -> list[int]:
    """``"0|16"`` (also ``"0,16"``, ``"[0, 16]"``, ``"5.0"`` from a float column) -> ``[0, 16]``."""
    text = str(text).strip().strip("[]")
    if not text or text.casefold() == "nan":
        return []
    tokens = text.replace(",", "|").replace(" ", "|").split("|")
    cleaned = [t.removesuffix(".0") for t in tokens if t]
    return parse_labels("|".join(cleaned), where=f"{where} column Label_idx")


def read_public_table(path: str | os.PathLike) -> tuple[list[PublicImage], TableReport]:
    """Read ``kaggle_2021.tsv`` (comma- or tab-separated) -> its images with mapped labels.

    Raises FileNotFoundError naming the file, ValueError naming a missing column or a bad row.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"public table {path} not found; it is the competition's kaggle_2021.tsv "
                                f"(columns {', '.join(TABLE_COLUMNS)})")
    report = TableReport(path)
    images: list[PublicImage] = []
    seen: set[str] = set()
    with open(path, newline="", encoding="utf-8-sig") as fh:
        header = fh.readline()
        fh.seek(0)
        reader = csv.DictReader(fh, delimiter="\t" if "\t" in header else ",")
        columns = [c.strip() for c in reader.fieldnames or ()]
        reader.fieldnames = columns
        if "Image" not in columns:
            raise ValueError(f"{path}: missing column 'Image' (found: {', '.join(columns) or 'none'}); "
                             f"expected the columns of kaggle_2021.tsv: {', '.join(TABLE_COLUMNS)}")
        if "Label" not in columns and "Label_idx" not in columns:
            raise ValueError(f"{path}: missing column 'Label' (found: {', '.join(columns)}); "
                             "labels come from 'Label' (HPA location names) or 'Label_idx' (class indices)")
        for line_no, row in enumerate(reader, start=2):
            report.rows += 1
            where = f"{path} line {line_no}"
            prefix = (row.get("Image") or "").strip()
            if not prefix:
                raise ValueError(f"{where}: empty Image (URL prefix)")
            classes, unknown = map_location_names(row.get("Label") or "")
            report.unknown_names.update(unknown)
            if NEGATIVE in classes and len(classes) > 1:  # HPA's names allow it, the 19 classes do not
                classes = [c for c in classes if c != NEGATIVE]
                report.negative_dropped += 1
            if not classes and (row.get("Label_idx") or "").strip():
                classes = _parse_label_idx(row["Label_idx"], where)
                report.from_label_idx += bool(classes)
            if not classes:
                report.no_class += 1
                continue
            image_id = image_id_from_url(prefix)
            if image_id in seen:
                report.duplicates += 1
                continue
            seen.add(image_id)
            in_trainset = _parse_bool(row.get("in_trainset") or "", where) if "in_trainset" in columns else False
            images.append(PublicImage(image_id, prefix, tuple(classes), (row.get("Cellline") or "").strip(),
                                      in_trainset))
    report.selected = len(images)
    return images, report


def filter_images(images: Sequence[PublicImage], report: TableReport, *, labels: Iterable[int | str] | None = None,
                  cell_lines: Iterable[str] | None = None, exclude_train: bool = False,
                  columns: Iterable[str] | None = None) -> list[PublicImage]:
    """Keep the images with at least one of ``labels``, of one of ``cell_lines`` ('kaggle' = the 17
    competition lines), and (``exclude_train``) not already in the Kaggle training set.

    ``columns`` (the table's, when known) lets a filter whose column is missing fail naming it.
    """
    columns = set(columns) if columns is not None else None
    out = list(images)
    report.dropped_by = {}  # describes this selection

    def apply(name: str, keep: Callable[[PublicImage], bool], column: str | None) -> None:
        nonlocal out
        if column is not None and columns is not None and column not in columns:
            raise ValueError(f"{report.path}: {name} needs the column {column!r}, which the table lacks "
                             f"(found: {', '.join(sorted(columns))})")
        kept = [img for img in out if keep(img)]
        report.dropped_by[name] = len(out) - len(kept)
        out = kept

    if exclude_train:
        apply("--exclude-train", lambda img: not img.in_trainset, "in_trainset")
    if cell_lines:
        wanted = set()
        for item in cell_lines:
            for name in str(item).split(","):
                name = name.strip()
                wanted |= {c.casefold() for c in KAGGLE_CELL_LINES} if name.casefold() == "kaggle" else {name.casefold()}
        wanted.discard("")
        apply("--cell-lines", lambda img: img.cell_line.casefold() in wanted, "Cellline")
    if labels:
        classes = {parse_class(tok) for item in labels for tok in str(item).split(",") if tok.strip()}
        apply("--labels", lambda img: bool(classes & set(img.labels)), None)
    report.selected = len(out)
    return out


def _table_columns(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        header = fh.readline()
    return [c.strip() for c in next(csv.reader([header], delimiter="\t" if "\t" in header else ","))]


# ---------------------------------------------------------------- one request, one image

class DownloadError(OSError):
    """A channel that could not be fetched or decoded; ``permanent`` when retrying cannot help."""

    def __init__(self, reason: str, *, permanent: bool = False):
        super().__init__(reason)
        self.permanent = permanent


class Interrupted(Exception):
    """The run is stopping (Ctrl-C or an error elsewhere); raised inside workers."""


def fetch(url: str, *, timeout_s: float, stop: threading.Event | None = None) -> bytes:
    """GET ``url`` -> its bytes, checked against Content-Length. Raises DownloadError saying why."""
    request = urllib.request.Request(url, headers={"User-Agent": f"hpa_scc/{__version__}"})
    expected = None
    chunks: list[bytes] = []
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            expected = response.headers.get("Content-Length")
            while chunk := response.read(1 << 20):
                if stop is not None and stop.is_set():
                    raise Interrupted
                chunks.append(chunk)
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"HTTP {exc.code} {exc.reason}", permanent=exc.code in PERMANENT_HTTP_CODES) from None
    except TimeoutError:
        raise DownloadError(f"timed out ({timeout_s:g} s without data)") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise DownloadError(f"timed out ({timeout_s:g} s without data)") from None
        raise DownloadError(f"connection failed: {exc.reason}") from None
    except http.client.IncompleteRead as exc:
        raise DownloadError(f"truncated: received {len(exc.partial)} bytes, connection closed") from None
    except (http.client.HTTPException, OSError) as exc:
        raise DownloadError(f"connection error: {type(exc).__name__}: {exc}") from None
    data = b"".join(chunks)
    # http.client's read(n) returns b"" when the server closes early: compare the length ourselves.
    if expected is not None and expected.strip().isdigit() and len(data) != int(expected):
        raise DownloadError(f"truncated: received {len(data)} of {int(expected)} bytes (Content-Length)")
    return data


def decode_tif_gz(data: bytes) -> np.ndarray:
    """``.tif.gz`` bytes -> a 2-D array at its own bit depth; DownloadError if cut or corrupt.

    gzip checks the whole stream (a truncated file has no end-of-stream marker; a damaged one
    fails the CRC-32). A colour TIFF (H, W, 3|4) becomes its brightest component, as
    images.read_channel does for HPA's coloured copies of one channel.
    """
    try:
        raw = gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DownloadError(f"corrupt gzip ({len(data)} bytes): {exc}") from None
    try:
        array = tifffile.imread(io.BytesIO(raw))
    except Exception as exc:  # noqa: BLE001 - tifffile raises many kinds
        raise DownloadError(f"corrupt TIFF: {type(exc).__name__}: {exc}") from None
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        array = array[..., :3].max(axis=2)
    if array.ndim != 2:
        raise DownloadError(f"expected a 2-D channel image, got shape {array.shape}", permanent=True)
    return array


def convert(array: np.ndarray, *, bits: str = "native", size: int | None = None,
            source: str = "downloaded channel") -> np.ndarray:
    """The PNG to write: resized to ``size`` (area averaging when shrinking), then 8-bit if asked.

    ``bits="native"`` keeps uint8 and uint16 as they are; ``"8"`` scales 16-bit by the 16-bit
    range, like images.to_uint8. Resizing comes first, so it averages the full-depth values.
    ``source`` (the URL) names the channel in to_uint8's warnings and errors.
    """
    if size is not None:
        array = resize(array, size)
    if bits == "8" or array.dtype not in (np.uint8, np.uint16):
        array = to_uint8(array, source=source)
    return array


def channel_png(out_dir: str | os.PathLike, image_id: str, channel: str) -> Path:
    return Path(out_dir) / "train" / f"{image_id}_{channel}.png"


def is_complete(out_dir: str | os.PathLike, image_id: str) -> bool:
    """True when all four PNGs of the image exist (each was written atomically)."""
    return all(channel_png(out_dir, image_id, c).is_file() for c in CHANNELS)


@dataclass(frozen=True)
class DownloadOptions:
    """How each image is fetched and written; declared once, with the CLI's defaults."""

    bits: str = "native"  # "native": the file's depth (16-bit kept); "8": scaled to uint8
    size: int | None = None  # PNG width and height in px; None keeps the original size
    timeout_s: float = 60.0  # seconds without data before a request is abandoned
    retries: int = 3  # further attempts after a failed one (not after 400/401/403/404/410)
    backoff_s: float = 1.0  # wait before retry k (0-based): backoff_s * 2**k
    base_url: str | None = None  # replaces the scheme and host of every Image prefix (a mirror)


def png_shape(path: Path) -> tuple[int, int]:
    """(height, width) of a PNG from its header (IHDR), without decoding the pixels."""
    with open(path, "rb") as fh:
        head = fh.read(24)
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ImageReadError(f"{path} is not a PNG (no IHDR header); delete it and run again to fetch it anew")
    return int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big")


def _shapes_on_disk(image: PublicImage, out_dir: str | os.PathLike, options: DownloadOptions,
                    stop: threading.Event | None, known: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The original size of each channel PNG of ``image`` that is on disk but not in ``known`` (the
    partial record): the PNG's own size, or with --size (PNGs resized) the size of the file fetched
    again. Needed when a finished image lost a channel (its record was dropped when it was complete)
    or a folder was written before records were kept: else the channel fetched now is compared with nothing."""
    shapes = {}
    for channel in CHANNELS:
        target = channel_png(out_dir, image.image_id, channel)
        if channel in known or not target.is_file():
            continue
        if options.size is None:
            shapes[channel] = png_shape(target)
        else:  # rare: costs one more download of a channel already written
            shapes[channel] = tuple(fetch_channel(channel_url(image.url_prefix, channel, options.base_url),
                                                  options, stop).shape)
    return shapes


def fetch_channel(url: str, options: DownloadOptions, stop: threading.Event | None = None) -> np.ndarray:
    """Fetch and decode one channel, retrying transient failures with exponential backoff."""
    attempts = options.retries + 1
    for attempt in range(attempts):
        if stop is not None and stop.is_set():
            raise Interrupted
        try:
            return decode_tif_gz(fetch(url, timeout_s=options.timeout_s, stop=stop))
        except DownloadError as exc:
            if exc.permanent:
                raise
            if attempt == attempts - 1:
                raise DownloadError(f"{exc} (gave up after {attempts} attempts)") from None
            delay = options.backoff_s * 2**attempt
            log.debug("%s: %s; retry %d/%d in %.1f s", url, exc, attempt + 1, options.retries, delay)
            if stop is None:
                time.sleep(delay)
            elif stop.wait(delay):
                raise Interrupted from None
    raise AssertionError("unreachable")


def download_image(image: PublicImage, out_dir: str | os.PathLike, options: DownloadOptions,
                   stop: threading.Event | None = None) -> tuple[str, str | None, str | None]:
    """Download the channels of one image that are not written yet.

    Returns (image id, error, url of the failing channel); error is None on success. Channels
    are written as they arrive, so a retried image fetches only what is missing.
    """
    url = None
    # The original size of each channel written so far, kept until the image is complete: a rerun
    # compares the channels it fetches with those already on disk, as one run compares all four
    # (the PNGs may be resized by --size, so their own size cannot tell).
    partial = Path(out_dir) / "partial" / f"{image.image_id}.json"
    shapes: dict[str, tuple[int, ...]] = {}
    if partial.is_file():
        with contextlib.suppress(ValueError, OSError):
            shapes = {c: tuple(s) for c, s in json.loads(partial.read_text()).items()
                      if channel_png(out_dir, image.image_id, c).is_file()}
    try:
        on_disk = _shapes_on_disk(image, out_dir, options, stop, shapes)
        if on_disk:
            shapes.update(on_disk)
            write_text_atomic(partial, json.dumps(shapes))
        for channel in CHANNELS:
            target = channel_png(out_dir, image.image_id, channel)
            if target.is_file():
                continue
            url = channel_url(image.url_prefix, channel, options.base_url)
            array = fetch_channel(url, options, stop)
            shapes[channel] = tuple(array.shape)
            if len(set(shapes.values())) > 1:
                written = [c for c in shapes if c != channel]
                raise DownloadError(
                    "channel sizes differ: " + ", ".join(f"{c} {s[1]}x{s[0]}" for c, s in shapes.items())
                    + f"; {channel} is not written, the others are in {target.parent} ("
                    + ", ".join(channel_png(out_dir, image.image_id, c).name for c in written)
                    + "): the four channels of an image must have one size", permanent=True)
            write_png_atomic(target, convert(array, bits=options.bits, size=options.size, source=url))
            write_text_atomic(partial, json.dumps(shapes))
        partial.unlink(missing_ok=True)
        return image.image_id, None, None
    except Interrupted:
        return image.image_id, "interrupted", url
    except (DownloadError, ImageReadError) as exc:
        return image.image_id, str(exc), url
    except Exception as exc:  # noqa: BLE001 - one bad image must not end a run of 80,000; it is logged
        return image.image_id, f"{type(exc).__name__}: {exc}", url


# ---------------------------------------------------------------- the driver

@dataclass
class DownloadReport:
    out_dir: Path
    table: TableReport
    selected: int = 0
    skipped_existing: int = 0
    downloaded: int = 0
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (image id, url, reason)
    complete: int = 0  # images listed in train.csv

    @property
    def all_failed(self) -> bool:
        """Every image this run tried failed (the server down, a wrong --base-url): the CLI exits 1
        even without --strict, as nothing was gained. A run with nothing to do has not failed."""
        return bool(self.failures) and self.downloaded == 0

    def summary(self) -> str:
        lines = [self.table.summary(),
                 (f"download {self.out_dir}: {self.downloaded} images downloaded, {self.skipped_existing} already "
                  f"there, {len(self.failures)} failed; {self.complete} images in {self.out_dir / 'train.csv'}")]
        if self.all_failed:
            lines.append(f"every image of this run failed ({len(self.failures)}): check the network, the server and "
                         "--base-url, then run again")
        if self.failures:
            lines.append(f"failed images are listed in {self.out_dir / 'failures.csv'} (run again to retry them); "
                         "first ones:")
            lines += [f"  {image_id}: {reason} [{url}]" for image_id, url, reason in self.failures[:5]]
        return "\n".join(lines)


def download_settings(options: DownloadOptions) -> dict:
    """What download.json records: what the PNGs of a folder are."""
    return {"bits": options.bits, "size": options.size}


def download_public(table: str | os.PathLike, out_dir: str | os.PathLike, *, labels=None, cell_lines=None,
                    exclude_train: bool = False, limit: int | None = None, options: DownloadOptions | None = None,
                    workers: int = 8, progress: bool = True, dry_run: bool = False,
                    on_image: Callable[[str, str | None], None] | None = None) -> DownloadReport:
    """Download the selected images of ``table`` into ``out_dir`` (Kaggle layout); resumable.

    ``on_image(image_id, error)`` is called in the calling thread after each image (tests use it
    to interrupt a run). On Ctrl-C the workers stop, train.csv and failures.csv are written for
    what is finished, and KeyboardInterrupt propagates.
    """
    from hpa_scc.utils.fileio import check_settings

    options = options or DownloadOptions()
    if options.bits not in ("native", "8"):
        raise ValueError(f"--bits must be 'native' or '8', got {options.bits!r}")
    if options.size is not None and options.size < 16:
        raise ValueError(f"--size {options.size} is too small; use at least 16 px, or leave it out to keep the size")
    if options.retries < 0 or options.timeout_s <= 0 or options.backoff_s < 0:
        raise ValueError("--retries and --backoff must be >= 0 and --timeout > 0")
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if limit is not None and limit < 0:
        raise ValueError(f"--limit must be >= 0, got {limit}")
    out_dir = Path(out_dir)
    if (out_dir / "train.csv").is_file() and not (out_dir / "download.json").is_file():
        # Never overwrite a label table this command did not write (OUT_DIR = the Kaggle folder by mistake).
        raise ValueError(f"{out_dir / 'train.csv'} exists and was not written by download-public (no download.json); "
                         "choose an OUT_DIR of its own (e.g. data/public), then merge the tables with merge-tables")
    images, table_report = read_public_table(table)
    images = filter_images(images, table_report, labels=labels, cell_lines=cell_lines, exclude_train=exclude_train,
                           columns=_table_columns(Path(table)))
    if limit is not None:
        images = images[:limit]
        table_report.selected = len(images)
    for name, n in table_report.unknown_names.most_common(5):
        log.info("location %r is not one of the 19 classes (%d rows); ignored", name, n)
    report = DownloadReport(out_dir, table_report, selected=len(images))
    if dry_run:
        report.skipped_existing = sum(is_complete(out_dir, img.image_id) for img in images)
        report.complete = report.skipped_existing
        return report
    check_settings(out_dir, download_settings(options), name="download.json")
    (out_dir / "train").mkdir(parents=True, exist_ok=True)

    todo = [img for img in images if not is_complete(out_dir, img.image_id)]
    report.skipped_existing = len(images) - len(todo)
    failures: dict[str, tuple[str, str]] = {}
    stop = threading.Event()
    bar = tqdm(total=len(todo), desc="download", unit="img", disable=not progress)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="download")
    try:
        futures = [pool.submit(download_image, img, out_dir, options, stop) for img in todo]
        for future in as_completed(futures):
            image_id, error, url = future.result()
            if error is None:
                report.downloaded += 1
            else:
                failures[image_id] = (url or "", error)
                log.debug("failed %s: %s [%s]", image_id, error, url)  # all in failures.csv; the bar counts them
            bar.update(1)
            bar.set_postfix(failed=len(failures), refresh=False)
            if on_image is not None:
                on_image(image_id, error)
    finally:
        stop.set()  # running workers give up at their next chunk or backoff; queued ones are cancelled
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        # Written even when interrupted: the files are the truth, these tables describe them.
        report.complete = write_public_table(out_dir / "train.csv", images, out_dir)
        report.failures = [(i, url, reason) for i, (url, reason) in sorted(failures.items())]
        write_failures(out_dir / "failures.csv", report.failures, header=("ID", "url", "reason"))
    return report


def write_public_table(path: Path, images: Sequence[PublicImage], out_dir: Path) -> int:
    """Write ID,Label,source,Cellline,Image for the images whose four PNGs exist; returns how many."""
    n = 0
    with atomic_path(path, ".csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ID", "Label", "source", "Cellline", "Image"])
        for img in images:
            if is_complete(out_dir, img.image_id):
                writer.writerow([img.image_id, format_labels(img.labels), SOURCE, img.cell_line, img.url_prefix])
                n += 1
    return n


# ---------------------------------------------------------------- merging label tables

@dataclass
class MergeReport:
    out: Path
    counts: Counter = field(default_factory=Counter)  # source -> rows written
    dropped_duplicates: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = ", ".join(f"{n} {source}" for source, n in self.counts.items())
        lines = [f"merged {sum(self.counts.values())} images ({parts}) -> {self.out}"]
        if self.dropped_duplicates:
            lines.append(f"{len(self.dropped_duplicates)} ids of the second table were already in the first; "
                         f"kept the first table's rows: {', '.join(self.dropped_duplicates[:5])}"
                         + (" ..." if len(self.dropped_duplicates) > 5 else ""))
        return "\n".join(lines)


def _read_source_table(path: Path, default_source: str) -> list[tuple[str, tuple[int, ...], str, str]]:
    """(ID, labels, source, Cellline) per row of an ID,Label table; ``source``/``Cellline`` columns if present."""
    table = read_label_table(path)  # checks the columns, the labels and repeated ids, naming file and line
    extra: dict[str, tuple[str, str]] = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        for row in table_rows(fh):
            extra[(row["ID"] or "").strip()] = ((row.get("source") or "").strip() or default_source,
                                               (row.get("Cellline") or "").strip())
    return [(image_id, labels, *extra[image_id]) for image_id, labels in table.items()]


def merge_tables(kaggle_csv: str | os.PathLike, public_csv: str | os.PathLike, out_csv: str | os.PathLike, *,
                 keep_first: bool = False) -> MergeReport:
    """Write one ID,Label,source,Cellline table: the Kaggle rows (source 'kaggle' unless the table
    has a ``source`` column), then the public ones (source from the table, else 'hpa_public').

    An id in both tables is an error listing them, unless ``keep_first`` keeps the first table's row.
    ``python -m hpa_scc split OUT`` reads the result.
    """
    for path in (kaggle_csv, public_csv):
        if not Path(path).is_file():
            raise FileNotFoundError(f"label table {path} not found")
        if Path(out_csv).resolve() == Path(path).resolve():
            raise ValueError(f"--out {out_csv} is one of the input tables; it would be overwritten: "
                             "write the merged table to a new file")
    first = _read_source_table(Path(kaggle_csv), KAGGLE_SOURCE)
    second = _read_source_table(Path(public_csv), SOURCE)
    ids = {row[0] for row in first}
    repeated = [row[0] for row in second if row[0] in ids]
    if repeated and not keep_first:
        raise ValueError(f"{len(repeated)} ids are in both {kaggle_csv} and {public_csv}, e.g. "
                         f"{', '.join(repeated[:5])}; one image would count twice. Remove them, or pass "
                         "--keep-first to keep the first table's rows")
    report = MergeReport(Path(out_csv), dropped_duplicates=repeated)
    with atomic_path(out_csv, ".csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ID", "Label", "source", "Cellline"])
        for image_id, labels, source, cell_line in first + [r for r in second if r[0] not in ids]:
            writer.writerow([image_id, format_labels(labels), source, cell_line])
            report.counts[source] += 1
    return report
