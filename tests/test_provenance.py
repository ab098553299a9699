"""Finished work is reused only when made from the same inputs (utils.provenance), and no step
writes over its inputs: issue 27, rows 2, 4, 5 and 6."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hpa_scc.apps.predict import predict_folder
from hpa_scc.apps.prepare import prepare_dataset, segment_folder
from hpa_scc.constants import CHANNELS
from hpa_scc.data.cache import build_cache
from hpa_scc.data.images import LabelError, read_labels, seg_paths
from hpa_scc.data.synth import write_synth_set
from hpa_scc.evaluation.submission import read_submission
from hpa_scc.utils.provenance import changed, sources_stamp


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Two synthetic sets with the same IDs (seed 3): a at 96 px, b at 128 px."""
    root = tmp_path_factory.mktemp("prov")
    write_synth_set(root / "a", 3, size=96, seed=3, progress=False)
    write_synth_set(root / "b", 3, size=128, seed=3, progress=False)
    return root


def copy_set(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def ids(folder: Path) -> list[str]:
    with open(folder / "train.csv") as fh:
        return [r["ID"] for r in csv.DictReader(fh)]


def replace_channels(data: Path, image_id: str, donor: Path, donor_id: str) -> None:
    """Overwrite one image's four channel files with another image's (new size, new mtime)."""
    for c in CHANNELS:
        shutil.copyfile(donor / "train" / f"{donor_id}_{c}.png", data / "train" / f"{image_id}_{c}.png")


def test_sources_stamp_follows_size_and_mtime_and_extra(tmp_path):
    f = tmp_path / "x_red.png"
    f.write_bytes(b"1234")
    first = sources_stamp([f], labels=[1])
    assert sources_stamp([f], labels=[1]) == first
    assert sources_stamp([f], labels=[2]) != first
    f.write_bytes(b"12345")
    assert sources_stamp([f], labels=[1]) != first
    assert changed({"fold0": "a", "fold1": "b"}, {"fold0": "a", "fold1": "c", "fold2": "d"}) == ["fold1", "fold2"]


def test_prepare_into_the_same_out_from_another_set_redoes_every_image(sets, tmp_path):
    """Row 2b: same IDs, other files (128 px instead of 96): nothing of the first set is reused."""
    out = tmp_path / "outY"
    first = prepare_dataset(sets / "a", out, size=64, n_folds=1, progress=False)
    assert first.written == 3
    again = prepare_dataset(sets / "a", out, size=64, n_folds=1, progress=False)
    assert (again.written, again.skipped_existing) == (0, 3)
    other = prepare_dataset(sets / "b", out, size=64, n_folds=1, progress=False)
    assert (other.written, other.skipped_existing) == (3, 0)
    assert "3 finished image(s) redone" in other.summary()
    for image_id in ids(sets / "b"):
        rec = json.loads(next((out / "records").rglob(f"{image_id}.json")).read_text())
        assert (rec["orig_height"], rec["orig_width"]) == (128, 128)
        cells = read_labels(seg_paths(out / "segmentation", image_id, True)[1])
        assert cells.shape == (128, 128)  # the segmentation was redone too, not the 96 px one reused


def test_cache_and_segment_redo_a_changed_image_only(sets, tmp_path):
    """Row 2c: one image's channels replaced by another's: that image alone is redone."""
    data = copy_set(sets / "a", tmp_path / "data")
    a, b, _ = ids(data)
    cache = build_cache(data, tmp_path / "cache", size=32, progress=False)
    seg = segment_folder(data, tmp_path / "seg", progress=False)
    assert (cache.written, seg.written) == (3, 3)
    replace_channels(data, a, sets / "b", b)
    cache = build_cache(data, tmp_path / "cache", size=32, progress=False)
    seg = segment_folder(data, tmp_path / "seg", progress=False)
    assert (cache.written, cache.redone, cache.skipped_existing) == (1, 1, 2)
    assert "1 redone" in cache.summary()
    assert (seg.written, seg.skipped_existing) == (1, 2)
    assert read_labels(tmp_path / "seg" / f"{a}_cells.png").shape == (128, 128)
    with open(tmp_path / "cache" / "index.csv") as fh:
        sizes = {r["ID"]: (int(r["height"]), int(r["width"])) for r in csv.DictReader(fh)}
    assert sizes[a] == (128, 128) and sizes[b] == (96, 96)


def test_predict_redoes_changed_images_and_labels(sets, tmp_path, caplog):
    """Rows 2a and 2d: a replaced image and a changed label are redone, the rest reused."""
    caplog.set_level(logging.INFO, logger="hpa_scc")
    data = copy_set(sets / "a", tmp_path / "data")
    a, b, c = ids(data)
    out = tmp_path / "pred"
    before = {r.image_id: r for r in read_submission(
        predict_folder(None, data, out, baseline="image-labels", progress=False))}
    replace_channels(data, a, sets / "b", b)
    table = (data / "train.csv").read_text().splitlines()
    table = [f"{c},0|5" if line.startswith(f"{c},") else line for line in table]
    (data / "train.csv").write_text("\n".join(table) + "\n")
    after = {r.image_id: r for r in read_submission(
        predict_folder(None, data, out, baseline="image-labels", progress=False))}
    assert (after[a].width, after[a].height) == (128, 128) and (before[a].width, before[a].height) == (96, 96)
    assert {label for label, _, _ in after[c].predictions} == {0, 5}
    assert after[b].predictions == before[b].predictions
    assert "1 image(s) reused from an earlier run, 2 redone" in caplog.text


def test_predict_after_an_image_lost_a_channel_fails_and_leaves_no_stale_submission(sets, tmp_path):
    """Row 2e: a deleted image is not submitted from its old record."""
    data = copy_set(sets / "a", tmp_path / "data")
    a, _, _ = ids(data)
    out = tmp_path / "pred"
    predict_folder(None, data, out, baseline="image-labels", progress=False)
    (data / "train" / f"{a}_green.png").unlink()
    with pytest.raises(ValueError, match=f"1 of 3 images could not be predicted.*{a}"):
        predict_folder(None, data, out, baseline="image-labels", progress=False)
    assert not (out / "submission.csv").exists()
    kept = read_submission(predict_folder(None, data, out, baseline="image-labels", allow_missing=True,
                                          progress=False))
    assert a not in {r.image_id for r in kept} and len(kept) == 2


def test_an_id_that_names_a_path_is_refused(sets, tmp_path):
    """Row 4: '../../../esc2' in train.csv would read and write outside the folders."""
    data = copy_set(sets / "a", tmp_path / "deep" / "er" / "data")
    rows = (data / "train.csv").read_text().splitlines()
    rows.append("../../../esc2,0")
    (data / "train.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(LabelError, match=r"train.csv line 5 \(ID \.\./\.\./\.\./esc2\).*path separator"):
        prepare_dataset(data, tmp_path / "deep" / "out", size=64, n_folds=1, progress=False)
    assert not list(tmp_path.rglob("esc2*"))


def test_predict_into_the_data_folder_is_refused(sets, tmp_path):
    """Row 5: predict's cells.csv would replace the synthetic truth's cells.csv."""
    data = copy_set(sets / "a", tmp_path / "data")
    truth = (data / "cells.csv").read_bytes()
    for out in (data, data / "train" / "pred"):
        with pytest.raises(ValueError, match="--out .* is (the data folder|inside the inputs)"):
            predict_folder(None, data, out, baseline="image-labels", progress=False)
    assert (data / "cells.csv").read_bytes() == truth
    assert not (data / "records").exists() and not (data / "train" / "pred").exists()
    predict_folder(None, data, data / "pred", baseline="image-labels", progress=False)  # beside the inputs: fine
    assert (data / "cells.csv").read_bytes() == truth


def test_evaluate_refuses_an_output_that_is_an_input(sets, tmp_path):
    """Row 6: --out SUBMISSION or --plot SOLUTION would replace the file read."""
    solution = sets / "a" / "solution.csv"
    sub = tmp_path / "sub.csv"
    shutil.copyfile(solution, sub)
    before = sub.read_bytes()
    for extra, named in ((["--out", str(sub)], "--out .* is also --submission"),
                         (["--plot", str(solution)], "--plot .* is also --solution")):
        proc = subprocess.run([sys.executable, "-m", "hpa_scc", "evaluate", "--solution", str(solution),
                               "--submission", str(sub), *extra], capture_output=True, text=True)
        assert proc.returncode != 0
        assert __import__("re").search(named, proc.stderr), proc.stderr
    assert sub.read_bytes() == before and np.isclose(json.loads(
        subprocess.run([sys.executable, "-m", "hpa_scc", "evaluate", "--solution", str(solution), "--submission",
                        str(sub), "--out", str(tmp_path / "m.json")], capture_output=True, text=True,
                       check=True) and (tmp_path / "m.json").read_text())["mAP"], 1.0)
