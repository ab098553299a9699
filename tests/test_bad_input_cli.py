"""The command line on bad input (issue 27 rows 10-13): a full disk stops the step with one line,
every image failing is exit 1, a failed command leaves nothing that refuses its fix, and
out-of-range numbers are refused by the parser."""

from __future__ import annotations

import errno
import os
import shutil

import numpy as np
import pytest

import hpa_scc.utils.fileio as fileio
from conftest import REPO
from hpa_scc.cli import main
from hpa_scc.data.cache import build_cache
from hpa_scc.utils.fileio import DiskFullError, atomic_path, write_npy_atomic


@pytest.fixture(scope="module")
def syn(shared_data):
    return shared_data.synth(images=3, size=64, seed=9)


def test_a_full_disk_is_one_line_naming_the_folder_not_a_skipped_image(tmp_path):
    """Row 10: ENOSPC stops the step."""
    with pytest.raises(DiskFullError, match=f"no space left on the device of {tmp_path} while writing a.txt"):
        with atomic_path(tmp_path / "a.txt") as tmp:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert not list(tmp_path.iterdir())  # the partial file is gone


@pytest.fixture
def full_disk(monkeypatch):
    """A file system with 3 blocks free on which numpy's writes come up short, as on a full disk:
    numpy's words then carry no errno, so the free space decides."""
    class Full:
        f_bavail, f_frsize = 3, 4096

    def short_save(path, array):
        raise OSError("1048576 requested and 921472 written")

    monkeypatch.setattr(fileio.os, "statvfs", lambda _: Full())
    monkeypatch.setattr(fileio.np, "save", short_save)


def test_a_short_write_with_no_space_left_is_a_full_disk(tmp_path, full_disk):
    with pytest.raises(DiskFullError, match="no space left"):
        write_npy_atomic(tmp_path / "x.npy", np.zeros(3))


def test_cache_stops_on_a_full_disk_and_keeps_what_was_done(syn, tmp_path, full_disk):
    """Row 10 through a step: the first image that cannot be written ends the run (exit 1, one
    line), instead of '3 of 3 skipped' and exit 0."""
    with pytest.raises(DiskFullError):
        build_cache(syn, tmp_path / "c", size=32, workers=1, progress=False)
    assert main(["cache", str(syn), str(tmp_path / "c"), "--size", "32", "--workers", "1", "-q"]) == 1


def test_every_image_failing_is_exit_1(syn, tmp_path, capsys):
    """Row 11: cache and segment of a folder whose every image is corrupt exit 1, naming one."""
    bad = tmp_path / "bad"
    shutil.copytree(syn, bad)
    for png in (bad / "train").glob("*_green.png"):
        png.write_bytes(b"not a png")
    assert main(["cache", str(bad), str(tmp_path / "c"), "--size", "32", "--workers", "1", "-q"]) == 1
    err = capsys.readouterr().err
    assert "every image failed (3)" in err and "_green.png" in err
    assert main(["segment", str(bad), str(tmp_path / "s"), "--workers", "1", "-q"]) == 1
    assert "every image failed (3)" in capsys.readouterr().err
    # one good image is enough for exit 0 (the failures are listed, a rerun retries them)
    shutil.copy(syn / "train" / f"{sorted(os.listdir(syn / 'train'))[0].split('_')[0]}_green.png",
                bad / "train")
    assert main(["cache", str(bad), str(tmp_path / "c"), "--size", "32", "--workers", "1", "-q"]) == 0


def test_a_failed_command_leaves_nothing_that_refuses_its_fix(syn, tmp_path, capsys):
    """Row 12: a wrong data folder, then the right one with other settings, into one OUT."""
    out = tmp_path / "cbx"
    assert main(["cache", str(tmp_path / "nodir"), str(out), "--size", "48", "-q"]) == 1
    assert "nodir" in capsys.readouterr().err and not (out / "cache.json").exists()
    assert main(["cache", str(syn), str(out), "--size", "32", "--workers", "1", "-q"]) == 0

    seg = tmp_path / "seg"
    assert main(["segment", str(tmp_path / "nodir"), str(seg), "-q"]) == 1
    assert not (seg / "segment.json").exists()

    # predict with a segmenter that cannot start: refused before the settings record
    pred = tmp_path / "pred"
    assert main(["predict", "-", str(syn), "--out", str(pred), "--baseline", "image-labels", "--segmenter",
                 "hpacellseg", "--workers", "1", "-q"]) == 1
    capsys.readouterr()
    assert not (pred / "predict.json").exists()
    assert main(["predict", "-", str(syn), "--out", str(pred), "--baseline", "image-labels", "--workers", "1",
                 "-q"]) == 0


def test_more_folds_than_images_is_refused_before_any_work(syn, tmp_path, capsys):
    """Row 12: --folds 20 on 3 images fails at once, before segmenting anything."""
    out = tmp_path / "p20"
    assert main(["prepare", str(syn), str(out), "--size", "32", "--folds", "20", "-q"]) == 1
    assert "--folds 20 needs at least 20 images" in capsys.readouterr().err
    assert not (out / "segmentation").exists() and not (out / "prepare.json").exists()


@pytest.mark.parametrize("command", [
    ["predict", "-", "DATA", "--out", "OUT", "--baseline", "random", "--image-fusion", "nan"],
    ["predict", "-", "DATA", "--out", "OUT", "--baseline", "random", "--image-fusion", "1.5"],
    ["refine", "RUN", "PREP", "--name", "r", "--held-out-folds", "0", "--threshold", "nan"],
    ["refine", "RUN", "PREP", "--name", "r", "--held-out-folds", "0", "--min-f1", "-1"],
])
def test_out_of_range_numbers_are_refused_by_the_parser(command, capsys):
    """Row 13: nan or out-of-range thresholds and weights are a usage error naming the value."""
    with pytest.raises(SystemExit) as stop:
        main(command)
    assert stop.value.code == 2
    assert f"{command[-1]} is not a number in [0, 1]" in capsys.readouterr().err


