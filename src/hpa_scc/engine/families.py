"""Each model family's part of training, as entries of one registry (``FAMILIES`` in
``hpa_scc.constants`` names them, with their backbones, for the config to validate against):

- ``build_data``: the family's datasets, batching and validation (Mask R-CNN: the COCO folds;
  ``cell``/``features``: the per-cell store);
- ``fit_features``: the ``features`` family's one-off fit (no loop, no optimiser); the families
  the loop trains (``FAMILIES[name].loop``) go through ``engine.train.fit``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from hpa_scc.config import Config, to_dict
from hpa_scc.constants import FAMILIES, NUM_CLASSES
from hpa_scc.data.cells import CellDataset
from hpa_scc.data.instances import CellInstances, collate, shadowed_warning
from hpa_scc.data.prepared import PreparedSet
from hpa_scc.engine.loop import evaluate
from hpa_scc.engine.runfolder import FINISHED, RESUME_FIX, MetricsLog, Run, TrainResult, resumes
from hpa_scc.models.cells import FeatureClassifier, TreeEnsembleClassifier, build_family_model
from hpa_scc.utils.checkpoint import (BEST, LAST, changed_folds, check_model, load_checkpoint, load_model_state,
                                     save_checkpoint)

log = logging.getLogger("hpa_scc.engine.train")


# The validation figure that picks best.pt, per model family (constants.FAMILIES).
VAL_METRIC = {name: family.val_metric for name, family in FAMILIES.items()}


@dataclass
class Data:
    """A family's training data: the sets, how to batch them and how to score the model on the validation set."""

    train_set: Any
    val_set: Any
    collate_fn: Callable
    validate: Callable[[torch.nn.Module, Any, torch.device], dict]


def build_data(cfg: Config, prepared: PreparedSet, train_folds: list[int], val_folds: list[int],
               progress: bool = True) -> Data:
    """The family's datasets: Mask R-CNN trains on the COCO folds, cell models on stored crops."""
    if cfg.model.family == "maskrcnn":
        # uint8 samples: a quarter of the bytes through workers, pinned memory and the PCIe copy
        common = {"layout": cfg.data.layout, "labels": cfg.data.labels, "in_channels": cfg.model.in_channels,
                  "seed": cfg.train.seed, "uint8": True, "cell_features": cfg.model.cell_features}
        train_set = CellInstances(prepared, train_folds, augment=True, hflip_prob=cfg.data.hflip_prob,
                                  vflip_prob=cfg.data.vflip_prob, rot90=cfg.data.rot90,
                                  max_images=cfg.data.max_train_images, **common)
        val_set = CellInstances(prepared, val_folds, max_images=cfg.data.max_val_images, **common) if val_folds else None
        if cfg.model.head == "softmax":  # kept for fidelity with the original; see instances.shadowed_instances
            shadowed, total = train_set.shadowed()
            if shadowed:
                log.warning(shadowed_warning(shadowed, total))

        def validate(model, dataset, device):
            loader = DataLoader(dataset, batch_size=cfg.train.images_per_gpu, collate_fn=collate,
                                num_workers=cfg.data.workers)
            return evaluate(model, loader, dataset.coco, device, amp=cfg.train.amp)

        return Data(train_set, val_set, collate, validate)

    from hpa_scc.data.cells import CellBagDataset, build_store, collate_bags, collate_cells

    kind = "crops" if cfg.model.family == "cell" else "features"
    store = build_store(prepared, kind, cfg.data.crop_size, progress=progress)
    labels = store.labels(prepared, cfg.data.labels)  # float32 [cells, 19], aligned with the store's rows
    crops = {"augment": True, "in_channels": cfg.model.in_channels, "seed": cfg.train.seed} if kind == "crops" else {}
    # MIL (the cell family): the training samples are images, bags of their cells
    bags = kind == "crops" and cfg.model.mil != "none"
    # the cap counts cells, or images where the model learns from images (MIL: a bag is never cut)
    train_rows = store.cap(store.select(train_folds), cfg.data.max_train_images, whole_images=cfg.model.mil != "none")
    train_set = (CellBagDataset if bags else CellDataset)(store, train_rows, labels, **crops)
    val_set = (CellDataset(store, store.select(val_folds)[: cfg.data.max_val_images], labels,
                           **({"in_channels": cfg.model.in_channels} if kind == "crops" else {}))
               if val_folds else None)

    # A synthetic set's true cell labels: validation reports against them too.
    truth = store.labels(prepared, "truth", strict=False) if prepared.layouts("truth") else None

    def validate(model, dataset, device):
        return evaluate_cells(model, dataset, device, truth)

    return Data(train_set, val_set, collate_bags if bags else collate_cells, validate)


