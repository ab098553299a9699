"""predict: both cell modes at the original size, the baselines, resume, and the scoring pieces."""

import csv

import numpy as np
import pytest
import torch

from hpa_scc.apps.predict import predict_folder
from hpa_scc.engine.inference import cells_from_detections, score_cells
from hpa_scc.evaluation.submission import decode_mask, read_submission
from hpa_scc.data.images import seg_paths


@pytest.fixture(scope="module")
def run(shared_data):
    """A synthetic set at 256 px and a DenseNet121 run trained for one step at 128 px."""
    return shared_data.tiny_run()


def read_cells(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_segmenter_cells_scored_by_the_model_at_original_size(run, tmp_path):
    out = predict_folder(run / "run", run / "set", tmp_path / "p", progress=False)
    rows = read_submission(out)
    assert len(rows) == 4 and all((r.width, r.height) == (256, 256) for r in rows)
    cells = read_cells(tmp_path / "p" / "cells.csv")
    assert list(cells[0])[-19:] == [f"conf_{c}" for c in range(19)]
    for row in rows:  # every cell has all 19 classes, its mask encoded once and repeated
        masks = {}
        for label, conf, mask in row.predictions:
            masks.setdefault(mask, []).append(label)
            assert 0.0 <= conf <= 1.0
        assert all(sorted(v) == list(range(19)) for v in masks.values())
        seg = __import__("cv2").imread(str(seg_paths(tmp_path / "p" / "segmentation", row.image_id, True)[1]), -1)
        assert len(masks) == len(set(np.unique(seg)) - {0})
        first = decode_mask(next(iter(masks)), 256, 256)
        assert first.shape == (256, 256) and first.any()
    # resumable: a second run reads the per-image records and writes the same files
    before = (tmp_path / "p" / "submission.csv").read_text()
    predict_folder(run / "run", run / "set", tmp_path / "p", progress=False)
    assert (tmp_path / "p" / "submission.csv").read_text() == before


def test_worker_pool_and_batches_give_the_same_records_and_log_a_corrupt_image(run, tmp_path):
    import shutil

    data = tmp_path / "set"
    shutil.copytree(run / "set", data)
    broken = sorted((data / "train").glob("*_green.png"))[1]
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=rf"1 of 4 images could not be predicted \(e.g. "
                                         rf"{broken.name.removesuffix('_green.png')}.*--allow-missing"):
        predict_folder(run / "run", data, tmp_path / "serial", workers=1, batch_size=1, progress=False)
    assert not (tmp_path / "serial" / "submission.csv").exists()  # no submission that lacks an ID
    assert len(list((tmp_path / "serial" / "records").glob("*/*.json"))) == 3  # finished images are kept
    one = predict_folder(run / "run", data, tmp_path / "serial", workers=1, batch_size=1, allow_missing=True,
                         progress=False)
    pool = predict_folder(run / "run", data, tmp_path / "pool", workers=2, batch_size=3, allow_missing=True,
                          progress=False)
    rows_one, rows_pool = read_submission(one), read_submission(pool)
    assert [r.image_id for r in rows_one] == [r.image_id for r in rows_pool] and len(rows_one) == 3
    for a, b in zip(rows_one, rows_pool, strict=True):
        assert [(l, m) for l, _, m in a.predictions] == [(l, m) for l, _, m in b.predictions]
        assert np.allclose([c for _, c, _ in a.predictions], [c for _, c, _ in b.predictions], atol=1e-4)
    for out in ("serial", "pool"):
        failures = read_cells(tmp_path / out / "failures.csv")
        assert [f["ID"] for f in failures] == [broken.name.removesuffix("_green.png")]
        assert "green" in failures[0]["error"]


@pytest.mark.slow
def test_model_cells_and_tta(run, tmp_path):
    out = predict_folder(run / "run", run / "set", tmp_path / "m", cells="model", tta=True, progress=False)
    rows = read_submission(out)
    assert len(rows) == 4 and all((r.width, r.height) == (256, 256) for r in rows)
    for row in rows:
        for _, _, mask in row.predictions[:5]:
            assert decode_mask(mask, 256, 256).shape == (256, 256)


def test_baselines(run, tmp_path):
    truth = read_submission(predict_folder(None, run / "set", tmp_path / "t", baseline="truth", progress=False))
    solution = {r.image_id: r for r in read_submission(run / "set" / "solution.csv")}
    for row in truth:  # the truth baseline re-encodes exactly the solution's masks and labels
        assert sorted((l, m) for l, _, m in row.predictions) == sorted((l, m) for l, _, m in solution[row.image_id].predictions)
    images = read_submission(predict_folder(None, run / "set", tmp_path / "i", baseline="image-labels", progress=False))
    with open(run / "set" / "train.csv") as fh:
        labels = {r["ID"]: sorted(map(int, r["Label"].split("|"))) for r in csv.DictReader(fh)}
    for row in images:
        assert {l for l, _, _ in row.predictions} == set(labels[row.image_id])
        assert all(conf == 1.0 for _, conf, _ in row.predictions)


