"""Atomic writes: a reader (or a resumed run) never sees a half-written file.

Each writer writes to a temporary file in the destination folder, then renames it over the
target (``os.replace`` is atomic on one file system), so a crash leaves either the old file or
none, never a truncated one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np


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
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
