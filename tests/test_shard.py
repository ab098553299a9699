"""Data preparation split over the tasks of a job array: shards, then a merge that must give
exactly what one unsharded run gives (the precomputed back-end with the synthetic truth, which
is deterministic)."""

import csv
import filecmp
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import true_masks_folder
from hpa_scc.data.cache import build_cache, merge_cache
from hpa_scc.utils.fileio import check_settings
from hpa_scc.apps.prepare import merge_failures, merge_prepared, prepare_dataset, segment_folder
from hpa_scc.data.shard import default_shard, parse_shard, select_shard, shard_of
from hpa_scc.data.prepared import PreparedSet

OPTS = {"size": 64, "segmenter": "precomputed", "n_folds": 2, "progress": False}  # both layouts, the default
MERGED_FILES = ["folds.csv", "failures.csv", "cache/index.csv"] + [
    f"{folder}/{layout}/fold{k}.json" for folder in ("coco", "coco_truth") for layout in ("per_label", "multilabel")
    for k in (0, 1)]


@pytest.fixture
def damaged(synth, tmp_path) -> tuple[Path, Path, list[str]]:
    """A copy of the set with a corrupt image in shard 0 of 2 and an image without cells in shard 1."""
    data = tmp_path / "set"
    shutil.copytree(synth, data)
    masks = true_masks_folder(data, tmp_path / "truth")
    ids = sorted(p.stem for p in (data / "masks").glob("*.png"))
    corrupt = next(i for i in ids if shard_of(i, 2) == 0)
    empty = next(i for i in ids if shard_of(i, 2) == 1)
    path = data / "train" / f"{corrupt}_green.png"
    path.write_bytes(path.read_bytes()[:200])
    cv2.imwrite(str(masks / f"{empty}_cells.png"), np.zeros((128, 128), np.uint16))
    return data, masks, [corrupt, empty]


def assert_same_files(a: Path, b: Path, names=MERGED_FILES) -> None:
    for name in names:
        assert (a / name).is_file() and (b / name).is_file(), name
        assert filecmp.cmp(a / name, b / name, shallow=False), f"{name} differs"


# --- the shard of an image ------------------------------------------------------------------------
def test_parse_shard():
    assert parse_shard("0/4") == (0, 4) and parse_shard(" 3 / 4 ") == (3, 4) and parse_shard("0/1") == (0, 1)
    assert parse_shard(None) is None and parse_shard("") is None
    for text in ("4/4", "5/4", "1/0", "-1/4"):
        with pytest.raises(ValueError, match="I/N"):
            parse_shard(text)
    for text in ("a/b", "3", "1/2/3"):
        with pytest.raises(ValueError, match=r"expected I/N .* e\.g\. 0/4"):
            parse_shard(text)


def test_default_shard_from_the_slurm_array(monkeypatch):
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP"):
        monkeypatch.delenv(name, raising=False)
    assert default_shard() is None
    with pytest.raises(ValueError, match="SLURM_ARRAY_TASK_ID"):
        parse_shard("slurm")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert default_shard() is None  # a lone id is no array
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert default_shard() == (3, 4) == parse_shard("slurm")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")  # sbatch --array=1-4
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert default_shard() == (0, 4)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    assert default_shard() == (3, 4)
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "10")  # sbatch --array=10-16:2
    monkeypatch.setenv("SLURM_ARRAY_TASK_STEP", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "14")
    assert default_shard() == (2, 4)
    env = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "6"}
    assert default_shard(env) == (1, 2)
    with pytest.raises(ValueError, match="--shard I/N"):  # sbatch --array=0,5,9: not evenly spaced
        default_shard({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "3"})


def test_every_id_in_exactly_one_shard_whatever_the_order_or_the_set():
    ids = [f"{i:08x}-bb99-11e8-b2b9-ac1f6b6435d0" for i in range(0, 5000, 7)]
    shards = [select_shard(ids, (i, 5)) for i in range(5)]
    assert sorted(sum(shards, [])) == sorted(ids)
    assert all(s == [i for i in ids if i in set(s)] for s in shards)  # the given order is kept
    assert all(len(s) > len(ids) / 5 * 0.7 for s in shards)  # roughly balanced
    again = [set(select_shard(list(reversed(ids[:300])), (i, 5))) for i in range(5)]
    assert all(a == set(s) & set(ids[:300]) for a, s in zip(again, shards, strict=True))
    assert select_shard(ids, None) == ids and select_shard(ids, (0, 1)) == ids
    with pytest.raises(ValueError, match="out of range"):
        select_shard(ids, (5, 5))


