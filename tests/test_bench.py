"""The benchmark suite runs on CPU at tiny sizes and reports what it measured (or why it could not)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

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


def test_weak_supervision_table_reports_rounds_and_training_label_quality():
    bench = load("weak_supervision")
    q = {"precision": 0.5, "recall": 0.8, "f1": 0.615, "exact": 0.25}
    better = {"precision": 0.7, "recall": 0.7, "f1": 0.7, "exact": 0.5}
    refinement = {"backbone": "densenet121", "round": 1, "threshold": 0.05, "relative": 0.5, "truth_before": q,
                  "truth_auc": 0.61, "held_out_f1": 0.7, "min_f1": 0.5,
                  "truth_after": better,
                  "sweep": [{"threshold": 0.0, "relative": 0.0, **q}, {"threshold": 0.1, "relative": 0.75, **better,
                                                                        "f1": 0.75}]}
    rows = [{"name": "baseline: random confidences", "mAP": 0.6, "per_class": {0: 0.5}},
            {"name": "densenet121 weak", "mAP": 0.62, "per_class": {0: 0.6}, "backbone": "densenet121", "gain": None},
            {"name": "densenet121 refined_r1", "mAP": 0.65, "per_class": {0: 0.7}, "backbone": "densenet121",
             "gain": 0.03},
            {"name": "densenet121 oracle", "mAP": 0.7, "per_class": {0: 0.8}, "backbone": "densenet121"}]
    text = bench.format_markdown(rows, {"densenet121": 0.7}, {"profile": "cpu"}, [refinement])
    assert "| densenet121 refined_r1 | 0.6500 | 0.93 | +0.0300 |" in text
    assert "| densenet121 weak: image labels on every cell | 0.500 | 0.800 | 0.615 | 0.250 |" in text
    assert ("| densenet121 refined_r1 (threshold 0.05, relative 0.50; the weak model ranks cells at within-image "
            "AUC 0.610) | 0.700 | 0.700 | 0.700 | 0.500 |") in text
    assert "chosen with the truth: threshold 0.1, relative 0.75 | 0.700 | 0.700 | 0.750 |" in text
    kept = {**refinement, "kept_image_labels": True, "held_out_f1": 0.17, "truth_after": q}
    kept_text = bench.format_markdown(rows, {}, {}, [kept])
    assert "refined_r1 (held-out F1 0.17 < 0.5: image labels kept; the weak model" in kept_text
    # without truth (real data) there is no label-quality table
    assert "true labels" not in bench.format_markdown(rows, {}, {}, [{**refinement, "truth_after": None}])
