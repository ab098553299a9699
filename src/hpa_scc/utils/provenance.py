"""Provenance: what a finished unit was made from, checked before the unit is reused.

One mechanism for every step that resumes. A finished unit (an image's cache array, its
segmentation, its prepared record or prediction; a trained run) carries a *stamp* of its inputs:

- an image's channel files by size and modification time (``sources_stamp``): a file rewritten,
  replaced by another image's or by one of another size changes its stamp, a plain ``cp -p`` or
  ``rsync -a`` of the same data keeps it, so a moved data set is not redone;
- what else decided the output (its labels, for a prediction that copies them);
- for a run, the content digest of each COCO fold it trained on (``PreparedSet.data_digest``).

A step reuses a unit only when the stamp it recorded equals the stamp of the inputs now; else it
redoes the unit and says how many it redid. A unit without a stamp (made by an earlier version)
is redone once. Settings that hold for a whole folder stay in its settings record
(``fileio.check_settings``); the stamp is per unit because inputs change one image at a time.

Where a format has room the stamp lives inside the unit (a prepared record's or a prediction's
JSON: ``"source"``); a unit with no room for it (an ``.npy`` array, a PNG) gets a sidecar
``NAME.src`` written after the unit and removed before it is rewritten, so a crash between the
two leaves a unit without a stamp, which is redone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from hpa_scc.utils.fileio import write_text_atomic


def file_digest(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """16 hex digits of the SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def sources_stamp(paths: Iterable[str | os.PathLike], **extra) -> str:
    """16 hex digits over each input file's name, size and modification time (ns), and ``extra``
    (JSON-able: labels, settings that are per unit). A missing file raises FileNotFoundError."""
    h = hashlib.sha256()
    for path in paths:
        st = os.stat(path)
        h.update(f"{Path(path).name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    if extra:
        h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def sidecar(path: str | os.PathLike) -> Path:
    return Path(f"{path}.src")


def stamped(path: str | os.PathLike, stamp: str) -> bool:
    """Whether ``path`` exists and its sidecar records ``stamp``."""
    try:
        return Path(path).is_file() and sidecar(path).read_text().strip() == stamp
    except (FileNotFoundError, NotADirectoryError):
        return False


def unstamp(path: str | os.PathLike) -> None:
    """Before a unit is rewritten: a crash mid-way must not leave the old stamp on a new unit."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sidecar(path))


def stamp(path: str | os.PathLike, value: str) -> None:
    """After the unit at ``path`` is written: record what it was made from."""
    write_text_atomic(sidecar(path), value + "\n")


def changed(old: Mapping[str, str] | None, new: Mapping[str, str]) -> list[str]:
    """The keys of two digests ({name: digest}) that differ, were added or were removed."""
    old = old or {}
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
