"""Synthetic HPA fields of view whose every cell's labels are known.

    python -m hpa_scc synth OUT_DIR --images N --size PX --seed S

Real HPA images carry image-level labels only, so weak supervision cannot be measured cell by
cell on them. This module draws four-channel images that look like HPA confocal fields
(microtubules red, protein of interest green, nucleus blue, ER yellow) together with the truth:
a cell label image, a nucleus label image, and each cell's own labels.

How an image is made (each step is a function below, in this order):
1. image labels: 1-4 classes with the Kaggle skew flattened (``sample_image_labels``);
2. layout: cells placed as star-shaped outlines around their nuclei, some attached to
   neighbours (clusters, confluent patches with shared boundaries), some cut by the border,
   a few mitotic (``_place_cells``, ``_rasterize``);
3. cell labels: each cell shows a random share of the image's labels (``assign_cell_labels``);
4. rendering: every cell is drawn inside its bounding box: nucleus with nucleoli, radiating
   microtubules, a reticular ER dense near the nucleus, and one green pattern per label
   (``GREEN_PATTERNS``); then blur, uneven illumination and shot/read noise (``_finish``).

Image ``index`` of seed ``seed`` is drawn from ``np.random.default_rng([seed, index])``, so it is
the same whatever the number of images or workers. All lengths are given in pixels at 512 px
and scale with ``size / 512``.

Layout written by ``write_synth_set`` (the Kaggle layout plus the truth); ``SynthSet`` names every
path of it, for this module and for the steps that read the truth (prepare, predict, visualize):
    OUT/train.csv                   ID,Label (image labels, e.g. 8|5|0)
    OUT/train/<ID>_<channel>.png    8-bit red, green, blue, yellow
    OUT/masks/<ID>.png              uint16 cell label image (0 background, cells 1..N)
    OUT/nuclei/<ID>.png             uint16 nucleus label image (nucleus k inside cell k)
    OUT/cells.csv                   ID,cell,Label: each cell's true labels
    OUT/solution.csv                the truth in the Kaggle submission format
    OUT/meta/<ID>.json              per-image record, written last: an image is done when it exists
    OUT/synth.json                  the set's parameters (size, seed, version); a rerun must match
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

from hpa_scc.constants import (CHANNELS, CLASS_NAMES, KAGGLE_CLASS_COUNTS, MITOTIC_SPINDLE, NEGATIVE,
                               NUM_CLASSES, format_labels, parse_labels)
from hpa_scc.utils.fileio import write_png_atomic, write_text_atomic
from hpa_scc.utils.pool import run_pool, single_threaded_opencv
from hpa_scc.evaluation.submission import SubmissionRow, cells_to_row, write_submission

# Bump when a change makes the same (seed, index) draw a different image: a rerun into a folder
# made by another version then fails instead of mixing two generators in one set.
SYNTH_VERSION = 1

REF_SIZE = 512  # lengths below are px at this size; they scale with size / REF_SIZE
MIN_SIZE = 64  # below this a nucleus is a few pixels and the patterns lose their meaning
MAX_SIZE = 4096  # the largest real HPA images are 3072 px; one 4096 px image needs ~1 GiB while drawn

# --- labels ---------------------------------------------------------------------------------
# Number of labels per image: real Kaggle shares of 1, 2, 3 and 4 labels.
N_LABELS_SHARE = {1: 0.48, 2: 0.41, 3: 0.10, 4: 0.01}
# Classes are drawn with p ~ count**0.5: the real skew, flattened so that rare classes
# (Mitotic spindle, Aggresome) still turn up in sets of a few hundred images.
LABEL_SKEW_POWER = 0.5
# Per image and label, this share of the eligible cells shows the label (single-cell variability).
LABEL_CELL_SHARE = (0.3, 0.9)

# --- layout ---------------------------------------------------------------------------------
# Typical cell radius as a share of the image width: diameters 0.12-0.19 x width, as the real
# 2048 px images (cells 290-445 px across).
CELL_RADIUS_SHARE = (0.06, 0.095)
CELLS_MEDIAN, CELLS_RANGE = 15, (5, 30)  # cells meant to be visible; real median 18 at 2048 px
# Share of images that are confluent sheets (many large cells packed edge to edge) rather than
# scattered cells and clusters on black; the real set has both.
CONFLUENT_SHARE = 0.3
ELONGATED_SHARE = 0.25  # cells drawn with aspect 1.8-3 (spindle-shaped fibroblast-like cells)
MITOTIC_SHARE = 0.05  # of all cells
MITOTIC_SHARE_SPINDLE = 0.15  # in images labelled Mitotic spindle, which need such cells
MITOTIC_RADIUS = (0.55, 0.7)  # mitotic cells round up and look smaller
# Border-cut cells smaller than this share of a typical cell are dropped (with their nucleus):
# such slivers show too little of a cell for its labels to be judged.
MIN_FRAGMENT_SHARE = 0.15
N_ANGLES = 360  # resolution of the polar outline tables
_ANGLES = np.linspace(0.0, 2 * np.pi, N_ANGLES, endpoint=False)

# --- rendering --------------------------------------------------------------------------------
# Channel gains (8-bit units for a pattern of strength 1), drawn per image; chosen so channel
# means and 99th percentiles fall in the range of the real images (README of hpa-sample).
GAIN_RANGE = {"red": (100, 180), "green": (110, 230), "blue": (140, 200), "yellow": (170, 280)}
GREEN_NONSPECIFIC = 0.04  # faint green every cell shows: a Negative cell is dim, not absent


@dataclass
class SynthImage:
    """One synthetic field of view and its truth.

    A mitotic cell's "nucleus" is its condensed chromatin: one plate (metaphase) or two masses
    (anaphase, then one id over two pieces). Every cell is one connected piece.
    """

    image_id: str  # f"synth{seed}-{index:05d}"
    image: np.ndarray  # uint8 [4, H, W], channel order R, G, B, Y
    cells: np.ndarray  # uint16 [H, W], 0 background, cells 1..N (consecutive)
    nuclei: np.ndarray  # uint16 [H, W], nucleus k lies inside cell k (same ids)
    cell_labels: dict[int, list[int]]  # cell id -> its true labels (sorted); [18] if it shows none
    image_labels: list[int]  # union of the cells' non-Negative labels; [18] if all cells are Negative
    mitotic: dict[int, bool]  # cell id -> is the cell mitotic


def image_id_of(index: int, seed: int) -> str:
    return f"synth{seed}-{index:05d}"


# ============================================================================================
# Labels
# ============================================================================================
def _class_weights() -> np.ndarray:
    """[19] drawing probabilities, p ~ Kaggle count ** LABEL_SKEW_POWER."""
    w = np.asarray(KAGGLE_CLASS_COUNTS, dtype=np.float64) ** LABEL_SKEW_POWER
    return w / w.sum()


def sample_image_labels(rng: np.random.Generator) -> list[int]:
    """Draw an image-level label set (sorted): 1-4 classes, or [18] (Negative) alone."""
    p = _class_weights()
    first = int(rng.choice(NUM_CLASSES, p=p))
    if first == NEGATIVE:
        return [NEGATIVE]
    n_labels = int(rng.choice(list(N_LABELS_SHARE), p=list(N_LABELS_SHARE.values())))
    rest = p[:NEGATIVE].copy()  # Negative never joins other labels
    rest[first] = 0.0
    extra = rng.choice(NEGATIVE, size=n_labels - 1, replace=False, p=rest / rest.sum())
    return sorted({first, *(int(i) for i in extra)})


def assign_cell_labels(rng: np.random.Generator, image_labels: list[int], mitotic: list[bool]) -> list[list[int]]:
    """Each cell's labels (sorted lists, [18] for a cell that shows none), given the image's.

    Per label a share p ~ U(0.3, 0.9) of the eligible cells shows it, and at least one does, so
    the union over cells is exactly ``image_labels``. Mitotic spindle (11) is eligible only for
    mitotic cells; a Negative image ([18]) has only Negative cells.
    """
    n_cells = len(mitotic)
    if n_cells == 0:
        raise ValueError("assign_cell_labels needs at least one cell")
    labels = sorted(set(int(i) for i in image_labels))
    if NEGATIVE in labels:
        if labels != [NEGATIVE]:
            raise ValueError(f"Negative (18) comes only alone, got image labels {labels}")
        return [[NEGATIVE] for _ in range(n_cells)]
    if not labels:
        raise ValueError("image_labels is empty; use [18] for a Negative image")
    mitotic_idx = np.flatnonzero(np.asarray(mitotic, dtype=bool))
    shows = np.zeros((n_cells, NUM_CLASSES), dtype=bool)
    for label in labels:
        eligible = mitotic_idx if label == MITOTIC_SPINDLE else np.arange(n_cells)
        if eligible.size == 0:
            raise ValueError("image label 11 (Mitotic spindle) needs at least one mitotic cell")
        share = rng.uniform(*LABEL_CELL_SHARE)
        chosen = eligible[rng.random(eligible.size) < share]
        if chosen.size == 0:  # every image label is shown by at least one cell
            chosen = eligible[[rng.integers(eligible.size)]]
        shows[chosen, label] = True
    return [np.flatnonzero(row).tolist() or [NEGATIVE] for row in shows]


# ============================================================================================
# Layout: where the cells are and what shape they have
# ============================================================================================
@dataclass
class _Cell:
    """Geometry of one cell, centred on its nucleus (image px; the centre may lie outside)."""

    cx: float
    cy: float
    radius: float  # base radius, px
    r_cell: np.ndarray  # [N_ANGLES] outline radius around (cx, cy)
    r_nuc: np.ndarray  # [N_ANGLES] nucleus outline (for mitotic cells: the chromatin's rough extent)
    axis: float  # long axis (rad); for a mitotic cell the spindle axis
    mtoc: float  # direction of the centrosome side: Golgi, aggresome, microtubule aster
    mitotic: bool
    plates: tuple = ()  # mitotic chromatin ellipses (du, dv along/across the axis, half-length, half-width)


def _ellipse_radius(a: float, b: float, angle: float) -> np.ndarray:
    """[N_ANGLES] radius of an ellipse with semi-axes a (along ``angle``) and b."""
    c, s = np.cos(_ANGLES - angle), np.sin(_ANGLES - angle)
    return a * b / np.sqrt((b * c) ** 2 + (a * s) ** 2)


def _harmonics(rng: np.random.Generator, ks: range, amplitude: float) -> np.ndarray:
    """[N_ANGLES] sum of cos(k theta + phase) with N(0, amplitude / sqrt(k)) weights."""
    out = np.zeros(N_ANGLES)
    for k in ks:
        out += rng.normal(0, amplitude / math.sqrt(k)) * np.cos(k * _ANGLES + rng.uniform(0, 2 * np.pi))
    return out


def _make_cell(rng: np.random.Generator, cx: float, cy: float, radius: float, mitotic: bool, s: float) -> _Cell:
    """Draw one cell's outline and nucleus; ``radius`` is the base radius in px."""
    if mitotic:
        # Rounded, smaller; chromatin condensed into a plate (metaphase) or two masses
        # (anaphase) across the spindle axis.
        axis = rng.uniform(0, np.pi)
        r_cell = radius * (1 + _harmonics(rng, range(2, 7), 0.025))
        half_len, half_width = 0.42 * radius, max(0.09 * radius, 1.0)
        if rng.random() < 0.6:
            plates = ((0.0, 0.0, half_len, half_width),)
            r_nuc = _ellipse_radius(half_len, 2.5 * half_width, axis + np.pi / 2)
        else:
            gap = rng.uniform(0.22, 0.32) * radius
            plates = ((-gap, 0.0, 0.85 * half_len, half_width), (gap, 0.0, 0.85 * half_len, half_width))
            r_nuc = _ellipse_radius(half_len, gap + half_width, axis + np.pi / 2)
        return _Cell(cx, cy, radius, r_cell, r_nuc, axis, axis, True, plates)

    axis = rng.uniform(0, np.pi)
    aspect = rng.uniform(1.8, 3.0) if rng.random() < ELONGATED_SHARE else rng.uniform(1.0, 1.6)
    base = _ellipse_radius(radius * math.sqrt(aspect), radius / math.sqrt(aspect), axis)
    # The nucleus sits off-centre: the cell reaches further on one side (first harmonic), and
    # the centrosome, Golgi and most cytoplasm lie on that side.
    side = axis + (np.pi if rng.random() < 0.5 else 0.0) + rng.normal(0, 0.4)
    shape = 1 + rng.uniform(0, 0.3) * np.cos(_ANGLES - side)
    shape += _harmonics(rng, range(2, 7), 0.14)  # irregular polygonal outline
    for _ in range(rng.integers(0, 5)):  # protrusions (lamellipodia, long extensions)
        d = np.angle(np.exp(1j * (_ANGLES - rng.uniform(0, 2 * np.pi))))
        shape += rng.uniform(0.15, 0.7) * np.exp(-((d / rng.uniform(0.12, 0.4)) ** 2))
    shape += _harmonics(rng, range(8, 24), 0.035)  # ruffled edge
    r_cell = base * np.clip(shape, 0.4, None)
    # Nucleus: 14-26 % of the cell's area, oval, roughly along the cell's axis, slightly lobed.
    r_mean = radius * math.sqrt(rng.uniform(0.14, 0.26))
    n_aspect = rng.uniform(1.0, 1.3) + 0.2 * (aspect - 1)
    r_nuc = _ellipse_radius(r_mean * math.sqrt(n_aspect), r_mean / math.sqrt(n_aspect), axis + rng.normal(0, 0.25))
    r_nuc *= 1 + _harmonics(rng, range(2, 5), 0.045)
    r_cell = np.maximum(r_cell, 1.2 * r_nuc + 2.5 * s)  # cytoplasm all round the nucleus
    return _Cell(cx, cy, radius, r_cell, r_nuc, axis, side + rng.normal(0, 0.5), False)


