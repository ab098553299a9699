"""Label refinement on a prepared synthetic set, training on the refined labels, and predict's
fusion and random baseline."""

from __future__ import annotations

import json

import numpy as np
import pytest

import hpa_scc.apps.refine
from hpa_scc.config import load_config
from hpa_scc.constants import NEGATIVE, NUM_CLASSES
from hpa_scc.data.instances import CellInstances
from hpa_scc.data.prepared import PreparedSet, cells_of
from hpa_scc.evaluation.metric import evaluate_files
from hpa_scc.apps.predict import predict_folder
from hpa_scc.apps.refine import refine_prepared
from hpa_scc.evaluation.submission import read_submission


@pytest.fixture(scope="module")
def run(shared_data):
    """A synthetic set at 256 px and a DenseNet121 run trained for one step at 128 px (its
    prepared set is copied by every test that refines into it)."""
    return shared_data.tiny_run()


def labels_by_cell(coco: dict) -> dict[tuple[int, int], list[int]]:
    out: dict[tuple[int, int], list[int]] = {}
    for ann in coco["annotations"]:
        out.setdefault((ann["image_id"], ann["cell_id"]), []).append(ann["category_id"] - 1)
    return {k: sorted(v) for k, v in out.items()}


def test_refinement_with_a_perfect_scorer_recovers_the_true_labels(run, monkeypatch, tmp_path):
    import shutil

    prepared = tmp_path / "prepared"
    shutil.copytree(run / "prepared", prepared)
    truth = labels_by_cell(PreparedSet(prepared).read_folds("per_label", [0, 1], labels="truth"))

    def oracle_scorer(loaded, prepared_dir, image, cells, tta=False):
        conf = np.full((len(cells), NUM_CLASSES), 0.1, np.float32)
        for row, cell_id in enumerate(sorted(cells)):
            conf[row, truth[(image["id"], cell_id)]] = 0.9
        return conf

    monkeypatch.setattr(hpa_scc.apps.refine, "score_image_cells", oracle_scorer)
    # the per_label layout, named: the tiny run's head (multilabel, the default) would pick its own
    report = refine_prepared(run / "run", prepared, layout="per_label", name="refined_r1", held_out_folds=[0],
                             progress=False)
    # F1 < 1: segmented cells on background carry Negative in the transferred truth
    assert 0.1 < report.threshold <= 0.9 and report.held_out_f1 > 0.5
    weak = PreparedSet(prepared).read_folds("per_label", [0, 1])
    refined = PreparedSet(prepared).read_folds("per_label", [0, 1], labels="refined_r1")
    assert [i["id"] for i in refined["images"]] == [i["id"] for i in weak["images"]]
    image_labels = {i["id"]: set(i["labels"]) for i in weak["images"]}
    got = labels_by_cell(refined)
    assert set(got) == set(labels_by_cell(weak))  # same cells, masks untouched
    for (image_id, cell_id), labels in got.items():
        kept = sorted(set(truth[(image_id, cell_id)]) & image_labels[image_id])
        assert labels == (kept or [NEGATIVE])
    assert report.labels_after < report.labels_before and report.cells == len(got)
    def masks(coco):
        return {(i, k): a["segmentation"] for i, cells in cells_of(coco).items() for k, a in cells.items()}

    assert masks(refined) == masks(weak)
    saved = json.loads((prepared / "coco_refined_r1" / "refine.json").read_text())
    assert saved["threshold"] == report.threshold and saved["held_out_folds"] == [0]
    # the synthetic truth says how the labels changed: the weak labels give cells labels they do
    # not show and never say Negative; a perfect scorer's labels are the truth
    before, after = saved["truth_before"], saved["truth_after"]
    assert before["precision"] < 0.8 and before["recall"] < 1.0 and before["exact"] < 0.8
    assert after == pytest.approx({"precision": 1, "recall": 1, "f1": 1, "exact": 1}) and after == report.truth_after
    assert "against the true cell labels: precision" in report.summary()
    assert report.truth_auc == 1.0 and not report.kept_image_labels  # 0.9 for every shown label, 0.1 otherwise
    # the same scorer, not trusted: below min_f1 the cells keep their image labels
    distrusted = refine_prepared(run / "run", prepared, layout="per_label", name="distrusted", held_out_folds=[0],
                                 min_f1=0.99, progress=False)
    assert distrusted.kept_image_labels and distrusted.labels_after == distrusted.labels_before
    assert "image labels kept" in distrusted.summary() and distrusted.truth_after == pytest.approx(before)
    by_rule = {(r["threshold"], r["relative"]): r for r in saved["sweep"]}
    assert by_rule[(0.0, 0.0)]["f1"] == pytest.approx(before["f1"])  # threshold 0 keeps the weak labels
    assert by_rule[(0.5, 0.0)]["f1"] == pytest.approx(after["f1"])  # 0.5 splits 0.1 from 0.9 as the chosen one
    assert by_rule[(0.0, 0.9)]["f1"] == pytest.approx(after["f1"])  # so does 0.9 x the image's best cell (0.9)

    ds = CellInstances(prepared, [1], "per_label", labels="refined_r1")  # what a softmax-head training reads
    _, target = ds[0]
    first = ds.image(0)["id"]
    assert sorted(set((target["labels"] - 1).tolist())) == sorted({c for (i, _), v in got.items() if i == first
                                                                    for c in v})


