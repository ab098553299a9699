"""Segmentation of one image, resumable: the label images already in a folder, or the
segmenter's output written there (the step ``segment``, ``prepare`` and ``predict`` share).

A pool worker's route to its segmenter: each job carries its step's settings, among them a
``SegmenterSpec``; ``init_worker(spec)``, the pool's initializer, builds that segmenter once in
each worker process, and the job asks for it with ``worker_segmenter(settings.segmenter)``.

The segment step's folder (``apps.prepare.segment_folder``):
    segment.json                  the settings (SEGMENT_JSON); another segmenter there is refused
    <ID>_{cells,nuclei}.png       uint16 label images at full size (``data.images.seg_paths``)
    failures.csv                  ID,error (failures-shard<I>of<N>.csv per shard)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpa_scc.utils.fileio import SETTINGS_RECORDS, write_png_atomic
from hpa_scc.utils.provenance import stamp, stamped, unstamp
from hpa_scc.data.images import ImageReadError, ImageRecord, image_stamp, read_image
from hpa_scc.utils.pool import single_threaded_opencv
from hpa_scc.segment import build_segmenter
from hpa_scc.data.images import read_labels, seg_paths

SEGMENT_JSON = SETTINGS_RECORDS["segment"]  # the segment step's settings record


@dataclass(frozen=True)
class SegmenterSpec:
    """Which segmenter a step's workers use: its name (None: the step segments nothing) and options."""

    name: str | None
    options: dict = field(default_factory=dict)


# The segmenter this process built for its step (``init_worker``): one per worker process, since
# building one per image would reload its models every time. Jobs reach it by their spec.
_BUILT: dict = {}


def init_worker(spec: SegmenterSpec) -> None:
    """Pool initializer of the steps that segment (segment, prepare, predict): single-threaded
    OpenCV and this process's segmenter for ``spec`` (none when ``spec.name`` is None). A segmenter
    that cannot be built stops the step (``utils.pool``), not one image at a time."""
    single_threaded_opencv()
    _BUILT.clear()
    _BUILT["spec"] = spec
    _BUILT["segmenter"] = build_segmenter(spec.name, **spec.options) if spec.name else None


def worker_segmenter(spec: SegmenterSpec):
    """The segmenter ``init_worker`` built in this process for ``spec``."""
    if _BUILT.get("spec") != spec:
        raise RuntimeError(f"no segmenter was built for {spec} in this process: run the job through "
                           "run_pool(..., initializer=init_worker, initargs=(spec,))")
    return _BUILT["segmenter"]


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
