"""Train the DenseNet121 Mask R-CNN (the original implementation's torchvision model).

    python train_densenet.py [key=value ...]
    torchrun --nproc-per-node 4 train_densenet.py data.prepared_dir=data/prepared512

The same as ``python -m hpa_scc train configs/densenet121.yaml [key=value ...]``.
"""

import sys
from pathlib import Path

from hpa_scc.cli import main

CONFIG = Path(__file__).resolve().parent / "configs" / "densenet121.yaml"

if __name__ == "__main__":
    sys.exit(main(["train", str(CONFIG), *sys.argv[1:]]))
