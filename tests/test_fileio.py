"""Atomic writes keep the umask's file mode: results on a shared cluster stay readable by the lab."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from hpa_scc.data.cache import check_settings
from hpa_scc.data.synth import write_synth_set
from hpa_scc.utils.fileio import write_npy_atomic, write_png_atomic, write_text_atomic


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
    check_settings(tmp_path, {"size": 1}, "settings.json")
    assert {p.name: mode(p) for p in tmp_path.iterdir()} == {n: expected for n in
                                                             ("a.txt", "a.npy", "a.png", "settings.json")}


def test_a_whole_step_writes_readable_files(tmp_path, umask):
    umask(0o022)
    write_synth_set(tmp_path / "s", 1, size=64, seed=0, progress=False)
    modes = {mode(p) for p in (tmp_path / "s").rglob("*") if p.is_file()}
    assert modes == {0o644}, modes
