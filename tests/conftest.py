"""Shared fixtures: the real HPA sample (skipped when absent) and small fake data folders."""

from __future__ import annotations

import json
import os
import shutil
import sys
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


def true_masks_folder(synth: Path, out: Path) -> Path:
    """A synthetic set's truth laid out as a precomputed segmentation (<ID>_cells.png, <ID>_nuclei.png)."""
    out.mkdir(parents=True, exist_ok=True)
    for path in (synth / "masks").glob("*.png"):
        shutil.copy(path, out / f"{path.stem}_cells.png")
        shutil.copy(synth / "nuclei" / path.name, out / f"{path.stem}_nuclei.png")
    return out


def make_tiny_run(root: Path) -> Path:
    """root/set: 4 synthetic images at 256 px; root/prepared at 128 px; root/run: DenseNet121 after one step."""
    from hpa_scc.config import load_config
    from hpa_scc.apps.prepare import prepare_dataset
    from hpa_scc.data.synth import write_synth_set
    from hpa_scc.engine.train import train

    write_synth_set(root / "set", 4, size=256, seed=31, progress=False)
    prepare_dataset(root / "set", root / "prepared", size=128, n_folds=2, progress=False)
    train(load_config(None, [f"data.prepared_dir={root / 'prepared'}", "data.image_size=128", "data.workers=0",
                             f"train.run_dir={root / 'run'}", "train.max_epochs=1", "train.images_per_gpu=2",
                             "train.max_iters_per_epoch=1", "train.tensorboard=false", "data.max_val_images=1"]),
          progress=False)
    return root


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """A small synthetic set (6 images, 128 px, seed 5) with its truth, shared by a test module."""
    from hpa_scc.data.synth import write_synth_set

    out = tmp_path_factory.mktemp("synth") / "set"
    write_synth_set(out, 6, size=128, seed=5, progress=False)
    return out


# jupyter_client starts these argv[0] names as sys.executable (KernelManager.format_kernel_cmd)
PYTHON_NAMES = {"python", f"python{sys.version_info[0]}", "python%d.%d" % sys.version_info[:2]}


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """Make kernel "python3" this interpreter: as installed if it already is, else a temporary spec."""
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    argv0 = spec.argv[0]
    if argv0 in PYTHON_NAMES or os.path.realpath(argv0) == os.path.realpath(sys.executable):
        yield
        return
    folder = tmp_path_factory.mktemp("jupyter") / "kernels" / "python3"
    folder.mkdir(parents=True)
    (folder / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (tests)", "language": "python"}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(folder.parents[1]))  # searched before the user and system folders
        yield
