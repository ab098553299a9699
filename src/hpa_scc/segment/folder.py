"""Segmentation of one image, resumable: the label images already in a folder, or the
segmenter's output written there (the step ``segment``, ``prepare`` and ``predict`` share)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hpa_scc.utils.fileio import write_png_atomic
from hpa_scc.utils.provenance import stamp, stamped, unstamp
from hpa_scc.data.images import ImageReadError, ImageRecord, image_stamp, read_image
from hpa_scc.utils.pool import single_threaded_opencv
from hpa_scc.segment import build_segmenter
from hpa_scc.data.images import read_labels, seg_paths

# The segmenter and settings of this process, set once per pool worker by ``init_worker``
# (building a segmenter per image would reload its models every time).
_WORKER: dict = {}


def init_worker(segmenter_name: str | None, segmenter_options: dict, settings: dict) -> None:
    """Pool initializer of the steps that segment (segment, prepare, predict): one segmenter per
    process (none when ``segmenter_name`` is None) and the step's settings."""
    single_threaded_opencv()
    _WORKER["segmenter"] = build_segmenter(segmenter_name, **segmenter_options) if segmenter_name else None
    _WORKER["settings"] = settings


def worker_segmenter():
    """This process's segmenter (``init_worker``)."""
    return _WORKER["segmenter"]


def worker_settings() -> dict:
    """This process's step settings (``init_worker``)."""
    return _WORKER["settings"]


def check_segmentation(nuclei: np.ndarray, cells: np.ndarray, shape: tuple[int, int], source: str) -> None:
    """The back-end contract: uint16 label images at the image's size."""
    for name, labels in (("nuclei", nuclei), ("cells", cells)):
        if labels.shape != shape or labels.dtype != np.uint16:
            raise ValueError(f"segmenter {source} returned {name} {labels.dtype} {labels.shape}; "
                             f"expected uint16 {shape}")


def segment_one(record: ImageRecord, segmenter, seg_dir: Path, image: np.ndarray | None = None,
                fanout: bool = False) -> tuple[np.ndarray, np.ndarray, bool]:
    """(nuclei, cells, computed_now) for one image: read from seg_dir if done from these very
    channel files (the cells file's stamp, ``utils.provenance``), else segment and write."""
    nuclei_path, cells_path = seg_paths(seg_dir, record.image_id, fanout)
    source = image_stamp(record)
    if nuclei_path.is_file() and stamped(cells_path, source):
        try:
            return read_labels(nuclei_path), read_labels(cells_path), False
        except ImageReadError:
            pass  # a damaged earlier output: segment again
    if image is None:
        image = read_image(record.folder, record.image_id)
    nuclei, cells = segmenter(image, record.image_id)
    check_segmentation(nuclei, cells, image.shape[1:], type(segmenter).__name__)
    # cells last, then its stamp: an image is segmented when its cells file carries the stamp
    unstamp(cells_path)
    write_png_atomic(nuclei_path, nuclei, compression=1)
    write_png_atomic(cells_path, cells, compression=1)
    stamp(cells_path, source)
    return nuclei, cells, True
