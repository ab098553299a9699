"""End-to-end prediction time per 2048 x 2048 image: read four PNGs, segment, score every cell,
encode every mask once.

    .venv/bin/python bench/predict.py [--images 4] [--size 2048] [--model-size 512] [--backbone densenet121]

Uses a random-init model saved as a run folder (speed does not depend on the weights, except
through how many boxes pass the score threshold) and synthetic images at Kaggle's size. Prints
seconds per image for each cell mode on this machine.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from hpa_scc.checkpoint import save_checkpoint
from hpa_scc.config import load_config, save_config
from hpa_scc.models import build_model
from hpa_scc.predict import predict_folder
from hpa_scc.synth import write_synth_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--model-size", type=int, default=512)
    parser.add_argument("--backbone", default="densenet121")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-predict"))
    args = parser.parse_args()

    data = args.work / f"synth{args.size}"
    write_synth_set(data, args.images, size=args.size, seed=0, workers=2, progress=False)
    run = args.work / f"run-{args.backbone}-{args.model_size}"
    if not (run / "last.pt").is_file():
        cfg = load_config(None, [f"model.backbone={args.backbone}", f"data.image_size={args.model_size}",
                                 f"train.run_dir={run}"])
        torch.manual_seed(0)
        model = build_model(cfg.model, image_size=args.model_size)
        run.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run / "config.yaml")
        save_checkpoint(run / "last.pt", {"model": model.state_dict()})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{args.images} synthetic {args.size} px images, {args.backbone} at {args.model_size} px, {device}, "
          f"torch threads {torch.get_num_threads()}")
    for cells in ("segmenter", "model"):
        out = args.work / f"pred-{cells}"
        shutil.rmtree(out, ignore_errors=True)  # time a cold run, not a resume
        start = time.perf_counter()
        predict_folder(run, data, out, cells=cells, checkpoint="last.pt", progress=False)
        seconds = (time.perf_counter() - start) / args.images
        print(f"--cells {cells:<10} {seconds:6.2f} s/image (model load included)")


if __name__ == "__main__":
    main()
