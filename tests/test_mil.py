"""Multiple-instance learning (hpa_scc.weak.mil) and the features family's MIL and boosted fits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hpa_scc.config import ConfigError, load_config
from hpa_scc.constants import NUM_CLASSES
from hpa_scc.engine.families import fit_feature_boosting, fit_feature_classifier, fit_feature_mil
from hpa_scc.models.cells import FeatureClassifier, TreeEnsembleClassifier
from hpa_scc.weak.mil import POOLING, bag_softmax, mil_loss, pool_logits


def test_each_pooling_rule_gives_its_value():
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0], [3.0, 0.5], [-2.0, 4.0]])
    bag = torch.tensor([0, 0, 1, 1])
    assert torch.allclose(pool_logits(logits, bag, 2, "max"), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert torch.allclose(pool_logits(logits, bag, 2, "mean"), torch.tensor([[0.5, 0.5], [0.5, 2.25]]))
    r = 2.0
    lse = torch.log((torch.exp(r * logits[:2]).mean(0))) / r
    assert torch.allclose(pool_logits(logits, bag, 2, "lse", r)[0], lse)
    # lse lies between the mean and the max, and tends to each at the ends of the sharpness
    assert torch.allclose(pool_logits(logits, bag, 2, "lse", 1e-4), pool_logits(logits, bag, 2, "mean"), atol=1e-3)
    assert torch.allclose(pool_logits(logits, bag, 2, "lse", 200.0), pool_logits(logits, bag, 2, "max"), atol=1e-2)
    # noisy-OR: P(image) = 1 - prod(1 - p_i)
    p = torch.sigmoid(logits[:2])
    noisy = 1 - (1 - p).prod(0)
    assert torch.allclose(torch.sigmoid(pool_logits(logits, bag, 2, "noisy_or")[0]), noisy, atol=1e-6)
    # ... and stays finite where every cell is sure
    big = pool_logits(torch.full((3, 1), 40.0), torch.zeros(3, dtype=torch.long), 1, "noisy_or")
    assert torch.isfinite(big).all() and big.item() > 40
    # attention: weights that sum to 1 per bag, the image logit their weighted mean
    attention = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [5.0, 0.0], [5.0, 0.0]])
    w = bag_softmax(attention, bag, 2)
    assert torch.allclose(w[:2, 0], torch.tensor([0.25, 0.75])) and torch.allclose(w[2:, 1], torch.tensor([0.5, 0.5]))
    pooled = pool_logits(logits, bag, 2, "attention", attention=attention)
    assert torch.allclose(pooled[0, 0], torch.tensor(0.75)) and torch.allclose(pooled[1, 1], torch.tensor(2.25))


def test_pooling_refuses_what_it_cannot_pool():
    logits, bag = torch.zeros(3, 2), torch.tensor([0, 0, 2])
    with pytest.raises(ValueError, match="unknown MIL pooling 'median'; choose one of lse, attention"):
        pool_logits(logits, torch.tensor([0, 0, 1]), 2, "median")
    with pytest.raises(ValueError, match="1 of 3 bags have no cell"):
        pool_logits(logits, bag, 3, "max")
    with pytest.raises(ValueError, match="attention pooling needs the model's attention logits"):
        pool_logits(logits, torch.tensor([0, 0, 1]), 2, "attention")
    with pytest.raises(ValueError, match="sharpness must be > 0"):
        pool_logits(logits, torch.tensor([0, 0, 1]), 2, "lse", 0.0)


def test_mil_loss_is_the_image_level_bce_and_its_gradient_reaches_the_cells():
    logits = torch.tensor([[2.0], [-3.0], [-1.0]], requires_grad=True)
    bag = torch.tensor([0, 0, 1])
    labels = torch.tensor([[1.0], [0.0]])
    loss = mil_loss(logits, bag, labels, "max")
    expected = (torch.nn.functional.softplus(torch.tensor(-2.0)) + torch.nn.functional.softplus(torch.tensor(-1.0))) / 2
    assert torch.allclose(loss, expected)
    loss.backward()
    # max pooling: only each image's best cell gets a gradient
    assert logits.grad[1, 0] == 0 and logits.grad[0, 0] < 0 and logits.grad[2, 0] > 0


def _toy_bags(seed: int = 0, images: int = 60, cells: int = 6):
    """Images of ``cells`` cells; class 0 is in an image's labels when at least one of its cells
    shows it, and a cell shows it when its feature 0 is high. Feature 1 is a decoy: high in every
    cell of a positive image (an image-level trait, e.g. its brightness), so the inherited labels
    favour it while MIL, which asks only for one positive cell per positive image, does not."""
    rng = np.random.default_rng(seed)
    x, labels, bag, truth = [], [], [], []
    for i in range(images):
        positive = i % 2 == 0
        shows = np.zeros(cells, bool)
        if positive:
            shows[rng.choice(cells, size=1 + rng.integers(2), replace=False)] = True
        f0 = np.where(shows, 2.0, 0.0) + rng.normal(0, 0.3, cells)
        f1 = (1.5 if positive else 0.0) + rng.normal(0, 0.3, cells)
        x.append(np.stack([f0, f1, rng.normal(size=cells)], 1))
        label = np.zeros((cells, NUM_CLASSES), np.float32)
        label[:, 0] = positive
        label[:, 18] = not positive
        labels.append(label)
        bag.append(np.full(cells, i))
        truth.append(shows)
    return (np.concatenate(x).astype(np.float32), np.concatenate(labels), np.concatenate(bag),
            np.concatenate(truth))


def _within_image_first(scores: np.ndarray, bag: np.ndarray, truth: np.ndarray) -> float:
    """Share of positive images whose best-scored cell truly shows the class."""
    hits = [truth[bag == b][np.argmax(scores[bag == b])] for b in np.unique(bag[truth]) if truth[bag == b].any()]
    return float(np.mean(hits))


def _within_image_auc(scores: np.ndarray, bag: np.ndarray, truth: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    aucs = [roc_auc_score(truth[bag == b], scores[bag == b]) for b in np.unique(bag)
            if 0 < truth[bag == b].sum() < (bag == b).sum()]
    return float(np.mean(aucs))


@pytest.mark.parametrize("rule", ["lse", "attention", "max"])
def test_mil_ranks_the_cell_that_carries_the_class_first_where_image_labels_do_not(rule):
    x, labels, bag, truth = _toy_bags()
    mil = fit_feature_mil(FeatureClassifier(3, attention=rule == "attention"), x, bag, labels, rule=rule, epochs=300)
    inherited = fit_feature_classifier(FeatureClassifier(3), x, labels)
    with torch.no_grad():
        s_mil, s_inh = mil(torch.from_numpy(x)).numpy()[:, 0], inherited(torch.from_numpy(x)).numpy()[:, 0]
    assert _within_image_first(s_mil, bag, truth) >= 0.95
    assert _within_image_auc(s_mil, bag, truth) > 0.95
    # the image-labels model learnt the decoy: within an image it separates the cells barely
    assert _within_image_auc(s_inh, bag, truth) < 0.8
    assert _within_image_auc(s_mil, bag, truth) - _within_image_auc(s_inh, bag, truth) > 0.15
    # the MIL model's largest weight is on the feature that marks the cell (the image's trait
    # still helps it tell positive images from negative ones)
    w = mil.linear.weight[0].detach().abs()
    assert w[0] > w[1] and w[0] > w[2]


def test_mil_fit_is_deterministic_for_a_seed():
    x, labels, bag, _ = _toy_bags(seed=1)
    a = fit_feature_mil(FeatureClassifier(3), x, bag, labels, rule="lse", epochs=50, seed=3)
    b = fit_feature_mil(FeatureClassifier(3), x, bag, labels, rule="lse", epochs=50, seed=3)
    c = fit_feature_mil(FeatureClassifier(3), x, bag, labels, rule="lse", epochs=50, seed=4)
    assert torch.equal(a.linear.weight, b.linear.weight) and not torch.equal(a.linear.weight, c.linear.weight)
    with pytest.raises(FloatingPointError, match="the MIL loss became nan"):
        fit_feature_mil(FeatureClassifier(3), np.where(x > 1, np.nan, x), bag, labels, epochs=2)


def test_boosted_trees_as_tensors_predict_what_scikit_learn_predicts():
    from sklearn.ensemble import HistGradientBoostingClassifier

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)).astype(np.float32)
    x[::17, 2] = np.nan  # missing values take the side the fit chose
    y = np.zeros((300, NUM_CLASSES), np.float32)
    y[:, 0] = x[:, 0] + 0.5 * x[:, 1] ** 2 > 0.5  # not linear in the features
    y[:, 3] = np.nan_to_num(x[:, 2]) > 0
    y[:, 18] = 1 - y[:, 0]
    model = fit_feature_boosting(TreeEnsembleClassifier(), x, y, iters=30, lr=0.1, leaves=7)
    with torch.no_grad():
        p = model(torch.from_numpy(x)).numpy()
    for c in (0, 3, 18):
        ref = HistGradientBoostingClassifier(max_iter=30, learning_rate=0.1, max_leaf_nodes=7, l2_regularization=1.0,
                                             early_stopping=False, random_state=0).fit(x.astype(np.float64), y[:, c] > 0.5)
        assert np.abs(p[:, c] - ref.predict_proba(x.astype(np.float64))[:, 1]).max() < 1e-6
    assert p[:, 5].max() < 0.01  # a class no cell has: a constant, no trees
    assert int(model.tree_class.bincount(minlength=NUM_CLASSES)[0]) == 30
    # a checkpoint is a plain state dict: a fresh module takes the tables' sizes from it
    fresh = TreeEnsembleClassifier()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert np.array_equal(fresh(torch.from_numpy(x)).numpy(), p)
        # scored in small chunks: the same scores
        assert np.array_equal(fresh.logits(torch.from_numpy(x), chunk=7).sigmoid().numpy(), p)
    # the walk's flat tables are built once per state: another state loaded into the same module
    # (after it has scored) scores as that state does, not from the tables cached before
    other = fit_feature_boosting(TreeEnsembleClassifier(), x, 1 - y, iters=30, lr=0.1, leaves=7)
    with torch.no_grad():
        expected = other(torch.from_numpy(x)).numpy()
        fresh.load_state_dict(other.state_dict())
        assert np.array_equal(fresh(torch.from_numpy(x)).numpy(), expected)
        fresh.leaf.fill_(True)  # changed in place: every root a leaf, every cell stays there
        rooted = fresh(torch.from_numpy(x)).numpy()
        assert not np.array_equal(rooted, expected) and (rooted == rooted[0]).all()


def test_config_allows_mil_only_where_there_is_a_mil_loss():
    cfg = load_config(Path("configs/cell_features_mil.yaml"))
    assert cfg.model.mil == "lse" and cfg.model.family == "features"
    assert load_config(Path("configs/cell_features_boosted.yaml")).model.feature_classifier == "boosting"
    with pytest.raises(ConfigError, match="model.mil = 'softmax'; choose one of"):
        load_config(None, ["model.family=features", "model.mil=softmax"])
    with pytest.raises(ConfigError, match="trees take no MIL loss"):
        load_config(Path("configs/cell_features_boosted.yaml"), ["model.mil=lse"])
    assert load_config(Path("configs/cell_resnet18_mil.yaml")).model.mil == "lse"
    with pytest.raises(ConfigError, match="model.mil=attention trains the features family's logistic model or"):
        load_config(Path("configs/cell_resnet18.yaml"), ["model.mil=attention"])
    with pytest.raises(ConfigError, match="not family 'maskrcnn'"):
        load_config(None, ["model.mil=lse"])
    with pytest.raises(ConfigError, match="model.feature_classifier = 'svm'"):
        load_config(None, ["model.family=features", "model.feature_classifier=svm"])
    assert set(POOLING) >= {"lse", "attention", "max", "noisy_or"}


@pytest.fixture(scope="module")
def prepared(shared_data, tmp_path_factory) -> Path:
    """6 synthetic images prepared at 128 px in 2 folds; this module's copy (the fits write the feature store)."""
    shared = shared_data.prepared(images=6, size=256, seed=11, prepare_size=128, folds=2)
    return shared_data.copy(shared, tmp_path_factory.mktemp("mil"))


