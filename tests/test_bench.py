"""The benchmark suite runs on CPU at tiny sizes and reports what it measured (or why it could not)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_step_measures_both_modes_through_the_training_step(tmp_path):
    out = tmp_path / "ts.json"
    figures = load("train_step").main(["--size", "128", "--batch", "1", "--steps", "1", "--warmup", "0",
                                       "--mode", "both", "--backbones", "densenet121", "--json", str(out)])
    assert json.loads(out.read_text()) == figures
    plain, fast = figures["rows"]
    assert (plain["mode"], fast["mode"]) == ("plain", "fast")
    assert plain["train_images_per_s"] > 0 and fast["infer_images_per_s"] > 0
    assert fast["train_speedup_vs_plain"] == pytest.approx(fast["train_images_per_s"] / plain["train_images_per_s"],
                                                           rel=0.02)
    assert plain["peak_gpu_gib"] is None  # CPU: no GPU memory to report


def test_predict_bench_reports_the_parts_and_the_estimate(tmp_path):
    figures = load("predict").main(["--images", "2", "--test-set", "3", "--size", "256", "--model-size", "128",
                                    "--workers", "1", "--batch-size", "2", "--work", str(tmp_path)])
    assert figures["test_set"] == 3 and figures["cpu_s_per_image"] > 0 and figures["model_images_per_s"] > 0
    expected = max(559 * figures["cpu_s_per_image"] / 16, 559 / 100)
    assert figures["estimate_559_s"] == pytest.approx(expected, abs=0.1)
    rows = (tmp_path / "pred-e2e" / "submission.csv").read_text().splitlines()
    assert len(rows) == 4  # header + the three (symlinked) images, each predicted
    assert len(list((tmp_path / "test3" / "train").glob("*_r0002_green.png"))) == 1


def test_run_reports_a_failing_benchmark_and_keeps_going(tmp_path):
    run = load("run")
    failed = run.run_one("train_step", ["--size", "not-a-number"], 120, tmp_path)
    assert failed["status"] == "exit 2" and failed["figures"] is None
    assert "invalid int value" in Path(failed["log"]).read_text()
    loader = {"status": "ok", "seconds": 1.0, "log": "x", "figures": {
        "source_size": 2048, "size": 512, "png_images_per_s": 10.0, "cache_images_per_s": 2000.0, "ratio": 200.0,
        "train_loader_workers": 8, "train_loader_images_per_s": 300.0}}
    rows = run.summary_rows({"loader": loader, "train_step": failed})
    assert ("loader, 512 px uint8 cache (1 core)", "2000 img/s", "ratio 200x (>= 50x)") in rows
    assert rows[-1][0] == "train_step: exit 2" and rows[-1][2].startswith("see ")
    table = run.format_table(rows)
    assert "training loader, 8 workers" in table and "300 img/s" in table


def test_run_cli_rejects_unknown_benchmarks_and_gpu_script_parses(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--only", "nope", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown benchmark(s) ['nope']" in proc.stderr
    assert subprocess.run(["bash", "-n", str(BENCH / "gpu.sh")]).returncode == 0


def test_weak_supervision_table_reports_ratios_auc_and_label_quality():
    bench = load("weak_supervision")
    rows = [{"method": "image-labels", "mAP": 0.63, "within_image_auc": None, "seconds": 0, "predict_seconds": 3,
             "per_class": {0: 0.5, 1: None}},
            {"method": "features-refined", "mAP": 0.9, "within_image_auc": 0.88, "seconds": 7.2, "predict_seconds": 9,
             "per_class": {0: 0.95, 1: None}},
            {"method": "features-oracle", "mAP": 0.92, "within_image_auc": 0.9, "seconds": 7, "predict_seconds": 9,
             "per_class": {0: 0.97, 1: None}}]
    refinement = {"cells": 901, "relative": 0.25, "truth_auc": 0.899,
                  "truth_before": {"precision": 0.623, "recall": 0.8, "f1": 0.7, "exact": 0.497},
                  "truth_after": {"precision": 0.763, "recall": 0.818, "f1": 0.789, "exact": 0.6}}
    text = bench.format_markdown(rows, {"profile": "cpu"}, refinement)
    # / its oracle and / the best oracle of the pair (the same here), for the weak rows only
    assert "| features-refined | 0.9000 | 0.978 | 0.978 | 0.880 | 7 | 9 |" in text
    assert "| image-labels | 0.6300 |  |  |  | 0 | 3 |" in text
    assert "| features-oracle | 0.9200 |  |  | 0.900 | 7 | 9 |" in text
    assert bench.oracle_of("boosted-mil-refined") == "boosted-oracle"
    assert bench.oracle_of("features-mil-ensemble") == "features-ensemble-oracle"
    assert bench.oracle_of("maskrcnn-refined:densenet121_fpn") == "maskrcnn-oracle:densenet121_fpn"
    assert bench.oracle_of("truth") is None and bench.oracle_of("cell-oracle") is None
    assert "| features_r1 (relative 0.25; the features model ranks the cells of an image at AUC 0.899) | 0.763 |" in text
    assert "| image-labels | 0.50 |" in text and "Nucleoplasm" not in text.split("Per-class")[0]


def test_weak_supervision_rows_read_back_from_results_json_keep_their_per_class_ap(tmp_path):
    """An earlier invocation's rows, read back from results.json (string keys in JSON), show their
    per-class AP beside a new row's, not '-'."""
    bench = load("weak_supervision")
    old = {"method": "features-mil-refined", "mAP": 0.9, "within_image_auc": 0.9, "seconds": 0, "predict_seconds": 6,
           "per_class": {0: 0.98, 3: None}}
    (tmp_path / "results.json").write_text(json.dumps({"params": {}, "rows": [old]}))
    back = bench.read_results(tmp_path / "results.json")["rows"]
    assert back[0]["per_class"] == {0: 0.98, 3: None}
    new = {**old, "method": "boosted-mil-refined", "per_class": {0: 0.91, 3: None}}
    text = bench.format_markdown([*back, new], {})
    assert "| features-mil-refined | 0.98 |" in text and "| boosted-mil-refined | 0.91 |" in text


