"""Draw docs/synth_vs_real.png: a synthetic field of view beside two real Kaggle HPA images.

    python scripts/make_synth_preview.py                      # synthetic image 17 of seed 0 at 2048 px
    python scripts/make_synth_preview.py --index 9 --size 1024 --out /tmp/preview.png

Top row: colour composites as HPA shows them (no contrast stretch, so the dimness compares
honestly). Bottom row: the same with cell outlines: the synthetic truth, and the
HPA-Cell-Segmentation masks shipped with the real sample. The real images are read from
../shared/hpa-sample beside the checkout, or from $HPA_SAMPLE_DIR.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from hpa_scc.constants import CLASS_NAMES, NUM_CLASSES  # noqa: E402
from hpa_scc.utils.fileio import atomic_path  # noqa: E402
from hpa_scc.data.images import read_image  # noqa: E402
from hpa_scc.data.synth import generate_image  # noqa: E402
from hpa_scc.apps.visualize import overlay_outlines, to_rgb  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REAL_IDS = ("94e33c64-bb9b-11e8-b2b9-ac1f6b6435d0", "5c27f04c-bb99-11e8-b2b9-ac1f6b6435d0")
PANEL_PX = 480  # each panel is downscaled to this; with the palette it keeps the PNG well under 1 MiB


def sample_dir() -> Path:
    path = Path(os.environ.get("HPA_SAMPLE_DIR", REPO.parent / "shared" / "hpa-sample"))
    if not (path / "train").is_dir():
        raise SystemExit(f"real HPA sample not found at {path}; set HPA_SAMPLE_DIR to the hpa-sample folder")
    return path


def read_real(folder: Path, image_id: str) -> tuple[np.ndarray, np.ndarray, str]:
    """uint8 [4, H, W] channels, the cell mask [H, W] and the label string of a real image."""
    image = read_image(folder / "train", image_id)
    mask = cv2.imread(str(folder / "masks" / f"{image_id}_cellmask.png"), cv2.IMREAD_UNCHANGED)
    labels = dict(line.split(",", 1) for line in (folder / "labels.csv").read_text().split()[1:])
    return image, mask, labels.get(image_id, "?")


def panels(image: np.ndarray, cells: np.ndarray, px: int) -> tuple[np.ndarray, np.ndarray]:
    """Composite and outlined composite, both uint8 [px, px, 3]."""
    small = np.stack([cv2.resize(p, (px, px), interpolation=cv2.INTER_AREA) for p in image])
    rgb = to_rgb(small)
    cells_small = cv2.resize(cells.astype(np.uint16), (px, px), interpolation=cv2.INTER_NEAREST)
    return rgb, overlay_outlines(rgb, cells_small, (255, 255, 255))


def label_names(labels: list[int]) -> str:
    return ", ".join(f"{i} {CLASS_NAMES[i]}" for i in labels)


def save_figure(fig, out: Path) -> None:
    """Render a matplotlib figure to a 256-colour palette PNG (a third of full RGB), atomically."""
    fig.canvas.draw()
    picture = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    palette = Image.fromarray(picture).quantize(256, method=Image.Quantize.FASTOCTREE)
    with atomic_path(out, ".png") as tmp:
        palette.save(tmp, format="PNG", optimize=True)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB, {picture.shape[1]}x{picture.shape[0]} px)")


def class_gallery(out: Path, seed: int, size: int = 512, crop_px: int = 160, max_images: int = 400) -> None:
    """One synthetic cell per class: composite and green alone, for each of the 19 patterns.

    Picks, per class, the first cell (image order) whose only label is that class, so the green
    channel shows that pattern and nothing else.
    """
    found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for index in range(max_images):
        synth = generate_image(index, size=size, seed=seed)
        for cell_id, labels in synth.cell_labels.items():
            if len(labels) != 1 or labels[0] in found:
                continue
            ys, xs = np.nonzero(synth.cells == cell_id)
            if ys.min() == 0 or xs.min() == 0 or ys.max() == size - 1 or xs.max() == size - 1:
                continue  # whole cells only
            cy, cx, half = (ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2, crop_px // 2
            y0, x0 = np.clip([cy - half, cx - half], 0, size - crop_px)
            crop = synth.image[:, y0:y0 + crop_px, x0:x0 + crop_px]
            outline = (synth.cells[y0:y0 + crop_px, x0:x0 + crop_px] == cell_id).astype(np.uint16)
            found[labels[0]] = (crop, outline)
        if len(found) == NUM_CLASSES:
            break
    fig, axes = plt.subplots(4, 10, figsize=(15, 6.6), dpi=100)
    for ax in axes.flat:
        ax.set_axis_off()
    for c in range(NUM_CLASSES):
        row, col = 2 * (c // 10), c % 10
        axes[row, col].set_title(f"{c} {CLASS_NAMES[c]}"[:24], fontsize=7)
        if c not in found:
            continue
        crop, outline = found[c]
        axes[row, col].imshow(overlay_outlines(to_rgb(crop), outline))
        axes[row + 1, col].imshow(crop[1], cmap="gray", vmin=0, vmax=max(1, int(np.percentile(crop[1], 99.8))))
    fig.suptitle(f"synthetic cells, one per class (seed {seed}, {size} px): composite with outline, "
                 "and the green channel alone (stretched)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=int, default=17, help="synthetic image index (default: 17)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic seed (default: 0)")
    parser.add_argument("--size", type=int, default=2048, help="synthetic size in px (default: 2048, as Kaggle)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "synth_vs_real.png")
    parser.add_argument("--gallery", type=Path, default=REPO / "docs" / "synth_classes.png",
                        help="where the one-cell-per-class gallery goes")
    args = parser.parse_args(argv)

    folder = sample_dir()
    synth = generate_image(args.index, size=args.size, seed=args.seed)
    columns = [(f"synthetic {synth.image_id}, {args.size} px\n{synth.cells.max()} cells; "
                f"{label_names(synth.image_labels)}", synth.image, synth.cells, "truth")]
    for image_id in REAL_IDS:
        image, mask, labels = read_real(folder, image_id)
        names = label_names([int(i) for i in labels.split("|")])
        columns.append((f"real {image_id[:8]}, {image.shape[-1]} px\n{mask.max()} cells; {names}",
                        image, mask, "HPA-Cell-Segmentation"))

    fig, axes = plt.subplots(2, len(columns), figsize=(4.8 * len(columns), 10.2), dpi=100)
    for col, (title, image, cells, source) in enumerate(columns):
        rgb, outlined = panels(image, cells, PANEL_PX)
        means = "/".join(f"{m:.0f}" for m in image.reshape(4, -1).mean(axis=1))
        axes[0, col].imshow(rgb)
        axes[0, col].set_title(f"{title}\nchannel means R/G/B/Y {means}", fontsize=8)
        axes[1, col].imshow(outlined)
        axes[1, col].set_title(f"cell outlines: {source}", fontsize=8)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    save_figure(fig, args.out)
    class_gallery(args.gallery, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