@pytest.mark.parametrize("overrides", [["model.feature_classifier=boosting", "model.boost_iters=20"],
                                       ["model.mil=attention", "model.mil_epochs=50"]])
def test_the_features_variants_train_and_predict_through_the_commands(prepared, tmp_path, overrides):
    from hpa_scc.apps.predict import predict_folder
    from hpa_scc.engine.train import train

    run = tmp_path / "run"
    cfg = load_config(Path("configs/cell_features.yaml"), [f"data.prepared_dir={prepared / 'prepared'}",
                                                           f"train.run_dir={run}", "data.val_fold=-1", *overrides])
    model = train(cfg, progress=False).model
    kind = TreeEnsembleClassifier if "boosting" in overrides[0] else FeatureClassifier
    assert isinstance(model, kind)
    predict_folder(run, prepared / "set", tmp_path / "pred", workers=1, progress=False)
    conf = np.loadtxt(tmp_path / "pred" / "cells.csv", delimiter=",", skiprows=1, usecols=range(7, 7 + NUM_CLASSES))
    assert conf.shape[1] == NUM_CLASSES and 0 <= conf.min() and conf.max() <= 1
    # predict loaded the checkpoint into a fresh model: the same scores as the fitted one
    from hpa_scc.engine.inference import load_run

    loaded = load_run(run, device="cpu")
    assert type(loaded.model) is kind
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name].cpu(), value), name


