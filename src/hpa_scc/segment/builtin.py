"""The ``builtin`` segmenter: classical nuclei + nucleus-seeded watershed cells, no weights.

    from hpa_scc.segment.builtin import BuiltinSegmenter
    segmenter = BuiltinSegmenter()                   # or BuiltinSegmenter(cell_threshold_scale=0.8)
    nuclei, cells = segmenter(image, "5c27f04c-...")  # uint8 [4, H, W] -> two uint16 [H, W]

Measured by ``bench/segmentation.py`` (synthetic AP, agreement with HPA-Cell-Segmentation on
real images, speed).

How an image is segmented (each step is a method below, in this order):
1. shrink: images larger than ``work_size_px`` (long side) are shrunk to it by area averaging,
   as HPA-Cell-Segmentation works at a quarter of 2048 px; smaller images are used as they are
   and every length parameter is scaled down with them (lengths are px at ``work_size_px``);
2. nuclei (``_nuclei``): blue channel smoothed, thresholded by Otsu on log intensity (HPA
   images are dim with bright structures, so the log spreads the dim end and the threshold
   adapts to each image's contrast), holes filled, specks removed; only clearly non-convex
   blobs (touching nuclei) are split, by h-maxima of the distance transform + watershed;
3. cells (``_cells``): a cytoplasm signal from red (microtubules) and yellow (ER), each
   channel scaled by its own high percentile so both weigh alike whatever the staining;
   foreground by Otsu on its log, small holes filled, small objects removed; then a watershed
   seeded by the nuclei over the inverted smoothed signal, so neighbouring cells meet at the dim
   seam between them. Foreground not reached from a nucleus (cells whose nucleus lies outside
   the field) stays background; every cell has exactly its nucleus;
4. the label images are brought back to the input size by nearest-neighbour upsampling, which
   keeps each cell connected and each nucleus inside its cell.

An image without nuclei (blank, black, or too dim to tell signal from noise) gives two all-zero
label images.

Known limits: a mitotic cell in anaphase shows two chromatin masses and comes out as two cells;
a cell whose nucleus lies outside the field is not segmented (as in HPA-Cell-Segmentation);
below ~200 px on the long side (cells < 20 px across) outlines get too coarse for IoU 0.6.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage
from skimage import filters, measure, morphology, segmentation


@dataclass(frozen=True)
class BuiltinParams:
    """Every setting of the builtin segmenter, with its default. Lengths and areas are in px at
    ``work_size_px`` (scaled down for smaller images); intensities in 8-bit grey levels."""

    # Long side the segmentation runs at: 2048 px images are shrunk 4x, as HPA-Cell-Segmentation
    # does; cells stay 70-110 px across, plenty for a classical method, and it runs in ~0.1 s.
    work_size_px: int = 512
    # What the blue threshold picks out must be on average this much brighter (grey levels, after
    # smoothing) than the blue median, i.e. the background, as nuclei cover well under half of
    # any field; else the channel is blank or camera noise and the image holds no cells.
    # Real nuclei stand 50-200 levels above the background; 2 still takes an image dimmed 30x.
    min_nucleus_contrast: float = 2.0

    # --- nuclei (blue) ---
    nucleus_sigma_px: float = 1.5  # smoothing before the threshold: removes shot noise, keeps outlines
    nucleus_threshold_scale: float = 1.0  # multiplies the log-Otsu threshold (<1 = larger nuclei)
    min_nucleus_area_px: float = 30.0  # specks of blue below this are debris (synthetic mitotic plates are ~100)
    # Blobs below this share of the image's median nucleus area are fragments (a lobe cut off by
    # the threshold) unless cut by the border, where a sliver of a nucleus is expected.
    min_nucleus_area_share: float = 0.05
    # Only blobs less convex than this may be split: single nuclei, even elongated ones, mostly
    # have solidity >= 0.9, while two touching nuclei make a waist. (A binucleate cell's pair,
    # ~0.89, stays one nucleus, as HPA-Cell-Segmentation keeps such a cell whole.)
    nucleus_split_solidity: float = 0.85
    # ...and only at a waist this much narrower (px of distance transform) than both lobes, so
    # that a notch in a single nucleus does not cut it.
    nucleus_split_h_px: float = 3.0

    # --- cells (red + yellow) ---
    # Weights of the R, G, B, Y channels in the cytoplasm signal. Green is left out: it is the
    # protein of interest, nuclear in some images and absent in others, so it would make the
    # cell outline depend on the protein.
    cytoplasm_weights_rgby: tuple[float, float, float, float] = (1.0, 0.0, 0.0, 1.0)
    # Each channel is scaled so this percentile maps to 255; the floor (grey levels) keeps a
    # nearly empty channel from being blown up into noise.
    norm_percentile: float = 99.9
    norm_floor: float = 20.0
    cell_sigma_px: float = 2.0  # smoothing of the cytoplasm signal before the threshold
    cell_threshold_scale: float = 1.0  # multiplies the log-Otsu threshold (<1 = larger cells)
    # Holes in the foreground up to this area are filled (dim spots in the cytoplasm); larger
    # ones are kept, as confluent fields enclose real background gaps between cells.
    max_hole_area_px: float = 300.0
    min_cell_area_px: float = 200.0  # foreground blobs below this are debris (typical cell ~5000)
    landscape_sigma_px: float = 2.0  # extra smoothing of the watershed landscape: smoother seams
    compactness: float = 0.0  # skimage watershed compactness; 0 = pure intensity flooding

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            default = field.default
            if isinstance(default, tuple):
                ok = isinstance(value, (tuple, list)) and len(value) == len(default) and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
                if ok:
                    object.__setattr__(self, field.name, tuple(float(v) for v in value))
                    if min(value) < 0 or sum(value) <= 0:
                        raise ValueError(f"{field.name} must be >= 0 with a positive sum, got {value!r}")
            elif isinstance(default, int):
                ok = isinstance(value, int) and not isinstance(value, bool)
            else:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok:
                raise TypeError(f"builtin segmenter parameter {field.name} must be like {default!r} "
                                f"({type(default).__name__}), got {value!r}")
            if not isinstance(default, tuple) and value < 0:
                raise ValueError(f"builtin segmenter parameter {field.name} must be >= 0, got {value!r}")
        if self.work_size_px < 16:
            raise ValueError(f"work_size_px must be at least 16, got {self.work_size_px}")


class BuiltinSegmenter:
    """``segmenter(image, image_id) -> (nuclei, cells)``: uint8 [4, H, W] RGBY -> two uint16 [H, W]
    label images at the input size, 0 background, ids 1..N, cell k holding nucleus k.

    Parameters are the fields of ``BuiltinParams``; an unknown one is a TypeError naming it.
    """

    def __init__(self, **params):
        known = {f.name for f in dataclasses.fields(BuiltinParams)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise TypeError(f"unknown builtin segmenter parameter(s) {unknown}; choose from {sorted(known)}")
        self.params = BuiltinParams(**params)

    def __repr__(self) -> str:
        return f"BuiltinSegmenter({self.params})"

    def __call__(self, image: np.ndarray, image_id: str = "") -> tuple[np.ndarray, np.ndarray]:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[0] != 4 or image.dtype != np.uint8:
            raise ValueError(f"{image_id or 'image'}: builtin segmenter needs uint8 [4, H, W] (R, G, B, Y), "
                             f"got {image.dtype} {image.shape}")
        height, width = image.shape[1:]
        empty = np.zeros((height, width), np.uint16)
        if height == 0 or width == 0:
            return empty, empty.copy()

        p = self.params
        scale = min(1.0, p.work_size_px / max(height, width))
        size = (max(round(width * scale), 1), max(round(height * scale), 1))  # (w, h), as OpenCV wants
        # Float before shrinking: averaging in uint8 would round away the grey levels that
        # matter in dim images.
        planes = np.stack([cv2.resize(plane.astype(np.float32), size, interpolation=cv2.INTER_AREA)
                           if scale < 1 else plane.astype(np.float32) for plane in image])
        # Lengths are px at work_size_px; an image smaller than that gets them scaled down.
        length = max(size) / p.work_size_px

        nuclei = self._nuclei(planes[2], length)
        if nuclei.max() == 0:
            return empty, empty.copy()
        cells = self._cells(planes, nuclei, length)
        nuclei, cells = _consistent(nuclei, cells)
        if scale < 1:
            # Nearest-neighbour upsampling maps every work pixel to a block of output pixels,
            # so cells stay connected and nucleus k stays inside cell k.
            nuclei = cv2.resize(nuclei, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)
            cells = cv2.resize(cells, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)
        return nuclei, cells

    # ------------------------------------------------------------------------------------------
    def _nuclei(self, blue: np.ndarray, length: float) -> np.ndarray:
        """Nucleus labels int32 [h, w] (0 background) from the blue channel at work scale."""
        p = self.params
        smooth = _blur(blue, p.nucleus_sigma_px * length)
        threshold = _log_otsu(smooth) * p.nucleus_threshold_scale
        mask = smooth > threshold
        if not mask.any() or smooth[mask].mean() - np.median(smooth) < p.min_nucleus_contrast:
            return np.zeros(blue.shape, np.int32)
        mask = ndimage.binary_fill_holes(mask)  # dark nucleoli inside a nucleus
        mask = _drop_small(mask, p.min_nucleus_area_px * length**2)

        blobs = measure.label(mask, connectivity=1)
        if blobs.max() == 0:
            return blobs.astype(np.int32)
        # Fragments much smaller than the typical nucleus of this image go, unless the border
        # cuts them (then the cell is mostly outside, and its sliver of nucleus is all we see).
        areas = np.bincount(blobs.ravel())
        at_border = np.zeros(len(areas), bool)
        at_border[np.concatenate([blobs[0], blobs[-1], blobs[:, 0], blobs[:, -1]])] = True
        keep = (areas >= p.min_nucleus_area_share * np.median(areas[1:])) | at_border
        keep[0] = False
        mask = keep[blobs]
        blobs = np.where(mask, blobs, 0)

        # Split only non-convex blobs: a single elongated nucleus has a flat distance ridge
        # whose noise bumps would otherwise cut it in two.
        convex = np.ones(len(areas), bool)
        for region in measure.regionprops(blobs):
            convex[region.label] = region.solidity >= p.nucleus_split_solidity
        if convex[1:].all():
            return measure.label(mask, connectivity=1).astype(np.int32)
        dist = ndimage.distance_transform_edt(mask).astype(np.float32)
        dist = _blur(dist, length)  # 1 px of smoothing: jagged outlines make spurious peaks
        peaks = morphology.h_maxima(dist, p.nucleus_split_h_px * length).astype(bool)
        whole = convex[blobs] & mask
        markers = measure.label((peaks & ~convex[blobs] & mask) | whole, connectivity=1)
        return segmentation.watershed(-dist, markers, mask=mask, connectivity=1).astype(np.int32)

    def _cells(self, planes: np.ndarray, nuclei: np.ndarray, length: float) -> np.ndarray:
        """Cell labels int32 [h, w]: watershed from ``nuclei`` over the cytoplasm signal."""
        p = self.params
        signal = np.zeros(planes.shape[1:], np.float32)
        for weight, plane in zip(p.cytoplasm_weights_rgby, planes):
            if weight:
                top = max(float(np.percentile(plane, p.norm_percentile)), p.norm_floor)
                signal += (weight * 255.0 / top) * plane
        signal = _blur(signal / sum(p.cytoplasm_weights_rgby), p.cell_sigma_px * length)

        foreground = signal > _log_otsu(signal) * p.cell_threshold_scale
        foreground = _fill_small_holes(foreground, p.max_hole_area_px * length**2)
        foreground = _drop_small(foreground, p.min_cell_area_px * length**2) | (nuclei > 0)
        landscape = -_blur(signal, p.landscape_sigma_px * length)
        return segmentation.watershed(landscape, nuclei, mask=foreground, connectivity=1,
                                      compactness=p.compactness).astype(np.int32)


# ----------------------------------------------------------------------------------------------
def _blur(plane: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing (float32); a sigma under 0.3 px would be a no-op kernel anyway."""
    return cv2.GaussianBlur(plane, (0, 0), sigma) if sigma >= 0.3 else plane