def test_an_uninformed_model_leaves_the_weak_labels_alone(run, tmp_path):
    import shutil

    prepared = tmp_path / "prepared"
    shutil.copytree(run / "prepared", prepared)
    # the tiny run trained one step: no detection passes the score threshold, so F1 is 0 everywhere
    report = refine_prepared(run / "run", prepared, layout="per_label", name="r", held_out_folds=[0], progress=False)
    assert report.threshold == 0.0 and report.labels_after == report.labels_before and report.kept_image_labels
    assert labels_by_cell(PreparedSet(prepared).read_folds("per_label", [0, 1], labels="r")) == \
        labels_by_cell(PreparedSet(prepared).read_folds("per_label", [0, 1]))
    with pytest.raises(ValueError, match="their own name"):
        refine_prepared(run / "run", prepared, layout="per_label", name="truth", held_out_folds=[0], progress=False)
    with pytest.raises(ValueError, match=r"--held-out-folds 7: .* has 2 fold\(s\) \(0-1\)"):  # before any scoring
        refine_prepared(run / "run", prepared, layout="per_label", name="r2", held_out_folds=[7], progress=False)


def test_refine_command(run, tmp_path, capsys):
    import shutil

    from hpa_scc.cli import main

    prepared = tmp_path / "prepared"
    shutil.copytree(run / "prepared", prepared)
    rc = main(["refine", str(run / "run"), str(prepared), "--name", "refined_r1", "--held-out-folds", "0",
               "--min-f1", "0.3", "--layout", "per_label", "-q"])
    out = capsys.readouterr().out
    assert rc == 0 and "refined_r1: threshold 0.00" in out and "against the true cell labels" in out
    saved = json.loads((prepared / "coco_refined_r1" / "refine.json").read_text())
    assert saved["layout"] == "per_label" and saved["relative"] == 0.0 and len(saved["sweep"]) == 40
    assert (prepared / "coco_refined_r1" / "per_label" / "fold1.json").is_file()
    for option, value in (("--relative", "2"), ("--threshold", "nan"), ("--threshold", "5")):
        with pytest.raises(SystemExit) as stop:  # refused by the parser, before any model is loaded
            main(["refine", str(run / "run"), str(prepared), "--name", "r", "--held-out-folds", "0", option, value])
        assert stop.value.code == 2 and f"{value} is not a number in [0, 1]" in capsys.readouterr().err
    assert main(["refine", str(tmp_path / "nope"), str(prepared), "--name", "r", "--held-out-folds", "0"]) == 1
    assert "nope" in capsys.readouterr().err


def test_labels_key_picks_the_coco_folder_and_names_what_is_missing(run):
    cfg = load_config(None, ["data.labels=refined_r9"])
    assert cfg.data.labels == "refined_r9"
    with pytest.raises(FileNotFoundError, match="coco_refined_r9.*refinement round"):
        CellInstances(run / "prepared", [0], labels="refined_r9")
    with pytest.raises(ValueError, match="data.labels must be"):
        CellInstances(run / "prepared", [0], labels="../coco")


