"""Cell segmentation: RGBY image in, ``(nuclei_labels, cell_labels)`` out.

Every back-end is a callable ``segmenter(image, image_id) -> (nuclei, cells)`` with ``image``
uint8 [4, H, W] (R, G, B, Y) and both outputs uint16 [H, W] label images at the input's full
size, 0 background, and matching ids: nucleus k lies inside cell k (a cell may have no nucleus:
hpacellseg keeps cells whose nucleus its filters dropped). A back-end that fails on one image
raises ``ValueError`` (e.g. ``hpacellseg.SegmentationError``), so the step logs and skips it.

    from hpa_scc.segment import build_segmenter
    segmenter = build_segmenter("builtin")
    nuclei, cells = segmenter(image, "5c27f04c-...")

Back-ends (``--segmenter``):
    builtin      no weights: classical nuclei + seeded-watershed cells (scikit-image/OpenCV/SciPy)
    hpacellseg   HPA-Cell-Segmentation with local weight files (--nuclei-model, --cell-model);
                 install with: bash scripts/setup.sh --hpacellseg
    precomputed  label images from a folder (.npz with arr_0, as the original stored them, or .png)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

Segmenter = Callable[[np.ndarray, str], tuple[np.ndarray, np.ndarray]]


def _builtin(**options) -> Segmenter:
    from hpa_scc.segment.builtin import BuiltinSegmenter

    return BuiltinSegmenter(**options)


def _hpacellseg(**options) -> Segmenter:
    from hpa_scc.segment.hpacellseg import HpaCellSegmenter

    return HpaCellSegmenter(**options)


def _precomputed(**options) -> Segmenter:
    from hpa_scc.segment.precomputed import PrecomputedSegmenter

    return PrecomputedSegmenter(**options)


SEGMENTERS: dict[str, Callable[..., Segmenter]] = {
    "builtin": _builtin,
    "hpacellseg": _hpacellseg,
    "precomputed": _precomputed,
}


def build_segmenter(name: str, **options) -> Segmenter:
    """The back-end called ``name``, built with its options (None values are dropped)."""
    if name not in SEGMENTERS:
        raise ValueError(f"unknown segmenter {name!r}; choose one of {sorted(SEGMENTERS)}")
    return SEGMENTERS[name](**{k: v for k, v in options.items() if v is not None})


def check_segmenter(name: str, **options) -> None:
    """Fail now, in the parent of a pool, if ``build_segmenter`` would fail in every worker.

    hpacellseg only checks its package and files: building it loads 1.1 GB of models, which each
    worker does once; the cheap back-ends are simply built.
    """
    if name == "hpacellseg":
        from hpa_scc.segment.hpacellseg import HpaCellSegmenter

        HpaCellSegmenter.check(**{k: v for k, v in options.items() if k != "device"})
    else:
        build_segmenter(name, **options)


def segmenter_record(options: dict | None) -> dict | None:
    """What a segmentation depends on in the segmenter's options, for a folder's settings record:
    a model file by its path, size and modification time (weights replaced at the same path make
    another segmenter); other values as text; the device left out (it does not change the labels
    a resumed run may add). None without options (segment.json and predict.json keep ``{}`` there,
    as they recorded before; prepare.json had no such key, which reads as None)."""
    record = {}
    for key, value in sorted((options or {}).items()):
        if key == "device":
            continue
        if isinstance(value, (str, os.PathLike)) and Path(value).is_file():
            stat = Path(value).stat()
            record[key] = {"path": str(Path(value).resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        else:
            record[key] = str(value)
    return record or None
