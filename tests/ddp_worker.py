"""Run by test_train.py under torchrun: train, then save this rank's weights as RUN_DIR/rank<R>.pt."""

import os
import sys
from pathlib import Path

import torch

from hpa_scc.config import load_config
from hpa_scc.engine.train import train

if __name__ == "__main__":
    cfg = load_config(None, sys.argv[1:])
    model = train(cfg).model
    torch.save(model.state_dict(), Path(cfg.train.run_dir) / f"rank{os.environ['RANK']}.pt")
