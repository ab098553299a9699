"""Builtin segmenter benchmark: synthetic AP, agreement with HPA-Cell-Segmentation, speed.

    .venv/bin/python bench/segmentation.py [--json out.json] [--overlays runs/bench-seg]

Three figures, each with its target:
1. synthetic: class-agnostic mask AP at IoU 0.6 of the builtin cells against the true cells of
   ``generate_image(i, size=512, seed=0)`` for i in 0..49 (all detections scored equally, so AP
   is precision x recall; target >= 0.85);
2. real: on the three Kaggle images of the shared HPA sample at full size (2048 px), the share
   of HPA-Cell-Segmentation's cells matched one-to-one by a builtin cell at IoU >= 0.6, per
   image and on average (target >= 0.80 on average); skipped with a message when the sample
   is absent. The sample is ``../shared/hpa-sample`` beside the checkout, or
   ``$HPA_SHARED_DIR/hpa-sample``;
3. speed: seconds per 2048 x 2048 image on one core (target <= 0.5 s): this process is pinned
   to one CPU and every thread pool (OpenCV, OpenMP, BLAS) is set to one thread.

``--overlays DIR`` writes outline overlays: reference/truth in white, builtin cells in magenta,
builtin nuclei in cyan.
"""

from __future__ import annotations

import os

# One thread everywhere, set before numpy/OpenCV load their pools: the speed figure is per core.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from hpa_scc.data.images import read_image  # noqa: E402
from hpa_scc.segment.builtin import BuiltinSegmenter  # noqa: E402
from hpa_scc.segment.quality import mask_ap, recall_at  # noqa: E402
from hpa_scc.data.synth import generate_image  # noqa: E402
from hpa_scc.apps.visualize import overlay_outlines, to_rgb  # noqa: E402

TARGET_SYNTH_AP, TARGET_REAL_SHARE, TARGET_SECONDS = 0.85, 0.80, 0.5
IOU = 0.6
SYNTH_IMAGES, SYNTH_SIZE, SYNTH_SEED = 50, 512, 0
SPEED_SIZE = 2048


def shared_sample_dir() -> Path:
    """``hpa-sample`` in ``$HPA_SHARED_DIR``, else in ``../shared`` beside the checkout."""
    base = os.environ.get("HPA_SHARED_DIR")
    return (Path(base) if base else Path(__file__).resolve().parents[1].parent / "shared") / "hpa-sample"


def save_overlay(path: Path, image: np.ndarray, predicted: tuple[np.ndarray, np.ndarray],
                 reference: np.ndarray | None, max_side: int = 1024) -> None:
    """PNG of the image with reference (white), builtin cell (magenta) and nucleus (cyan) outlines."""
    nuclei, cells = predicted
    thickness = max(1, round(max(image.shape[1:]) / max_side))  # about 1 px once shrunk
    rgb = to_rgb(image, percentile=99.5)
    if reference is not None:
        rgb = overlay_outlines(rgb, reference, (255, 255, 255), thickness + 1)
    rgb = overlay_outlines(rgb, cells, (255, 0, 255), thickness)
    rgb = overlay_outlines(rgb, nuclei, (0, 255, 255), thickness)
    scale = min(1.0, max_side / max(rgb.shape[:2]))
    if scale < 1:
        rgb = cv2.resize(rgb, (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), rgb[..., ::-1])


def bench_synthetic(segmenter: BuiltinSegmenter, overlays: Path | None) -> dict:
    preds, trues = [], []
    start = time.perf_counter()
    for index in range(SYNTH_IMAGES):
        synth = generate_image(index, size=SYNTH_SIZE, seed=SYNTH_SEED)
        nuclei, cells = segmenter(synth.image, synth.image_id)
        preds.append(cells)
        trues.append(synth.cells)
        if overlays and index < 4:
            save_overlay(overlays / f"synth_{index:02d}.png", synth.image, (nuclei, cells), synth.cells)
    return {
        "images": SYNTH_IMAGES, "size": SYNTH_SIZE, "seed": SYNTH_SEED,
        "ap": mask_ap(preds, trues, iou=IOU),
        "cells_per_image_pred": float(np.mean([p.max() for p in preds])),
        "cells_per_image_true": float(np.mean([t.max() for t in trues])),
        "seconds": time.perf_counter() - start,
    }


def bench_real(segmenter: BuiltinSegmenter, sample: Path, overlays: Path | None) -> dict:
    """Per image: matched share of the reference cells (None without a reference mask)."""
    images = []
    ids = sorted({p.name[: -len("_red.png")] for p in (sample / "train").glob("*_red.png")})
    for image_id in ids:
        image = read_image(sample / "train", image_id)
        mask_path = sample / "masks" / f"{image_id}_cellmask.png"
        reference = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED) if mask_path.is_file() else None
        nuclei, cells = segmenter(image, image_id)
        images.append({
            "id": image_id, "size": list(image.shape[1:]), "cells_pred": int(cells.max()),
            "cells_ref": int(reference.max()) if reference is not None else None,
            "matched_share": recall_at(cells, reference, iou=IOU) if reference is not None else None,
        })
        if overlays:
            save_overlay(overlays / f"real_{image_id[:8]}.png", image, (nuclei, cells), reference)
    shares = [r["matched_share"] for r in images if r["matched_share"] is not None]
    return {"images": images, "mean_matched_share": float(np.mean(shares)) if shares else None}