@pytest.mark.slow
def test_weak_supervision_protocol_end_to_end_at_a_tiny_size(tmp_path, capsys):
    bench = load("weak_supervision")
    out = tmp_path / "weak"
    args = ["--out", str(out), "--train-images", "9", "--test-images", "3", "--size", "192",
            "--methods", "image-labels", "features", "features-refined", "truth"]
    result = bench.main(args)
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["image-labels", "features", "features-refined", "truth"]
    assert rows["truth"]["mAP"] == pytest.approx(1.0)
    assert 0 <= rows["features"]["within_image_auc"] <= 1 and rows["image-labels"]["within_image_auc"] is None
    saved = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in saved["rows"]] == list(rows) and saved["params"]["train_seed"] == 0
    assert (out / "prepared" / "coco_features_r1" / "multilabel" / "fold0.json").is_file()
    assert "| features-refined |" in (out / "results.md").read_text()
    with pytest.raises(SystemExit):  # other parameters into the same folder are refused
        bench.main(args[:-5] + ["--train-seed", "3", "--methods", "features"])
    assert "other parameters" in capsys.readouterr().err
    # a run trained with another config file or overrides is refused, not reused
    record = out / "runs" / "cell_features-image" / "bench_settings.json"
    assert json.loads(record.read_text())["overrides"] == ["data.labels=image", "data.val_fold=-1"]
    record.write_text(json.dumps({"config": "model: {family: features, feature_c: 0.1}\n", "overrides": []}))
    with pytest.raises(SystemExit, match="cell_features-image was trained with other settings"):
        bench.main(args)


