"""The main job on built-in synthetic data, end to end (``python -m hpa_scc demo``).

Six steps, each a call into the package the other commands make too: a synthetic HPA set;
the training set built from it (builtin segmentation, cache, COCO per fold); the segmentation
scored against the synthetic truth; Mask R-CNN trained on image labels; the per-cell features
model trained by MIL (the teacher), the labels it refines and boosted trees fitted on them (the
student), the two averaged per cell; a held-out synthetic set predicted by both
models and both baselines and scored with the competition metric, with each cell's predicted
labels drawn beside the truth for the best model (by that score) and for Mask R-CNN, each in its
own folder (OUT/figures/overlays_<model>/). Everything goes under one
folder and every step resumes, so a re-run skips finished work. The console shows the steps'
summaries (and any warning); the commands' own INFO lines go to OUT/demo.log, where they do not
break up the tables.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpa_scc.config import CONFIGS_DIR, Config, load_config


@dataclass
class DemoOptions:
    out: Path = Path("runs/demo")
    images: int = 24
    size: int = 512          # synthetic image size
    train_size: int = 256    # the prepared set's size, which training follows
    seed: int = 0
    workers: int = min(2, os.cpu_count() or 1)
    train_config: Path = CONFIGS_DIR / "cpu_demo.yaml"
    train_overrides: list[str] = field(default_factory=list)
    no_train: bool = False
    progress: bool = True


def train_config(options: DemoOptions) -> Config:
    """Step 4's config; loaded before any work so that a bad file or override stops the demo at once."""
    return load_config(options.train_config, [f"data.prepared_dir={options.out / 'prepared'}",
                                              f"train.run_dir={options.out / 'train'}", *options.train_overrides])