def test_refinement_rounds_retrain_on_the_last_round_and_stop_when_the_held_out_f1_does(prepared, tmp_path, capsys):
    from hpa_scc.apps.refine import refine_rounds
    from hpa_scc.cli import main
    from hpa_scc.data.prepared import PreparedSet
    from hpa_scc.engine.train import train

    p = prepared / "prepared"
    run = tmp_path / "mil"
    train(load_config(Path("configs/cell_features_mil.yaml"), [f"data.prepared_dir={p}", f"train.run_dir={run}",
                                                               "data.val_fold=0", "model.mil_epochs=100"]),
          progress=False)
    assert main(["refine", str(run), str(p), "--name", "rr", "--held-out-folds", "0", "--threshold", "0",
                 "--relative", "0.25", "--min-f1", "0", "--rounds", "3", "-q"]) == 0
    out = capsys.readouterr().out
    ps = PreparedSet(p)
    reports = [json.loads(ps.refine_record_path(f"rr{k}").read_text()) for k in (1, 2, 3)
               if ps.refine_record_path(f"rr{k}").is_file()]
    assert len(reports) >= 2 and f"round {len(reports)}:" in out
    f1 = [r["held_out_f1"] for r in reports]
    # it went on while the held-out F1 rose and stopped at the first round that did not raise it
    assert all(f1[i] > f1[i - 1] for i in range(1, len(f1) - 1))
    assert len(f1) == 3 or f1[-1] <= f1[-2]
    best = max(range(len(f1)), key=lambda i: (f1[i], -i)) + 1
    assert f"best round: rr{best} (train with data.labels=rr{best})" in out
    # round 2's model is the run's config trained on round 1's labels, inside what refine writes
    model = ps.labels_dir("rr1") / "model"
    saved = load_config(model / "config.yaml")
    assert saved.data.labels == "rr1" and saved.model.mil == "lse" and reports[1]["run_dir"] == str(model)
    # a second call resumes: the same labels, nothing retrained
    before = (model / "best.pt").stat().st_mtime_ns
    name, again = refine_rounds(run, p, name="rr", rounds=3, held_out_folds=[0], threshold=0.0, relative=0.25,
                                min_f1=0.0, progress=False)
    assert name == f"rr{best}" and [r.held_out_f1 for r in again] == pytest.approx(f1)
    assert (model / "best.pt").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        refine_rounds(run, p, name="rr", rounds=0)


