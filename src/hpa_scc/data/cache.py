"""A resized uint8 copy of a data set that the training loader reads with almost no work.

    python -m hpa_scc cache DATA_DIR OUT_DIR --size 512 --workers 8
    python -m hpa_scc cache DATA_DIR OUT_DIR --size 512 --shard 0/4    # one of 4 job array tasks ...
    python -m hpa_scc cache DATA_DIR OUT_DIR --size 512 --merge        # ... then gather their logs

Layout of OUT_DIR:
    cache.json          what the cache holds: size, channels, format version
    images/<xx>/<ID>.npy  uint8 [C, size, size], C = 4 (RGBY) or 3 (RGB); np.load(mmap_mode="r");
                        <xx>: 256 sub-folders by a hash of the ID (``fileio.fanned``; format 1
                        caches, made before, hold images/<ID>.npy and are still read)
    index.csv           ID,Label,height,width: every cached image, labels and original size
    failures.csv        ID,error: inputs that could not be read (the error names the file)

Decoding four full-size PNGs and resizing them costs ~0.1 s per 2048 px image; a cached
sample is a single memory-mapped read. Each image is written atomically, so an interrupted
run is resumed by running the same command again: finished images are skipped.

Sharded (``shard=(I, N)``, see hpa_scc.data.shard): task I caches only its images and writes
index-shard<I>of<N>.csv and failures-shard<I>of<N>.csv instead of index.csv and failures.csv;
``merge_cache`` then writes those two exactly as an unsharded run does.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpa_scc.constants import MAX_SIZE, format_labels, parse_labels
from hpa_scc.utils.fileio import (SETTINGS_RECORDS, atomic_path, check_settings, failures_name, fanned, refuse_inside,
                                 write_npy_atomic, write_text_atomic)
from hpa_scc.data.images import (ImageReadError, ImageRecord, channel_names, find_images, image_stamp, read_image,
                                 resize)
from hpa_scc.utils.pool import run_pool, single_threaded_opencv, write_failures
from hpa_scc.data.shard import Shard, check_shard, gather_shards, select_shard, shard_suffix

log = logging.getLogger(__name__)
CACHE_JSON = SETTINGS_RECORDS["cache"]  # the settings record (fileio.check_settings)
CACHE_FORMAT = 2  # 2: per-image files in hashed sub-folders (1: flat, read only)


@dataclass
class CacheReport:
    out_dir: Path
    written: int = 0
    skipped_existing: int = 0
    redone: int = 0  # of ``written``: cached before from channel files that have changed since
    failures: list[tuple[str, str]] = field(default_factory=list)  # (image id, error)
    failures_file: str = failures_name()
    extra: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"cache {self.out_dir}: {self.written} images written"
            f"{f' ({self.redone} redone: their channel files changed)' if self.redone else ''}, "
            f"{self.skipped_existing} already cached, {len(self.failures)} failed"
        ]
        if self.failures:
            lines.append(f"failed inputs are listed in {self.out_dir / self.failures_file}; first ones:")
            lines += [f"  {image_id}: {error}" for image_id, error in self.failures[:5]]
        return "\n".join(lines + self.extra)


def cache_path(out_dir: str | os.PathLike, image_id: str, fanout: bool = True) -> Path:
    """A cached image's .npy (``fanout=False``: where a format 1 cache has it; see ``cache_fanout``)."""
    return fanned(Path(out_dir) / "images", image_id, f"{image_id}.npy", fanout)


def cache_fanout(out_dir: str | os.PathLike) -> bool:
    """Whether a cache folder keeps its files in hashed sub-folders (its cache.json's format >= 2)."""
    try:
        return int(json.loads((Path(out_dir) / CACHE_JSON).read_text()).get("format", 1)) >= 2
    except (OSError, ValueError):
        return True  # no settings yet: a cache this version writes


