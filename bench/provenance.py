"""What the provenance stamps cost a resume: per image, the stamp of its four channel files, the
reuse check of a cached image with and without it, and a whole ``cache`` rerun that reuses
every image, at N images (issue 27; figures in docs/SCALE.md).

    .venv/bin/python bench/provenance.py                 # N = 5,000 (~1 min, 2 cores)
    .venv/bin/python bench/provenance.py --images 100000 --work /scratch/prov

How the set is made (said in the output too): ``--base`` synthetic images at 64 px, replicated
under new IDs by hard links to their channel PNGs (a stat costs the same whatever the pixels),
with a Kaggle ``train.csv``; the cache is built for real at 32 px, then rerun.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from hpa_scc.constants import CHANNELS
from hpa_scc.data.cache import _read_size_record, build_cache, cache_path, is_cached
from hpa_scc.data.images import find_images, image_stamp
from hpa_scc.data.synth import write_synth_set


def make_set(root: Path, n: int, base: int) -> Path:
    src = root / "base"
    write_synth_set(src, base, size=64, seed=0, progress=False)
    data = root / "data"
    (data / "train").mkdir(parents=True)
    rows = ["ID,Label"]
    base_ids = sorted({p.name.split("_")[0] for p in (src / "train").glob("*_red.png")})
    for i in range(n):
        b = base_ids[i % len(base_ids)]
        image_id = f"img{i:07d}"
        for c in CHANNELS:
            os.link(src / "train" / f"{b}_{c}.png", data / "train" / f"{image_id}_{c}.png")
        rows.append(f"{image_id},0")
    (data / "train.csv").write_text("\n".join(rows) + "\n")
    return data


def per_image(fn, items) -> float:
    start = time.perf_counter()
    for item in items:
        fn(item)
    return (time.perf_counter() - start) / len(items) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--base", type=int, default=8)
    ap.add_argument("--work", type=Path, default=None, help="folder for the set (default: a temporary one)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="prov-", dir=args.work))
    try:
        data = make_set(root, args.images, args.base)
        print(f"set: {args.images} images = {args.base} synthetic 64 px images hard-linked under new IDs, "
              f"{root} ({shutil.disk_usage(root).free / 2**30:.0f} GiB free there)")
        out = root / "cache"
        start = time.perf_counter()
        report = build_cache(data, out, size=32, workers=2, progress=False)
        print(f"cache, first run:  {report.written} written in {time.perf_counter() - start:.1f} s")
        records = find_images(data)
        shape = (4, 32, 32)
        old = per_image(lambda r: (_read_size_record(out, r.image_id), is_cached(cache_path(out, r.image_id), shape)),
                        records)
        stamp = per_image(image_stamp, records)
        print(f"reuse check per image, one process: record + .npy header {old:.0f} us; the stamp of its four "
              f"channel files {stamp:.0f} us more ({stamp / old:.2f}x the check without it)")
        for workers in (1, 2):
            start = time.perf_counter()
            report = build_cache(data, out, size=32, workers=workers, progress=False)
            wall = time.perf_counter() - start
            assert report.skipped_existing == args.images, report.summary()
            print(f"cache rerun, every image reused, {workers} worker(s): {wall:.1f} s = "
                  f"{wall / args.images * 1e6:.0f} us per image -> {wall / args.images * 1e5 / 60:.1f} min at 100k")
        victim = records[0]
        (data / "train" / f"{victim.image_id}_green.png").unlink()
        shutil.copyfile(data / "train" / f"{records[1].image_id}_green.png",
                        data / "train" / f"{victim.image_id}_green.png")
        report = build_cache(data, out, size=32, workers=2, progress=False)
        print(f"one image's channel replaced: {report.written} redone, {report.skipped_existing} reused")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
