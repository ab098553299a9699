"""Display helpers: HPA-style colour composites and label outlines.

    from hpa_scc.visualize import to_rgb, overlay_outlines
    rgb = overlay_outlines(to_rgb(image, percentile=99.5), cell_labels)
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np


def to_rgb(image: np.ndarray, *, gain: float | Sequence[float] = 1.0, percentile: float | None = None) -> np.ndarray:
    """uint8 [4, H, W] (R, G, B, Y) or [3, H, W] (R, G, B) -> uint8 [H, W, 3] display composite.

    As HPA shows them: red as red, green as green, blue as blue, yellow added to red and green.
    ``gain`` multiplies each channel (a number or one per channel); with ``percentile`` each
    channel is first stretched so that its given percentile (of non-zero pixels) maps to 255,
    which makes dim images visible.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] not in (3, 4):
        raise ValueError(f"to_rgb needs [3 or 4, H, W] channels first, got shape {image.shape}")
    planes = image.astype(np.float32)
    gains = np.broadcast_to(np.asarray(gain, dtype=np.float32), (image.shape[0],)).copy()
    if percentile is not None:
        for ch, plane in enumerate(planes):
            nonzero = plane[plane > 0]
            top = np.percentile(nonzero, percentile) if nonzero.size else 0.0
            gains[ch] *= 255.0 / top if top > 0 else 1.0
    planes *= gains[:, None, None]
    red, green, blue = planes[0], planes[1], planes[2]
    if image.shape[0] == 4:
        red, green = red + planes[3], green + planes[3]
    return np.clip(np.stack([red, green, blue], axis=-1), 0, 255).astype(np.uint8)


def overlay_outlines(rgb: np.ndarray, labels: np.ndarray, color: Sequence[int] = (255, 255, 255),
                     thickness: int = 1) -> np.ndarray:
    """Copy of uint8 [H, W, 3] ``rgb`` with the outlines of label image [H, W] (0 = background) drawn.

    A pixel is on an outline if it belongs to an object and a 4-neighbour has another label,
    so touching objects show the boundary they share.
    """
    labels = np.asarray(labels)
    if labels.shape != rgb.shape[:2]:
        raise ValueError(f"labels {labels.shape} and image {rgb.shape[:2]} differ in size")
    edge = np.zeros(labels.shape, dtype=bool)
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge &= labels > 0
    if thickness > 1:
        edge = cv2.dilate(edge.view(np.uint8), np.ones((thickness, thickness), np.uint8)) > 0
    out = rgb.copy()
    out[edge] = color
    return out
