"""Atomic writes: a reader (or a resumed run) never sees a half-written file.

Each writer writes to a temporary file in the destination folder, then renames it over the
target (``os.replace`` is atomic on one file system), so a crash leaves either the old file or
none, never a truncated one. A writer killed outright (SIGKILL, out of memory, a node lost)
runs no cleanup and leaves its ``.NAME.XXXXXXXX.tmp*`` file behind: ``check_settings``, which
every resumable step calls on its folder before work, sweeps those once they are stale.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

# What atomic_path and check_settings name their temporary files: "." + target name + "." +
# mkstemp's 8 random characters + ".tmp" + an optional suffix. Nothing else is ever swept.
TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$")
# A writer touches its file all the time it writes (the slowest, a checkpoint, takes seconds),
# so one unchanged for an hour belongs to a dead process, even with array tasks in one folder.
STALE_TEMP_S = 3600.0


# Per-image files (cache arrays, segmentation, records) go into 256 sub-folders named by a hash of
# the image ID: at 100k images a flat folder holds ~100k files per kind, and parallel file systems
# (Lustre, GPFS) serialise opens and creates on a folder's lock; their guides ask for at most a few
# thousand files per folder. Measured and decided in docs/SCALE.md.
FANOUT = 256


def fanned(folder: str | os.PathLike, image_id: str, name: str, fanout: bool = True) -> Path:
    """folder/<xx>/<name>: ``xx`` two hex digits of crc32(image ID) mod 256, the same for every file
    of one image (so its files sit together), spread evenly whatever the IDs look like.
    ``fanout=False``: folder/<name>, where a folder made before (format 1) keeps its files."""
    if not fanout:
        return Path(folder) / name
    return Path(folder) / f"{zlib.crc32(image_id.encode('utf-8')) % FANOUT:02x}" / name


# A step's failure list: failures.csv, or failures<suffix>.csv for a shard's own (``data.shard``:
# failures-shard<I>of<N>.csv). Besides the settings records, the one file every step writes.
FAILURES = "failures"


def failures_name(suffix: str = "") -> str:
    """failures<suffix>.csv: the name of a step's failure list (``suffix``: ``data.shard.shard_suffix``)."""
    return f"{FAILURES}{suffix}.csv"


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; put it back at once
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give: 0666 less the umask (0644 under 022).
    A temporary file is created 0600; without this every output would be private to its owner,
    and a lab on a shared cluster could not read each other's results."""
    return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.fchmod(fd, file_mode())
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        full = isinstance(exc, Exception) and disk_full(exc, path.parent)  # before the partial file is freed
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if full:
            raise DiskFullError(f"no space left on the device of {path.parent} while writing {path.name}; free "
                                "space there (or write elsewhere), then run the same command again: finished "
                                "work is kept") from exc
        raise