def _place_cells(rng: np.random.Generator, size: int, want_mitotic: bool) -> tuple[list[_Cell], float]:
    """Place cells by dart throwing: some anywhere, some attached to a placed cell (clusters,
    confluent patches). Returns the cells and the image's typical cell radius in px.

    Centres fall up to half a radius outside the image, so cells are cut by the border; centres
    stay 0.75 x (sum of radii) apart, so cytoplasm may overlap (resolved in ``_rasterize``)
    while nuclei (under 0.7 x radius) do not.
    """
    s = size / REF_SIZE
    if rng.random() < CONFLUENT_SHARE:
        r_typ = size * rng.uniform(0.075, CELL_RADIUS_SHARE[1])
        n_visible = int(rng.integers(18, CELLS_RANGE[1] + 1))
        attach = 0.95  # share of cells placed against a neighbour: clustering
    else:
        r_typ = size * rng.uniform(*CELL_RADIUS_SHARE)
        n_visible = int(np.clip(round(rng.lognormal(math.log(CELLS_MEDIAN), 0.5)), *CELLS_RANGE))
        attach = rng.uniform(0.3, 0.9)
    margin = 0.5 * r_typ
    lo, hi = -margin, size + margin
    n_cells = round(n_visible * (hi - lo) / size)  # a few more for the margin: some are dropped there
    mitotic_share = MITOTIC_SHARE_SPINDLE if want_mitotic else MITOTIC_SHARE
    centres = np.zeros((0, 2))
    radii = np.zeros(0)
    cells: list[_Cell] = []
    for k in range(n_cells):
        # Status and size are drawn before the position and kept through the retries: were they
        # redrawn on rejection, small (mitotic) cells would win crowded fields.
        forced = want_mitotic and k == 0  # the image's Mitotic spindle needs a whole mitotic cell
        mitotic = forced or rng.random() < mitotic_share
        radius = r_typ * rng.lognormal(0, 0.18)
        if mitotic:
            radius *= rng.uniform(*MITOTIC_RADIUS)
        for _ in range(40):
            if forced:
                xy = rng.uniform(0.3 * size, 0.7 * size, 2)
            elif cells and rng.random() < attach:
                j = rng.integers(len(cells))
                angle = rng.uniform(0, 2 * np.pi)
                dist = (radii[j] + radius) * rng.uniform(0.75, 1.05)  # touching or overlapping
                xy = centres[j] + dist * np.array([np.cos(angle), np.sin(angle)])
                if not (lo <= xy[0] <= hi and lo <= xy[1] <= hi):
                    continue
            else:
                xy = rng.uniform(lo, hi, 2)
            if len(cells) == 0 or np.all(np.hypot(*(centres - xy).T) >= 0.75 * (radii + radius)):
                cells.append(_make_cell(rng, float(xy[0]), float(xy[1]), radius, mitotic, s))
                centres = np.vstack([centres, xy])
                radii = np.append(radii, radius)
                break
    return cells, r_typ


