import csv
import json

import numpy as np
import pytest
import torch

from hpa_scc.data.cache import build_cache, cache_path, read_cache_index
from hpa_scc.data.images import read_image
from hpa_scc.data.loader import CachedImages, PngImages, collate
from hpa_scc.data.images import find_images


def test_cache_holds_each_image_resized_once(kaggle_dir, tmp_path):
    out = tmp_path / "cache"
    report = build_cache(kaggle_dir, out, size=64, progress=False)
    assert (report.written, report.skipped_existing, report.failures) == (3, 0, [])
    for image_id in ("img0", "img1", "img2"):
        cached = np.load(cache_path(out, image_id), mmap_mode="r")
        assert isinstance(cached, np.memmap) and cached.shape == (4, 64, 64) and cached.dtype == np.uint8
        np.testing.assert_array_equal(cached, read_image(kaggle_dir / "train", image_id, size=64))
    entries = read_cache_index(out)
    assert [(e.image_id, e.labels, e.height, e.width) for e in entries] == [
        ("img0", (0, 5), 96, 96), ("img1", (18,), 128, 128), ("img2", (11, 16), 80, 80)]
    assert json.loads((out / "cache.json").read_text())["size"] == 64


def test_cache_resumes_and_skips_finished_images(kaggle_dir, tmp_path):
    out = tmp_path / "cache"
    build_cache(kaggle_dir, out, size=32, progress=False)
    done = cache_path(out, "img0")
    stamp = done.stat().st_mtime_ns
    cache_path(out, "img1").unlink()  # as if the run had been killed before img1
    cache_path(out, "img2").write_bytes(b"\x93NUMPY half-written")  # a torn file is redone
    report = build_cache(kaggle_dir, out, size=32, progress=False)
    assert (report.written, report.skipped_existing) == (2, 1)
    assert done.stat().st_mtime_ns == stamp
    assert np.load(cache_path(out, "img2")).shape == (4, 32, 32)
    assert not list(out.glob("images/.*tmp*"))  # no temporary files left behind


def test_corrupt_input_is_skipped_and_reported(kaggle_dir, tmp_path):
    (kaggle_dir / "train" / "img1_blue.png").write_bytes(b"not a png")
    (kaggle_dir / "train" / "img2_red.png").unlink()
    out = tmp_path / "cache"
    report = build_cache(kaggle_dir, out, size=32, workers=2, progress=False)
    assert report.written == 1 and [i for i, _ in report.failures] == ["img1", "img2"]
    with open(out / "failures.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["ID"] == "img1" and "img1_blue.png" in rows[0]["error"]
    assert rows[1]["ID"] == "img2" and "img2_red.png" in rows[1]["error"]
    assert [e.image_id for e in read_cache_index(out)] == ["img0"]
    assert "failures.csv" in report.summary()


def test_other_settings_into_the_same_folder_fail(kaggle_dir, tmp_path):
    build_cache(kaggle_dir, tmp_path / "c", size=32, progress=False)
    with pytest.raises(ValueError, match=r"size: 32 -> "):
        build_cache(kaggle_dir, tmp_path / "c", size=48, progress=False)


def test_cached_and_png_loaders_agree(kaggle_dir, tmp_path):
    build_cache(kaggle_dir, tmp_path / "c", size=48, progress=False)
    cached = CachedImages(tmp_path / "c")
    png = PngImages(find_images(kaggle_dir), size=48)
    assert len(cached) == len(png) == 3
    for i in range(3):
        (a, ta), (b, tb) = cached[i], png[i]
        assert a.dtype == torch.uint8 and a.shape == (4, 48, 48)
        assert torch.equal(a, b) and ta["image_id"] == tb["image_id"]
        assert torch.equal(ta["labels"], tb["labels"])
    assert cached[1][1]["labels"].nonzero().flatten().tolist() == [18]
    images, targets = collate([cached[0], cached[2]])
    assert images.shape == (2, 4, 48, 48) and [t["image_id"] for t in targets] == ["img0", "img2"]
    with pytest.raises(KeyError, match="not in cache"):
        CachedImages(tmp_path / "c", image_ids=["img0", "nope"])


def test_rgb_cache(kaggle_dir, tmp_path):
    build_cache(kaggle_dir, tmp_path / "c", size=16, channels="rgb", progress=False)
    assert np.load(cache_path(tmp_path / "c", "img0")).shape == (3, 16, 16)


def test_an_empty_cache_file_is_redone_not_a_traceback(kaggle_dir, tmp_path):
    out = tmp_path / "cache"
    build_cache(kaggle_dir, out, size=32, progress=False)
    cache_path(out, "img1").write_bytes(b"")  # zero bytes: np.load raised EOFError
    report = build_cache(kaggle_dir, out, size=32, progress=False)
    assert (report.written, report.skipped_existing) == (1, 2)
    assert np.load(cache_path(out, "img1")).shape == (4, 32, 32)


def test_a_cache_killed_with_sigkill_resumes(tmp_path):
    """SIGKILL (a time limit, the OOM killer) runs no finally: what finished must still count."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import write_channels

    rng = np.random.default_rng(1)
    data = tmp_path / "data"
    rows = ["ID,Label"]
    for i in range(24):  # incompressible 1024 px planes: slow enough to kill in the middle
        write_channels(data / "train", f"big{i:02d}", rng.integers(0, 256, (4, 1024, 1024), dtype=np.uint8))
        rows.append(f"big{i:02d},{i % 18}")
    (data / "train.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-m", "hpa_scc", "cache", str(data), str(out), "--size", "64",
                             "--workers", "1", "-q"], env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    def finished() -> list[str]:  # a kill can leave a record's temporary file (.<ID>.json.<random>.tmp.json)
        return [p.stem for p in (out / "records").glob("*/*.json") if not p.name.startswith(".")]

    while time.time() < deadline and len(finished()) < 2:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "index.csv").exists()  # the run's end never came
    done = finished()
    assert 2 <= len(done) < 24
    report = build_cache(data, out, size=64, progress=False)
    assert report.skipped_existing >= len(done) and report.written == 24 - report.skipped_existing
    assert [e.image_id for e in read_cache_index(out)] == [f"big{i:02d}" for i in range(24)]


def test_a_flat_format_1_cache_is_read_and_resumed_flat(kaggle_dir, tmp_path):
    """A cache made before the hashed sub-folders (format 1: images/<ID>.npy, records/<ID>.json)
    is read by CachedImages and resumed by build_cache as it is, never half-moved."""
    out = tmp_path / "cache"
    build_cache(kaggle_dir, out, size=32, progress=False)
    fresh = [np.array(x) for x, _ in CachedImages(out)]
    for kind in ("images", "records"):
        for path in list((out / kind).glob("*/*")):
            path.rename(out / kind / path.name)
    (out / "cache.json").write_text(json.dumps({**json.loads((out / "cache.json").read_text()), "format": 1}))
    flat = CachedImages(out)
    assert not flat.fanout and all(np.array_equal(a, np.array(b)) for a, (b, _) in zip(fresh, flat, strict=True))
    (out / "images" / "img1.npy").unlink()  # an unfinished image
    report = build_cache(kaggle_dir, out, size=32, progress=False)
    assert (report.written, report.skipped_existing) == (1, 2)
    assert (out / "images" / "img1.npy").is_file() and not list((out / "images").glob("*/*.npy"))