def test_settings_file_created_by_concurrent_shards(tmp_path):
    check_settings(tmp_path / "a", {"size": 64}, "cache.json")
    check_settings(tmp_path / "a", {"size": 64}, "cache.json")  # the same settings again: fine
    with pytest.raises(ValueError, match=r"size: 64 -> 32"):
        check_settings(tmp_path / "a", {"size": 32}, "cache.json")
    # Many writers at once: the same settings all pass; of different ones exactly one wins.
    for trial in range(5):
        outcomes = []
        folder = tmp_path / f"race{trial}"

        def write(value):
            try:
                check_settings(folder, {"size": value}, "cache.json")
                outcomes.append(value)
            except ValueError:
                pass

        threads = [threading.Thread(target=write, args=(v,)) for v in (64, 64, 32, 48, 64, 16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winner = json.loads((folder / "cache.json").read_text())["size"]
        assert outcomes and set(outcomes) == {winner}
        assert not [p for p in folder.iterdir() if p.name != "cache.json"]


# --- prepare: shards + merge == one run ------------------------------------------------------------
def test_prepare_in_two_shards_then_merged_equals_one_run(damaged, tmp_path):
    data, masks, (corrupt, empty) = damaged
    opts = {**OPTS, "segmenter_options": {"folder": masks}}
    whole = prepare_dataset(data, tmp_path / "whole", **opts)
    assert [i for i, _ in whole.failures] == sorted([corrupt, empty])

    out = tmp_path / "sharded"
    first = prepare_dataset(data, out, shard=(0, 2), **opts)
    assert [i for i, _ in first.failures] == [corrupt] and "--merge" in first.summary()
    assert "failures-shard0of2.csv" in first.summary()
    assert not (out / "folds.csv").exists() and not (out / "coco").exists() and not (out / "failures.csv").exists()
    assert (out / "failures-shard0of2.csv").is_file() and (out / "cache" / "index-shard0of2.csv").is_file()
    prepare_dataset(data, out, shard=(1, 2), **opts)
    merged = prepare_dataset(data, out, merge_only=True, **opts)
    assert_same_files(tmp_path / "whole", out)
    assert merged.failures == whole.failures
    with open(out / "failures.csv") as fh:
        rows = {r["ID"]: r["error"] for r in csv.DictReader(fh)}
    assert f"{corrupt}_green.png" in rows[corrupt] and "no cell found" in rows[empty]
    # the merge is repeatable, and an unsharded rerun over the shards' output changes nothing
    merge_prepared(data, out)
    assert_same_files(tmp_path / "whole", out)
    rerun = prepare_dataset(data, out, **opts)
    assert rerun.written == 0 and rerun.skipped_existing == 4
    assert_same_files(tmp_path / "whole", out)


def test_prepare_shards_as_concurrent_processes(synth, tmp_path):
    masks = true_masks_folder(synth, tmp_path / "truth")
    prepare_dataset(synth, tmp_path / "whole", segmenter_options={"folder": masks}, **OPTS)
    out = tmp_path / "sharded"
    code = ("import sys; from hpa_scc.apps.prepare import prepare_dataset; "
            "prepare_dataset(sys.argv[1], sys.argv[2], size=64, segmenter='precomputed', "
            "segmenter_options={'folder': sys.argv[3]}, n_folds=2, progress=False, shard=(int(sys.argv[4]), 2))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(synth), str(out), str(masks), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    merge_prepared(synth, out)
    assert_same_files(tmp_path / "whole", out)
    assert not [p for p in out.rglob("*") if ".tmp" in p.name], "temporary files left behind"


def test_merge_names_the_images_of_an_unfinished_shard(synth, tmp_path):
    masks = true_masks_folder(synth, tmp_path / "truth")
    out = tmp_path / "sharded"
    prepare_dataset(synth, out, shard=(0, 2), segmenter_options={"folder": masks}, **OPTS)
    ids = sorted(p.stem for p in (synth / "masks").glob("*.png"))
    unfinished = [i for i in ids if shard_of(i, 2) == 1]
    with pytest.raises(ValueError, match="a shard did not finish") as err:
        merge_prepared(synth, out)
    assert all(i in str(err.value) for i in unfinished) and "shard(s) 1/2" in str(err.value)
    assert not any(i in str(err.value) for i in set(ids) - set(unfinished))
    assert not (out / "coco").exists()
    # one killed half-way: a record lost
    prepare_dataset(synth, out, shard=(1, 2), segmenter_options={"folder": masks}, **OPTS)
    PreparedSet(out).record_path(unfinished[0]).unlink()
    with pytest.raises(ValueError, match=unfinished[0]):
        merge_prepared(synth, out)


def test_out_of_range_shard_and_merge_without_shards_are_clear_errors(synth, tmp_path):
    masks = true_masks_folder(synth, tmp_path / "truth")
    opts = {**OPTS, "segmenter_options": {"folder": masks}}
    with pytest.raises(ValueError, match="shard 2/2 is out of range"):
        prepare_dataset(synth, tmp_path / "p", shard=(2, 2), **opts)
    with pytest.raises(ValueError, match="out of range"):
        segment_folder(synth, tmp_path / "s", shard=(-1, 2), segmenter="precomputed",
                       segmenter_options={"folder": masks}, progress=False)
    with pytest.raises(FileNotFoundError, match="nothing to merge"):
        prepare_dataset(synth, tmp_path / "p", merge_only=True, **opts)
    with pytest.raises(ValueError, match="without --shard"):
        prepare_dataset(synth, tmp_path / "p", merge_only=True, shard=(0, 2), **opts)
    prepare_dataset(synth, tmp_path / "p", shard=(0, 2), **opts)
    with pytest.raises(ValueError, match=r"size: 64 -> "):  # a shard with other settings is refused
        prepare_dataset(synth, tmp_path / "p", shard=(1, 2), **{**opts, "size": 32})


# --- segment and cache ------------------------------------------------------------------------------
def test_segment_shards_then_merged_failures_equal_one_run(damaged, tmp_path):
    data, masks, (corrupt, _) = damaged
    opts = {"segmenter": "precomputed", "segmenter_options": {"folder": masks}, "progress": False}
    segment_folder(data, tmp_path / "whole", **opts)
    out = tmp_path / "sharded"
    for i in (0, 1):
        report = segment_folder(data, out, shard=(i, 2), **opts)
        assert "--merge" in report.summary()
    with pytest.raises(ValueError, match="did not finish"):
        merge_failures(out, _with_extra_image(data, tmp_path))
    without_data = merge_failures(out)  # no DATA_DIR: the images the shard logs name
    assert [i for i, _ in without_data.failures] == [corrupt] and without_data.skipped_existing == 0
    report = merge_failures(out, data)
    assert [i for i, _ in report.failures] == [corrupt]
    assert_same_files(tmp_path / "whole", out, ["failures.csv"])
    whole = sorted(p.name for p in (tmp_path / "whole").glob("*.png"))
    assert whole == sorted(p.name for p in out.glob("*.png"))


def _with_extra_image(data: Path, tmp_path: Path) -> Path:
    """The set plus one image that no shard has seen."""
    bigger = tmp_path / "bigger"
    shutil.copytree(data, bigger)
    first = sorted(p.stem for p in (data / "masks").glob("*.png"))[1]
    for channel in ("red", "green", "blue", "yellow"):
        shutil.copy(data / "train" / f"{first}_{channel}.png", bigger / "train" / f"new-image_{channel}.png")
    with open(bigger / "train.csv", "a") as fh:
        fh.write("new-image,0\n")
    return bigger


def test_cache_shards_then_merged_index_equals_one_run(damaged, tmp_path):
    data, _, (corrupt, _) = damaged
    build_cache(data, tmp_path / "whole", size=32, progress=False)
    out = tmp_path / "sharded"
    written = 0
    for i in (0, 1, 2):
        report = build_cache(data, out, size=32, progress=False, shard=(i, 3))
        failed = [corrupt] if shard_of(corrupt, 3) == i else []  # the corrupt image fails in its own shard only
        assert [image_id for image_id, _ in report.failures] == failed
        assert (f"failures-shard{i}of3.csv" in report.summary()) == bool(failed)
        written += report.written
    assert written == len(list((data / "masks").glob("*.png"))) - 1  # every other image, each by one shard
    report = merge_cache(data, out)
    assert [i for i, _ in report.failures] == [corrupt]
    assert_same_files(tmp_path / "whole", out, ["index.csv", "failures.csv", "cache.json"])
    with pytest.raises(ValueError, match="new-image"):
        merge_cache(_with_extra_image(data, tmp_path), out)


def test_cli_takes_the_shard_from_the_job_array_unless_told(synth, tmp_path, monkeypatch):
    """Inside a job array the CLI processes the task's shard; --shard all overrides; --merge gathers."""
    from hpa_scc.cli import main

    for key in ("SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    for task in ("0", "1"):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task)
        assert main(["cache", str(synth), str(tmp_path / "c"), "--size", "32", "--workers", "1", "-q"]) == 0
    assert sorted(p.name for p in (tmp_path / "c").glob("index-shard*")) == ["index-shard0of2.csv", "index-shard1of2.csv"]
    assert not (tmp_path / "c" / "index.csv").exists()
    assert main(["cache", str(synth), str(tmp_path / "c"), "--size", "32", "--merge", "-q"]) == 0
    assert main(["cache", str(synth), str(tmp_path / "whole"), "--size", "32", "--shard", "all", "--workers", "1",
                 "-q"]) == 0
    assert filecmp.cmp(tmp_path / "c" / "index.csv", tmp_path / "whole" / "index.csv", shallow=False)


def test_the_merge_needs_no_segmenter_options_but_a_shard_with_others_is_refused(synth, tmp_path):
    """prepare.json records the segmenter's options (a model file by size and time); --merge
    segments nothing, so a merge command without them is accepted; a shard with others is not."""
    masks = true_masks_folder(synth, tmp_path / "truth")
    out = tmp_path / "sharded"
    for i in (0, 1):
        prepare_dataset(synth, out, shard=(i, 2), segmenter_options={"folder": masks}, **OPTS)
    assert json.loads((out / "prepare.json").read_text())["segmenter_options"] == {"folder": str(masks)}
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ValueError, match=r"other settings \(segmenter_options\.folder: .*truth.* -> .*elsewhere"):
        prepare_dataset(synth, out, shard=(0, 2), segmenter_options={"folder": tmp_path / "elsewhere"}, **OPTS)
    merged = prepare_dataset(synth, out, merge_only=True, **OPTS)  # no segmenter_options
    assert not merged.failures and (out / "coco" / "per_label" / "fold0.json").is_file()
