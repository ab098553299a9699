"""End-to-end prediction speed at Kaggle's size: read four PNGs, segment, score every cell with the
model, encode every mask once per cell.

    .venv/bin/python bench/predict.py                                   # CPU: per-image costs here
    python bench/predict.py --test-set 559 --workers 16 --json out.json # a Kaggle-size test set (GPU)

Synthetic 2048 px images (``--images`` distinct ones, repeated under new ids by symlinks up to
``--test-set`` images) and a random-init model saved as a run folder (speed does not depend on
the weights, except through how many boxes pass the score threshold). Measures, each from a cold
output folder:

- ``cpu_s_per_image``: the CPU part alone (read, segment, encode; ``--baseline image-labels``)
  in one process: what one core costs per image;
- ``model_images_per_s``: the model part alone (``detect_batch`` + ``score_cells`` on batches of
  ``--batch-size`` model-size images) on this machine's device;
- ``end_to_end_s``: ``predict_folder`` with ``--workers`` processes and the model, the whole set.

and prints the estimate for a machine with ``--target-cores`` cores and a model part of
``--target-model-rate`` images/s: max(images x cpu / cores, images / rate).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from hpa_scc.utils.checkpoint import save_checkpoint
from hpa_scc.config import load_config, save_config
from hpa_scc.constants import CHANNELS
from hpa_scc.data.images import find_images, read_image, resize
from hpa_scc.models.detector import build_model
from hpa_scc.apps.predict import predict_folder
from hpa_scc.engine.inference import detect_batch, load_run, score_cells
from hpa_scc.data.synth import write_synth_set


def replicate(source: Path, out: Path, n: int) -> Path:
    """A Kaggle-layout folder of ``n`` images: the source images again and again, as symlinks."""
    records = find_images(source)
    (out / "train").mkdir(parents=True, exist_ok=True)
    rows = ["ID,Label"]
    for i in range(n):
        rec = records[i % len(records)]
        image_id = f"{rec.image_id}_r{i:04d}"
        for channel in CHANNELS:
            link = out / "train" / f"{image_id}_{channel}.png"
            if not link.exists():
                link.symlink_to((rec.folder / f"{rec.image_id}_{channel}.png").resolve())
        rows.append(f"{image_id},{'|'.join(map(str, rec.labels))}")
    (out / "train.csv").write_text("\n".join(rows) + "\n")
    return out


def make_run(work: Path, backbone: str, size: int) -> Path:
    run = work / f"run-{backbone}-{size}"
    if not (run / "last.pt").is_file():
        cfg = load_config(None, [f"model.backbone={backbone}", f"data.image_size={size}", f"train.run_dir={run}"])
        torch.manual_seed(0)
        model = build_model(cfg.model, image_size=size)
        run.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run / "config.yaml")
        save_checkpoint(run / "last.pt", {"model": model.state_dict()})
    return run


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4, help="distinct synthetic images (default: 4)")
    parser.add_argument("--test-set", type=int, default=None, help="images predicted end to end (default: --images)")
    parser.add_argument("--size", type=int, default=2048, help="image side, px (Kaggle: mostly 2048)")
    parser.add_argument("--model-size", type=int, default=512)
    parser.add_argument("--backbone", default="densenet121")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--target-cores", type=int, default=16, help="cores of the machine to estimate for")
    parser.add_argument("--target-model-rate", type=float, default=100.0,
                        help="model part, images/s, of the machine to estimate for (default: 100, the H100 target)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-predict"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    n_test = args.test_set or args.images

    source = args.work / f"synth{args.size}"
    write_synth_set(source, args.images, size=args.size, seed=0, workers=min(args.workers, 8), progress=False)
    data = replicate(source, args.work / f"test{n_test}", n_test)
    run = make_run(args.work, args.backbone, args.model_size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{n_test} images at {args.size} px ({args.images} distinct), {args.backbone} at {args.model_size} px, "
          f"{device}, {os.cpu_count()} cores", flush=True)

    def fresh(name: str) -> Path:
        out = args.work / name
        shutil.rmtree(out, ignore_errors=True)  # time a cold run, not a resume
        return out

    cpu_n = min(args.images, 8)
    cpu_data = replicate(source, args.work / f"cpu{cpu_n}", cpu_n)
    cpu_s = timed(lambda: predict_folder(None, cpu_data, fresh("pred-cpu"), baseline="image-labels", workers=1,
                                         progress=False)) / cpu_n

    loaded = load_run(run, "last.pt")
    records = find_images(source)
    smalls = [np.stack([resize(p, args.model_size) for p in read_image(r.folder, r.image_id)]) for r in records]
    cells = np.zeros((args.model_size, args.model_size), np.uint16)
    cells[: args.model_size // 2] = 1
    batches = max(2, 16 // args.batch_size) if device == "cuda" else 1
    batch = [smalls[i % len(smalls)] for i in range(args.batch_size)]

    def model_part():
        for det in detect_batch(loaded, batch):
            score_cells(cells, [1], det)
        if device == "cuda":
            torch.cuda.synchronize()

    model_part()  # warm-up: cudnn autotuning, allocator
    model_rate = args.batch_size * batches / timed(lambda: [model_part() for _ in range(batches)])

    e2e = timed(lambda: predict_folder(run, data, fresh("pred-e2e"), checkpoint="last.pt", workers=args.workers,
                                       batch_size=args.batch_size, progress=False))
    estimate = max(559 * cpu_s / args.target_cores, 559 / args.target_model_rate)
    figures = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {device}", "date": time.strftime("%Y-%m-%d"),
               "size": args.size, "model_size": args.model_size, "backbone": args.backbone,
               "cpu_s_per_image": round(cpu_s, 3), "model_images_per_s": round(model_rate, 2),
               "test_set": n_test, "workers": args.workers, "end_to_end_s": round(e2e, 1),
               "end_to_end_images_per_s": round(n_test / e2e, 2),
               "estimate_559_s": round(estimate, 1), "estimate_for": f"{args.target_cores} cores, model part "
                                                                     f"{args.target_model_rate:g} images/s"}
    print(f"CPU part (read 4 PNGs, segment, encode), one process: {cpu_s:.3f} s/image")
    print(f"model part (detect + score cells, batch {args.batch_size}, {device}): {model_rate:.2f} images/s")
    print(f"end to end, {n_test} images, {args.workers} workers: {e2e:.1f} s ({n_test / e2e:.2f} images/s)")
    print(f"estimate for 559 images on {args.target_cores} cores with the model part at "
          f"{args.target_model_rate:g} images/s: {estimate:.0f} s (target <= 180 s)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