def is_cached(path: Path, shape: tuple[int, ...]) -> bool:
    """True if ``path`` is a whole cache file of this shape (reads the header only): a missing,
    empty, truncated or damaged file is not, and is redone by whoever asks."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError):
        return False
    return array.shape == shape and array.dtype == np.uint8 and path.stat().st_size >= array.nbytes


def _size_record(out_dir: str | os.PathLike, image_id: str, fanout: bool = True) -> Path:
    """Each cached image's original (H, W), written after its .npy: a killed run (SIGKILL, a time
    limit) leaves no index.csv, and the next one still knows what is finished."""
    return fanned(Path(out_dir) / "records", image_id, f"{image_id}.json", fanout)


def cache_settings(size: int, channels: str = "rgby", fanout: bool = True) -> dict:
    """What cache.json records; every writer of a cache (cache, prepare) checks against it.
    ``fanout=False``: a format 1 cache (flat folders), which its writers keep flat when they resume it."""
    return {"format": CACHE_FORMAT if fanout else 1, "size": size, "channels": channels}


def _read_size_record(out_dir: Path, image_id: str, fanout: bool = True) -> tuple[tuple[int, int], str | None] | None:
    """((H, W), source stamp or None) of a cached image, or None without a readable record."""
    try:
        record = json.loads(_size_record(out_dir, image_id, fanout).read_text())
        return (int(record["height"]), int(record["width"])), record.get("source")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _cache_one(job: tuple[ImageRecord, str, int, str, bool]) -> tuple[str, tuple[int, int] | None, str | None, str]:
    """Worker: read, resize and write one image, unless it is cached from these very channel files
    (``image_stamp``). Returns (id, original (H, W), error, "reused"|"new"|"redone")."""
    record, out_dir, size, channels, fanout = job
    try:
        source = image_stamp(record, channels)
        npy = cache_path(out_dir, record.image_id, fanout)
        known = _read_size_record(Path(out_dir), record.image_id, fanout)
        if known and known[1] == source and is_cached(npy, (len(channel_names(channels)), size, size)):
            return record.image_id, known[0], None, "reused"
        full = read_image(record.folder, record.image_id, channels=channels)
        small = np.stack([resize(plane, size) for plane in full])
        # the old record goes first: a crash between the new array and its record leaves no stamp
        # that could vouch for the array (it is redone)
        _size_record(out_dir, record.image_id, fanout).unlink(missing_ok=True)
        write_npy_atomic(npy, small)
        write_text_atomic(_size_record(out_dir, record.image_id, fanout),
                          json.dumps({"height": int(full.shape[1]), "width": int(full.shape[2]), "source": source}))
        return record.image_id, full.shape[1:], None, "redone" if known else "new"
    except (ImageReadError, OSError, ValueError) as exc:
        return record.image_id, None, str(exc), "new"


def build_cache(data_dir: str | os.PathLike, out_dir: str | os.PathLike, *, size: int = 512,
                channels: str = "rgby", workers: int = 1, labels_csv: str | os.PathLike | None = None,
                progress: bool = True, shard: Shard | None = None) -> CacheReport:
    """Cache every image of ``data_dir`` (any layout ``find_images`` reads) into ``out_dir``.

    ``shard=(I, N)``: only the images of shard I, with this shard's own index and failure log
    (index-shard<I>of<N>.csv, failures-shard<I>of<N>.csv); ``merge_cache`` gathers them.
    """
    out_dir = Path(out_dir)
    if not 16 <= size <= MAX_SIZE:  # past the largest HPA image (3072 px) only memory grows, by size^2
        raise ValueError(f"--size {size} is out of range; use 16 to {MAX_SIZE} px (512 is the usual training size)")
    check_shard(shard)
    refuse_inside(out_dir, data_dir)
    # the inputs first: a command that fails on them leaves no settings record to refuse its fix with
    records = select_shard(find_images(data_dir, labels_csv), shard)
    fanout = cache_fanout(out_dir)  # a format 1 cache is resumed as it is: flat
    check_settings(out_dir, cache_settings(size, channels, fanout), CACHE_JSON)
    suffix = shard_suffix(shard)
    report = CacheReport(out_dir, failures_file=failures_name(suffix))

    # Every image goes to the workers, which reuse it only when its record's stamp matches its
    # channel files now (a changed or replaced image is redone): checking that in parallel is what
    # keeps a resume over 100k images on a parallel file system quick.
    sizes: dict[str, tuple[int, int]] = {}
    errors: dict[str, str] = {}
    todo = [(rec, str(out_dir), size, channels, fanout) for rec in records]
    try:
        for image_id, shape, error, how in run_pool(_cache_one, todo, workers=workers,
                                                    initializer=single_threaded_opencv, desc=f"cache {size}px",
                                                    progress=progress, chunksize=4):
            if error is None:
                sizes[image_id] = tuple(shape)
                report.skipped_existing += how == "reused"
                report.redone += how == "redone"
            else:
                errors[image_id] = error
    finally:
        # Written even when interrupted, so the next run knows what is finished.
        write_index(out_dir / f"index{suffix}.csv", records, sizes)
        write_failures(out_dir / failures_name(suffix), errors.items())
    report.written = len(todo) - len(errors) - report.skipped_existing
    report.failures = sorted(errors.items())
    for image_id, error in report.failures:
        log.warning("skipped %s: %s", image_id, error)
    if shard is not None:
        report.extra.append(f"shard {shard[0]}/{shard[1]} done; once every shard has finished, merge them with "
                            f"'python -m hpa_scc cache DATA_DIR {out_dir} --merge' (writes index.csv)")
    return report


def merge_cache(data_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                labels_csv: str | os.PathLike | None = None) -> CacheReport:
    """Gather the shards' index-shard*.csv and failures-shard*.csv into index.csv and failures.csv.

    The result is the same as an unsharded ``build_cache`` of ``data_dir``. Fails, naming them,
    if some images have neither a cache file nor a failure line (a shard did not finish).
    """
    out_dir = Path(out_dir)
    meta = out_dir / CACHE_JSON
    if not meta.is_file():
        raise FileNotFoundError(f"nothing to merge: {meta} not found; run the shards first (--shard I/N)")
    settings = json.loads(meta.read_text())
    shape = (len(channel_names(settings["channels"])), settings["size"], settings["size"])
    fanout = int(settings.get("format", 1)) >= 2
    records = find_images(data_dir, labels_csv)
    known = _read_index(out_dir / "index.csv")
    for part in sorted(out_dir.glob("index-shard*of*.csv")):
        known.update(_read_index(part))
    finished, failures, seen = gather_shards(
        out_dir, [r.image_id for r in records],
        lambda image_id: image_id in known and is_cached(cache_path(out_dir, image_id, fanout), shape))
    sizes = {image_id: known[image_id] for image_id in finished}
    write_index(out_dir / "index.csv", records, sizes)
    write_failures(out_dir / failures_name(), failures)
    report = CacheReport(out_dir, skipped_existing=len(sizes), failures=failures)
    report.extra.append(f"merged {len(seen)} shard log(s) into {out_dir / 'index.csv'}")
    return report


def _read_index(path: Path) -> dict[str, tuple[int, int]]:
    if not path.is_file():
        return {}
    with open(path, newline="") as fh:
        return {r["ID"]: (int(r["height"]), int(r["width"])) for r in csv.DictReader(fh)}


def write_index(path: Path, records: list[ImageRecord], sizes: dict[str, tuple[int, int]]) -> None:
    with atomic_path(path, ".csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ID", "Label", "height", "width"])
        for rec in records:
            if rec.image_id in sizes:
                label = format_labels(rec.labels) if rec.labels else ""
                writer.writerow([rec.image_id, label, *sizes[rec.image_id]])


@dataclass(frozen=True)
class CacheEntry:
    image_id: str
    labels: tuple[int, ...] | None
    height: int
    width: int


def read_cache_index(cache_dir: str | os.PathLike) -> list[CacheEntry]:
    """The images a cache holds, with their labels and original sizes."""
    path = Path(cache_dir) / "index.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {cache_dir} is not a cache; build one with "
                                f"'python -m hpa_scc cache DATA_DIR {cache_dir} --size 512'")
    with open(path, newline="") as fh:
        return [
            CacheEntry(r["ID"], tuple(parse_labels(r["Label"], where=f"{path} (ID {r['ID']})")) if r["Label"] else None,
                       int(r["height"]), int(r["width"]))
            for r in csv.DictReader(fh)
        ]