def _polar(cell: _Cell, x0: int, x1: int, y0: int, y1: int):
    """Offsets, distance and angle-table index of the pixels of box [y0:y1, x0:x1] from the centre."""
    dx = (np.arange(x0, x1, dtype=np.float32) - np.float32(cell.cx))[None, :]
    dy = (np.arange(y0, y1, dtype=np.float32) - np.float32(cell.cy))[:, None]
    rho = np.sqrt(dx * dx + dy * dy)
    idx = np.floor(np.arctan2(dy, dx) * np.float32(N_ANGLES / (2 * np.pi))).astype(np.int32) % N_ANGLES
    return dx, dy, rho, idx


def _nucleus_mask(cell: _Cell, dx, dy, rho, idx) -> np.ndarray:
    """bool mask of the nucleus (chromatin for a mitotic cell) over the box of dx, dy."""
    if not cell.mitotic:
        return rho <= cell.r_nuc[idx]
    ca, sa = math.cos(cell.axis), math.sin(cell.axis)
    u = dx * ca + dy * sa  # along the spindle axis
    v = -dx * sa + dy * ca  # along the plate
    mask = np.zeros(np.broadcast_shapes(dx.shape, dy.shape), dtype=bool)
    for du, dv, half_len, half_width in cell.plates:
        mask |= ((u - du) / half_width) ** 2 + ((v - dv) / half_len) ** 2 <= 1
    return mask


def _rasterize(cells: list[_Cell], size: int, r_typ: float) -> tuple[np.ndarray, np.ndarray, list[_Cell]]:
    """Cell and nucleus label images (uint16 [size, size], ids 1..N) and the cells kept.

    Where outlines overlap, a pixel goes to the cell it lies deepest in (smallest distance
    relative to that cell's outline radius), so touching cells share a boundary; nuclei win
    their pixels outright, so nucleus k always lies in cell k. Each cell then keeps only its
    connected part that holds its nucleus. Cells without a visible nucleus, and border cells
    smaller than MIN_FRAGMENT_SHARE of a typical cell, are dropped.
    """
    lab = np.zeros((size, size), np.int32)
    nuc = np.zeros((size, size), np.int32)
    best = np.full((size, size), np.inf, np.float32)
    boxes: list[tuple | None] = []
    for i, cell in enumerate(cells, start=1):
        reach = float(cell.r_cell.max()) + 1
        x0, x1 = max(int(cell.cx - reach), 0), min(int(cell.cx + reach) + 2, size)
        y0, y1 = max(int(cell.cy - reach), 0), min(int(cell.cy + reach) + 2, size)
        if x0 >= x1 or y0 >= y1:
            boxes.append(None)
            continue
        dx, dy, rho, idx = _polar(cell, x0, x1, y0, y1)
        nuc[y0:y1, x0:x1][_nucleus_mask(cell, dx, dy, rho, idx)] = i  # later nuclei overwrite
        boxes.append((np.s_[y0:y1, x0:x1], rho / cell.r_cell[idx].astype(np.float32)))
    for i, box in enumerate(boxes, start=1):
        if box is None:
            continue
        sl, depth = box
        depth = np.where(nuc[sl] == i, np.float32(-1), depth)
        win = (depth < 1) & (depth < best[sl])
        best[sl][win] = depth[win]
        lab[sl][win] = i

    min_area = MIN_FRAGMENT_SHARE * np.pi * r_typ**2
    keep = []
    for i, box in enumerate(boxes, start=1):
        if box is None:
            continue
        sl = box[0]
        mask, nmask = lab[sl] == i, nuc[sl] == i
        if not nmask.any():
            lab[sl][mask] = 0
            continue
        n_comp, comp = cv2.connectedComponents(mask.view(np.uint8), connectivity=4)
        if n_comp > 2:  # the cell was cut in pieces by a neighbour: keep the piece with most nucleus
            main = np.bincount(comp[nmask], minlength=n_comp)[1:].argmax() + 1
            stray = mask & (comp != main)
            lab[sl][stray] = 0
            nuc[sl][stray & nmask] = 0
            mask &= ~stray
        at_border = (sl[0].start == 0 and mask[0].any()) or (sl[0].stop == size and mask[-1].any()) or \
                    (sl[1].start == 0 and mask[:, 0].any()) or (sl[1].stop == size and mask[:, -1].any())
        if at_border and mask.sum() < min_area:
            lab[sl][mask] = 0
            nuc[sl][nuc[sl] == i] = 0
            continue
        keep.append(i)
    lut = np.zeros(len(cells) + 1, np.uint16)
    lut[keep] = np.arange(1, len(keep) + 1)
    return lut[lab], lut[nuc], [cells[i - 1] for i in keep]


# ============================================================================================
# Rendering
# ============================================================================================
def _normalised(field: np.ndarray) -> np.ndarray:
    return (field - field.mean()) / (field.std() + 1e-6)


