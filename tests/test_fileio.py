"""Atomic writes keep the umask's file mode (results on a shared cluster stay readable by the
lab), and what a killed writer leaves is swept when its step resumes."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from hpa_scc.apps.prepare import segment_folder
from hpa_scc.data.synth import write_synth_set
from hpa_scc.utils.fileio import (STALE_TEMP_S, check_settings, sweep_stale_temps, write_npy_atomic,
                                  write_png_atomic, write_text_atomic)


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    write_text_atomic(tmp_path / "a.txt", "x")
    write_npy_atomic(tmp_path / "a.npy", np.zeros(3))
    write_png_atomic(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    check_settings(tmp_path, {"size": 1}, "cache.json")
    assert {p.name: mode(p) for p in tmp_path.iterdir()} == {n: expected for n in
                                                             ("a.txt", "a.npy", "a.png", "cache.json")}


def test_a_whole_step_writes_readable_files(tmp_path, umask):
    umask(0o022)
    write_synth_set(tmp_path / "s", 1, size=64, seed=0, progress=False)
    modes = {mode(p) for p in (tmp_path / "s").rglob("*") if p.is_file()}
    assert modes == {0o644}, modes


def killed_writer(target) -> list:
    """Run an atomic write in a child that is SIGKILLed inside it (no cleanup runs); returns the
    temporary files it left beside ``target``."""
    code = ("import os, signal, sys\nfrom hpa_scc.utils.fileio import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n    tmp.write_bytes(b'half' * 1000)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(target)])
    assert proc.returncode == -signal.SIGKILL
    return [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.")]


def age(path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_a_resumed_step_sweeps_what_killed_writers_left(tmp_path):
    write_synth_set(tmp_path / "s", 2, size=64, seed=0, progress=False)
    out = tmp_path / "seg"
    assert segment_folder(tmp_path / "s", out, progress=False).written == 2
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    stale = killed_writer(out / "synth_0000_cells.png")  # killed an hour and more ago
    assert len(stale) == 1 and stale[0].name.endswith(".tmp.png") and stale[0].stat().st_size == 4000
    age(stale[0], STALE_TEMP_S + 60)
    (out / "sub").mkdir()
    deep = killed_writer(out / "sub" / "x.npy")[0]  # below the folder too
    age(deep, 2 * STALE_TEMP_S)
    live = killed_writer(out / "synth_0001_cells.png")[0]  # as if a sibling task were writing it now
    age(live, 60)
    mine = [out / "notes.tmp", out / ".notes.tmp", out / ".a.b.tmp"]  # the user's: not our names
    for path in mine:
        path.write_text("keep")
        age(path, 10 * STALE_TEMP_S)

    # another segmenter into this folder is refused, and the refusal touches nothing
    with pytest.raises(ValueError, match="use another OUT_DIR"):
        segment_folder(tmp_path / "s", out, segmenter="precomputed", segmenter_options={"folder": out}, progress=False)
    assert stale[0].exists() and deep.exists()

    report = segment_folder(tmp_path / "s", out, progress=False)  # the same command again
    assert (report.written, report.skipped_existing) == (0, 2)
    assert not stale[0].exists() and not deep.exists()
    assert live.exists() and all(p.read_text() == "keep" for p in mine)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in before} == before


def test_sweep_names_only_what_it_removed(tmp_path):
    old = tmp_path / ".last.pt.abcd_123.tmp.pt"
    old.write_bytes(b"x")
    age(old, 2 * STALE_TEMP_S)
    young = tmp_path / ".last.pt.zzzz9999.tmp.pt"
    young.write_bytes(b"x")
    assert sweep_stale_temps(tmp_path) == [old]
    assert sweep_stale_temps(tmp_path, older_than_s=0) == [young]
    assert sweep_stale_temps(tmp_path) == [] and list(tmp_path.iterdir()) == []


def test_other_settings_name_what_changed_and_a_folder_without_results_takes_them(tmp_path):
    check_settings(tmp_path, {"size": 512, "models": [{"checkpoint": "best.pt", "mtime_ns": 1}]}, "predict.json")
    (tmp_path / "failures.csv").write_text("ID,error\na,bad model file\n")  # a run that made nothing
    (tmp_path / "predict.log").write_text("...")
    (tmp_path / "records").mkdir()
    check_settings(tmp_path, {"size": 256, "models": [{"checkpoint": "best.pt", "mtime_ns": 1}]}, "predict.json")
    assert json.loads((tmp_path / "predict.json").read_text())["size"] == 256  # taken: nothing to mix with
    (tmp_path / "records" / "a.json").write_text("{}")  # now a result
    with pytest.raises(ValueError) as refused:
        check_settings(tmp_path, {"size": 256, "models": [{"checkpoint": "best.pt", "mtime_ns": 2}]}, "predict.json")
    assert str(refused.value) == (f"{tmp_path} was made with other settings (models[0].mtime_ns: 1 -> 2; all in "
                                  f"{tmp_path / 'predict.json'}); use another OUT_DIR to run with these (or delete this one)")
    assert json.loads((tmp_path / "predict.json").read_text())["models"][0]["mtime_ns"] == 1


def test_a_segment_run_that_made_nothing_does_not_lock_its_folder(tmp_path):
    """Every image failed (here: a mask folder without the masks): the same folder takes another segmenter."""
    write_synth_set(tmp_path / "s", 2, size=64, seed=0, progress=False)
    (tmp_path / "no-masks").mkdir()
    out = tmp_path / "seg"
    failed = segment_folder(tmp_path / "s", out, segmenter="precomputed", segmenter_options={"folder": tmp_path / "no-masks"},
                            progress=False)
    assert (failed.written, len(failed.failures)) == (0, 2) and (out / "failures.csv").is_file()
    assert segment_folder(tmp_path / "s", out, progress=False).written == 2  # builtin now
    assert json.loads((out / "segment.json").read_text())["segmenter"] == "builtin"
    with pytest.raises(ValueError, match=r"segmenter: 'builtin' -> 'precomputed'"):  # now it holds results
        segment_folder(tmp_path / "s", out, segmenter="precomputed", segmenter_options={"folder": tmp_path / "no-masks"},
                       progress=False)