def bench_speed(segmenter: BuiltinSegmenter, sample: Path | None, repeats: int = 3) -> dict:
    """Seconds per 2048 px image on one core: median of ``repeats`` runs per image, then the mean
    over the sample's 2048 px images (one synthetic 2048 px image without the sample)."""
    images = {}
    if sample is not None:
        for path in sorted((sample / "masks").glob("*_cellmask.png")):
            image_id = path.name[: -len("_cellmask.png")]
            image = read_image(sample / "train", image_id)
            if image.shape[1:] == (SPEED_SIZE, SPEED_SIZE):
                images[image_id] = image
    if not images:
        images["synthetic 0"] = generate_image(0, size=SPEED_SIZE, seed=SYNTH_SEED).image
    per_image = {}
    for name, image in images.items():
        segmenter(image)  # warm-up: first calls load code and allocate
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            segmenter(image)
            times.append(time.perf_counter() - start)
        per_image[name] = float(np.median(times))
    return {"size": SPEED_SIZE, "repeats": repeats, "per_image": per_image,
            "seconds_mean": float(np.mean(list(per_image.values()))),
            "seconds_max": float(max(per_image.values()))}


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--overlays", type=Path, default=None, help="write outline overlay PNGs here")
    args = parser.parse_args()

    cv2.setNumThreads(1)
    if hasattr(os, "sched_setaffinity"):  # as `taskset -c <first cpu>`
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    segmenter = BuiltinSegmenter()
    sample = shared_sample_dir()
    have_sample = (sample / "train").is_dir()

    synth = bench_synthetic(segmenter, args.overlays)
    real = bench_real(segmenter, sample, args.overlays) if have_sample else None
    speed = bench_speed(segmenter, sample if have_sample else None)

    def row(label: str, value: str, target: str = "", note: str = "") -> None:
        print(f"{label:<56} {value:>8} {target:>8}  {note}".rstrip())

    print(f"builtin segmenter: {platform.machine()}, one core, OpenCV {cv2.__version__}")
    row("figure", "value", "target")
    row(f"synthetic AP@{IOU} ({SYNTH_IMAGES} images, {SYNTH_SIZE} px, seed {SYNTH_SEED})", f"{synth['ap']:.3f}",
        f">= {TARGET_SYNTH_AP}", verdict(synth["ap"] >= TARGET_SYNTH_AP))
    row("  cells per image (builtin / true)",
        f"{synth['cells_per_image_pred']:.1f}", "", f"/ {synth['cells_per_image_true']:.1f}")
    if real is None:
        print(f"real images: skipped, no HPA sample at {sample} "
              "(set HPA_SHARED_DIR to the folder holding hpa-sample/)")
    else:
        print(f"real: share of HPA-Cell-Segmentation cells matched at IoU >= {IOU}    (cells builtin / reference)")
        for r in real["images"]:
            label = f"  {r['id'][:36]} ({r['size'][1]} px)"
            if r["matched_share"] is None:
                row(label, "-", "", f"{r['cells_pred']} / no reference")
            else:
                row(label, f"{r['matched_share']:.3f}", "", f"{r['cells_pred']} / {r['cells_ref']}")
        mean = real["mean_matched_share"]
        if mean is None:
            print(f"  no reference masks in {sample / 'masks'}: no matched share")
        else:
            row("  mean over images with a reference", f"{mean:.3f}", f">= {TARGET_REAL_SHARE}",
                verdict(mean >= TARGET_REAL_SHARE))
    n_timed = len(speed["per_image"])
    row(f"seconds per {SPEED_SIZE} px image, one core ({n_timed} image{'s' * (n_timed != 1)})",
        f"{speed['seconds_mean']:.3f}", f"<= {TARGET_SECONDS}",
        f"{verdict(speed['seconds_mean'] <= TARGET_SECONDS)} (slowest {speed['seconds_max']:.3f})")
    if args.overlays:
        print(f"overlays in {args.overlays} (white: reference, magenta: builtin cells, cyan: builtin nuclei)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "params": dataclasses.asdict(segmenter.params),
            "iou": IOU, "synthetic": synth, "real": real, "speed": speed,
            "targets": {"synthetic_ap": TARGET_SYNTH_AP, "real_mean_matched_share": TARGET_REAL_SHARE,
                        "seconds_per_image": TARGET_SECONDS},
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()
