"""The hpacellseg back-end against the real upstream packages (HPA-Cell-Segmentation, pytorch_zoo).

Skipped when they are not installed (``bash scripts/setup.sh --hpacellseg``; CI installs them
from ../shared/wheels). The weight files are pytorch_zoo ``DPNUnet`` models with random
weights, saved whole as Zenodo's are (``random_dpn_unet``: about 0.56 GB each, built once per
session); their last layer says "inside a cell" everywhere, so that every image has cells to check.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import write_channels
from hpa_scc.data.images import read_image, read_labels

WHY = "HPA-Cell-Segmentation is not installed: bash scripts/setup.sh --hpacellseg"
hpacellseg = pytest.importorskip("hpacellseg.cellsegmentator", reason=WHY)
pytest.importorskip("pytorch_zoo.unet", reason=WHY)

from hpa_scc.segment import check_segmenter  # noqa: E402
from hpa_scc.segment import hpacellseg as backend  # noqa: E402
from hpa_scc.data.prepared import PreparedSet

SAMPLES = ("5c27f04c-bb99-11e8-b2b9-ac1f6b6435d0", "94e33c64-bb9b-11e8-b2b9-ac1f6b6435d0")


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("hpacellseg-weights")
    model = backend.random_dpn_unet(inside=True)
    paths = folder / "dpn_unet_nuclei_v1.pth", folder / "dpn_unet_cell_3ch_v1.pth"
    for path in paths:
        torch.save(model, path)  # a whole pickled module, as upstream's files
    return paths


class ChannelThreshold(torch.nn.Module):
    """A stand-in U-Net whose "inside" class follows one input channel (bright = inside), so
    where the labels land can be checked against the image."""

    def __init__(self, channel: int):
        super().__init__()
        self.channel = channel

    def forward(self, x):
        c = x[:, self.channel:self.channel + 1]
        return torch.cat([-c * 8, torch.full_like(c, -20.0), c * 8], dim=1)


def discs(shape: tuple[int, int], centres: list[tuple[int, int]], radius: int) -> np.ndarray:
    out = np.zeros(shape, np.uint8)
    for y, x in centres:
        cv2.circle(out, (x, y), radius, 255, -1)
    return out


def test_weight_files_need_weights_only_false(weights):
    """Finding 1: upstream's torch.load(path) refuses the files; the back-end loads them."""
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        torch.load(weights[0])
    model = backend.load_model(weights[0], "cpu")
    assert type(model).__name__ == "DPNUnet" and not model.training


def test_bad_weight_files_name_the_file(tmp_path, weights):
    bad = tmp_path / "dpn_unet_nuclei_v1.pth"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match=f"{bad}: not a readable torch model file.*zenodo"):
        backend.load_model(bad, "cpu")
    state = tmp_path / "state.pth"
    torch.save({"w": torch.zeros(1)}, state)
    with pytest.raises(ValueError, match="holds a dict, not a model"):
        backend.load_model(state, "cpu")
    with pytest.raises(FileNotFoundError, match=r"--cell-model .*missing\.pth: weight file not found; download"):
        check_segmenter("hpacellseg", nuclei_model=weights[0], cell_model=tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match=r"--nuclei-model .* is a folder; give the weight file itself "
                                                r"\(dpn_unet_nuclei_v1\.pth\)"):
        check_segmenter("hpacellseg", nuclei_model=tmp_path, cell_model=weights[1])
    with pytest.raises(FileNotFoundError) as missing:  # both flags named; the packages are installed: no install hint
        check_segmenter("hpacellseg")
    assert str(missing.value).startswith("the hpacellseg back-end needs --nuclei-model and --cell-model: download")
    assert "setup.sh" not in str(missing.value)