def test_score_cells_uses_score_times_iou():
    cells = np.zeros((10, 10), np.uint16)
    cells[:, :5], cells[:, 5:] = 1, 2
    det_mask = np.zeros((1, 10, 10), np.float32)
    det_mask[0, :, :4] = 0.9  # inside cell 1: IoU 40/50 = 0.8
    class_scores = np.zeros((1, 19), np.float32)
    class_scores[0, 3] = 0.5
    conf = score_cells(cells, [1, 2], {"masks": det_mask, "class_scores": class_scores})
    assert conf.shape == (2, 19)
    assert conf[0, 3] == pytest.approx(0.4) and conf[1].max() == 0 and conf[0].sum() == pytest.approx(0.4)


def test_model_cells_merge_overlapping_detections_of_different_classes():
    masks = np.zeros((3, 8, 8), np.float32)
    masks[0, :4, :4] = masks[1, :4, :4] = 0.9  # one cell, detected as class 0 and class 5
    masks[2, 5:, 5:] = 0.8  # another cell
    class_scores = np.zeros((3, 19), np.float32)
    class_scores[0, 0], class_scores[1, 5], class_scores[2, 2] = 0.9, 0.6, 0.7
    labels, conf = cells_from_detections({"masks": masks, "class_scores": class_scores,
                                          "scores": class_scores.max(1)}, (16, 16))
    assert labels.shape == (16, 16) and labels.max() == 2
    assert conf.shape == (2, 19) and conf[0, 0] == pytest.approx(0.9) and conf[0, 5] == pytest.approx(0.6)
    assert conf[1, 2] == pytest.approx(0.7) and (labels == 1).sum() == 64  # pasted back at twice the size


def test_a_missing_checkpoint_says_what_the_run_holds(run, tmp_path):
    from hpa_scc.engine.inference import load_run

    held = sorted(p.name for p in (run / "run").glob("*.pt"))
    assert "last.pt" in held
    with pytest.raises(FileNotFoundError, match=rf"no checkpoint .*nope.pt; .* holds {', '.join(held)}: pass one "
                                                r"with --checkpoint"):
        load_run(run / "run", "nope.pt")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text((run / "run" / "config.yaml").read_text())
    with pytest.raises(FileNotFoundError, match=r"best.pt \(nor last.pt.*holds no checkpoint yet: train first"):
        load_run(empty)


