"""Synthetic HPA images, part 2: rendering the cells of ``data.synth_layout`` into four channels
(nucleus, microtubules, ER, and one green pattern per label), then blur, uneven illumination and
noise; ``generate_image`` draws one whole image (``data.synth`` writes sets of them).

Why ~470 lines: the 19 green patterns are one table of small drawing functions (one per class),
kept beside the renderer that calls them.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from scipy import ndimage

from hpa_scc.constants import CHANNELS, MITOTIC_SPINDLE, NEGATIVE, NUM_CLASSES
from hpa_scc.data.synth_layout import (MIN_SIZE, N_ANGLES, REF_SIZE, Cell, SynthImage, assign_cell_labels,
                                       image_id_of, place_cells, rasterize, sample_image_labels)

# --- rendering --------------------------------------------------------------------------------
# Channel gains (8-bit units for a pattern of strength 1), drawn per image; chosen so channel
# means and 99th percentiles fall in the range of the real images (README of hpa-sample).
GAIN_RANGE = {"red": (100, 180), "green": (110, 230), "blue": (140, 200), "yellow": (170, 280)}
GREEN_NONSPECIFIC = 0.04  # faint green every cell shows: a Negative cell is dim, not absent



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

    def __init__(self, cell: Cell, cell_id: int, sl, cells: np.ndarray, nuclei: np.ndarray,
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
    layout, r_typ = place_cells(rng, size, MITOTIC_SPINDLE in image_labels)
    cells, nuclei, kept = rasterize(layout, size, r_typ)
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