def test_weak_supervision_starts_a_feature_head_from_the_features_model_on_its_labels(tmp_path, monkeypatch):
    """--set det_head_init=1: a -feat detector gets model.cell_features_init = the logistic features
    model on the row's hard labels, its own run folder and predictions (-featinit), and the features
    model's seconds in its row; a detector without -feat is untouched by the key."""
    from types import SimpleNamespace

    bench = load("weak_supervision")
    trained: dict[str, list[str]] = {}
    started_from: dict[str, tuple] = {}

    def fake_train(self, key, config, overrides, inputs=()):
        trained[key] = overrides
        started_from[key] = inputs
        self.seconds[key] = {"cell_features-mil_r1": 2.0}.get(key, 100.0)
        return self.out / "runs" / key

    predicted = []
    monkeypatch.setattr(bench.Protocol, "_train", fake_train)
    monkeypatch.setattr(bench.Protocol, "refined_labels", lambda self, name=None: "mil_r1")
    monkeypatch.setattr(bench, "predict_folder", lambda out_dir, **kw: predicted.append(out_dir) or out_dir / "s.csv")
    monkeypatch.setattr(bench, "evaluate_files", lambda *a: SimpleNamespace(mAP=0.5, per_class_ap=[0.5] * 19))
    monkeypatch.setattr(bench, "test_auc", lambda *a: 0.5)
    p = {**bench.PROFILES["cpu"], "det_cell_init": 0, "det_label_loss": "sum", "det_head_init": 1}
    proto = bench.Protocol(tmp_path, p, "cpu", 0.25, 100)

    row = proto.run("maskrcnn-mil-refined-feat:densenet121_fpn")
    key = "maskrcnn-densenet121_fpn-mil_r1-cellfeat-sumloss-featinit"
    assert row["run"] == key and row["seconds"] == 102.0
    assert f"model.cell_features_init={tmp_path / 'runs' / 'cell_features-mil_r1' / 'best.pt'}" in trained[key]
    assert trained["cell_features-mil_r1"] == ["data.labels=mil_r1", "data.val_fold=-1"]
    assert started_from[key] == (tmp_path / "runs" / "cell_features-mil_r1" / "best.pt",)  # its contents are checked
    assert predicted[-1].name == "maskrcnn-mil-refined-feat-densenet121_fpn-scratch-sumloss-featinit"

    row = proto.run("maskrcnn-mil-refined:densenet121_fpn")  # no feature head: nothing to start
    assert row["run"] == "maskrcnn-densenet121_fpn-mil_r1-sumloss"
    assert not any("cell_features_init" in o for o in trained[row["run"]])
    assert predicted[-1].name == "maskrcnn-mil-refined-densenet121_fpn-scratch-sumloss"

    # rows of other variants keep their own names: never replaced by, nor averaged with, each other
    featinit = proto.run("maskrcnn-mil-refined-feat:densenet121_fpn")
    proto.p = {**p, "det_head_init": 0}
    plain = proto.run("maskrcnn-mil-refined-feat:densenet121_fpn")
    assert (featinit["variant"], plain["variant"]) == ("scratch-sumloss-featinit", "scratch-sumloss")
    assert bench.row_key(plain) == "maskrcnn-mil-refined-feat:densenet121_fpn [scratch-sumloss]"
    summary = bench.summarise([{"params": {"train_seed": 1, "test_seed": 2}, "rows": [featinit]},
                               {"params": {"train_seed": 3, "test_seed": 4}, "rows": [plain]}])
    assert [(r["method"], r["pairs"]) for r in summary["rows"]] == [
        ("maskrcnn-mil-refined-feat:densenet121_fpn [scratch-sumloss-featinit]", 1),
        ("maskrcnn-mil-refined-feat:densenet121_fpn [scratch-sumloss]", 1)]
    assert "| maskrcnn-mil-refined-feat:densenet121_fpn [scratch-sumloss] | 0.5000 |" in bench.format_markdown(
        [featinit, plain], {})

    # a trunk started from the cell model: that checkpoint's contents are checked too
    proto.p = {**p, "det_cell_init": 1}
    row = proto.run("maskrcnn-mil-refined-feat:densenet121_fpn")
    cell = tmp_path / "runs" / "cell-densenet121-48px-mil_r1-val0" / "best.pt"
    assert f"model.weights={cell}" in trained[row["run"]]
    assert started_from[row["run"]] == (cell, tmp_path / "runs" / "cell_features-mil_r1" / "best.pt")
    # the ResNet detectors start from the cell CNN of their own trunk (48 px crops, the same labels)
    for detector, trunk in (("resnet101_fpn", "resnet101"), ("resnext101_32x8d_fpn", "resnext101_32x8d")):
        row = proto.run(f"maskrcnn-mil-refined-feat:{detector}")
        cell_run = f"cell-{trunk}-48px-mil_r1-val0"
        assert f"model.backbone={trunk}" in trained[cell_run] and "data.crop_size=48" in trained[cell_run]
        assert f"model.weights={tmp_path / 'runs' / cell_run / 'best.pt'}" in trained[row["run"]]
        assert row["run"] == f"maskrcnn-{detector}-mil_r1-cellinit-cellfeat-sumloss-featinit"
        assert row["seconds"] == 202.0  # its cell CNN's, the features model's and its own


