"""Loader benchmark: the cached loader against the original-style per-sample PNG loader, and the
training loader with worker processes (with and without the cells' hand-made features).

    .venv/bin/python bench/loader.py [--images 16] [--source-size 2048] [--size 512] [--json out.json]
    python bench/loader.py --workers 8 --batch 8       # + the training loader as train() builds it
    python bench/loader.py --store-cells 2000000        # the feature store's lookup at 2M cells

Both read the same synthetic images (generated once under --work, default runs/bench-loader),
through the same DataLoader settings (batch 8, no worker processes, so the figure is per core).
The PNG loader decodes four full-size PNGs and resizes them per sample; the cached loader reads
one memory-mapped uint8 .npy per sample (made by ``python -m hpa_scc cache``). Prints images/s
for both and their ratio (target: cache >= 50x).

With ``--workers N`` it also prepares the images (builtin segmentation, COCO) and times the
training loader exactly as ``train`` builds it (``CellInstances`` with augmentation and masks,
``make_loader``: N workers, pinned memory on CUDA, prefetch), which is what a GPU waits on.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import cv2
import torch
from torch.utils.data import DataLoader

from hpa_scc.data.cache import build_cache
from hpa_scc.data.images import find_images
from hpa_scc.data.loader import CachedImages, PngImages, collate
from hpa_scc.data.synth import write_synth_set


def images_per_second(dataset, min_seconds: float, batch_size: int = 8) -> tuple[float, int]:
    """Iterate whole epochs until ``min_seconds`` have passed; (images/s, images read)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0, collate_fn=collate)
    seen, start = 0, time.perf_counter()
    while True:
        for images, _ in loader:
            seen += images.shape[0]
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return seen / elapsed, seen


def training_loader_rate(data: Path, work: Path, size: int, workers: int, batch: int, min_seconds: float,
                         cell_features: bool = False) -> float:
    """Images/s of the training loader (``train.make_loader`` over ``CellInstances``) with ``workers``;
    ``cell_features``: each cell's hand-made features measured too (``model.cell_features=true``)."""
    from hpa_scc.data.instances import CellInstances
    from hpa_scc.apps.prepare import prepare_dataset
    from hpa_scc.engine.train import make_loader

    prepared = work / f"prepared{size}"
    prepare_dataset(data, prepared, size=size, n_folds=1, workers=min(workers, 8) or 1, progress=False)
    dataset = CellInstances(prepared, [0], augment=True, uint8=True, cell_features=cell_features)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = make_loader(dataset, batch, workers, device)
    for _ in loader:  # start the workers and fill the page cache: steady state is what training sees
        pass
    seen, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        for images, _ in loader:
            seen += len(images)
    return seen / (time.perf_counter() - start)


def feature_lookup(cells: int, per_image: int = 20, lookups: int = 20000) -> dict:
    """The feature store's cell lookup (``CellStore.find``, what ``model.cell_features`` training
    reads per image) on a fabricated store of ``cells`` cells, ``per_image`` per image (ids 1..K;
    features not touched): the index's build time and bytes, and microseconds per image looked up."""
    import numpy as np

    from hpa_scc.data.cells import CELL_DTYPE, CellStore

    n_images = cells // per_image
    index = np.zeros(n_images * per_image, CELL_DTYPE)
    index["image"] = np.repeat(np.arange(n_images), per_image)
    index["cell_id"] = np.tile(np.arange(1, per_image + 1), n_images)
    store = CellStore(np.zeros((len(index), 0), np.float32), [f"img{i:07d}" for i in range(n_images)], index)
    start = time.perf_counter()
    store.index()
    build = time.perf_counter() - start
    keys, order = store._sorted_keys
    rng = np.random.default_rng(0)
    picks = rng.integers(0, n_images, lookups)
    ids = np.arange(1, per_image + 1)
    start = time.perf_counter()
    for i in picks:
        rows = store.find(store.names[i], ids)
    per_image_us = 1e6 * (time.perf_counter() - start) / lookups
    assert (rows >= 0).all()
    return {"cells": len(index), "images": n_images, "index_build_s": round(build, 2),
            "index_mb": round((keys.nbytes + order.nbytes) / 2**20, 1), "lookup_us_per_image": round(per_image_us, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--source-size", type=int, default=2048, help="synthetic image size (Kaggle: 2048)")
    parser.add_argument("--size", type=int, default=512, help="training size the loaders deliver")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timing per loader")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-loader"))
    parser.add_argument("--workers", type=int, default=None,
                        help="also time the training loader with this many worker processes")
    parser.add_argument("--batch", type=int, default=8, help="training loader batch (default: 8)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--store-cells", type=int, default=None,
                        help="only time the feature store's cell lookup on a fabricated store of this many cells "
                             "(e.g. 2000000: public HPA scale) and exit")
    args = parser.parse_args()
    if args.store_cells:
        figures = feature_lookup(args.store_cells)
        print(f"feature store lookup, fabricated store of {figures['cells']:,} cells in {figures['images']:,} images: "
              f"index {figures['index_mb']} MB built in {figures['index_build_s']} s, "
              f"{figures['lookup_us_per_image']} us per image's cells")
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
        return
    torch.set_num_threads(1)
    cv2.setNumThreads(1)

    data = args.work / f"synth{args.source_size}"
    write_synth_set(data, args.images, size=args.source_size, seed=0, workers=2, progress=True)
    cache = args.work / f"cache{args.size}"
    build_cache(data, cache, size=args.size, workers=2, progress=True)

    png_rate, png_n = images_per_second(PngImages(find_images(data), args.size), args.seconds)
    cache_rate, cache_n = images_per_second(CachedImages(cache), args.seconds)
    figures = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "date": time.strftime("%Y-%m-%d"),
        "images": args.images, "source_size": args.source_size, "size": args.size,
        "png_images_per_s": round(png_rate, 2), "png_images_read": png_n,
        "cache_images_per_s": round(cache_rate, 1), "cache_images_read": cache_n,
        "ratio": round(cache_rate / png_rate, 1),
    }
    print(f"original-style PNG loader ({args.source_size}px -> {args.size}px): {png_rate:8.2f} images/s")
    print(f"cached .npy loader        ({args.size}px):             {cache_rate:8.1f} images/s")
    print(f"ratio: {cache_rate / png_rate:.1f}x (target >= 50x)")
    if args.workers is not None:
        rate = training_loader_rate(data, args.work, args.size, args.workers, args.batch, args.seconds)
        figures.update({"train_loader_workers": args.workers, "train_loader_images_per_s": round(rate, 1)})
        print(f"training loader ({args.workers} workers, masks + augmentation, batch {args.batch}): {rate:8.1f} images/s")
        # the same loader measuring each cell's hand-made features (model.cell_features=true), side by side
        feat = training_loader_rate(data, args.work, args.size, args.workers, args.batch, args.seconds, cell_features=True)
        per_image_ms = 1000 * max(args.workers, 1) * (1 / feat - 1 / rate)
        figures.update({"train_loader_cell_features_images_per_s": round(feat, 1),
                        "cell_features_ms_per_image_per_worker": round(per_image_ms, 1)})
        print(f"  + cell features (model.cell_features=true):             {feat:8.1f} images/s "
              f"({per_image_ms:.0f} ms more per image per worker)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