def test_the_crop_cnn_trains_on_bags_of_cells_with_the_mil_loss(prepared, tmp_path):
    from hpa_scc.data.cells import CellBagDataset, build_store, collate_bags
    from hpa_scc.data.prepared import PreparedSet
    from hpa_scc.engine.train import train

    p = prepared / "prepared"
    store = build_store(p, "crops", 32, progress=False)
    labels = store.labels(PreparedSet(p), "image")
    bags = CellBagDataset(store, np.arange(len(store))[::-1], labels)  # any row order: grouped by image
    assert len(bags) == len(store.names) and sum(t["cells"] for _, t in (bags[i] for i in range(len(bags)))) == len(store)
    crops, target = bags[0]
    image = store.cells["image"][bags.cells.rows[0]]
    assert crops.shape[0] == target["cells"] == int((store.cells["image"] == image).sum())
    assert torch.equal(target["label_vector"], torch.from_numpy(labels[store.cells["image"] == image].max(0)))
    values, targets = collate_bags([bags[0], bags[1]])
    assert values.shape[0] == targets[0]["cells"] + targets[1]["cells"]

    run = tmp_path / "cellmil"
    cfg = load_config(Path("configs/cell_resnet18_mil.yaml"), [
        f"data.prepared_dir={p}", f"train.run_dir={run}", "data.crop_size=32", "train.max_epochs=1",
        "train.images_per_gpu=2", "data.workers=0", "train.tensorboard=false"])
    result = train(cfg, progress=False)
    assert "2 images (bags of cells) x 1 accumulation" in (run / "train.log").read_text()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r.get("kind") == "epoch"]
    assert epochs and "mean_loss_mil" in epochs[-1] and math.isfinite(epochs[-1]["mean_loss_mil"])
    val = [r for r in rows if r.get("kind") == "val"]
    assert val and 0 <= val[-1]["cell_AP"] <= 1  # validated cell by cell, as any cell model
    model = result.model.eval()
    with torch.no_grad():
        scores = model(values[:3].float() / 255)
    assert scores.shape == (3, NUM_CLASSES) and 0 <= float(scores.min()) and float(scores.max()) <= 1


