"""segment / prepare (dataset.py) on small synthetic sets, with the precomputed back-end where
the cells must be exact and the builtin one end to end."""

import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from conftest import true_masks_folder
from hpa_scc.data.images import read_image
from hpa_scc.constants import CLASS_NAMES
from hpa_scc.apps.prepare import prepare_dataset, segment_folder
from hpa_scc.segment import build_segmenter
from hpa_scc.data.images import read_labels
from hpa_scc.data.synth import write_synth_set
from hpa_scc.data.prepared import PreparedSet

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def synth_copy(synth, tmp_path) -> Path:
    shutil.copytree(synth, tmp_path / "set")
    return tmp_path / "set"


def test_unknown_segmenter_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown segmenter 'cellpose'; choose one of \['builtin', 'hpacellseg', 'precomputed'\]"):
        build_segmenter("cellpose")


def test_hpacellseg_missing_says_how_to_install(tmp_path, monkeypatch):
    """Without the upstream package (hidden here if it is installed) the error says how to get it."""
    for name in ("hpacellseg", "hpacellseg.cellsegmentator", "hpacellseg.utils"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it raises ImportError, loaded or not
    with pytest.raises(ImportError) as err:
        build_segmenter("hpacellseg", nuclei_model=tmp_path / "n.pth", cell_model=tmp_path / "c.pth")
    text = str(err.value)
    assert "bash scripts/setup.sh --hpacellseg" in text and "HPA-Cell-Segmentation" in text
    assert "--segmenter builtin" in text and "dpn_unet_nuclei_v1.pth" in text
    hide = ("import sys; sys.modules['hpacellseg'] = None; from hpa_scc.cli import main; "
            f"sys.exit(main(['segment', {str(tmp_path)!r}, {str(tmp_path / 'o')!r}, '--segmenter', 'hpacellseg']))")
    proc = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True)
    assert proc.returncode == 1 and "--segmenter builtin" in proc.stderr and "Traceback" not in proc.stderr


def test_precomputed_on_the_real_hpa_masks(hpa_sample):
    image_id = "5c27f04c-bb99-11e8-b2b9-ac1f6b6435d0"
    image = read_image(hpa_sample / "train", image_id)
    nuclei, cells = build_segmenter("precomputed", folder=hpa_sample / "masks")(image, image_id)
    reference = cv2.imread(str(hpa_sample / "masks" / f"{image_id}_cellmask.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(cells, reference)
    assert cells.dtype == nuclei.dtype == np.uint16 and nuclei.shape == (2048, 2048)
    ids = set(np.unique(cells)) - {0}
    assert set(np.unique(nuclei)) - {0} == ids  # every cell got a nucleus (from the blue channel)
    assert np.all(cells[nuclei > 0] == nuclei[nuclei > 0])  # nucleus k inside cell k
    # the nuclei are the blue part: far brighter in blue than the rest of their cells
    assert image[2][nuclei > 0].mean() > 3 * image[2][(cells > 0) & (nuclei == 0)].mean()


def test_precomputed_reads_npz_and_upsamples(tmp_path):
    cells = np.zeros((32, 32), np.uint16)
    cells[4:20, 4:20] = 1
    np.savez_compressed(tmp_path / "a_cell_mask.npz", cells)  # as the original implementation stored them
    image = np.zeros((4, 64, 64), np.uint8)
    image[2, 16:24, 16:24] = 200
    nuclei, got = build_segmenter("precomputed", folder=tmp_path)(image, "a")
    assert got.shape == (64, 64) and got[8:40, 8:40].all() and got.sum() == 32 * 32
    assert nuclei[16:24, 16:24].all() and nuclei.sum() == 64
    with pytest.raises(OSError, match="no cell mask for b"):
        build_segmenter("precomputed", folder=tmp_path)(image, "b")


def test_segment_folder_writes_full_size_uint16_and_resumes(synth, tmp_path):
    masks = true_masks_folder(synth, tmp_path / "truth")
    out = tmp_path / "seg"
    report = segment_folder(synth, out, segmenter="precomputed", segmenter_options={"folder": masks}, progress=False)
    assert (report.written, report.skipped_existing, report.failures) == (6, 0, [])
    for path in (synth / "masks").glob("*.png"):
        cells = cv2.imread(str(out / f"{path.stem}_cells.png"), cv2.IMREAD_UNCHANGED)
        assert cells.dtype == np.uint16 and cells.shape == (128, 128)
        np.testing.assert_array_equal(cells, read_labels(path))
        assert (out / f"{path.stem}_nuclei.png").is_file()
    again = segment_folder(synth, out, segmenter="precomputed", segmenter_options={"folder": masks}, progress=False)
    assert (again.written, again.skipped_existing) == (0, 6)
    # another segmenter into the same folder is refused, never mixed with the masks already there
    with pytest.raises(ValueError, match=r"other settings \(segmenter: 'precomputed' -> 'builtin'.*another OUT_DIR"):
        segment_folder(synth, out, segmenter="builtin", progress=False)


def test_prepare_writes_coco_that_decodes_to_the_label_images(synth, tmp_path):
    masks = true_masks_folder(synth, tmp_path / "truth")
    out = tmp_path / "prep"
    report = prepare_dataset(synth, out, size=64, segmenter="precomputed", segmenter_options={"folder": masks},
                             n_folds=2, layout="per_label", progress=False)
    assert report.written == 6 and not report.failures
    assert not (out / "coco" / "multilabel").exists()  # --layout per_label writes that layout only
    with open(synth / "train.csv") as fh:
        image_labels = {r["ID"]: sorted(map(int, r["Label"].split("|"))) for r in csv.DictReader(fh)}
    with open(synth / "cells.csv") as fh:
        true_labels = {(r["ID"], int(r["cell"])): sorted(map(int, r["Label"].split("|"))) for r in csv.DictReader(fh)}
    seen = set()
    for fold in (0, 1):
        coco = COCO(str(out / "coco" / "per_label" / f"fold{fold}.json"))
        truth = COCO(str(out / "coco_truth" / "per_label" / f"fold{fold}.json"))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())][:2] == ["Nucleoplasm", "Nuclear membrane"]
        assert min(coco.getCatIds()) == 1 and max(coco.getCatIds()) == 19
        for image in coco.loadImgs(coco.getImgIds()):
            name = image["image_name"]
            seen.add(name)
            assert image["labels"] == image_labels[name] and (image["height"], image["width"]) == (64, 64)
            small = cv2.resize(read_labels(synth / "masks" / f"{name}.png"), (64, 64), interpolation=cv2.INTER_NEAREST)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
            for ann in anns:  # each mask decodes to exactly its cell of the (resized) label image
                np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), small == ann["cell_id"])
                assert ann["category_id"] - 1 in image_labels[name]
            # per_label: each cell once per image label
            per_cell = {}
            for ann in anns:
                per_cell.setdefault(ann["cell_id"], []).append(ann["category_id"] - 1)
            assert all(sorted(v) == image_labels[name] for v in per_cell.values())
            assert set(per_cell) == set(np.unique(small)) - {0}
            # the oracle file carries each cell's true labels, a subset of the image's
            true_anns = truth.loadAnns(truth.getAnnIds(imgIds=[image["id"]]))
            got = {}
            for ann in true_anns:
                got.setdefault(ann["cell_id"], []).append(ann["category_id"] - 1)
            assert got == {k: true_labels[(name, k)] for k in got}
    assert len(seen) == 6
    cached = np.load(PreparedSet(out).image_path(sorted(seen)[0]))
    assert cached.shape == (4, 64, 64) and cached.dtype == np.uint8


