"""Training-step and inference speed of each backbone, in images/s.

    .venv/bin/python bench/train_step.py --size 256 --batch 2 --steps 3            # CPU, all backbones
    python bench/train_step.py --device cuda --size 512 --batch 8 --precision bf16 --steps 20

Random-init models (no weights needed) on synthetic HPA images with their true cells as targets
(per_label layout, softmax head). A step is forward + backward + SGD update; the first
``--warmup`` steps are not timed. Prints one row per backbone; ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time

import numpy as np
import torch

from hpa_scc.config import ModelConfig
from hpa_scc.instances import masks_to_boxes
from hpa_scc.models import build_model
from hpa_scc.synth import generate_image

BACKBONES = ["densenet121", "resnet101_fpn", "resnext101_32x8d_fpn"]


def make_batch(n: int, size: int, channels: int, device):
    images, targets = [], []
    for i in range(n):
        synth = generate_image(i, size=size, seed=123)
        ids = sorted(synth.cell_labels)
        masks = torch.from_numpy(np.stack([synth.cells == k for k in ids]).astype(np.uint8))
        labels = torch.tensor([synth.cell_labels[k][0] + 1 for k in ids], dtype=torch.int64)
        images.append(torch.from_numpy(synth.image[:channels].astype(np.float32) / 255).to(device))
        targets.append({"boxes": masks_to_boxes(masks).to(device), "labels": labels.to(device), "masks": masks.to(device)})
    return images, targets


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(backbone: str, args, device) -> dict:
    model = build_model(ModelConfig(backbone=backbone, in_channels=args.channels), image_size=args.size).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    images, targets = make_batch(args.batch, args.size, args.channels, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(device)
            start = time.perf_counter()
        with amp:
            loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(device)
    train_rate = args.batch * args.steps / (time.perf_counter() - start)
    model.eval()
    with torch.no_grad():
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                sync(device)
                start = time.perf_counter()
            with amp:
                model(images)
        sync(device)
    infer_rate = args.batch * args.steps / (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"backbone": backbone, "train_images_per_s": round(train_rate, 3), "infer_images_per_s": round(infer_rate, 3),
            "peak_gpu_gib": round(peak, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=BACKBONES, choices=BACKBONES)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=4, choices=[3, 4])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows = []
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"{where}; {args.size} px, batch {args.batch}, {args.channels} channels, {args.precision}, torch {torch.__version__}")
    print(f"{'backbone':<24}{'train img/s':>14}{'infer img/s':>14}{'peak GPU GiB':>14}")
    for backbone in args.backbones:
        row = measure(backbone, args, device)
        rows.append(row)
        print(f"{backbone:<24}{row['train_images_per_s']:>14.2f}{row['infer_images_per_s']:>14.2f}{row['peak_gpu_gib']:>14}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": where, "size": args.size, "batch": args.batch, "precision": args.precision,
                       "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