def test_same_predictions_as_upstream_where_upstream_works(hpa_sample, monkeypatch):
    """Findings 2 and 3 pinned on upstream's own CellSegmentator (models handed over as modules):
    its rescale call fails under scikit-image 0.26; with that argument renamed its predictions
    equal the back-end's on a square image, and on a non-square one come back (W, H)."""
    from types import SimpleNamespace

    from skimage import transform

    model = backend.random_dpn_unet()
    image = read_image(hpa_sample / "train", SAMPLES[0])[:, 512:768, 512:768]  # 256 px of a real field
    upstream = hpacellseg.CellSegmentator(model, model, scale_factor=0.25, device="cpu", padding=True,
                                          multi_channel_model=True)
    red, blue, yellow = image[0], image[2], image[3]
    with pytest.raises(TypeError, match="multichannel"):
        upstream.pred_nuclei([blue])

    def rescale(img, scale, multichannel=False, **kw):
        return transform.rescale(img, scale, channel_axis=-1 if multichannel else None, **kw)

    monkeypatch.setattr(hpacellseg, "transform", SimpleNamespace(rescale=rescale))
    ours = backend.HpaCellSegmenter(model, model, device="cpu")
    nuclei, cells = ours.predictions(image)
    assert nuclei.dtype == cells.dtype == np.uint8 and nuclei.shape == cells.shape == (256, 256, 3)
    np.testing.assert_array_equal(nuclei, upstream.pred_nuclei([blue])[0])
    np.testing.assert_array_equal(cells, upstream.pred_cells([[red], [yellow], [blue]])[0])
    assert nuclei[..., 2].std() > 0  # a random network: the comparison is not of constants

    wide = image[:, :192, :]  # 192 x 256
    assert upstream.pred_nuclei([wide[2]])[0].shape == (256, 192, 3)  # upstream: transposed size
    assert ours.predictions(wide)[0].shape == (192, 256, 3)


def test_non_square_labels_land_where_the_cells_are():
    """Finding 3 end to end: on a 320 x 512 image the nuclei and cells lie on the bright discs."""
    shape = (320, 512)
    centres = [(100, 100), (200, 380), (230, 180)]
    blue = discs(shape, centres, 40)
    body = discs(shape, centres, 70)
    image = np.stack([body, np.zeros(shape, np.uint8), blue, body])
    segmenter = backend.HpaCellSegmenter(ChannelThreshold(2), ChannelThreshold(0), device="cpu")
    nuclei, cells = segmenter(image, "discs")
    assert nuclei.shape == cells.shape == shape and nuclei.dtype == cells.dtype == np.uint16
    assert len(np.unique(cells)) - 1 == 3 and len(np.unique(nuclei)) - 1 == 3
    for y, x in centres:
        k = nuclei[y, x]
        assert k > 0 and cells[y, x] == k  # same id in both images
        disc = discs(shape, [(y, x)], 40) > 0
        iou = ((nuclei == k) & disc).sum() / ((nuclei == k) | disc).sum()
        assert iou > 0.8, iou
    assert np.all(cells[nuclei > 0] == nuclei[nuclei > 0])  # every nucleus inside its own cell


def test_an_upstream_error_skips_the_image_not_the_run(monkeypatch):
    segmenter = backend.HpaCellSegmenter(ChannelThreshold(2), ChannelThreshold(0), device="cpu")

    def broken(nuclei_pred, cell_pred):
        raise TypeError("rescale() got an unexpected keyword argument 'multichannel'")

    monkeypatch.setattr(segmenter, "_label_cell", broken)
    with pytest.raises(ValueError, match=r"hpacellseg failed on img7 \(4, 64, 64\): TypeError: rescale"):
        segmenter(np.zeros((4, 64, 64), np.uint8), "img7")


def test_models_load_once_per_process(tmp_path, weights, monkeypatch):
    """The step checks the files in the parent and loads the models in each worker (here: this
    process), once: 2 loads for a folder of images, not 2 per image nor 2 more for the check."""
    from hpa_scc.apps.prepare import segment_folder

    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for i in range(3):
        write_channels(data, f"img{i}", rng.integers(0, 255, (4, 96, 128), dtype=np.uint8))
    loads = []
    real = backend.load_model
    monkeypatch.setattr(backend, "load_model", lambda source, device: loads.append(source) or real(source, device))
    report = segment_folder(data, tmp_path / "seg", segmenter="hpacellseg", progress=False,
                            segmenter_options={"nuclei_model": weights[0], "cell_model": weights[1]}, workers=1)
    assert report.written == 3 and not report.failures
    assert loads == [weights[0], weights[1]]
    assert read_labels(tmp_path / "seg" / "img2_cells.png").shape == (96, 128)


