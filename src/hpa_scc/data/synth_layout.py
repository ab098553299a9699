"""Synthetic HPA images, part 1: what an image shows and where its cells are (``data.synth``
has the whole story): the image's labels with the Kaggle skew flattened, the cells as star-shaped
outlines around their nuclei (clusters, confluent sheets, border cuts, mitoses), and each cell's
own share of the image's labels. ``data.synth_draw`` renders them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from hpa_scc.constants import KAGGLE_CLASS_COUNTS, MITOTIC_SPINDLE, NEGATIVE, NUM_CLASSES

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
class Cell:
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


def _make_cell(rng: np.random.Generator, cx: float, cy: float, radius: float, mitotic: bool, s: float) -> Cell:
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
        return Cell(cx, cy, radius, r_cell, r_nuc, axis, axis, True, plates)

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
    return Cell(cx, cy, radius, r_cell, r_nuc, axis, side + rng.normal(0, 0.5), False)


def place_cells(rng: np.random.Generator, size: int, want_mitotic: bool) -> tuple[list[Cell], float]:
    """Place cells by dart throwing: some anywhere, some attached to a placed cell (clusters,
    confluent patches). Returns the cells and the image's typical cell radius in px.

    Centres fall up to half a radius outside the image, so cells are cut by the border; centres
    stay 0.75 x (sum of radii) apart, so cytoplasm may overlap (resolved in ``rasterize``)
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
    cells: list[Cell] = []
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


def _polar(cell: Cell, x0: int, x1: int, y0: int, y1: int):
    """Offsets, distance and angle-table index of the pixels of box [y0:y1, x0:x1] from the centre."""
    dx = (np.arange(x0, x1, dtype=np.float32) - np.float32(cell.cx))[None, :]
    dy = (np.arange(y0, y1, dtype=np.float32) - np.float32(cell.cy))[:, None]
    rho = np.sqrt(dx * dx + dy * dy)
    idx = np.floor(np.arctan2(dy, dx) * np.float32(N_ANGLES / (2 * np.pi))).astype(np.int32) % N_ANGLES
    return dx, dy, rho, idx


def _nucleus_mask(cell: Cell, dx, dy, rho, idx) -> np.ndarray:
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


def rasterize(cells: list[Cell], size: int, r_typ: float) -> tuple[np.ndarray, np.ndarray, list[Cell]]:
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