class OwnedFolder:
    """A folder whose files one class names (PreparedSet, SynthSet, PredictionFolder): the root, and
    the instance going wherever a path to the folder does (``os.fspath``, ``open``, ``Path``)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __fspath__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"


class DiskFullError(RuntimeError):
    """The output's file system is full. Not an OSError on purpose: the steps skip an image whose
    read fails (OSError) and go on, but no image can be written now, so the step must stop."""


# Below this many free bytes a failed write is taken as a full disk, whatever the writer said:
# numpy says "N requested and M written", torch "[enforce fail at inline_container.cc]".
FULL_BELOW_BYTES = 1 << 20


def disk_full(exc: BaseException, folder: Path) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < FULL_BELOW_BYTES


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_png_atomic(path: str | os.PathLike, array: np.ndarray, compression: int = 3) -> None:
    """Write a 2-D uint8/uint16 array (or HxWx3 uint8, RGB order) as PNG, atomically."""
    array = np.ascontiguousarray(array)
    if array.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"PNG needs uint8 or uint16, got {array.dtype} for {path}")
    if array.ndim == 3:
        array = array[..., ::-1]  # OpenCV writes BGR
    with atomic_path(path, ".png") as tmp:
        if not cv2.imwrite(str(tmp), array, [cv2.IMWRITE_PNG_COMPRESSION, compression]):
            raise OSError(f"could not write {path}")


def write_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path, ".npy") as tmp:
        np.save(tmp, array)


def check_settings(out_dir: Path, settings: dict, name: str, *, sweep: bool = True) -> None:
    """Record ``settings`` in ``out_dir/name`` (one of ``SETTINGS_RECORDS``), or fail if the folder was made
    with others.

    Safe when several processes (the tasks of a job array) start on one folder at once: the file
    is created by a hard link from a finished temporary file, which fails if the name exists, so
    the first writer wins and every other one compares its settings with the winner's.
    When the settings match (a resumed step), stale temporary files that killed writers left in
    the folder are removed (``sweep_stale_temps``; ``sweep=False`` for a folder inside one
    already swept).
    """
    if name not in STEP_RECORDS:
        raise ValueError(f"{name!r} is not a step's settings record (fileio.SETTINGS_RECORDS: {', '.join(STEP_RECORDS)})")
    meta = Path(out_dir) / name
    others = [other for other in STEP_RECORDS if other != name and (Path(out_dir) / other).is_file()]
    if others:  # e.g. cache into a prepared set: its records/<xx>/<ID>.json would replace prepare's
        raise ValueError(f"{out_dir} holds the output of another step ({others[0]}); this one ({name}) would write "
                         f"over its files: give it a folder of its own")
    text = json.dumps(settings, indent=2) + "\n"
    if not meta.is_file():
        meta.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=meta.parent)
        os.fchmod(fd, file_mode())
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            try:
                os.link(tmp, meta)  # atomic create-if-absent
            except FileExistsError:
                pass  # another process was first: compare with its settings below
            except OSError:  # a file system without hard links: last writer wins
                write_text_atomic(meta, text)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    old = json.loads(meta.read_text())
    changed = list(differences({k: old.get(k) for k in settings}, settings))
    if changed and list(meta.parent.glob(f"{FAILURES}*.csv")) and not holds_results(meta.parent):
        # An earlier run that ended having made nothing (every image failed: a bad model file, say)
        # has nothing to mix with. Without its failure list the folder may be a sibling array
        # task's that has only just started: then the first writer's settings stand.
        log.info("%s holds no results of its earlier settings; recording the new ones in %s", out_dir, meta.name)
        write_text_atomic(meta, text)
    elif changed:
        raise ValueError(f"{out_dir} was made with other settings ({'; '.join(changed[:4])}"
                         f"{f'; {len(changed) - 4} more' if len(changed) > 4 else ''}; all in {meta}); use another "
                         "OUT_DIR to run with these (or delete this one)")
    if sweep:
        sweep_stale_temps(meta.parent)


# The settings record of each step that fills a folder with per-image files; one folder, one step.
# check_settings writes and compares these files, so this module owns their names; each step's
# folder owner takes its constant from here (data.cache.CACHE_JSON, data.prepared.PREPARE_JSON,
# segment.folder.SEGMENT_JSON, evaluation.predictions.PREDICT_JSON, data.public.DOWNLOAD_JSON).
# They are not registered by their owners at import because the check must hold in a process that
# never imports an owner: ``python -m hpa_scc cache`` imports data.cache alone and must still
# refuse a prepared set.
SETTINGS_RECORDS = {"cache": "cache.json", "prepare": "prepare.json", "segment": "segment.json",
                    "predict": "predict.json", "download": "download.json"}
STEP_RECORDS = tuple(SETTINGS_RECORDS.values())
# What a step writes besides its results: settings records, failure lists, logs.
NOT_RESULTS = re.compile("^(" + "|".join(map(re.escape, STEP_RECORDS)) + f")$|^{FAILURES}.*\\.csv$|\\.log$")


def holds_results(folder: Path) -> bool:
    """Whether ``folder`` holds any file but settings records, failure lists, logs and temporary files."""
    for _, _, files in os.walk(folder):
        if any(not NOT_RESULTS.search(name) and not TEMP_NAME.match(name) for name in files):
            return True
    return False


def differences(old, new, where: str = "") -> Iterator[str]:
    """'key: old -> new' for every leaf where two JSON-like values differ (dicts by key, lists by index)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            yield from differences(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            yield from differences(a, b, f"{where}[{i}]")
    elif old != new:
        yield f"{where}: {_short(old)} -> {_short(new)}"


def _short(value, limit: int = 100) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def sweep_stale_temps(folder: str | os.PathLike, *, older_than_s: float = STALE_TEMP_S) -> list[Path]:
    """Delete the temporary files of atomic writers that died in ``folder`` (and below): names
    of TEMP_NAME's form, unchanged for ``older_than_s`` seconds. Returns what was removed."""
    folder = Path(folder)
    limit = time.time() - older_than_s
    removed = []
    for root, _, files in os.walk(folder):
        for name in files:
            if not TEMP_NAME.match(name):
                continue
            path = Path(root) / name
            with contextlib.suppress(FileNotFoundError):  # another task may sweep it first
                if path.stat().st_mtime < limit:
                    path.unlink()
                    removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) that killed writers left in %s (e.g. %s)",
                 len(removed), folder, removed[0].name)
    return sorted(removed)


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def refuse_overwrite(outputs: dict[str, str | os.PathLike | None], inputs: dict[str, str | os.PathLike | None]) -> None:
    """Refuse, naming both options, an output file that is one of the inputs (or another output):
    ``evaluate --out SUBMISSION`` would replace the submission with its score. Keys are the
    options' names (``--out``), values paths or None (not given)."""
    given = [(name, Path(p)) for name, p in {**inputs, **outputs}.items() if p is not None]
    for name, path in ((n, Path(p)) for n, p in outputs.items() if p is not None):
        for other, other_path in given:
            if other != name and _same(path, other_path):
                raise ValueError(f"{name} {path} is also {other}: writing it would overwrite that file; "
                                 f"give {name} another path")


# The sub-folders of a data folder that steps read (images, a synthetic set's truth).
INPUT_SUBFOLDERS = ("train", "test", "masks", "nuclei")


def refuse_inside(out_dir: str | os.PathLike, data_dir: str | os.PathLike, what: str = "OUT_DIR") -> None:
    """Refuse an output folder that is the data folder, or one of the sub-folders whose files the
    steps read (train/, test/, masks/, nuclei/), or inside one: outputs (cells.csv, records/) must
    never land over or among the inputs. A new folder beside the images (DATA/pred) is fine."""
    out, data = Path(out_dir).resolve(), Path(data_dir).resolve()
    if out == data or (data in out.parents and out.relative_to(data).parts[0] in INPUT_SUBFOLDERS):
        where = "the data folder" if out == data else f"inside the inputs of {data_dir}"
        raise ValueError(f"{what} {out_dir} is {where}: its outputs could overwrite or mix with the inputs "
                         f"(e.g. {data_dir}/cells.csv); write to another folder, e.g. {data.parent / (data.name + '-out')}")