def test_random_baseline_and_image_fusion(run, tmp_path):
    solution = run / "set" / "solution.csv"
    random_sub = predict_folder(None, run / "set", tmp_path / "random", baseline="random", progress=False)
    rows = read_submission(random_sub)
    confs = [c for r in rows for _, c, _ in r.predictions]
    assert len({label for r in rows for label, _, _ in r.predictions}) == NUM_CLASSES  # every class, every cell
    assert 0.0 <= min(confs) and max(confs) < 1.0 and len(set(confs)) > len(confs) // 2
    again = predict_folder(None, run / "set", tmp_path / "random2", baseline="random", progress=False)
    assert again.read_text() == random_sub.read_text()  # reproducible per image
    assert 0.0 < evaluate_files(solution, random_sub).mAP < 1.0

    plain = predict_folder(run / "run", run / "set", tmp_path / "plain", progress=False)
    fused = predict_folder(run / "run", run / "set", tmp_path / "fused", image_fusion=0.5, progress=False)
    for a, b in zip(read_submission(plain), read_submission(fused), strict=True):
        assert [(lab, m) for lab, _, m in a.predictions] == [(lab, m) for lab, _, m in b.predictions]
        assert all(cb >= ca - 1e-6 for (_, ca, _), (_, cb, _) in zip(a.predictions, b.predictions, strict=True))


def test_refine_as_a_job_array_scores_shards_and_merges_to_the_same_labels(run, tmp_path, capsys):
    """refine --shard I/N per task (each part scored once, reused on a rerun), then --merge: the
    same refined COCO files as one process; a merge before every part exists names the fix."""
    import shutil

    from hpa_scc.cli import main

    one, parts = tmp_path / "one", tmp_path / "parts"
    for p in (one, parts):
        shutil.copytree(run / "prepared", p)
    args = ["--name", "r1", "--held-out-folds", "0", "--threshold", "0", "--relative", "0.25", "--min-f1", "0", "-q"]
    assert main(["refine", str(run / "run"), str(one)] + args) == 0
    assert main(["refine", str(run / "run"), str(parts)] + args + ["--shard", "0/2"]) == 0
    assert not (parts / "coco_r1" / "multilabel").exists()  # a part writes scores only
    assert main(["refine", str(run / "run"), str(parts)] + args + ["--merge"]) != 0
    assert "no complete set of shards scored by this model" in capsys.readouterr().err
    part = parts / "coco_r1" / "scores-shard0of2.npz"
    stamp = part.stat().st_mtime_ns
    for i in (0, 1):
        assert main(["refine", str(run / "run"), str(parts)] + args + ["--shard", f"{i}/2"]) == 0
    assert part.stat().st_mtime_ns == stamp  # finished part reused
    # the same parts are not used for other cells (a fold file changed: one cell fewer)
    other = tmp_path / "other"
    shutil.copytree(parts, other)
    for layout in ("multilabel", "per_label"):
        path = other / "coco" / layout / "fold0.json"
        coco = json.loads(path.read_text())
        first = coco["annotations"][0]
        coco["annotations"] = [a for a in coco["annotations"]
                               if (a["image_id"], a["cell_id"]) != (first["image_id"], first["cell_id"])]
        path.write_text(json.dumps(coco))
    assert main(["refine", str(run / "run"), str(other)] + args + ["--merge"]) != 0
    assert "no complete set of shards scored by this model" in capsys.readouterr().err
    assert main(["refine", str(run / "run"), str(parts)] + args + ["--merge"]) == 0
    for layout in ("multilabel", "per_label"):
        for fold in (0, 1):
            a = json.loads((one / "coco_r1" / layout / f"fold{fold}.json").read_text())
            b = json.loads((parts / "coco_r1" / layout / f"fold{fold}.json").read_text())
            assert a == b
    report_one = json.loads((one / "coco_r1" / "refine.json").read_text())
    report_parts = json.loads((parts / "coco_r1" / "refine.json").read_text())
    assert report_one == report_parts


