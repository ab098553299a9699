"""Train the FPN Mask R-CNN models (the original implementation's detectron2 runs).

    python detectron_code/main.py --backbone resnet101 [key=value ...]
    python detectron_code/main.py --backbone resnext101 model.weights=model_final_2d9806.pkl
    torchrun --nproc-per-node 4 detectron_code/main.py --backbone resnet101

Built on torchvision's Mask R-CNN, which has detectron2's architecture; detectron2 model-zoo
checkpoints load through model.weights. The same as
``python -m hpa_scc train configs/<backbone>_fpn.yaml [key=value ...]``.
"""

import argparse
import sys
from pathlib import Path

from hpa_scc.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BACKBONES = {"resnet101": "resnet101_fpn.yaml", "resnext101": "resnext101_32x8d_fpn.yaml"}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="resnet101")
    args, overrides = parser.parse_known_args()
    sys.exit(main(["train", str(CONFIGS / BACKBONES[args.backbone]), *overrides]))