@pytest.fixture
def real_images(hpa_sample, tmp_path) -> Path:
    """Two real fields, small: one square (512 px), one non-square (a 384 x 512 crop)."""
    data = tmp_path / "real"
    square = read_image(hpa_sample / "train", SAMPLES[0])
    square = np.stack([cv2.resize(p, (512, 512), interpolation=cv2.INTER_AREA) for p in square])
    wide = read_image(hpa_sample / "train", SAMPLES[1])[:, :768, :1024]
    wide = np.stack([cv2.resize(p, (512, 384), interpolation=cv2.INTER_AREA) for p in wide])
    write_channels(data / "train", SAMPLES[0], square)
    write_channels(data / "train", SAMPLES[1], wide)
    (data / "train.csv").write_text(f"ID,Label\n{SAMPLES[0]},8|5|0\n{SAMPLES[1]},9|16|13\n")
    return data


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpa_scc", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_segment_and_prepare_commands_on_real_images(real_images, weights, tmp_path):
    """The user's path: ``segment`` and ``prepare`` with --segmenter hpacellseg, two workers, on
    a square and a non-square real image; the output contract holds for both."""
    models = ["--nuclei-model", weights[0], "--cell-model", weights[1]]
    seg = tmp_path / "seg"
    done = run_cli("segment", real_images / "train", seg, "--segmenter", "hpacellseg", *models, "--workers", "2")
    assert done.returncode == 0, done.stderr
    for image_id, shape in ((SAMPLES[0], (512, 512)), (SAMPLES[1], (384, 512))):
        nuclei, cells = read_labels(seg / f"{image_id}_nuclei.png"), read_labels(seg / f"{image_id}_cells.png")
        assert nuclei.shape == cells.shape == shape and nuclei.dtype == cells.dtype == np.uint16
        assert cells.max() >= 1
        assert np.all(cells[nuclei > 0] == nuclei[nuclei > 0])
    assert (seg / "failures.csv").read_text().strip() == "ID,error"

    out = tmp_path / "prepared"
    done = run_cli("prepare", real_images, out, "--size", "128", "--folds", "1", "--segmenter", "hpacellseg",
                   *models, "--workers", "2")
    assert done.returncode == 0, done.stderr
    coco = json.loads((out / "coco" / "multilabel" / "all.json").read_text())
    images = {img["image_name"]: img for img in coco["images"]}
    assert sorted(images) == sorted(SAMPLES)
    assert (images[SAMPLES[1]]["orig_height"], images[SAMPLES[1]]["orig_width"]) == (384, 512)
    assert {ann["image_id"] for ann in coco["annotations"]} == {img["id"] for img in coco["images"]}
    assert json.loads((out / "prepare.json").read_text())["segmenter"] == "hpacellseg"
    assert PreparedSet(out).cells(SAMPLES[1]).shape == (384, 512)

    # The folders record the weight files by path, size and time: other weights at the same path
    # (here the cell model's file touched) are another segmenter, refused, never mixed in.
    recorded = json.loads((out / "prepare.json").read_text())["segmenter_options"]
    assert recorded["cell_model"]["path"] == str(Path(weights[1]).resolve()) and "device" not in recorded
    stat = os.stat(weights[1])
    os.utime(weights[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        for command in (["segment", real_images / "train", seg], ["prepare", real_images, out, "--size", "128", "--folds", "1"]):
            again = run_cli(*command, "--segmenter", "hpacellseg", *models)
            assert again.returncode == 1 and "other settings (segmenter_options.cell_model.mtime_ns: " in again.stderr, \
                again.stderr[-2000:]
    finally:
        os.utime(weights[1], ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.slow
def test_speed_bench_prints_its_rows(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "bench" / "segment_hpacellseg.py"),
                           "--size", "256", "--repeats", "1", "--device", "cpu", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "repeat 0: networks" in done.stdout and "256 px" in done.stdout
    saved = json.loads(out.read_text())
    assert (saved["size"], saved["device"]) == (256, "cpu") and [r["repeat"] for r in saved["rows"]] == [0]
    # the JSON holds the times printed (to 0.01 s), and the printed total is their sum
    printed = re.search(r"repeat 0: networks +([\d.]+) s +label_cell +([\d.]+) s +total +([\d.]+) s", done.stdout)
    networks, label_cell, total = map(float, printed.groups())
    row = saved["rows"][0]
    assert row["networks_s"] == networks > 0 and row["label_cell_s"] == label_cell
    assert total == pytest.approx(networks + label_cell, abs=0.011) and isinstance(row["cells"], int)