def fit_features(run: Run, data: Data) -> TrainResult:
    """The ``features`` family: per-cell features + logistic regressions, fitted once, saved as
    best.pt/last.pt like any run (so predict and refine load it the same way)."""
    cfg, last = run.cfg, run.run_dir / LAST
    model = build_family_model(cfg)
    if resumes(cfg, run.run_dir):
        state = load_checkpoint(last)
        check_model(state, last, cfg.model.family, cfg.model.backbone, RESUME_FIX)  # not refitted over another run's
        # fitted already with these settings on this data: nothing to redo. A checkpoint without a
        # data record (an earlier version's) is fitted again, once.
        changed = changed_folds(state["data"], run.data) if state.get("data") and run.data else []
        if state.get("config") != to_dict(cfg):
            log.info("%s was fitted with another config: fitting again", last)
        elif not state.get("data"):
            log.info("%s records no data it was fitted on (an earlier version's): fitting again", last)
        elif changed:
            log.info("%s was fitted on other data (the '%s' labels changed in %s): fitting again", last,
                     run.data["labels"], ", ".join(changed))
        else:
            load_model_state(model, state, last, cfg.model.family, cfg.model.backbone, RESUME_FIX)
            log.info("features model already fitted with this config and data: %s", last)
            return TrainResult(FINISHED, model, run.run_dir, cfg.train.max_epochs,
                               best_metric=state.get("best_metric", -1.0), checkpoint=last)
    start = time.perf_counter()
    store, rows, m = data.train_set.store, data.train_set.rows, cfg.model
    features, labels = np.asarray(store.array[rows]), data.train_set.labels
    if m.feature_classifier == "boosting":
        fit_feature_boosting(model, features, labels, iters=m.boost_iters, lr=m.boost_lr, leaves=m.boost_leaves,
                             seed=cfg.train.seed)
        what = f"boosted trees ({m.boost_iters} per class)"
    elif m.mil != "none":
        # a bag is an image; its labels are its cells' labels' union (the image labels, for data.labels=image)
        _, bag = np.unique(np.asarray(store.cells["image"][rows]), return_inverse=True)
        fit_feature_mil(model, features, bag, labels, rule=m.mil, sharpness=m.mil_sharpness, c=m.feature_c,
                        epochs=m.mil_epochs, seed=cfg.train.seed)
        what = f"MIL ({m.mil} pooling over {bag.max() + 1 if len(bag) else 0} images)"
    else:
        fit_feature_classifier(model, features, labels, c=m.feature_c, seed=cfg.train.seed)
        what = "logistic regressions"
    log.info("features: %s on %d cells x %d features in %.1f s", what, len(data.train_set), store.array.shape[1],
             time.perf_counter() - start)
    scores = {}
    if data.val_set is not None:
        scores = data.validate(model, data.val_set, torch.device("cpu"))
        log.info("validation: %s", ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float)))
    best = scores.get(VAL_METRIC["features"], -1.0)
    if run.info.is_main:
        metrics = MetricsLog(run.run_dir, True, False)
        metrics.write("val", 0, {"epoch": cfg.train.max_epochs, **scores})
        state = {"model": model.state_dict(), "epoch": cfg.train.max_epochs, "step_in_epoch": 0, "global_step": 0,
                 "best_metric": float(best), "config": to_dict(cfg), "family": cfg.model.family, "data": run.data}
        save_checkpoint(run.run_dir / BEST, state)
        save_checkpoint(last, state)
    return TrainResult(FINISHED, model, run.run_dir, cfg.train.max_epochs, best_metric=best, checkpoint=last)


# ----------------------------------------------------------------------------------------------
# The cell-level families' fit and validation

