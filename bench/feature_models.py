"""The features family's classifiers at scale: fit and per-cell scoring time, side by side.

    .venv/bin/python bench/feature_models.py                    # 3,000 training cells, 8,192 scored
    .venv/bin/python bench/feature_models.py --train-cells 50000 --score-cells 100000

Fabricated data (said so): 78 standard-normal features per cell (as many as
``hpa_scc.data.features``), 19 classes each positive where its own feature plus noise exceeds
0.5. Rows:
- logistic: ``fit_feature_classifier`` (19 scikit-learn logistic regressions) and the
  FeatureClassifier module scoring;
- boosted: ``fit_feature_boosting`` (19 HistGradientBoosting ensembles, the config's defaults:
  200 trees of 15 leaves) and TreeEnsembleClassifier scoring every tree as tensors (what predict
  and refine run), beside scikit-learn's own compiled ``predict_proba`` of the same 19 ensembles:
  the ratio says what keeping the trees as tensors costs; ``boosted, 20 cells per call``: the
  same scoring one image's cells at a time, as predict and refine call it, with the walk's flat
  node tables built once per state (the default) and, side by side, rebuilt on every call (as
  before 2026-12-05);
- mil: ``fit_feature_mil`` (log-sum-exp pooling over bags of 20 cells, 300 full-batch steps);
  ``--mil-scale-cells N`` times its full-batch steps at N cells instead (e.g. 2,000,000: 100k
  images) and the peak memory they add over the data's.
Prints one table; scoring figures are microseconds per cell, all threads of the machine.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from hpa_scc.constants import NUM_CLASSES
from hpa_scc.engine.families import fit_feature_boosting, fit_feature_classifier, fit_feature_mil
from hpa_scc.models.cells import FeatureClassifier, TreeEnsembleClassifier


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-cells", type=int, default=3000)
    parser.add_argument("--score-cells", type=int, default=8192)
    parser.add_argument("--trees", type=int, default=200, help="boosting iterations per class (the config's default)")
    parser.add_argument("--mil-scale-cells", type=int, default=0, metavar="N",
                        help="only time fit_feature_mil's full-batch steps at N cells (and its peak memory)")
    parser.add_argument("--mil-steps", type=int, default=10, help="steps timed with --mil-scale-cells")
    args = parser.parse_args(argv)
    if args.mil_scale_cells:
        return mil_at_scale(args.mil_scale_cells, args.mil_steps)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.train_cells, 78)).astype(np.float32)
    y = (x[:, :NUM_CLASSES] + rng.normal(size=(args.train_cells, NUM_CLASSES)) > 0.5).astype(np.float32)
    xs = torch.from_numpy(rng.normal(size=(args.score_cells, 78)).astype(np.float32))
    rows = {}
    logistic, fit = timed(lambda: fit_feature_classifier(FeatureClassifier(78), x, y))
    with torch.no_grad():
        _, score = timed(lambda: logistic(xs))
    rows["logistic"] = (fit, score)
    boosted, fit = timed(lambda: fit_feature_boosting(TreeEnsembleClassifier(), x, y, iters=args.trees))
    with torch.no_grad():
        p_tensor, score = timed(lambda: boosted(xs).numpy())
    rows["boosted (trees as tensors)"] = (fit, score)
    per_image = list(torch.split(xs, 20))  # one image's cells per call

    def score_images(rebuild: bool) -> None:
        for cells in per_image:
            if rebuild:
                boosted._flat_key = None  # forget the tables: built again in this call
            boosted(cells)

    with torch.no_grad():
        _, score = timed(lambda: score_images(False))
        rows["boosted, 20 cells per call"] = (None, score)
        _, score = timed(lambda: score_images(True))
        rows["boosted, 20 cells per call, tables rebuilt"] = (None, score)
    from sklearn.ensemble import HistGradientBoostingClassifier

    # scikit-learn's own prediction of the same ensembles (refitted: same data, same seed, same trees)
    models = [HistGradientBoostingClassifier(max_iter=args.trees, learning_rate=0.05, max_leaf_nodes=15, l2_regularization=1.0,
                                             early_stopping=False, random_state=0).fit(x.astype(np.float64), y[:, c] > 0.5)
              for c in range(NUM_CLASSES)]
    p_sklearn, score = timed(lambda: np.stack([m.predict_proba(xs.numpy().astype(np.float64))[:, 1] for m in models], 1))
    rows["boosted (scikit-learn predict_proba)"] = (None, score)
    bag = np.arange(args.train_cells) // 20
    _, fit = timed(lambda: fit_feature_mil(FeatureClassifier(78), x, bag, y))
    rows["mil (lse)"] = (fit, None)
    print(f"{args.train_cells} training cells, {args.score_cells} scored, {args.trees} trees per class, "
          f"{torch.get_num_threads()} torch threads")
    print(f"{'model':<40}{'fit s':>10}{'score us/cell':>16}")
    for name, (fit, score) in rows.items():
        fit_text = "" if fit is None else f"{fit:.1f}"
        score_text = "" if score is None else f"{score / args.score_cells * 1e6:.1f}"
        print(f"{name:<40}{fit_text:>10}{score_text:>16}")
    ratio = rows["boosted (trees as tensors)"][1] / rows["boosted (scikit-learn predict_proba)"][1]
    agree = float(np.abs(p_tensor - p_sklearn).max())
    print(f"trees as tensors / scikit-learn scoring time: {ratio:.2f}x; largest probability difference {agree:.1e}")
    cached = rows["boosted, 20 cells per call, tables rebuilt"][1] / rows["boosted, 20 cells per call"][1]
    print(f"20 cells per call: tables rebuilt each call / built once: {cached:.2f}x")
    return {"rows": rows, "ratio": ratio, "max_difference": agree, "cached_speedup": cached}


def mil_at_scale(n: int, steps: int) -> dict:
    """fit_feature_mil's seconds per full-batch step at n cells and the peak RSS it adds."""
    import resource

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 78)).astype(np.float32)
    y = (x[:, :NUM_CLASSES] + rng.normal(size=(n, NUM_CLASSES)).astype(np.float32) > 0.5).astype(np.float32)
    bag = np.arange(n) // 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    _, seconds = timed(lambda: fit_feature_mil(FeatureClassifier(78), x, bag, y, epochs=steps))
    added = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    per_step = seconds / steps
    print(f"fit_feature_mil at {n} cells ({n // 20} bags): {per_step:.2f} s per step ({per_step * 300 / 60:.1f} min "
          f"for the default 300), peak RSS +{added:.0f} MiB over the data's {before:.0f} MiB, "
          f"{torch.get_num_threads()} torch threads")
    return {"cells": n, "seconds_per_step": per_step, "added_mib": added}


if __name__ == "__main__":
    main()
