"""Train the FPN Mask R-CNN models (the original implementation's detectron2 runs).

    python detectron_code/main.py --backbone resnet101 [key=value ...]
    python detectron_code/main.py --backbone resnext101 model.weights=model_final_2d9806.pkl
    torchrun --nproc-per-node 4 detectron_code/main.py --backbone resnet101
    python detectron_code/main.py --engine detectron2 --backbone resnet101 [key=value ...]
    python detectron_code/main.py --config-path resnext101     # print the config file and stop
    python detectron_code/main.py --engine-overrides detectron2  # print the engine's overrides and stop

Engines (``--engine``): ``torchvision`` (the default): this package's loop on torchvision's Mask
R-CNN, which has detectron2's architecture; detectron2 model-zoo checkpoints load through
model.weights. ``detectron2``: detectron2's own DefaultTrainer on the same prepared set and config
(``hpa_scc.engine.d2train``; install it with ``bash scripts/setup.sh --detectron2``). Either is
the same as ``python -m hpa_scc train CONFIG [ENGINE OVERRIDES] [key=value ...]`` with CONFIG
configs/resnet101_fpn.yaml or configs/resnext101_32x8d_fpn.yaml.

This file owns the backbone -> config table; detectron_code/run-model.sbatch asks it through
``--config-path`` (which needs only the standard library, so any python3 on the login node can
answer before the job enters its container).
"""

import argparse
import os
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BACKBONES = {"resnet101": "resnet101_fpn.yaml", "resnext101": "resnext101_32x8d_fpn.yaml"}
# engine -> the config overrides that select it (detectron2 trains its softmax head on per_label);
# user overrides come after these, so they win.
ENGINES = {"torchvision": [], "detectron2": ["model.engine=detectron2", "model.head=softmax"]}


def config_path(backbone: str, array_task: str | None = None) -> Path:
    """The config of a backbone; ``both`` picks by array task (0: resnet101, 1: resnext101)."""
    if backbone == "both":
        names = list(BACKBONES)
        if array_task is None:  # not an array job: training one of the two silently would mislead
            raise ValueError(f"'both' trains one backbone per task of a job array: sbatch --array=0-{len(names) - 1} "
                             f"detectron_code/run-model.sbatch both (or give --backbone {' or '.join(names)})")
        task = int(array_task)
        if not 0 <= task < len(names):
            raise ValueError(f"'both' runs as --array=0-{len(names) - 1}; array task {task} has no backbone")
        backbone = names[task]
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone '{backbone}': use {', '.join(BACKBONES)} or both (with --array=0-1)")
    return CONFIGS / BACKBONES[backbone]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s [--backbone B] [--engine E] [key=value ...]")
    parser.add_argument("--backbone", default="resnet101",
                        help=f"{', '.join(BACKBONES)} (default: resnet101), or both in a SLURM array job "
                             "(--array=0-1: task 0 resnet101, task 1 resnext101)")
    parser.add_argument("--engine", default="torchvision", choices=list(ENGINES),
                        help="training library (default: torchvision)")
    parser.add_argument("--engine-overrides", metavar="ENGINE", choices=list(ENGINES),
                        help="print ENGINE's config overrides, one a line, and exit (run-model.sbatch asks)")
    parser.add_argument("--config-path", metavar="BACKBONE",
                        help="print the config file of BACKBONE ('both': by SLURM_ARRAY_TASK_ID) and exit")
    args, overrides = parser.parse_known_args()
    if args.engine_overrides:
        print("\n".join(ENGINES[args.engine_overrides]))
        sys.exit(0)
    try:
        config = config_path(args.config_path or args.backbone, os.environ.get("SLURM_ARRAY_TASK_ID"))
    except ValueError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    if args.config_path:
        print(config)
        sys.exit(0)
    from hpa_scc.cli import main  # only now: --config-path must answer without the package installed

    sys.exit(main(["train", str(config), *ENGINES[args.engine], *overrides]))