def test_a_step_into_another_steps_folder_is_refused(syn, tmp_path, capsys):
    """Probe 2: cache (or predict) into a prepared set wrote its records/<xx>/<ID>.json over
    prepare's; now refused, and the prepared records are untouched."""
    prepared = tmp_path / "prep"
    assert main(["prepare", str(syn), str(prepared), "--size", "32", "--folds", "2", "--workers", "1", "-q"]) == 0
    records = {p: p.read_bytes() for p in (prepared / "records").rglob("*.json")}
    capsys.readouterr()
    assert main(["cache", str(syn), str(prepared), "--size", "32", "-q"]) == 1
    assert "holds the output of another step (prepare.json)" in capsys.readouterr().err
    assert main(["predict", "-", str(syn), "--out", str(prepared), "--baseline", "image-labels", "-q"]) == 1
    assert "holds the output of another step (prepare.json)" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (prepared / "records").rglob("*.json")} == records
    # and a prepared set is not a run
    assert main(["predict", str(prepared), str(syn), "--out", str(tmp_path / "p"), "-q"]) == 1
    assert "is not a training run: it has no config.yaml (it is a prepared set" in capsys.readouterr().err


def test_probe_messages_name_the_file_and_the_fix(syn, tmp_path, capsys):
    """Probe 2: a missing --labels table, a binary or empty CSV given to evaluate."""
    assert main(["prepare", str(syn), str(tmp_path / "p"), "--labels", str(tmp_path / "nosuch.csv"), "-q"]) == 1
    assert "label table" in (err := capsys.readouterr().err) and "nosuch.csv (--labels) not found" in err
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"ID,\xd0\xff\x00garbage")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert main(["evaluate", "--solution", str(binary), "--submission", str(syn / "solution.csv")]) == 1
    assert "bin.csv is not a text CSV" in capsys.readouterr().err
    assert main(["evaluate", "--solution", str(syn / "solution.csv"), "--submission", str(empty)]) == 1
    assert "empty.csv is empty; expected the header ID,ImageWidth" in capsys.readouterr().err


def test_split_and_synth_never_replace_a_label_table(syn, tmp_path, capsys):
    """Probe 2: 'split T --out T' turned the label table into a folds table; synth into a Kaggle
    folder replaced its train.csv."""
    table = tmp_path / "train.csv"
    shutil.copyfile(syn / "train.csv", table)
    before = table.read_bytes()
    assert main(["split", str(table), "--folds", "2", "--out", str(table)]) == 1
    assert "--out" in (err := capsys.readouterr().err) and "is also LABELS_CSV" in err
    assert table.read_bytes() == before
    kaggle = tmp_path / "kaggle"
    kaggle.mkdir()
    (kaggle / "train.csv").write_text("ID,Label\nabc,0\n")
    assert main(["synth", str(kaggle), "--images", "1", "--size", "64", "-q"]) == 1
    assert "holds a label table (train.csv) that synth did not write" in capsys.readouterr().err
    assert (kaggle / "train.csv").read_text() == "ID,Label\nabc,0\n"


def test_sizes_and_areas_out_of_range_are_refused_before_any_work(syn, tmp_path, capsys):
    """Probe 2: cache --size 100000 was killed for memory; --min-cell-area -5 was accepted."""
    assert main(["cache", str(syn), str(tmp_path / "c"), "--size", "100000", "-q"]) == 1
    assert "--size 100000 is out of range; use 16 to 4096 px" in capsys.readouterr().err
    assert main(["prepare", str(syn), str(tmp_path / "p"), "--size", "32", "--min-cell-area", "-5", "-q"]) == 1
    assert "--min-cell-area -5" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not (tmp_path / "p").exists()


def test_visualize_into_the_images_and_a_public_id_with_dots_are_refused(syn, tmp_path, capsys):
    """Probe 2: visualize --out DATA/train wrote PNGs among the channel files; a download table's
    Image path with '..' gave an ID with '..'."""
    from hpa_scc.data.public_table import image_id_from_url

    assert main(["predict", "-", str(syn), "--out", str(tmp_path / "p"), "--baseline", "truth", "-q"]) == 0
    n_files = len(list((syn / "train").iterdir()))
    assert main(["visualize", str(tmp_path / "p"), str(syn), "--out", str(syn / "train"), "-q"]) == 1
    assert "inside the inputs" in capsys.readouterr().err
    assert len(list((syn / "train").iterdir())) == n_files
    assert image_id_from_url("https://images.proteinatlas.org/10580/1758_B1_1") == "10580_1758_B1_1"
    with pytest.raises(ValueError, match="path separator, '..'"):
        image_id_from_url("/../../1_A1_1_")


def test_a_data_folder_is_not_a_run_folder(syn, tmp_path, capsys):
    """Probe 2: train.run_dir=<a prepared set> trained into it; refused before anything is written."""
    prepared = tmp_path / "prep"
    assert main(["prepare", str(syn), str(prepared), "--size", "32", "--folds", "2", "--workers", "1", "-q"]) == 0
    before = sorted(p.name for p in prepared.iterdir())
    for run_dir in (prepared, syn):
        assert main(["train", str(REPO / "configs" / "cell_features.yaml"), f"data.prepared_dir={prepared}",
                     f"train.run_dir={run_dir}"]) == 1
        assert "is a data folder" in capsys.readouterr().err
    assert sorted(p.name for p in prepared.iterdir()) == before
