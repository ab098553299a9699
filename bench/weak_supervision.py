"""Weak supervision, measured cell by cell: weak vs oracle training, label refinement, fusion.

    .venv/bin/python bench/weak_supervision.py                          # the CPU protocol (~50 min, 2 cores)
    python bench/weak_supervision.py --profile gpu --backbones densenet121 resnet101_fpn resnext101_32x8d_fpn
    .venv/bin/python bench/weak_supervision.py --out runs/weak --rounds 2 # same folder: resumes, adds a round

The protocol (docs/RESULTS.md):
1. a synthetic train set and a separate synthetic test set (different seeds), both with
   single-cell variability (cells of one image carry different labels);
2. the train set prepared once with the builtin segmenter (cells, cache, COCO in 3 folds; fold 0
   is held out for validation and for choosing the refinement threshold); the test set segmented
   by the same segmenter at prediction;
3. per backbone, trainings with the same budget (epochs, batch, lr, seed, initial weights):
   ``weak`` (each cell inherits its image's labels), ``oracle`` (each cell its true labels,
   transferred from the synthetic truth) and ``refined_rK`` (round K: the cells relabelled by
   round K-1's model, ``hpa_scc.refine``);
4. each model predicts the test set (segmenter cells scored by the model; also with image
   fusion, ``--image-fusion``) and the competition metric scores it, next to the baselines
   (every cell its image's labels at confidence 1; random confidences; the truth, 1.0).

Writes OUT/results.json, OUT/results.md (the table, per-class AP) and OUT/per_class_ap.png.
Every step resumes: finished trainings, predictions and refinements are reused.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from hpa_scc.config import HEAD_LAYOUT, load_config
from hpa_scc.constants import NUM_CLASSES, SHORT_CLASS_NAMES
from hpa_scc.fileio import write_text_atomic
from hpa_scc.metric import evaluate_files
from hpa_scc.predict import predict_folder
from hpa_scc.prepare import prepare_dataset
from hpa_scc.refine import MIN_HELD_OUT_F1, refine_prepared
from hpa_scc.synth import write_synth_set
from hpa_scc.train import train

REPO = Path(__file__).resolve().parents[1]
PROFILES = {
    # ~15 min per training on 2 CPU cores: DenseNet121 at 256 px with the reduced heads, 680 steps
    "cpu": {"train_images": 48, "test_images": 24, "size": 256, "epochs": 40, "batch": 2, "lr": 0.01,
            "warmup": 50, "workers": 2, "rounds": 1},
    # one GPU: 512 px, the sizes of the real task's cache
    "gpu": {"train_images": 600, "test_images": 150, "size": 512, "epochs": 24, "batch": 8, "lr": 0.02,
            "warmup": 100, "workers": 8, "rounds": 2},
}
# Config differences per profile (before the command line's key=value overrides). Every cell is
# scored from the detections that overlap it, so keep low-score detections: a weak model's
# class probabilities still rank cells. The reduced heads: ~20 cells per image need far fewer
# proposals and sampled RoIs than COCO's defaults, 2.4x faster per CPU step at 256 px.
PROFILE_CONFIG = {
    "cpu": ["model.box_score_thresh=0.001", "model.box_detections_per_img=200", "model.rpn_post_nms_top_n_train=256",
            "model.rpn_post_nms_top_n_test=200", "model.box_batch_size_per_image=128"],
    "gpu": ["model.box_score_thresh=0.001", "model.box_detections_per_img=200", "model.rpn_post_nms_top_n_train=512",
            "model.rpn_post_nms_top_n_test=300", "model.box_batch_size_per_image=256"],
}
VAL_FOLD = 0
FUSION = 0.5


def train_run(backbone: str, labels: str, prepared: Path, run_dir: Path, p: dict, overrides: list[str]) -> Path:
    """One training of the protocol (resumes if interrupted, returns at once if finished)."""
    cfg = load_config(REPO / "configs" / f"{backbone}.yaml", [
        f"data.prepared_dir={prepared}", f"data.image_size={p['size']}", f"data.labels={labels}",
        f"data.val_fold={VAL_FOLD}", f"data.workers={p['workers']}", f"train.run_dir={run_dir}",
        f"train.max_epochs={p['epochs']}", f"train.images_per_gpu={p['batch']}", f"optim.lr={p['lr']}",
        f"optim.warmup_iters={p['warmup']}", f"train.val_every_epochs={p['epochs']}", "train.tensorboard=false",
        "train.save_every_epochs=1000", *overrides])
    start = time.perf_counter()
    print(f"  train {run_dir.name}: {backbone}, labels={labels}, {p['epochs']} epochs", flush=True)
    train(cfg, progress=False)
    print(f"    {time.perf_counter() - start:.0f} s", flush=True)
    return run_dir


def score(name: str, test: Path, out: Path, **options) -> dict:
    """Predict the test set (resumable) and score it; {name, mAP, per_class}."""
    submission = predict_folder(data_dir=test, out_dir=out, progress=False, **options)
    result = evaluate_files(test / "solution.csv", submission, out / "metrics.json")
    row = {"name": name, "mAP": result.mAP,
           "per_class": {c: (None if math.isnan(result.per_class_ap[c]) else result.per_class_ap[c])
                         for c in range(NUM_CLASSES)}}
    print(f"  {name:<40} mAP {result.mAP:.4f}", flush=True)
    return row


def label_rows(refinements: list[dict]) -> list[tuple[str, dict]]:
    """(what, label_quality) rows: how close each round's training labels are to the truth."""
    out = []
    for ref in refinements:
        if not ref.get("truth_after"):
            continue
        if ref["round"] == 1:
            out.append((f"{ref['backbone']} weak: image labels on every cell", ref["truth_before"]))
        rule = f"threshold {ref['threshold']:.2f}" + (f", relative {ref['relative']:.2f}" if ref["relative"] else "")
        if ref.get("kept_image_labels"):
            rule = f"held-out F1 {ref['held_out_f1']:.2f} < {ref['min_f1']:g}: image labels kept"
        if ref.get("truth_auc") is not None:
            source = "weak" if ref["round"] == 1 else f"refined_r{ref['round'] - 1}"
            rule += f"; the {source} model ranks cells at within-image AUC {ref['truth_auc']:.3f}"
        out.append((f"{ref['backbone']} refined_r{ref['round']} ({rule})", ref["truth_after"]))
        best = max(ref["sweep"], key=lambda r: r["f1"])
        out.append((f"  best rule of the sweep, chosen with the truth: threshold {best['threshold']:g}, "
                    f"relative {best['relative']:g}", best))
    return out


