"""The ``hpacellseg`` back-end: HPA-Cell-Segmentation's DPN U-Nets, from local weight files.

    segmenter = HpaCellSegmenter("dpn_unet_nuclei_v1.pth", "dpn_unet_cell_3ch_v1.pth")
    nuclei, cells = segmenter(image, "5c27f04c-...")      # uint8 [4, H, W] -> 2 x uint16 [H, W]

Install (not on PyPI): ``bash scripts/setup.sh --hpacellseg`` (HPA-Cell-Segmentation and
pytorch_zoo, whose classes the weight files pickle, with --no-deps: upstream asks for
``opencv-python``, a second OpenCV beside the project's headless one). Weights (nothing is
downloaded here): ``dpn_unet_nuclei_v1.pth`` and ``dpn_unet_cell_3ch_v1.pth`` from
https://zenodo.org/record/4665863, given as ``--nuclei-model`` and ``--cell-model``.

It runs as the competition's teams ran ``CellSegmentator(nuclei, cell, scale_factor=0.25,
padding=True, multi_channel_model=True)`` then ``hpacellseg.utils.label_cell``: the upstream
models, normalisation and labelling, with the pre- and post-processing of ``pred_nuclei`` /
``pred_cells`` done here, because upstream's, run against today's libraries, breaks in three
places (tests/test_hpacellseg.py checks each, and that the output equals upstream's wherever
upstream works):

1. ``CellSegmentator`` loads a path with ``torch.load(path)``, which since torch 2.6 refuses
   the pickled modules the weight files are. Here the files are loaded with
   ``weights_only=False`` (so only load weight files you trust, e.g. Zenodo's) and the modules
   handed over;
2. ``transform.rescale(..., multichannel=True)``: scikit-image 0.19 renamed the argument to
   ``channel_axis`` and 0.26 removed it (a TypeError on the first image);
3. the prediction is resized back with ``cv2.resize(pred, (H, W))``, but OpenCV takes
   (width, height): a non-square image came back transposed. Here it is ``(W, H)``.

Models are loaded once per process (the prepare/segment pool builds one segmenter per worker;
the parent only checks the files, ``HpaCellSegmenter.check``): each pair is about 1.1 GB, so
on one GPU keep ``--workers`` small. Upstream's labelling can leave a cell without a nucleus:
nucleus k, when there is one, lies inside cell k.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "the hpacellseg back-end needs HPA-Cell-Segmentation and pytorch_zoo (not on PyPI): install them with\n"
    "  bash scripts/setup.sh --hpacellseg\n"
    "and download its weights dpn_unet_nuclei_v1.pth and dpn_unet_cell_3ch_v1.pth from\n"
    "https://zenodo.org/record/4665863, then pass --nuclei-model and --cell-model.\n"
    "Or use --segmenter builtin, which needs no weights."
)
WEIGHT_FILES = {"--nuclei-model": "dpn_unet_nuclei_v1.pth", "--cell-model": "dpn_unet_cell_3ch_v1.pth"}
WEIGHTS_HINT = ("download dpn_unet_nuclei_v1.pth and dpn_unet_cell_3ch_v1.pth from https://zenodo.org/record/4665863 "
                "and pass them with --nuclei-model and --cell-model (or use --segmenter builtin, which needs no weights)")
SCALE_FACTOR = 0.25  # what the weights were trained at and every team ran
PAD = 32  # upstream pads 32 px of reflection on the top/left and up to the next multiple of 32


class SegmentationError(ValueError):
    """The segmenter failed on one image: the step logs it and goes on with the others."""


def _import_upstream():
    try:
        # pytorch_zoo prints "please compile abn" on import (its optional in-place BatchNorm
        # extension, which the DPN U-Nets do not use): noise that reads like an error in every log
        with contextlib.redirect_stdout(io.StringIO()):
            from hpacellseg.cellsegmentator import NORMALIZE
            from hpacellseg.utils import label_cell
            from pytorch_zoo.unet import DPNUnet  # the weight files unpickle its classes
    except ImportError as exc:
        raise ImportError(f"{exc}\n{INSTALL_HINT}") from None
    del DPNUnet  # imported only to fail here, with the hint, rather than in torch.load
    return NORMALIZE, label_cell


def load_model(source, device: str):
    """A weight file (a whole pickled pytorch_zoo module, as Zenodo's) or a module -> the module
    on ``device`` in eval mode (a DataParallel wrapper removed)."""
    import torch

    model = source
    if isinstance(source, (str, os.PathLike)):
        try:
            # The files are pickled modules, not state dicts: torch >= 2.6's default
            # weights_only=True refuses them (finding 1 of the module docstring).
            model = torch.load(source, map_location=device, weights_only=False)
        except (ModuleNotFoundError, AttributeError) as exc:
            raise ImportError(f"{source}: cannot unpickle the model ({exc}); its classes come from "
                              f"pytorch_zoo.\n{INSTALL_HINT}") from None
        except Exception as exc:
            raise ValueError(f"{source}: not a readable torch model file ({type(exc).__name__}: {exc}); "
                             "download it again from https://zenodo.org/record/4665863") from None
    if isinstance(model, torch.nn.DataParallel):
        model = model.module
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{source}: holds a {type(model).__name__}, not a model; hpacellseg's weight files "
                         "(dpn_unet_nuclei_v1.pth, dpn_unet_cell_3ch_v1.pth) are whole pickled modules")
    return model.to(device).eval()


def random_dpn_unet(seed: int = 0, inside: bool = False):
    """A pytorch_zoo ``DPNUnet`` built as hpacellseg's weight files hold it, with random weights:
    for tests and benchmarks without the Zenodo files (its ImageNet encoder, which pytorch_zoo
    would download, is switched off while it is built). ``inside``: the last layer says "inside
    a cell" everywhere (classes: background, border, inside), so every image has cells."""
    import functools

    import torch
    from pytorch_zoo import abstract_model, dpn
    from pytorch_zoo.unet import DPNUnet

    saved = abstract_model.encoder_params["dpn92"]
    abstract_model.encoder_params["dpn92"] = dict(saved, init_op=functools.partial(dpn.dpn92, pretrained=None),
                                                  url=None)
    try:
        torch.manual_seed(seed)
        model = DPNUnet(3, 3, "dpn92").eval()
    finally:
        abstract_model.encoder_params["dpn92"] = saved
    if inside:
        with torch.no_grad():
            model.final[0].weight.zero_()
            model.final[0].bias.copy_(torch.tensor([-4.0, -4.0, 4.0]))
    return model


def rescale(image: np.ndarray, factor: float) -> np.ndarray:
    """float64 [h, w, C] in [0, 1]: ``transform.rescale(image, factor, multichannel=True)`` as
    upstream meant it, with the argument's current name (finding 2)."""
    from skimage import transform

    return transform.rescale(image, factor, channel_axis=-1)


def pad(image: np.ndarray) -> np.ndarray:
    """Upstream's padding: reflection, 32 px top/left, up to the next multiple of 32 (plus 32) bottom/right."""
    import cv2

    rows, cols = image.shape[:2]
    return cv2.copyMakeBorder(image, PAD, PAD - rows % PAD, PAD, PAD - cols % PAD, cv2.BORDER_REFLECT)


def restore(pred: np.ndarray, scaled_shape: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """[3, h', w'] network output -> [H, W, 3] at the image's size: padding cut, the
    background channel zeroed (as upstream), resized with (width, height) (finding 3)."""
    import cv2

    pred = pred.transpose(1, 2, 0)[PAD:PAD + scaled_shape[0], PAD:PAD + scaled_shape[1], :].copy()
    pred[..., 0] = 0
    return cv2.resize(pred, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)


class HpaCellSegmenter:
    def __init__(self, nuclei_model=None, cell_model=None, device: str | None = None):
        import torch

        self._normalize, self._label_cell = _import_upstream()
        self.check(nuclei_model, cell_model)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.nuclei_model = load_model(nuclei_model, self.device)
        self.cell_model = load_model(cell_model, self.device)
        log.info("hpacellseg: models loaded on %s (process %d)", self.device, os.getpid())

    @staticmethod
    def check(nuclei_model=None, cell_model=None) -> None:
        """What the parent of a pool checks before starting workers: upstream importable, both
        weights given (a file or a module). Loads nothing."""
        _import_upstream()  # the install hint, if the packages are missing
        given = {"--nuclei-model": nuclei_model, "--cell-model": cell_model}
        missing = [flag for flag, source in given.items() if source is None]
        if missing:
            raise FileNotFoundError(f"the hpacellseg back-end needs {' and '.join(missing)}: {WEIGHTS_HINT}")
        for flag, source in given.items():
            if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
                raise FileNotFoundError(f"{flag} {source} is a folder; give the weight file itself ({WEIGHT_FILES[flag]})")
            if isinstance(source, (str, os.PathLike)) and not Path(source).is_file():
                raise FileNotFoundError(f"{flag} {source}: weight file not found; {WEIGHTS_HINT}")

    def predict(self, model, rgb: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """uint8 [H, W, 3] -> (the model's softmax, float32 [3, h', w'] at scale 0.25 and padded;
        the scaled size before padding)."""
        import torch

        scaled = rescale(rgb, SCALE_FACTOR)
        x = torch.from_numpy(pad(scaled).transpose(2, 0, 1).copy()).float()[None].to(self.device)
        mean = torch.as_tensor(self._normalize["mean"], device=self.device)[:, None, None]
        std = torch.as_tensor(self._normalize["std"], device=self.device)[:, None, None]
        with torch.inference_mode():
            out = torch.softmax(model((x - mean) / std), dim=1)
        return out[0].cpu().numpy(), scaled.shape[:2]

    def predictions(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(nuclei, cell) predictions, uint8 [H, W, 3] each, as ``pred_nuclei([blue])`` and
        ``pred_cells([[red], [yellow], [blue]])`` return them."""
        from skimage import util

        red, blue, yellow = image[0], image[2], image[3]
        shape = blue.shape
        pred, scaled = self.predict(self.nuclei_model, np.dstack((blue, blue, blue)))
        nuclei = restore(util.img_as_ubyte(pred), scaled, shape)  # upstream: to uint8, then resize
        pred, scaled = self.predict(self.cell_model, np.dstack((red, yellow, blue)))
        cells = util.img_as_ubyte(restore(pred, scaled, shape))  # upstream: resize, then to uint8
        return nuclei, cells

    def label(self, nuclei_pred: np.ndarray, cell_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Upstream's ``label_cell``: predictions -> (nuclei, cells) label images."""
        with warnings.catch_warnings():
            # upstream passes min_size/area_threshold, deprecated in scikit-image 0.26 (same
            # result until their removal in 2.0), several times per call: noise in every log
            warnings.filterwarnings("ignore", category=FutureWarning, message="Parameter `(min_size|area_threshold)`")
            return self._label_cell(nuclei_pred, cell_pred)

    def __call__(self, image: np.ndarray, image_id: str = "") -> tuple[np.ndarray, np.ndarray]:
        try:
            nuclei, cells = self.label(*self.predictions(image))
        except (ValueError, TypeError, RuntimeError, IndexError) as exc:
            # Upstream code raising on one image (an odd size, an out-of-memory GPU) skips that
            # image, logged in failures.csv, instead of ending the whole run.
            raise SegmentationError(f"hpacellseg failed on {image_id or 'an image'} "
                                    f"{tuple(image.shape)}: {type(exc).__name__}: {exc}") from exc
        return nuclei.astype(np.uint16), cells.astype(np.uint16)
