"""The ``hpacellseg`` back-end: HPA-Cell-Segmentation's U-Nets, from local weight files.

Install: ``pip install https://github.com/CellProfiling/HPA-Cell-Segmentation/archive/master.zip``
(it is not on PyPI). Weights (nothing is downloaded here): ``dpn_unet_nuclei_v1.pth`` and
``dpn_unet_cell_3ch_v1.pth`` from the project's Zenodo record (https://zenodo.org/record/4665863),
given as ``--nuclei-model`` and ``--cell-model``. Runs as the competition's teams did:
``CellSegmentator(..., scale_factor=0.25, padding=True, multi_channel_model=True)`` then
``label_cell``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

INSTALL_HINT = (
    "the hpacellseg back-end needs HPA-Cell-Segmentation: install it with\n"
    "  pip install https://github.com/CellProfiling/HPA-Cell-Segmentation/archive/master.zip\n"
    "and download its weights dpn_unet_nuclei_v1.pth and dpn_unet_cell_3ch_v1.pth from\n"
    "https://zenodo.org/record/4665863, then pass --nuclei-model and --cell-model.\n"
    "Or use --segmenter builtin, which needs no weights."
)


class HpaCellSegmenter:
    def __init__(self, nuclei_model: str | os.PathLike | None = None, cell_model: str | os.PathLike | None = None,
                 device: str | None = None):
        try:
            from hpacellseg.cellsegmentator import CellSegmentator
            from hpacellseg.utils import label_cell
        except ImportError:
            raise ImportError(INSTALL_HINT) from None
        for flag, path in (("--nuclei-model", nuclei_model), ("--cell-model", cell_model)):
            if path is None or not Path(path).is_file():
                raise FileNotFoundError(f"{flag} {path}: weight file not found.\n{INSTALL_HINT}")
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._label_cell = label_cell
        self._model = CellSegmentator(str(nuclei_model), str(cell_model), scale_factor=0.25, device=device,
                                      padding=True, multi_channel_model=True)

    def __call__(self, image: np.ndarray, image_id: str = "") -> tuple[np.ndarray, np.ndarray]:
        red, blue, yellow = image[0], image[2], image[3]
        # hpacellseg takes per-channel lists: [microtubules], [ER], [nuclei]
        nuclei_pred = self._model.pred_nuclei([blue])
        cell_pred = self._model.pred_cells([[red], [yellow], [blue]])
        nuclei, cells = self._label_cell(nuclei_pred[0], cell_pred[0])
        return nuclei.astype(np.uint16), cells.astype(np.uint16)