def test_weak_supervision_reuses_a_run_only_while_the_files_it_started_from_are_unchanged(tmp_path, monkeypatch):
    """A detector started from a features checkpoint is reused while that file's contents are the
    same, and refused (not silently reused) once the file at the same path holds another model."""
    bench = load("weak_supervision")
    started = []
    monkeypatch.setattr(bench, "train", lambda cfg, progress: started.append(cfg.train.run_dir))
    proto = bench.Protocol(tmp_path, dict(bench.PROFILES["cpu"]), "cpu", 0.25, 0)
    teacher = tmp_path / "best.pt"
    teacher.write_bytes(b"model one")
    args = ("det", "cell_features.yaml", ["data.labels=image"])
    proto._train(*args, inputs=(teacher,))
    proto._train(*args, inputs=(teacher,))
    assert len(started) == 1  # the second call reused the finished run
    record = json.loads((tmp_path / "runs" / "det" / "bench_settings.json").read_text())
    assert list(record["inputs"]) == [str(teacher)]
    teacher.write_bytes(b"model two")
    with pytest.raises(SystemExit, match="the files it starts from changed"):
        proto._train(*args, inputs=(teacher,))
    assert len(started) == 1


def test_weak_supervision_refuses_unknown_methods_before_training(tmp_path, capsys):
    bench = load("weak_supervision")
    assert bench.method_error("maskrcnn-refined:resnext101_32x8d_fpn") is None
    assert bench.method_error("maskrcnn-distilled:densenet121_fpn") is None  # distillation and its ablation
    assert bench.method_error("maskrcnn-mil-refined:densenet121_fpn") is None
    assert bench.oracle_of("maskrcnn-distilled:densenet121_fpn") == "maskrcnn-oracle:densenet121_fpn"
    assert bench.oracle_of("maskrcnn-distilled-mask:densenet121_fpn") == "maskrcnn-oracle-mask:densenet121_fpn"
    assert bench.method_error("maskrcnn-mil-refined-mask:densenet121_fpn") is None
    assert "unknown method" in bench.method_error("maskrcnn-mask-mask:densenet121_fpn")
    # -feat: the label head also reads each cell's hand-made features; with -mask in either order
    assert bench.detector_kind("maskrcnn-mil-refined-feat") == ("maskrcnn-mil-refined", ["-feat"])
    assert bench.detector_kind("maskrcnn-oracle-feat-mask") == ("maskrcnn-oracle", ["-feat", "-mask"])
    assert bench.method_error("maskrcnn-mil-refined-mask-feat:densenet121_fpn") is None
    assert bench.oracle_of("maskrcnn-mil-refined-feat:densenet121_fpn+boosted") == "maskrcnn-oracle-feat:densenet121_fpn+boosted"
    assert "unknown method" in bench.method_error("maskrcnn-feat-feat:densenet121_fpn")
    assert bench.method_error("ensemble+fusion") is None
    # +boosted: a CNN row averaged with the boosted features model of the same supervision
    assert bench.split_method("maskrcnn-mil-refined:densenet121_fpn+boosted+fusion") == (
        "maskrcnn-mil-refined:densenet121_fpn", True, True)
    assert bench.method_error("maskrcnn-mil-refined:densenet121_fpn+boosted") is None
    assert bench.oracle_of("cell-mil-refined+boosted") == "cell-oracle+boosted"
    assert "+boosted ensembles a crop-CNN or detector row" in bench.method_error("features+boosted")
    assert "unknown backbone 'resnext101_fpn'" in bench.method_error("maskrcnn-refined:resnext101_fpn")
    assert "name the backbone" in bench.method_error("maskrcnn-oracle")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--out", str(tmp_path / "weak"), "--methods", "features", "cells", "maskrcnn:resnet50"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown method 'cells'" in err and "unknown backbone 'resnet50'" in err
    assert not (tmp_path / "weak").exists()  # nothing prepared or trained