def _log_otsu(plane: np.ndarray) -> float:
    """Otsu's threshold of log(1 + intensity), back in intensity units.

    Background is near black and cells span two decades of brightness; on the log scale the
    two classes are far apart and Otsu splits them where a linear Otsu would cut the cells.
    """
    logs = np.log1p(np.maximum(plane, 0))
    if logs.max() <= logs.min():  # a flat image has no foreground
        return float(np.inf)
    return float(np.expm1(filters.threshold_otsu(logs)))


def _drop_small(mask: np.ndarray, min_area: float) -> np.ndarray:
    """``mask`` without its 4-connected blobs smaller than ``min_area`` px."""
    if min_area <= 1 or not mask.any():
        return mask
    n, comp, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=4)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area
    keep[0] = False
    return keep[comp]


def _fill_small_holes(mask: np.ndarray, max_area: float) -> np.ndarray:
    """``mask`` with its enclosed holes of at most ``max_area`` px filled."""
    holes = ndimage.binary_fill_holes(mask) & ~mask
    if not holes.any():
        return mask
    n, comp, stats, _ = cv2.connectedComponentsWithStats(holes.view(np.uint8), connectivity=4)
    small = stats[:, cv2.CC_STAT_AREA] <= max_area
    small[0] = False
    return mask | small[comp]


def _consistent(nuclei: np.ndarray, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both label images as uint16 with ids 1..N, nucleus k inside cell k, no id without the other."""
    nuclei = np.where(cells == nuclei, nuclei, 0)  # a nucleus pixel outside its own cell is dropped
    n = int(max(nuclei.max(), cells.max()))
    present = np.zeros(n + 1, bool)
    present[np.unique(nuclei)] = True
    present[0] = False
    lut = np.zeros(n + 1, np.uint16)
    lut[present] = np.arange(1, int(present.sum()) + 1)
    return lut[nuclei], lut[cells]


__all__ = ["BuiltinParams", "BuiltinSegmenter"]