@contextlib.contextmanager
def info_to_file(path: Path):
    """INFO lines of the package to ``path`` (appended: a resumed demo keeps the first run's);
    the console handlers see warnings and errors only until the block ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    package = logging.getLogger("hpa_scc")
    package_level, consoles = package.level, [(h, h.level) for h in logging.getLogger().handlers]
    package.setLevel(logging.INFO)
    for h, level in consoles:
        h.setLevel(max(level, logging.WARNING))
    package.addHandler(handler)
    try:
        yield
    finally:
        package.removeHandler(handler)
        handler.close()
        package.setLevel(package_level)
        for h, level in consoles:
            h.setLevel(level)


def run_demo(options: DemoOptions) -> int:
    """Run the demo; 0 when every image was prepared, 1 when some failed (listed by prepare)."""
    cfg = None if options.no_train else train_config(options)  # before anything is written
    with info_to_file(options.out / "demo.log"):
        return _run_steps(options, cfg)


def _run_steps(options: DemoOptions, cfg: Config | None) -> int:
    from hpa_scc.apps.prepare import prepare_dataset
    from hpa_scc.data.synth import format_summary, write_synth_set

    data, prepared = options.out / "synthetic", options.out / "prepared"
    steps = 3 if options.no_train else 6
    print(f"[1/{steps}] synthetic HPA set -> {data}")
    summary = write_synth_set(data, options.images, size=options.size, seed=options.seed, workers=options.workers,
                              progress=options.progress)
    print(format_summary(summary))
    print(f"\n[2/{steps}] training set: builtin segmentation, {options.train_size}px cache, COCO in 3 folds "
          f"-> {prepared}")
    report = prepare_dataset(data, prepared, size=options.train_size, segmenter="builtin", n_folds=3,
                             seed=options.seed, workers=options.workers, progress=options.progress)
    print(report.summary())
    print(f"\n[3/{steps}] builtin segmentation against the synthetic truth")
    print(segmentation_quality(data, prepared))
    if cfg is not None:
        run_dir = train_detector(cfg, options.progress)
        predict_and_score(options, run_dir, train_cell_model(options.out, prepared))
    print(f"\ndone: {options.out} (every command's log lines: {options.out / 'demo.log'})")
    return 0 if not report.failures else 1


def segmentation_quality(data: Path, prepared: Path) -> str:
    """Step 3: cells found vs true cells, and the mask AP at IoU 0.6 of the prepared segmentation."""
    from hpa_scc.data.prepared import PreparedSet
    from hpa_scc.data.synth import SynthSet
    from hpa_scc.segment.quality import mask_ap

    pset, truth = PreparedSet(prepared), SynthSet(data)
    done = [i for i in truth.mask_ids() if pset.is_segmented(i)]
    preds = [pset.cells(i) for i in done]
    trues = [truth.read_mask(i) for i in done]
    n_pred, n_true = sum(int(np.count_nonzero(np.unique(p))) for p in preds), sum(int(t.max()) for t in trues)
    return f"cells found {n_pred}, true cells {n_true}, mask AP at IoU 0.6: {mask_ap(preds, trues, iou=0.6):.3f}"


def train_detector(cfg: Config, progress: bool) -> Path:
    """Step 4: Mask R-CNN on the pseudo-masks with image labels; prints the validation AP per epoch."""
    from hpa_scc.engine.runfolder import read_metrics
    from hpa_scc.engine.train import train

    print(f"\n[4/6] {cfg.model.backbone} Mask R-CNN, {cfg.train.max_epochs} epochs on CPU -> {cfg.train.run_dir}")
    train(cfg, progress=progress)
    aps = [row["segm_AP"] for row in read_metrics(cfg.train.run_dir) if row.get("kind") == "val"]
    if aps:
        print("validation (fold 0) COCO mask AP per epoch: " + ", ".join(f"{ap:.4f}" for ap in aps))
    return Path(cfg.train.run_dir)


def train_cell_model(out: Path, prepared: Path) -> tuple[Path, Path]:
    """Step 5: the per-cell method of docs/RESULTS.md (``mil-teacher-student``): a features model
    trained by MIL on the image labels of folds 1-2 narrows every training cell's labels (relative
    rule, mil_r1); boosted trees are fitted on them (every fold), the student; the teacher is the
    same MIL model fitted on every fold's image labels. Prediction averages the two per cell.
    Returns (teacher, student) run folders."""
    from hpa_scc.apps.refine import RELATIVE_RULE, refine_prepared
    from hpa_scc.engine.train import train

    common = [f"data.prepared_dir={prepared}"]  # the training size follows the prepared set
    print("\n[5/6] per-cell features: MIL on image labels (the teacher), labels refined once, boosted trees "
          "fitted on them (the student) (seconds)")
    first = out / "features-mil"
    train(load_config(CONFIGS_DIR / "cell_features_mil.yaml", common + [f"train.run_dir={first}"]), progress=False)
    report = refine_prepared(first, prepared, name="mil_r1", held_out_folds=[0], threshold=0.0,
                             relative=RELATIVE_RULE, min_f1=0.0, progress=False)
    print(report.summary())
    teacher, boosted = out / "features-mil-all", out / "boosted-refined"
    train(load_config(CONFIGS_DIR / "cell_features_mil.yaml", common + ["data.val_fold=-1", f"train.run_dir={teacher}"]),
          progress=False)
    train(load_config(CONFIGS_DIR / "cell_features_boosted.yaml",
                      common + ["data.val_fold=-1", "data.labels=mil_r1", f"train.run_dir={boosted}"]), progress=False)
    return teacher, boosted


# The trained models step 6 scores, by their console name: (prediction folder under OUT/predict,
# overlay folder under OUT/figures). The baselines are scored too but have no overlays.
MASKRCNN = "Mask R-CNN (segmenter cells)"
FEATURES = "per-cell features, MIL teacher+student"
MODEL_FOLDERS = {MASKRCNN: ("model", "overlays_maskrcnn"),
                 FEATURES: ("mil-teacher-student", "overlays_mil-teacher-student")}
N_OVERLAYS = 4


def predict_and_score(options: DemoOptions, run_dir: Path, cell_runs: tuple[Path, Path] | None = None) -> None:
    """Step 6: a held-out synthetic test set, predicted and scored next to both baselines; the cells
    of the best model by mAP, and of Mask R-CNN, drawn beside the truth."""
    from hpa_scc.apps.predict import predict_folder
    from hpa_scc.apps.visualize import plot_pr_curves, prediction_overlays, visualize_main
    from hpa_scc.data.synth import SynthSet, write_synth_set
    from hpa_scc.evaluation.metric import evaluate_files

    out = options.out
    test = out / "test-synthetic"
    n_test = max(options.images // 3, 2)
    print(f"\n[6/6] predict a held-out synthetic set ({n_test} images, seed {options.seed + 1}) and score it")
    write_synth_set(test, n_test, size=options.size, seed=options.seed + 1, workers=options.workers, progress=False)
    solution = SynthSet(test).solution_csv
    runs = {MASKRCNN: {"run_dir": run_dir},
            **({FEATURES: {"run_dir": cell_runs[0], "ensemble": [cell_runs[1]]}} if cell_runs else {}),
            "baseline: image labels on every cell": {"run_dir": None, "baseline": "image-labels"},
            "baseline: the truth (sanity check)": {"run_dir": None, "baseline": "truth"}}
    print(f"{'':<40}{'mAP@0.6':>10}")
    model_map: dict[str, float] = {}
    for name, kwargs in runs.items():
        pred = out / "predict" / (MODEL_FOLDERS[name][0] if name in MODEL_FOLDERS else kwargs["baseline"])
        submission = predict_folder(data_dir=test, out_dir=pred, progress=options.progress, **kwargs)
        result = evaluate_files(solution, submission, pred / "metrics.json")
        plot_pr_curves(result, pred / "pr_curves.png")
        print(f"{name:<40}{result.mAP:>10.4f}")
        if name in MODEL_FOLDERS:
            model_map[name] = result.mAP
    visualize_main(out / "predict" / MODEL_FOLDERS[MASKRCNN][0], test, out / "figures", run_dir=run_dir,
                   solution=solution, n=0)  # the overlays follow, one folder per model
    print(f"submissions, per-cell tables, metrics.json and PR curves under {out / 'predict'}; "
          f"Mask R-CNN's per-class AP and training curves under {out / 'figures'}")
    # Overlays of the best trained model by the scores above (at the demo's CPU budget Mask R-CNN
    # gives nearly every cell the same labels), and of Mask R-CNN when it is not the best.
    best = max(model_map, key=model_map.get)
    drawn = []
    for name in dict.fromkeys([best, MASKRCNN]):
        pred_folder, overlay_folder = MODEL_FOLDERS[name]
        paths = prediction_overlays(out / "predict" / pred_folder, test, out / "figures" / overlay_folder, N_OVERLAYS)
        role = "best model, " if name == best else ""
        drawn.append(f"{role}{name} (mAP {model_map[name]:.4f}): {len(paths)} in {out / 'figures' / overlay_folder}")
    print("overlays, predicted cell labels beside the truth: " + "; ".join(drawn))