def test_soft_targets_fit_as_weighted_rows_and_hard_labels_fit_as_before():
    """Distillation into the features models: a soft target t is a positive row of weight t and a
    negative one of weight 1 - t, so a fit on soft targets reproduces them; 0/1 labels give the
    same rows, unweighted, as before soft targets existed."""
    from hpa_scc.engine.families import soft_rows

    x = np.array([[0.0], [1.0], [2.0]])
    xs, ys, ws = soft_rows(x, np.array([1.0, 0.25, 0.0]))
    assert xs[:, 0].tolist() == [0.0, 2.0, 1.0, 1.0] and ys.tolist() == [True, False, True, False]
    assert ws.tolist() == [1.0, 1.0, 0.25, 0.75]
    xs, ys, ws = soft_rows(x, np.array([1.0, 0.0, 1.0]))
    assert ws is None and xs is x and ys.tolist() == [True, False, True]
    # two groups of cells with soft targets 0.8 and 0.2 for class 0: both fits recover them
    rng = np.random.default_rng(0)
    group = np.repeat([0, 1], 200)
    features = np.stack([group + rng.normal(0, 0.05, 400), rng.normal(size=400)], 1).astype(np.float32)
    labels = np.zeros((400, NUM_CLASSES), np.float32)
    labels[:, 0] = np.where(group == 0, 0.8, 0.2)
    labels[:, 18] = 1.0 - labels[:, 0]
    with torch.no_grad():
        logistic = fit_feature_classifier(FeatureClassifier(2), features, labels, c=100.0)(torch.from_numpy(features))
        trees = fit_feature_boosting(TreeEnsembleClassifier(), features, labels, iters=50, leaves=3)(
            torch.from_numpy(features))
    for p in (logistic.numpy(), trees.numpy()):
        assert p[group == 0, 0].mean() == pytest.approx(0.8, abs=0.03)
        assert p[group == 1, 0].mean() == pytest.approx(0.2, abs=0.03)
    # thresholded at 0.5 (what hard labels at 0.5 would say), group 0 would score near 1 instead
    with torch.no_grad():
        hard = fit_feature_classifier(FeatureClassifier(2), features, (labels > 0.5).astype(np.float32), c=100.0)(
            torch.from_numpy(features)).numpy()
    assert hard[group == 0, 0].mean() > 0.95


def test_a_cap_on_training_images_never_cuts_a_bag(prepared, tmp_path, caplog):
    """data.max_train_images counts cells for the per-cell fits and whole images for MIL: a bag cut
    short could lose the one cell that shows its image's label."""
    import logging

    from hpa_scc.data.cells import build_store
    from hpa_scc.data.prepared import PreparedSet
    from hpa_scc.engine.train import train

    store = build_store(PreparedSet(prepared / "prepared"), "features", 64, progress=False)
    rows = store.select([0, 1])
    images = np.asarray(store.cells["image"][rows])
    two = store.cap(rows, 2, whole_images=True)
    kept = np.unique(np.asarray(store.cells["image"][two]))
    assert len(kept) == 2 and len(two) == np.isin(images, kept).sum() > 3  # every cell of both images
    assert store.cap(rows, 3).tolist() == rows[:3].tolist() and store.cap(rows, None) is rows
    caplog.set_level(logging.INFO, logger="hpa_scc")
    cfg = load_config(Path("configs/cell_features_mil.yaml"), [
        f"data.prepared_dir={prepared / 'prepared'}", f"train.run_dir={tmp_path / 'run'}", "data.val_fold=-1",
        "data.max_train_images=2", "model.mil_epochs=5"])
    train(cfg, progress=False)
    assert f"MIL (lse pooling over 2 images) on {len(two)} cells" in caplog.text
