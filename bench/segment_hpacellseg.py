"""HPA-Cell-Segmentation through the hpacellseg back-end: seconds per image, networks and labelling apart.

    .venv/bin/python bench/segment_hpacellseg.py [--size 2048] [--repeats 2] [--device cpu|cuda] [--json out.json]

Needs ``bash scripts/setup.sh --hpacellseg``. The two DPN U-Nets are built with random weights
(``random_dpn_unet``: the Zenodo files cannot be fetched here), so the network time is the real
one and the labelling time (``label_cell``, which depends on what the networks say) is
indicative only. The image is the first Kaggle field of the shared HPA sample, resized to
``--size`` (a synthetic one when the sample is absent). Prints one row per repeat; the first
includes warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from hpa_scc.data.images import read_image
from hpa_scc.data.synth import generate_image
from hpa_scc.segment.hpacellseg import HpaCellSegmenter, random_dpn_unet

SAMPLE = "5c27f04c-bb99-11e8-b2b9-ac1f6b6435d0"


def bench_image(size: int) -> tuple[np.ndarray, str]:
    sample = Path(os.environ.get("HPA_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared")) / "hpa-sample"
    if (sample / "train" / f"{SAMPLE}_red.png").is_file():
        image, source = read_image(sample / "train", SAMPLE), f"hpa-sample {SAMPLE[:8]}"
    else:
        image, source = generate_image(0, size=size, seed=0).image, "synthetic (hpa-sample absent)"
    return np.stack([cv2.resize(p, (size, size), interpolation=cv2.INTER_AREA) for p in image]), source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    image, source = bench_image(args.size)
    model = random_dpn_unet()
    segmenter = HpaCellSegmenter(model, random_dpn_unet(seed=1), device=args.device)
    print(f"# {platform.node()} {args.device} torch {torch.__version__} threads {torch.get_num_threads()}; "
          f"{args.size} px, {source}")
    rows = []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        nuclei_pred, cell_pred = segmenter.predictions(image)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        _, cells = segmenter.label(nuclei_pred, cell_pred)
        t2 = time.perf_counter()
        rows.append({"repeat": i, "networks_s": round(t1 - t0, 2), "label_cell_s": round(t2 - t1, 2),
                     "cells": int(cells.max())})
        print(f"repeat {i}: networks {t1 - t0:6.2f} s   label_cell {t2 - t1:6.2f} s   total {t2 - t0:6.2f} s")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "device": args.device, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