def _texture_fields(rng: np.random.Generator, size: int, s: float) -> dict[str, np.ndarray]:
    """Image-wide float32 [size, size] textures that cells take crops of.

    net: ER-like reticulum in [0, 1] (the zero crossings of band-pass noise form a mesh);
    grain: fine N(0, 1) texture (chromatin, granularity); blotch: slow N(0, 1) variation.
    """
    noise = rng.standard_normal((size, size), dtype=np.float32)
    band = cv2.GaussianBlur(noise, (0, 0), max(0.9 * s, 0.5)) - cv2.GaussianBlur(noise, (0, 0), max(2.2 * s, 1.0))
    net = np.exp(-((_normalised(band) / 0.55) ** 2))
    noise = rng.standard_normal((size, size), dtype=np.float32)
    grain = _normalised(cv2.GaussianBlur(noise, (0, 0), max(0.7 * s, 0.4)))
    coarse = rng.standard_normal((max(size // 32, 4),) * 2).astype(np.float32)
    blotch = _normalised(cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC))
    return {"net": net, "grain": grain, "blotch": blotch}


def _pts(x, y) -> np.ndarray:
    """Float px coordinates -> int32 [..., 2] for OpenCV drawing with shift=4 (1/16 px)."""
    return np.round(np.stack([x, y], axis=-1) * 16).astype(np.int32)


def _walks(rng, x, y, angle, n_steps: int, step: float, turn_sd: float) -> list[np.ndarray]:
    """Random-walk polylines from (x, y) [n] heading ``angle`` [n]: a list of int32 [n_steps+1, 2]."""
    n = len(x)
    headings = angle[:, None] + np.cumsum(rng.normal(0, turn_sd, (n, n_steps)), axis=1)
    px = np.concatenate([x[:, None], x[:, None] + np.cumsum(step * np.cos(headings), axis=1)], axis=1)
    py = np.concatenate([y[:, None], y[:, None] + np.cumsum(step * np.sin(headings), axis=1)], axis=1)
    return list(_pts(px, py))


def _draw_lines(shape, paths, rng, thickness: int, levels=(255, 180, 110)) -> np.ndarray:
    """Antialiased polylines at a few brightness levels -> float32 [h, w] in [0, 1]."""
    canvas = np.zeros(shape, np.uint8)
    group = rng.integers(len(levels), size=len(paths))
    for level, value in enumerate(levels):
        chosen = [p for p, g in zip(paths, group) if g == level]
        if chosen:
            cv2.polylines(canvas, chosen, False, int(value), thickness, cv2.LINE_AA, 4)
    return canvas.astype(np.float32) / 255


def _draw_dots(shape, x, y, radius, value) -> np.ndarray:
    """Filled antialiased discs -> float32 [h, w] in [0, 1]; x, y, radius, value are [n] (value 0-255)."""
    canvas = np.zeros(shape, np.uint8)
    centres, radii = _pts(x, y), np.maximum(np.round(np.asarray(radius) * 16), 8).astype(int)
    for (cx, cy), r, v in zip(centres, radii, np.broadcast_to(value, len(radii))):
        cv2.circle(canvas, (int(cx), int(cy)), int(r), int(v), -1, cv2.LINE_AA, 4)
    return canvas.astype(np.float32) / 255


class _View:
    """One cell seen through its bounding box: masks, distance fields and texture crops.

    Every array is [h, w] over the box ``sl`` of the image; (ox, oy) is the nucleus centre
    in box coordinates. Distances are in px.
    """

    def __init__(self, cell: _Cell, cell_id: int, sl, cells: np.ndarray, nuclei: np.ndarray,
                 fields: dict[str, np.ndarray], rng: np.random.Generator, s: float):
        self.cell, self.sl, self.s = cell, sl, s
        y0, x0 = sl[0].start, sl[1].start
        self.ox, self.oy = cell.cx - x0, cell.cy - y0
        self.m = cells[sl] == cell_id
        self.n = nuclei[sl] == cell_id
        self.cyto = self.m & ~self.n
        self.shape = self.m.shape
        # Distance to the outside of the cell; the image border is not an edge (the box does
        # not extend past it, and distanceTransform treats beyond-the-array as inside).
        self.d_edge = cv2.distanceTransform(self.m.view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_5)
        self.d_nuc = cv2.distanceTransform((~self.n).view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_5)
        self.d_in = cv2.distanceTransform(self.n.view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_5)
        # 0 at the nucleus, 1 at the cell edge: the radial coordinate of the cytoplasm.
        self.t = np.where(self.cyto, self.d_nuc / (self.d_nuc + self.d_edge + 1e-3), 0).astype(np.float32)
        self.net, self.grain, self.blotch = (fields[k][sl] for k in ("net", "grain", "blotch"))
        self.ramp = 0.45 + 0.55 * np.minimum(self.d_edge / (3 * s), 1)  # soft, dimmer cell edge
        self.nucleoli, self.nucleoli_list = self._draw_nucleoli(rng)
        self.r_mean = float(cell.r_cell.mean())
        self._filaments = self._spindle = None

    def nuc_edge_point(self, angle: float, extra: float = 0.0) -> tuple[float, float]:
        """Box coordinates of the point ``extra`` px beyond the nucleus outline at ``angle``."""
        r = self.cell.r_nuc[int(angle % (2 * np.pi) / (2 * np.pi) * N_ANGLES) % N_ANGLES] + extra
        return self.ox + r * math.cos(angle), self.oy + r * math.sin(angle)

    def sample(self, rng, weight: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """n random box positions (x, y) [n] drawn with probability ~ weight [h, w]."""
        flat = weight.ravel().astype(np.float64)
        total = flat.sum()
        if n <= 0 or total <= 0:
            return np.zeros(0), np.zeros(0)
        idx = rng.choice(flat.size, size=n, p=flat / total)
        y, x = np.divmod(idx, self.shape[1])
        return x + rng.uniform(-0.5, 0.5, n), y + rng.uniform(-0.5, 0.5, n)

    def _draw_nucleoli(self, rng):
        """1-4 nucleoli inside an interphase nucleus: soft float32 [h, w] and their ellipses."""
        if self.cell.mitotic:
            return np.zeros(self.shape, np.float32), []
        canvas = np.zeros(self.shape, np.uint8)
        r_nuc = float(self.cell.r_nuc.mean())
        found = []
        for _ in range(rng.integers(1, 5)):
            angle = rng.uniform(0, 2 * np.pi)
            x, y = self.nuc_edge_point(angle, 0.0)
            f = rng.uniform(0.0, 0.55)
            x, y = self.ox + f * (x - self.ox), self.oy + f * (y - self.oy)
            a, b = r_nuc * rng.uniform(0.1, 0.2), r_nuc * rng.uniform(0.08, 0.15)
            a, b = max(a, 0.8), max(b, 0.8)
            cv2.ellipse(canvas, (int(x * 16), int(y * 16)), (int(a * 16), int(b * 16)),
                        rng.uniform(0, 180), 0, 360, 255, -1, cv2.LINE_AA, 4)
            found.append((x, y, a, b))
        soft = cv2.GaussianBlur(canvas.astype(np.float32) / 255, (0, 0), max(0.6 * self.s, 0.3))
        return soft * self.n, found

    # Shared structures, drawn once per cell and used by several channels -----------------------
    def filaments(self, rng) -> np.ndarray:
        """Microtubules [h, w] in [0, 1]: filaments radiating from around the nucleus and the
        centrosome out to the edge, plus some crossing the cytoplasm (a mesh)."""
        if self._filaments is None:
            s, cell = self.s, self.cell
            n = int(rng.uniform(0.7, 1.4) * 2 * np.pi * self.r_mean / (2.5 * s))
            n_rad = int(0.7 * n)
            start = rng.uniform(0, 2 * np.pi, n_rad)
            # A third radiate from the aster at the centrosome, the rest from all round the nucleus.
            from_mtoc = rng.random(n_rad) < 0.35
            start[from_mtoc] = cell.mtoc + rng.normal(0, 0.3, from_mtoc.sum())
            r0 = cell.r_nuc[(start % (2 * np.pi) / (2 * np.pi) * N_ANGLES).astype(int) % N_ANGLES]
            r0 = r0 * rng.uniform(0.7, 1.05, n_rad)
            x, y = self.ox + r0 * np.cos(start), self.oy + r0 * np.sin(start)
            step = 3.0 * s
            n_steps = int(np.ceil(1.3 * cell.r_cell.max() / step))
            paths = _walks(rng, x, y, start + rng.normal(0, 0.3, n_rad), n_steps, step, 0.17)
            xs, ys = self.sample(rng, self.cyto, n - n_rad)
            paths += _walks(rng, xs, ys, rng.uniform(0, 2 * np.pi, len(xs)), n_steps // 2, step, 0.17)
            lines = _draw_lines(self.shape, paths, rng, max(1, round(0.6 * s)))
            self._filaments = lines * (0.75 + 0.25 * np.clip(self.grain, -1, 1))  # beaded, as in confocal
        return self._filaments

    def spindle(self, rng) -> np.ndarray:
        """Mitotic spindle [h, w] in [0, 1]: fibres from two poles to the chromatin, pole asters."""
        if self._spindle is None:
            s, cell = self.s, self.cell
            ca, sa = math.cos(cell.axis), math.sin(cell.axis)
            pole_dist = 0.62 * cell.radius
            half_len = cell.plates[0][2]
            paths = []
            for sign in (-1, 1):
                px, py = self.ox + sign * pole_dist * ca, self.oy + sign * pole_dist * sa
                k = rng.integers(10, 18)
                along = rng.uniform(-1.1, 1.1, k) * half_len  # ends spread along the plate
                reach = rng.uniform(0.0, 0.25, k) * pole_dist  # some pass beyond the plate
                ex = self.ox - sign * reach * ca - along * sa
                ey = self.oy - sign * reach * sa + along * ca
                for x1, y1 in zip(ex, ey):
                    mid = 0.5 * np.array([px + x1, py + y1])
                    paths.append(_pts(np.array([px, mid[0], x1]), np.array([py, mid[1], y1])))
                # Short astral rays from the pole outwards.
                a = cell.axis + (0 if sign > 0 else np.pi) + rng.uniform(-1.3, 1.3, 6)
                paths += _walks(rng, np.full(6, px), np.full(6, py), a, 3, 2.5 * s, 0.1)
            lines = _draw_lines(self.shape, paths, rng, max(1, round(0.8 * s)), levels=(255, 200))
            poles = _draw_dots(self.shape, self.ox + np.array([-1, 1]) * pole_dist * ca,
                               self.oy + np.array([-1, 1]) * pole_dist * sa, [1.6 * s] * 2, 255)
            self._spindle = np.maximum(lines, poles)
        return self._spindle


def _render_cell(v: _View, rng: np.random.Generator, labels: list[int], canvas: np.ndarray) -> None:
    """Add one cell's four channels (float, pattern strength ~1) into canvas [4, H, W] at v.sl."""
    cell, m = v.cell, v.m
    bright = rng.lognormal(0, 0.25, 4).astype(np.float32)  # cells differ in staining and thickness
    if cell.mitotic:
        bright[[0, 3]] *= 1.25  # rounded-up mitotic cells are thicker, hence brighter

    # Red: diffuse tubulin, dimmer towards the edge, plus filaments (the spindle in mitosis).
    diffuse = 0.2 * (0.4 + 0.6 * (1 - v.t) ** 0.8) * (1 + 0.15 * v.blotch)
    fil = v.spindle(rng) * 0.8 + 0.1 * v.filaments(rng) if cell.mitotic else v.filaments(rng)
    red = (diffuse + 0.8 * fil) * v.ramp
    red = np.where(v.n, 0.3 * red, red)  # filaments run above and below the nucleus, out of focus

    # Yellow: ER reticulum, dense around the nucleus and fading outwards, faint nuclear envelope.
    dense = 0.15 + 0.85 * (1 - v.t) ** 2 if not cell.mitotic else np.full(v.shape, 0.55, np.float32)
    er = dense * (0.2 + 0.8 * v.net) * v.ramp
    if not cell.mitotic:  # the nuclear envelope is ER: a bright rim hugging the nucleus
        er = er + 0.3 * (0.5 + 0.5 * v.net) * np.exp(-v.d_nuc / max(1.5 * v.s, 0.7))
    yellow = np.where(v.n, 0.1 + 0.3 * np.exp(-v.d_in / max(1.2 * v.s, 0.6)), er)

    # Blue: textured nucleus, dark nucleoli, slightly dimmer rim; condensed chromatin is brighter.
    if cell.mitotic:
        blue = 1.35 * (0.85 + 0.15 * np.clip(v.grain, -2, 2))
    else:
        blue = (0.78 + 0.16 * np.clip(v.grain, -2.5, 2.5) + 0.1 * v.blotch) * (1 - 0.6 * v.nucleoli)
        blue = blue * (0.8 + 0.2 * np.minimum(v.d_in / (3 * v.s), 1))
    blue = np.where(v.n, blue, 0)

    # Green: one pattern per label, each at its own strength; every cell has a faint background.
    green = np.full(v.shape, GREEN_NONSPECIFIC, np.float32) * (1 + 0.3 * v.blotch)
    expression = rng.lognormal(0, 0.4)
    for label in labels:
        if label != NEGATIVE:
            green = green + expression * rng.uniform(0.6, 1.0) * GREEN_PATTERNS[label](v, rng)

    for ch, layer in enumerate((red, green, blue, yellow)):
        canvas[ch][v.sl] += np.where(m, layer * bright[ch], 0)


# Green patterns: one per class, each (view, rng) -> float32 [h, w] of strength ~1 -------------
def _g_nucleoplasm(v, rng):
    fill = (0.8 + 0.2 * np.clip(v.grain, -2, 2)) * (1 - 0.8 * v.nucleoli)
    return np.where(v.n, fill * (0.75 + 0.25 * np.minimum(v.d_in / (2 * v.s), 1)), 0)


def _g_nuclear_membrane(v, rng):
    ring = np.exp(-(((v.d_in + v.d_nuc) / max(1.1 * v.s, 0.7)) ** 2))  # one of the two is 0
    return 1.1 * ring * (0.8 + 0.2 * np.clip(v.grain, -2, 2))


def _g_nucleoli(v, rng):
    if v.cell.mitotic:  # nucleoli dissolve; their proteins coat the condensed chromosomes
        return 0.9 * np.exp(-(((v.d_in + v.d_nuc) / max(1.5 * v.s, 0.8)) ** 2))
    return 1.1 * v.nucleoli + 0.06 * v.n


def _g_fibrillar_center(v, rng):
    if v.cell.mitotic:
        xs, ys = v.sample(rng, v.n, rng.integers(2, 6))
        return _draw_dots(v.shape, xs, ys, rng.uniform(0.6, 1.0, len(xs)) * v.s, 255)
    xs, ys = [], []
    for x, y, a, b in v.nucleoli_list:
        k = rng.integers(1, 4)
        angle, f = rng.uniform(0, 2 * np.pi, k), rng.uniform(0, 0.5, k)
        xs += list(x + f * a * np.cos(angle))
        ys += list(y + f * b * np.sin(angle))
    dots = _draw_dots(v.shape, np.array(xs), np.array(ys), rng.uniform(0.6, 1.1, len(xs)) * v.s, 255)
    return 1.2 * dots + 0.15 * v.nucleoli


def _g_speckles(v, rng):
    weight = v.n & (v.nucleoli < 0.2) & (v.d_in > 1.5 * v.s)
    xs, ys = v.sample(rng, weight if weight.any() else v.n, rng.integers(10, 26))
    # Each speckle is 2-3 overlapping discs: small irregular blobs.
    k = 3 * len(xs)
    x = np.repeat(xs, 3) + rng.normal(0, 1.2 * v.s, k)
    y = np.repeat(ys, 3) + rng.normal(0, 1.2 * v.s, k)
    blobs = _draw_dots(v.shape, x, y, rng.uniform(0.8, 2.0, k) * v.s, np.repeat(rng.integers(150, 256, len(xs)), 3))
    return blobs * v.n + 0.15 * _g_nucleoplasm(v, rng)


def _g_nuclear_bodies(v, rng):
    weight = v.n & (v.nucleoli < 0.2) & (v.d_in > 2 * v.s)
    xs, ys = v.sample(rng, weight if weight.any() else v.n, rng.integers(1, 7))
    dots = _draw_dots(v.shape, xs, ys, rng.uniform(1.2, 2.4, len(xs)) * v.s, 255)
    return 1.2 * dots + 0.05 * v.n


def _g_er(v, rng):
    dense = 0.25 + 0.75 * (1 - v.t) ** 1.4
    return v.cyto * dense * (0.15 + 0.85 * v.net) * v.ramp  # the yellow channel's mesh


def _g_golgi(v, rng):
    # A crescent of small stacks hugging the nucleus on the centrosome side.
    k = rng.integers(10, 26)
    angle = v.cell.mtoc + rng.normal(0, 0.45, k)
    dist = rng.uniform(0.5, 5.0, k) * v.s + rng.uniform(0, 0.12, k) * v.r_mean
    canvas = np.zeros(v.shape, np.uint8)
    for a, d in zip(angle, dist):
        x, y = v.nuc_edge_point(a, d)
        axes = (int(rng.uniform(1.2, 3.5) * v.s * 16) + 8, int(rng.uniform(0.6, 1.4) * v.s * 16) + 8)
        cv2.ellipse(canvas, (int(x * 16), int(y * 16)), axes, math.degrees(a) + 90, 0, 360,
                    int(rng.integers(150, 256)), -1, cv2.LINE_AA, 4)
    return 1.2 * v.cyto * canvas.astype(np.float32) / 255


def _g_intermediate_filaments(v, rng):
    s, cell = v.s, v.cell
    paths = []
    for _ in range(rng.integers(3, 7)):  # cage: wavy arcs around the nucleus
        start, span = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 1.0) * 2 * np.pi
        theta = start + np.linspace(0, span, 48)
        idx = (theta % (2 * np.pi) / (2 * np.pi) * N_ANGLES).astype(int) % N_ANGLES
        r = cell.r_nuc[idx] * rng.uniform(1.05, 1.5) + 1.5 * s * np.sin(theta * rng.integers(3, 8) + rng.uniform(0, 6))
        paths.append(_pts(v.ox + r * np.cos(theta), v.oy + r * np.sin(theta)))
    n = rng.integers(10, 22)  # long wavy filaments from the cage to the periphery
    a = rng.uniform(0, 2 * np.pi, n)
    r0 = cell.r_nuc[(a / (2 * np.pi) * N_ANGLES).astype(int) % N_ANGLES] * 1.1
    step = 4.0 * s
    paths += _walks(rng, v.ox + r0 * np.cos(a), v.oy + r0 * np.sin(a), a + rng.normal(0, 0.6, n),
                    int(np.ceil(1.2 * cell.r_cell.max() / step)), step, 0.18)
    return v.ramp * _draw_lines(v.shape, paths, rng, max(1, round(s)), levels=(255, 170))


def _g_actin(v, rng):
    # Straight stress fibres roughly along the cell's axis, irregularly spaced bundles of
    # different brightness and length, plus the cortex under the membrane.
    h, w = v.shape
    angle = v.cell.axis + rng.normal(0, 0.2)
    half = 0.5 * math.hypot(h, w)
    n = int(2 * half / (rng.uniform(1.5, 3.0) * v.s))
    offsets = rng.uniform(-half, half, n)
    tilt = angle + rng.normal(0, 0.07, n)
    length = rng.uniform(0.3, 0.9, n) * half
    shift = rng.uniform(-0.5, 0.5, n) * half
    cx, cy = w / 2 - offsets * math.sin(angle), h / 2 + offsets * math.cos(angle)
    dx, dy = np.cos(tilt), np.sin(tilt)
    x = np.stack([cx + (shift - length) * dx, cx + (shift + length) * dx], axis=1)
    y = np.stack([cy + (shift - length) * dy, cy + (shift + length) * dy], axis=1)
    fibres = _draw_lines(v.shape, list(_pts(x, y)), rng, max(1, round(0.8 * v.s)), levels=(255, 170, 100, 60))
    fibres *= 0.75 + 0.25 * np.clip(v.grain, -1, 1)
    cortex = np.exp(-v.d_edge / max(1.5 * v.s, 0.8))
    return 0.9 * fibres + 0.7 * cortex + 0.12


def _g_microtubules(v, rng):
    return v.filaments(rng) + 0.1 * v.ramp


def _g_mitotic_spindle(v, rng):
    if not v.cell.mitotic:  # never assigned so (assign_cell_labels), but stay truthful if it were
        return np.zeros(v.shape, np.float32)
    return 1.2 * v.spindle(rng) + 0.08


def _g_centrosome(v, rng):
    if v.cell.mitotic:  # the two spindle poles
        ca, sa = math.cos(v.cell.axis), math.sin(v.cell.axis)
        d = 0.62 * v.cell.radius
        xs, ys = v.ox + np.array([-d, d]) * ca, v.oy + np.array([-d, d]) * sa
    else:
        x, y = v.nuc_edge_point(v.cell.mtoc, rng.uniform(2.0, 4.0) * v.s)
        k = rng.integers(1, 3)
        a = rng.uniform(0, 2 * np.pi)
        xs, ys = x + np.array([0, 2.5 * v.s * math.cos(a)])[:k], y + np.array([0, 2.5 * v.s * math.sin(a)])[:k]
    return 1.4 * _draw_dots(v.shape, xs, ys, rng.uniform(1.0, 1.6, len(xs)) * v.s, 255) + 0.05 * v.cyto


def _g_plasma_membrane(v, rng):
    rim = np.exp(-np.maximum(v.d_edge - 1, 0) / max(1.2 * v.s, 0.7))
    return 1.1 * rim * (0.8 + 0.2 * np.clip(v.grain, -2, 2)) + 0.08 * v.cyto


def _g_mitochondria(v, rng):
    # Many short curved tubules, denser around the nucleus.
    area = int(v.cyto.sum())
    n = min(int(area / (22 * v.s**2)), 600)
    xs, ys = v.sample(rng, v.cyto * ((1 - v.t) ** 0.8 + 0.2), n)
    step = 1.5 * v.s
    paths = _walks(rng, xs, ys, rng.uniform(0, 2 * np.pi, len(xs)), 3, step, 0.5)
    return 1.1 * v.cyto * _draw_lines(v.shape, paths, rng, max(1, round(0.6 * v.s)))


def _g_aggresome(v, rng):
    # One large bright irregular body next to the nucleus, on the centrosome side.
    size = rng.uniform(0.13, 0.22) * v.r_mean
    x, y = v.nuc_edge_point(v.cell.mtoc, size * 0.9)
    k = 3
    blob = _draw_dots(v.shape, x + rng.normal(0, 0.35 * size, k), y + rng.normal(0, 0.35 * size, k),
                      size * rng.uniform(0.55, 0.9, k), 255)
    blob = cv2.GaussianBlur(blob, (0, 0), max(0.8 * v.s, 0.4))
    return 1.6 * blob * v.m + 0.08 * v.cyto


def _g_cytosol(v, rng):
    fill = (0.55 + 0.45 * (1 - v.t)) * (0.85 + 0.15 * v.blotch) * v.ramp
    return np.where(v.n, 0.15, fill) * (0.9 + 0.1 * np.clip(v.grain, -2, 2))


def _g_vesicles(v, rng):
    area = int(v.cyto.sum())
    n = min(int(area / (45 * v.s**2)), 500)
    xs, ys = v.sample(rng, v.cyto * ((1 - v.t) ** 0.5 + 0.3), n)
    dots = _draw_dots(v.shape, xs, ys, rng.uniform(0.7, 1.5, len(xs)) * v.s, rng.integers(120, 256, len(xs)))
    return 1.2 * dots * v.cyto


def _g_negative(v, rng):
    return np.zeros(v.shape, np.float32)


GREEN_PATTERNS = {
    0: _g_nucleoplasm, 1: _g_nuclear_membrane, 2: _g_nucleoli, 3: _g_fibrillar_center,
    4: _g_speckles, 5: _g_nuclear_bodies, 6: _g_er, 7: _g_golgi, 8: _g_intermediate_filaments,
    9: _g_actin, 10: _g_microtubules, 11: _g_mitotic_spindle, 12: _g_centrosome,
    13: _g_plasma_membrane, 14: _g_mitochondria, 15: _g_aggresome, 16: _g_cytosol,
    17: _g_vesicles, 18: _g_negative,
}
assert sorted(GREEN_PATTERNS) == list(range(NUM_CLASSES))


def _finish(canvas: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    """float32 [4, H, W] of pattern strengths -> uint8 [4, H, W]: gains, slight blur, uneven
    illumination, shot and read noise."""
    size = canvas.shape[-1]
    gains = [rng.uniform(*GAIN_RANGE[name]) for name in CHANNELS]
    # Vignetting-like field, smooth over the image, 0.7-1.1.
    coarse = rng.uniform(0.7, 1.1, (4, 4)).astype(np.float32)
    illum = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    shot = rng.uniform(0.5, 1.5)  # variance per unit of signal (8-bit units)
    read = rng.uniform(0.4, 1.2)  # sd of the detector's background noise
    # Optical blur grows slower than the structures: a 2048 px confocal field is sharp at the
    # pixel level (1-1.5 px), not a 512 px image blown up.
    blur_sigma = max(0.6 * math.sqrt(s), 0.3)
    out = np.empty(canvas.shape, np.uint8)
    for ch in range(canvas.shape[0]):
        signal = cv2.GaussianBlur(canvas[ch], (0, 0), blur_sigma) * (illum * np.float32(gains[ch]))
        np.maximum(signal, 0, out=signal)  # texture terms can dip below zero in their tails
        sd = np.sqrt(signal * np.float32(shot) + np.float32(read * read))
        noisy = signal + sd * rng.standard_normal(signal.shape, dtype=np.float32)
        out[ch] = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return out


def generate_image(index: int, *, size: int = 512, seed: int = 0) -> SynthImage:
    """Draw synthetic image ``index`` of ``seed`` at ``size`` x ``size`` px (deterministic)."""
    if size < MIN_SIZE:
        raise ValueError(f"synthetic image size {size} px is too small; use at least {MIN_SIZE}")
    rng = np.random.default_rng([seed, index])
    s = size / REF_SIZE
    image_labels = sample_image_labels(rng)
    layout, r_typ = _place_cells(rng, size, MITOTIC_SPINDLE in image_labels)
    cells, nuclei, kept = _rasterize(layout, size, r_typ)
    mitotic = [c.mitotic for c in kept]
    per_cell = assign_cell_labels(rng, image_labels, mitotic)

    fields = _texture_fields(rng, size, s)
    canvas = np.zeros((4, size, size), np.float32)
    for cell_id, (cell, sl, labels) in enumerate(zip(kept, ndimage.find_objects(cells), per_cell), start=1):
        pad = 2  # a margin of background, so the cell's edge shows in the distance fields
        sl = np.s_[max(sl[0].start - pad, 0):min(sl[0].stop + pad, size),
                   max(sl[1].start - pad, 0):min(sl[1].stop + pad, size)]
        view = _View(cell, cell_id, sl, cells, nuclei, fields, rng, s)
        _render_cell(view, rng, labels, canvas)
    image = _finish(canvas, rng, s)

    cell_labels = {i: labels for i, labels in enumerate(per_cell, start=1)}
    shown = sorted({label for labels in per_cell for label in labels if label != NEGATIVE})
    return SynthImage(
        image_id=image_id_of(index, seed), image=image, cells=cells, nuclei=nuclei,
        cell_labels=cell_labels, image_labels=shown or [NEGATIVE],
        mitotic={i: bool(m) for i, m in enumerate(mitotic, start=1)},
    )


# ============================================================================================
# The set's folder
# ============================================================================================
class SynthSet:
    """A synthetic set's folder: every path of it is named here (layout in the module docstring).

        s = SynthSet("runs/demo/synthetic")
        s.is_synthetic                  # True once written: it has cells.csv and masks/
        s.mask_path("synth0-00003")     # masks/synth0-00003.png, the true cells
        s.true_labels()                 # {ID: {cell id: labels}} from cells.csv
    """

    # The truth's names in the folder, for messages that tell a user what a synthetic set holds.
    MASKS, CELLS_CSV = "masks", "cells.csv"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __fspath__(self) -> str:  # a SynthSet goes wherever a path to it does
        return str(self.root)

    def __repr__(self) -> str:
        return f"SynthSet({str(self.root)!r})"

    # --- the Kaggle layout, which the steps read as any data set (``data.images.find_images``) ----
    @property
    def labels_csv(self) -> Path:
        """train.csv: ID,Label, the image labels."""
        return self.root / "train.csv"

    @property
    def images_dir(self) -> Path:
        return self.root / "train"

    def channel_path(self, image_id: str, channel: str) -> Path:
        """train/<ID>_<channel>.png, one 8-bit channel."""
        return self.images_dir / f"{image_id}_{channel}.png"

    # --- the truth -----------------------------------------------------------------------------
    @property
    def masks_dir(self) -> Path:
        return self.root / self.MASKS

    @property
    def nuclei_dir(self) -> Path:
        return self.root / "nuclei"

    def mask_path(self, image_id: str) -> Path:
        """masks/<ID>.png: the uint16 cell label image (0 background, cells 1..N)."""
        return self.masks_dir / f"{image_id}.png"

    def nuclei_path(self, image_id: str) -> Path:
        """nuclei/<ID>.png: the uint16 nucleus label image (nucleus k inside cell k)."""
        return self.nuclei_dir / f"{image_id}.png"

    def read_mask(self, image_id: str) -> np.ndarray:
        """The true cells of one image, uint16 [H, W]."""
        from hpa_scc.data.images import read_labels

        return read_labels(self.mask_path(image_id))

    def mask_ids(self) -> list[str]:
        """The IDs that have a true cell image, sorted."""
        return [p.stem for p in sorted(self.masks_dir.glob("*.png"))]

    @property
    def cells_csv(self) -> Path:
        """cells.csv: ID,cell,Label, each cell's true labels."""
        return self.root / self.CELLS_CSV

    @property
    def solution_csv(self) -> Path:
        """solution.csv: the truth in the Kaggle submission format."""
        return self.root / "solution.csv"

    @property
    def is_synthetic(self) -> bool:
        """Whether the folder is a synthetic set with its truth (cells.csv and masks/)."""
        return self.cells_csv.is_file() and self.masks_dir.is_dir()

    def true_labels(self) -> dict[str, dict[int, list[int]]]:
        """cells.csv -> {image id: {cell id: labels}}; the cells are masks/<ID>.png."""
        path = self.cells_csv
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: only a synthetic set (python -m hpa_scc synth) has true "
                                    "cell labels")
        table: dict[str, dict[int, list[int]]] = {}
        with open(path, newline="") as fh:
            for line_no, row in enumerate(csv.DictReader(fh), start=2):
                table.setdefault(row["ID"], {})[int(row["cell"])] = parse_labels(row["Label"],
                                                                                 where=f"{path} line {line_no}")
        return table

    # --- synth's own bookkeeping ----------------------------------------------------------------
    @property
    def meta_dir(self) -> Path:
        return self.root / "meta"

    def meta_path(self, image_id: str) -> Path:
        """meta/<ID>.json: the per-image record, written last (an image is done when it exists)."""
        return self.meta_dir / f"{image_id}.json"

    @property
    def params_path(self) -> Path:
        """synth.json: the set's parameters (size, seed, version)."""
        return self.root / "synth.json"


def is_synthetic(data_dir: str | os.PathLike) -> bool:
    """Whether a folder is a synthetic set with its truth (``SynthSet.is_synthetic``)."""
    return SynthSet(data_dir).is_synthetic


def read_true_cell_labels(data_dir: str | os.PathLike) -> dict[str, dict[int, list[int]]]:
    """A synthetic set's cells.csv -> {image id: {cell id: labels}} (``SynthSet.true_labels``)."""
    return SynthSet(data_dir).true_labels()


# ============================================================================================
# Writing a set
# ============================================================================================
def _write_one(task: tuple[str, int, int, int]) -> dict:
    """Generate image ``index`` and write its files; the meta record goes last (the done flag)."""
    out_dir, index, size, seed = task
    out = SynthSet(out_dir)
    synth = generate_image(index, size=size, seed=seed)
    iid = synth.image_id
    for name, plane in zip(CHANNELS, synth.image):
        write_png_atomic(out.channel_path(iid, name), plane)
    write_png_atomic(out.mask_path(iid), synth.cells)
    write_png_atomic(out.nuclei_path(iid), synth.nuclei)
    # The truth in submission form, one encoded mask per cell, kept in the record so the tables
    # can be rebuilt on resume without reading any image back.
    row = cells_to_row(iid, synth.cells, synth.cell_labels)
    masks = iter(text for _, _, text in row.predictions)
    edges = np.concatenate([synth.cells[0], synth.cells[-1], synth.cells[:, 0], synth.cells[:, -1]])
    border_ids = set(np.unique(edges).tolist())
    cells = []
    for cell_id, labels in synth.cell_labels.items():
        texts = [next(masks) for _ in labels]  # the same text repeated once per label
        cells.append({"cell": cell_id, "labels": labels, "mitotic": synth.mitotic[cell_id],
                      "border": cell_id in border_ids, "mask": texts[0]})
    meta = {"id": iid, "index": index, "seed": seed, "size": size, "version": SYNTH_VERSION,
            "image_labels": synth.image_labels, "cells": cells}
    write_text_atomic(out.meta_path(iid), json.dumps(meta))
    return meta


def _check_params(out: SynthSet, size: int, seed: int) -> None:
    """Record the set's parameters in OUT/synth.json, or fail if the folder holds another set."""
    params = {"size": size, "seed": seed, "version": SYNTH_VERSION}
    path = out.params_path
    if path.exists():
        old = json.loads(path.read_text())
        differ = {k: (old.get(k), v) for k, v in params.items() if old.get(k) != v}
        if differ:
            what = ", ".join(f"{k} {a} there vs {b} asked" for k, (a, b) in differ.items())
            raise ValueError(f"{out} holds a synthetic set made with other parameters ({what}); "
                             f"use the same --size/--seed to resume or choose another folder")
    else:
        write_text_atomic(path, json.dumps(params, indent=1) + "\n")


def _load_metas(out: SynthSet) -> list[dict]:
    metas = [json.loads(p.read_text()) for p in sorted(out.meta_dir.glob("*.json"))]
    return sorted(metas, key=lambda m: (m["seed"], m["index"]))


def _write_tables(out: SynthSet, metas: list[dict]) -> None:
    """train.csv, cells.csv and solution.csv from the per-image records, each written atomically."""
    train, cells = io.StringIO(), io.StringIO()
    tw, cw = csv.writer(train, lineterminator="\n"), csv.writer(cells, lineterminator="\n")
    tw.writerow(["ID", "Label"])
    cw.writerow(["ID", "cell", "Label"])
    rows = []
    for meta in metas:
        tw.writerow([meta["id"], format_labels(meta["image_labels"])])
        row = SubmissionRow(meta["id"], meta["size"], meta["size"])
        for cell in meta["cells"]:
            cw.writerow([meta["id"], cell["cell"], format_labels(cell["labels"])])
            row.predictions += [(label, 1.0, cell["mask"]) for label in cell["labels"]]
        rows.append(row)
    write_text_atomic(out.labels_csv, train.getvalue())
    write_text_atomic(out.cells_csv, cells.getvalue())
    write_submission(out.solution_csv, rows)


def write_synth_set(out_dir, n_images: int, *, size: int = 512, seed: int = 0, workers: int = 1,
                    progress: bool = True) -> dict:
    """Write images 0..n_images-1 of ``seed`` under ``out_dir`` (layout in the module docstring).

    Resumable: images whose record OUT/meta/<ID>.json exists are skipped; the tables are rebuilt
    from all records in the folder. Returns a summary dict (see ``format_summary``).
    """
    if n_images < 1:
        raise ValueError(f"--images {n_images}: a synthetic set needs at least 1 image")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"--size {size}: synthetic images are {MIN_SIZE} to {MAX_SIZE} px (real HPA images are "
                         f"1728 to 3072 px; 512 is the usual)")
    out = SynthSet(out_dir)
    # The tables are rebuilt from OUT/meta/: a folder with a train.csv and no meta/ is someone's
    # data set, whose label table would be replaced.
    if out.labels_csv.is_file() and not out.meta_dir.is_dir():
        raise ValueError(f"{out.root} holds a label table (train.csv) that synth did not write; synth would replace "
                         "it: give a folder of its own")
    out.root.mkdir(parents=True, exist_ok=True)
    _check_params(out, size, seed)
    todo = []
    for index in range(n_images):
        path = out.meta_path(image_id_of(index, seed))
        if not (path.exists() and json.loads(path.read_text()).get("size") == size):
            todo.append((str(out.root), index, size, seed))

    start = time.perf_counter()
    chunk = max(1, min(8, len(todo) // (4 * max(workers, 1))))
    for _ in run_pool(_write_one, todo, workers=workers, initializer=single_threaded_opencv, desc="synth",
                      progress=progress, chunksize=chunk):
        pass
    seconds = time.perf_counter() - start

    metas = _load_metas(out)
    _write_tables(out, metas)
    return _summarise(out, metas, size, seed, requested=n_images, generated=len(todo), seconds=seconds)


def _summarise(out: SynthSet, metas: list[dict], size: int, seed: int, *, requested: int, generated: int,
               seconds: float) -> dict:
    """``requested``/``generated``/``skipped`` describe this call's images 0..requested-1; ``images``
    and the counts describe the whole folder (its tables list every record in it)."""
    n_cells = [len(m["cells"]) for m in metas]
    image_counts, cell_counts = [0] * NUM_CLASSES, [0] * NUM_CLASSES
    for meta in metas:
        for label in meta["image_labels"]:
            image_counts[label] += 1
        for cell in meta["cells"]:
            for label in cell["labels"]:
                cell_counts[label] += 1
    return {
        "out_dir": str(out.root), "size": size, "seed": seed,
        "images": len(metas), "requested": requested, "generated": generated, "skipped": requested - generated,
        "seconds": seconds, "images_per_s": generated / seconds if generated and seconds > 0 else None,
        "cells": int(sum(n_cells)),
        "cells_per_image": {"min": min(n_cells, default=0), "mean": float(np.mean(n_cells)) if n_cells else 0.0,
                            "max": max(n_cells, default=0)},
        "border_cells": sum(c["border"] for m in metas for c in m["cells"]),
        "mitotic_cells": sum(c["mitotic"] for m in metas for c in m["cells"]),
        "image_counts": image_counts, "cell_counts": cell_counts,
        "paths": {name: str(path) for name, path in (
            ("train_csv", out.labels_csv), ("images", out.images_dir), ("masks", out.masks_dir),
            ("nuclei", out.nuclei_dir), ("cells_csv", out.cells_csv), ("solution_csv", out.solution_csv),
            ("meta", out.meta_dir))},
    }


def format_summary(summary: dict) -> str:
    """The summary of ``write_synth_set`` as readable lines."""
    cpi, cells = summary["cells_per_image"], max(summary["cells"], 1)
    speed = f", {summary['images_per_s']:.1f} images/s" if summary.get("images_per_s") else ""
    lines = [
        f"synthetic HPA set {summary['out_dir']} (seed {summary['seed']}, {summary['size']}x{summary['size']} px)",
        f"  images: {summary['requested']} asked for, {summary['generated']} written now in {summary['seconds']:.1f} s"
        f"{speed}, {summary['skipped']} already there",
        *([f"  the folder holds {summary['images']} images (an earlier call made more), all listed in train.csv; "
            f"the counts below are over all {summary['images']}"] if summary["images"] != summary["requested"] else []),
        f"  cells: {summary['cells']}; per image min {cpi['min']} / mean {cpi['mean']:.1f} / max {cpi['max']}",
        f"  cut by the border: {summary['border_cells']} ({100 * summary['border_cells'] / cells:.0f} %); "
        f"mitotic: {summary['mitotic_cells']} ({100 * summary['mitotic_cells'] / cells:.1f} %)",
        f"  {'class':<46} {'images':>7} {'cells':>7}",
    ]
    for i, name in enumerate(CLASS_NAMES):
        lines.append(f"  {i:>2} {name:<43} {summary['image_counts'][i]:>7} {summary['cell_counts'][i]:>7}")
    lines.append("  outputs:")
    lines += [f"    {name:<13} {path}" for name, path in summary["paths"].items()]
    return "\n".join(lines)


__all__ = ["SynthImage", "SynthSet", "sample_image_labels", "assign_cell_labels", "generate_image", "write_synth_set",
           "format_summary", "GREEN_PATTERNS", "image_id_of", "is_synthetic", "read_true_cell_labels"]