def test_a_refined_set_is_never_replaced_by_other_labels_nor_used_after_its_image_labels_changed(run, tmp_path,
                                                                                                capsys):
    """Issue 27 row 7: refine r1 again with another rule is refused (a run may have trained on r1);
    after prepare relabels an image, training on r1 is refused, naming the changed fold."""
    import shutil

    from hpa_scc.apps.prepare import prepare_dataset
    from hpa_scc.cli import main

    data, prepared = tmp_path / "set", tmp_path / "prepared"
    shutil.copytree(run / "set", data)
    shutil.copytree(run / "prepared", prepared)
    args = ["--name", "r1", "--held-out-folds", "0", "--threshold", "0", "--relative", "0.25", "--min-f1", "0", "-q"]
    assert main(["refine", str(run / "run"), str(prepared)] + args) == 0
    first = (prepared / "coco_r1" / "multilabel" / "fold1.json").read_bytes()
    assert main(["refine", str(run / "run"), str(prepared)] + args) == 0  # the same command: allowed
    other = [a if a != "0.25" else "0.5" for a in args]
    assert main(["refine", str(run / "run"), str(prepared)] + other) == 1
    err = capsys.readouterr().err
    assert "holds labels refined from other inputs (relative: 0.25 -> 0.5)" in err and "another --name" in err
    assert (prepared / "coco_r1" / "multilabel" / "fold1.json").read_bytes() == first
    assert len(CellInstances(prepared, [0, 1], labels="r1")) > 0

    rows = (data / "train.csv").read_text().splitlines()
    image_id = rows[1].split(",")[0]
    rows[1] = f"{image_id},7"
    (data / "train.csv").write_text("\n".join(rows) + "\n")
    prepare_dataset(data, prepared, size=128, n_folds=2, progress=False)
    with pytest.raises(ValueError, match=r"coco_r1 was refined from image labels that have changed since \(fold\d"):
        CellInstances(prepared, [0, 1], labels="r1")


def test_soft_refinement_writes_the_teachers_targets_that_a_detector_reads(run, monkeypatch, tmp_path):
    """Distillation: refine --soft writes each cell's soft targets (weak.targets.soft_targets) as its
    multilabel label vector, and the detector's dataset hands them to the head as they are."""
    import shutil

    from hpa_scc.cli import main
    from hpa_scc.weak.targets import soft_targets

    prepared = tmp_path / "prepared"
    shutil.copytree(run / "prepared", prepared)
    truth = labels_by_cell(PreparedSet(prepared).read_folds("per_label", [0, 1], labels="truth"))
    scores = {}

    def teacher(loaded, prepared_dir, image, cells, tta=False):  # informative, and different per cell
        rng = np.random.default_rng(image["id"])
        conf = rng.uniform(0.05, 0.3, (len(cells), NUM_CLASSES)).astype(np.float32)
        for row, cell_id in enumerate(sorted(cells)):
            conf[row, truth[(image["id"], cell_id)]] += 0.6
        scores[image["id"]] = (image["labels"], sorted(cells), conf)
        return conf

    monkeypatch.setattr(hpa_scc.apps.refine, "score_image_cells", teacher)
    report = refine_prepared(run / "run", prepared, name="soft_r1", held_out_folds=[0], soft="relative",
                             progress=False)
    assert report.soft == "relative" and "soft targets, relative scale" in report.summary()
    assert not (prepared / "coco_soft_r1" / "per_label").exists()  # label vectors: the multilabel layout only
    soft = PreparedSet(prepared).read_folds("multilabel", [0, 1], labels="soft_r1")
    written = {(a["image_id"], a["cell_id"]): a["label_vector"] for a in soft["annotations"]}
    assert len(written) == sum(len(ids) for _, ids, _ in scores.values())
    for image_id, (labels, ids, conf) in scores.items():
        expected = soft_targets(labels, conf, "relative")
        for row, cell_id in enumerate(ids):
            assert written[(image_id, cell_id)] == pytest.approx(expected[row].tolist(), abs=5e-5)
    values = np.array(list(written.values()))
    assert ((values > 0.01) & (values < 0.99)).any()  # soft, not 0/1
    assert json.loads((prepared / "coco_soft_r1" / "refine.json").read_text())["made_from"]["soft"] == "relative"
    # what Mask R-CNN's multilabel head trains on: the same vectors, as float tensors
    ds = CellInstances(prepared, [1], "multilabel", labels="soft_r1")
    _, target = ds[0]
    image_id = ds.image(0)["id"]
    ids = sorted(k for i, k in written if i == image_id)
    assert target["label_vectors"].dtype.is_floating_point
    assert target["label_vectors"].numpy() == pytest.approx(np.array([written[(image_id, k)] for k in ids]), abs=1e-6)
    # the same name with hard labels is another label set: refused; per_label and --rounds refused
    with pytest.raises(ValueError, match="refined from other inputs"):
        refine_prepared(run / "run", prepared, name="soft_r1", held_out_folds=[0], progress=False)
    with pytest.raises(ValueError, match="the multilabel layout holds them, not 'per_label'"):
        refine_prepared(run / "run", prepared, name="s2", held_out_folds=[0], soft="raw", layout="per_label")
    with pytest.raises(SystemExit, match="without --rounds"):
        main(["refine", str(run / "run"), str(prepared), "--name", "s3", "--held-out-folds", "0", "--soft", "raw",
              "--rounds", "2"])