def format_markdown(rows: list[dict], oracle: dict[str, float], params: dict, refinements: list[dict]) -> str:
    lines = [f"Protocol parameters: {json.dumps(params)}", "",
             "| method | mAP@0.6 | / oracle | gain over previous round |", "| --- | --- | --- | --- |"]
    for r in rows:
        ref = oracle.get(r.get("backbone", ""))
        ratio = f"{r['mAP'] / ref:.2f}" if ref and "backbone" in r else ""
        gain = f"{r['gain']:+.4f}" if r.get("gain") is not None else ""
        lines.append(f"| {r['name']} | {r['mAP']:.4f} | {ratio} | {gain} |")
    quality = label_rows(refinements)
    if quality:
        lines += ["", "Training labels against the cells' true labels (train set; micro over cell x class; "
                      "the oracle's labels are the truth):", "",
                  "| labels | precision | recall | F1 | cells exactly right |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {what} | {q['precision']:.3f} | {q['recall']:.3f} | {q['f1']:.3f} | {q['exact']:.3f} |"
                  for what, q in quality]
    present = [c for c in range(NUM_CLASSES) if any(r["per_class"].get(c) is not None for r in rows)]
    lines += ["", "Per-class AP (classes present in the test set):", "",
              "| method | " + " | ".join(SHORT_CLASS_NAMES[c] for c in present) + " |",
              "| --- |" + " --- |" * len(present)]
    for r in rows:
        cells = ["-" if r["per_class"].get(c) is None else f"{r['per_class'][c]:.2f}" for c in present]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--backbones", nargs="+", default=["densenet121"])
    parser.add_argument("--head", choices=sorted(HEAD_LAYOUT), default="softmax",
                        help="classification head of every training (multilabel: sigmoid per cell, BCE); the train "
                             "set is prepared in the layout it trains on")
    parser.add_argument("--out", type=Path, default=Path("runs/weak"))
    parser.add_argument("--rounds", type=int, default=None, help="refinement rounds (default: the profile's)")
    parser.add_argument("--relative", type=float, default=0.0, metavar="R",
                        help="refinement rule: a cell must also reach R x its image's best cell score for a label "
                             "(default 0: the held-out threshold alone)")
    parser.add_argument("--min-f1", type=float, default=MIN_HELD_OUT_F1, metavar="F",
                        help="refinement keeps the image labels when the model's held-out image-label F1 is below F "
                             "(default: %(default)s; 0 always refines); the round then reuses the previous model")
    parser.add_argument("--seed", type=int, default=0, help="train set seed; the test set uses seed + 1000")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a profile value, e.g. --set epochs=4 --set train_images=24")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")
    args = parser.parse_args(argv)
    p = dict(PROFILES[args.profile])
    for item in args.sets:
        key, _, value = item.partition("=")
        if key not in p:
            parser.error(f"unknown profile key {key!r}; choose from {sorted(p)}")
        p[key] = type(p[key])(value)
    rounds = p["rounds"] if args.rounds is None else args.rounds
    layout = HEAD_LAYOUT[args.head]
    overrides = PROFILE_CONFIG[args.profile] + [f"model.head={args.head}", f"data.layout={layout}"] + args.overrides
    out = args.out
    train_set, test_set, prepared = out / "train-set", out / "test-set", out / "prepared"
    print(f"weak-supervision protocol ({args.profile}): {p}, rounds {rounds} -> {out}", flush=True)
    write_synth_set(train_set, p["train_images"], size=p["size"], seed=args.seed, workers=p["workers"], progress=False)
    write_synth_set(test_set, p["test_images"], size=p["size"], seed=args.seed + 1000, workers=p["workers"],
                    progress=False)
    prepare_dataset(train_set, prepared, size=p["size"], segmenter="builtin", n_folds=3, seed=args.seed,
                    layout=layout, workers=p["workers"], progress=False)

    preds = out / "predict"
    rows = [score("baseline: random confidences", test_set, preds / "random", run_dir=None, baseline="random",
                  workers=p["workers"]),
            score("baseline: image labels on every cell", test_set, preds / "image-labels", run_dir=None,
                  baseline="image-labels", workers=p["workers"])]
    oracle: dict[str, float] = {}
    refinements = []
    for backbone in args.backbones:
        runs = out / backbone
        plan = [("weak", "image"), ("oracle", "truth")]
        for name, labels in plan:
            train_run(backbone, labels, prepared, runs / name, p, overrides)
        previous = None
        for name in ["weak"] + [f"refined_r{k}" for k in range(1, rounds + 1)] + ["oracle"]:
            run_dir = runs / name
            if name.startswith("refined_r"):
                k = int(name[len("refined_r"):])
                source_run = runs / ("weak" if k == 1 else f"refined_r{k - 1}")
                label_name = f"{backbone}_{name}"
                report_path = prepared / f"coco_{label_name}" / "refine.json"
                if not report_path.is_file():
                    report = refine_prepared(source_run, prepared, name=label_name, held_out_folds=[VAL_FOLD],
                                             relative=args.relative, min_f1=args.min_f1, progress=False)
                    print(f"  {report.summary()}", flush=True)
                saved = json.loads(report_path.read_text())
                # kept labels do not depend on the rule (refine.json then records relative 0)
                relative = args.relative if not saved.get("kept_image_labels") else 0.0
                if (saved.get("relative", 0.0), saved.get("min_f1", 0.0)) != (relative, args.min_f1):
                    parser.error(f"{report_path} was made with another --relative or --min-f1; use a new --out")
                refinements.append({"backbone": backbone, "round": k, **saved})
                if saved.get("kept_image_labels"):
                    # the labels did not change: training again would repeat the previous round
                    print(f"  {name}: image labels kept, the round reuses {source_run.name}'s model", flush=True)
                    run_dir = source_run
                else:
                    train_run(backbone, label_name, prepared, run_dir, p, overrides)
            for fusion in (0.0, FUSION):
                label = f"{backbone} {name}" + (f" + image fusion {fusion:g}" if fusion else "")
                row = score(label, test_set, preds / backbone / (name + (f"-fusion{fusion:g}" if fusion else "")),
                            run_dir=run_dir, image_fusion=fusion, workers=p["workers"])
                row.update({"backbone": backbone, "run": name, "fusion": fusion})
                if not fusion and name != "oracle":
                    row["gain"] = None if previous is None else row["mAP"] - previous
                    previous = row["mAP"]
                rows.append(row)
            if name == "oracle":
                oracle[backbone] = rows[-2]["mAP"]
    rows.append(score("baseline: the truth (sanity check)", test_set, preds / "truth", run_dir=None,
                      baseline="truth", workers=p["workers"]))

    params = {"profile": args.profile, **p, "head": args.head, "rounds": rounds, "relative": args.relative, "min_f1": args.min_f1,
              "seed": args.seed, "backbones": args.backbones, "overrides": overrides}
    results = {"params": params, "rows": rows, "oracle": oracle, "refinements": refinements,
               "date": time.strftime("%Y-%m-%d %H:%M")}
    write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    table = format_markdown(rows, oracle, params, refinements)
    write_text_atomic(out / "results.md", table)
    from hpa_scc.visualize import plot_per_class_ap

    chosen = {r["name"]: r["per_class"] for r in rows
              if r["name"].startswith("baseline: image") or (r.get("fusion") == 0.0 and r.get("run") in
                                                            ("weak", f"refined_r{rounds}", "oracle"))}
    plot_per_class_ap(chosen, title="per-class AP on the synthetic test set", path=out / "per_class_ap.png")
    print("\n" + table + f"\n-> {out / 'results.json'}, {out / 'results.md'}, {out / 'per_class_ap.png'}")
    return results


if __name__ == "__main__":
    main()
