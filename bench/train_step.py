"""Training and inference speed of each backbone, in images/s, through the package's own training step.

    .venv/bin/python bench/train_step.py --size 256 --batch 2 --steps 3                 # CPU, all backbones
    python bench/train_step.py --device cuda --size 512 --batch 8 --steps 20 --mode both --json out.json

A step is ``engine.train_one_epoch`` over pre-made batches of synthetic HPA images (uint8, copied
to the device each step as in training) with their true cells as targets (``--head``: the
multilabel default, one instance per cell with its label vector; softmax: the first label per
cell): forward, backward, clipping, optimizer step, scheduler step. Random-init models,
so no weights are needed. Modes:

- ``fast``: what training uses on a GPU: bf16 autocast, channels_last, TF32, cudnn.benchmark,
  fused SGD, losses read back every 20 steps (``--compile`` adds torch.compile of the backbone);
- ``plain``: the same code in plain fp32: no autocast, NCHW, no TF32, no cudnn.benchmark,
  per-tensor SGD, losses read back every step;
- ``both``: each, side by side in this process, and the ratio fast / plain.

On CPU both modes are plain fp32 (the fast path is CUDA-only). The first ``--warmup`` steps
(cudnn autotuning, compilation) are not timed. Prints one row per backbone and mode.

Engines (``--engine``): ``torchvision`` (the default, as above), ``detectron2`` (its
GeneralizedRCNN from ``hpa_scc.models.d2model``, the model ``hpa_scc.engine.d2train`` trains, on
the same synthetic images as detectron2 inputs: uint8 images, Instances with the cells' boxes,
first labels and bitmasks; a step is its forward with losses, backward, clipping and SGD, as
DefaultTrainer's; inference through the ``D2Detector`` adapter ``predict`` uses; fast mode on a
GPU adds bf16 autocast, TF32 and cudnn.benchmark), or ``both``, side by side. detectron2 builds
the FPN backbones only (resnet101_fpn, resnext101_32x8d_fpn) with its softmax head; its rows
say ``detectron2`` in the engine column.

    .venv/bin/python bench/train_step.py --engine both --backbones resnet101_fpn --size 256 --batch 2 --steps 3
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from hpa_scc.config import ModelConfig
from hpa_scc.constants import labels_to_multihot
from hpa_scc.engine.loop import autocast, train_one_epoch, use_fast_path
from hpa_scc.data.instances import masks_to_boxes
from hpa_scc.models.detector import build_model
from hpa_scc.data.synth import generate_image

BACKBONES = ["densenet121", "densenet121_fpn", "resnet101_fpn", "resnext101_32x8d_fpn"]


def make_batch(n: int, size: int, channels: int, pin: bool, head: str = "multilabel"):
    """n synthetic images (uint8 [C, S, S]) with torchvision targets for ``head``, on the host."""
    images, targets = [], []
    for i in range(n):
        synth = generate_image(i, size=size, seed=123)
        ids = sorted(synth.cell_labels)
        masks = torch.from_numpy(np.stack([synth.cells == k for k in ids]).astype(np.uint8))
        image = torch.from_numpy(np.ascontiguousarray(synth.image[:channels]))
        target = {"boxes": masks_to_boxes(masks), "masks": masks}
        if head == "multilabel":
            target["labels"] = torch.ones(len(ids), dtype=torch.int64)
            target["label_vectors"] = torch.tensor([labels_to_multihot(synth.cell_labels[k]) for k in ids], dtype=torch.float32)
        else:
            target["labels"] = torch.tensor([synth.cell_labels[k][0] + 1 for k in ids], dtype=torch.int64)
        if pin:
            image, target = image.pin_memory(), {k: v.pin_memory() for k, v in target.items()}
        images.append(image)
        targets.append(target)
    return tuple(images), tuple(targets)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_inference(model, batch, device: torch.device, fast: bool, args) -> tuple[float, float | None]:
    """(images/s of ``model`` in eval mode on ``batch``'s images, peak GPU GiB or None): the same
    timing for either engine (a detectron2 model behind ``D2Detector``)."""
    with torch.no_grad():
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                sync(device)
                start = time.perf_counter()
            images = [im.to(device, non_blocking=True).float().div_(255.0) for im in batch[0]]
            with autocast(device, fast):
                model(images)
        sync(device)
    infer_rate = args.batch * args.steps / (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return infer_rate, peak


def measure(backbone: str, mode: str, args, device: torch.device, batch) -> dict:
    fast = mode == "fast" and device.type == "cuda"
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, head=args.head, in_channels=args.channels),
                        image_size=args.size).to(device)
    use_fast_path(model, device, channels_last=fast, tf32=fast, compile=fast and args.compile)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, fused=fast or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    kw = {"clip_grad_norm": 10.0, "amp": fast, "sync_every": 20 if fast else 1}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    train_one_epoch(model, optimizer, scheduler, [batch] * args.warmup, device, **kw)
    sync(device)
    start = time.perf_counter()
    train_one_epoch(model, optimizer, scheduler, [batch] * args.steps, device, **kw)
    sync(device)
    train_rate = args.batch * args.steps / (time.perf_counter() - start)

    infer_rate, peak = time_inference(model.eval(), batch, device, fast, args)
    return {"backbone": backbone, "mode": mode + ("+compile" if fast and args.compile else ""),
            "train_images_per_s": round(train_rate, 2), "infer_images_per_s": round(infer_rate, 2),
            "peak_gpu_gib": None if peak is None else round(peak, 2)}


D2_BACKBONES = ["resnet101_fpn", "resnext101_32x8d_fpn"]  # what detectron2's model zoo builds


def d2_inputs(batch, device: torch.device) -> list[dict]:
    """A torchvision (images, targets) batch (softmax labels 1..19) as detectron2's training inputs, on ``device``."""
    from detectron2.structures import BitMasks, Boxes, Instances

    inputs = []
    for image, target in zip(*batch):
        inst = Instances(tuple(image.shape[-2:]))
        inst.gt_boxes = Boxes(target["boxes"].to(device))
        inst.gt_classes = (target["labels"] - 1).to(device)  # detectron2 classes are 0-based
        inst.gt_masks = BitMasks(target["masks"].to(device).bool())
        inputs.append({"image": image.to(device, non_blocking=True), "instances": inst})
    return inputs


def measure_d2(backbone: str, mode: str, args, device: torch.device, batch) -> dict:
    """detectron2's training step and inference on ``batch`` (made with the softmax head's labels)."""
    from hpa_scc.config import load_config
    from hpa_scc.models.d2model import D2Detector, build_d2_config, build_d2_model

    fast = mode == "fast" and device.type == "cuda"
    cfg = load_config(None, ["model.engine=detectron2", "model.head=softmax", f"model.backbone={backbone}",
                             f"model.in_channels={args.channels}", f"data.image_size={args.size}",
                             f"train.device={device.type}"])
    torch.manual_seed(0)
    model = build_d2_model(build_d2_config(cfg)).to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = fast
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = fast
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step():
        inputs = d2_inputs(batch, device)  # the host -> device copy is part of a step, as in training
        with autocast(device, fast):
            losses = model(inputs)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        if not fast:
            loss.item()  # losses read back every step, as the plain torchvision mode

    from detectron2.utils.events import EventStorage

    model.train()
    with EventStorage(0):  # detectron2's losses log into the trainer's event storage
        for _ in range(args.warmup):
            step()
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(device)
    train_rate = args.batch * args.steps / (time.perf_counter() - start)

    infer_rate, peak = time_inference(D2Detector(model).eval(), batch, device, fast, args)
    return {"backbone": backbone, "engine": "detectron2", "mode": mode, "train_images_per_s": round(train_rate, 2),
            "infer_images_per_s": round(infer_rate, 2), "peak_gpu_gib": None if peak is None else round(peak, 2)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=BACKBONES, choices=BACKBONES)
    parser.add_argument("--size", type=int, default=256, help="image side, px (default: 256)")
    parser.add_argument("--batch", type=int, default=2, help="images per step (default: 2)")
    parser.add_argument("--channels", type=int, default=4, choices=[3, 4])
    parser.add_argument("--head", choices=["multilabel", "softmax"], default="multilabel",
                        help="classification head and its targets (default: multilabel, the training default)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: 1)")
    parser.add_argument("--mode", choices=["fast", "plain", "both"], default="fast")
    parser.add_argument("--compile", action="store_true", help="fast mode also compiles the backbone")
    parser.add_argument("--engine", choices=["torchvision", "detectron2", "both"], default="torchvision",
                        help="whose training step: this package's torchvision loop (default), detectron2's model "
                             f"({', '.join(D2_BACKBONES)} only), or both side by side")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    where = (torch.cuda.get_device_name() if device.type == "cuda"
             else f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    print(f"{where}; {args.size} px, batch {args.batch}, {args.channels} channels, {args.head} head, "
          f"torch {torch.__version__}")
    print(f"{'backbone':<24}{'engine':<13}{'mode':<14}{'train img/s':>12}{'infer img/s':>12}{'peak GiB':>10}")
    batch = make_batch(args.batch, args.size, args.channels, pin=device.type == "cuda", head=args.head)
    engines = ["torchvision", "detectron2"] if args.engine == "both" else [args.engine]
    # detectron2 trains its softmax head: its batch carries each cell's first label
    d2_batch = make_batch(args.batch, args.size, args.channels, pin=device.type == "cuda", head="softmax") \
        if "detectron2" in engines else None
    modes = ["plain", "fast"] if args.mode == "both" else [args.mode]
    rows = []
    for backbone in args.backbones:
        for engine in engines:
            if engine == "detectron2" and backbone not in D2_BACKBONES:
                print(f"{backbone:<24}{engine:<13}{'-':<14}  (detectron2 builds {', '.join(D2_BACKBONES)} only)")
                continue
            for mode in modes:
                if engine == "torchvision":
                    row = measure(backbone, mode, args, device, batch)
                    row["engine"] = engine
                else:
                    row = measure_d2(backbone, mode, args, device, d2_batch)
                rows.append(row)
                peak = "-" if row["peak_gpu_gib"] is None else f"{row['peak_gpu_gib']:.2f}"
                print(f"{backbone:<24}{engine:<13}{row['mode']:<14}{row['train_images_per_s']:>12.2f}"
                      f"{row['infer_images_per_s']:>12.2f}{peak:>10}", flush=True)
            if len(modes) == 2:
                plain, fast = rows[-2], rows[-1]
                ratio = fast["train_images_per_s"] / plain["train_images_per_s"]
                fast["train_speedup_vs_plain"] = round(ratio, 2)
                print(f"{'':<37}{'fast/plain':<14}{ratio:>11.2f}x"
                      f"{fast['infer_images_per_s'] / plain['infer_images_per_s']:>11.2f}x", flush=True)
        if len(engines) == 2 and len(rows) >= 2 * len(modes) and rows[-1]["engine"] == "detectron2":
            tv, d2 = rows[-1 - len(modes)], rows[-1]  # the last mode of each engine
            ratio = d2["train_images_per_s"] / tv["train_images_per_s"]
            d2["train_ratio_vs_torchvision"] = round(ratio, 2)
            print(f"{'':<24}{'d2/tv':<13}{d2['mode']:<14}{ratio:>11.2f}x"
                  f"{d2['infer_images_per_s'] / tv['infer_images_per_s']:>11.2f}x", flush=True)
    figures = {"device": where, "torch": torch.__version__, "size": args.size, "batch": args.batch, "head": args.head,
               "engine": args.engine,
               "steps": args.steps, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2)
    return figures


if __name__ == "__main__":
    main()
