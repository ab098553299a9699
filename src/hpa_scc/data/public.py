"""Public HPA images: download the fields of view of a table (``data.public_table`` reads it),
convert them to PNG in the Kaggle layout.

Public HPA images: download the fields of view of ``kaggle_2021.tsv``, convert them to PNG, merge tables.

    python -m hpa_scc download-public kaggle_2021.tsv data/public --exclude-train --cell-lines kaggle --workers 8
    python -m hpa_scc download-public kaggle_2021.tsv data/rare --labels 11 15 --size 1024 --bits 8
    python -m hpa_scc merge-tables data/kaggle/train.csv data/public/train.csv --out data/merged.csv
    python -m hpa_scc split data/merged.csv --folds 5 --out data/folds.csv

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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
from tqdm import tqdm

from hpa_scc import __version__
from hpa_scc.constants import (
    CHANNELS,
    format_labels,
)
from hpa_scc.utils.fileio import SETTINGS_RECORDS, atomic_path, failures_name, write_png_atomic, write_text_atomic
from hpa_scc.data.images import ImageReadError, resize, to_uint8
from hpa_scc.utils.pool import write_failures

from hpa_scc.data.public_table import (SOURCE, PublicImage, TableReport, channel_url, filter_images,
                                      read_public_table, table_columns)

log = logging.getLogger(__name__)

DOWNLOAD_JSON = SETTINGS_RECORDS["download"]  # the settings record (fileio.check_settings)
PERMANENT_HTTP_CODES = frozenset({400, 401, 403, 404, 410})  # retrying cannot help


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
            lines.append(f"failed images are listed in {self.out_dir / failures_name()} (run again to retry them); "
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
    if (out_dir / "train.csv").is_file() and not (out_dir / DOWNLOAD_JSON).is_file():
        # Never overwrite a label table this command did not write (OUT_DIR = the Kaggle folder by mistake).
        raise ValueError(f"{out_dir / 'train.csv'} exists and was not written by download-public (no {DOWNLOAD_JSON}); "
                         "choose an OUT_DIR of its own (e.g. data/public), then merge the tables with merge-tables")
    images, table_report = read_public_table(table)
    images = filter_images(images, table_report, labels=labels, cell_lines=cell_lines, exclude_train=exclude_train,
                           columns=table_columns(Path(table)))
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
    check_settings(out_dir, download_settings(options), name=DOWNLOAD_JSON)
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
        write_failures(out_dir / failures_name(), report.failures, header=("ID", "url", "reason"))
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