def test_multilabel_layout_and_filters(synth, tmp_path):
    masks = true_masks_folder(synth, tmp_path / "truth")
    out = tmp_path / "prep"
    prepare_dataset(synth, out, size=64, segmenter="precomputed", segmenter_options={"folder": masks}, n_folds=1,
                    layout="multilabel", drop_border_cells=True, min_cell_area_px=200, progress=False)
    coco = json.loads((out / "coco" / "multilabel" / "all.json").read_text())
    images = {i["id"]: i for i in coco["images"]}
    assert coco["annotations"] and coco["info"]["layout"] == "multilabel"
    cell_keys = [(a["image_id"], a["cell_id"]) for a in coco["annotations"]]
    assert len(cell_keys) == len(set(cell_keys))  # one instance per cell
    for ann in coco["annotations"]:
        labels = [c for c, v in enumerate(ann["label_vector"]) if v]
        assert labels == images[ann["image_id"]]["labels"] and ann["category_id"] == labels[0] + 1
        assert not ann["touches_border"]
        full = read_labels(synth / "masks" / f"{images[ann['image_id']]['image_name']}.png")
        assert (full == ann["cell_id"]).sum() >= 200


def test_corrupt_image_and_image_without_cells_are_logged_and_skipped(synth_copy, tmp_path):
    masks = true_masks_folder(synth_copy, tmp_path / "truth")
    ids = sorted(p.stem for p in (synth_copy / "masks").glob("*.png"))
    broken = synth_copy / "train" / f"{ids[1]}_green.png"
    broken.write_bytes(broken.read_bytes()[:200])
    cv2.imwrite(str(masks / f"{ids[2]}_cells.png"), np.zeros((128, 128), np.uint16))
    out = tmp_path / "prep"
    report = prepare_dataset(synth_copy, out, size=64, segmenter="precomputed", segmenter_options={"folder": masks},
                             n_folds=2, workers=2, progress=False)
    assert report.written == 4 and [i for i, _ in report.failures] == [ids[1], ids[2]]
    with open(out / "failures.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["ID"] for r in rows] == [ids[1], ids[2]]
    assert f"{ids[1]}_green.png" in rows[0]["error"] and "no cell found" in rows[1]["error"]
    for layout in ("per_label", "multilabel"):  # the default writes both layouts, of the same images
        names = [i["image_name"] for f in (0, 1)
                 for i in json.loads((out / "coco" / layout / f"fold{f}.json").read_text())["images"]]
        assert sorted(names) == sorted(set(ids) - {ids[1], ids[2]})
        assert f"coco/{layout}/: 2 COCO file(s)" in report.summary()
    assert "2 skipped" in report.summary()
    # --strict: the same run through the CLI exits 1 (the finished images are kept)
    from hpa_scc.cli import main

    assert main(["prepare", str(synth_copy), str(out), "--size", "64", "--segmenter", "precomputed", "--masks",
                 str(masks), "--folds", "2", "-q", "--strict"]) == 1


def test_zero_usable_images_is_an_error(synth_copy, tmp_path):
    for path in (synth_copy / "train").glob("*_red.png"):
        path.write_bytes(b"not a png")
    out = tmp_path / "prep"
    with pytest.raises(ValueError, match=r"no image of .* could be prepared: all 6 failed \(e.g. .*red.png"):
        prepare_dataset(synth_copy, out, size=64, n_folds=2, progress=False)
    assert not (out / "coco").exists() and (out / "failures.csv").is_file()


def test_other_settings_into_the_same_folder_fail(synth, tmp_path):
    masks = true_masks_folder(synth, tmp_path / "truth")
    opts = {"segmenter": "precomputed", "segmenter_options": {"folder": masks}, "progress": False}
    prepare_dataset(synth, tmp_path / "p", size=32, n_folds=2, **opts)
    with pytest.raises(ValueError, match=r"size: 32 -> "):
        prepare_dataset(synth, tmp_path / "p", size=48, n_folds=2, **opts)
    with pytest.raises(ValueError, match=r"layout: 'both' -> 'multilabel'"):  # the layouts are a setting too
        prepare_dataset(synth, tmp_path / "p", size=32, n_folds=2, layout="multilabel", **opts)
    with pytest.raises(ValueError, match="unknown layout 'all'; choose one of"):
        prepare_dataset(synth, tmp_path / "q", size=32, n_folds=2, layout="all", **opts)


@pytest.mark.slow
def test_killed_prepare_resumes_without_duplicates_or_partial_files(tmp_path):
    data = tmp_path / "set"
    write_synth_set(data, 12, size=512, seed=7, progress=False)
    args = [sys.executable, str(REPO / "dataset.py"), str(data), str(tmp_path / "prep"), "--size", "256",
            "--segmenter", "builtin", "--folds", "2", "--workers", "1", "-q"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = tmp_path / "prep" / "records"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(records.glob("*/*.json"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(records.glob("*/*.json")))
    assert 3 <= finished < 12, "the run should have been killed part-way"
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"{12 - finished} images done now, {finished} already done, 0 skipped" in done.stdout
    assert not [p for p in (tmp_path / "prep").rglob("*") if ".tmp" in p.name], "partial files left behind"
    names = [i["image_name"] for f in (0, 1) for i in json.loads((tmp_path / "prep" / "coco" / "per_label" / f"fold{f}.json").read_text())["images"]]
    assert len(names) == len(set(names)) == 12
    ann_ids = [a["id"] for a in json.loads((tmp_path / "prep" / "coco" / "per_label" / "fold0.json").read_text())["annotations"]]
    assert len(ann_ids) == len(set(ann_ids))


def test_a_changed_table_relabels_and_a_truncated_array_is_redone(synth_copy, tmp_path):
    out = tmp_path / "prep"
    prepare_dataset(synth_copy, out, size=64, n_folds=2, progress=False)
    table = synth_copy / "train.csv"
    rows = table.read_text().splitlines()
    first_id = rows[1].split(",")[0]
    rows[1] = f"{first_id},7"  # a corrected label
    table.write_text("\n".join(rows) + "\n")
    npy = PreparedSet(out).image_path(rows[2].split(',')[0])
    npy.write_bytes(npy.read_bytes()[:100])  # a job killed mid-copy, a full disk
    report = prepare_dataset(synth_copy, out, size=64, n_folds=2, progress=False)
    assert report.written == 1 and report.skipped_existing == 5  # the truncated one redone, the others reused
    assert "1 finished image(s) relabelled" in report.summary()
    assert np.load(npy).shape == (4, 64, 64)
    assert json.loads(PreparedSet(out).record_path(first_id).read_text())["labels"] == [7]
    per_label = [a for f in (0, 1) for a in json.loads((out / "coco" / "per_label" / f"fold{f}.json").read_text())
                 ["annotations"]]
    coco = {i["id"]: i["image_name"] for f in (0, 1)
            for i in json.loads((out / "coco" / "per_label" / f"fold{f}.json").read_text())["images"]}
    categories = {c["id"]: c["name"] for c in json.loads((out / "coco" / "per_label" / "fold0.json").read_text())
                  ["categories"]}
    labels_of_first = {categories[a["category_id"]] for a in per_label if coco.get(a["image_id"]) == first_id}
    assert labels_of_first == {CLASS_NAMES[7]}  # COCO files carry the corrected label