def soft_rows(x: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One class's targets as a weighted binary problem: (x, y, sample weights). A soft target t
    (0 < t < 1: distillation, ``refine --soft``) becomes the cell twice, positive with weight t
    and negative with weight 1 - t, whose weighted log-loss is the cross-entropy against t; 0/1
    targets stay one row each, unweighted (weights None when every target is 0 or 1: the fit is
    then the same as before soft targets existed)."""
    target = np.asarray(target, np.float64)
    soft = (target > 0) & (target < 1)
    if not soft.any():
        return x, target > 0.5, None
    hard = ~soft
    xs = np.concatenate([x[hard], x[soft], x[soft]])
    ys = np.concatenate([target[hard] > 0.5, np.ones(soft.sum(), bool), np.zeros(soft.sum(), bool)])
    ws = np.concatenate([np.ones(hard.sum()), target[soft], 1.0 - target[soft]])
    return xs, ys, ws


def constant_target(target: np.ndarray) -> float | None:
    """The logit of a class no cell carries (-9) or every cell fully carries (+9): nothing to fit;
    None otherwise."""
    if not (target > 0).any():
        return -9.0
    if (target >= 1).all():
        return 9.0
    return None


def fit_feature_classifier(model: FeatureClassifier, features: np.ndarray, labels: np.ndarray, c: float = 1.0,
                           seed: int = 0) -> FeatureClassifier:
    """Fit ``model`` in place: standardisation + an L2 logistic regression per class. Labels are
    0/1 or soft targets in [0, 1] (fitted as weighted rows, ``soft_rows``). A class no cell
    carries (or every cell fully carries) gets a constant."""
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(features, np.float64)
    mean, scale = x.mean(0), x.std(0)
    scale[scale < 1e-8] = 1.0
    z = (x - mean) / scale
    y = np.asarray(labels, np.float64)
    weight = np.zeros((y.shape[1], x.shape[1]))
    bias = np.zeros(y.shape[1])
    for c_idx in range(y.shape[1]):
        constant = constant_target(y[:, c_idx])
        if constant is not None:
            bias[c_idx] = constant
            continue
        zs, ys, ws = soft_rows(z, y[:, c_idx])
        clf = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(zs, ys, sample_weight=ws)
        weight[c_idx], bias[c_idx] = clf.coef_[0], clf.intercept_[0]
    with torch.no_grad():
        model.mean.copy_(torch.from_numpy(mean).float())
        model.scale.copy_(torch.from_numpy(scale).float())
        model.linear.weight.copy_(torch.from_numpy(weight).float())
        model.linear.bias.copy_(torch.from_numpy(bias).float())
    return model


def fit_feature_mil(model: FeatureClassifier, features: np.ndarray, bag: np.ndarray, labels: np.ndarray, *,
                    rule: str = "lse", sharpness: float = 2.0, c: float = 1.0, epochs: int = 300,
                    seed: int = 0) -> FeatureClassifier:
    """Fit ``model`` in place with a multiple-instance loss (``weak.mil.mil_loss``): the cells'
    logits pooled per image (``bag`` int [N], 0..B-1) against the image's labels, the union of
    its cells' ``labels`` [N, 19]. Full-batch Adam, ``epochs`` steps, with the L2 penalty a
    logistic regression of inverse strength ``c`` has per cell (||W||^2 / (2 c N)); standardised
    features, as ``fit_feature_classifier``. Deterministic for a seed on the CPU."""
    from hpa_scc.weak.mil import mil_loss

    x = np.asarray(features, np.float64)
    mean, scale = x.mean(0), x.std(0)
    scale[scale < 1e-8] = 1.0
    bag_t = torch.as_tensor(np.asarray(bag, np.int64))
    n_bags = int(bag_t.max()) + 1 if len(bag_t) else 0
    cell_labels = torch.as_tensor(np.asarray(labels) > 0.5, dtype=torch.float32)
    image_labels = torch.zeros((n_bags, cell_labels.shape[1])).scatter_reduce(
        0, bag_t[:, None].expand_as(cell_labels), cell_labels, "amax", include_self=False)
    with torch.no_grad():
        model.mean.copy_(torch.from_numpy(mean).float())
        model.scale.copy_(torch.from_numpy(scale).float())
    z = model.standardise(torch.from_numpy(x).float())
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters()]
    with torch.no_grad():  # small random start, reproducible for a seed
        for p in params:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.01)
    weights = [model.linear.weight] + ([model.attention.weight] if model.attention is not None else [])
    l2 = 1.0 / (2.0 * c * max(len(z), 1))
    optimiser = torch.optim.Adam(params, lr=0.01)
    for _ in range(epochs):
        attention = model.attention(z) if model.attention is not None else None
        loss = mil_loss(model.linear(z), bag_t, image_labels, rule, sharpness, attention)
        loss = loss + l2 * sum((w ** 2).sum() for w in weights)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the MIL loss became {loss.item()} (rule {rule}, sharpness {sharpness}); "
                                     "lower model.mil_sharpness or raise model.feature_c's regularisation")
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model


def fit_feature_boosting(model: TreeEnsembleClassifier, features: np.ndarray, labels: np.ndarray, *,
                         iters: int = 200, lr: float = 0.05, leaves: int = 15, seed: int = 0) -> TreeEnsembleClassifier:
    """Fit ``model`` in place: one scikit-learn HistGradientBoostingClassifier per class (no
    early stopping, so a fit does not depend on a random validation split), its trees copied into
    the model's tensors. Labels are 0/1 or soft targets (weighted rows, ``soft_rows``). A class no
    cell carries (or every cell fully carries) gets a constant, as ``fit_feature_classifier``."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    x = np.asarray(features, np.float64)
    y = np.asarray(labels, np.float64)
    baseline = np.zeros(y.shape[1])
    trees: list[tuple[int, np.ndarray]] = []
    for c_idx in range(y.shape[1]):
        constant = constant_target(y[:, c_idx])
        if constant is not None:
            baseline[c_idx] = constant
            continue
        clf = HistGradientBoostingClassifier(max_iter=iters, learning_rate=lr, max_leaf_nodes=leaves,
                                             l2_regularization=1.0, early_stopping=False, random_state=seed)
        clf.fit(*soft_rows(x, y[:, c_idx]))
        baseline[c_idx] = float(np.ravel(clf._baseline_prediction)[0])
        trees += [(c_idx, predictors[0].nodes) for predictors in clf._predictors]
    width = max((len(nodes) for _, nodes in trees), default=1)
    tables = {name: np.zeros((len(trees), width), dtype) for name, dtype in
              (("feature", np.int64), ("threshold", np.float64), ("left", np.int64), ("right", np.int64),
               ("leaf", bool), ("value", np.float64), ("missing_left", bool))}
    tables["leaf"][:] = True  # padding: leaves of value 0, never reached
    for t, (_, nodes) in enumerate(trees):
        n = len(nodes)
        tables["feature"][t, :n] = nodes["feature_idx"]
        tables["threshold"][t, :n] = nodes["num_threshold"]
        tables["left"][t, :n] = nodes["left"]
        tables["right"][t, :n] = nodes["right"]
        tables["leaf"][t, :n] = nodes["is_leaf"].astype(bool)
        tables["value"][t, :n] = np.where(nodes["is_leaf"].astype(bool), nodes["value"], 0.0)
        tables["missing_left"][t, :n] = nodes["missing_go_to_left"].astype(bool)
    depth = max((int(nodes["depth"].max()) for _, nodes in trees), default=0)
    state = {name: torch.from_numpy(table) for name, table in tables.items()}
    state.update(tree_class=torch.tensor([c for c, _ in trees], dtype=torch.int64),
                 baseline=torch.from_numpy(baseline), depth=torch.tensor(depth))
    model.load_state_dict(state)
    return model


@torch.no_grad()
def score_store_rows(model: nn.Module, dataset: CellDataset, device: torch.device, batch_size: int = 256) -> np.ndarray:
    """float32 [len(dataset), 19]: the model's scores for every row of ``dataset`` (no augmentation)."""
    model.eval()
    out = []
    for start in range(0, len(dataset), batch_size):
        values = torch.stack([dataset[j][0] for j in range(start, min(start + batch_size, len(dataset)))])
        out.append(model(values.to(device)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, NUM_CLASSES), np.float32)


def macro_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes (with positive and negative cells) of the average precision of cell scores."""
    from sklearn.metrics import average_precision_score

    y = labels > 0.5
    aps = [average_precision_score(y[:, c], scores[:, c]) for c in range(y.shape[1]) if 0 < y[:, c].sum() < len(y)]
    return float(np.mean(aps)) if aps else 0.0


def evaluate_cells(model: nn.Module, dataset: CellDataset, device: torch.device,
                   truth: np.ndarray | None = None) -> dict[str, float]:
    """Validation of a cell-level model: macro AP of its cell scores against the cells' training
    labels (``cell_AP``), and against the true labels where a synthetic set has them (``truth``:
    float32 [len(store), 19], ``CellStore.labels(..., "truth")``)."""
    scores = score_store_rows(model, dataset, device)
    out = {"cell_AP": macro_ap(scores, dataset.labels), "cells": len(dataset)}
    if truth is not None:
        out["cell_AP_truth"] = macro_ap(scores, truth[dataset.rows])
    return out
