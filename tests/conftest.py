"""Shared fixtures: the real HPA sample (skipped when absent) and small fake data folders."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from hpa_scc.constants import CHANNELS

REPO = Path(__file__).resolve().parents[1]


def shared_dir(name: str) -> Path:
    """``../shared/<name>`` beside the checkout, or $HPA_SHARED_DIR/<name>."""
    base = Path(os.environ.get("HPA_SHARED_DIR", REPO.parent / "shared"))
    return base / name


@pytest.fixture(scope="session")
def hpa_sample() -> Path:
    path = shared_dir("hpa-sample")
    if not (path / "train").is_dir():
        pytest.skip(f"real HPA sample not found at {path} (set HPA_SHARED_DIR to the folder holding hpa-sample/)")
    return path


def write_channels(folder: Path, image_id: str, planes: np.ndarray, ext: str = ".png") -> None:
    """Write [4, H, W] planes as <id>_<channel><ext> files (PNG via OpenCV keeps 8/16 bit)."""
    folder.mkdir(parents=True, exist_ok=True)
    for channel, plane in zip(CHANNELS, planes, strict=True):
        assert cv2.imwrite(str(folder / f"{image_id}_{channel}{ext}"), plane)


@pytest.fixture
def kaggle_dir(tmp_path: Path) -> Path:
    """A Kaggle-layout folder with three random 8-bit images of different sizes."""
    rng = np.random.default_rng(0)
    rows = ["ID,Label"]
    for i, (size, label) in enumerate([(96, "0|5"), (128, "18"), (80, "11|16")]):
        image_id = f"img{i}"
        write_channels(tmp_path / "train", image_id, rng.integers(0, 256, (4, size, size), dtype=np.uint8))
        rows.append(f"{image_id},{label}")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    return tmp_path
