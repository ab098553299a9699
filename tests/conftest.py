"""Shared fixtures: the real HPA sample (skipped when absent), small fake data folders, and the
session's synthetic data (``shared_data``: sets, prepared sets and a tiny run, built once each)."""

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


# --- synthetic data: built once per session and parameters, read by many modules ---------------

TINY_RUN_OVERRIDES = ["data.image_size=128", "data.workers=0", "train.max_epochs=1", "train.images_per_gpu=2",
                      "train.max_iters_per_epoch=1", "train.tensorboard=false", "data.max_val_images=1"]


def train_tiny_run(prepared: Path, run_dir: Path) -> Path:
    """DenseNet121 (the default config) trained for one step of 2 images at 128 px, validated on 1."""
    from hpa_scc.config import load_config
    from hpa_scc.engine.train import train

    train(load_config(None, [f"data.prepared_dir={prepared}", f"train.run_dir={run_dir}", *TINY_RUN_OVERRIDES]),
          progress=False)
    return run_dir


def make_tiny_run(root: Path) -> Path:
    """root/set: 4 synthetic images at 256 px; root/prepared at 128 px; root/run: DenseNet121 after
    one step. For scripts outside pytest; tests ask shared_data.tiny_run() for the same, built once."""
    from hpa_scc.apps.prepare import prepare_dataset
    from hpa_scc.data.synth import write_synth_set

    write_synth_set(root / "set", 4, size=256, seed=31, progress=False)
    prepare_dataset(root / "set", root / "prepared", size=128, n_folds=2, progress=False)
    train_tiny_run(root / "prepared", root / "run")
    return root


def folder_state(root: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file and folder under ``root``: what a write changes."""
    state = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        state[str(path.relative_to(root))] = (st.st_size if path.is_file() else 0, st.st_mtime_ns)
    return state


class SharedData:
    """Synthetic sets, prepared sets and one tiny trained run, each built once per session for
    its parameters, for tests that only READ them (building them is most of many modules' time).

        shared_data.synth(images=6, size=128, seed=5)              # write_synth_set's folder
        root = shared_data.prepared(images=6, size=256, seed=11, prepare_size=128, folds=2)
        root / "set", root / "prepared"                            # the set, prepare_dataset's output of it
        run = shared_data.tiny_run()                               # run / "set", run / "prepared", run / "run"

    Tests asking for the same parameters get the same folders. A test that writes into one (a
    crop store, a refined round, a changed fold file, a training run's lock...) works on a copy:
    ``shared_data.copy(root, tmp_path / "own")``. After each test that used the factory, every
    shared folder is compared with what was built: a test that changed one fails, naming the
    files, so that no test's result depends on which tests ran before it.
    """

    def __init__(self, base: Path):
        self.base = base
        self.built: dict[Path, dict[str, tuple[int, int]]] = {}

    def _remember(self, folder: Path) -> Path:
        self.built[folder] = folder_state(folder)
        return folder

    def synth(self, *, images: int, size: int, seed: int) -> Path:
        """write_synth_set(folder, images, size=size, seed=seed): images, labels, truth, solution.csv."""
        from hpa_scc.data.synth import write_synth_set

        folder = self.base / f"synth-{images}x{size}px-seed{seed}"
        if folder not in self.built:
            write_synth_set(folder, images, size=size, seed=seed, progress=False)
            self._remember(folder)
        return folder

    def prepared(self, *, images: int, size: int, seed: int, prepare_size: int, folds: int) -> Path:
        """root/set: the synthetic set (a copy of synth()'s); root/prepared: prepare_dataset of it
        (builtin segmenter, both layouts, fold seed 0) at ``prepare_size`` px in ``folds`` folds."""
        from hpa_scc.apps.prepare import prepare_dataset

        root = self.base / f"prepared-{images}x{size}px-seed{seed}-{prepare_size}px-{folds}folds"
        if root / "prepared" not in self.built:
            self.copy(self.synth(images=images, size=size, seed=seed), root / "set")
            prepare_dataset(root / "set", root / "prepared", size=prepare_size, n_folds=folds, progress=False)
            self._remember(root / "set")
            self._remember(root / "prepared")
        return root

    def tiny_run(self, *, images: int = 4, size: int = 256, seed: int = 31, prepare_size: int = 128,
                 folds: int = 2) -> Path:
        """prepared()'s root plus root/run: train_tiny_run on root/prepared (make_tiny_run's
        parameters by default)."""
        root = self.prepared(images=images, size=size, seed=seed, prepare_size=prepare_size, folds=folds)
        if root / "run" not in self.built:
            self._remember(train_tiny_run(root / "prepared", root / "run"))
        return root

    @staticmethod
    def copy(src: Path, dest: Path) -> Path:
        """A private copy of a shared folder (modification times kept, so stamps still match).
        A run folder's config still names the shared prepared set."""
        shutil.copytree(src, dest, symlinks=True, dirs_exist_ok=True)
        return dest

    def changes(self) -> list[str]:
        """The shared files that differ from what was built (then taken as the new state, so that
        only the test that changed them fails)."""
        found = []
        for folder, before in self.built.items():
            now = folder_state(folder)
            if now != before:
                found += [str(folder / k) for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
                self.built[folder] = now
        return found


SHARED_DATA = pytest.StashKey[SharedData]()


@pytest.fixture(scope="session")
def shared_data(request, tmp_path_factory) -> SharedData:
    """The session's SharedData (see there): read its folders, copy before writing."""
    data = request.config.stash[SHARED_DATA] = SharedData(tmp_path_factory.mktemp("shared"))
    return data


@pytest.fixture(autouse=True)
def shared_data_left_unchanged(request):
    """Fails a test (at teardown) that wrote into the shared data instead of a copy of it."""
    yield
    data = request.config.stash.get(SHARED_DATA, None)
    if data is not None and "shared_data" in request.fixturenames:
        changed = data.changes()
        if changed:
            pytest.fail(f"{request.node.nodeid} changed shared test data (copy it first: shared_data.copy): "
                        + ", ".join(changed[:10]) + (f" and {len(changed) - 10} more" if len(changed) > 10 else ""),
                        pytrace=False)


@pytest.fixture(scope="session")
def synth(shared_data) -> Path:
    """A small synthetic set (6 images, 128 px, seed 5) with its truth, read by several modules."""
    return shared_data.synth(images=6, size=128, seed=5)


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
