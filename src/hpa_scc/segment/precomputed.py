"""The ``precomputed`` back-end: label images from a folder, made earlier by any segmenter.

Files looked for, per image id (first found wins):
    cells:  <ID>_cells.png   (what 'python -m hpa_scc segment' writes)
            <ID>_cellmask.png, <ID>_cell_mask.npz, <ID>_cellmask.npz, <ID>_cells.npz, <ID>.npz
    nuclei: <ID>_nuclei.png, <ID>_nucleimask.png, <ID>_nuclei_mask.npz, <ID>_nuclei.npz
``.npz`` files hold the label image as ``arr_0`` (``np.savez_compressed(path, labels)``, as the
original implementation stored them). Without a nucleus file, each cell's nucleus is taken as
the bright part of the blue channel inside it (Otsu within the cell), so the contract "cell k
contains nucleus k" still holds. Label images smaller than the image (saved at a reduced scale)
are enlarged with nearest-neighbour when the aspect ratio agrees.

A binary file (values 0 and 255, or 0 and 1) whose foreground falls into several pieces is a
foreground mask, not a label image: read as labels it would be one cell covering them all. Its
connected pieces become the cells, with a warning naming the file (cells that touch stay one).
A binary nucleus file gives each cell the nucleus pixels inside it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np
from skimage.filters import threshold_otsu

from hpa_scc.data.images import ImageReadError, read_labels

log = logging.getLogger(__name__)

CELL_NAMES = ("{id}_cells.png", "{id}_cellmask.png", "{id}_cell_mask.npz", "{id}_cellmask.npz",
              "{id}_cells.npz", "{id}.npz", "{id}_cell_mask.png")
NUCLEI_NAMES = ("{id}_nuclei.png", "{id}_nucleimask.png", "{id}_nuclei_mask.npz", "{id}_nuclei.npz",
                "{id}_nuclei_mask.png")


def _find(folder: Path, patterns: tuple[str, ...], image_id: str) -> Path | None:
    for pattern in patterns:
        path = folder / pattern.format(id=image_id)
        if path.is_file():
            return path
    return None


def fit_to(labels: np.ndarray, shape: tuple[int, int], source: Path) -> np.ndarray:
    """Enlarge/shrink a label image to ``shape`` with nearest-neighbour (same aspect only)."""
    if labels.shape == shape:
        return labels
    if abs(labels.shape[0] * shape[1] - labels.shape[1] * shape[0]) > max(shape):
        raise ImageReadError(f"{source} is {labels.shape[1]}x{labels.shape[0]} but the image is "
                             f"{shape[1]}x{shape[0]}; label images must match their image")
    return cv2.resize(labels, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)


def _binary_pieces(labels: np.ndarray) -> tuple[np.ndarray, int] | None:
    """(int32 labels of the connected pieces, how many) when ``labels`` holds only 0 and one of
    255 or 1 and its foreground has more than one piece; None for a label image."""
    from scipy import ndimage

    values = np.unique(labels)
    if len(values) != 2 or values[0] != 0 or values[1] not in (1, 255):
        return None
    # 8-connected: the ragged edge of one cell must not split it into pieces
    pieces, n = ndimage.label(labels > 0, structure=np.ones((3, 3), bool))
    return (pieces, n) if n > 1 else None


def split_binary_mask(labels: np.ndarray, source: Path) -> np.ndarray:
    """A cell label image as read, or, for a binary foreground mask (``_binary_pieces``), its
    connected pieces numbered 1..N (uint16), with a warning naming ``source``."""
    found = _binary_pieces(labels)
    if found is None:
        return labels
    pieces, n = found
    if n > 65535:
        raise ImageReadError(f"{source} is a binary mask with {n} separate pieces, more than a 16-bit label image "
                             "holds; save one label id per cell instead")
    log.warning("%s holds only the values 0 and %d (a foreground mask, not a label image): its %d connected pieces "
                "are taken as the cells, and cells that touch merge; save one label id per cell (what 'python -m "
                "hpa_scc segment' writes) to keep them apart", source, int(labels.max()), n)
    return pieces.astype(np.uint16)


def nuclei_from_blue(cells: np.ndarray, blue: np.ndarray) -> np.ndarray:
    """uint16 [H, W]: in each cell, the pixels brighter than that cell's Otsu threshold of blue."""
    nuclei = np.zeros_like(cells)
    from scipy import ndimage

    for cell_id, slices in enumerate(ndimage.find_objects(cells.astype(np.int32)), start=1):
        if slices is None:
            continue
        inside = cells[slices] == cell_id
        values = blue[slices][inside]
        # int(): for a uint8 cell that is all 0, max - 1 wrapped to 255 and gave no nucleus
        level = threshold_otsu(values) if np.ptp(values) > 0 else int(values.max(initial=0)) - 1
        nuclei[slices][inside & (blue[slices] > level)] = cell_id
    return nuclei


class PrecomputedSegmenter:
    """Reads ``(nuclei, cells)`` for an image id from ``folder`` (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike | None = None):
        if folder is None:
            raise ValueError("--segmenter precomputed needs --masks DIR, the folder with the label images")
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"mask folder {self.folder} does not exist")

    def __call__(self, image: np.ndarray, image_id: str = "") -> tuple[np.ndarray, np.ndarray]:
        shape = image.shape[1:]
        cell_path = _find(self.folder, CELL_NAMES, image_id)
        if cell_path is None:
            raise ImageReadError(f"no cell mask for {image_id} in {self.folder} "
                                 f"(looked for {', '.join(p.format(id=image_id) for p in CELL_NAMES[:3])}, ...)")
        cells = fit_to(split_binary_mask(read_labels(cell_path), cell_path), shape, cell_path)
        nuclei_path = _find(self.folder, NUCLEI_NAMES, image_id)
        if nuclei_path is not None:
            nuclei = fit_to(read_labels(nuclei_path), shape, nuclei_path)
            if _binary_pieces(nuclei) is not None:  # a foreground mask: each cell's nucleus is what lies inside it
                log.warning("%s holds only the values 0 and %d (a foreground mask, not a label image): each cell's "
                            "nucleus is taken as the mask inside it", nuclei_path, int(nuclei.max()))
                nuclei = np.where(nuclei > 0, cells, 0).astype(np.uint16)
            nuclei = np.where(nuclei == cells, nuclei, 0).astype(np.uint16)  # keep nucleus k inside cell k
        else:
            nuclei = nuclei_from_blue(cells, image[2])
        return nuclei, cells