@pytest.mark.slow
def test_train_step_times_both_engines_side_by_side():
    pytest.importorskip("detectron2", reason="detectron2 is not installed; install with: bash scripts/setup.sh --detectron2")
    figures = load("train_step").main(["--size", "128", "--batch", "1", "--steps", "1", "--warmup", "0",
                                       "--mode", "plain", "--engine", "both",
                                       "--backbones", "resnet101_fpn", "densenet121"])
    tv, d2, dense = figures["rows"]  # densenet121 has no detectron2 row (the zoo builds the FPN ResNets only)
    assert [(r["backbone"], r["engine"]) for r in figures["rows"]] == [
        ("resnet101_fpn", "torchvision"), ("resnet101_fpn", "detectron2"), ("densenet121", "torchvision")]
    assert d2["train_images_per_s"] > 0 and d2["infer_images_per_s"] > 0 and figures["engine"] == "both"
    assert d2["train_ratio_vs_torchvision"] == pytest.approx(d2["train_images_per_s"] / tv["train_images_per_s"],
                                                             rel=0.02)


@pytest.mark.slow
def test_a_loader_workers_memory_stays_flat_over_thousands_of_images(tmp_path):
    """3,000 fabricated images (bench/scale.py's way: hard links, records under new IDs, the real
    prepare --merge): once warm (the first half of the pass), a worker's own memory grows by less
    than a bound that does not depend on N over the second half; the dict-per-cell training set
    of the code before the stores, read the same way, keeps growing by several times that (so the
    bound can fail). Measured: stores +0.3 MB (2.1 MB once on a CI machine), dicts +7.6 MB over the
    second 1,200 samples."""
    import torch
    from torch.utils.data import DataLoader

    scale = load("scale")
    data, base = scale.make_base(tmp_path / "w", 6, 128, 64)
    data, prepared = scale.fabricate(data, base, tmp_path / "set", 3000)
    from hpa_scc.apps.prepare import merge_prepared
    from hpa_scc.data.annotations import open_store

    merge_prepared(data, prepared)
    folds = sorted((prepared / "coco" / "multilabel").glob("fold*.json"))
    assert len(folds) == json.loads((prepared / "prepare.json").read_text())["folds"]
    assert all(open_store(p) is not None for p in folds)  # merged with its annotation stores

    def growth(kind: str) -> tuple[int, float]:
        ds = scale.train_set(prepared, kind)
        loader = DataLoader(ds, batch_size=16, num_workers=1, collate_fn=scale._collate_uss,
                            generator=torch.Generator().manual_seed(0), shuffle=True)
        usage = [dirty for (images, _), (_, (uss, dirty)) in loader]  # its own pages (page cache aside)
        return len(ds), usage[-1] - usage[len(usage) // 2]

    n, store_growth = growth("store")
    assert n > 2000  # folds 1-4 of 3,000 images
    _, dict_growth = growth("dicts")
    # The bound leaves room for one-off allocations (an allocator arena, a lazily built table):
    # 0.3 MB here, 2.1 MB once on a CI machine; the dicts' growth is per sample and scales with N.
    assert store_growth < 3.0, f"a worker's own memory grew {store_growth:.1f} MB over the last {n // 2} samples"
    assert dict_growth > 2.5 * max(store_growth, 1.0), (store_growth, dict_growth)


def test_provenance_bench_reports_the_cost_and_a_redone_image(tmp_path):
    """bench/provenance.py at 200 images: the figures are printed and one replaced channel is
    one image redone."""
    proc = subprocess.run([sys.executable, str(BENCH / "provenance.py"), "--images", "200",
                           "--work", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "reuse check per image" in proc.stdout
    assert "one image's channel replaced: 1 redone, 199 reused" in proc.stdout


def test_weak_supervision_summary_over_seed_pairs():
    bench = load("weak_supervision")

    def pair(seed, weak, oracle, boosted_oracle=None):
        rows = [{"method": "features-mil-refined", "mAP": weak, "within_image_auc": 0.9, "seconds": 2},
                {"method": "features-oracle", "mAP": oracle, "within_image_auc": 0.95, "seconds": 1},
                {"method": "truth", "mAP": 1.0, "within_image_auc": None, "seconds": 0}]
        if boosted_oracle:
            rows.append({"method": "boosted-oracle", "mAP": boosted_oracle, "within_image_auc": 0.96, "seconds": 8})
        return {"params": {"train_seed": seed, "test_seed": seed + 5000}, "rows": rows}

    summary = bench.summarise([pair(100, 0.90, 0.95), pair(101, 0.86, 0.90, 0.96), pair(102, 0.92, 0.94)])
    rows = {r["method"]: r for r in summary["rows"]}
    weak = rows["features-mil-refined"]
    assert weak["pairs"] == 3 and weak["mean"] == pytest.approx(0.8933, abs=1e-4)
    assert weak["sd"] == pytest.approx(np.std([0.90, 0.86, 0.92], ddof=1)) and weak["min"] == 0.86
    # each pair against its own best oracle row: 0.90/0.95, 0.86/0.96 (the boosted oracle), 0.92/0.94
    assert weak["min_over_best_oracle"] == pytest.approx(0.86 / 0.96)
    assert rows["boosted-oracle"]["pairs"] == 1 and rows["truth"]["min_over_best_oracle"] is None
    text = bench.format_summary(summary)
    assert "Seed pairs (train/test): 100/5100, 101/5101, 102/5102" in text
    assert "| features-mil-refined | 3 | 0.8933 +- 0.0306 | 0.8600 | 0.9200 | 0.896 | 0.900 | 2 |" in text
    assert "| boosted-oracle | 1 | 0.9600 (one pair, no sd) | 0.9600 |" in text  # no sd from one value


@pytest.mark.slow
def test_feature_models_bench_prints_its_rows_and_the_trees_agree_with_scikit_learn(capsys):
    bench = load("feature_models")
    result = bench.main(["--train-cells", "300", "--score-cells", "100", "--trees", "15"])
    out = capsys.readouterr().out
    assert set(result["rows"]) == {"logistic", "boosted (trees as tensors)", "boosted (scikit-learn predict_proba)",
                                   "boosted, 20 cells per call", "boosted, 20 cells per call, tables rebuilt",
                                   "mil (lse)"}
    assert result["max_difference"] < 1e-6 and result["cached_speedup"] > 0
    assert "tables rebuilt each call / built once" in out and "300 training cells, 100 scored" in out
    scale = bench.main(["--mil-scale-cells", "2000", "--mil-steps", "2"])
    assert scale["cells"] == 2000 and scale["seconds_per_step"] > 0
    assert "fit_feature_mil at 2000 cells (100 bags)" in capsys.readouterr().out


@pytest.mark.slow
def test_weak_supervision_teacher_student_row_is_the_mean_of_its_two_models(tmp_path):
    """mil-teacher-student: each test cell's scores are the mean of the MIL model's (the teacher)
    and the boosted trees' trained on the labels that model refined (the student)."""
    import csv

    import numpy as np

    bench = load("weak_supervision")
    out = tmp_path / "weak"
    methods = ["features-mil", "boosted-mil-refined", "mil-teacher-student"]
    result = bench.main(["--out", str(out), "--train-images", "9", "--test-images", "3", "--size", "192",
                         "--methods", *methods])
    assert [r["method"] for r in result["rows"]] == methods

    def scores(method):
        with open(out / "predict" / method / "cells.csv") as f:
            return {(r["ID"], r["cell"]): [float(r[f"conf_{c}"]) for c in range(19)] for r in csv.DictReader(f)}

    teacher, student, both = scores("features-mil"), scores("boosted-mil-refined"), scores("mil-teacher-student")
    assert set(both) == set(teacher) == set(student) and len(both) >= 3
    for key, row in both.items():
        np.testing.assert_allclose(row, (np.array(teacher[key]) + np.array(student[key])) / 2, atol=2e-6)
    assert not np.allclose([teacher[k] for k in both], [student[k] for k in both], atol=1e-3)  # two different models
    assert (out / "prepared" / "coco_mil_r1" / "refine.json").is_file()


def test_loader_bench_times_the_feature_store_lookup_on_a_fabricated_store():
    figures = load("loader").feature_lookup(4000, per_image=20, lookups=200)
    assert figures["cells"] == 4000 and figures["images"] == 200
    assert figures["index_mb"] == round(2 * 8 * 4000 / 2**20, 1)  # int64 keys + int64 order
    assert figures["lookup_us_per_image"] > 0 and figures["index_build_s"] >= 0