def test_other_models_or_baselines_into_the_same_out_are_refused(run, tmp_path):
    """Per-image records of an earlier run are reused only for the same model and settings."""
    out = tmp_path / "p"
    first = predict_folder(None, run / "set", out, baseline="image-labels", progress=False)
    before = first.read_text()
    with pytest.raises(ValueError, match=r"was made with other settings \(mode: 'image-labels' -> 'truth';.*another OUT"):
        predict_folder(None, run / "set", out, baseline="truth", progress=False)
    with pytest.raises(ValueError, match=r"was made with other settings \(.*models: \[\] -> \[\{.*use another OUT"):
        predict_folder(run / "run", run / "set", out, progress=False)
    assert first.read_text() == before  # the earlier submission is untouched
    # an OUT written before the hashed sub-folders (flat records/, no "files" in predict.json) is
    # refused too: its records would not be found and every image silently redone beside them
    import json

    settings = json.loads((out / "predict.json").read_text())
    settings.pop("files")
    (out / "predict.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=r"was made with other settings \(.*files: None -> 'fanned'.*another OUT"):
        predict_folder(None, run / "set", out, baseline="image-labels", progress=False)


def test_image_labels_baseline_needs_labels(run, tmp_path):
    import shutil

    data = tmp_path / "test"
    shutil.copytree(run / "set" / "train", data)  # channel files only: no table, no labels
    with pytest.raises(ValueError, match=r"image-labels baseline .* image\(s\) of .* have none.*--labels"):
        predict_folder(None, data, tmp_path / "p", baseline="image-labels", progress=False)


def test_shards_of_a_job_array_merge_into_what_one_run_writes(run, tmp_path):
    """predict --shard I/N per array task, then --merge: the same submission.csv and cells.csv as
    one unsharded run; a merge before every shard has finished names the shard to run again."""
    from hpa_scc.cli import main
    from hpa_scc.data.shard import shard_of

    whole = predict_folder(run / "run", run / "set", tmp_path / "one", progress=False)
    out = tmp_path / "sharded"
    common = ["predict", str(run / "run"), str(run / "set"), "--out", str(out), "-q"]
    assert main(common + ["--shard", "0/2"]) == 0
    assert not (out / "submission.csv").exists() and (out / "failures-shard0of2.csv").is_file()
    ids = [p.stem for p in (run / "set" / "train").glob("*_red.png")]
    ids = [i.removesuffix("_red") for i in ids]
    assert {p.stem for p in (out / "records").glob("*/*.json")} == {i for i in ids if shard_of(i, 2) == 0}
    with pytest.raises(ValueError, match=r"cannot merge .*Run shard\(s\) 1/2 again"):
        predict_folder(None, run / "set", out, merge_only=True, progress=False)
    assert main(common + ["--shard", "1/2"]) == 0
    assert main(["predict", "-", str(run / "set"), "--out", str(out), "--merge", "-q"]) == 0
    assert (out / "submission.csv").read_text() == whole.read_text()
    assert (out / "cells.csv").read_text() == (tmp_path / "one" / "cells.csv").read_text()


def test_a_feature_head_detector_trains_and_predicts_both_cell_modes(run, shared_data, tmp_path):
    """model.cell_features=true on the user's path: train (the feature store built into the prepared
    set on first use), then predict with the segmenter's cells (each measured with cell_features)
    and with the detector's own cells (measured under its masks): every cell has 19 scores."""
    from hpa_scc.config import load_config
    from hpa_scc.engine.train import train
    from conftest import TINY_RUN_OVERRIDES

    prepared = shared_data.copy(run / "prepared", tmp_path / "prepared")
    train(load_config(None, [f"data.prepared_dir={prepared}", f"train.run_dir={tmp_path / 'run'}",
                             "model.cell_features=true", "model.label_loss=sum", *TINY_RUN_OVERRIDES]), progress=False)
    assert (prepared / "crops" / "features.npy").is_file()
    for mode in ("segmenter", "model"):
        out = predict_folder(tmp_path / "run", run / "set", tmp_path / mode, cells=mode, progress=False)
        rows = read_submission(out)
        assert len(rows) == 4
        cells = read_cells(tmp_path / mode / "cells.csv")
        scores = np.array([[float(c[f"conf_{k}"]) for k in range(19)] for c in cells])
        assert scores.shape[1] == 19 and ((scores >= 0) & (scores <= 1)).all()
        if mode == "segmenter":
            assert len(cells) > 4 and np.isfinite(scores).all()


def test_a_feature_head_started_from_a_features_model_resumes_after_that_file_moved(run, shared_data, tmp_path):
    """model.cell_features_init on the user's path: a features run fitted on the prepared set starts
    the detector's feature head (its scaler, kept fixed); the resumed run reads its head from
    last.pt, not from the features model's file, which may have moved (nor may the change of path
    refuse the resume); a fresh start with the file gone names it."""
    from hpa_scc.config import load_config
    from hpa_scc.engine.train import train
    from hpa_scc.utils.checkpoint import load_checkpoint
    from conftest import TINY_RUN_OVERRIDES

    prepared = shared_data.copy(run / "prepared", tmp_path / "prepared")
    features = tmp_path / "features"
    train(load_config("configs/cell_features.yaml", [f"data.prepared_dir={prepared}", f"train.run_dir={features}",
                                                     "data.val_fold=-1"]), progress=False)
    teacher = load_checkpoint(features / "best.pt")["model"]
    init = tmp_path / "init.pt"
    init.write_bytes((features / "best.pt").read_bytes())
    detector = tmp_path / "run"
    overrides = [f"data.prepared_dir={prepared}", f"train.run_dir={detector}", "model.cell_features=true",
                 "model.label_loss=sum", *TINY_RUN_OVERRIDES]
    train(load_config(None, [*overrides, f"model.cell_features_init={init}"]), progress=False)
    first = load_checkpoint(detector / "last.pt")
    head = "roi_heads.feature_norm."
    assert bool(first["model"]["roi_heads.fixed_feature_scale"]) and first["epoch"] == 1
    torch.testing.assert_close(first["model"][head + "running_mean"], teacher["mean"].float())

    moved = tmp_path / "moved.pt"
    init.rename(moved)
    # the same command after the file moved: the resume does not read it (a read would raise)
    train(load_config(None, [*overrides, "train.max_epochs=2", f"model.cell_features_init={init}"]), progress=False)
    # and the command naming its new place is no settings change that refuses the resume
    train(load_config(None, [*overrides, "train.max_epochs=3", f"model.cell_features_init={moved}"]), progress=False)
    second = load_checkpoint(detector / "last.pt")
    assert second["epoch"] == 3 and bool(second["model"]["roi_heads.fixed_feature_scale"])
    for key in ("running_mean", "running_var"):  # fixed in training: what the features model fitted
        torch.testing.assert_close(second["model"][head + key], first["model"][head + key], rtol=0, atol=0)

    with pytest.raises(FileNotFoundError, match=f"model.cell_features_init: {init} not found"):
        train(load_config(None, [*overrides, f"train.run_dir={tmp_path / 'fresh'}",
                                 f"model.cell_features_init={init}"]), progress=False)
