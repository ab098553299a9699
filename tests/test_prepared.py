"""PreparedSet: the one reader of a prepared folder's facts (size, folds, layouts, labels, pixels)."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from hpa_scc.config import load_config
from hpa_scc.data.images import read_labels
from hpa_scc.data.prepared import PreparedSet, cell_labels, label_image, labels_folder
from hpa_scc.data.synth import read_true_cell_labels
from hpa_scc.utils.fileio import fanned


@pytest.fixture(scope="module")
def prepared(shared_data) -> PreparedSet:
    """The conftest synth set (6 images at 128 px, seed 5) prepared at 64 px in 2 folds (fold seed 0)."""
    return PreparedSet(shared_data.prepared(images=6, size=128, seed=5, prepare_size=64, folds=2) / "prepared")


def test_the_settings_come_from_prepare_json(prepared):
    saved = json.loads((prepared.root / "prepare.json").read_text())
    assert prepared.size == saved["size"] == 64 and prepared.n_folds == saved["folds"] == 2
    assert prepared.layouts("image") == ("multilabel", "per_label") == prepared.layouts("truth")
    assert prepared.layouts("refined_r1") == ()
    assert Path(prepared) == prepared.root  # a PreparedSet goes wherever its path does


def test_fold_files_and_coco_paths_agree(prepared):
    files = prepared.fold_files("multilabel")
    assert [f for f, _ in files] == [0, 1]
    assert [p for _, p in files] == [prepared.coco_path("multilabel", f) for f in (0, 1)]
    assert files[1][1] == prepared.root / "coco" / "multilabel" / "fold1.json"
    merged = prepared.read_folds("multilabel", [0, 1])
    parts = [json.loads(p.read_text()) for _, p in files]
    assert len(merged["images"]) == sum(len(p["images"]) for p in parts) == 6
    with pytest.raises(FileNotFoundError, match=r"coco_refined_r1/multilabel/fold0.json not found; write it with a "
                                                r"refinement round"):
        prepared.coco_path("multilabel", 0, "refined_r1")
    with pytest.raises(FileNotFoundError, match="fold7.json not found.*check data.val_fold"):
        prepared.coco_path("multilabel", 7)


def test_labels_folders_are_named_once():
    assert [labels_folder(x) for x in ("image", "truth", "refined_r1")] == ["coco", "coco_truth", "coco_refined_r1"]
    for bad in ("", "../x", ".hidden"):
        with pytest.raises(ValueError, match="data.labels must be"):
            labels_folder(bad)


def test_true_labels_match_the_synthetic_truth_and_the_label_vectors(prepared, synth):
    true = prepared.true_cell_labels()
    vectors = prepared.label_vectors("truth")
    assert true and set(true) == set(vectors)
    for key, labels in true.items():
        assert np.flatnonzero(vectors[key]).tolist() == labels
    # every prepared cell overlapping a synthetic cell carries labels from cells.csv
    table = read_true_cell_labels(synth)
    assert all(any(labels == t for t in table[name].values()) for (name, _), labels in true.items())
    # both layouts hold the same cells with the same labels
    per_layout = [prepared.fold_cocos("truth", layout) for layout in ("multilabel", "per_label")]
    as_labels = [{(f, i): c for f, coco in part for i, c in cell_labels(coco).items()} for part in per_layout]
    assert as_labels[0] == as_labels[1]


def test_pixels_and_masks_of_one_image(prepared):
    coco = prepared.read_folds("multilabel", [0])
    image = coco["images"][0]
    pixels = prepared.read_image(image["image_name"])
    assert pixels.dtype == np.uint8 and pixels.shape == (4, 64, 64)
    anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
    cells = label_image(anns, pixels.shape[1:])
    assert sorted(np.unique(cells[cells > 0]).tolist()) == sorted(a["cell_id"] for a in anns)
    nuclei, full_cells = prepared.segmentation(image["image_name"])
    assert full_cells.shape == (128, 128) and nuclei.dtype == np.uint16
    name = image["image_name"]
    path = fanned(prepared.root / "segmentation", name, f"{name}_cells.png")  # segmentation/<xx>/<ID>_cells.png
    np.testing.assert_array_equal(full_cells, read_labels(path))


def test_per_image_files_fan_out_and_a_flat_format_1_set_is_read_and_resumed(synth, tmp_path):
    """Format 2 keeps each kind of per-image file in 256 hashed sub-folders (a few thousand files
    per folder at 100k images); a set prepared flat by format 1 is read, resumed and merged as it is."""
    import json
    import shutil

    from hpa_scc.apps.prepare import prepare_dataset

    new = tmp_path / "new"
    prepare_dataset(synth, new, size=64, n_folds=2, progress=False)
    ps = PreparedSet(new)
    ids = [i["image_name"] for _, c in ps.fold_cocos() for i in c["images"]]
    assert ps.fanout and all(ps.image_path(i).parent.parent.name == "images" for i in ids)
    assert {ps.record_path(i).parent.name for i in ids} == {f"{zlib.crc32(i.encode()) % 256:02x}" for i in ids}
    assert not list((new / "records").glob("*.json")) and not list((new / "segmentation").glob("*.png"))
    # the same set as format 1 wrote it: flat folders
    old = tmp_path / "old"
    shutil.copytree(new, old)
    for kind, folder in (("records", old / "records"), ("npy", old / "cache" / "images"),
                         ("png", old / "segmentation")):
        for path in list(folder.glob("*/*")):
            path.rename(folder / path.name)
    for settings in (old / "prepare.json", old / "cache" / "cache.json"):
        settings.write_text(json.dumps({**json.loads(settings.read_text()), "format": 1}))
    flat = PreparedSet(old)
    assert not flat.fanout and flat.image_path(ids[0]) == old / "cache" / "images" / f"{ids[0]}.npy"
    assert np.array_equal(flat.read_image(ids[0]), ps.read_image(ids[0]))
    assert np.array_equal(flat.cells(ids[0]), ps.cells(ids[0]))
    flat.record_path(ids[1]).unlink()  # an unfinished image: the rerun redoes it, flat
    report = prepare_dataset(synth, old, size=64, n_folds=2, progress=False)
    assert (report.written, report.skipped_existing) == (1, len(ids) - 1)
    assert (old / "records" / f"{ids[1]}.json").is_file() and not list((old / "records").glob("*/*"))
    assert (old / "coco" / "multilabel" / "fold0.json").read_text() == (new / "coco" / "multilabel" / "fold0.json").read_text()


def test_errors_name_the_folder_and_the_fix(prepared, shared_data, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"prepare.json not found: .* is not a prepared set; make it with "
                                                r"'python dataset.py DATA_DIR"):
        PreparedSet(tmp_path).size
    with pytest.raises(ValueError, match=r"prepared at 64 px but data.image_size is 128; leave data.image_size out"):
        prepared.check_size(128, "data.image_size")
    assert prepared.check_size(None, "data.image_size") == prepared.check_size(64, "data.image_size") == 64
    with pytest.raises(OSError, match=r"cannot read .*nope.npy \(image nope\).*re-run prepare"):
        prepared.read_image("nope")
    own = PreparedSet(shared_data.copy(prepared.root, tmp_path / "own"))
    own.image_path("zero").parent.mkdir(parents=True, exist_ok=True)
    own.image_path("zero").write_bytes(b"")  # a copy cut short at zero bytes: EOFError in numpy
    with pytest.raises(OSError, match=r"cannot read .*zero.npy \(image zero\).*re-run prepare"):
        own.read_image("zero")


def test_the_training_size_follows_the_prepared_set(prepared, tmp_path):
    """Training a prepared set at its size needs no data.image_size: train resolves it once."""
    from hpa_scc.engine.train import start_run, end_run

    cfg = load_config(None, [f"data.prepared_dir={prepared.root}", f"train.run_dir={tmp_path / 'run'}"])
    assert cfg.data.image_size is None
    run = start_run(cfg)
    end_run(run)
    assert cfg.data.image_size is None and run.cfg.data.image_size == 64 and run.prepared.size == 64
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.data.image_size == 64  # the run folder records the resolved size


def test_a_fresh_start_sweeps_a_half_checkpoint_and_the_earlier_metrics(prepared, tmp_path):
    """SIGKILL during torch.save leaves .last.pt.<random>.tmp.pt (GBs for a FPN model); the next start sweeps it.
    Without last.pt the run starts over, so the earlier run's metrics.jsonl goes too."""
    import os
    import time

    from hpa_scc.engine.train import end_run, start_run
    from hpa_scc.utils.fileio import STALE_TEMP_S

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    half = run_dir / ".last.pt.q7x2k9ab.tmp.pt"
    half.write_bytes(b"\0" * 1024)
    then = time.time() - STALE_TEMP_S - 1
    os.utime(half, (then, then))
    (run_dir / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')  # a run that died before its first checkpoint
    end_run(start_run(load_config(None, [f"data.prepared_dir={prepared.root}", f"train.run_dir={run_dir}"])))
    assert not half.exists() and (run_dir / "config.yaml").is_file()
    assert not (run_dir / "metrics.jsonl").exists()  # a fresh start: its steps 1, 2, ... would repeat those
