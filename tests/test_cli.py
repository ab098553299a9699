"""The CLI through its real entry points (``python -m hpa_scc`` and ``hpa-scc``)."""

import csv
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from hpa_scc.apps.demo import FEATURES, MASKRCNN, MODEL_FOLDERS
from hpa_scc.config import load_config
from hpa_scc.cli import main
from hpa_scc.data.prepared import PreparedSet


def run(*args, check_rc=0):
    proc = subprocess.run([sys.executable, "-m", "hpa_scc", *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == check_rc, proc.stdout + proc.stderr
    return proc


def test_help_lists_the_commands():
    out = run("--help").stdout
    for command in ("demo", "synth", "cache", "split", "train", "refine", "predict", "evaluate"):
        assert f"    {command} " in out
    assert "\n    download-public\n" in out
    assert "train.csv" in out  # says how to point it at Kaggle data
    script = Path(sys.executable).parent / "hpa-scc"
    assert script.is_file(), "console script hpa-scc not installed (pip install -e .)"
    assert "--size" in subprocess.run([script, "cache", "--help"], capture_output=True, text=True).stdout


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "commands" in capsys.readouterr().out


def test_missing_data_folder_is_one_clear_line(tmp_path):
    proc = run("cache", tmp_path / "nope", tmp_path / "out", check_rc=1)
    assert proc.stderr.strip() == f"error: data folder {tmp_path / 'nope'} does not exist"


def test_split_command(tmp_path, capsys):
    table = tmp_path / "labels.csv"
    table.write_text("ID,Label\n" + "".join(f"i{i},{i % 18}|{(i * 7) % 18}\n" for i in range(60)))
    assert main(["split", str(table), "--folds", "3", "--seed", "0", "--out", str(tmp_path / "f.csv")]) == 0
    out = capsys.readouterr().out
    assert "60 images in 3 folds" in out and "Mitotic spindle" in out
    with open(tmp_path / "f.csv") as fh:
        folds = [int(r["fold"]) for r in csv.DictReader(fh)]
    assert sorted(set(folds)) == [0, 1, 2] and np.bincount(folds).min() >= 17


def test_cache_strict_exit_code(kaggle_dir, tmp_path):
    (kaggle_dir / "train" / "img0_red.png").write_bytes(b"broken")
    proc = run("cache", kaggle_dir, tmp_path / "c", "--size", "32", "--workers", "1", "-q", "--strict", check_rc=1)
    assert "2 images written" in proc.stdout and "img0_red.png" in proc.stdout


def test_demo_checks_its_training_config_before_any_work(tmp_path):
    out = tmp_path / "demo"
    proc = run("demo", "--out", out, "-q", "optim.lr=fast", check_rc=1)
    assert "optim.lr" in proc.stderr and not out.exists()  # nothing synthesised, prepared or segmented


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    tiny = ["train.max_epochs=1", "train.max_iters_per_epoch=1", "data.max_val_images=1", "data.workers=0"]
    proc = run("demo", "--out", out, "--images", "6", "--size", "256", "--train-size", "64", "-q", *tiny)
    assert "[4/6] densenet121 Mask R-CNN" in proc.stdout and f"done: {out}" in proc.stdout
    # the console holds the steps' summaries; the commands' INFO lines went to demo.log
    assert " INFO " not in proc.stderr and not proc.stderr.startswith("INFO"), proc.stderr[-2000:]
    log = (out / "demo.log").read_text()
    assert "INFO hpa_scc.apps.predict: 2 images predicted, 0 skipped" in log and "INFO hpa_scc.apps.refine:" in log
    assert "mil_r1: threshold 0.00, relative 0.25" in proc.stdout
    features_line = next(line for line in proc.stdout.splitlines() if line.startswith("per-cell features, MIL teacher+student"))
    assert 0.0 < float(features_line.split()[-1]) <= 1.0
    assert (out / "predict" / "mil-teacher-student" / "submission.csv").is_file()
    # the MIL teacher (every fold's image labels) and the boosted student on the labels the MIL
    # model of folds 1-2 refined, averaged per cell
    boosted = load_config(out / "boosted-refined" / "config.yaml")
    assert boosted.model.feature_classifier == "boosting" and boosted.data.labels == "mil_r1"
    teacher = load_config(out / "features-mil-all" / "config.yaml")
    assert teacher.model.mil == "lse" and teacher.data.labels == "image" and teacher.data.val_fold == -1
    assert load_config(out / "features-mil" / "config.yaml").data.val_fold == 0  # the model that refined mil_r1
    settings = (out / "predict" / "mil-teacher-student" / "predict.json").read_text()
    assert str((out / "boosted-refined").resolve()) in settings and str((out / "features-mil-all").resolve()) in settings
    truth_line = next(line for line in proc.stdout.splitlines() if line.startswith("baseline: the truth"))
    assert float(truth_line.split()[-1]) == 1.0  # the truth scores exactly 1
    assert (out / "predict" / "model" / "submission.csv").is_file()
    assert (out / "predict" / "image-labels" / "metrics.json").is_file()
    # overlays: the best trained model by the mAP printed above, and Mask R-CNN, each in its own folder
    maps = {line[:40].strip(): float(line.split()[-1]) for line in proc.stdout.splitlines()
            if line.startswith((MASKRCNN, FEATURES))}
    best = max(maps, key=maps.get)
    overlay_line = next(line for line in proc.stdout.splitlines() if line.startswith("overlays, "))
    assert f"best model, {best} (mAP {maps[best]:.4f}): 2 in " in overlay_line and MASKRCNN in overlay_line
    for name in {best, MASKRCNN}:
        folder = out / "figures" / MODEL_FOLDERS[name][1]
        assert str(folder) in overlay_line and len(list(folder.glob("*_overlay.png"))) == 2
    assert not list((out / "figures").glob("*_overlay.png"))  # no overlays of unnamed models
    assert {"per_class_ap.png", "training_curves.png"} <= {p.name for p in (out / "figures").iterdir()}
    assert "COCO mask AP per epoch" in proc.stdout
    assert {"last.pt", "best.pt", "metrics.jsonl", "config.yaml"} <= {p.name for p in (out / "train").iterdir()}
    ap = float(proc.stdout.split("mask AP at IoU 0.6: ")[1].split()[0])
    assert 0.5 < ap <= 1.0
    found, true = map(int, re.search(r"cells found (\d+), true cells (\d+)", proc.stdout).groups())
    assert true == sum(int(cv2.imread(str(p), cv2.IMREAD_UNCHANGED).max()) for p in (out / "synthetic" / "masks").glob("*.png"))
    assert 0.7 * true <= found <= 1.3 * true
    with open(out / "synthetic" / "train.csv") as fh:
        ids = [r["ID"] for r in csv.DictReader(fh)]
    assert len(ids) == 6
    prepared = out / "prepared"
    assert sorted(p.stem for p in (prepared / "cache" / "images").glob("*/*.npy")) == sorted(ids)
    assert np.load(PreparedSet(prepared).image_path(ids[0])).shape == (4, 64, 64)
    for layout in ("multilabel", "per_label"):  # both by default: any head trains on the set
        assert sorted(p.name for p in (prepared / "coco" / layout).iterdir()) == sorted(
            f"fold{k}.{ext}" for k in range(3) for ext in ("json", "store"))
    assert yaml.safe_load((out / "train" / "config.yaml").read_text())["data"]["layout"] == "multilabel"
    with open(prepared / "folds.csv") as fh:
        assert {r["fold"] for r in csv.DictReader(fh)} == {"0", "1", "2"}
    again = run("demo", "--out", out, "--images", "6", "--size", "256", "--train-size", "64", "-q", "--no-train")
    assert "0 images done now, 6 already done" in again.stdout  # resumed, nothing redone


@pytest.mark.parametrize("args,message", [
    (["synth", "{t}/big", "--size", "100000", "--images", "1"], "--size 100000: synthetic images are 64 to 4096 px"),
    (["synth", "{t}/zero", "--images", "0"], "--images 0: a synthetic set needs at least 1 image"),
    (["prepare", "{t}/set", "{t}/p0", "--folds", "0"], "--folds 0: use 1"),
    (["predict", "-", "{t}/set", "--out", "{t}/pred", "--baseline", "truth", "--batch-size", "0"],
     "--batch-size 0 / --workers"),
    (["visualize", "{t}/pred", "{t}/set", "--out", "{t}/v", "--images", "-1"], "--images -1"),
])
def test_out_of_range_numbers_are_refused_before_any_work(tmp_path, args, message):
    from hpa_scc.data.synth import write_synth_set

    write_synth_set(tmp_path / "set", 1, size=64, progress=False)
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run(*[a.format(t=tmp_path) for a in args], check_rc=1)
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


@pytest.mark.parametrize("args,name", [(["synth", "{f}", "--images", "1"], "OUT_DIR"),
                                        (["predict", "-", "{t}", "--out", "{f}", "--baseline", "truth"], "--out"),
                                        (["demo", "--out", "{f}", "--no-train"], "--out")])
def test_an_output_folder_that_is_a_file_names_the_argument(tmp_path, args, name):
    existing = tmp_path / "outfile"
    existing.write_text("keep me")
    proc = run(*[a.format(f=existing, t=tmp_path) for a in args], check_rc=1)
    assert f"{name} {existing} is a file" in proc.stderr and "Errno" not in proc.stderr
    assert existing.read_text() == "keep me"
